"""Test helpers for the HTTP/1.1 driver: an in-memory byte stream and a response parser.

- `memory_stream_pair(capacity)` gives (server, client) ends of an in-memory duplex byte stream
  implementing anyio.abc.ByteStream. `capacity` bounds the bytes the server may have queued
  towards the client: once the client stops reading, the server's send() blocks like a socket
  whose buffers are full. `client.reset()` makes the server's next receive/send fail the way a
  TCP RST does.
- `h1_serving(app, cfg)` runs serve_h1 on the server end inside a task group and yields a
  `Client`; on exit it closes the client end, waits (bounded) for serve_h1 to return and checks
  that the connection counters are back at zero.
- `parse_responses(data, methods)` splits raw response bytes into `Response` records (interim 1xx
  responses included), honouring Content-Length, chunked and close-delimited bodies and the
  no-body rule of HEAD / 204 / 304.
- `exchange(stream, raw, n)` writes raw request bytes to any connected anyio byte stream (a real
  socket, TLS) and returns the next `n` final responses.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import ByteStream

from rawgate.config import Config
from rawgate.conn import ConnInfo, ServerState
from rawgate.http.h1_server import serve_h1

__all__ = [
    "Client",
    "MemoryStream",
    "Response",
    "exchange",
    "h1_serving",
    "memory_stream_pair",
    "normalize_date",
    "parse_responses",
]

WAIT_S = 5.0


class _Pipe:
    """One direction of the pair: a byte buffer with EOF, reset and an optional capacity."""

    def __init__(self, capacity: int | None = None) -> None:
        self.buf = bytearray()
        self.capacity = capacity
        self.eof = False  # the writer half-closed or closed
        self.reset = False  # the far end vanished: reads and writes fail
        self.changed = anyio.Event()
        self.total_written = 0

    def _wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def write(self, data: bytes) -> None:
        while self.capacity is not None and len(self.buf) >= self.capacity and not self.reset:
            await self.changed.wait()
        if self.reset:
            raise anyio.BrokenResourceError("connection reset")
        if self.eof:
            raise anyio.ClosedResourceError
        self.buf += data
        self.total_written += len(data)
        self._wake()

    async def read(self, max_bytes: int) -> bytes:
        while not self.buf:
            if self.reset:
                raise anyio.BrokenResourceError("connection reset")
            if self.eof:
                raise anyio.EndOfStream
            await self.changed.wait()
        data = bytes(self.buf[:max_bytes])
        del self.buf[:max_bytes]
        self._wake()
        return data

    def close(self) -> None:
        self.eof = True
        self._wake()

    def break_(self) -> None:
        self.reset = True
        self._wake()


class MemoryStream(ByteStream):
    """One end of an in-memory duplex byte stream."""

    def __init__(self, incoming: _Pipe, outgoing: _Pipe) -> None:
        self._in = incoming
        self._out = outgoing
        self.closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self.closed:
            raise anyio.ClosedResourceError
        await anyio.lowlevel.checkpoint()
        return await self._in.read(max_bytes)

    async def send(self, item: bytes) -> None:
        if self.closed:
            raise anyio.ClosedResourceError
        await anyio.lowlevel.checkpoint()
        await self._out.write(item)

    async def send_eof(self) -> None:
        self._out.close()

    async def aclose(self) -> None:
        self.closed = True
        self._out.close()
        self._in.close()

    def reset(self) -> None:
        """Vanish like a TCP RST: the other end's reads and writes fail."""
        self.closed = True
        self._in.break_()
        self._out.break_()

    @property
    def queued(self) -> int:
        """Bytes written towards this end and not yet read."""
        return len(self._in.buf)


def memory_stream_pair(capacity: int | None = None) -> tuple[MemoryStream, MemoryStream]:
    c2s = _Pipe()
    s2c = _Pipe(capacity)
    return MemoryStream(c2s, s2c), MemoryStream(s2c, c2s)


class Response:
    __slots__ = ("body", "chunked", "headers", "raw", "reason", "status", "version")

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.version = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.raw = b""
        self.chunked = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_names(self) -> list[bytes]:
        return [k for k, _ in self.headers]

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers} body={self.body[:80]!r}>"


class IncompleteResponse(Exception):
    pass


