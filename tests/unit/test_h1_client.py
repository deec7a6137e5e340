"""The HTTP/1.1 upstream connection through UpstreamClient, over the in-memory MockBackend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import h11
import pytest

from rawgate.errors import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamHeadersTimeout,
    UpstreamPoolTimeout,
    UpstreamProtocolError,
    UpstreamReadTimeout,
    UpstreamWriteTimeout,
)
from rawgate.upstream.client import UpstreamClient
from tests.helpers_backend import (
    H1Origin,
    MockBackend,
    OriginRequest,
    config,
    timeouts,
    wait_until,
)

pytestmark = pytest.mark.anyio

URL = "http://origin/v1beta/models/m:generateContent"
JSON = [(b"content-type", b"application/json")]


class Env:
    def __init__(self, net: MockBackend, origin: H1Origin, client: UpstreamClient) -> None:
        self.net = net
        self.origin = origin
        self.client = client

    @property
    def pool(self) -> Any:
        (pool,) = self.client.pools
        return pool


def h1_client(net: MockBackend, t: dict[str, Any] | None = None, **cfg: Any) -> UpstreamClient:
    cfg.setdefault("http2", False)
    return UpstreamClient(config(**cfg), timeouts(**(t or {})), backend=net)


@asynccontextmanager
async def env(app: Any = None, t: dict[str, Any] | None = None, **cfg: Any) -> AsyncIterator[Env]:
    async with MockBackend() as net:
        origin = H1Origin(app) if app else H1Origin()
        net.add("origin", 80, origin.serve)
        async with h1_client(net, t, **cfg) as client:
            yield Env(net, origin, client)


@pytest.fixture
async def e() -> AsyncIterator[Env]:
    async with env() as x:
        yield x


async def test_keep_alive_reuses_one_connection(e: Env) -> None:
    for i in range(3):
        async with await e.client.request("POST", URL, JSON, b"{%d}" % i) as r:
            assert r.status == 200
            assert r.http_version == "HTTP/1.1"
            assert r.header(b"content-type") == b"text/plain"
            assert await r.read() == b"/v1beta/models/m:generateContent|{%d}" % i
    assert e.origin.stats.connections == 1
    assert e.origin.per_connection == [3]
    assert repr(e.pool) == (
        "<OriginPool http://origin h1 conns=[<H1Connection #1 IDLE requests=3>] waiters=0>"
    )


async def test_request_head_is_what_h11_expects() -> None:
    seen: list[OriginRequest] = []

    async def app(req: OriginRequest, reply: Any) -> None:
        seen.append(req)
        await reply.respond(204, [], b"")

    async with env(app) as e:
        key = [(b"x-goog-api-key", b"k")]
        r = await e.client.request("POST", "http://origin?alt=sse", key, b"")
        assert r.status == 204 and await r.read() == b""
    (req,) = seen
    assert req.path == b"/?alt=sse"
    assert req.header(b"host") == b"origin"
    assert req.header(b"x-goog-api-key") == b"k"
    assert req.header(b"content-length") == b"0"


async def test_connection_close_from_the_server_is_not_reused() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.respond(200, [(b"connection", b"close")], b"bye")

    async with env(app) as e:
        for _ in range(2):
            r = await e.client.request("GET", URL, [])
            assert await r.read() == b"bye"
        assert e.origin.stats.connections == 2
        assert "conns=[]" in repr(e.pool)


async def test_abandoned_body_closes_the_connection() -> None:
    go = anyio.Event()

    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        await reply.send(b"first")
        if req.path == b"/slow":
            await go.wait()
        await reply.end(b"last")

    async with env(app) as e:
        r = await e.client.request("GET", "http://origin/slow", [])
        assert await r.aiter_bytes().__anext__() == b"first"  # a chunk before the end
        await r.aclose()
        assert "conns=[]" in repr(e.pool)  # never back in the pool half-read
        go.set()
        r = await e.client.request("GET", "http://origin/fast", [])
        assert await r.read() == b"firstlast"
        assert e.origin.stats.connections == 2


async def test_streaming_hands_over_chunks_as_they_arrive() -> None:
    steps = [anyio.Event() for _ in range(3)]

    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [(b"content-type", b"text/event-stream")])
        for i, ev in enumerate(steps):
            await reply.send(b"data: %d\r\n\r\n" % i)
            with anyio.fail_after(5):
                await ev.wait()  # the next chunk only once the client saw this one
        await reply.end()

    async with env(app) as e:
        r = await e.client.request("POST", URL, JSON, b"{}")
        got = []
        async for chunk in r.aiter_bytes():
            got.append(chunk)
            steps[len(got) - 1].set()
        assert got == [b"data: 0\r\n\r\n", b"data: 1\r\n\r\n", b"data: 2\r\n\r\n"]
        assert "IDLE" in repr(e.pool)


async def test_chunks_that_arrived_together_come_as_one_piece() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        # Three chunked-encoding chunks and the end in one socket write.
        await reply.start(200, [])
        h = reply._h
        data = [h.send(h11.Data(data=d)) for d in (b"ab\n", b"cd", b"e")]
        await reply.raw(b"".join([*data, h.send(h11.EndOfMessage())]))

    async with env(app) as e:
        r = await e.client.request("GET", URL, [])
        got = [chunk async for chunk in r.aiter_bytes()]
        assert got == [b"ab\ncde"]
        assert "IDLE" in repr(e.pool)  # the exchange ended cleanly: reusable
        r = await e.client.request("GET", URL, [])
        assert await r.read() == b"ab\ncde"
        assert e.origin.stats.connections == 1


async def test_data_before_a_broken_chunk_is_delivered_before_the_error() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.raw(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await reply.raw(b"2\r\nab\r\n1\r\nc\r\nzz\r\n")  # "zz" is no chunk size

    async with env(app) as e:
        r = await e.client.request("GET", URL, [])
        body = r.aiter_bytes()
        assert await body.__anext__() == b"abc"
        with pytest.raises(UpstreamProtocolError, match="bad chunk size"):
            await body.__anext__()
        assert "conns=[]" in repr(e.pool)


async def test_server_closed_idle_connection_is_detected_and_replaced(e: Env) -> None:
    assert await (await e.client.request("GET", URL, [])).read()
    e.net.server_ends[0].reset()  # the server dropped the keep-alive connection meanwhile
    r = await e.client.request("GET", URL, [])
    assert r.status == 200 and await r.read()
    assert e.origin.stats.connections == 2
    assert "#2 IDLE" in repr(e.pool) and "#1" not in repr(e.pool)


async def test_stale_connection_failing_the_first_write_is_retried_once(e: Env) -> None:
    assert await (await e.client.request("GET", URL, [])).read()
    e.net.client_ends[0].is_readable = lambda: False  # type: ignore[method-assign]
    # ^ the peer's reset is not visible before the write (it races with it)
    e.net.server_ends[0].reset()
    r = await e.client.request("POST", URL, JSON, b"{}")
    assert await r.read() == b"/v1beta/models/m:generateContent|{}"
    assert e.origin.stats.connections == 2
    assert e.origin.stats.requests == 2  # the failed attempt never reached the server


async def test_max_connections_bounds_concurrency_and_waiters_get_served() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await anyio.sleep(0.01)
        await reply.respond(200, [], b"ok")

    async with env(app, max_connections=2) as e:

        async def one() -> None:
            r = await e.client.request("GET", URL, [])
            assert await r.read() == b"ok"

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(one)
        assert e.origin.stats.connections == 2
        assert e.origin.stats.max_active == 2
        assert e.origin.stats.requests == 6


async def test_pool_timeout_when_every_connection_is_busy() -> None:
    async with env(max_connections=1, t={"upstream_pool_s": 0.05}) as e:
        held = await e.client.request("GET", URL, [])
        with pytest.raises(UpstreamPoolTimeout):
            await e.client.request("GET", URL, [])
        assert "waiters=0" in repr(e.pool)
        await held.read()
        assert await (await e.client.request("GET", URL, [])).read()


async def test_idle_connections_expire() -> None:
    async with env(keepalive_expiry_s=0.01) as e:
        await (await e.client.request("GET", URL, [])).read()
        await anyio.sleep(0.05)
        await (await e.client.request("GET", URL, [])).read()
        assert e.origin.stats.connections == 2


async def test_sweeper_closes_expired_connections_without_traffic() -> None:
    async with env(keepalive_expiry_s=0.2) as e:
        await (await e.client.request("GET", URL, [])).read()
        await wait_until(lambda: not e.pool.conns and not e.origin.stats.open_connections)


async def test_max_keepalive_keeps_only_that_many_idle() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await anyio.sleep(0.01)
        await reply.respond(200, [], b"ok")

    async with env(app, max_connections=3, max_keepalive_connections=1) as e:

        async def one() -> None:
            await (await e.client.request("GET", URL, [])).read()

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
        assert e.origin.stats.connections == 3
        assert repr(e.pool).count("IDLE") == 1


async def test_connect_refused_is_a_connect_error() -> None:
    async with MockBackend() as net, h1_client(net) as client:
        with pytest.raises(UpstreamConnectError, match="cannot connect to nowhere:80"):
            await client.request("GET", "http://nowhere/", [])
        assert "conns=[]" in repr(client)


async def test_connect_timeout() -> None:
    async with MockBackend() as net, h1_client(net, {"upstream_connect_s": 0.05}) as client:
        net.hang.add(("blackhole", 80))
        with pytest.raises(UpstreamConnectTimeout):
            await client.request("GET", "http://blackhole/", [])
        assert "conns=[]" in repr(client)


async def test_headers_timeout_closes_the_connection() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await anyio.sleep(10)

    async with env(app, t={"upstream_headers_s": 0.05}) as e:
        with pytest.raises(UpstreamHeadersTimeout):
            await e.client.request("GET", URL, [])
        assert "conns=[]" in repr(e.pool)


async def test_read_idle_timeout_is_a_gap_not_a_total() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        for _ in range(6):  # 6 x 30 ms = longer than the 100 ms idle limit, in small gaps
            await anyio.sleep(0.03)
            await reply.send(b"x")
        if req.path == b"/stall":
            await anyio.sleep(10)
        await reply.end()

    async with env(app, t={"upstream_read_idle_s": 0.1}) as e:
        r = await e.client.request("GET", "http://origin/ok", [])
        assert await r.read() == b"xxxxxx"
        r = await e.client.request("GET", "http://origin/stall", [])
        with pytest.raises(UpstreamReadTimeout):
            await r.read()
        assert "#2" not in repr(e.pool)  # the stalled connection was dropped


async def test_receive_within_reports_quiet_and_keeps_the_idle_limit() -> None:
    go = anyio.Event()

    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        await reply.send(b"one")
        await go.wait()
        await reply.send(b"two")
        await anyio.sleep(10)  # then silent past the idle limit
        await reply.end()

    async with env(app, t={"upstream_read_idle_s": 0.3}) as e:
        r = await e.client.request("GET", URL, [])
        assert await r.receive_within(1.0) == b"one"
        assert await r.receive_within(0.01) is None  # quiet: the body stays open
        go.set()
        assert await r.receive_within(1.0) == b"two"
        quiet = 0
        with pytest.raises(UpstreamReadTimeout):
            for _ in range(1000):  # 10 ms quiet periods do not reset the 300 ms idle limit
                assert await r.receive_within(0.01) is None
                quiet += 1
        assert quiet >= 1


async def test_write_timeout_when_the_server_does_not_read() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.respond(200, [], b"ok")

    async with env(app, t={"upstream_write_s": 0.05}) as e:
        await (await e.client.request("GET", URL, [])).read()
        e.net.client_ends[0]._tx.limit = 0  # the server's receive buffer is full
        with pytest.raises(UpstreamWriteTimeout):
            await e.client.request("POST", URL, JSON, b"x" * 100_000)
        assert "conns=[]" in repr(e.pool)


async def test_eof_mid_body_is_upstream_closed() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [(b"content-length", b"100")])
        await reply.send(b"only ten b")
        await reply.abort()

    async with env(app) as e:
        r = await e.client.request("GET", URL, [])
        with pytest.raises(UpstreamClosed):
            await r.read()
        assert "conns=[]" in repr(e.pool)


async def test_eof_before_any_answer_is_upstream_closed() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.abort()

    async with env(app) as e:
        with pytest.raises(UpstreamClosed, match="before answering"):
            await e.client.request("GET", URL, [])


async def test_garbage_answer_is_a_protocol_error() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.raw(b"SPDY/9 banana\r\n\r\n")
        await reply.abort()

    async with env(app) as e:
        with pytest.raises(UpstreamProtocolError):
            await e.client.request("GET", URL, [])


async def test_read_is_bounded() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        for _ in range(10):
            await reply.send(b"y" * 1000)
        await reply.end()

    async with env(app) as e:
        r = await e.client.request("GET", URL, [])
        with pytest.raises(UpstreamProtocolError, match="exceeds 4096 bytes"):
            await r.read(max_bytes=4096)
        assert "conns=[]" in repr(e.pool)
        r = await e.client.request("GET", URL, [])
        assert len(await r.read()) == 10_000


async def test_invalid_header_value_never_echoes_it(e: Env) -> None:
    with pytest.raises(UpstreamProtocolError) as info:
        await e.client.request("GET", URL, [(b"x-goog-api-key", b"secret\r\nx: y")])
    assert b"secret" not in str(info.value).encode()
    assert "waiters=0" in repr(e.pool) and "ACTIVE" not in repr(e.pool)


async def test_caller_cancelled_mid_body_closes_the_connection_and_pool_stays_healthy() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        await reply.send(b"chunk")
        for _ in range(1000 if req.path == b"/forever" else 0):
            await anyio.sleep(0.01)
            await reply.send(b".")  # fails once the client is gone
        await reply.end()

    async with env(app) as e:
        r = await e.client.request("GET", "http://origin/forever", [])
        with anyio.move_on_after(0.05):
            await r.read()
        assert "conns=[]" in repr(e.pool) and "waiters=0" in repr(e.pool)
        await wait_until(lambda: not e.origin.stats.open_connections)  # the origin saw it go
        assert e.origin.stats.cancelled == 1
        r = await e.client.request("GET", "http://origin/now", [])
        assert await r.read() == b"chunk"


async def test_caller_cancelled_before_the_head_closes_the_connection() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await anyio.sleep(10)

    async with env(app) as e:
        with anyio.move_on_after(0.05):
            await e.client.request("GET", URL, [])
        assert "conns=[]" in repr(e.pool) and "waiters=0" in repr(e.pool)


async def test_cleartext_auto_falls_back_to_http1_once_per_origin() -> None:
    async with MockBackend() as net:
        origin = H1Origin()
        net.add("origin", 80, origin.serve)
        async with UpstreamClient(config(), timeouts(), backend=net) as client:
            for _ in range(2):
                r = await client.request("GET", URL, [])
                assert r.http_version == "HTTP/1.1" and await r.read()
            # the h2c probe, then one HTTP/1.1 connection reused: three would mean re-probing
            assert len(net.connects) == 2
            assert "h1 conns=[<H1Connection #1 IDLE requests=2>]" in repr(client)


async def test_client_must_be_entered() -> None:
    client = UpstreamClient(config(), timeouts())
    with pytest.raises(RuntimeError, match="async with"):
        await client.request("GET", URL, [])


async def test_errors_leave_the_client_block_unwrapped() -> None:
    async with MockBackend() as net:
        with pytest.raises(UpstreamConnectError):  # not an ExceptionGroup
            async with h1_client(net) as client:
                await client.request("GET", "http://nowhere/", [])


@pytest.mark.parametrize(
    "url", ["ftp://origin/x", "origin/x", "http:///x", "http://u:secret@origin/", "http://o:99999/"]
)
async def test_bad_upstream_urls_are_clear_errors_without_secrets(url: str) -> None:
    async with MockBackend() as net, h1_client(net) as client:
        with pytest.raises(UpstreamConnectError) as info:
            await client.request("GET", url + "?key=secret", [])
        assert "secret" not in str(info.value)


async def test_non_ascii_target_is_percent_encoded() -> None:
    seen: list[bytes] = []

    async def app(req: OriginRequest, reply: Any) -> None:
        seen.append(req.path)
        await reply.respond(200, [], b"")

    async with env(app) as e:
        await (await e.client.request("GET", "http://origin/models/gémini?alt=sse", [])).read()
    assert seen == [b"/models/g%C3%A9mini?alt=sse"]
