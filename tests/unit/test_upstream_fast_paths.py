"""The fast-path switch on the upstream side (compat.fast_paths(), `[server] fast_paths`,
RAWGATE_SERVER_FAST_PATHS): read once per connection / decoder; with it off the h2 client runs
on h2's public API (plus the draining GOAWAY) and the SSE decoder on its general parser, and no
fast-path code is entered. With it on the same exchange does enter them, so the counts below
can fail."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rawgate import compat
from rawgate.compat import H2ClientConnection, H2ClientFastConnection
from rawgate.config import UpstreamConfig
from rawgate.translate.sse import SSEDecoder
from rawgate.upstream import h2_client, h2_data
from rawgate.upstream.client import UpstreamClient
from rawgate.upstream.h2_data import FastH2
from tests.helpers_backend import H2Origin, MockBackend, OriginRequest, config, timeouts

URL = "http://origin/v1beta/models/m:streamGenerateContent?alt=sse"
EVENTS = [b'{"n":%d,"text":"%s"}' % (i, b"x" * (i * 37 % 200)) for i in range(40)]


@pytest.fixture(params=[True, False], ids=["on", "off"])
def fast(request: pytest.FixtureRequest) -> Iterator[bool]:
    before = compat.fast_paths()
    compat.set_fast_paths(request.param)
    try:
        yield request.param
    finally:
        compat.set_fast_paths(before)


def _count(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, hits: dict[str, int]) -> None:
    real: Callable[..., Any] = getattr(owner, name)
    key = f"{getattr(owner, '__name__', owner)}.{name}"
    hits[key] = 0

    def counted(*a: Any, **kw: Any) -> Any:
        hits[key] += 1
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, counted)


@pytest.mark.anyio
async def test_the_switch_decides_whether_fast_path_code_runs(
    fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    hits: dict[str, int] = {}
    _count(monkeypatch, FastH2, "receive_data", hits)
    _count(monkeypatch, H2ClientFastConnection, "_receive_frame", hits)
    _count(monkeypatch, h2_data, "h2_take_data", hits)
    _count(monkeypatch, h2_data, "h2_data_ready", hits)
    _count(monkeypatch, h2_client, "h2_has_output", hits)
    _count(monkeypatch, SSEDecoder, "_feed_fast", hits)

    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [(b"content-type", b"text/event-stream")])
        for ev in EVENTS:  # Gemini's framing: one `data:` line per event, CRLF CRLF
            await reply.send(b"data: " + ev + b"\r\n\r\n")
        await reply.end(b"")

    got: list[bytes] = []
    async with MockBackend() as net:
        origin = H2Origin(app)
        net.add("origin", 80, origin.serve)
        cfg = config(cleartext_http2="prior_knowledge")
        async with UpstreamClient(cfg, timeouts(), backend=net) as client:
            r = await client.request("GET", URL, [])
            assert r.status == 200
            (pool,) = client.pools
            (conn,) = pool.conns
            assert isinstance(conn, h2_client.H2Connection)
            assert isinstance(conn._h2, FastH2) is fast
            assert isinstance(conn._h2, H2ClientConnection)  # GOAWAY drains either way
            dec = SSEDecoder()
            async for chunk in r.aiter_bytes():
                got += dec.feed(chunk)
            got += dec.close()
    assert got == EVENTS  # the same answer both ways
    entered = {k: n for k, n in hits.items() if n}
    if fast:
        assert set(entered) == set(hits), f"fast path code not entered: {hits}"
    else:
        assert not entered, f"fast path code ran with fast paths off: {entered}"


def test_new_h2_follows_the_switch_unless_told(fast: bool) -> None:
    assert isinstance(h2_client.new_h2(UpstreamConfig(), 10), FastH2) is fast
    assert isinstance(h2_client.new_h2(UpstreamConfig(), 10, True), FastH2)
    assert type(h2_client.new_h2(UpstreamConfig(), 10, False)) is H2ClientConnection


def test_sse_decoder_reads_the_switch_once_per_decoder(fast: bool) -> None:
    dec = SSEDecoder()
    compat.set_fast_paths(not fast)  # a later change does not reach a decoder already made
    assert dec.feed(b"data: {}\r\n\r\n") == [b"{}"]
    assert dec._fast is fast
