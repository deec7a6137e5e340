"""UpstreamClient over real loopback sockets (127.0.0.1, port 0) against scripted origins."""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson
import pytest
import trustme
from anyio.abc import ByteStream, SocketStream

from rawgate.emulator import server as emulator
from rawgate.emulator.server import RunningEmulator, Settings, emulator_config
from rawgate.errors import (
    UpstreamConnectError,
    UpstreamHeadersTimeout,
    UpstreamReadTimeout,
    UpstreamWriteTimeout,
)
from rawgate.upstream.backends import AnyIOBackend, NetworkBackend
from rawgate.upstream.client import UpstreamClient
from tests.helpers_backend import (
    PREFACE,
    H1Origin,
    H2Origin,
    OriginRequest,
    Serve,
    client_tls_context,
    config,
    server_tls_context,
    timeouts,
    tls_server,
    wait_until,
)

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def listen(serve: Serve) -> AsyncIterator[int]:
    """Serve each accepted connection with `serve`; yields the port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)

    async def handle(stream: SocketStream) -> None:
        try:
            await serve(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass
        finally:
            await stream.aclose()

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


def sniffing(h1: H1Origin, h2: H2Origin) -> Serve:
    """One cleartext port for both: the h2c preface picks HTTP/2, anything else HTTP/1.1."""

    async def serve(stream: ByteStream) -> None:
        first = b""
        while len(first) < len(PREFACE) and PREFACE.startswith(first):
            data = await stream.receive()
            first += data
        if first.startswith(PREFACE):
            await h2.serve(stream, first)
        else:
            await h1.serve(stream, first)

    return serve


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both loops rawgate runs on (uvloop is the production default)."""
    return ("asyncio", {"use_uvloop": request.param == "uvloop"})


@pytest.fixture(params=["asyncio-native", "anyio"])
def backend(request: pytest.FixtureRequest) -> NetworkBackend | None:
    """Both socket backends: the asyncio-native default and the portable anyio one."""
    return AnyIOBackend() if request.param == "anyio" else None


async def test_http1_keep_alive_over_loopback(backend: NetworkBackend | None) -> None:
    origin = H1Origin()
    async with listen(origin.serve) as port:
        cfg = config(cleartext_http2="off")
        async with UpstreamClient(cfg, timeouts(), backend=backend) as client:
            for i in range(3):
                url = f"http://127.0.0.1:{port}/n{i}"
                async with await client.request("POST", url, [], b"b") as r:
                    assert r.http_version == "HTTP/1.1" and await r.read() == b"/n%d|b" % i
            assert origin.stats.connections == 1
            assert "<H1Connection #1 IDLE requests=3>" in repr(client)


async def test_cleartext_auto_speaks_h2c_to_an_h2c_origin_and_http1_to_the_rest() -> None:
    h1, h2 = H1Origin(), H2Origin()
    h1_only = H1Origin()
    async with listen(sniffing(h1, h2)) as both, listen(h1_only.serve) as legacy:
        async with UpstreamClient(config(), timeouts()) as client:
            r = await client.request("GET", f"http://127.0.0.1:{both}/a", [])
            assert r.http_version == "HTTP/2" and await r.read() == b"/a|"
            for _ in range(2):
                r = await client.request("GET", f"http://127.0.0.1:{legacy}/b", [])
                assert r.http_version == "HTTP/1.1" and await r.read() == b"/b|"
            assert h2.stats.connections == 1 and h1.stats.connections == 0
            assert h1_only.stats.connections == 2  # the failed h2c probe, then one HTTP/1.1


@pytest.mark.parametrize(
    ("alpn", "version"), [(["h2", "http/1.1"], "HTTP/2"), (["http/1.1"], "HTTP/1.1")]
)
async def test_tls_with_alpn(
    ca: trustme.CA, alpn: list[str], version: str, backend: NetworkBackend | None
) -> None:
    h1, h2 = H1Origin(), H2Origin()
    async with listen(tls_server(h1.serve, h2.serve, server_tls_context(ca, alpn))) as port:
        client = UpstreamClient(
            config(), timeouts(), ssl_context=client_tls_context(ca), backend=backend
        )
        async with client:
            for _ in range(2):
                r = await client.request("POST", f"https://localhost:{port}/t", [], b"x")
                assert r.http_version == version and await r.read() == b"/t|x"
            assert h1.stats.connections + h2.stats.connections == 1


