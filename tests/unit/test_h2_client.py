"""The HTTP/2 upstream connection through UpstreamClient, over the in-memory MockBackend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import trustme
from h2.errors import ErrorCodes

from rawgate.errors import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamHeadersTimeout,
    UpstreamProtocolError,
    UpstreamReadTimeout,
    UpstreamWriteTimeout,
)
from rawgate.upstream.client import UpstreamClient, UpstreamResponse
from rawgate.upstream.h2_client import H2Stream
from tests.helpers_backend import (
    H1Origin,
    H2Origin,
    MockBackend,
    OriginRequest,
    client_tls_context,
    config,
    server_tls_context,
    timeouts,
    tls_server,
    wait_until,
)

pytestmark = pytest.mark.anyio

URL = "http://origin/v1beta/models/m:streamGenerateContent?alt=sse"
KiB = 1024
CANCEL = int(ErrorCodes.CANCEL)


class Env:
    def __init__(self, net: MockBackend, origin: H2Origin, client: UpstreamClient) -> None:
        self.net = net
        self.origin = origin
        self.client = client

    @property
    def pool(self) -> Any:
        (pool,) = self.client.pools
        return pool

    async def settle(self) -> None:
        await anyio.wait_all_tasks_blocked()


@asynccontextmanager
async def env(
    app: Any = None,
    t: dict[str, Any] | None = None,
    origin_kw: dict[str, Any] | None = None,
    **cfg: Any,
) -> AsyncIterator[Env]:
    cfg.setdefault("cleartext_http2", "prior_knowledge")
    async with MockBackend() as net:
        origin = H2Origin(app, **(origin_kw or {})) if app else H2Origin(**(origin_kw or {}))
        net.add("origin", 80, origin.serve)
        async with UpstreamClient(config(**cfg), timeouts(**(t or {})), backend=net) as client:
            yield Env(net, origin, client)


def stream_of(r: UpstreamResponse) -> H2Stream:
    ex = r._ex
    assert isinstance(ex, H2Stream)
    return ex


async def test_requests_share_one_connection_and_repr_shows_streams() -> None:
    gate = anyio.Event()

    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [(b"content-type", b"text/event-stream")])
        await gate.wait()
        await reply.end(req.path)

    async with env(app) as e:
        rs = [await e.client.request("POST", URL, [], b"{}") for _ in range(3)]
        assert all(r.status == 200 and r.http_version == "HTTP/2" for r in rs)
        assert repr(e.pool) == (
            "<OriginPool http://origin h2 conns=[<H2Connection #1 ACTIVE streams=3/100 "
            "requests=3>] waiters=0>"
        )
        gate.set()
        for r in rs:
            assert await r.read() == b"/v1beta/models/m:streamGenerateContent?alt=sse"
        assert "IDLE streams=0/100 requests=3" in repr(e.pool)
        assert e.origin.stats.connections == 1


async def test_request_headers_and_body_arrive() -> None:
    seen: list[OriginRequest] = []

    async def app(req: OriginRequest, reply: Any) -> None:
        seen.append(req)
        await reply.respond(200, [], b"")

    async with env(app) as e:
        hdrs = [(b"x-goog-api-key", b"k"), (b"connection", b"keep-alive"), (b"host", b"x")]
        await (await e.client.request("POST", URL, hdrs, b"payload")).read()
    (req,) = seen
    assert req.method == b"POST" and req.body == b"payload"
    assert req.header(b":authority") == b"origin" and req.header(b":scheme") == b"http"
    assert req.header(b"x-goog-api-key") == b"k"
    assert req.header(b"connection") is None and req.header(b"host") is None
    assert req.header(b"content-length") == b"7"


async def test_peer_max_concurrent_streams_overflows_to_another_connection() -> None:
    gate = anyio.Event()

    async def app(req: OriginRequest, reply: Any) -> None:
        await gate.wait()
        await reply.respond(200, [], b"ok")

    async with env(app, origin_kw={"max_streams": 2}, max_connections=3) as e:
        results: list[bytes] = []

        async def one() -> None:
            results.append(await (await e.client.request("GET", URL, [])).read())

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(one)
            await wait_until(lambda: e.origin.stats.active == 5, "five in flight")
            await e.settle()
            assert repr(e.pool).count("streams=2/2") == 2
            assert "streams=1/2" in repr(e.pool)
            gate.set()
        assert results == [b"ok"] * 5
        assert e.origin.stats.connections == 3


async def test_streams_beyond_every_connection_wait_in_the_pool() -> None:
    gate = anyio.Event()

    async def app(req: OriginRequest, reply: Any) -> None:
        await gate.wait()
        await reply.respond(200, [], b"ok")

    async with env(app, origin_kw={"max_streams": 2}, max_connections=1) as e:
        got: list[bytes] = []

        async def one() -> None:
            got.append(await (await e.client.request("GET", URL, [])).read())

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)
            await wait_until(lambda: e.origin.stats.active == 2, "two in flight")
            await e.settle()
            assert "waiters=2" in repr(e.pool)
            gate.set()
        assert got == [b"ok"] * 4
        assert e.origin.stats.connections == 1


async def test_goaway_drains_in_flight_and_new_requests_use_a_fresh_connection() -> None:
    gate = anyio.Event()

    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        await reply.send(b"a")
        if req.path == b"/hold":
            await gate.wait()
        await reply.end(b"z")

    async with env(app) as e:
        held = await e.client.request("GET", "http://origin/hold", [])
        await e.origin.goaway_all()  # last_stream_id = 1: the held stream is kept
        await wait_until(lambda: "DRAINING" in repr(e.pool), "draining")
        r = await e.client.request("GET", "http://origin/new", [])
        assert await r.read() == b"az"
        assert "#1 DRAINING streams=1" in repr(e.pool) and "#2 IDLE" in repr(e.pool)
        gate.set()
        assert await held.read() == b"az"
        await wait_until(lambda: "#1" not in repr(e.pool), "drained connection closed")
        assert e.origin.stats.connections == 2


async def test_stream_above_goaway_last_stream_id_is_retried_transparently() -> None:
    gate = anyio.Event()

    async def app(req: OriginRequest, reply: Any) -> None:
        if req.path == b"/first":
            await gate.wait()
            await reply.respond(200, [], b"first")
        elif reply._c is e.origin.conns[0]:
            await reply.goaway(last_stream_id=1)  # promise to finish stream 1 only
            await anyio.sleep(10)
        else:
            await reply.respond(200, [], req.path)

    async with env(app) as e:
        out: dict[str, bytes] = {}

        async def get(path: str) -> None:
            out[path] = await (await e.client.request("GET", "http://origin" + path, [])).read()

        async with anyio.create_task_group() as tg:
            tg.start_soon(get, "/first")
            await wait_until(lambda: e.origin.stats.active == 1, "first in flight")
            tg.start_soon(get, "/late")
            await wait_until(lambda: e.origin.stats.connections == 2, "retried on a new one")
            gate.set()
        assert out == {"/first": b"first", "/late": b"/late"}
        assert e.origin.stats.connections == 2


async def test_refused_stream_is_retried_on_a_fresh_connection() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        if reply._c is e.origin.conns[0]:
            await reply.reset(ErrorCodes.REFUSED_STREAM)
            return
        await reply.respond(200, [], b"second try")

    async with env(app) as e:
        r = await e.client.request("POST", URL, [], b"{}")
        assert await r.read() == b"second try"
        assert e.origin.stats.connections == 2
        assert e.origin.stats.requests == 2


async def test_other_resets_are_errors_not_retries() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.reset(ErrorCodes.INTERNAL_ERROR)

    async with env(app) as e:
        with pytest.raises(UpstreamClosed, match="INTERNAL_ERROR"):
            await e.client.request("POST", URL, [], b"{}")
        assert e.origin.stats.requests == 1
        assert "IDLE streams=0/100" in repr(e.pool)  # the connection itself is fine


async def test_slow_consumer_buffers_at_most_one_window_and_credits_as_it_reads() -> None:
    window = 64 * KiB
    body = bytes(range(256)) * (4 * KiB)  # 1 MiB

    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        await reply.end(body)

    async with env(app, h2_stream_window_bytes=window) as e:
        r = await e.client.request("GET", URL, [])
        s = stream_of(r)
        await wait_until(lambda: s.buffered == window, "window filled")
        await e.settle()
        assert s.buffered == window  # the origin is blocked on flow control, not us
        assert [u for u in e.origin.window_updates if u[0] == s.sid] == []
        got = bytearray()
        async for chunk in r.aiter_bytes():
            got += chunk
            assert s.buffered <= window
            await anyio.lowlevel.checkpoint()  # the origin may run between reads
        assert bytes(got) == body
        credit = sum(d for sid, d in e.origin.window_updates if sid == 1)
        assert credit >= len(body) - window  # the long stream never stalled
        assert "IDLE streams=0/100" in repr(e.pool)


async def test_frames_already_buffered_come_as_one_piece() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        for part in (b"data: 1\r\n\r\n", b"data: 2\r\n\r\n", b"data: 3\r\n\r\n"):
            await reply.send(part)  # one DATA frame each
        await reply.end()

    async with env(app) as e:
        r = await e.client.request("GET", URL, [])
        s = stream_of(r)
        await wait_until(lambda: s.ended, "whole body buffered")
        assert len(s.chunks) == 3 and s.buffered == 33
        got = [chunk async for chunk in r.aiter_bytes()]
        assert got == [b"data: 1\r\n\r\ndata: 2\r\n\r\ndata: 3\r\n\r\n"]
        assert s.buffered == 0
        assert "IDLE streams=0/100" in repr(e.pool)


async def test_one_slow_consumer_does_not_stall_the_connection() -> None:
    big = b"s" * (256 * KiB)

    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        await reply.end(big)

    # a connection window smaller than what the slow stream holds: credit on receipt or stall
    small: dict[str, Any] = {
        "h2_stream_window_bytes": 64 * KiB,
        "h2_connection_window_bytes": 65535,
    }
    async with env(app, **small) as e:
        slow = await e.client.request("GET", URL, [])
        await wait_until(lambda: stream_of(slow).buffered == 64 * KiB, "slow one full")
        fast = await e.client.request("GET", URL, [])
        with anyio.fail_after(5):
            assert await fast.read() == big
        assert await slow.read() == big


async def test_request_body_larger_than_the_peer_window_is_sent_under_flow_control() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.respond(200, [], b"%d" % len(req.body))

    async with env(app) as e:
        body = b"b" * (300 * KiB)  # the origin's window is 64 KiB
        assert await (await e.client.request("POST", URL, [], body)).read() == b"307200"


async def test_abandoned_stream_is_reset_with_cancel_and_the_connection_stays() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        for _ in range(500):
            await reply.send(b"tick")
            await anyio.sleep(0.01)
        await reply.end()

    async with env(app) as e:
        r = await e.client.request("GET", URL, [])
        assert await r.aiter_bytes().__anext__() == b"tick"
        await r.aclose()
        await wait_until(lambda: e.origin.resets == [(1, CANCEL)], "RST_STREAM(CANCEL)")
        await wait_until(lambda: e.origin.stats.cancelled == 1, "origin app cancelled")
        assert e.origin.open_streams == 0
        assert "IDLE streams=0/100 requests=1" in repr(e.pool)


async def test_cancelled_caller_resets_the_stream_and_the_pool_stays_healthy() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        if req.path == b"/no-head":
            await anyio.sleep(10)
        await reply.start(200, [])
        if req.path == b"/no-end":
            await anyio.sleep(10)
        await reply.end(b"fine")

    async with env(app) as e:
        with anyio.move_on_after(0.05):
            await (await e.client.request("GET", "http://origin/no-end", [])).read()
        with anyio.move_on_after(0.05):
            await e.client.request("POST", "http://origin/no-head", [], b"{}")
        await wait_until(lambda: len(e.origin.resets) == 2, "both reset")
        assert {code for _, code in e.origin.resets} == {CANCEL}
        assert "IDLE streams=0/100 requests=2" in repr(e.pool) and "waiters=0" in repr(e.pool)
        assert await (await e.client.request("GET", URL, [])).read() == b"fine"


async def test_headers_timeout_resets_only_that_stream() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        if req.path == b"/silent":
            await anyio.sleep(10)
        await reply.respond(200, [], b"ok")

    async with env(app, t={"upstream_headers_s": 0.05}) as e:
        with pytest.raises(UpstreamHeadersTimeout):
            await e.client.request("GET", "http://origin/silent", [])
        await wait_until(lambda: e.origin.resets == [(1, CANCEL)], "reset")
        assert await (await e.client.request("GET", URL, [])).read() == b"ok"
        assert e.origin.stats.connections == 1


async def test_read_idle_timeout_is_a_gap_not_a_total() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        for _ in range(6):
            await anyio.sleep(0.03)
            await reply.send(b"x")
        if req.path == b"/stall":
            await anyio.sleep(10)
        await reply.end()

    async with env(app, t={"upstream_read_idle_s": 0.1}) as e:
        assert await (await e.client.request("GET", URL, [])).read() == b"xxxxxx"
        r = await e.client.request("GET", "http://origin/stall", [])
        with pytest.raises(UpstreamReadTimeout):
            await r.read()
        await wait_until(lambda: (3, CANCEL) in e.origin.resets, "stalled stream reset")
        assert "IDLE streams=0/100" in repr(e.pool)


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



@pytest.mark.parametrize(
    "head",
    [
        [(b"content-type", b"text/plain")],  # no :status
        [(b":status", b"2000")],
        [(b":status", b"abc")],
        [(b":status", b"200"), (b":status", b"200")],
        [(b":status", b"200"), (b":path", b"/")],
    ],
)
async def test_malformed_response_head_is_a_protocol_error(head: list[tuple[bytes, bytes]]) -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        h = reply._c.h
        h.config.validate_outbound_headers = False  # send what a broken upstream would
        h.send_headers(reply.sid, head)
        await reply._c.flush()
        await anyio.sleep(10)

    async with env(app) as e:
        with anyio.fail_after(5), pytest.raises(UpstreamProtocolError, match="malformed"):
            await e.client.request("GET", URL, [])
        await wait_until(lambda: e.origin.resets == [(1, CANCEL)], "reset")

async def test_write_timeout_when_the_peer_gives_no_window() -> None:
    async with env(origin_kw={"window": 0}, t={"upstream_write_s": 0.05}) as e:
        with pytest.raises(UpstreamWriteTimeout):
            await e.client.request("POST", URL, [], b"never sent")
        assert "streams=0/100" in repr(e.pool)


async def test_connection_lost_mid_stream_fails_the_stream_and_drops_the_connection() -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        await reply.send(b"part")
        await reply.abort()

    async with env(app) as e:
        r = await e.client.request("GET", URL, [])
        with pytest.raises(UpstreamClosed):
            await r.read()
        await wait_until(lambda: "conns=[]" in repr(e.pool), "dropped")


async def test_idle_connection_is_pinged_and_kept() -> None:
    async with env(ping_interval_s=0.05, ping_timeout_s=1.0) as e:
        await (await e.client.request("GET", URL, [])).read()
        await wait_until(lambda: e.origin.pings >= 2, "pings sent while idle")
        assert "#1 IDLE" in repr(e.pool)
        assert await (await e.client.request("GET", URL, [])).read()
        assert e.origin.stats.connections == 1


async def test_dead_peer_is_detected_by_ping_and_dropped() -> None:
    async with env(
        origin_kw={"answer_pings": False}, ping_interval_s=0.05, ping_timeout_s=0.1
    ) as e:
        await (await e.client.request("GET", URL, [])).read()
        await wait_until(lambda: "conns=[]" in repr(e.pool), "dead connection dropped")
        e.origin.answer_pings = True
        assert await (await e.client.request("GET", URL, [])).read()
        assert e.origin.stats.connections == 2


async def test_prior_knowledge_against_an_http1_origin_is_a_connect_error() -> None:
    async with MockBackend() as net:
        net.add("origin", 80, H1Origin().serve)
        cfg = config(cleartext_http2="prior_knowledge")
        async with UpstreamClient(cfg, timeouts(), backend=net) as client:
            with pytest.raises(UpstreamConnectError):
                await client.request("GET", URL, [])
            assert "conns=[]" in repr(client)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize(("http2", "version"), [(True, "HTTP/2"), (False, "HTTP/1.1")])
async def test_tls_alpn_picks_the_protocol(ca: trustme.CA, http2: bool, version: str) -> None:
    async with MockBackend() as net:
        h1, h2o = H1Origin(), H2Origin()
        ctx = server_tls_context(ca, ["h2", "http/1.1"])
        net.add("origin.test", 443, tls_server(h1.serve, h2o.serve, ctx))
        client = UpstreamClient(
            config(http2=http2), timeouts(), ssl_context=client_tls_context(ca), backend=net
        )
        async with client:
            for _ in range(2):
                r = await client.request("POST", "https://origin.test/p", [], b"q")
                assert r.http_version == version and await r.read() == b"/p|q"
            assert len(net.connects) == 1


async def test_tls_untrusted_certificate_is_a_connect_error(ca: trustme.CA) -> None:
    async with MockBackend() as net:
        ctx = server_tls_context(ca, ["h2"])
        net.add("origin.test", 443, tls_server(None, H2Origin().serve, ctx))
        other = trustme.CA()
        client = UpstreamClient(
            config(), timeouts(), ssl_context=client_tls_context(other), backend=net
        )
        async with client:
            with pytest.raises(UpstreamConnectError, match=r"TLS .*certificate verify failed"):
                await client.request("GET", "https://origin.test/", [])


async def test_invalid_request_header_is_refused_before_anything_is_sent() -> None:
    async with env() as e:
        for bad in ([(b"x-goog-api-key", b"secret\r\nx: y")], [(b"Upper", b"v")]):
            with pytest.raises(UpstreamProtocolError) as info:
                await e.client.request("GET", URL, bad)
            assert b"secret" not in str(info.value).encode()
        assert e.origin.stats.requests == 0
        assert "IDLE streams=0/100 requests=0" in repr(e.pool)
        assert await (await e.client.request("GET", URL, [(b"x-ok", b"fine")])).read()


async def test_closed_streams_are_forgotten_even_when_the_peer_sets_no_limit() -> None:
    async with env(origin_kw={"max_streams": 2**31 - 1}, h2_max_streams_per_connection=4) as e:
        for _ in range(50):
            assert await (await e.client.request("GET", URL, [])).read()
        (conn,) = e.pool.conns
        assert len(conn._h2.streams) <= 5  # h2 keeps closed streams until its recount
        assert "IDLE streams=0/4 requests=50" in repr(conn)


def test_stateless_hpack_encoder_round_trips_and_never_uses_the_table() -> None:
    from hpack import Decoder

    from rawgate.upstream.h2_client import _Encoder

    enc, dec = _Encoder(), Decoder()
    fields = [
        (b":method", b"POST"),
        (b":path", b"/v1beta/models/m:generateContent"),
        (b"x-goog-api-key", b"AIza-secret"),
        (b"content-length", b"12345"),
    ]
    first = enc.encode(fields)
    assert dec.decode(first, raw=True) == fields
    assert enc.encode(fields) == first  # same bytes whatever was sent before
    assert len(dec.header_table.dynamic_entries) == 0  # nothing indexed (keys stay out)
    enc.header_table_size = 0  # the peer shrank its table: the next block announces it
    again = enc.encode([(b"content-length", b"7")])
    assert again[:1] == b"\x20" and dec.decode(again, raw=True) == [(b"content-length", b"7")]
