"""The upstream HTTP/2 connection: one h2 state machine, one reader, one writer, many streams.

Invariants:
- One reader task feeds h2 and dispatches events into per-stream buffers; one writer task is
  the only code that writes to the socket. Request tasks only call h2 (sync) and wake the
  writer, so a caller cancelled at any point can never leave half a frame on the wire, and
  abandoning a stream (RST_STREAM CANCEL) needs no await.
- Flow control: a stream's buffer never exceeds its receive window (upstream.h2_stream_window_
  bytes), and stream WINDOW_UPDATEs are sent only as the caller consumes, so a slow caller makes
  the upstream wait instead of rawgate buffer. Connection-level credit is returned on receipt:
  the per-stream windows already bound memory, and one slow caller must not stall the others.
- GOAWAY drains: h2 itself would turn the whole connection CLOSED and reject the frames of the
  streams the server promised to finish, so compat.H2ClientConnection reports GOAWAY without
  that transition.
  Streams above last_stream_id were never processed (RFC 9113 6.8) and fail with
  StaleConnection, which the client retries once on a fresh connection. So does REFUSED_STREAM.
- Every stream releases its pool slot exactly once; a released stream is reset if still open.
- A PING goes out when nothing arrived for upstream.ping_interval_s; no answer within
  upstream.ping_timeout_s closes the connection (dead peer). Idle connections need no timeout
  beyond that.
- Nothing escapes the connection's tasks: failures end the connection and become errors of its
  streams (UpstreamClosed / UpstreamProtocolError / UpstreamWriteTimeout).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import (
    NoAvailableStreamIDError,
    ProtocolError,
    TooManyStreamsError,
)
from h2.settings import SettingCodes, Settings
from hpack import Encoder, NeverIndexedHeaderTuple

from rawgate import compat
from rawgate.compat import (
    H2ClientConnection,
    h2_error_code,
    h2_has_output,
    hpack_table_size_update,
)
from rawgate.errors import (
    RawgateError,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamHeadersTimeout,
    UpstreamProtocolError,
    UpstreamReadTimeout,
    UpstreamTimeout,
    UpstreamWriteTimeout,
)
from rawgate.seam import Header
from rawgate.upstream.backends import wakeup_factory
from rawgate.upstream.h2_data import Data, FastH2
from rawgate.upstream.pool import ConnState, StaleConnection

if TYPE_CHECKING:
    from rawgate.config import TimeoutsConfig, UpstreamConfig
    from rawgate.upstream.backends import NetworkStream, Wakeup
    from rawgate.upstream.pool import OriginPool

__all__ = ["H2Connection", "H2Stream", "NotHTTP2"]

log = logging.getLogger("rawgate.upstream.client.h2")


READ_BYTES = 64 * 1024  # one receive: four max-size DATA frames
_DEFAULT_WINDOW = 65535
# Connection-level headers HTTP/2 forbids (RFC 9113 8.2.2); host becomes :authority.
_FORBIDDEN = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host")
)
_PING = b"rawgate\x00"


# Request fields already checked. h2's own outbound validation is off (it costs ~10% of a
# request), so each distinct field is checked once here instead: lower-case token name, no
# CR/LF/NUL in the value (HPACK would carry them and a downstream h1 hop would split on them).
_VALID: set[Header] = set()
_MAX_VALID = 4096
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def _never() -> bool:
    return False


def _valid_field(field: Header) -> bool:
    name, value = field
    if not name or not _TOKEN.issuperset(name):
        return False
    if b"\r" in value or b"\n" in value or b"\x00" in value:
        return False
    if len(_VALID) >= _MAX_VALID:
        _VALID.clear()
    _VALID.add(field)
    return True


class NotHTTP2(Exception):
    """A cleartext origin answered the h2c preface with something that is not HTTP/2."""


class _Encoder:
    """HPACK without a dynamic table: each field is static-indexed or a literal never indexed,
    so its bytes never depend on what was sent before and are cached per (name, value).
    Request headers repeat almost entirely (method, scheme, authority, content-type, the
    account's key, a handful of paths): hpack's encoder takes ~16 us for a typical 7-field
    request, the cached join ~1 us. content-length changes with every body, so it is written
    directly instead of filling the cache. Keys stay out of the compression context, as RFC
    7541 7.1 advises for secrets; upstream requests get ~130 bytes bigger."""

    MAX_CACHED = 4096  # distinct fields; then the cache starts over (accounts x models)

    def __init__(self) -> None:
        self._hp = Encoder()
        self._cache: dict[tuple[bytes, bytes], bytes] = {}
        self._update = b""

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # The peer changed SETTINGS_HEADER_TABLE_SIZE: RFC 7541 4.2 wants a size update at the
        # start of the next block. We use no table, so we announce 0.
        self._update = hpack_table_size_update(0)

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        cache = self._cache
        out = [self._update] if self._update else []
        self._update = b""
        for field in headers:
            b = cache.get(field)
            if b is None and field[0] == b"content-length" and len(field[1]) < 127:
                # literal never indexed, static name 28 (0x1f 0x0d), raw digits
                out.append(b"\x1f\x0d" + bytes((len(field[1]),)) + field[1])
                continue
            if b is None:
                if len(cache) >= self.MAX_CACHED:
                    cache.clear()
                b = cache[field] = self._hp.encode([NeverIndexedHeaderTuple(*field)], huffman)
            out.append(b)
        return b"".join(out)


def new_h2(cfg: UpstreamConfig, stream_cap: int, fast: bool | None = None) -> H2ClientConnection:
    """The h2 state machine of one upstream connection, configured as rawgate runs it (also
    what bench/h2_budget.py measures). fast: h2_data's DATA fast path and compat's dispatch
    (default: compat.fast_paths()); else h2's public API and the draining GOAWAY alone."""
    if fast is None:
        fast = compat.fast_paths()
    h = (FastH2 if fast else H2ClientConnection)(
        H2Configuration(
            client_side=True,
            header_encoding=None,
            # Our request headers are lower-case bytes by contract and filtered by start():
            # h2's per-header outbound checks would cost ~10% of a small request.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            # (bench.h2_budget: receive) Response headers are never forwarded to the client;
            # H2Stream._head checks the one rawgate relies on (:status). h2's generator chain per
            # header was ~26 of the ~100 us a response head + end of stream cost.
            validate_inbound_headers=False,
        )
    )
    h.local_settings = Settings(
        client=True,
        initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: cfg.h2_stream_window_bytes,
            SettingCodes.MAX_HEADER_LIST_SIZE: cfg.max_response_header_bytes,
        },
    )
    h.decoder.max_header_list_size = cfg.max_response_header_bytes
    if isinstance(h, FastH2):
        h.sweep_at = stream_cap
    h.encoder = _Encoder()  # type: ignore[assignment]  # duck-typed: encode() + size
    return h


