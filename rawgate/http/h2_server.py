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
- Flood caps are counted per frame as h2 parses them (`_GuardedH2`), so a flood stops at the
  frame that crossed the cap. Caps, CONTINUATION floods, HPACK bombs and a peer far over
  MAX_CONCURRENT_STREAMS end in GOAWAY(ENHANCE_YOUR_CALM); other protocol errors in GOAWAY with
  h2's error code (PROTOCOL_ERROR family). Nothing escapes serve_h2.
- GOAWAY frames are written by this driver, never by h2's close_connection(): once h2 has sent
  GOAWAY it refuses to send on open streams, which would make a graceful drain impossible.
- Request headers are fully validated by h2. Response headers are not (h2's outbound validation
  and normalisation cost ~10% of a small response): handlers must pass lower-case names and no
  hop-by-hop headers, as events.py already requires.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from email.utils import formatdate
from typing import TYPE_CHECKING, cast

import anyio
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
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
from h2.settings import SettingCodes, Settings
from hpack.table import HeaderTable
from hyperframe.frame import Frame, GoAwayFrame

from rawgate.aio import on_asyncio
from rawgate.errors import (
    BadRequest,
    HeadersTooLarge,
    InternalError,
    PayloadTooLarge,
    RawgateError,
    RequestTimeout,
    URITooLong,
)
from rawgate.seam import ClientDisconnected, Request, is_disconnect
from rawgate.http.h1_server import _Wakeup
from rawgate.compat import dispatch_frame
from rawgate.respond import error_response
from rawgate.http.server_stream import CONNECTION_GONE, ServerStream
from rawgate.http.target import parse_target

if TYPE_CHECKING:
    from anyio.abc import ByteStream, TaskGroup

    from rawgate.config import Config, LimitsConfig
    from rawgate.conn import ConnInfo, ServerState
    from rawgate.seam import App

__all__ = ["serve_h2"]

log = logging.getLogger("rawgate.h2")

Header = tuple[bytes, bytes]

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
# Interned method strings: no decode per request for the methods clients actually send.
_METHODS = {m.encode(): m for m in ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH")}
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

_date_second = -1
_date_header: Header = (b"date", b"")


def _date() -> Header:
    """The Date header, formatted at most once per second (formatdate is slow per request)."""
    global _date_second, _date_header
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_header = (b"date", formatdate(now, usegmt=True).encode("ascii"))
    return _date_header


def _hpack_int(value: int, bits: int, flags: int) -> bytes:
    """An HPACK integer with a `bits`-bit prefix, OR-ed with the representation's flag bits."""
    top = (1 << bits) - 1
    if value < top:
        return bytes((flags | value,))
    out = bytearray((flags | top,))
    value -= top
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_str(b: bytes) -> bytes:
    return _hpack_int(len(b), 7, 0) + b  # raw octets: no Huffman to code or to decode


_STATIC_FIELD: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_FIELD.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)
del _i, _n, _v