async def test_200_concurrent_streams_over_one_h2_connection(ca: trustme.CA) -> None:
    n = 200
    all_in = anyio.Event()

    async def app(req: OriginRequest, reply: Any) -> None:
        if origin.stats.active == n:
            all_in.set()
        with anyio.fail_after(10):
            await all_in.wait()  # nobody answers before all 200 are open at once
        await reply.start(200, [(b"content-type", b"text/event-stream")])
        for i in range(3):
            await reply.send(b"data: %d\r\n\r\n" % i)
        await reply.end()

    origin = H2Origin(app, max_streams=256)
    ctx = server_tls_context(ca, ["h2"])
    async with listen(tls_server(None, origin.serve, ctx)) as port:
        cfg = config(h2_max_streams_per_connection=n)
        client = UpstreamClient(cfg, timeouts(), ssl_context=client_tls_context(ca))
        bodies: list[bytes] = []

        async def one(i: int) -> None:
            r = await client.request("POST", f"https://localhost:{port}/s{i}", [], b"{}")
            bodies.append(b"".join([c async for c in r.aiter_bytes()]))

        async with client, anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        assert bodies == [b"data: 0\r\n\r\ndata: 1\r\n\r\ndata: 2\r\n\r\n"] * n
        assert origin.stats.connections == 1
        assert origin.stats.max_active == n


async def test_abandoned_streams_leave_no_stream_or_connection_behind(
    backend: NetworkBackend | None,
) -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        await reply.start(200, [])
        for _ in range(1000):
            await reply.send(b"data: tick\r\n\r\n")
            await anyio.sleep(0.01)
        await reply.end()

    h1, h2 = H1Origin(app), H2Origin(app)
    async with listen(sniffing(h1, h2)) as port:
        for mode, origin in (("prior_knowledge", h2), ("off", h1)):
            cfg = config(cleartext_http2=mode)
            async with UpstreamClient(cfg, timeouts(), backend=backend) as client:
                async with anyio.create_task_group() as tg:
                    for i in range(5):

                        async def one(i: int = i) -> None:
                            url = f"http://127.0.0.1:{port}/{i}"
                            async with await client.request("GET", url, []) as r:
                                async for _ in r.aiter_bytes():
                                    break  # the caller's own client went away

                        tg.start_soon(one)
                assert "streams=1" not in repr(client) and "ACTIVE" not in repr(client)

                def apps_ended(o: H1Origin | H2Origin = origin) -> bool:
                    return o.stats.active == 0

                await wait_until(apps_ended, "origin apps ended")
                assert origin.stats.cancelled == 5
            if origin is h1:
                await wait_until(lambda: h1.stats.open_connections == 0, "h1 sockets closed")
            else:
                assert h2.open_streams == 0


async def test_connection_refused_on_a_closed_port(backend: NetworkBackend | None) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    async with UpstreamClient(config(), timeouts(), backend=backend) as client:
        with pytest.raises(UpstreamConnectError, match=f"127.0.0.1:{port}"):
            await client.request("GET", f"http://127.0.0.1:{port}/", [])


