"""The listener and `rawgate serve` over real loopback sockets (127.0.0.1 / ::1, port 0).

HTTP/1.1 keep-alive and pipelining, h2c by prior knowledge, TLS with ALPN h2 and http/1.1
(certificates from trustme), disconnects, max_connections, graceful shutdown, the accept loop's
overload backoff and the protocol sniffer; then `rawgate serve` as a real subprocess.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import trustme
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSAttribute

from rawgate.config import Config, ConfigError
from rawgate.conn import ServerState
from rawgate.http import listener
from rawgate.http.app import GatewayApp
from rawgate.respond import json_response
from rawgate.seam import Request, ResponseSink
from tests.helpers_h1 import exchange, memory_stream_pair
from tests.helpers_h2 import PREFACE, h2_client

pytestmark = pytest.mark.anyio


def make_cfg(**sections: dict[str, Any]) -> Config:
    cfg = Config()
    for name, values in sections.items():
        cfg = msgspec.structs.replace(
            cfg, **{name: msgspec.structs.replace(getattr(cfg, name), **values)}
        )
    return cfg


def get(path: str, *extra: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: localhost", *extra]) + "\r\n\r\n").encode()


class App:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.schemes: list[str] = []
        self.versions: list[str] = []
        self.cancelled: list[str] = []
        self.cancelled_event = anyio.Event()
        self.finished: list[str] = []
        self.arrived = anyio.Event()
        self.release = anyio.Event()
        self._arrivals: dict[str, anyio.Event] = {}

    def arrival(self, path: str) -> anyio.Event:
        """Set once a request for `path` reached its blocking point."""
        return self._arrivals.setdefault(path, anyio.Event())

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        self.paths.append(request.path)
        self.schemes.append(request.scheme)
        self.versions.append(request.http_version)
        try:
            if request.path == "/block":
                self.arrived.set()
                self.arrival(request.path).set()
                await self.release.wait()
            elif request.path == "/hang":
                await sink.start(200, [(b"content-type", b"text/event-stream")])
                await sink.send(b"data: 1\n\n")
                self.arrived.set()
                self.arrival(request.path).set()
                await anyio.sleep_forever()
            await json_response(sink, 200, b'{"path":"%s"}' % request.path.encode())
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(request.path)
            self.cancelled_event.set()
            raise
        self.finished.append(request.path)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls(ca: trustme.CA, tmp_path: Path) -> tuple[Config, ssl.SSLContext]:
    """A Config with server.tls_cert/tls_key files, and a client context trusting them."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path = tmp_path / "cert.pem"
    key_path = tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        with cert_path.open("ab") as f:
            f.write(extra.bytes())
    cert.private_key_pem.write_to_path(str(key_path))
    cfg = make_cfg(server={"tls_cert": str(cert_path), "tls_key": str(key_path)})
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return cfg, client


@asynccontextmanager
async def serving(
    app: Any, cfg: Config | None = None, **kw: Any
) -> AsyncIterator[listener.Server]:
    cfg = cfg or Config()
    async with listener.open_server(app, cfg, host="127.0.0.1", port=0, **kw) as server:
        yield server
    assert server.connections == 0
    assert server.state.open_connections == {"h1": 0, "h2": 0}
    assert server.state.in_flight == 0


# ---- HTTP/1.1 -----------------------------------------------------------------------------------


async def test_h1_keep_alive_and_pipelining() -> None:
    app = App()
    async with serving(app) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as s:
            rs = await exchange(s, get("/a") + get("/b") + get("/c"), 3)
            assert [r.json()["path"] for r in rs] == ["/a", "/b", "/c"]
            (again,) = await exchange(s, get("/d"))  # same connection, still open
            assert again.status == 200 and again.header(b"connection") is None
    assert app.paths == ["/a", "/b", "/c", "/d"] and set(app.versions) == {"1.1"}
    assert server.state.total_connections == 1