class _Encoder:
    """HPACK for responses, written for what rawgate sends.

    h2's encoder searches its tables, Huffman-codes and inserts every field, and each unique
    x-request-id churns its dynamic table: ~10 % of an h2 response's CPU on the bench box (a
    quarter of h2_server's own share). Here:
    - fields whose names are in INDEXED (date, server, content-type, x-mapped-model, ...) enter
      the dynamic table once and are one byte (an index) in every later response, as with h2;
    - every other field (x-request-id, content-length, error details) is a literal without
      indexing: it never touches the table; its bytes are cached unless its name is PER_RESPONSE;
    - strings are raw octets: no Huffman coding here, none to undo in the client's decoder.
    The table follows RFC 7541 (entry size 32 + name + value, oldest evicted first, max size
    min(peer's SETTINGS_HEADER_TABLE_SIZE, 4096), size updates at the start of the next block).
    """

    INDEXED = frozenset(
        {
            b"date", b"server", b"content-type", b"cache-control", b"x-accel-buffering",
            b"x-mapped-model", b"x-account-email", b"vary", b"www-authenticate",
            b"access-control-allow-origin", b"access-control-expose-headers",
            b"access-control-allow-methods", b"access-control-allow-headers",
            b"access-control-max-age",
        }
    )  # fmt: skip
    PER_RESPONSE = frozenset(
        {b"x-request-id", b"content-length", b"retry-after", b"retry-after-ms"}
    )
    MAX_TABLE = 4096  # HPACK's default; a peer may ask for less, never makes us use more
    MAX_CACHED = 1024  # cached literal fields; then the cache starts over

    def __init__(self) -> None:
        self._max = self.MAX_TABLE
        self._size = 0
        self._entries: deque[tuple[tuple[bytes, bytes], int, int]] = deque()  # oldest first
        self._seq: dict[tuple[bytes, bytes], int] = {}  # field -> insertion number
        self._inserted = 0
        self._literal: dict[tuple[bytes, bytes], bytes] = {}
        self._updates: list[int] = []  # table size updates owed to the peer

    @property
    def header_table_size(self) -> int:
        return self._max

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # Called by h2 when the peer's SETTINGS_HEADER_TABLE_SIZE changes.
        new = min(value, self.MAX_TABLE)
        if new == self._max and not self._updates:
            return
        self._max = new
        self._evict()
        # RFC 7541 4.2: the smallest size since the last block, then the final one.
        self._updates = [min([*self._updates, new]), new]

    def _evict(self) -> None:
        while self._size > self._max:
            field, size, seq = self._entries.popleft()
            self._size -= size
            if self._seq.get(field) == seq:
                del self._seq[field]

    def encode(self, headers: list[Header], huffman: bool = True) -> bytes:
        out: list[bytes] = []
        if self._updates:
            low, final = self._updates
            out.append(_hpack_int(low, 5, 0x20))
            if final != low:
                out.append(_hpack_int(final, 5, 0x20))
            self._updates = []
        literal = self._literal
        for field in headers:
            b = literal.get(field)
            if b is not None:
                out.append(b)
                continue
            i = _STATIC_FIELD.get(field)
            if i is not None:
                out.append(_hpack_int(i, 7, 0x80))
                continue
            name, value = field
            if name in self.INDEXED:
                seq = self._seq.get(field)
                if seq is not None:
                    out.append(_hpack_int(62 + self._inserted - 1 - seq, 7, 0x80))
                    continue
                size = 32 + len(name) + len(value)
                if size <= self._max:
                    out.append(self._name(name, 6, 0x40) + _hpack_str(value))
                    self._insert(field, size)
                    continue
            b = self._name(name, 4, 0x00) + _hpack_str(value)
            if name not in self.PER_RESPONSE:
                if len(literal) >= self.MAX_CACHED:
                    literal.clear()
                literal[field] = b
            out.append(b)
        return b"".join(out)

    def _name(self, name: bytes, bits: int, flags: int) -> bytes:
        i = _STATIC_NAME.get(name)
        if i is not None:
            return _hpack_int(i, bits, flags)
        return bytes((flags,)) + _hpack_str(name)

    def _insert(self, field: tuple[bytes, bytes], size: int) -> None:
        self._entries.append((field, size, self._inserted))
        self._size += size
        self._seq[field] = self._inserted
        self._inserted += 1
        self._evict()