class ConnectProxy:
    """A tiny HTTP CONNECT proxy: one tunnel per connection, bytes pumped both ways."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.heads: list[bytes] = []

    async def serve(self, stream: ByteStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive()
        head, _, rest = buf.partition(b"\r\n\r\n")
        self.heads.append(head)
        target = head.split(b" ")[1].decode()
        host, _, port = target.rpartition(":")
        if self.refuse:
            await stream.send(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            return
        async with await anyio.connect_tcp(host.strip("[]"), int(port)) as up:
            await stream.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                await up.send(rest)

            async def pump(a: ByteStream, b: ByteStream) -> None:
                try:
                    async for data in a:
                        await b.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass
                with anyio.CancelScope(shield=True):
                    await b.aclose()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, stream, up)
                tg.start_soon(pump, up, stream)


async def test_connect_proxy_tunnels_tls_h2(
    ca: trustme.CA, backend: NetworkBackend | None
) -> None:
    origin = H2Origin()
    proxy = ConnectProxy()
    ctx = server_tls_context(ca, ["h2", "http/1.1"])
    async with listen(tls_server(None, origin.serve, ctx)) as port, listen(proxy.serve) as pport:
        cfg = config(proxy=f"http://user:p%40ss@127.0.0.1:{pport}")
        tls = client_tls_context(ca)
        async with UpstreamClient(cfg, timeouts(), ssl_context=tls, backend=backend) as client:
            for _ in range(2):
                r = await client.request("GET", f"https://localhost:{port}/via", [])
                assert r.http_version == "HTTP/2" and await r.read() == b"/via|"
            assert "user" not in repr(client) and "p@ss" not in repr(client)
    (head,) = proxy.heads  # one tunnel, reused
    assert head.startswith(b"CONNECT localhost:%d HTTP/1.1\r\n" % port)
    assert b"Proxy-Authorization: Basic " + base64.b64encode(b"user:p@ss") in head


async def test_connect_proxy_refusal_is_a_connect_error() -> None:
    proxy = ConnectProxy(refuse=True)
    async with listen(proxy.serve) as pport:
        cfg = config(proxy=f"http://127.0.0.1:{pport}")
        async with UpstreamClient(cfg, timeouts()) as client:
            with pytest.raises(UpstreamConnectError, match=r"refused CONNECT .*: 403"):
                await client.request("GET", "http://origin.invalid:8046/", [])


async def test_untrusted_certificate_is_a_tls_connect_error(
    ca: trustme.CA, backend: NetworkBackend | None
) -> None:
    ctx = server_tls_context(ca, ["h2"])
    async with listen(tls_server(None, H2Origin().serve, ctx)) as port:
        stranger = client_tls_context(trustme.CA())
        client = UpstreamClient(config(), timeouts(), ssl_context=stranger, backend=backend)
        async with client:
            with pytest.raises(UpstreamConnectError, match=r"TLS .*certificate verify failed"):
                await client.request("GET", f"https://localhost:{port}/", [])
            assert "conns=[]" in repr(client)


async def test_each_timeout_over_loopback(backend: NetworkBackend | None) -> None:
    async def app(req: OriginRequest, reply: Any) -> None:
        if req.path == b"/silent":
            await anyio.sleep(10)
        await reply.start(200, [])
        await reply.send(b"first")
        await anyio.sleep(10)

    origin = H1Origin(app)
    t = timeouts(upstream_headers_s=0.1, upstream_read_idle_s=0.1, upstream_write_s=0.2)
    cfg = config(cleartext_http2="off")
    # A listening socket nobody accepts from: the kernel completes the handshake, then the
    # socket buffers fill and stay full (an anyio server would read eagerly into memory).
    with socket.socket() as deaf:
        deaf.bind(("127.0.0.1", 0))
        deaf.listen(4)
        deaf_port = deaf.getsockname()[1]
        async with listen(origin.serve) as port, UpstreamClient(cfg, t, backend=backend) as client:
            with pytest.raises(UpstreamHeadersTimeout):
                await client.request("GET", f"http://127.0.0.1:{port}/silent", [])
            r = await client.request("GET", f"http://127.0.0.1:{port}/stall", [])
            with pytest.raises(UpstreamReadTimeout):
                await r.read()
            with pytest.raises(UpstreamWriteTimeout):
                big = b"w" * (32 * 1024 * 1024)  # more than the socket buffers take
                await client.request("POST", f"http://127.0.0.1:{deaf_port}/", [], big)
            assert "conns=[]" in repr(client)


# ---- against the real Gemini emulator (rawgate's own listener: HTTP/1.1, h2c, TLS h2) ------

GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"


def gemini_request(text: str) -> bytes:
    return orjson.dumps({"contents": [{"role": "user", "parts": [{"text": text}]}]})


def key_headers(emu: RunningEmulator) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"x-goog-api-key", emu.api_key.encode())]


@pytest.mark.parametrize("mode", ["auto", "off"])
async def test_emulator_unary_and_stream_over_h2c_and_http1(mode: str) -> None:
    async with emulator.serve(port=0) as emu:
        async with UpstreamClient(config(cleartext_http2=mode), timeouts()) as client:
            version = "HTTP/2" if mode == "auto" else "HTTP/1.1"
            r = await client.request(
                "POST", emu.base_url + GEN, key_headers(emu), gemini_request("ping pong")
            )
            assert (r.status, r.http_version) == (200, version)
            doc = orjson.loads(await r.read())
            assert "ping pong" in doc["candidates"][0]["content"]["parts"][0]["text"]
            r = await client.request(
                "POST", emu.base_url + STREAM, key_headers(emu), gemini_request("a b c d e f")
            )
            assert r.status == 200
            assert (r.header(b"content-type") or b"").startswith(b"text/event-stream")
            body = b"".join([c async for c in r.aiter_bytes()])
            events = [e for e in body.split(b"\r\n\r\n") if e]
            assert len(events) >= 2 and all(e.startswith(b"data: ") for e in events)
            r = await client.request("POST", emu.base_url + GEN, [], gemini_request("no key"))
            assert r.status in (400, 401, 403) and b"error" in await r.read()
            one = (
                "<H2Connection #1 IDLE streams=0/100 requests=3>"
                if mode == "auto"
                else "<H1Connection #1 IDLE requests=3>"
            )
            assert f"conns=[{one}]" in repr(client)  # one connection, reused, nothing leaked


async def test_emulator_tls_h2(ca: trustme.CA) -> None:
    ctx = server_tls_context(ca, ["h2", "http/1.1"])
    async with emulator.serve(port=0, ssl_context=ctx) as emu:
        url = f"https://localhost:{emu.port}{GEN}"
        async with UpstreamClient(config(), timeouts(), ssl_context=client_tls_context(ca)) as c:
            r = await c.request("POST", url, key_headers(emu), gemini_request("over tls"))
            assert (r.status, r.http_version) == (200, "HTTP/2")
            assert b"over tls" in await r.read()


async def test_emulator_200_streams_on_one_connection_then_an_abandoned_one() -> None:
    n = 200
    slow = Settings(chunks=3, chunk_delay_s=0.05, stall_max_s=5)
    cfg = emulator_config(h2_max_streams=256)
    async with emulator.serve(port=0, settings=slow, config=cfg) as emu:
        up = config(cleartext_http2="prior_knowledge", h2_max_streams_per_connection=n)
        async with UpstreamClient(up, timeouts()) as client:
            first_seen = 0
            everyone = anyio.Event()
            sizes: list[int] = []

            async def one(i: int) -> None:
                nonlocal first_seen
                url = emu.base_url + STREAM
                r = await client.request("POST", url, key_headers(emu), gemini_request(f"s{i}"))
                got = 0
                async for chunk in r.aiter_bytes():
                    if not got:
                        first_seen += 1
                        if first_seen == n:
                            everyone.set()
                        with anyio.fail_after(10):
                            await everyone.wait()  # all 200 streams open at the same time
                    got += len(chunk)
                sizes.append(got)

            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
                with anyio.fail_after(10):
                    await everyone.wait()
                assert f"streams={n}/{n}" in repr(client)
            assert len(sizes) == n and min(sizes) > 0
            (pool,) = client.pools
            assert repr(pool.conns) == f"[<H2Connection #1 IDLE streams=0/{n} requests={n}>]"

            # a caller that goes away mid-stream: reset, slot back, connection kept
            long = gemini_request("long [[emu:chunks n=50]]")
            r = await client.request("POST", emu.base_url + STREAM, key_headers(emu), long)
            assert await r.aiter_bytes().__anext__()
            await r.aclose()
            assert repr(pool.conns) == f"[<H2Connection #1 IDLE streams=0/{n} requests={n + 1}>]"
            r = await client.request("POST", emu.base_url + GEN, key_headers(emu), long)
            assert r.status == 200 and await r.read()


async def test_ca_file_replaces_the_system_trust_store(ca: trustme.CA, tmp_path: Any) -> None:
    pem = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    origin = H2Origin()
    async with listen(tls_server(None, origin.serve, server_tls_context(ca, ["h2"]))) as port:
        async with UpstreamClient(config(ca_file=str(pem)), timeouts()) as client:
            r = await client.request("GET", f"https://localhost:{port}/ca", [])
            assert r.http_version == "HTTP/2" and await r.read() == b"/ca|"


async def test_connect_proxy_tunnels_cleartext_http1() -> None:
    origin = H1Origin()
    proxy = ConnectProxy()
    async with listen(origin.serve) as port, listen(proxy.serve) as pport:
        cfg = config(proxy=f"http://127.0.0.1:{pport}", cleartext_http2="off")
        async with UpstreamClient(cfg, timeouts()) as client:
            r = await client.request("POST", f"http://127.0.0.1:{port}/plain", [], b"p")
            assert r.http_version == "HTTP/1.1" and await r.read() == b"/plain|p"
    assert proxy.heads == [b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d" % (port, port)]