async def test_every_accepted_socket_gets_tcp_nodelay(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = listener._nodelay

    def spy(stream: Any) -> None:
        real(stream)
        sock = stream.extra(SocketAttribute.raw_socket)
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(listener, "_nodelay", spy)
    async with serving(App()) as server:
        for _ in range(2):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as s:
                await exchange(s, get("/x"))
    assert seen == [1, 1]


async def test_gateway_app_healthz_over_h1_and_h2c() -> None:
    cfg = Config()
    state = ServerState()
    app = GatewayApp(cfg, state)
    async with serving(app, cfg, state=state) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as s:
            (h1,) = await exchange(s, get("/healthz"))
        async with h2_client("127.0.0.1", server.port) as c:
            h2 = await c.request("GET", "/healthz")
    assert h1.status == 200 and h1.json()["status"] == "ok"
    assert h2.status == 200 and h2.json()["status"] == "ok"


async def test_h2c_prior_knowledge_and_a_short_h1_request_share_the_port() -> None:
    app = App()
    async with serving(app) as server:
        async with h2_client("127.0.0.1", server.port) as c:
            r = await c.request("GET", "/two")
        # 18 bytes, shorter than the h2 preface: must not wait for more.
        async with await anyio.connect_tcp("127.0.0.1", server.port) as s:
            (one,) = await exchange(s, b"GET / HTTP/1.0\r\n\r\n")
    assert r.status == 200 and one.status == 200
    assert app.versions == ["2", "1.0"]


# ---- TLS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpn", [["h2"], ["http/1.1"], None])
async def test_tls_alpn_picks_the_driver(
    tls: tuple[Config, ssl.SSLContext], alpn: list[str] | None
) -> None:
    cfg, client_ctx = tls
    ctx = listener.server_ssl_context(cfg)
    assert ctx is not None
    app = App()
    async with serving(app, cfg, ssl_context=ctx) as server:
        if alpn == ["h2"]:
            async with h2_client("127.0.0.1", server.port, ssl_context=client_ctx) as c:
                r = await c.request("GET", "/secure")
            assert r.status == 200
        else:
            if alpn:
                client_ctx.set_alpn_protocols(alpn)
            async with await anyio.connect_tcp(
                "127.0.0.1", server.port, ssl_context=client_ctx, tls_standard_compatible=False
            ) as s:
                assert s.extra(TLSAttribute.alpn_protocol) == (
                    alpn[0] if alpn else None
                )
                (r1, r2) = await exchange(s, get("/secure") + get("/again"), 2)
            assert r1.status == 200 and r2.status == 200
    assert app.schemes[0] == "https"
    assert app.versions[0] == ("2" if alpn == ["h2"] else "1.1")


async def test_tls_handshake_timeout_and_plaintext_to_tls_port(
    tls: tuple[Config, ssl.SSLContext],
) -> None:
    cfg, _ = tls
    cfg = msgspec.structs.replace(
        cfg, timeouts=msgspec.structs.replace(cfg.timeouts, tls_handshake_s=0.2)
    )
    ctx = listener.server_ssl_context(cfg)
    async with serving(App(), cfg, ssl_context=ctx) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as s:
            with anyio.fail_after(5):  # says nothing: dropped after the handshake timeout
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await s.receive()
        async with await anyio.connect_tcp("127.0.0.1", server.port) as s:
            await s.send(get("/plain"))
            with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                while True:
                    await s.receive()


def test_server_ssl_context_errors_name_the_keys(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    cfg = make_cfg(server={"tls_cert": missing, "tls_key": missing})
    with pytest.raises(ConfigError, match=r"server\.tls_cert"):
        listener.server_ssl_context(cfg)
    assert listener.server_ssl_context(Config()) is None


# ---- disconnects, limits, shutdown --------------------------------------------------------------


async def test_client_that_disconnects_mid_stream_cancels_its_handler() -> None:
    app = App()
    async with serving(app) as server:
        s = await anyio.connect_tcp("127.0.0.1", server.port)
        await s.send(get("/hang"))
        with anyio.fail_after(5):
            await app.arrived.wait()
            assert b"data: 1" in await s.receive()
        await s.aclose()
        with anyio.fail_after(5):
            await app.cancelled_event.wait()
    assert app.cancelled == ["/hang"]


async def test_max_connections_makes_new_ones_wait_in_the_backlog() -> None:
    app = App()
    cfg = make_cfg(limits={"max_connections": 1})
    async with serving(app, cfg) as server:
        first = await anyio.connect_tcp("127.0.0.1", server.port)
        await exchange(first, get("/first"))
        second = await anyio.connect_tcp("127.0.0.1", server.port)  # the kernel accepts it
        await second.send(get("/second"))
        with anyio.move_on_after(0.3):
            await second.receive()
            pytest.fail("a connection over max_connections was served")
        await first.aclose()
        buf = b""
        with anyio.fail_after(5):
            while b"/second" not in buf:
                buf += await second.receive()
        await second.aclose()
    assert app.paths == ["/first", "/second"]


async def test_graceful_shutdown_finishes_in_flight_and_cancels_over_grace() -> None:
    app = App()
    async with serving(app) as server:
        finishing = await anyio.connect_tcp("127.0.0.1", server.port)
        stuck = await anyio.connect_tcp("127.0.0.1", server.port)
        idle = await anyio.connect_tcp("127.0.0.1", server.port)
        await exchange(idle, get("/idle"))
        await finishing.send(get("/block"))
        await stuck.send(get("/hang"))
        with anyio.fail_after(5):
            await app.arrival("/block").wait()
            await app.arrival("/hang").wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.shutdown, 0.5)
            with anyio.fail_after(5):
                await server.state.draining.wait()
            app.release.set()  # /block completes inside the grace period
            buf = b""
            with anyio.fail_after(5):
                while True:
                    try:
                        buf += await finishing.receive()
                    except anyio.EndOfStream:
                        break
        # New connections are refused once shutdown started.
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", server.port)
        for s in (finishing, stuck, idle):
            await s.aclose()
    assert b"HTTP/1.1 200 OK" in buf and b"connection: close" in buf
    assert app.finished == ["/idle", "/block"]
    assert app.cancelled == ["/hang"]


async def test_shutdown_is_idempotent_and_a_second_call_shortens_the_grace() -> None:
    app = App()
    async with serving(app) as server:
        s = await anyio.connect_tcp("127.0.0.1", server.port)
        await s.send(get("/block"))
        with anyio.fail_after(5):
            await app.arrived.wait()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.shutdown, 60.0)
                await anyio.sleep(0.05)
                await server.shutdown(0)
        await s.aclose()
    assert app.cancelled == ["/block"]


