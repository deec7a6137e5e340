"""compat.fast_paths() is honoured: with it off, no fast-path function of the inbound drivers is
called, and the same requests get the same answers.

Each fast-path function the drivers call is replaced by a counting wrapper. With the switch on,
the counts prove the wrappers sit where the drivers look them up (so the test can fail); with it
off, every count stays 0 while pipelined fast heads, Content-Length and chunked bodies are
answered.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from rawgate import compat
from rawgate.http import h1_server
from rawgate.seam import Request, ResponseSink
from tests.helpers_h1 import h1_serving

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
