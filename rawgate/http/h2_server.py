"""The inbound HTTP/2 driver: one h2 state machine per connection, one task per request stream.

Invariants:
- One read loop feeds h2. After every state-machine call `_flush()` moves h2's output into the
  connection's pending list, and ONE writer task puts it on the socket. Handlers never touch the
  socket, so a handler cancelled mid-send (RST_STREAM) can never leave half a frame on the wire.
- Pending output is bounded by limits.max_pending_output_bytes: above it the read loop stops
  reading (a peer that does not read cannot make us queue PING/SETTINGS ACKs) and senders wait.
  A write that makes no progress for timeouts.write_s kills the connection.
- A sender waits for the stream AND connection flow-control windows (woken by WindowUpdated /
  RemoteSettingsChanged) and never hands h2 more than the peer's max frame size; a window that
  stays shut for timeouts.write_s resets that stream (zero-window hold).
- Each request stream runs `await app(request, sink)` inside its own cancel scope, in a worker
  task of the connection's task group (on asyncio a worker that finished waits for the next
  stream instead of exiting): RST_STREAM cancels exactly that scope; teardown cancels them all.
- Stream tasks start only after a whole read batch has been processed, so a stream whose
  RST_STREAM arrived in the same batch never reaches the app (rapid reset, CVE-2023-44487).
- Flood caps are counted per frame as h2 parses them (h2_flood.GuardedH2), so a flood stops at the
  frame that crossed the cap. Caps, CONTINUATION floods, HPACK bombs and a peer far over
  MAX_CONCURRENT_STREAMS end in GOAWAY(ENHANCE_YOUR_CALM); other protocol errors in GOAWAY with
  h2's error code (PROTOCOL_ERROR family). Nothing escapes serve_h2.
- GOAWAY frames are written by this driver, never by h2's close_connection(): once h2 has sent
  GOAWAY it refuses to send on open streams, which would make a graceful drain impossible. When
  the shutdown grace runs out (the connection is cancelled from outside), the cut streams'
  RST_STREAM(INTERNAL_ERROR) and a final GOAWAY(INTERNAL_ERROR) are written before the close.
- A request head is checked when it arrives (_parse_head, then the app's `admit_head`, the auth
  decision on the head). A refused head is answered by the app with an empty body (its 401) and
  its DATA is dropped; only the connection window is handed back for it, so the stream's window
  never reopens. Kept DATA count against ServerState.buffered_body_bytes (bounded process-wide
  by limits.max_buffered_body_bytes, 503 once over) and a stream's window reopens only for bytes
  kept for its handler; the count is given back when the handler takes the body or the stream
  ends. DATA on a closed stream counts toward h2_max_noop_frames_per_s.
- Until its first request head has arrived a connection gets timeouts.header_read_s, then
  keepalive_idle_s whenever no stream is open.
- Request headers are fully validated by h2. Response headers are not (h2's outbound validation
  and normalisation cost ~10% of a small response): handlers must pass lower-case names and no
  hop-by-hop headers, as seam.py already requires. Only CR, LF and NUL are checked (one join):
  a header holding one is a ValueError before the stream starts, never a PROTOCOL_ERROR.
- The response HPACK encoder is http/hpack_encode.py, the flood guard http/h2_flood.py, and every
  touch of h2's private parts goes through compat.py. compat.fast_paths() is read once per
  connection (_new_h2): with it off, h2's own frame dispatch and HPACK encoder run (the flood
  caps are counted all the same).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from itertools import chain
from typing import TYPE_CHECKING, cast

import anyio
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import (
    DenialOfServiceError,
    ProtocolError,
    TooManyStreamsError,
)
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from rawgate import compat
from rawgate.aio import on_asyncio
from rawgate.compat import replace_local_settings
from rawgate.errors import (
    BadRequest,
    HeadersTooLarge,
    InternalError,
    Overloaded,
    PayloadTooLarge,
    RawgateError,
    RequestTimeout,
    URITooLong,
)
from rawgate.http.h1_server import _Wakeup
from rawgate.http.h2_flood import GuardedH2
from rawgate.http.hpack_encode import ResponseEncoder
from rawgate.http.server_stream import CONNECTION_GONE, ServerStream, close_stream
from rawgate.http.target import parse_target
from rawgate.respond import error_response
from rawgate.seam import ClientDisconnected, Header, Request, is_disconnect
from rawgate.wire import METHODS, TOKEN_BYTES, per_second_date

if TYPE_CHECKING:
    from anyio.abc import ByteStream, TaskGroup

    from rawgate.config import Config, LimitsConfig
    from rawgate.conn import ConnInfo, ServerState
    from rawgate.seam import App

__all__ = ["serve_h2"]

log = logging.getLogger("rawgate.h2")

# One receive() is at most this much: it bounds the frames h2 parses (and the replies it queues)
# before our flood counters and the pending-output check get a look.
_READ_BYTES = 64 * 1024
# RFC 9113 6.9.2: the connection window always starts here, whatever SETTINGS say.
_DEFAULT_WINDOW = 65535
# Connection errors we report as abuse rather than a broken peer.
_CALM = int(ErrorCodes.ENHANCE_YOUR_CALM)
_NO_ERROR = int(ErrorCodes.NO_ERROR)

# Built once: every response starts with these, and h2 takes tuples as they are.
_STATUS: dict[int, Header] = {s: (b":status", str(s).encode()) for s in range(100, 600)}
_SERVER: Header = (b"server", b"rawgate")
# The Date header, formatted at most once per second (formatdate is slow per request).
_date = per_second_date(lambda d: (b"date", d))


def _check_header_bytes(headers: list[Header]) -> None:
    """CR, LF or NUL in a response header is a ValueError before anything is sent (so the app
    can still answer a clean 500): h2's outbound validation is off, and a peer receiving one
    kills the stream with PROTOCOL_ERROR (RFC 9113 8.2.1). One C-level join, ~0.3 us."""
    block = b"".join(chain.from_iterable(headers))
    if b"\r" in block or b"\n" in block or b"\0" in block:
        raise ValueError("response header name or value contains CR, LF or NUL")


def _new_h2(limits: LimitsConfig) -> GuardedH2:
    config = H2Configuration(
        client_side=False,
        header_encoding=None,
        # Response headers are ours and lower-case by contract (module docstring): skip h2's
        # per-header outbound checks, a tenth of the cost of a small response.
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    h2 = GuardedH2(config, limits)
    # Read once per connection: with it off, h2's own frame dispatch and HPACK encoder (compat).
    fast = compat.fast_paths()
    h2.fast_dispatch = fast
    if fast:
        h2.encoder = ResponseEncoder()  # type: ignore[assignment]
    advertised = max(1, limits.h2_max_concurrent_streams)
    settings: dict[SettingCodes | int, int] = {
        SettingCodes.MAX_CONCURRENT_STREAMS: advertised,
        SettingCodes.INITIAL_WINDOW_SIZE: limits.h2_initial_window_bytes,
        SettingCodes.MAX_HEADER_LIST_SIZE: limits.h2_max_header_list_bytes,
    }
    replace_local_settings(h2, settings)
    h2.initiate_connection()
    # The SETTINGS frame above advertises the real limit. h2 itself enforces its local value as a
    # CONNECTION error, so raise that to a hard cap: a client that races past the advertised
    # limit (it may open streams before our SETTINGS arrive) gets REFUSED_STREAM from us; only a
    # peer far past it loses the connection.
    h2.stream_cap = max(2 * advertised, advertised + 16)
    settings[SettingCodes.MAX_CONCURRENT_STREAMS] = h2.stream_cap
    replace_local_settings(h2, settings)
    h2.decoder.max_header_list_size = limits.h2_max_header_list_bytes
    delta = limits.h2_connection_window_bytes - _DEFAULT_WINDOW
    if delta > 0:
        h2.increment_flow_control_window(delta)
    return h2


def _goaway(code: int, last_stream_id: int) -> bytes:
    return GoAwayFrame(0, last_stream_id=last_stream_id, error_code=code).serialize()


def _connection_error_code(e: ProtocolError) -> int:
    if isinstance(e, DenialOfServiceError | TooManyStreamsError):
        return _CALM
    # h2 signals its 64-frame CONTINUATION cap with a plain ProtocolError; only the text tells.
    if "too many continuation" in str(e).lower():
        return _CALM
    return int(e.error_code)



_Head = tuple[str, bytes, str, str, list[Header]]


class _Stream:
    """One request stream: its collected body and its ResponseSink."""

    __slots__ = (
        "_bytes_sent",
        "_c",
        "_ended",
        "_started",
        "_status",
        "body",
        "body_done",
        "body_event",
        "body_size",
        "error",
        "headers",
        "held",
        "is_head",
        "parsed",
        "reset",
        "scope",
        "sid",
        "unread",
        "win_event",
    )

    def __init__(self, c: _Conn, sid: int, headers: list[Header], ended: bool) -> None:
        self._c = c
        self.sid = sid
        self.headers = headers
        self.scope = anyio.CancelScope()
        self.body: list[bytes] = []
        self.body_size = 0
        self.held = 0  # bytes in `body`, counted in ServerState.buffered_body_bytes
        self.unread = False  # the head was refused (401): the body is dropped, its window shut
        self.parsed: _Head | None = None
        self.body_done = ended
        self.body_event: anyio.Event | None = None
        self.error: RawgateError | None = None
        self.is_head = False
        self.reset = False  # the peer reset it, or we did: nothing more may be sent
        self.win_event: anyio.Event | None = None
        self._started = False
        self._ended = False
        self._status = 0
        self._bytes_sent = 0

    # ---- ResponseSink ---------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._started

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent

    @property
    def status(self) -> int:
        return self._status

    def _head(self, status: int, headers: list[Header], length: int | None) -> list[Header]:
        head = [_STATUS.get(status) or (b":status", str(status).encode()), _date(), _SERVER]
        head += headers
        if length is not None:
            head.append((b"content-length", str(length).encode()))
        return head

    def _begin(self, status: int) -> None:
        if self._started:
            raise RuntimeError("response already started")
        if self.reset or self._c.closing:
            raise ClientDisconnected("stream reset by the client")
        self._started = True
        self._status = status

    async def start(self, status: int, headers: list[Header]) -> None:
        _check_header_bytes(headers)
        self._begin(status)
        c = self._c
        try:
            c.h2.send_headers(self.sid, self._head(status, headers, None), end_stream=self.is_head)
        except ProtocolError:
            raise ClientDisconnected("stream closed") from None
        self._ended = self.is_head
        c.flush()

    async def respond(self, status: int, headers: list[Header], body: bytes) -> None:
        _check_header_bytes(headers)
        self._begin(status)
        c = self._c
        h2 = c.h2
        sid = self.sid
        n = len(body)
        try:
            if self.is_head or not n:
                h2.send_headers(sid, self._head(status, headers, n), end_stream=True)
                self._ended = True
                c.flush()
                return
            h2.send_headers(sid, self._head(status, headers, n))
            if (
                n <= h2.max_outbound_frame_size
                and n <= h2.local_flow_control_window(sid)
                and c.pending <= c.max_pending
            ):
                # The common case (a JSON answer that fits the window): head and body leave in one
                # flush, hence one socket write.
                h2.send_data(sid, body, end_stream=True)
                h2.wu_credit += 2
                self._bytes_sent = n
                self._ended = True
                c.flush()
                return
        except ProtocolError:
            raise ClientDisconnected("stream closed") from None
        c.flush()
        await self._send_body(body, True)

    async def send(self, data: bytes) -> None:
        if not self._started:
            raise RuntimeError("send() before start()")
        if self._ended:
            if self.is_head:
                return  # a HEAD response has no body: the handler's bytes are dropped
            raise RuntimeError("send() after end()")
        if data:
            await self._send_body(data, False)

    async def end(self, data: bytes = b"") -> None:
        if not self._started:
            raise RuntimeError("end() before start()")
        if self._ended:
            if self.is_head:
                return
            raise RuntimeError("end() called twice")
        if data:
            await self._send_body(data, True)
            return
        if self.reset or self._c.closing:
            raise ClientDisconnected("stream reset by the client")
        try:
            self._c.h2.end_stream(self.sid)
        except ProtocolError:
            raise ClientDisconnected("stream closed") from None
        self._ended = True
        self._c.flush()

    async def _send_body(self, data: bytes, end: bool) -> None:
        c = self._c
        h2 = c.h2
        sid = self.sid
        n = len(data)
        off = 0
        try:
            while off < n:
                if self.reset or c.closing:
                    raise ClientDisconnected("stream reset by the client")
                if c.pending > c.max_pending:
                    c.flush()
                    await c.wait_output(c.max_pending)
                    continue
                window = h2.local_flow_control_window(sid)
                if window <= 0:
                    c.flush()
                    await self._wait_window()
                    continue
                size = min(n - off, window, h2.max_outbound_frame_size)
                chunk = data if size == n else data[off : off + size]
                off += size
                h2.send_data(sid, chunk, end_stream=end and off == n)
                h2.wu_credit += 2
                self._bytes_sent += size
                # Per frame, so the pending-output check above sees every byte: one huge send()
                # into a huge window must not park megabytes inside h2. Frames flushed while the
                # writer is busy still leave in one write (it joins what piled up).
                c.flush()
        except ProtocolError:
            raise ClientDisconnected("stream closed") from None
        if end:
            self._ended = True

    async def _wait_window(self) -> None:
        c = self._c
        ev = self.win_event = anyio.Event()
        c.win_waiters.add(self)
        try:
            with anyio.move_on_after(c.write_s) as scope:
                await ev.wait()
        finally:
            c.win_waiters.discard(self)
            self.win_event = None
        if scope.cancelled_caught:
            # A window held shut this long is a stuck or hostile reader: give the stream up
            # rather than pin its handler (and its upstream call) forever.
            c.reset_stream(self, ErrorCodes.CANCEL)
            raise ClientDisconnected("flow-control window stayed closed")


class _Conn:
    """One HTTP/2 connection: the read loop, the writer task and the stream table."""

    __slots__ = (
        "_active",
        "_admit",
        "_app",
        "_body_s",
        "_budget",
        "_cfg",
        "_dead",
        "_drain_done",
        "_drained",
        "_draining",
        "_idle_s",
        "_idle_t",
        "_idle_timer",
        "_idle_workers",
        "_info",
        "_keepalive_s",
        "_lim",
        "_loop",
        "_max_requests",
        "_max_streams",
        "_out",
        "_out_ready",
        "_peer_gone",
        "_read_scope",
        "_requests",
        "_state",
        "_stream",
        "_streams",
        "_tg",
        "close_code",
        "closing",
        "h2",
        "max_pending",
        "pending",
        "win_waiters",
        "write_s",
    )

    def __init__(
        self, stream: ByteStream, app: App, cfg: Config, info: ConnInfo, state: ServerState
    ) -> None:
        lim = cfg.limits
        self._stream = stream
        self._app = app
        self._cfg = cfg
        self._info = info
        self._state = state
        self._lim = lim
        self._max_streams = max(1, lim.h2_max_concurrent_streams)
        self._max_requests = lim.max_requests_per_connection
        # Until its first request head arrives a connection gets header_read_s, not the
        # keep-alive allowance: a preface-only connection is the cheapest way to hold a slot of
        # max_connections (HTTP/1.1 does the same). _on_request switches to keepalive_idle_s.
        self._idle_s = cfg.timeouts.header_read_s
        self._keepalive_s = cfg.timeouts.keepalive_idle_s
        self._body_s = cfg.timeouts.body_read_s
        self.write_s = cfg.timeouts.write_s
        self.max_pending = lim.max_pending_output_bytes
        self._budget: float = lim.max_buffered_body_bytes or math.inf
        # The app's auth decision on a head alone (GatewayApp.admit_head), asked before a body
        # byte is kept or a stream window reopened; apps without one get every body.
        self._admit: Callable[[str, str, str, list[Header]], bool] | None = getattr(
            app, "admit_head", None
        )
        self.h2 = _new_h2(lim)
        self._streams: dict[int, _Stream] = {}
        self._idle_workers: list[asyncio.Future[_Stream]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        if on_asyncio():
            self._loop = asyncio.get_running_loop()
        self._active = 0
        self._requests = 0
        self.win_waiters: set[_Stream] = set()
        # Output: whole frame sequences from h2, written by the one writer task.
        self._out: list[bytes] = []
        self.pending = 0  # bytes queued or being written
        self._out_ready = _Wakeup()  # reused: an anyio.Event per write cycle costs ~5 us
        self._drained: anyio.Event | None = None
        self._read_scope = anyio.CancelScope()
        self._idle_t = 0.0  # loop time the connection last became idle (asyncio timer only)
        self._idle_timer: asyncio.TimerHandle | None = None
        self._tg: TaskGroup | None = None
        self.close_code: int | None = None
        self.closing = False
        self._dead = False
        self._peer_gone = False
        self._draining = False
        self._drain_done = False

    # ---- output ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Move h2's queued bytes to the writer. Called after every state-machine call."""
        data = self.h2.data_to_send()
        if data:
            self._out.append(data)
            self.pending += len(data)
            self._out_ready.set()

    def _queue_raw(self, data: bytes) -> None:
        self.flush()  # keep h2's earlier frames ahead of ours
        self._out.append(data)
        self.pending += len(data)
        self._out_ready.set()

    async def wait_output(self, limit: int) -> None:
        """Wait until at most `limit` bytes are pending (the writer wakes us per write)."""
        while self.pending > limit and not self._dead:
            ev = self._drained
            if ev is None:
                ev = self._drained = anyio.Event()
            await ev.wait()
        if self._dead:
            raise ClientDisconnected("connection lost")

    async def _writer(self) -> None:
        stream = self._stream
        # rawgate's own socket stream times a send only while it waits (server_stream.py):
        # no fail_after per write (~12 us each) for the usual send that never waits.
        own = isinstance(stream, ServerStream)
        if own:
            cast(ServerStream, stream).send_timeout = self.write_s or None
        try:
            while True:
                if not self._out:
                    await self._out_ready.wait()
                    continue
                out = self._out
                self._out = []
                # A single chunk (the usual case) goes out as is: no join, no copy.
                data = out[0] if len(out) == 1 else b"".join(out)
                if own:
                    await stream.send(data)
                else:
                    with anyio.fail_after(self.write_s or math.inf):
                        await stream.send(data)
                self.pending -= len(data)
                drained = self._drained
                if drained is not None:
                    self._drained = None
                    drained.set()
        except (TimeoutError, *CONNECTION_GONE):
            self._dead = True
            self.closing = True
            drained = self._drained
            if drained is not None:
                drained.set()
            if self._tg is not None:
                self._tg.cancel_scope.cancel()

    # ---- input ----------------------------------------------------------------------------

    def _set_idle_deadline(self, since: float = 0.0) -> None:
        """Arm the idle deadline `_idle_s` after now minus `since` seconds."""
        loop = self._loop
        if loop is not None:
            # asyncio: a lazy timer. Moving the read scope's deadline at every busy/idle change
            # reschedules a timer twice per request at c=1 (~3.5 % of an h2 request there);
            # this stores a float and re-arms a timer at most once per idle period.
            if self._active or not self._idle_s:
                return  # the timer, if armed, finds the connection busy and lapses
            self._idle_t = loop.time() - since
            due = self._idle_t + self._idle_s
            timer = self._idle_timer
            # A timer due later is re-armed: keepalive_idle_s may be shorter than the
            # header_read_s the connection started with.
            if timer is None or timer.when() > due:
                if timer is not None:
                    timer.cancel()
                self._idle_timer = loop.call_at(due, self._idle_check)
            return
        if self._active or not self._idle_s:
            self._read_scope.deadline = math.inf
        else:
            self._read_scope.deadline = anyio.current_time() - since + self._idle_s

    def _idle_check(self) -> None:
        self._idle_timer = None
        loop = self._loop
        if self._active or loop is None:
            return  # busy: the next idle moment arms a new timer
        due = self._idle_t + self._idle_s
        if loop.time() >= due:
            self._read_scope.cancel()  # _read_loop ends: idle, GOAWAY(NO_ERROR)
        else:
            self._idle_timer = loop.call_at(due, self._idle_check)

    async def _read_loop(self, initial: bytes, waited: float) -> None:
        scope = self._read_scope
        with scope:
            # The time the listener spent reading the preface counts: header_read_s runs from
            # the connection's first byte, not from here.
            self._set_idle_deadline(waited)
            if initial and not self._feed(initial):
                return
            receive = self._stream.receive
            while True:
                if self.pending > self.max_pending:
                    # Stop reading from a peer that does not read what we already owe it.
                    try:
                        await self.wait_output(self.max_pending)
                    except ClientDisconnected:
                        self._peer_gone = True
                        return
                try:
                    data = await receive(_READ_BYTES)
                except CONNECTION_GONE:
                    self._peer_gone = True
                    return
                if not self._feed(data):
                    return
        if scope.cancelled_caught and not self._drain_done and self.close_code is None:
            # Idle: no open stream for keepalive_idle_s (header_read_s before the first request).
            self.close_code = _NO_ERROR

    def _feed(self, data: bytes) -> bool:
        """Hand bytes to h2 and act on the events. False: the connection must close."""
        h2 = self.h2
        h2.new_batch(anyio.current_time())
        starts: list[_Stream] = []
        try:
            events = h2.receive_data(data)
            streams = self._streams
            for ev in events:
                t = type(ev)
                if t is DataReceived:
                    self._on_data(cast(DataReceived, ev))
                elif t is RequestReceived:
                    st = self._on_request(cast(RequestReceived, ev))
                    if st is not None:
                        starts.append(st)
                elif t is StreamEnded:
                    st = streams.get(cast(StreamEnded, ev).stream_id)
                    if st is not None:
                        st.body_done = True
                        if st.body_event is not None:
                            st.body_event.set()
                elif t is WindowUpdated:
                    sid = cast(WindowUpdated, ev).stream_id
                    if sid:
                        st = streams.get(sid)
                        if st is not None and st.win_event is not None:
                            st.win_event.set()
                    else:
                        self._wake_all_senders()
                elif t is StreamReset:
                    st = streams.get(cast(StreamReset, ev).stream_id)
                    if st is not None:
                        st.reset = True
                        st.scope.cancel()
                elif t is RemoteSettingsChanged:
                    self._wake_all_senders()  # window size or max frame size may have changed
                elif t is ConnectionTerminated:
                    # h2 sends nothing after the peer's GOAWAY, so open streams cannot finish.
                    self.close_code = _NO_ERROR
                    return False
        except ProtocolError as e:
            self.close_code = _connection_error_code(e)
            if self.close_code == _CALM:
                log.warning("h2 peer %s: %s; GOAWAY(ENHANCE_YOUR_CALM)", self._info.client, e)
            return False
        except Exception as e:  # h2 tripping over hostile input is still the peer's fault
            log.warning("h2 peer %s: unexpected %s: %s", self._info.client, type(e).__name__, e)
            self.close_code = int(ErrorCodes.PROTOCOL_ERROR)
            return False
        # Deferred so that a RST_STREAM in this same batch cancels before any work starts.
        tg = self._tg
        assert tg is not None
        idle = self._idle_workers
        for st in starts:
            if st.reset:
                self._forget(st)
                continue
            while idle:
                w = idle.pop()
                if not w.done():  # a worker cancelled while idle left a done future
                    w.set_result(st)
                    break
            else:
                tg.start_soon(self._stream_worker, st)
        self.flush()
        return True

    def _on_request(self, ev: RequestReceived) -> _Stream | None:
        sid = ev.stream_id
        if self._draining or self._active >= self._max_streams:
            # REFUSED_STREAM promises the client we did nothing: it may retry safely.
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return None
        st = _Stream(self, sid, ev.headers, ev.stream_ended is not None)
        self._streams[sid] = st
        self._idle_s = self._keepalive_s
        try:
            st.parsed = head = self._parse_head(st)
        except RawgateError as e:
            st.error = e
        else:
            admit = self._admit
            if not st.body_done and admit is not None and not admit(
                head[0], head[2], head[3], head[4]
            ):
                st.unread = True  # 401 on the head: the app answers with an empty body
        self._active += 1
        if self._active == 1:
            self._set_idle_deadline()
        self._requests += 1
        if self._max_requests and self._requests >= self._max_requests:
            self._begin_drain()  # bounds what one connection can make us do (hypercorn's cap)
        return st

    def _on_data(self, ev: DataReceived) -> None:
        sid = ev.stream_id
        n = ev.flow_controlled_length or 0
        h2 = self.h2
        st = self._streams.get(sid)
        if st is None or st.unread or st.error is not None:
            if n:
                h2.acknowledge_connection_data(n)  # dropped; the stream's window stays shut
            if st is not None and st.body_event is not None:
                st.body_event.set()
            return
        data = ev.data
        size = len(data) if data else 0
        if size:
            state = self._state
            if st.body_size + size > self._lim.max_body_bytes:
                st.error = PayloadTooLarge.body_over(self._lim.max_body_bytes)
            elif state.buffered_body_bytes + size > self._budget:
                st.error = Overloaded.body_budget()
            if st.error is not None:
                self._drop_body(st)
                if n:
                    h2.acknowledge_connection_data(n)
                if st.body_event is not None:
                    st.body_event.set()
                return
            st.body_size += size
            st.held += size
            state.buffered_body_bytes += size
            st.body.append(data)
        if n:
            # Kept for the handler within max_body_bytes and the process budget: only now does
            # the stream's window reopen, so a client cannot send more than we agreed to hold.
            h2.acknowledge_received_data(n, sid)
        if st.body_event is not None:
            st.body_event.set()

    def _drop_body(self, st: _Stream) -> None:
        """Release a stream's buffered body and its share of the process budget."""
        if st.held:
            self._state.buffered_body_bytes -= st.held
            st.held = 0
        st.body = []

    def _wake_all_senders(self) -> None:
        for st in self.win_waiters:
            if st.win_event is not None:
                st.win_event.set()

    # ---- streams --------------------------------------------------------------------------

    def reset_stream(self, st: _Stream, code: ErrorCodes) -> None:
        st.reset = True
        if self.closing:
            return
        try:
            self.h2.reset_stream(st.sid, code)
        except ProtocolError:
            return  # already closed on h2's side
        self.flush()

    def _forget(self, st: _Stream) -> None:
        if self._streams.pop(st.sid, None) is None:
            return
        self._drop_body(st)
        self._active -= 1
        self.win_waiters.discard(st)
        if not self._active:
            if self._draining:
                self._drain_done = True
                self._read_scope.cancel()
            else:
                self._set_idle_deadline()

    async def _stream_worker(self, first: _Stream) -> None:
        """Run `first`, then whatever stream _feed hands over while this task waits idle.

        Spawning a task with anyio costs ~15 us per stream on the bench box, waking an idle
        worker ~1 us. Idle workers are bounded by the concurrent-stream limit; each stream keeps
        its own cancel scope, and the connection's task group still owns every worker. Only on
        asyncio (futures); elsewhere each stream gets its own task as before.
        """
        st: _Stream | None = first
        loop = self._loop
        while st is not None:
            await self._run_stream(st)
            st = None
            if loop is None or self.closing or len(self._idle_workers) >= self._max_streams:
                return
            w: asyncio.Future[_Stream] = loop.create_future()
            self._idle_workers.append(w)
            st = await w

    async def _run_stream(self, st: _Stream) -> None:
        try:
            with st.scope:
                await self._serve_stream(st)
        except Exception:  # _serve_stream already handles app errors; this is the last net
            log.exception("h2 stream %d failed", st.sid)
        finally:
            if not st.reset and not self.closing:
                if not st._ended:
                    self.reset_stream(st, ErrorCodes.INTERNAL_ERROR)
                elif not st.body_done:
                    # RFC 9113 8.1: a complete response to an incomplete request tells the
                    # client to stop sending with RST_STREAM(NO_ERROR).
                    self.reset_stream(st, ErrorCodes.NO_ERROR)
            self._forget(st)

    async def _serve_stream(self, st: _Stream) -> None:
        try:
            if not st.body_done and st.error is None and not st.unread:
                await self._await_body(st)
            if st.error is not None or st.parsed is None:
                self._drop_body(st)
                await error_response(st, st.error or InternalError("request head not parsed"))
                return
            method, target, path, query, headers = st.parsed
            st.parsed = None
            body = st.body[0] if len(st.body) == 1 else b"".join(st.body)
            self._drop_body(st)  # the handler owns the body now
            info = self._info
            request = Request(
                method,
                target,
                path,
                query,
                headers,
                body,
                http_version="2",
                scheme=info.scheme,
                client=info.client,
            )
            state = self._state
            state.in_flight += 1
            try:
                await self._app(request, st)
            finally:
                state.in_flight -= 1
            if not st._started:
                log.error("handler returned without a response: %s", request)
                await error_response(st, InternalError("the handler sent no response"))
        except Exception as e:
            if is_disconnect(e):
                return
            log.exception("h2 handler failed on stream %d", st.sid)
            if not st._started and not st.reset and not self.closing:
                try:
                    await error_response(st, InternalError("internal server error"))
                except ClientDisconnected:
                    pass

    def _parse_head(self, st: _Stream) -> _Head:
        """Pseudo-headers and limits. h2 has already checked the RFC 9113 shape of the block."""
        hdrs = st.headers
        method = target = authority = scheme = None
        i = 0
        n = len(hdrs)
        while i < n:
            k, v = hdrs[i]
            if k[:1] != b":":
                break  # h2 guarantees pseudo-headers come first
            if k == b":method":
                method = v
            elif k == b":path":
                target = v
            elif k == b":authority":
                authority = v
            elif k == b":scheme":
                scheme = v
            i += 1
        if method is None or target is None:
            raise BadRequest("request has no :method or :path (CONNECT is not supported)")
        st.is_head = method == b"HEAD"
        if scheme != b"http" and scheme != b"https":
            raise BadRequest(":scheme must be http or https")
        lim = self._lim
        headers = hdrs[i:]  # a slice, not a rebuild: h2's tuples are reused as they are
        if len(headers) > lim.max_header_count:
            raise HeadersTooLarge(f"more than {lim.max_header_count} request headers")
        has_host = False
        for k, v in headers:
            if k == b"content-length":
                if int(v) > lim.max_body_bytes:  # h2 already checked it is a number
                    raise PayloadTooLarge.body_over(lim.max_body_bytes)
            elif k == b"host":
                has_host = True
        if len(target) > lim.max_url_bytes:
            raise URITooLong(f"request target longer than {lim.max_url_bytes} bytes")
        path, query = parse_target(target)
        name = METHODS.get(method)
        if name is None:
            if not method or not TOKEN_BYTES.issuperset(method):
                raise BadRequest("invalid :method")
            name = method.decode("ascii")
        if authority is not None and not has_host:
            # Handlers read Host; in HTTP/2 it travels as :authority.
            headers.append((b"host", authority))
        return name, target, path, query, headers

    async def _await_body(self, st: _Stream) -> None:
        while not st.body_done and st.error is None:
            ev = st.body_event = anyio.Event()
            with anyio.move_on_after(self._body_s) as scope:
                await ev.wait()
            st.body_event = None
            if scope.cancelled_caught:
                st.error = RequestTimeout(f"no request body bytes for {self._body_s:g} s")
                self._drop_body(st)

    # ---- lifecycle ------------------------------------------------------------------------

    def _begin_drain(self) -> None:
        if self._draining or self.closing:
            return
        self._draining = True
        self._queue_raw(_goaway(_NO_ERROR, self.h2.highest_inbound_stream_id))
        if not self._active:
            self._drain_done = True
            self._read_scope.cancel()

    async def _watch_drain(self) -> None:
        await self._state.draining.wait()
        self._begin_drain()

    async def _goodbye(self) -> None:
        """Last words: cancel what must not continue, send GOAWAY, give it time to leave."""
        code = self.close_code
        self.closing = True
        for st in self._streams.values():
            st.scope.cancel()
        if self._peer_gone or self._dead:
            return
        if code is not None:
            if code != _NO_ERROR:
                # Drop replies a flood made us queue (PING ACKs ...) that the writer has not
                # taken yet; they must not delay the GOAWAY.
                self.h2.clear_outbound_data_buffer()
                self.pending -= sum(map(len, self._out))
                self._out = []
            if not (self._draining and code == _NO_ERROR):
                last = self.h2.highest_inbound_stream_id
                self._queue_raw(_goaway(code, last))
        else:
            self.flush()
        with anyio.move_on_after(self._cfg.timeouts.h2_goaway_flush_s):
            await self.wait_output(0)

    async def run(self, initial: bytes, waited: float = 0.0) -> None:
        self.flush()  # our SETTINGS and the connection WINDOW_UPDATE
        cut = False
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._writer)
                tg.start_soon(self._watch_drain)
                await self._read_loop(initial, waited)
                try:
                    await self._goodbye()
                except ClientDisconnected:
                    pass
                tg.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            cut = True  # cancelled from outside: the shutdown grace ran out
            raise
        finally:
            self.closing = True
            for st in self._streams.values():
                self._drop_body(st)
            if cut:
                await self._last_words()
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            await self._close_stream()

    async def _last_words(self) -> None:
        """After a cancellation from outside (shutdown grace over): the RST_STREAMs the
        cancelled streams queued and a GOAWAY(INTERNAL_ERROR) go out in one write, so a client
        learns its streams were cut rather than seeing the socket close. Skipped when the writer
        was cancelled mid-write (what part of a frame left is unknown) or the peer is gone."""
        if self._dead or self._peer_gone:
            return
        queued = sum(map(len, self._out))
        if self.pending != queued:
            return
        data = b"".join(
            (
                *self._out,
                self.h2.data_to_send(),
                _goaway(int(ErrorCodes.INTERNAL_ERROR), self.h2.highest_inbound_stream_id),
            )
        )
        self._out = []
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self._cfg.timeouts.h2_goaway_flush_s):
                try:
                    await self._stream.send(data)
                except CONNECTION_GONE:
                    pass

    async def _close_stream(self) -> None:
        await close_stream(self._stream, self._cfg.timeouts.h2_goaway_flush_s)


async def serve_h2(
    stream: ByteStream,
    app: App,
    cfg: Config,
    info: ConnInfo,
    state: ServerState,
    initial: bytes = b"",
    waited: float = 0.0,
) -> None:
    """Serve one HTTP/2 connection until it closes. Never raises (cancellation aside).

    `initial` holds bytes the listener already read (the sniffed h2c preface); under TLS+ALPN it
    is empty. `waited` is how long the listener took to read them (it counts against
    timeouts.header_read_s). The stream is closed on return.
    """
    state.open_connections["h2"] += 1
    try:
        conn = _Conn(stream, app, cfg, info, state)
        await conn.run(initial, waited)
    except Exception:
        log.exception("h2 connection from %s failed", info.client)
    finally:
        state.open_connections["h2"] -= 1
