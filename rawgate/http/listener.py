"""The listening side: bind, accept, pick the protocol, hand the connection to its driver; drain.

Invariants:
- Every accepted TCP socket gets TCP_NODELAY (responses are single writes; Nagle would hold the
  last segment of each for up to 40 ms waiting for the client's delayed ACK).
- At most limits.max_connections connections at once: the accept loop takes a slot before it
  accepts, so connections over the cap wait in the kernel's accept backlog
  (limits.listen_backlog) instead of being accepted and starved.
- EMFILE / ENFILE / ENOMEM / ENOBUFS from accept() mean "overloaded", not "broken": the loop logs,
  sleeps ACCEPT_BACKOFF_S and goes on (trio's serve_listeners policy). Any other accept error ends
  that listener; a connection's own failure never reaches the accept loop.
- Protocol choice. Cleartext: the first bytes are compared with the 24-byte HTTP/2 preface as they
  arrive; they go to serve_h2 only once all 24 matched, and to serve_h1 as soon as one byte
  differs (so a request shorter than 24 bytes is never kept waiting) - the bytes already read are
  passed on as `initial`, with the time the sniff took (it counts against the head timeout).
  TLS: the handshake (bounded by timeouts.tls_handshake_s) offers ALPN h2 and http/1.1, and the
  negotiated protocol picks the driver (none negotiated: HTTP/1.1).
- Binding: host/port from the config unless overridden; host "" means 127.0.0.1, or 0.0.0.0 plus
  :: (when the machine has IPv6) with server.allow_lan_access. Port 0 binds one free port, the
  same on every address.
- Graceful shutdown: stop accepting and close the listening sockets, set ServerState.draining
  (HTTP/1.1 answers the current request with Connection: close, HTTP/2 sends GOAWAY), let
  in-flight requests and streams finish within the grace period, then cancel what is left.
  Leaving open_server's context without shutdown() is shutdown with no grace.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, cast

import anyio
from anyio.abc import SocketAttribute, TaskGroup, TaskStatus
from anyio.streams.tls import TLSAttribute, TLSStream

from rawgate.aio import on_asyncio
from rawgate.config import Config, ConfigError
from rawgate.conn import ConnInfo, ServerState
from rawgate.http.h1_server import serve_h1
from rawgate.http.h2_server import serve_h2
from rawgate.http.server_stream import CONNECTION_GONE, accept as accept_asyncio

if TYPE_CHECKING:
    from anyio.abc import ByteStream, SocketListener

    from rawgate.seam import App

__all__ = [
    "ACCEPT_BACKOFF_S",
    "H2_PREFACE",
    "BindError",
    "Server",
    "bind_error",
    "bind_hosts",
    "open_server",
    "server_ssl_context",
    "sniff",
]

log = logging.getLogger("rawgate.http.listener")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Errnos that mean the process or the system is out of something: back off, do not crash.
_OVERLOAD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_S = 0.1  # trio's SLEEP_TIME: long enough for a few connections to close
_SNIFF_READ_BYTES = 64 * 1024


class BindError(OSError):
    """A listening address could not be bound; str() names the address and the reason."""

    def __str__(self) -> str:
        return str(self.strerror)


def bind_error(host: str, port: int, e: OSError) -> BindError:
    """The one-line BindError for `host`:`port`; a taken port says so and names --port."""
    why = e.strerror or str(e)
    if e.errno == errno.EADDRINUSE:
        why += " (another process listens there; pick another port with --port)"
    return BindError(e.errno, f"cannot listen on {host} port {port}: {why}")


def bind_hosts(cfg: Config, host: str | None = None) -> list[str]:
    """The addresses to listen on: the explicit host, else what server.host/allow_lan_access say."""
    h = host if host is not None else cfg.server.host
    if h:
        return [h]
    if cfg.server.allow_lan_access:
        return ["0.0.0.0", "::"] if socket.has_ipv6 else ["0.0.0.0"]
    return ["127.0.0.1"]


def server_ssl_context(cfg: Config) -> ssl.SSLContext | None:
    """The TLS context for server.tls_cert/tls_key (ALPN h2 + http/1.1), or None when unset."""
    s = cfg.server
    if not s.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # RFC 9113 9.2: HTTP/2 over TLS needs 1.2 or later; so does any client worth serving.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(s.tls_cert, s.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"server.tls_cert = {s.tls_cert!r}, server.tls_key = {s.tls_key!r}: cannot load the"
            f" certificate and key ({e})"
        ) from None
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


async def sniff(stream: ByteStream, timeout_s: float) -> tuple[str, bytes] | None:
    """("h2" | "h1", bytes read) by the HTTP/2 preface; None on EOF or after `timeout_s`."""
    buf = b""
    with anyio.move_on_after(timeout_s or float("inf")):
        while True:
            try:
                buf += await stream.receive(_SNIFF_READ_BYTES)
            except CONNECTION_GONE:
                return None
            n = min(len(buf), len(H2_PREFACE))
            if buf[:n] != H2_PREFACE[:n]:
                return "h1", buf
            if n == len(H2_PREFACE):
                return "h2", buf
    return None


def _peer(stream: ByteStream) -> tuple[str, int] | None:
    addr = stream.extra(SocketAttribute.remote_address, None)
    if isinstance(addr, tuple) and len(addr) >= 2:
        return (str(addr[0]), int(addr[1]))
    return None


def _nodelay(stream: ByteStream) -> None:
    sock = stream.extra(SocketAttribute.raw_socket, None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Server:
    """A running listener set. Created by open_server; see the module docstring."""

    def __init__(
        self,
        app: App,
        cfg: Config,
        listeners: list[SocketListener],
        ssl_context: ssl.SSLContext | None,
        state: ServerState,
    ) -> None:
        self.app = app
        self.cfg = cfg
        self.state = state
        self.ssl_context = ssl_context
        self._listeners = listeners
        self.addresses: list[tuple[str, int]] = []
        for lst in listeners:
            addr = lst.extra(SocketAttribute.local_address)
            assert isinstance(addr, tuple)
            self.addresses.append((str(addr[0]), int(addr[1])))
        self.port = self.addresses[0][1]
        self._slots = anyio.Semaphore(max(1, cfg.limits.max_connections))
        self._accept_scope = anyio.CancelScope()
        self._conns: TaskGroup | None = None
        self._active = 0
        self._idle: anyio.Event | None = None
        self._grace: anyio.CancelScope | None = None
        self._stopped = anyio.Event()
        self._unstarted: set[ByteStream] = set()  # accepted, task not yet running

    @property
    def urls(self) -> list[str]:
        scheme = "https" if self.ssl_context is not None else "http"
        out = []
        for host, port in self.addresses:
            shown = f"[{host}]" if ":" in host else host
            out.append(f"{scheme}://{shown}:{port}")
        return out

    @property
    def connections(self) -> int:
        """Connections being served (including ones still in TLS handshake or sniffing)."""
        return self._active

    def __repr__(self) -> str:
        return f"<Server {self.addresses} active={self._active} {self.state!r}>"

    # ---- accepting ------------------------------------------------------------------------

    async def _run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as conns:
                self._conns = conns
                task_status.started()
                try:
                    with self._accept_scope:
                        async with anyio.create_task_group() as acc:
                            for lst in self._listeners:
                                acc.start_soon(self._accept_loop, lst)
                finally:
                    with anyio.CancelScope(shield=True):
                        for lst in self._listeners:
                            await lst.aclose()
                # conns now waits for the connections; shutdown() cancels it after the grace.
        finally:
            # A connection task cancelled before its first step never ran its own cleanup.
            with anyio.CancelScope(shield=True):
                for stream in self._unstarted:
                    await anyio.aclose_forcefully(stream)
            self._unstarted.clear()
            self._stopped.set()

    async def _accept_loop(self, listener: SocketListener) -> None:
        conns = self._conns
        assert conns is not None
        slots = self._slots
        # (bench.bare_server: h1) On asyncio, connections are rawgate's own protocol streams
        # (server_stream.py): anyio's per-send checkpoint and per-receive pause/resume were ~15 %
        # of a proxied request's CPU. Other backends keep anyio's.
        raw = None
        if on_asyncio():
            raw = listener.extra(SocketAttribute.raw_socket, None)
        while True:
            await slots.acquire()  # over max_connections: wait, the kernel keeps the backlog
            try:
                stream: ByteStream = (
                    await accept_asyncio(raw) if raw is not None else await listener.accept()
                )
            except OSError as e:
                slots.release()
                if e.errno in _OVERLOAD_ERRNOS:
                    log.warning(
                        "accept: %s; retrying in %g s", errno.errorcode.get(e.errno or 0, e),
                        ACCEPT_BACKOFF_S,
                    )
                    await anyio.sleep(ACCEPT_BACKOFF_S)
                    continue
                log.error("accept failed; this listener stops: %s", e)
                return
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                slots.release()
                return
            except BaseException:
                slots.release()
                raise
            self._active += 1
            self._unstarted.add(stream)
            conns.start_soon(self._connection, stream)

    async def _connection(self, stream: ByteStream) -> None:
        self._unstarted.discard(stream)
        state = self.state
        state.total_connections += 1
        try:
            _nodelay(stream)
            await self._dispatch(stream)
        except Exception:  # a connection's failure must never take the server down
            log.exception("connection failed")
        finally:
            # The drivers close their stream; this covers sniffing and the TLS handshake
            # (cancelled by shutdown, or failed). Closing twice is harmless.
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)
            self._slots.release()
            self._active -= 1
            if not self._active and self._idle is not None:
                self._idle.set()

    async def _dispatch(self, stream: ByteStream) -> None:
        cfg = self.cfg
        app = self.app
        state = self.state
        client = _peer(stream)
        ctx = self.ssl_context
        if ctx is None:
            t0 = time.monotonic()
            sniffed = await sniff(stream, cfg.timeouts.header_read_s)
            if sniffed is None:
                await anyio.aclose_forcefully(stream)
                return
            proto, initial = sniffed
            # The sniff's time counts against the driver's head timeout: a preface trickled
            # for almost header_read_s must not earn a second header_read_s.
            waited = time.monotonic() - t0
            info = ConnInfo(client=client, scheme="http")
            if proto == "h2":
                await serve_h2(stream, app, cfg, info, state, initial, waited)
            else:
                await serve_h1(stream, app, cfg, info, state, initial, waited)
            return
        try:
            with anyio.fail_after(cfg.timeouts.tls_handshake_s or float("inf")):
                tls = await TLSStream.wrap(
                    stream, server_side=True, ssl_context=ctx, standard_compatible=False
                )
        except (TimeoutError, ssl.SSLError, *CONNECTION_GONE) as e:
            log.debug("TLS handshake with %s failed: %r", client, e)
            await anyio.aclose_forcefully(stream)
            return
        alpn = tls.extra(TLSAttribute.alpn_protocol, None)
        info = ConnInfo(client=client, scheme="https", alpn=alpn)
        if alpn == "h2":
            await serve_h2(tls, app, cfg, info, state)
        else:
            await serve_h1(tls, app, cfg, info, state)

    # ---- stopping -------------------------------------------------------------------------

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, drain for up to `grace_s` seconds, cancel the rest; idempotent.

        A second call while one is in progress can only shorten the grace period.
        """
        deadline = anyio.current_time() + max(0.0, grace_s)
        if self._grace is not None:
            self._grace.deadline = min(self._grace.deadline, deadline)
            await self._stopped.wait()
            return
        self._grace = grace = anyio.CancelScope(deadline=deadline)
        self._accept_scope.cancel()
        self.state.draining.set()
        with grace:
            if self._active:
                self._idle = anyio.Event()
                await self._idle.wait()
        if grace.cancelled_caught:
            log.warning("shutdown: grace period over; cancelling %d connection(s)", self._active)
        if self._conns is not None:
            self._conns.cancel_scope.cancel()
        await self._stopped.wait()

    def _stop_now(self) -> None:
        """Shutdown with no grace, without waiting (the context manager's exit path)."""
        if self._grace is not None:
            self._grace.cancel()
        self._accept_scope.cancel()
        self.state.draining.set()
        if self._conns is not None:
            self._conns.cancel_scope.cancel()


