"""HTTP/2 test tooling: a raw frame factory and reader, and a small h2 client over real sockets.

- `FrameFactory` builds real frames (hyperframe + its own HPACK encoder) for scripts that must
  send exactly what an attacker would: floods, broken sequences, header bombs.
- `FrameReader` parses what a server sends back, decoding every header block in order (HPACK
  state is per connection, so no block may be skipped).
- `H2Client` is a well-behaved client on h2's client-side state machine: plain requests,
  streaming request bodies, streamed responses with manual flow control (a slow reader), resets.
  `h2_client(host, port, ssl_context=None)` connects one over TCP (TLS with ALPN h2 if a context
  is given); `H2Client(stream)` wraps any connected anyio byte stream.
Everything is bounded in time: waits take a timeout and fail the test instead of hanging.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import ByteStream
from h2.config import H2Configuration
from h2.connection import ConnectionInputs, ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import StreamClosedError
from h2.settings import SettingCodes, Settings
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

__all__ = [
    "PREFACE",
    "FrameFactory",
    "FrameReader",
    "H2Client",
    "Response",
    "h2_client",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
Header = tuple[bytes, bytes]
WAIT_S = 10.0  # every helper wait fails after this: a hung server must fail a test, not hang it


class FrameFactory:
    """Serialized frames for raw scripts. One instance per connection (it owns HPACK state)."""

    def __init__(self) -> None:
        self.encoder = Encoder()

    def preface(self, settings: dict[Any, int] | None = None) -> bytes:
        f = SettingsFrame(0, settings=settings or {})
        return PREFACE + f.serialize()

    def settings(self, settings: dict[Any, int] | None = None, ack: bool = False) -> bytes:
        if ack:
            return SettingsFrame(0, flags=["ACK"]).serialize()
        return SettingsFrame(0, settings=settings or {}).serialize()

    def header_block(self, headers: Iterable[Header]) -> bytes:
        return self.encoder.encode(list(headers))

    def request_headers(
        self,
        method: str = "GET",
        path: str = "/",
        extra: Iterable[Header] = (),
        authority: str = "localhost",
    ) -> list[Header]:
        return [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            *extra,
        ]

    def headers(
        self,
        stream_id: int,
        headers: Iterable[Header] | None = None,
        *,
        end_stream: bool = True,
        end_headers: bool = True,
        block: bytes | None = None,
    ) -> bytes:
        data = block if block is not None else self.header_block(headers or self.request_headers())
        flags = []
        if end_stream:
            flags.append("END_STREAM")
        if end_headers:
            flags.append("END_HEADERS")
        return HeadersFrame(stream_id, data=data, flags=flags).serialize()

    def continuation(self, stream_id: int, data: bytes, *, end_headers: bool = False) -> bytes:
        flags = ["END_HEADERS"] if end_headers else []
        return ContinuationFrame(stream_id, data=data, flags=flags).serialize()

    def data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> bytes:
        flags = ["END_STREAM"] if end_stream else []
        return DataFrame(stream_id, data=data, flags=flags).serialize()

    def rst(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> bytes:
        return RstStreamFrame(stream_id, error_code=code).serialize()

    def ping(self, payload: bytes = b"12345678", ack: bool = False) -> bytes:
        return PingFrame(0, opaque_data=payload, flags=["ACK"] if ack else []).serialize()

    def window_update(self, stream_id: int, increment: int) -> bytes:
        return WindowUpdateFrame(stream_id, window_increment=increment).serialize()

    def priority(self, stream_id: int, depends_on: int = 0, weight: int = 16) -> bytes:
        return PriorityFrame(stream_id, depends_on=depends_on, stream_weight=weight).serialize()

    def goaway(self, last_stream_id: int = 0, code: int = 0) -> bytes:
        return GoAwayFrame(0, last_stream_id=last_stream_id, error_code=code).serialize()

    @staticmethod
    def raw(frame_type: int, stream_id: int, payload: bytes, flags: int = 0) -> bytes:
        """Any frame, including unknown types, built by hand (9-byte header + payload)."""
        n = len(payload)
        return (
            n.to_bytes(3, "big")
            + bytes([frame_type, flags])
            + (stream_id & 0x7FFFFFFF).to_bytes(4, "big")
            + payload
        )


class FrameReader:
    """Incremental frame parser for bytes a server sent; decodes header blocks as they come."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.decoder = Decoder()
        self.frames: list[Frame] = []
        # stream id -> decoded header lists (one per complete header block)
        self.header_blocks: dict[int, list[list[Header]]] = {}
        self._pending_block: tuple[int, bytearray] | None = None

    def feed(self, data: bytes) -> list[Frame]:
        self.buf += data
        out: list[Frame] = []
        while len(self.buf) >= 9:
            f, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                break
            f.parse_body(memoryview(self.buf[9 : 9 + length]))
            del self.buf[: 9 + length]
            self._track_headers(f)
            out.append(f)
        self.frames.extend(out)
        return out

    def _track_headers(self, f: Frame) -> None:
        if isinstance(f, HeadersFrame):
            self._pending_block = (f.stream_id, bytearray(f.data))
        elif isinstance(f, ContinuationFrame) and self._pending_block is not None:
            self._pending_block[1].extend(f.data)
        else:
            return
        if "END_HEADERS" in f.flags and self._pending_block is not None:
            sid, block = self._pending_block
            self._pending_block = None
            decoded = [(bytes(k), bytes(v)) for k, v in self.decoder.decode(bytes(block), raw=True)]
            self.header_blocks.setdefault(sid, []).append(decoded)

    def of_type(self, cls: type[Frame]) -> list[Any]:
        return [f for f in self.frames if isinstance(f, cls)]

    def goaway(self) -> GoAwayFrame | None:
        found = self.of_type(GoAwayFrame)
        return found[-1] if found else None

    def status(self, stream_id: int) -> int | None:
        for block in self.header_blocks.get(stream_id, []):
            for k, v in block:
                if k == b":status":
                    return int(v)
        return None

    def body(self, stream_id: int) -> bytes:
        return b"".join(f.data for f in self.of_type(DataFrame) if f.stream_id == stream_id)

    def rst_code(self, stream_id: int) -> int | None:
        for f in self.of_type(RstStreamFrame):
            if f.stream_id == stream_id:
                return int(f.error_code)
        return None


