"""Network backends: the one boundary where socket, TLS and anyio errors become rawgate errors.

Invariants:
- Everything above this module sees only `NetworkStream` / `NetworkBackend` and rawgate.errors;
  no OSError, ssl.SSLError or anyio exception escapes from here.
- connect_tcp: refused/unreachable/DNS -> UpstreamConnectError; deadline -> UpstreamConnectTimeout.
  start_tls: handshake or certificate failure -> UpstreamConnectError (the message says TLS and
  the reason, never a secret); deadline -> UpstreamConnectTimeout.
- read() returns b"" at a clean EOF; a reset or a broken TLS record -> UpstreamClosed; the
  deadline raises the class the caller names (headers vs. idle gap are different phases).
- write() hands the bytes to the transport or raises: reset/broken pipe -> UpstreamClosed, no
  progress within the timeout -> UpstreamWriteTimeout.
- aclose() never raises.
- `dial()` builds a ready byte stream to an origin on any backend: TCP, optionally through an
  HTTP CONNECT proxy, then TLS with SNI and ALPN. The CONNECT exchange counts as connecting.
"""

from __future__ import annotations

import asyncio
import base64
import select
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import anyio
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSAttribute, TLSStream

from rawgate.aio import on_asyncio
from rawgate.errors import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamReadTimeout,
    UpstreamTimeout,
    UpstreamWriteTimeout,
)

if TYPE_CHECKING:
    from anyio.abc import ByteStream

__all__ = [
    "AnyIOBackend",
    "AnyIOStream",
    "AsyncioBackend",
    "AsyncioStream",
    "NetworkBackend",
    "NetworkStream",
    "Proxy",
    "Wakeup",
    "default_backend",
    "dial",
    "make_ssl_context",
    "parse_proxy",
    "wakeup_factory",
]

# A proxy's CONNECT answer is a status line and a few headers; more is not a proxy we trust.
MAX_PROXY_HEAD_BYTES = 16 * 1024
_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError)


class NetworkStream(Protocol):
    """A connected byte stream (TCP or TLS). All methods raise only rawgate errors."""

    async def read(
        self, max_bytes: int, timeout: float | None, error: type[UpstreamTimeout] = ...
    ) -> bytes: ...

    async def write(self, data: bytes, timeout: float | None) -> None: ...

    async def start_tls(
        self, ctx: ssl.SSLContext, server_hostname: str, timeout: float | None
    ) -> NetworkStream: ...

    async def aclose(self) -> None: ...

    @property
    def alpn_protocol(self) -> str | None: ...

    def is_readable(self) -> bool: ...


class NetworkBackend(Protocol):
    async def connect_tcp(self, host: str, port: int, timeout: float | None) -> NetworkStream: ...