async def _bind(
    cfg: Config, host: str | None, port: int | None, reuse_port: bool
) -> list[SocketListener]:
    hosts = bind_hosts(cfg, host)
    want = cfg.server.port if port is None else port
    listeners: list[SocketListener] = []
    try:
        for h in hosts:
            try:
                multi = await anyio.create_tcp_listener(
                    local_host=h,
                    local_port=want,
                    reuse_port=reuse_port,
                    backlog=max(1, cfg.limits.listen_backlog),
                )
            except OSError as e:
                if h == "::" and listeners:
                    log.info("not listening on [::] (no IPv6 here?): %s", e)
                    continue
                raise bind_error(h, want, e) from None
            listeners.extend(cast("list[SocketListener]", multi.listeners))
            if want == 0:  # one free port, the same on every address
                want = int(multi.listeners[0].extra(SocketAttribute.local_port))
    except BaseException:
        for lst in listeners:
            await anyio.aclose_forcefully(lst)
        raise
    return listeners


@asynccontextmanager
async def open_server(
    app: App,
    cfg: Config,
    *,
    ssl_context: ssl.SSLContext | None = None,
    host: str | None = None,
    port: int | None = None,
    reuse_port: bool = False,
    state: ServerState | None = None,
) -> AsyncIterator[Server]:
    """Listen and serve `app` until the context exits (or shutdown() is awaited).

    Raises BindError (an OSError) when an address cannot be bound. `state` is the ServerState
    the app was built with, if any (a fresh one otherwise); `reuse_port` sets SO_REUSEPORT for
    multi-process serving.
    """
    listeners = await _bind(cfg, host, port, reuse_port)
    server = Server(app, cfg, listeners, ssl_context, state or ServerState())
    async with anyio.create_task_group() as tg:
        await tg.start(server._run)
        try:
            yield server
        finally:
            server._stop_now()

