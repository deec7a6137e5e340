"""A minimal asyncio HTTP/1.1 (+ h2c, emulator_fast_h2.py) server for the emulator, for
benchmarks only (`engine="fast"`).

Why: the shared h11 driver costs tens of microseconds per request, which would make the emulator
a bottleneck of gateway benchmarks. This protocol parses only what the emulator needs (request
line, headers, Content-Length body, keep-alive, pipelining) and writes each reply with one
`transport.write`; the replies themselves come from the same sans-IO core as the seam App.

Invariants:
- One request at a time per connection; pipelined requests wait in the buffer, in order.
- Replies with no timing or fault are written synchronously (head + body, or head + every chunk
  in chunked framing, in ONE write); timed replies run as a generator of delays driven by
  `loop.call_later`, never a task per request.
- Backpressure: while the transport is paused, no further chunk is written and no further
  pipelined request is handled.
- Bounded input: head <= MAX_HEAD_BYTES (431), body <= MAX_BODY_BYTES (413); chunked request
  bodies are refused (411). Any of these closes the connection. While a timed reply plays, at
  most MAX_PIPELINED_BYTES are buffered, then reading pauses.
- Faults: reset/drop -> transport.abort() (RST, the client sees a broken connection); stall/hang
  -> silence until `stall_max_s`, then abort.
- Everything is closed when `open_fast_server` exits.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager
from typing import Any, cast

from rawgate.emulator.core import Emulator, Reply
from rawgate.emulator.fast_h2 import PREFACE, H2Session
from rawgate.emulator.state import Header
from rawgate.errors import BadRequest
from rawgate.http.target import parse_target

__all__ = ["open_fast_server"]

MAX_HEAD_BYTES = 64 * 1024  # same as rawgate's limits.max_header_bytes
MAX_BODY_BYTES = 32 * 1024 * 1024  # same as limits.max_body_bytes
# Pipelined bytes kept while a timed reply plays; past it the socket is not read.
MAX_PIPELINED_BYTES = MAX_HEAD_BYTES + MAX_BODY_BYTES
_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
            404: b"Not Found", 411: b"Length Required", 413: b"Payload Too Large",
            429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
            500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
            504: b"Gateway Timeout"}
# Header blocks of the core's constant header tuples, built once (saves ~1 us per reply).
_BLOCKS: dict[tuple[Header, ...], bytes] = {}


def _head(status: int, headers: tuple[Header, ...], length: int | None, keep: bool) -> bytes:
    block = _BLOCKS.get(headers)
    if block is None:
        block = _BLOCKS[headers] = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Status"))
    size = b"transfer-encoding: chunked\r\n" if length is None else b"content-length: %d\r\n" % (
        length)
    return line + block + size + (b"\r\n" if keep else b"connection: close\r\n\r\n")


def _framed(chunk: bytes) -> bytes:
    return b"%x\r\n" % len(chunk) + chunk + b"\r\n"


class _H1(asyncio.Protocol):
    def __init__(self, core: Emulator, loop: asyncio.AbstractEventLoop, conns: set[_H1],
                 h2_max_streams: int) -> None:
        self.core = core
        self.h2_max_streams = h2_max_streams
        self.h2: H2Session | None = None
        self.sniffed = False  # the first bytes were compared with the HTTP/2 preface
        self.loop = loop
        self.conns = conns
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.script: Generator[float | None, None, None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.waiting = False  # the script waits for resume_writing
        self.closed = False
        self.reading_paused = False

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.conns.add(self)
        tls = transport.get_extra_info("ssl_object")
        if tls is not None and tls.selected_alpn_protocol() == "h2":
            self._start_h2()

    def _start_h2(self) -> H2Session:
        assert self.transport is not None
        self.sniffed = True
        self.h2 = H2Session(self.core, self.loop, self.transport, self.h2_max_streams,
                            self._h2_closed)
        return self.h2

    def _h2_closed(self) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        if self.h2 is not None:
            self.h2.feed(data)
            return
        self.buf += data
        if not self.sniffed:
            if len(self.buf) < len(PREFACE) and PREFACE.startswith(self.buf):
                return  # could still be the h2c preface: wait for more bytes
            self.sniffed = True
            if self.buf.startswith(PREFACE):
                first = bytes(self.buf)
                self.buf.clear()
                self._start_h2().feed(first)
                return
        if self.script is None:
            self._process()
        elif len(self.buf) > MAX_PIPELINED_BYTES and self.transport is not None:
            self.transport.pause_reading()  # a timed reply is playing: stop buffering requests
            self.reading_paused = True

    def eof_received(self) -> bool | None:
        return None  # close when the peer half-closes

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.waiting:
            self.waiting = False
            self._advance()
        elif self.script is None:
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.h2 is not None:
            self.h2.close()
        self.conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.script is not None:
            self.core.count("streams_cancelled")
            self.script.close()
            self.script = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- requests --

    def _process(self) -> None:
        t = self.transport
        while self.script is None and not self.closed and not self.paused and t is not None:
            got = self._parse()
            if got is None:
                return
            method, target, headers, body, keep = got
            try:
                path, query = parse_target(target)
            except BadRequest:
                self._fail(400)
                return
            reply = self.core.handle(method, path, query, headers, body)
            if method == "HEAD":
                reply = Reply(reply.status, reply.headers, b"")
            if (reply.chunks is None and not reply.cut and not reply.first_byte_delay_s
                    and not reply.drip_s):
                t.write(_head(reply.status, reply.headers, len(reply.body), keep) + reply.body)
            elif not (reply.cut or reply.first_byte_delay_s or reply.drip_s
                      or reply.chunk_delay_s):
                assert reply.chunks is not None
                t.write(b"".join([_head(reply.status, reply.headers, None, keep),
                                  *map(_framed, reply.chunks), b"0\r\n\r\n"]))
                self.core.count("streams_completed")
            else:
                self.script = self._play(reply, keep)
                self._advance()
                return
            if not keep:
                t.close()
                self.closed = True

    def _parse(self) -> tuple[str, bytes, list[Header], bytes, bool] | None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                self._fail(431)
            return None
        if end > MAX_HEAD_BYTES:
            self._fail(431)
            return None
        lines = bytes(buf[:end]).split(b"\r\n")
        first = lines[0].split(b" ")
        if len(first) != 3 or not first[2].startswith(b"HTTP/1."):
            self._fail(400)
            return None
        headers: list[Header] = []
        length = 0
        keep = first[2] == b"HTTP/1.1"
        for line in lines[1:]:
            k, sep, v = line.partition(b":")
            if not sep:
                self._fail(400)
                return None
            k = k.strip().lower()
            v = v.strip()
            headers.append((k, v))
            if k == b"content-length":
                if not v.isdigit():
                    self._fail(400)
                    return None
                length = int(v)
            elif k == b"transfer-encoding":
                self._fail(411)
                return None
            elif k == b"connection":
                lv = v.lower()
                keep = (keep and lv != b"close") or lv == b"keep-alive"
        if length > MAX_BODY_BYTES:
            self._fail(413)
            return None
        total = end + 4 + length
        if len(buf) < total:
            return None
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        return first[0].decode("latin-1"), first[1], headers, body, keep

    def _fail(self, status: int) -> None:
        if self.transport is not None and not self.closed:
            body = b'{"error":{"code":%d,"message":"bad request framing"}}' % status
            self.transport.write(_head(status, ((b"content-type", b"application/json"),),
                                       len(body), False) + body)
            self.transport.close()
        self.closed = True

    # -- timed replies --

    def _advance(self) -> None:
        self.timer = None
        script = self.script
        if script is None:
            return
        try:
            delay = next(script)
        except StopIteration:
            self.script = None
            if self.reading_paused and self.transport is not None and not self.closed:
                self.reading_paused = False
                self.transport.resume_reading()
            if not self.closed:
                self._process()
            return
        if delay is None:
            if self.paused:
                self.waiting = True
            else:
                self.timer = self.loop.call_soon(self._advance)  # type: ignore[assignment]
        else:
            self.timer = self.loop.call_later(delay, self._advance)

    def _play(self, r: Reply, keep: bool) -> Generator[float | None, None, None]:
        t = self.transport
        assert t is not None
        stall = self.core.settings.stall_max_s
        if r.first_byte_delay_s:
            yield r.first_byte_delay_s
        if r.cut == "hang" or (r.cut == "stall" and r.chunks is None):
            yield stall
            self.abort()
            return
        if r.cut == "reset":
            self.abort()
            return
        if r.chunks is None:
            t.write(_head(r.status, r.headers, len(r.body), keep))
            if r.cut == "drop":
                self.abort()
                return
            yield from self._write(r.body, r.drip_s, framed=False)
        else:
            t.write(_head(r.status, r.headers, None, keep))
            stop = r.cut_after if r.cut in ("drop", "stall") else len(r.chunks)
            for i, chunk in enumerate(r.chunks[:stop]):
                if i and r.chunk_delay_s:
                    yield r.chunk_delay_s
                yield from self._write(chunk, r.drip_s, framed=True)
            if r.cut == "stall":
                yield stall
            if r.cut:
                self.abort()
                return
            t.write(b"0\r\n\r\n")
            self.core.count("streams_completed")
        if not keep:
            t.close()
            self.closed = True

    def _write(self, data: bytes, drip_s: float, framed: bool
               ) -> Generator[float | None, None, None]:
        t = self.transport
        assert t is not None
        if not drip_s:
            t.write(_framed(data) if framed else data)
            if self.paused:
                yield None
            return
        for i in range(len(data)):
            piece = data[i : i + 1]
            t.write(_framed(piece) if framed else piece)
            yield drip_s


@asynccontextmanager
async def open_fast_server(
    core: Emulator, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
    h2_max_streams: int = 100,
) -> AsyncIterator[int]:
    """Serve `core` on host:port (0 = any free port); yields the bound port.

    Cleartext: HTTP/1.1, or h2c when the client starts with the HTTP/2 preface. TLS: whatever the
    context's ALPN negotiates (h2 or http/1.1).
    """
    loop = asyncio.get_running_loop()
    conns: set[_H1] = set()
    server = await loop.create_server(lambda: _H1(core, loop, conns, h2_max_streams), host, port,
                                      ssl=ssl_context, backlog=1024, reuse_address=True)
    try:
        sock: Any = server.sockets[0]
        yield int(sock.getsockname()[1])
    finally:
        server.close()
        for c in list(conns):
            c.abort()
        await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run before the loop moves on