class _GuardedH2(H2Connection):
    """h2 plus per-frame flood accounting, which h2 leaves entirely to the application.

    Counting happens in `_receive_frame` (h2's per-frame hook, private but stable since h2 2.0)
    because many flood frames produce no event at all: RST_STREAM or WINDOW_UPDATE on a closed
    stream are silently absorbed. Raising DenialOfServiceError there makes h2 stop parsing the
    batch at once, so a flood of ten thousand PINGs queues at most `cap` PING ACKs.
    """

    def __init__(self, config: H2Configuration, limits: LimitsConfig) -> None:
        super().__init__(config)
        self._lim = limits
        self._window_start = -math.inf
        self.pings = self.settings_frames = self.resets = self.noop = self.empty_run = 0
        # WINDOW_UPDATEs the peer has earned: two per DATA frame we sent (stream + connection).
        self.wu_credit = 0
        self.stream_cap = 2**31  # the hard MAX_CONCURRENT_STREAMS, set by _new_h2

    def new_batch(self, now: float) -> None:
        """Roll the one-second rate window; called once per receive, not per frame."""
        if now - self._window_start >= 1.0:
            self._window_start = now
            self.pings = self.settings_frames = self.resets = self.noop = 0

    def _receive_frame(self, frame: Frame) -> list[Event]:
        t = cast(int, frame.type)
        lim = self._lim
        if t == 0x0:  # DATA
            if frame.data:  # type: ignore[attr-defined]
                self.empty_run = 0
            elif "END_STREAM" not in frame.flags:
                self.empty_run += 1
                if self.empty_run > lim.h2_max_empty_frames:
                    raise DenialOfServiceError("empty DATA frame flood")
        elif t == 0x1:  # HEADERS: real work, so not an empty-frame run
            self.empty_run = 0
        elif t == 0x6:  # PING
            if "ACK" not in frame.flags:
                self.pings += 1
                if self.pings > lim.h2_max_pings_per_s:
                    raise DenialOfServiceError("PING flood")
        elif t == 0x4:  # SETTINGS
            if "ACK" not in frame.flags:
                self.settings_frames += 1
                if self.settings_frames > lim.h2_max_settings_per_s:
                    raise DenialOfServiceError("SETTINGS flood")
        elif t == 0x3:  # RST_STREAM
            self.resets += 1
            if self.resets > lim.h2_max_resets_per_s:
                raise DenialOfServiceError("RST_STREAM flood")
        elif t == 0x8:  # WINDOW_UPDATE
            if self.wu_credit > 0:
                self.wu_credit -= 1
            else:
                self._count_noop()
        elif t == 0x2 or t > 0x9:  # PRIORITY, ALTSVC from a client, unknown extension types
            self._count_noop()
        return dispatch_frame(self, frame)

    @property
    def open_inbound_streams(self) -> int:
        # h2 asks this on every new HEADERS and answers by walking (and sweeping) every stream:
        # O(streams) per request. Below the cap the dict size is an upper bound that is good
        # enough; the exact count (and the sweep of closed streams) runs only near the cap, which
        # also bounds how many closed streams h2 keeps around. The cap is the hard one _new_h2
        # sets (reading local_settings costs ~3 us of enum lookups per request).
        n = len(self.streams)
        if n < self.stream_cap:
            return n
        return super().open_inbound_streams

    def _count_noop(self) -> None:
        self.noop += 1
        if self.noop > self._lim.h2_max_noop_frames_per_s:
            raise DenialOfServiceError("flood of frames that carry no work")


