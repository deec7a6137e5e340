"""compat.fast_paths() is honoured: with it off, no fast-path function of the inbound drivers
(h1_server, h2_server) is called, and the same requests get the same answers.

Each fast-path function the drivers call is replaced by a counting wrapper. With the switch on,
the counts prove the wrappers sit where the drivers look them up (so the test can fail); with it
off, every count stays 0 while pipelined fast heads, Content-Length and chunked bodies are
answered.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from anyio.abc import UNIXSocketStream

from rawgate import compat
from rawgate.config import Config
from rawgate.conn import ConnInfo, ServerState
from rawgate.http import h1_server, h2_server
from rawgate.http.hpack_encode import ResponseEncoder
from rawgate.seam import Header, Request, ResponseSink
from tests.helpers_h1 import h1_serving
from tests.helpers_h2 import H2Client

H1_FAST = (
    "fast_head",
    "h11_take",
    "h11_unparsed",
    "h11_next_cycle",
    "h11_drop_unparsed",
    "h11_header_items",
)

RAW = b"".join(
    [
        b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\none",
        b"POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /d HTTP/1.1\r\nHost: t\r\nX-A: 1\n\r\n",
    ]
)


class _Echo:
    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        await sink.respond(200, [(b"content-type", b"text/plain")], request.body or b"-")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    before = compat.fast_paths()
    counts = dict.fromkeys(H1_FAST, 0)
    for name in H1_FAST:
        real = getattr(h1_server, name)

        def wrapper(*a: Any, _real: Any = real, _name: str = name) -> Any:
            counts[_name] += 1
            return _real(*a)

        monkeypatch.setattr(h1_server, name, wrapper)
    yield counts
    compat.set_fast_paths(before)


async def _serve() -> list[tuple[int, bytes]]:
    async with h1_serving(_Echo()) as c:
        await c.send(RAW)
        rs = await c.responses(4)
    return [(r.status, r.body) for r in rs]


EXPECTED = [(200, b"one"), (200, b"two"), (200, b"-"), (200, b"-")]


@pytest.mark.anyio
async def test_h1_fast_paths_on_are_used(calls: dict[str, int]) -> None:
    compat.set_fast_paths(True)
    assert await _serve() == EXPECTED
    assert calls["fast_head"] and calls["h11_take"] and calls["h11_unparsed"]
    assert calls["h11_next_cycle"] and calls["h11_drop_unparsed"] and calls["h11_header_items"]


@pytest.mark.anyio
async def test_h1_fast_paths_off_are_never_called(calls: dict[str, int]) -> None:
    compat.set_fast_paths(False)
    assert await _serve() == EXPECTED
    assert calls == dict.fromkeys(H1_FAST, 0)


# ---- HTTP/2 server ------------------------------------------------------------------------------


@pytest.fixture
def h2_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts of the h2 server's fast paths: compat.dispatch_frame (the dispatch override) and
    ResponseEncoder.encode (rawgate's HPACK encoder)."""
    before = compat.fast_paths()
    counts = {"dispatch_frame": 0, "encode": 0}
    dispatch = compat.dispatch_frame

    def counted_dispatch(conn: Any, frame: Any) -> Any:
        counts["dispatch_frame"] += 1
        return dispatch(conn, frame)

    class Counted(ResponseEncoder):
        def encode(self, headers: list[Header], huffman: bool = True) -> bytes:
            counts["encode"] += 1
            return super().encode(headers, huffman)

    monkeypatch.setattr(compat, "dispatch_frame", counted_dispatch)
    monkeypatch.setattr(h2_server, "ResponseEncoder", Counted)
    yield counts
    compat.set_fast_paths(before)


async def _serve_h2() -> list[tuple[int, bytes]]:
    a, b = socket.socketpair()
    server, client = await UNIXSocketStream.from_socket(a), await UNIXSocketStream.from_socket(b)
    out: list[tuple[int, bytes]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            h2_server.serve_h2, server, _Echo(), Config(), ConnInfo(("127.0.0.1", 1)), ServerState()
        )
        async with H2Client(client) as c:
            for body in (b"one", b""):
                r = await c.request("POST", "/x", body=body)
                out.append((r.status, r.body))
        with anyio.fail_after(5):
            await client.aclose()
    return out


@pytest.mark.anyio
async def test_h2_fast_paths_on_are_used(h2_calls: dict[str, int]) -> None:
    compat.set_fast_paths(True)
    assert await _serve_h2() == [(200, b"one"), (200, b"-")]
    assert h2_calls["dispatch_frame"] and h2_calls["encode"]


@pytest.mark.anyio
async def test_h2_fast_paths_off_are_never_called(h2_calls: dict[str, int]) -> None:
    compat.set_fast_paths(False)
    assert await _serve_h2() == [(200, b"one"), (200, b"-")]
    assert h2_calls == {"dispatch_frame": 0, "encode": 0}