class Response:
    __slots__ = ("body", "headers", "status", "stream_id", "trailers")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.status = 0
        self.headers: list[Header] = []
        self.body = b""
        self.trailers: list[Header] = []

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def json(self) -> Any:
        import json

        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} stream={self.stream_id} {self.body[:80]!r}>"


class _ClientStream:
    __slots__ = ("chunks", "ended", "headers", "reset_code", "status", "trailers", "unacked")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[Header] | None = None
        self.chunks: list[bytes] = []
        self.ended = False
        self.reset_code: int | None = None
        self.trailers: list[Header] = []
        self.unacked = 0  # flow-controlled bytes received but not yet acknowledged


class H2Client:
    """A client on h2's state machine over a connected byte stream. Use as an async context."""

    def __init__(
        self,
        stream: ByteStream,
        *,
        auto_ack: bool = True,
        settings: dict[int, int] | None = None,
        authority: str = "localhost",
        scheme: str = "http",
    ) -> None:
        self.stream = stream
        self.auto_ack = auto_ack
        self.authority = authority.encode()
        self.scheme = scheme.encode()
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        if settings:
            # Settings.update() only queues values until the server ACKs them, and
            # initiate_connection() would then advertise the old ones: start from them instead.
            initial = {
                SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
                **settings,
            }
            self.conn.local_settings = Settings(client=True, initial_values=initial)  # type: ignore[arg-type]
        # RFC 9113 6.8: streams up to last_stream_id still complete after a GOAWAY, but h2's
        # client state machine rejects every frame after one (the encode/httpcore#46 failure,
        # also hit when GOAWAY and a response share one read). Let it keep receiving.
        sm = self.conn.state_machine
        sm._transitions = {
            **sm._transitions,
            **{
                (ConnectionState.CLOSED, i): (None, ConnectionState.CLOSED)
                for i in ConnectionInputs
            },
        }
        self.streams: dict[int, _ClientStream] = {}
        self.goaway: ConnectionTerminated | None = None
        self.eof = False
        self.error: Exception | None = None
        self.bytes_received = 0
        self._changed = anyio.Event()
        self._lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> H2Client:
        self.conn.initiate_connection()
        await self.flush()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._reader)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        await anyio.aclose_forcefully(self.stream)

    # ---- plumbing -------------------------------------------------------------------------

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            async with self._lock:
                await self.stream.send(data)

    async def send_raw(self, data: bytes) -> None:
        """Inject bytes as they are (the client's HPACK state does not see them)."""
        await self.flush()
        async with self._lock:
            await self.stream.send(data)

    async def _reader(self) -> None:
        try:
            while True:
                try:
                    data = await self.stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    self.eof = True
                    return
                self.bytes_received += len(data)
                try:
                    events = self.conn.receive_data(data)
                except Exception as e:  # the server broke protocol: record it for the test
                    self.error = e
                    self.eof = True
                    return
                for ev in events:
                    self._on_event(ev)
                await self.flush()
                self._notify()
        finally:
            self._notify()

    def _on_event(self, ev: object) -> None:
        if isinstance(ev, ResponseReceived):
            st = self.streams[ev.stream_id]
            st.headers = [(bytes(k), bytes(v)) for k, v in ev.headers or []]
            st.status = int(dict(st.headers)[b":status"])
        elif isinstance(ev, DataReceived):
            st = self.streams[ev.stream_id]
            st.chunks.append(ev.data or b"")
            n = ev.flow_controlled_length or 0
            if self.auto_ack:
                if n:
                    self.conn.acknowledge_received_data(n, ev.stream_id)
            else:
                st.unacked += n
        elif isinstance(ev, TrailersReceived):
            self.streams[ev.stream_id].trailers = list(ev.headers or [])
        elif isinstance(ev, StreamEnded):
            self.streams[ev.stream_id].ended = True
        elif isinstance(ev, StreamReset):
            if ev.stream_id in self.streams:
                self.streams[ev.stream_id].reset_code = int(ev.error_code or 0)
        elif isinstance(ev, ConnectionTerminated):
            self.goaway = ev

    def _notify(self) -> None:
        ev = self._changed
        self._changed = anyio.Event()
        ev.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
        """Wait until predicate() holds; fail on timeout or if the connection is gone first."""
        with anyio.fail_after(timeout):
            while not predicate():
                if self.eof:
                    if predicate():
                        return
                    raise ConnectionError(
                        f"connection closed (goaway={self.goaway}, error={self.error!r})"
                    )
                await self._changed.wait()

    # ---- requests -------------------------------------------------------------------------

    async def open_stream(
        self,
        method: str,
        path: str,
        headers: Iterable[Header] = (),
        body: bytes | None = None,
        *,
        end_stream: bool = True,
    ) -> int:
        """Send a request head (and a body that fits the window). Returns the stream id."""
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = _ClientStream()
        head = [
            (b":method", method.encode()),
            (b":scheme", self.scheme),
            (b":authority", self.authority),
            (b":path", path.encode()),
            *headers,
        ]
        no_body = body is None or body == b""
        self.conn.send_headers(sid, head, end_stream=no_body and end_stream)
        await self.flush()
        if not no_body:
            assert body is not None
            await self.send_body(sid, body, end_stream=end_stream)
        return sid

    async def send_body(self, sid: int, data: bytes, *, end_stream: bool = False) -> None:
        off = 0
        st = self.streams[sid]
        while st.reset_code is None and not self.eof:
            n = min(
                len(data) - off,
                self.conn.local_flow_control_window(sid),
                self.conn.max_outbound_frame_size,
            )
            if n <= 0 and off < len(data):
                await self.wait_for(
                    lambda: (
                        self.conn.local_flow_control_window(sid) > 0
                        or self.streams[sid].reset_code is not None
                    )
                )
                if self.streams[sid].reset_code is not None:
                    return
                continue
            last = off + n >= len(data)
            try:
                self.conn.send_data(sid, data[off : off + n], end_stream=end_stream and last)
            except StreamClosedError:
                return  # the server answered early (413 ...) and closed the stream
            off += n
            await self.flush()
            if last:
                return

    async def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(sid, code)
        await self.flush()

    async def ack(self, sid: int, n: int | None = None) -> None:
        """Manual flow control (auto_ack=False): hand back `n` (default: all) received bytes."""
        st = self.streams[sid]
        n = st.unacked if n is None else n
        if n:
            st.unacked -= n
            self.conn.acknowledge_received_data(n, sid)
            await self.flush()

    async def response(self, sid: int, timeout: float = WAIT_S) -> Response:
        """Wait for the whole response of stream `sid`. A reset raises ConnectionResetError."""
        st = self.streams[sid]
        await self.wait_for(lambda: st.ended or st.reset_code is not None, timeout)
        if st.reset_code is not None and not st.ended:
            raise ConnectionResetError(f"stream {sid} reset with code {st.reset_code}")
        r = Response(sid)
        r.status = st.status
        r.headers = [h for h in st.headers or [] if not h[0].startswith(b":")]
        r.body = b"".join(st.chunks)
        r.trailers = st.trailers
        return r

    async def request(
        self,
        method: str,
        path: str,
        headers: Iterable[Header] = (),
        body: bytes = b"",
        timeout: float = WAIT_S,
    ) -> Response:
        sid = await self.open_stream(method, path, headers, body)
        return await self.response(sid, timeout)

    async def wait_headers(self, sid: int, timeout: float = WAIT_S) -> int:
        st = self.streams[sid]
        await self.wait_for(lambda: st.headers is not None or st.reset_code is not None, timeout)
        return st.status

    def received(self, sid: int) -> bytes:
        return b"".join(self.streams[sid].chunks)


@asynccontextmanager
async def h2_client(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    **kwargs: Any,
) -> AsyncIterator[H2Client]:
    """Connect to host:port and speak HTTP/2 (h2c prior knowledge, or TLS + ALPN h2)."""
    if ssl_context is not None:
        ssl_context.set_alpn_protocols(["h2"])
        stream: ByteStream = await anyio.connect_tcp(
            host, port, ssl_context=ssl_context, tls_standard_compatible=False
        )
        kwargs.setdefault("scheme", "https")
    else:
        stream = await anyio.connect_tcp(host, port)
    async with H2Client(stream, **kwargs) as client:
        yield client
