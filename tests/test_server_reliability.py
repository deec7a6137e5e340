"""Inbound-server reliability regressions (issue 12), each in the attack's shape at suite size.

Memory is asserted as bytes still held (tracemalloc, gc disabled so no collection can hide a
reference cycle) or bytes buffered, CPU as bytes scanned; never as wall time. Real loopback
sockets (127.0.0.1, port 0) unless the item is about parsing bytes.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, cast

import anyio
import anyio.lowlevel
import h11
import msgspec
import pytest
from hyperframe.frame import GoAwayFrame

from rawgate import h1_server, listener
from rawgate.config import Config
from rawgate.conn import ConnInfo, ServerState
from rawgate.events import Request, ResponseSink
from rawgate.respond import json_response
from tests.helpers_h1 import h1_serving
from tests.helpers_h2 import FrameFactory, FrameReader

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def make_cfg(**sections: dict[str, Any]) -> Config:
    cfg = Config()
    for name, values in sections.items():
        cfg = msgspec.structs.replace(
            cfg, **{name: msgspec.structs.replace(getattr(cfg, name), **values)}
        )
    return cfg


class EchoApp:
    """Answers with the body length; counts what reached it."""

    def __init__(self) -> None:
        self.bodies: list[int] = []

    async def __call__(self, req: Request, sink: ResponseSink) -> None:
        self.bodies.append(len(req.body))
        await json_response(sink, 200, b'{"n":%d}' % len(req.body))


@asynccontextmanager
async def serving(app: Any, cfg: Config | None = None) -> AsyncIterator[listener.Server]:
    async with listener.open_server(app, cfg or Config(), host="127.0.0.1", port=0) as server:
        yield server
    assert server.connections == 0


@contextmanager
def no_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


async def wait_idle(server: listener.Server) -> None:
    for _ in range(1000):  # bounded: 10 s at most
        if not server.connections:
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"{server.connections} connection(s) still open")


# ---- 1. aborted HTTP/1.1 uploads are freed without a collection -----------------------------


async def test_aborted_h1_uploads_are_freed_without_gc() -> None:
    size = 2 * MiB
    n = 6
    app = EchoApp()
    async with serving(app) as server:
        port = server.port
        head = (
            b"POST /up HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % size
        )
        body = b"x" * (size - 1)  # one byte short, then close

        async def abort_one() -> None:
            s = await anyio.connect_tcp("127.0.0.1", port)
            await s.send(head + body)
            await s.aclose()

        await abort_one()  # warm up: first-use allocations are not a leak
        await wait_idle(server)
        with no_gc():
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                for _ in range(n):
                    await abort_one()
                await wait_idle(server)
                held = tracemalloc.get_traced_memory()[0] - base
            finally:
                tracemalloc.stop()
        print(f"\nbytes still held after {n} aborted {size}-byte uploads: {held}")
        assert held < size // 2, held
    assert app.bodies == []


# ---- 5. a slow HTTP/1.1 head is scanned once, not once per read -----------------------------


class _ScanCount:
    """Bytes offered to the head parsers: rawgate's fast-path regex, h11, the end-of-head search."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fast = self.h11 = self.search = self.calls = 0
        fast = h1_server._fast_head
        next_event = h11.Connection.next_event
        count = self

        def fast_head(data: Any) -> Any:
            count.fast += len(data)
            count.calls += 1
            return fast(data)

        def h11_next_event(h: h11.Connection) -> Any:
            count.h11 += len(h._receive_buffer)
            count.calls += 1
            return next_event(h)

        monkeypatch.setattr(h1_server, "_fast_head", fast_head)
        monkeypatch.setattr(h11.Connection, "next_event", h11_next_event)
        search = getattr(h1_server, "_head_end", None)
        if search is not None:

            def head_end(data: Any, start: int) -> Any:
                count.search += len(data) - start
                count.calls += 1
                return search(data, start)

            monkeypatch.setattr(h1_server, "_head_end", head_end)

    @property
    def total(self) -> int:
        return self.fast + self.h11 + self.search