def _new_h2(limits: LimitsConfig) -> _GuardedH2:
    config = H2Configuration(
        client_side=False,
        header_encoding=None,
        # Response headers are ours and lower-case by contract (module docstring): skip h2's
        # per-header outbound checks, a tenth of the cost of a small response.
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    h2 = _GuardedH2(config, limits)
    h2.encoder = _Encoder()  # type: ignore[assignment]
    advertised = max(1, limits.h2_max_concurrent_streams)
    settings: dict[SettingCodes | int, int] = {
        SettingCodes.MAX_CONCURRENT_STREAMS: advertised,
        SettingCodes.INITIAL_WINDOW_SIZE: limits.h2_initial_window_bytes,
        SettingCodes.MAX_HEADER_LIST_SIZE: limits.h2_max_header_list_bytes,
    }
    h2.local_settings = Settings(client=False, initial_values=settings)  # type: ignore[arg-type]
    h2.initiate_connection()
    # The SETTINGS frame above advertises the real limit. h2 itself enforces its local value as a
    # CONNECTION error, so raise that to a hard cap: a client that races past the advertised
    # limit (it may open streams before our SETTINGS arrive) gets REFUSED_STREAM from us; only a
    # peer far past it loses the connection.
    h2.stream_cap = max(2 * advertised, advertised + 16)
    settings[SettingCodes.MAX_CONCURRENT_STREAMS] = h2.stream_cap
    h2.local_settings = Settings(client=False, initial_values=settings)  # type: ignore[arg-type]
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
        "is_head",
        "reset",
        "scope",
        "sid",
        "win_event",
    )

    def __init__(self, c: _Conn, sid: int, headers: list[Header], ended: bool) -> None:
        self._c = c
        self.sid = sid
        self.headers = headers
        self.scope = anyio.CancelScope()
        self.body: list[bytes] = []
        self.body_size = 0
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
        self._begin(status)
        c = self._c
        try:
            c.h2.send_headers(self.sid, self._head(status, headers, None), end_stream=self.is_head)
        except ProtocolError:
            raise ClientDisconnected("stream closed") from None
        self._ended = self.is_head
        c.flush()

    async def respond(self, status: int, headers: list[Header], body: bytes) -> None:
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
        "_app",
        "_body_s",
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
        self._idle_s = cfg.timeouts.keepalive_idle_s
        self._body_s = cfg.timeouts.body_read_s
        self.write_s = cfg.timeouts.write_s
        self.max_pending = lim.max_pending_output_bytes
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

    def _set_idle_deadline(self) -> None:
        loop = self._loop
        if loop is not None:
            # asyncio: a lazy timer. Moving the read scope's deadline at every busy/idle change
            # reschedules a timer twice per request at c=1 (~3.5 % of an h2 request there);
            # this stores a float and re-arms a timer at most once per idle period.
            if self._active or not self._idle_s:
                return  # the timer, if armed, finds the connection busy and lapses
            self._idle_t = loop.time()
            if self._idle_timer is None:
                self._idle_timer = loop.call_at(self._idle_t + self._idle_s, self._idle_check)
            return
        if self._active or not self._idle_s:
            self._read_scope.deadline = math.inf
        else:
            self._read_scope.deadline = anyio.current_time() + self._idle_s

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

    async def _read_loop(self, initial: bytes) -> None:
        scope = self._read_scope
        with scope:
            self._set_idle_deadline()
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
            self.close_code = _NO_ERROR  # idle: no open stream for keepalive_idle_s

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
        if n:
            # The bytes are consumed now: kept in a buffer bounded by max_body_bytes, or dropped.
            self.h2.acknowledge_received_data(n, sid)
        st = self._streams.get(sid)
        if st is None:
            return
        data = ev.data
        if data and st.error is None:
            st.body_size += len(data)
            if st.body_size > self._lim.max_body_bytes:
                st.error = PayloadTooLarge.body_over(self._lim.max_body_bytes)
                st.body.clear()
            else:
                st.body.append(data)
        if st.body_event is not None:
            st.body_event.set()

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
            try:
                parsed = self._parse_head(st)
            except RawgateError as e:
                st.error = e
                st.body.clear()
            if not st.body_done and st.error is None:
                await self._await_body(st)
            if st.error is not None:
                await error_response(st, st.error)
                return
            method, target, path, query, headers = parsed
            body = st.body[0] if len(st.body) == 1 else b"".join(st.body)
            st.body = []
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

    def _parse_head(self, st: _Stream) -> tuple[str, bytes, str, str, list[Header]]:
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
        name = _METHODS.get(method)
        if name is None:
            if not method or not _TOKEN.issuperset(method):
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
                st.body.clear()

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

    async def run(self, initial: bytes) -> None:
        self.flush()  # our SETTINGS and the connection WINDOW_UPDATE
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._writer)
                tg.start_soon(self._watch_drain)
                await self._read_loop(initial)
                try:
                    await self._goodbye()
                except ClientDisconnected:
                    pass
                tg.cancel_scope.cancel()
        finally:
            self.closing = True
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            await self._close_stream()

    async def _close_stream(self) -> None:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self._cfg.timeouts.h2_goaway_flush_s):
                try:
                    await self._stream.aclose()
                except CONNECTION_GONE:
                    pass
                return
            await anyio.aclose_forcefully(self._stream)



async def serve_h2(
    stream: ByteStream,
    app: App,
    cfg: Config,
    info: ConnInfo,
    state: ServerState,
    initial: bytes = b"",
) -> None:
    """Serve one HTTP/2 connection until it closes. Never raises (cancellation aside).

    `initial` holds bytes the listener already read (the sniffed h2c preface); under TLS+ALPN it
    is empty. The stream is closed on return.
    """
    state.open_connections["h2"] += 1
    try:
        conn = _Conn(stream, app, cfg, info, state)
        await conn.run(initial)
    except Exception:
        log.exception("h2 connection from %s failed", info.client)
    finally:
        state.open_connections["h2"] -= 1
