"""The upstream HTTP/1.1 connection: h11 writes the request and parses the response head; the
response body is read by `BodyReader` (sans-IO, below); the caller's task drives both.

Invariants:
- One exchange at a time (capacity 1); no background task: the caller's own reads drive it.
- h11 validates the head (a Transfer-Encoding other than chunked, a bad Content-Length are
  errors) before the body framing is taken from it: HEAD/204/304 -> empty, else chunked, else
  Content-Length, else up to EOF (RFC 9112 6.3). Why not h11 for the body: it makes one Data
  event per chunked-encoding chunk at ~7 us each, 35 % of rawgate's CPU on a 100-event SSE
  stream; BodyReader takes a whole read at ~1 us per chunk.
- A connection goes back to the pool as IDLE only when the previous exchange ended cleanly: the
  body complete with nothing after it, keep-alive on both sides (HTTP/1.1, no
  `Connection: close`); it then gets a fresh h11.Connection (1.5 us). Anything else (an error,
  a timeout, cancellation, a body the caller abandoned) closes it: a half-read response would
  otherwise be read by the next request as its own answer.
- Every exchange releases its pool slot exactly once, on every path.
- A reused connection whose first write fails was closed by the peer before it saw a byte of
  this request: that raises StaleConnection (retried once by the client). A reused connection
  that hits EOF after the request was written is NOT retried: the server may have acted on it.
- Timeouts: the response head must arrive within upstream_headers_s of the request being
  written (UpstreamHeadersTimeout); then each gap between body reads is bounded by
  upstream_read_idle_s (UpstreamReadTimeout), never the total; writes by upstream_write_s.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import h11

from rawgate.errors import (
    UpstreamClosed,
    UpstreamError,
    UpstreamHeadersTimeout,
    UpstreamProtocolError,
    UpstreamReadTimeout,
    UpstreamTimeout,
)
from rawgate.seam import Header
from rawgate.upstream.pool import ConnState, StaleConnection

if TYPE_CHECKING:
    from rawgate.config import TimeoutsConfig, UpstreamConfig
    from rawgate.upstream.backends import NetworkStream
    from rawgate.upstream.pool import OriginPool

__all__ = ["H1Connection", "H1Exchange"]


# One read is at most this much: a typical SSE chunk is < 1 KiB, a non-stream reply tens of
# KiB; 64 KiB takes those in one syscall without holding megabytes per connection.
READ_BYTES = 64 * 1024
# Bodies up to this are sent in the same write as the head (one syscall, one TCP segment for
# a typical 2-10 KiB chat request); bigger ones are written separately to avoid a copy.
COALESCE_BODY_BYTES = 64 * 1024
_NEED_DATA = h11.NEED_DATA
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))
_HEX = b"0123456789abcdefABCDEF"
# A chunk size has at most this many hex digits (2**64 - 1 bytes).
_MAX_SIZE_DIGITS = 16
# BodyReader._left of a chunked body, besides "chunk bytes still to come" (> 0).
_SIZE, _CRLF, _TRAILER = -1, -2, -3
# Size lines already checked -> their value: one dict hit (~40 ns) instead of the checks and
# int() (~0.4 us) per chunk; SSE events repeat a few hundred sizes. Bounded; the line is the key,
# so only exactly what passed the checks hits.
_SIZES: dict[bytes, int] = {}
_SIZES_MAX = 4096


class H1Connection:
    http2 = False
    capacity = 1

    __slots__ = (
        "_body",
        "_gap_end",
        "_h11",
        "_idle_s",
        "_max_head",
        "_reusable",
        "_stream",
        "_t",
        "authority",
        "id",
        "idle_since",
        "in_use",
        "pool",
        "requests",
        "state",
    )

    def __init__(
        self,
        conn_id: int,
        stream: NetworkStream,
        pool: OriginPool,
        authority: bytes,
        cfg: UpstreamConfig,
        timeouts: TimeoutsConfig,
    ) -> None:
        self.id = conn_id
        self._stream = stream
        self.pool = pool
        self.authority = authority
        self._t = timeouts
        self._idle_s = timeouts.upstream_read_idle_s
        self._max_head = cfg.max_response_header_bytes
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_head)
        self.state = ConnState.IDLE
        self.in_use = 0
        self.idle_since = time.monotonic()
        self.requests = 0
        self._body = BodyReader(0)  # the current response's body
        self._reusable = False  # keep-alive on both sides of the current exchange
        self._gap_end = 0.0  # when the current silence hits upstream_read_idle_s (0: no gap)

    def is_stale(self) -> bool:
        # Idle and readable means the server sent EOF (or junk) between exchanges.
        return self._stream.is_readable()

    async def aclose(self) -> None:
        self.state = ConnState.CLOSED
        await self._stream.aclose()

    def __repr__(self) -> str:
        return f"<H1Connection #{self.id} {self.state.name} requests={self.requests}>"

    async def start(
        self, method: bytes, target: bytes, headers: list[Header], body: bytes
    ) -> H1Exchange:
        """Send one request and return once the response head arrived. The caller holds one
        pool slot on this connection; from here on this method owns it (released on error)."""
        h = self._h11
        reused = self.requests > 0
        self.requests += 1
        hdrs = [(b"host", self.authority), *headers]
        if body or method in _BODY_METHODS:
            hdrs.append((b"content-length", b"%d" % len(body)))
        try:
            try:
                head = h.send(h11.Request(method=method, target=target, headers=hdrs))
                # passthrough: h11 frames the body without joining it into a copy
                parts = h.send_with_data_passthrough(h11.Data(data=body)) if body else []
                tail = h.send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                # h11's message quotes the offending value, which may be an API key.
                raise UpstreamProtocolError(
                    "invalid request header name or value for the upstream"
                ) from None
            assert head is not None and tail is not None
            try:
                if len(body) > COALESCE_BODY_BYTES:
                    for part in (head, *(parts or ()), tail):
                        if part:
                            await self._stream.write(bytes(part), self._t.upstream_write_s)
                else:
                    data = b"".join((head, *(parts or ()), tail))
                    await self._stream.write(data, self._t.upstream_write_s)
            except UpstreamClosed:
                if reused:
                    raise StaleConnection() from None
                raise
            status, resp_headers, version = await self._read_head()
            reader = self._body = _body_reader(method, status, resp_headers, self._max_head)
            self._reusable = (
                version == "HTTP/1.1" and not _says_close(resp_headers) and not _says_close(hdrs)
            )
            self._gap_end = 0.0
            rest = h.trailing_data[0]  # body bytes that came with the head
            if rest:
                reader.feed(rest)
        except BaseException:
            await self._drop()
            raise
        return H1Exchange(self, status, resp_headers, version)

    async def _read_head(self) -> tuple[int, list[Header], str]:
        h = self._h11
        stream = self._stream
        deadline = time.monotonic() + self._t.upstream_headers_s
        got_any = False
        while True:
            try:
                ev = h.next_event()
            except h11.RemoteProtocolError as e:
                if got_any:
                    raise UpstreamProtocolError(f"bad response head from upstream: {e}") from None
                raise UpstreamClosed("upstream closed the connection before answering") from None
            if ev is _NEED_DATA:
                data = await stream.read(
                    READ_BYTES, deadline - time.monotonic(), UpstreamHeadersTimeout
                )
                got_any = got_any or bool(data)
                h.receive_data(data)
                continue
            if type(ev) is h11.Response:
                return ev.status_code, list(ev.headers), "HTTP/" + ev.http_version.decode()
            if type(ev) is h11.ConnectionClosed:
                raise UpstreamClosed("upstream closed the connection before answering")
            # InformationalResponse (100 Continue, 103 Early Hints): wait for the real one.

    async def _receive(self, quiet_s: float | None) -> tuple[bytes, bool] | None:
        """(body bytes, ended): all the body that already arrived, before waiting for another
        read; ended once it is complete (the connection is then released and must not be
        touched again by this exchange). None: nothing arrived for quiet_s (the
        upstream_read_idle_s limit still counts from the last data).

        (bench.client_pool: h1-stream) One piece per read instead of one per chunked-encoding
        chunk: an SSE stream whose events arrive together costs the caller one async step and
        one downstream write per read, not one per event (stream-chat c=16 over an HTTP/1.1
        upstream: 100 steps per stream -> ~3). A framing error met after some data is raised by
        the next call, so the data before it still reaches the caller first."""
        body = self._body
        while True:
            data = body.take()
            if body.done:
                await self._finish()
                return data, True
            if data:
                return data, False
            got: bytes | None
            if quiet_s is None:
                got = await self._stream.read(READ_BYTES, self._idle_s)
            else:
                got = await self._read_within(quiet_s)
                if got is None:
                    return None
            self._gap_end = 0.0
            if got:
                body.feed(got)
            else:
                body.end_of_input()

    async def _read_within(self, quiet_s: float) -> bytes | None:
        idle = self._idle_s
        now = time.monotonic()
        if not self._gap_end:
            self._gap_end = now + idle
        left = self._gap_end - now
        if quiet_s < left:
            try:
                return await self._stream.read(READ_BYTES, quiet_s, _Quiet)
            except _Quiet:
                return None
        try:
            return await self._stream.read(READ_BYTES, max(0.0, left))
        except UpstreamReadTimeout:
            raise UpstreamReadTimeout(f"upstream sent nothing for {idle:g} s") from None

    async def _finish(self) -> None:
        if self._reusable and not self._body.until_eof and not self._body.leftover():
            # clean: reusable, with a fresh h11 (it never saw the body: BodyReader read it)
            self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_head)
            await self.pool.release(self)
        else:  # Connection: close, HTTP/1.0, a body up to EOF, or junk after the body
            await self._drop()

    async def _drop(self) -> None:
        """Close (not reusable) and release the slot; safe under cancellation."""
        self.state = ConnState.CLOSED
        await self._stream.aclose()  # shielded inside
        await self.pool.release(self)  # bookkeeping first; closes inside are shielded


class _Quiet(UpstreamTimeout):
    """A quiet period the caller asked about ended (not an error: never leaves this module)."""


def _says_close(headers: list[Header]) -> bool:
    for name, value in headers:
        if name == b"connection" and b"close" in (t.strip() for t in value.lower().split(b",")):
            return True
    return False


def _body_reader(method: bytes, status: int, headers: list[Header], max_line: int) -> BodyReader:
    if method == b"HEAD" or status in (204, 304) or status < 200:
        return BodyReader(0)
    length: bytes | None = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return BodyReader(None, max_line=max_line)  # h11 accepts nothing but chunked
        if name == b"content-length":
            length = value  # h11 checked it: digits, one value
    if length is not None:
        return BodyReader(int(length))
    return BodyReader(None, until_eof=True)


class BodyReader:
    """A response body's framing, sans-IO: `feed(bytes)`, `end_of_input()` at EOF, `take()` ->
    the body bytes decodable so far, joined (b"" when it needs more input).

    length >= 0: Content-Length; None: chunked (chunk extensions and trailers skipped);
    until_eof: everything up to EOF. `done` once the body is complete; `leftover()` tells
    whether bytes followed it. A framing error found after some data is kept: take() returns
    the data before it, and raises on the next call. Memory: an incomplete size or trailer line
    is bounded by max_line; chunk data is handed out as it arrives.
    """

    __slots__ = ("_buf", "_chunked", "_left", "_max_line", "done", "error", "until_eof")

    def __init__(
        self, length: int | None, *, until_eof: bool = False, max_line: int = 65536
    ) -> None:
        self._buf = b""
        self.until_eof = until_eof
        self._chunked = length is None and not until_eof
        self._left = _SIZE if self._chunked else (length or 0)
        self._max_line = max_line
        self.done = not until_eof and not self._chunked and self._left == 0
        self.error: UpstreamError | None = None

    def feed(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data

    def leftover(self) -> bool:
        return bool(self._buf)

    def end_of_input(self) -> None:
        if self.until_eof:
            self.done = True
        elif not self.done and self.error is None:
            self.error = UpstreamClosed("upstream closed the connection mid-body")

    def take(self) -> bytes:
        if self.error is not None:
            raise self.error
        buf = self._buf
        if self.done or not buf:
            return b""
        if self._chunked:
            return self._take_chunked(buf)
        self._buf = b""
        if self.until_eof:
            return buf
        left = self._left
        if len(buf) <= left:
            self._left = left - len(buf)
            self.done = not self._left
            return buf
        self._left = 0
        self.done = True
        self._buf = buf[left:]  # junk after the body: the connection is not reused
        return buf[:left]

    def _take_chunked(self, buf: bytes) -> bytes:
        pos, end = 0, len(buf)
        left = self._left
        parts: list[bytes] = []
        try:
            while pos < end:
                if left > 0:
                    stop = pos + left
                    if stop + 2 <= end and buf[stop] == 13 and buf[stop + 1] == 10:
                        # the common case: the whole chunk and its CRLF are here
                        parts.append(buf[pos:stop])
                        pos = stop + 2
                        left = _SIZE
                        continue
                    k = min(left, end - pos)
                    parts.append(buf[pos : pos + k])
                    pos += k
                    left -= k
                    if not left:
                        left = _CRLF
                elif left == _SIZE:
                    i = buf.find(b"\r\n", pos)
                    if i < 0:
                        if end - pos > self._max_line:
                            raise UpstreamProtocolError("upstream sent an over-long chunk size")
                        break
                    line = buf[pos:i]
                    size = _SIZES.get(line)
                    if size is None:
                        size = _chunk_size(line)
                    left = size or _TRAILER
                    pos = i + 2
                elif left == _CRLF:
                    if end - pos < 2:
                        break
                    if buf[pos] != 13 or buf[pos + 1] != 10:
                        raise UpstreamProtocolError("upstream sent chunk data without its CRLF")
                    pos += 2
                    left = _SIZE
                else:  # _TRAILER: field lines (ignored) up to a blank line
                    i = buf.find(b"\r\n", pos)
                    if i < 0:
                        if end - pos > self._max_line:
                            raise UpstreamProtocolError("upstream sent an over-long trailer")
                        break
                    if i == pos:
                        pos += 2
                        self.done = True
                        break
                    pos = i + 2
        except UpstreamProtocolError as e:
            self.error = e
            pos = end
        self._left = left
        self._buf = buf[pos:] if pos < end else b""
        if not parts:
            if self.error is not None:
                raise self.error
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)


def _chunk_size(line: bytes) -> int:
    raw = line
    i = line.find(b";")
    if i >= 0:
        line = line[:i]  # a chunk extension: ignored
    line = line.rstrip(b" \t")
    if not line or len(line) > _MAX_SIZE_DIGITS or line.strip(_HEX):
        raise UpstreamProtocolError("upstream sent a bad chunk size")
    size = int(line, 16)
    if i < 0 and len(_SIZES) < _SIZES_MAX:
        _SIZES[raw] = size
    return size


class H1Exchange:
    """One response on an H1Connection: the head, then body chunks pulled by the caller."""

    __slots__ = ("_conn", "done", "headers", "http_version", "status")

    def __init__(self, conn: H1Connection, status: int, headers: list[Header], version: str):
        self._conn = conn
        self.status = status
        self.headers = headers
        self.http_version = version
        self.done = False

    async def receive(self) -> bytes:
        return await self.receive_within(None) or b""

    async def receive_within(self, quiet_s: float | None) -> bytes | None:
        """receive(), or None when nothing arrived for quiet_s (the exchange stays open)."""
        if self.done:
            return b""
        try:
            got = await self._conn._receive(quiet_s)
        except BaseException:
            self.done = True
            await self._conn._drop()
            raise
        if got is None:
            return None
        data, ended = got
        if ended:
            self.done = True
        return data

    async def aclose(self) -> None:
        """Abandon what is left of the body: the connection is closed, not reused."""
        if not self.done:
            self.done = True
            await self._conn._drop()

    def __repr__(self) -> str:
        return f"<H1Exchange {self.status} on #{self._conn.id}{' done' if self.done else ''}>"