class _FlakyListener:
    """accept() fails with `errs` first, then reports the listener closed."""

    def __init__(self, errs: list[int]) -> None:
        self.errs = errs
        self.calls = 0

    def extra(self, attr: Any, default: Any = None) -> Any:
        if attr is SocketAttribute.local_address:
            return ("127.0.0.1", 1)
        return default

    async def accept(self) -> Any:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        if self.errs:
            code = self.errs.pop(0)
            raise OSError(code, os.strerror(code))
        raise anyio.ClosedResourceError

    async def aclose(self) -> None:
        pass


async def test_accept_loop_backs_off_on_emfile(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(listener, "ACCEPT_BACKOFF_S", 0.01)
    fake = _FlakyListener([errno.EMFILE, errno.ENFILE, errno.ENOBUFS])
    server = listener.Server(App(), Config(), [fake], None, ServerState())  # type: ignore[list-item]
    with anyio.fail_after(5):
        await server._run()  # returns once the (fake) listener reports itself closed
    assert fake.calls == 4
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 3


async def test_accept_loop_stops_a_listener_on_other_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = _FlakyListener([errno.EINVAL])
    server = listener.Server(App(), Config(), [fake], None, ServerState())  # type: ignore[list-item]
    with anyio.fail_after(5):
        await server._run()
    assert fake.calls == 1 and any(r.levelno == logging.ERROR for r in caplog.records)


# ---- binding ------------------------------------------------------------------------------------


def test_bind_hosts() -> None:
    assert listener.bind_hosts(Config()) == ["127.0.0.1"]
    lan = make_cfg(server={"allow_lan_access": True})
    assert listener.bind_hosts(lan)[0] == "0.0.0.0"
    assert listener.bind_hosts(lan) == (["0.0.0.0", "::"] if socket.has_ipv6 else ["0.0.0.0"])
    assert listener.bind_hosts(lan, "127.0.0.1") == ["127.0.0.1"]
    assert listener.bind_hosts(make_cfg(server={"host": "::1"})) == ["::1"]


async def test_a_name_with_two_addresses_binds_one_port_on_both() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    app = App()
    async with listener.open_server(app, Config(), host="localhost", port=0) as server:
        hosts = sorted(h for h, _ in server.addresses)
        ports = {p for _, p in server.addresses}
        if "::1" in hosts:
            async with await anyio.connect_tcp("::1", server.port) as s:
                (r,) = await exchange(s, get("/v6"))
                assert r.status == 200
    assert "127.0.0.1" in hosts and len(ports) == 1


# ---- the sniffer --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 5, 23, 24, 100])
async def test_sniff_h2_preface_in_pieces(size: int) -> None:
    server, client = memory_stream_pair()
    wire = PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    async with anyio.create_task_group() as tg:

        async def feed() -> None:
            for i in range(0, len(wire), size):
                await client.send(wire[i : i + size])
                await anyio.lowlevel.checkpoint()

        tg.start_soon(feed)
        got = await listener.sniff(server, 5.0)
    assert got is not None and got[0] == "h2" and wire.startswith(got[1])
    assert len(got[1]) >= 24


@pytest.mark.parametrize(
    "first", [b"G", b"GET / HTTP/1.1\r\n\r\n", b"PO", b"PRI * HTTP/1.1\r\n", b"\r\n"]
)
async def test_sniff_h1_as_soon_as_a_byte_differs(first: bytes) -> None:
    server, client = memory_stream_pair()
    await client.send(first)  # and nothing more: sniff must not wait for 24 bytes
    got = await listener.sniff(server, 5.0)
    assert got == ("h1", first)


async def test_sniff_gives_up_on_eof_and_on_timeout() -> None:
    server, client = memory_stream_pair()
    await client.send(b"PRI * HTTP/2")
    await client.send_eof()
    assert await listener.sniff(server, 5.0) is None
    server, client = memory_stream_pair()
    await client.send(b"PRI")
    assert await listener.sniff(server, 0.05) is None


# ---- `rawgate serve` as a process ---------------------------------------------------------------


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAWGATE_")}
    env["RAWGATE_HOME"] = str(home)
    return env


@pytest.fixture
def serve_proc(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-m", "rawgate", "serve", "--host", "127.0.0.1", *args],
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


def _startup_port(p: subprocess.Popen[str]) -> int:
    assert p.stdout is not None
    line = p.stdout.readline()
    assert "listening on http://127.0.0.1:" in line, line
    return int(line.split("127.0.0.1:")[1].split()[0])


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_rawgate_serve_answers_healthz_and_exits_0_on_sigterm(
    serve_proc: Any, workers: str
) -> None:
    p = serve_proc("--port", "0", "--workers", workers, "--log-level", "warning")
    port = await anyio.to_thread.run_sync(_startup_port, p)
    for _ in range(3):
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            (r,) = await exchange(s, get("/healthz"))
            assert r.status == 200 and r.json()["status"] == "ok"
    async with h2_client("127.0.0.1", port) as c:
        assert (await c.request("GET", "/healthz")).status == 200
    p.send_signal(signal.SIGTERM)
    rc = await anyio.to_thread.run_sync(lambda: p.wait(timeout=15))
    assert rc == 0


def test_rawgate_serve_bad_config_key_exits_2_with_one_line(
    serve_proc: Any, tmp_path: Path
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[server]\nbogus_key = 1\n")
    p = serve_proc("--config", str(cfg), "--port", "0")
    out, err = p.communicate(timeout=15)
    assert p.returncode == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "server.bogus_key" in lines[0], err


def test_rawgate_serve_auth_on_without_keys_exits_2(serve_proc: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[auth]\nmode = "strict"\n')
    p = serve_proc("--config", str(cfg), "--port", "0")
    out, err = p.communicate(timeout=15)
    lines = err.strip().splitlines()
    assert p.returncode == 2 and out == ""
    assert len(lines) == 1 and "auth.api_keys" in lines[0], err


def test_rawgate_serve_port_in_use_exits_1_with_one_line(serve_proc: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = serve_proc("--port", str(port))
        out, err = p.communicate(timeout=15)
    lines = err.strip().splitlines()
    assert p.returncode == 1 and out == ""
    assert len(lines) == 1 and f"127.0.0.1 port {port}" in lines[0], err


async def test_open_server_bind_error_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(listener.BindError, match=f"127.0.0.1 port {port}"):
            async with listener.open_server(App(), Config(), host="127.0.0.1", port=port):
                pass
