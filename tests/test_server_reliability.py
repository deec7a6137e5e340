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
from typing import Any

import anyio
import msgspec
import pytest

from rawgate import listener
from rawgate.config import Config
from rawgate.events import Request, ResponseSink
from rawgate.respond import json_response

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