def _parse_one(data: bytes, pos: int, method: str, at_eof: bool) -> tuple[Response, int]:
    end = data.find(b"\r\n\r\n", pos)
    if end < 0:
        raise IncompleteResponse
    head = data[pos:end].split(b"\r\n")
    r = Response()
    version, status, *reason = head[0].split(b" ", 2)
    r.version = version
    r.status = int(status)
    r.reason = reason[0] if reason else b""
    for line in head[1:]:
        k, _, v = line.partition(b":")
        r.headers.append((k.strip().lower(), v.strip()))
    i = end + 4
    te = r.header(b"transfer-encoding")
    cl = r.header(b"content-length")
    if r.status < 200 or r.status in (204, 304) or method == "HEAD":
        r.body = b""
    elif te is not None and te.lower() == b"chunked":
        r.chunked = True
        body = bytearray()
        while True:
            line_end = data.find(b"\r\n", i)
            if line_end < 0:
                raise IncompleteResponse
            size = int(data[i:line_end].split(b";")[0], 16)
            i = line_end + 2
            if size == 0:
                if data[i : i + 2] != b"\r\n":
                    raise IncompleteResponse
                i += 2
                break
            if len(data) < i + size + 2:
                raise IncompleteResponse
            body += data[i : i + size]
            assert data[i + size : i + size + 2] == b"\r\n", "chunk not followed by CRLF"
            i += size + 2
        r.body = bytes(body)
    elif cl is not None:
        n = int(cl)
        if len(data) < i + n:
            raise IncompleteResponse
        r.body = data[i : i + n]
        i += n
    else:
        if not at_eof:
            raise IncompleteResponse
        r.body = data[i:]
        i = len(data)
    r.raw = data[pos:i]
    return r, i


def parse_responses(
    data: bytes, methods: Sequence[str] = (), *, at_eof: bool = True
) -> list[Response]:
    """Every complete response in `data`; methods[i] is the method of the i-th final response."""
    out: list[Response] = []
    pos = 0
    final = 0
    while pos < len(data):
        method = methods[final] if final < len(methods) else "GET"
        try:
            r, pos = _parse_one(data, pos, method, at_eof)
        except IncompleteResponse:
            if at_eof:
                raise
            break
        out.append(r)
        if r.status >= 200:
            final += 1
    return out


_DATE = re.compile(rb"date: [^\r]*\r\n")


def normalize_date(data: bytes) -> bytes:
    """Replace every Date header value so responses can be compared byte for byte."""
    return _DATE.sub(b"date: X\r\n", data)


class Client:
    """The test's end of a serve_h1 connection."""

    def __init__(self, stream: MemoryStream, state: ServerState, done: anyio.Event) -> None:
        self.stream = stream
        self.state = state
        self.done = done
        self.received = bytearray()
        self.eof = False

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def read_some(self, timeout: float = WAIT_S) -> bytes:
        with anyio.fail_after(timeout):
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                self.eof = True
                return b""
        self.received += data
        return data

    async def read_until_closed(self, timeout: float = WAIT_S) -> bytes:
        """Everything the server sends until it closes its side."""
        with anyio.fail_after(timeout):
            while not self.eof:
                await self.read_some(timeout)
        return bytes(self.received)

    async def responses(
        self, n: int, methods: Sequence[str] = (), timeout: float = WAIT_S
    ) -> list[Response]:
        """Read until `n` final responses are complete (interim ones are returned too)."""
        with anyio.fail_after(timeout):
            while True:
                got = parse_responses(bytes(self.received), methods, at_eof=self.eof)
                if sum(1 for r in got if r.status >= 200) >= n:
                    return got
                if self.eof:
                    raise AssertionError(f"closed after {len(got)} responses: {got}")
                await self.read_some(timeout)

    async def response(self, method: str = "GET", timeout: float = WAIT_S) -> Response:
        """The next final response after those already consumed by `take()`."""
        got = await self.responses(1, [method], timeout)
        final = [r for r in got if r.status >= 200]
        return final[0]

    def take(self, n: int = 1, methods: Sequence[str] = ()) -> list[Response]:
        """Remove the first `n` complete final responses (and interim ones before them)."""
        got = parse_responses(bytes(self.received), methods, at_eof=False)
        taken: list[Response] = []
        used = 0
        final = 0
        for r in got:
            taken.append(r)
            used += len(r.raw)
            if r.status >= 200:
                final += 1
                if final == n:
                    break
        del self.received[:used]
        return taken


async def exchange(
    stream: ByteStream,
    raw: bytes,
    n: int = 1,
    methods: Sequence[str] = (),
    timeout: float = WAIT_S,
) -> list[Response]:
    """Send `raw` on `stream`, read until `n` final responses are complete; return the finals."""
    await stream.send(raw)
    buf = b""
    eof = False
    with anyio.fail_after(timeout):
        while True:
            got = [r for r in parse_responses(buf, methods, at_eof=eof) if r.status >= 200]
            if len(got) >= n:
                return got
            if eof:
                raise AssertionError(f"closed after {len(got)} responses: {buf[:300]!r}")
            try:
                buf += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                eof = True


@asynccontextmanager
async def h1_serving(
    app: Any,
    cfg: Config | None = None,
    state: ServerState | None = None,
    *,
    capacity: int | None = None,
    initial: bytes = b"",
) -> AsyncIterator[Client]:
    server, client = memory_stream_pair(capacity)
    state = state or ServerState()
    done = anyio.Event()

    async def run() -> None:
        try:
            info = ConnInfo(client=("127.0.0.1", 40000), scheme="http")
            await serve_h1(server, app, cfg or Config(), info, state, initial)
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        c = Client(client, state, done)
        try:
            yield c
        finally:
            await client.aclose()
            with anyio.fail_after(WAIT_S):
                await done.wait()
    assert server.closed, "serve_h1 returned without closing its stream"
    assert state.open_connections["h1"] == 0
    assert state.in_flight == 0