class AnyIOStream:
    """NetworkStream over any anyio ByteStream (a socket, a TLSStream, or an in-memory pipe)."""

    __slots__ = ("_closed", "_poll", "_prefix", "_s")

    def __init__(self, stream: ByteStream, prefix: bytes = b"") -> None:
        self._s = stream
        # Bytes already read past a proxy's CONNECT answer; served before the socket.
        self._prefix = prefix
        self._closed = False
        self._poll: select.poll | None = None

    async def read(
        self,
        max_bytes: int,
        timeout: float | None,
        error: type[UpstreamTimeout] = UpstreamReadTimeout,
    ) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        try:
            if timeout is None:
                return await self._s.receive(max_bytes)
            with anyio.fail_after(timeout):
                return await self._s.receive(max_bytes)
        except anyio.EndOfStream:
            return b""
        except TimeoutError:  # before OSError: TimeoutError is one
            raise error(f"upstream sent nothing for {timeout:g} s") from None
        except _ERRORS as e:
            raise UpstreamClosed(f"upstream connection lost: {_why(e)}") from None

    async def write(self, data: bytes, timeout: float | None) -> None:
        try:
            if timeout is None:
                await self._s.send(data)
                return
            with anyio.fail_after(timeout):
                await self._s.send(data)
        except TimeoutError:
            raise UpstreamWriteTimeout(
                f"upstream accepted no request bytes for {timeout:g} s"
            ) from None
        except _ERRORS as e:
            raise UpstreamClosed(f"upstream connection lost while sending: {_why(e)}") from None

    async def start_tls(
        self, ctx: ssl.SSLContext, server_hostname: str, timeout: float | None
    ) -> AnyIOStream:
        if self._prefix:  # the origin spoke before the ClientHello: not a TLS server
            raise UpstreamConnectError(f"{server_hostname} sent data before the TLS handshake")
        try:
            with anyio.fail_after(timeout):
                # standard_compatible=False: no close_notify round trip on close, and an
                # unclean EOF reads as EOF (h11/h2 framing tells truncation apart).
                tls = await TLSStream.wrap(
                    self._s,
                    hostname=server_hostname,
                    ssl_context=ctx,
                    standard_compatible=False,
                )
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"TLS handshake with {server_hostname} took over {timeout:g} s"
            ) from None
        except (anyio.EndOfStream, *_ERRORS) as e:
            cause = e.__cause__ if isinstance(e, anyio.BrokenResourceError) else e
            raise UpstreamConnectError(
                f"TLS handshake with {server_hostname} failed: {_why(cause)}"
            ) from None
        return AnyIOStream(tls)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with anyio.CancelScope(shield=True):
                await self._s.aclose()
        except Exception:  # closing a broken stream can fail in many ways; it is closed anyway
            pass

    @property
    def alpn_protocol(self) -> str | None:
        return self._s.extra(TLSAttribute.alpn_protocol, None)

    def is_readable(self) -> bool:
        """True when the peer sent something (EOF included) while nobody was reading.

        For an idle keep-alive connection that means "the server closed it". anyio pauses the
        transport between receive() calls, so the kernel socket holds that FIN and poll() sees it.
        """
        if self._prefix:
            return True
        p = self._poll
        if p is None:
            # anyio builds its whole attribute dict per extra() call (~10 us), and a new poll
            # object costs 2 us against 0.8 us for a reused one: look both up once.
            sock: socket.socket | None = self._s.extra(SocketAttribute.raw_socket, None)
            if sock is None:  # in-memory streams (tests) answer themselves
                probe = getattr(self._s, "is_readable", None)
                return bool(probe()) if probe is not None else False
            if sock.fileno() < 0:
                return True
            p = self._poll = select.poll()
            p.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(p.poll(0))  # a closed fd answers POLLNVAL: readable, so stale


class AnyIOBackend:
    """The real network: anyio's TCP connect (happy eyeballs, TCP_NODELAY)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None) -> NetworkStream:
        try:
            with anyio.fail_after(timeout):
                stream = await self._open(host, port)
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"connecting to {host}:{port} took over {timeout:g} s"
            ) from None
        except (*_ERRORS, anyio.EndOfStream) as e:
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {_why(e)}") from None
        return AnyIOStream(stream)

    async def _open(self, host: str, port: int) -> ByteStream:
        """The raw connect; a test backend overrides only this and keeps the translation."""
        s = await anyio.connect_tcp(host, port)
        # asyncio sets TCP_NODELAY already; set it anyway for other loops: a request head and
        # its small JSON body must not wait 40 ms for a delayed ACK (Nagle).
        sock = s.extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


# ---- the asyncio-native stream (the default on asyncio/uvloop) ---------------------------------

# Received bytes a connection buffers before it stops reading from the socket (backpressure),
# and the level at which it reads again. h2 flow control and h1's one-exchange-at-a-time
# already bound what arrives; this only caps a peer that ignores both.
READ_HIGH_BYTES = 256 * 1024
READ_LOW_BYTES = 64 * 1024


class _Protocol(asyncio.Protocol):
    """Buffers what arrives and wakes the one reader; tracks write backpressure."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.eof = False
        self.exc: BaseException | None = None
        self.reader: asyncio.Future[bool] | None = None
        self.drain: asyncio.Future[bool] | None = None
        self.write_paused = False
        self.read_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size >= READ_HIGH_BYTES and not self.read_paused and self.transport:
            self.read_paused = True
            self.transport.pause_reading()
        _wake(self.reader)

    def eof_received(self) -> bool:
        self.eof = True
        _wake(self.reader)
        return False  # an HTTP client has nothing left to say either: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.exc = exc
        _wake(self.reader)
        _wake(self.drain)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        _wake(self.drain)