def _h1_conn(cfg: Config) -> Any:
    return h1_server._Conn(
        cast(Any, None), EchoApp(), cfg, ConnInfo(client=("127.0.0.1", 1)), ServerState()
    )


@pytest.mark.parametrize("extra", [b"", b"transfer-encoding: chunked\r\n"])
async def test_slow_head_is_scanned_in_linear_bytes(
    monkeypatch: pytest.MonkeyPatch, extra: bytes
) -> None:
    # A 60 KB head in 3-byte pieces (the fast path's shape, and one that needs h11).
    filler = b"".join(b"x-f%d: %s\r\n" % (i, b"v" * 50) for i in range(1000))
    head = b"GET /x HTTP/1.1\r\nhost: t\r\n" + extra + filler + b"\r\n"
    if extra:
        head += b"0\r\n\r\n"
    assert 55_000 < len(head) < 64 * 1024
    count = _ScanCount(monkeypatch)
    conn = _h1_conn(make_cfg(limits={"max_header_count": 1100}))
    for i in range(0, len(head), 3):
        conn._feed(head[i : i + 3])
    assert len(conn._queue) == 1 and conn._queue[0].error is None
    print(f"\n{len(head)}-byte head in 3-byte pieces: {count.total} bytes scanned"
          f" (fast {count.fast}, h11 {count.h11}, search {count.search}), {count.calls} calls")
    assert count.total < 4 * len(head)


# ---- smaller HTTP/1.1 items -------------------------------------------------------------------


@pytest.mark.parametrize("piece", [0, 1000, 7])
async def test_long_target_gets_414_however_the_bytes_arrive(piece: int) -> None:
    raw = b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\nhost: t\r\n\r\n"
    app = EchoApp()
    async with h1_serving(app, Config()) as c:
        if not piece:
            await c.send(raw)
        else:
            for i in range(0, len(raw), piece):
                await c.send(raw[i : i + piece])
                await anyio.lowlevel.checkpoint()  # the server reads each piece on its own
        (r,) = await c.responses(1)
    assert r.status == 414, r
    assert app.bodies == []


async def test_obs_folded_header_is_400() -> None:
    raw = (
        b"POST /x HTTP/1.1\r\nhost: t\r\nauthorization: Bearer\r\n sk-key\r\n"
        b"content-length: 0\r\n\r\n"
    )
    app = EchoApp()
    async with h1_serving(app, Config()) as c:
        await c.send(raw)
        (r,) = await c.responses(1)
    assert r.status == 400 and b"folding" in r.body
    assert app.bodies == []


# ---- 10. a connection that never completes a request head gets the head timeout ------------


async def _held_until_closed(port: int, first: bytes) -> bytes:
    """Everything the server sends after `first` until it closes (bounded: 10 s)."""
    got = bytearray()
    s = await anyio.connect_tcp("127.0.0.1", port)
    async with s:
        await s.send(first)
        with anyio.fail_after(10):
            while True:
                try:
                    got += await s.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return bytes(got)


@pytest.mark.parametrize("proto", ["h2c", "h1"])
async def test_connection_without_a_request_head_gets_the_head_timeout(proto: str) -> None:
    # keep-alive 1 h: before the fix an h2c preface-only connection was held that long.
    cfg = make_cfg(timeouts={"header_read_s": 0.3, "keepalive_idle_s": 3600.0})
    first = FrameFactory().preface() if proto == "h2c" else b"GET / HT"
    async with serving(EchoApp(), cfg) as server:
        got = await _held_until_closed(server.port, first)
        await wait_idle(server)
    if proto == "h2c":
        goaway = FrameReader().feed(got)[-1]
        assert isinstance(goaway, GoAwayFrame) and goaway.error_code == 0
    else:
        assert got.startswith(b"HTTP/1.1 408 ")
