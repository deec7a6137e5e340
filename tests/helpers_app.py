"""Test helpers for anything behind the Request/ResponseSink seam, with no sockets.

- `make_request(method, target, headers, body)` builds a rawgate.seam.Request the way the HTTP
  drivers do (path and query from rawgate.http.target.parse_target, lower-case header names, bytes).
- `RecordingSink` implements rawgate.seam.ResponseSink in memory and checks the call order a
  driver would enforce (start once, nothing after end). `disconnect_after` makes `send()` raise
  ClientDisconnected after that many body pieces, like a client that goes away mid-stream.
- `call(app, ...)` = make_request + a fresh RecordingSink + `await app(request, sink)`.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from rawgate.seam import App, ClientDisconnected, Request
from rawgate.http.target import parse_target

__all__ = ["RecordingSink", "call", "make_request"]

HeaderLike = tuple[str | bytes, str | bytes]


def _b(v: str | bytes) -> bytes:
    # latin-1 maps every code point < 256 to one byte: tests can write "K\xe9" for a raw 0xE9.
    return v if isinstance(v, bytes) else v.encode("latin-1")


def make_request(
    method: str = "GET",
    target: str | bytes = "/",
    headers: Iterable[HeaderLike] = (),
    body: bytes = b"",
    *,
    http_version: str = "1.1",
    scheme: str = "http",
) -> Request:
    """A Request as a driver would build it. Raises BadRequest for targets a driver rejects."""
    raw = _b(target)
    path, query = parse_target(raw)
    hdrs = [(_b(k).lower(), _b(v)) for k, v in headers]
    return Request(
        method,
        raw,
        path,
        query,
        hdrs,
        body,
        http_version=http_version,
        scheme=scheme,
        client=("127.0.0.1", 50000),
    )


class RecordingSink:
    """An in-memory ResponseSink: records status, headers and body pieces."""

    def __init__(self, disconnect_after: int | None = None) -> None:
        self._status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.ended = False
        self.disconnect_after = disconnect_after

    # -- the ResponseSink protocol --

    @property
    def started(self) -> bool:
        return self._status != 0

    @property
    def bytes_sent(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def status(self) -> int:
        return self._status

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        assert not self.started, "response started twice"
        assert 100 <= status <= 599, status
        self._status = status
        self.headers = list(headers)

    async def send(self, data: bytes) -> None:
        assert self.started and not self.ended, "send() outside start()..end()"
        if self.disconnect_after is not None and len(self.chunks) >= self.disconnect_after:
            raise ClientDisconnected("recording sink: simulated disconnect")
        self.chunks.append(bytes(data))

    async def end(self, data: bytes = b"") -> None:
        assert self.started and not self.ended, "end() outside a started response"
        if data:
            self.chunks.append(bytes(data))
        self.ended = True

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        await self.start(status, headers)
        await self.end(body)

    # -- inspection --

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> object:
        return orjson.loads(self.body)

    def header(self, name: str | bytes) -> bytes | None:
        """First value of a response header (case-insensitive name), or None."""
        key = _b(name).lower()
        for k, v in self.headers:
            if k.lower() == key:
                return v
        return None

    def header_all(self, name: str | bytes) -> list[bytes]:
        key = _b(name).lower()
        return [v for k, v in self.headers if k.lower() == key]


async def call(
    app: App,
    method: str = "GET",
    target: str | bytes = "/",
    headers: Iterable[HeaderLike] = (),
    body: bytes = b"",
    *,
    http_version: str = "1.1",
) -> RecordingSink:
    """Run one request through `app` and return the sink that recorded the answer."""
    sink = RecordingSink()
    await app(make_request(method, target, headers, body, http_version=http_version), sink)
    return sink