class H2Connection:
    http2 = True

    def __init__(
        self,
        conn_id: int,
        stream: NetworkStream,
        pool: OriginPool,
        cfg: UpstreamConfig,
        timeouts: TimeoutsConfig,
        *,
        scheme: bytes,
        authority: bytes,
    ) -> None:
        self.id = conn_id
        self._stream = stream
        self.pool = pool
        self._cfg = cfg
        self._t = timeouts
        self.scheme = scheme
        self.authority = authority
        self.state = ConnState.IDLE
        self.in_use = 0
        self.idle_since = time.monotonic()
        self.requests = 0
        self._cap = max(1, cfg.h2_max_streams_per_connection)
        self.capacity = self._cap
        self.streams: dict[int, H2Stream] = {}
        # compat.fast_paths() is read here, once per connection.
        self._fast = compat.fast_paths()
        self._h2 = new_h2(cfg, self._cap, self._fast)
        self._wakeup = wakeup_factory()
        # Credit is returned once a quarter of a window is used: a 256 KiB stream window gets
        # one WINDOW_UPDATE per 64 KiB consumed, not one per DATA frame.
        self._stream_credit_at = max(1, cfg.h2_stream_window_bytes // 4)
        self._conn_credit_at = max(_DEFAULT_WINDOW // 4, cfg.h2_connection_window_bytes // 4)
        self._conn_unacked = 0
        self._writer_wake: Wakeup | None = None
        self._window_waiters: list[Wakeup] = []
        self._ping_ack: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self._last_recv = time.monotonic()
        self._settings_seen = False
        self._pool_dirty = False
        self.error: RawgateError | None = None

    # ---- set-up -----------------------------------------------------------------------------

    async def handshake(self, timeout: float | None, *, probe: bool) -> None:
        """Send our preface and wait for the server's SETTINGS (its real stream limit).
        probe: a cleartext origin that may not speak h2; anything but a SETTINGS frame back
        raises NotHTTP2 (nothing was processed: an HTTP/1.1 server cannot parse a request
        from the preface)."""
        h = self._h2
        h.initiate_connection()
        extra = self._cfg.h2_connection_window_bytes - _DEFAULT_WINDOW
        if extra > 0:
            h.increment_flow_control_window(extra)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            await self._stream.write(h.data_to_send(), timeout)
            buf = b""
            probing = probe
            while not self._settings_seen:
                left = None if deadline is None else deadline - time.monotonic()
                data = await self._stream.read(READ_BYTES, left, UpstreamConnectTimeout)
                if probing:
                    # An h2 server's first frame is SETTINGS (type 0x4, the 4th byte); an
                    # HTTP/1.1 server answers "HTTP/1.1 400 ..." or just closes.
                    buf += data
                    if not data or (len(buf) >= 4 and buf[3] != 0x04):
                        raise NotHTTP2()
                    if len(buf) < 4:
                        continue
                    probing = False
                    data, buf = buf, b""
                if not data:
                    raise UpstreamConnectError("upstream closed the connection during the preface")
                self._dispatch(h.receive_data(data))
        except UpstreamClosed:
            if probe:
                raise NotHTTP2() from None
            raise UpstreamConnectError("upstream closed the connection during the h2 preface")
        except ProtocolError as e:
            if probe:
                raise NotHTTP2() from None
            raise UpstreamConnectError(f"upstream broke the HTTP/2 preface: {e}") from None
        self._last_recv = time.monotonic()
        self._pool_dirty = False

    async def run(self) -> None:
        """The connection's tasks; returns when the connection is closed. Never raises."""
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                if self.state is ConnState.CLOSED:
                    tg.cancel_scope.cancel()
                tg.start_soon(self._write_loop)
                if self._cfg.ping_interval_s > 0:
                    tg.start_soon(self._ping_loop)
                await self._read_loop()
                tg.cancel_scope.cancel()
        except Exception:  # a bug here must not take the client's task group down
            log.exception("upstream h2 connection #%d failed", self.id)
            self._fail(UpstreamProtocolError("internal error on the upstream connection"))
        finally:
            self._fail(UpstreamClosed("upstream connection closed"))
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()
                await self.pool.changed()

    def is_stale(self) -> bool:
        return self.state is ConnState.CLOSED  # the reader notices a dead peer by itself

    async def aclose(self) -> None:
        self._fail(UpstreamClosed("upstream connection closed by rawgate"))
        await self._stream.aclose()

    def __repr__(self) -> str:
        return (
            f"<H2Connection #{self.id} {self.state.name} streams={len(self.streams)}/"
            f"{self.capacity} requests={self.requests}>"
        )

    # ---- the loops --------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        h = self._h2
        stream = self._stream
        fast = self._fast
        while self.state is not ConnState.CLOSED:
            try:
                data = await stream.read(READ_BYTES, None)
            except RawgateError as e:
                self._fail(e)
                return
            if not data:
                self._fail(UpstreamClosed("upstream closed the connection"))
                return
            self._last_recv = time.monotonic()
            try:
                events = h.receive_data(data)
            except ProtocolError as e:
                self._fail(UpstreamProtocolError(f"upstream broke HTTP/2: {e}"))
                return
            self._dispatch(events)
            # ACKs, credit: only wake the writer when there is output (without the fast paths
            # the writer looks for itself)
            if not fast or h2_has_output(h):
                self._wake_writer()
            if self._pool_dirty:
                self._pool_dirty = False
                await self.pool.changed()
            if self.state is ConnState.DRAINING and not self.streams:
                self._fail(UpstreamClosed("upstream connection drained (GOAWAY)"))
                return

    async def _write_loop(self) -> None:
        h = self._h2
        stream = self._stream
        write_s = self._t.upstream_write_s
        while True:
            data = h.data_to_send()
            if data:
                try:
                    await stream.write(data, write_s)
                except RawgateError as e:
                    self._fail(e)
                    return
                continue
            if self.state is ConnState.CLOSED:
                return
            ev = self._writer_wake = self._wakeup()
            await ev.wait(None)

    async def _ping_loop(self) -> None:
        interval = self._cfg.ping_interval_s
        while True:
            await anyio.sleep(max(0.0, self._last_recv + interval - time.monotonic()))
            if time.monotonic() - self._last_recv < interval:
                continue
            if self.state is ConnState.CLOSED:
                return
            ack = self._ping_ack = anyio.Event()
            try:
                self._h2.ping(_PING)
            except ProtocolError:
                return
            self._wake_writer()
            with anyio.move_on_after(self._cfg.ping_timeout_s):
                await ack.wait()
            if not ack.is_set():
                self._fail(
                    UpstreamClosed(
                        f"upstream did not answer PING within {self._cfg.ping_timeout_s:g} s"
                    )
                )
                if self._scope is not None:
                    self._scope.cancel()
                return
            self._last_recv = time.monotonic()

    def _wake_writer(self) -> None:
        w = self._writer_wake
        if w is not None:
            self._writer_wake = None
            w.set()

    def _flush(self) -> None:
        """A request task's output: written right here when the writer task is idle (it is
        waiting, so nothing is half written and frame order is kept) and the transport takes
        it without blocking; else the writer is woken as usual. A synchronous write cannot be
        cut by cancellation, so the module's invariant still holds. Saves one event-loop hop
        per request (measured on non-stream chat at c=1 over h2c: see bench/README.md)."""
        # Only the asyncio backend (backends.AsyncioStream) can write without awaiting.
        stream: Any = self._stream
        if (
            self._writer_wake is not None
            and self.state is not ConnState.CLOSED
            and getattr(stream, "can_write_now", _never)()
        ):
            data = self._h2.data_to_send()
            if data:
                stream.write_now(data)
            return
        self._wake_writer()

    def _wake_senders(self) -> None:
        if self._window_waiters:
            ws, self._window_waiters = self._window_waiters, []
            for w in ws:
                w.set()

    def _fail(self, err: RawgateError) -> None:
        """End the connection (sync): every stream gets `err`, the tasks stop."""
        if self.state is ConnState.CLOSED:
            return
        self.state = ConnState.CLOSED
        self.error = err
        for s in self.streams.values():
            if s.error is None:
                s.error = type(err)(err.message)
            s._wake()
        self._wake_senders()
        self._wake_writer()
        if self._scope is not None:
            self._scope.cancel()

    # ---- events -----------------------------------------------------------------------------

    def _dispatch(self, events: list[Any]) -> None:
        streams = self.streams
        for ev in events:
            if type(ev) is Data or isinstance(ev, DataReceived):
                n = ev.flow_controlled_length
                self._conn_unacked += n
                s = streams.get(ev.stream_id)
                if s is not None:
                    data = ev.data
                    if data:
                        s.chunks.append(data)
                        s.buffered += len(data)
                    if n > len(data):  # padding: never reaches the caller, credit it now
                        s._unacked += n - len(data)
                    s._wake()
            elif isinstance(ev, ResponseReceived):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s._head(ev.headers)
            elif isinstance(ev, StreamEnded):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s.ended = True
                    s._wake()
            elif isinstance(ev, StreamReset):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s._reset(ev.error_code)
            elif isinstance(ev, WindowUpdated):
                self._wake_senders()
            elif isinstance(ev, RemoteSettingsChanged):
                self._settings_seen = True
                peer = self._h2.remote_settings.max_concurrent_streams
                self.capacity = max(1, min(self._cap, peer))
                self._pool_dirty = True
                self._wake_senders()  # INITIAL_WINDOW_SIZE may have grown
            elif isinstance(ev, ConnectionTerminated):
                self._goaway(ev)
            elif isinstance(ev, PingAckReceived):
                if self._ping_ack is not None:
                    self._ping_ack.set()
            # TrailersReceived (the end comes as StreamEnded), 1xx, SettingsAcknowledged,
            # PRIORITY and unknown frames need nothing.
        if self._conn_unacked >= self._conn_credit_at:
            self._h2.increment_flow_control_window(self._conn_unacked)
            self._conn_unacked = 0

    def _goaway(self, ev: ConnectionTerminated) -> None:
        if self.state is not ConnState.CLOSED:
            self.state = ConnState.DRAINING
        last = ev.last_stream_id if ev.last_stream_id is not None else 0
        for sid, s in self.streams.items():
            if sid > last and s.status == 0 and s.error is None:
                s.stale = True
                s._wake()
        self._pool_dirty = True

    # ---- requests ---------------------------------------------------------------------------

    async def start(
        self, method: bytes, target: bytes, headers: list[Header], body: bytes
    ) -> H2Stream:
        """Open a stream, send the request, return once the response head arrived. The caller
        holds one pool slot on this connection; from here on the stream owns it."""
        h = self._h2
        hdrs = [
            (b":method", method),
            (b":scheme", self.scheme),
            (b":authority", self.authority),
            (b":path", target),
        ]
        for field in headers:
            if field[0] not in _FORBIDDEN:
                if field not in _VALID and not _valid_field(field):
                    await self._release_unopened()
                    # never quote the value: it may be an API key
                    raise UpstreamProtocolError("invalid request header name or value for h2")
                hdrs.append(field)
        if body:
            hdrs.append((b"content-length", b"%d" % len(body)))
        if self.state is not ConnState.ACTIVE and self.state is not ConnState.IDLE:
            await self._release_unopened()
            raise StaleConnection()
        try:
            sid = h.get_next_available_stream_id()
            h.send_headers(sid, hdrs, end_stream=not body)
        except NoAvailableStreamIDError:
            self.state = ConnState.DRAINING  # ids used up: a fresh connection takes over
            await self._release_unopened()
            raise StaleConnection() from None
        except TooManyStreamsError:  # the peer lowered MAX_CONCURRENT_STREAMS meanwhile
            await self._release_unopened()
            raise StaleConnection() from None
        s = H2Stream(self, sid)
        self.streams[sid] = s
        self.requests += 1
        if not body:
            self._flush()
        try:
            if body:
                await self._send_body(s, body)
            await s._wait_head(self._t.upstream_headers_s)
        except BaseException:
            await s._release()
            raise
        return s

    async def _release_unopened(self) -> None:
        await self.pool.release(self)  # bookkeeping first; any close inside is shielded

    async def _send_body(self, s: H2Stream, body: bytes) -> None:
        h = self._h2
        sid = s.sid
        view = memoryview(body)
        off, total = 0, len(body)
        while off < total:
            if s.error is not None or s.stale or s.ended:
                return  # the answer (or the failure) is already there: _wait_head reports it
            window = h.local_flow_control_window(sid)
            if window <= 0:
                ev = self._wakeup()
                self._window_waiters.append(ev)
                if not await ev.wait(self._t.upstream_write_s):
                    raise UpstreamWriteTimeout(
                        f"upstream gave no flow-control credit for "
                        f"{self._t.upstream_write_s:g} s"
                    )
                continue
            n = min(window, h.max_outbound_frame_size, total - off)
            try:
                h.send_data(sid, view[off : off + n], end_stream=off + n == total)
            except ProtocolError:  # reset or ended by the peer meanwhile: _wait_head tells
                return
            off += n
            self._flush()  # headers + the first DATA frames leave in one write

    def _credit(self, s: H2Stream, n: int) -> None:
        """The caller consumed n bytes of s: hand the window back in quarter-window steps."""
        s.buffered -= n
        s._unacked += n
        if s._unacked >= self._stream_credit_at and not s.ended and s.error is None:
            try:
                self._h2.increment_flow_control_window(s._unacked, s.sid)
            except ProtocolError:  # the stream closed under us: no credit needed
                return
            s._unacked = 0
            self._wake_writer()


class H2Stream:
    """One request/response on an H2Connection."""

    __slots__ = (
        "_conn",
        "_gap_end",
        "_released",
        "_unacked",
        "_waiter",
        "buffered",
        "chunks",
        "ended",
        "error",
        "headers",
        "sid",
        "stale",
        "status",
    )
    http_version = "HTTP/2"

    def __init__(self, conn: H2Connection, sid: int) -> None:
        self._conn = conn
        self.sid = sid
        self.status = 0
        self.headers: list[Header] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0  # bytes received and not yet handed to the caller (<= window)
        self.ended = False
        self.error: RawgateError | None = None
        self.stale = False  # refused / above GOAWAY's last_stream_id: safe to retry
        self._waiter: Wakeup | None = None
        self._unacked = 0
        self._released = False
        self._gap_end = 0.0  # when the current silence hits upstream_read_idle_s (0: no gap)

    @property
    def done(self) -> bool:
        return self._released

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            w.set()

    def _head(self, headers: list[Header]) -> None:
        # h2's inbound header validation is off (see H2Connection): what rawgate relies on is
        # checked here, one :status of three digits and no other pseudo-header.
        status = 0
        seen = 0
        out = []
        for name, value in headers:
            if name == b":status":
                seen += 1
                if len(value) == 3 and value.isdigit():
                    status = int(value)
            elif name[:1] == b":":
                seen = 2
            else:
                out.append((name, value))
        if seen != 1 or status < 200:
            if self.error is None:
                self.error = UpstreamProtocolError("upstream sent a malformed response head")
            self._wake()
            return
        self.status = status
        self.headers = out
        self._wake()

    def _reset(self, code: int) -> None:
        if code == ErrorCodes.REFUSED_STREAM and self.status == 0:
            self.stale = True  # RFC 9113 8.7: not processed, safe to retry
        elif self.error is None:
            name = getattr(h2_error_code(code), "name", str(code))
            self.error = UpstreamClosed(f"upstream reset the stream ({name})")
        self._wake()

    async def _wait(
        self, timeout: float, error: type[UpstreamTimeout], what: str, limit: float = 0.0
    ) -> None:
        w = self._waiter = self._conn._wakeup()
        try:
            ok = await w.wait(max(0.0, timeout))
        finally:
            self._waiter = None
        if not ok:
            raise error(f"upstream sent no {what} for {limit or timeout:g} s")

    async def _wait_head(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.status == 0:
            if self.stale:
                await self._release()
                raise StaleConnection()
            if self.error is not None:
                raise self.error
            if self.ended:
                raise UpstreamProtocolError("upstream ended the stream without a response")
            await self._wait(deadline - time.monotonic(), UpstreamHeadersTimeout, "response head")

    async def receive(self) -> bytes:
        """The next body chunk; b"" at the end. Errors release the stream before raising."""
        return await self.receive_within(None) or b""

    async def receive_within(self, quiet_s: float | None) -> bytes | None:
        """receive(), or None when nothing arrived for quiet_s (the stream stays open: the
        gateway sends a heartbeat then). upstream_read_idle_s still counts from the last data,
        across such returns."""
        conn = self._conn
        try:
            while True:
                chunks = self.chunks
                if chunks:
                    # (bench.client_pool: h2-stream) Every DATA frame already buffered, joined: one
                    # piece per read of the connection instead of one per frame (Gemini sends one
                    # SSE event per frame), so the caller makes one async step and one downstream
                    # write per batch. Bounded by the stream window (what may be buffered at all).
                    if len(chunks) == 1:
                        data = chunks.popleft()
                    else:
                        data = b"".join(chunks)
                        chunks.clear()
                    conn._credit(self, len(data))
                    self._gap_end = 0.0
                    return data
                if self.error is not None:
                    raise self.error
                if self.stale:
                    raise UpstreamClosed("upstream refused the stream after answering it")
                if self.ended:
                    await self._release()
                    return b""
                if self._released:
                    return b""
                idle = conn._t.upstream_read_idle_s
                if quiet_s is None:
                    await self._wait(idle, UpstreamReadTimeout, "data")
                    continue
                now = time.monotonic()
                if not self._gap_end:
                    self._gap_end = now + idle
                left = self._gap_end - now
                if quiet_s >= left:
                    await self._wait(left, UpstreamReadTimeout, "data", idle)
                    continue
                w = self._waiter = conn._wakeup()
                try:
                    woken = await w.wait(max(0.0, quiet_s))
                finally:
                    self._waiter = None
                if not woken:
                    return None
        except BaseException:
            await self._release()
            raise

    async def aclose(self) -> None:
        await self._release()

    async def _release(self) -> None:
        """Reset the stream if it is still open (CANCEL), forget it, give the slot back."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        h = conn._h2
        st = h.streams.get(self.sid)
        if st is not None and not st.closed and conn.state is not ConnState.CLOSED:
            h.reset_stream(self.sid, ErrorCodes.CANCEL)
            conn._wake_writer()
        conn.streams.pop(self.sid, None)
        self.chunks.clear()
        # Bookkeeping happens before any await, and only closing a drained connection awaits
        # (shielded inside): no cancel scope per stream (~6 us each).
        await conn.pool.release(conn)

    def __repr__(self) -> str:
        return f"<H2Stream {self.sid} status={self.status} buffered={self.buffered}>"