def _wake(fut: asyncio.Future[bool] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(True)


class AsyncioStream:
    """NetworkStream on an asyncio transport. Against anyio's SocketStream it saves, per
    read, two cancel scopes' worth of bookkeeping (a fail_after is ~17 us here, a future +
    loop timer ~1.5 us) and the pause/resume_reading pair anyio does around every receive;
    a read that finds data already buffered does not even yield."""

    __slots__ = ("_loop", "_p", "_t")

    def __init__(
        self, transport: asyncio.Transport, protocol: _Protocol, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._t = transport
        self._p = protocol
        self._loop = loop

    async def _wait(self, slot: str, timeout: float | None) -> bool:
        fut: asyncio.Future[bool] = self._loop.create_future()
        setattr(self._p, slot, fut)
        timer = None if timeout is None else self._loop.call_later(max(0.0, timeout), _expire, fut)
        try:
            return await fut
        finally:
            setattr(self._p, slot, None)
            if timer is not None:
                timer.cancel()

    async def read(
        self,
        max_bytes: int,
        timeout: float | None,
        error: type[UpstreamTimeout] = UpstreamReadTimeout,
    ) -> bytes:
        p = self._p
        if not p.chunks:
            if not p.eof and not await self._wait("reader", timeout):
                raise error(f"upstream sent nothing for {timeout:g} s")
            if not p.chunks:
                if p.exc is not None:
                    raise UpstreamClosed(f"upstream connection lost: {_why(p.exc)}")
                return b""
        data = p.chunks.popleft()
        if len(data) > max_bytes:
            p.chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        p.size -= len(data)
        if p.read_paused and p.size <= READ_LOW_BYTES:
            p.read_paused = False
            self._t.resume_reading()
        return data

    async def write(self, data: bytes, timeout: float | None) -> None:
        p = self._p
        if p.exc is not None or self._t.is_closing():
            raise UpstreamClosed(f"upstream connection lost while sending: {_why(p.exc)}")
        self._t.write(data)
        if p.write_paused and not await self._wait("drain", timeout):
            raise UpstreamWriteTimeout(f"upstream accepted no request bytes for {timeout:g} s")
        if p.exc is not None:
            raise UpstreamClosed(f"upstream connection lost while sending: {_why(p.exc)}")

    def can_write_now(self) -> bool:
        """True when write_now() would hand bytes to a healthy transport without any wait.

        For callers that are not the connection's writer task (see h2_client._flush): a write
        that needs no wait saves the wake-up of the writer task, one cold event-loop hop per
        request at concurrency 1."""
        return self._p.exc is None and not self._p.write_paused and not self._t.is_closing()

    def write_now(self, data: bytes) -> None:
        """Give `data` to the transport (after can_write_now() said yes); never blocks."""
        self._t.write(data)

    async def start_tls(
        self, ctx: ssl.SSLContext, server_hostname: str, timeout: float | None
    ) -> AsyncioStream:
        if self._p.chunks:
            raise UpstreamConnectError(f"{server_hostname} sent data before the TLS handshake")
        try:
            with anyio.fail_after(timeout):
                t = await self._loop.start_tls(
                    self._t, self._p, ctx, server_hostname=server_hostname
                )
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"TLS handshake with {server_hostname} took over {timeout:g} s"
            ) from None
        except (OSError, ssl.SSLError, EOFError) as e:
            raise UpstreamConnectError(
                f"TLS handshake with {server_hostname} failed: {_why(e)}"
            ) from None
        if t is None:
            raise UpstreamConnectError(f"TLS handshake with {server_hostname} failed")
        return AsyncioStream(t, self._p, self._loop)

    async def aclose(self) -> None:
        self._t.close()

    @property
    def alpn_protocol(self) -> str | None:
        obj = self._t.get_extra_info("ssl_object")
        return obj.selected_alpn_protocol() if obj is not None else None

    def is_readable(self) -> bool:
        # The protocol reads as data arrives, so EOF or junk on an idle connection is already
        # here: no syscall needed.
        return bool(self._p.chunks) or self._p.eof


class AsyncioBackend:
    """connect_tcp straight on the running asyncio loop (uvloop included)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None) -> NetworkStream:
        loop = asyncio.get_running_loop()
        # Happy eyeballs like anyio.connect_tcp (IPv6 and IPv4 raced after 250 ms) where the
        # loop supports it; uvloop's create_connection has no such argument.
        eyeballs = 0.25 if isinstance(loop, asyncio.BaseEventLoop) else None
        try:
            with anyio.fail_after(timeout):
                if eyeballs is None:
                    t, p = await loop.create_connection(_Protocol, host, port)
                else:
                    t, p = await loop.create_connection(
                        _Protocol, host, port, happy_eyeballs_delay=eyeballs
                    )
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"connecting to {host}:{port} took over {timeout:g} s"
            ) from None
        except (OSError, ssl.SSLError) as e:
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {_why(e)}") from None
        return AsyncioStream(t, p, loop)


def default_backend() -> NetworkBackend:
    """The asyncio-native backend on asyncio (uvloop included), anyio's everywhere else."""
    if on_asyncio():
        return AsyncioBackend()
    return AnyIOBackend()


def _why(e: BaseException | None) -> str:
    """A short reason for an error message: the errno name or SSL reason, never a payload."""
    if e is None:
        return "connection closed"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return e.reason or type(e).__name__
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if isinstance(e, anyio.BrokenResourceError) and e.__cause__ is not None:
        return _why(e.__cause__)
    return str(e) or type(e).__name__


def make_ssl_context(ca_file: str = "", http2: bool = True) -> ssl.SSLContext:
    """The upstream TLS context: system trust store (or ca_file), hostname checks, ALPN."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    set_alpn(ctx, http2)
    return ctx


def set_alpn(ctx: ssl.SSLContext, http2: bool) -> None:
    ctx.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])


class Proxy:
    """An outbound HTTP proxy reached with CONNECT. repr never shows credentials."""

    __slots__ = ("auth", "host", "port")

    def __init__(self, host: str, port: int, auth: bytes | None) -> None:
        self.host = host
        self.port = port
        self.auth = auth  # the Proxy-Authorization value, or None

    def __repr__(self) -> str:
        return f"Proxy({self.host}:{self.port}{', auth' if self.auth else ''})"


def parse_proxy(url: str) -> Proxy | None:
    """`http://[user:pass@]host:port` -> Proxy; "" -> None. Raises ValueError otherwise."""
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "http":
        raise ValueError("upstream.proxy must look like http://host:port")
    rest = rest.split("/", 1)[0]
    auth = None
    if "@" in rest:
        cred, rest = rest.rsplit("@", 1)
        from urllib.parse import unquote

        user, _, password = cred.partition(":")
        token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        auth = f"Basic {token}".encode()
    host, port = split_host_port(rest, 8080)
    return Proxy(host, port, auth)


def split_host_port(authority: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` -> (host without brackets, port)."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"bad IPv6 address in {authority!r}")
        host, rest = authority[1:end], authority[end + 1 :]
        port = int(rest[1:]) if rest.startswith(":") and rest[1:] else default_port
        return host, port
    host, sep, port_s = authority.rpartition(":")
    if not sep:
        return authority, default_port
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"bad port in {authority!r}")
    return host, int(port_s)


async def dial(
    backend: NetworkBackend,
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
    proxy: Proxy | None,
    timeout: float | None,
) -> NetworkStream:
    """A connected stream to host:port (through `proxy` if given), TLS-wrapped if `tls`."""
    with anyio.move_on_after(timeout) as scope:
        if proxy is None:
            stream = await backend.connect_tcp(host, port, timeout)
        else:
            stream = await backend.connect_tcp(proxy.host, proxy.port, timeout)
            try:
                stream = await _connect_tunnel(stream, proxy, host, port, timeout)
            except BaseException:
                await stream.aclose()
                raise
        if tls is not None:
            try:
                stream = await stream.start_tls(tls, host, timeout)
            except BaseException:
                await stream.aclose()
                raise
        return stream
    assert scope.cancelled_caught
    raise UpstreamConnectTimeout(f"connecting to {host}:{port} took over {timeout:g} s")


async def _connect_tunnel(
    stream: NetworkStream, proxy: Proxy, host: str, port: int, timeout: float | None
) -> NetworkStream:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n".encode()
    if proxy.auth:
        head += b"Proxy-Authorization: " + proxy.auth + b"\r\n"
    await stream.write(head + b"\r\n", timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.read(4096, timeout, UpstreamConnectTimeout)
        if not data:
            raise UpstreamConnectError(f"proxy {proxy.host}:{proxy.port} closed during CONNECT")
        buf += data
        if len(buf) > MAX_PROXY_HEAD_BYTES:
            raise UpstreamConnectError(f"proxy {proxy.host}:{proxy.port} sent an oversized answer")
    head_b, _, rest = buf.partition(b"\r\n\r\n")
    status_line = head_b.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise UpstreamConnectError(f"proxy {proxy.host}:{proxy.port} did not speak HTTP")
    code = int(parts[1])
    if not 200 <= code < 300:
        raise UpstreamConnectError(
            f"proxy {proxy.host}:{proxy.port} refused CONNECT to {authority}: {code}"
        )
    if rest:
        assert isinstance(stream, AnyIOStream), "prefix replay needs an AnyIOStream"
        stream._prefix = rest + stream._prefix
    return stream


# ---- a one-shot wake-up with a deadline -------------------------------------------------------


class Wakeup(Protocol):
    """Set once by one task, awaited (with a deadline) by another."""

    def set(self) -> None: ...

    async def wait(self, timeout: float | None) -> bool:
        """True when set, False when the timeout passed first."""
        ...


class _AsyncioWakeup:
    """A bare future plus a loop timer. anyio's Event + fail_after costs ~17 us per wait on this
    machine (a cancel scope and its bookkeeping); this costs ~1.5 us, and h2 streams wait once
    per head and once per chunk. Cancellation still works: anyio cancels the awaiting task."""

    __slots__ = ("_fut", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._fut: asyncio.Future[bool] = loop.create_future()

    def set(self) -> None:
        if not self._fut.done():
            self._fut.set_result(True)

    async def wait(self, timeout: float | None) -> bool:
        fut = self._fut
        if fut.done():
            return fut.result()
        timer = None if timeout is None else self._loop.call_later(timeout, _expire, fut)
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class _AnyIOWakeup:
    """The portable version (trio)."""

    __slots__ = ("_ev",)

    def __init__(self) -> None:
        self._ev = anyio.Event()

    def set(self) -> None:
        self._ev.set()

    async def wait(self, timeout: float | None) -> bool:
        with anyio.move_on_after(timeout):
            await self._ev.wait()
        return self._ev.is_set()


def wakeup_factory() -> Callable[[], Wakeup]:
    """The cheapest Wakeup for the running event loop; call it from inside the loop."""
    if on_asyncio():
        loop = asyncio.get_running_loop()
        return lambda: _AsyncioWakeup(loop)
    return _AnyIOWakeup
