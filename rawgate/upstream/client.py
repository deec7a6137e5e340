"""The upstream client the gateway calls: origins -> pools -> HTTP/1.1 or HTTP/2 connections.

Invariants:
- `request()` returns once the response head arrived; the body is pulled by the caller
  (`read()` bounded, or `aiter_bytes()` / `receive_within()` piece by piece as they arrive;
  a piece is everything already received, never one per h11 chunk or h2 DATA frame). Each
  response holds one pool slot until its body ended, failed, or `aclose()` was called; a
  response that raised has already given its slot back. Callers use `async with` or
  `aclose()` in a `finally`.
- Protocol choice per origin: https -> ALPN (h2, http/1.1; only http/1.1 when upstream.http2 is
  false); http -> upstream.cleartext_http2 ("auto" = h2c prior knowledge, falling back to
  HTTP/1.1 for good when the origin does not answer the preface with SETTINGS).
- A request that failed because a pooled connection was stale before anything was sent is
  retried exactly once, on a fresh connection; nothing else is retried here (retrying across
  accounts is the gateway's business).
- The client owns a task group (h2 readers/writers, PING, idle sweeping): it must be entered
  (`async with UpstreamClient(...) as client`) before the first request; leaving it closes
  every connection.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio

from rawgate.errors import UpstreamClosed, UpstreamConnectError, UpstreamProtocolError
from rawgate.netaddr import parse_proxy, split_host_port
from rawgate.seam import Header
from rawgate.upstream.backends import (
    NetworkBackend,
    default_backend,
    dial,
    make_ssl_context,
    set_alpn,
)
from rawgate.upstream.h1_client import H1Connection
from rawgate.upstream.h2_client import H2Connection, NotHTTP2
from rawgate.upstream.pool import Limits, OriginPool, StaleConnection

if TYPE_CHECKING:
    from types import TracebackType

    from anyio.abc import TaskGroup

    from rawgate.config import TimeoutsConfig, UpstreamConfig
    from rawgate.upstream.h1_client import H1Exchange
    from rawgate.upstream.h2_client import H2Stream
    from rawgate.upstream.pool import Connection

__all__ = ["UpstreamClient", "UpstreamResponse"]

# Characters a request target keeps as they are when a non-ASCII one is percent-encoded.
_TARGET_SAFE = "/?&=:%+@!$'()*,;~-._"
_METHODS = {m: m.encode() for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")}


class Origin:
    """scheme://host:port and its pool. One per distinct URL prefix, cached."""

    __slots__ = ("authority", "host", "https", "label", "pool", "port", "scheme")

    def __init__(self, scheme: str, authority: str) -> None:
        self.https = scheme == "https"
        self.scheme = scheme.encode()
        self.host, self.port = split_host_port(authority, 443 if self.https else 80)
        self.authority = authority.encode("idna" if not authority.isascii() else "ascii")
        self.label = f"{scheme}://{authority}"
        self.pool: OriginPool


class UpstreamResponse:
    """A response whose head arrived. Body: `read()` (bounded) or `aiter_bytes()`."""

    __slots__ = ("_ex", "_max", "headers", "http_version", "status")

    def __init__(self, ex: H1Exchange | H2Stream, max_bytes: int) -> None:
        self._ex = ex
        self._max = max_bytes
        self.status = ex.status
        self.headers = ex.headers  # lower-case names, bytes values, in wire order
        self.http_version = ex.http_version

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    async def read(self, max_bytes: int | None = None) -> bytes:
        """The whole (rest of the) body; over max_bytes (default upstream.max_response_bytes)
        the exchange is abandoned and UpstreamProtocolError raised."""
        limit = self._max if max_bytes is None else max_bytes
        ex = self._ex
        first = await ex.receive()
        if not first:
            return b""
        chunks = [first]
        total = len(first)
        try:
            while total <= limit:
                data = await ex.receive()
                if not data:
                    break
                chunks.append(data)
                total += len(data)
            if total > limit:
                raise UpstreamProtocolError(f"upstream response body exceeds {limit} bytes")
        except BaseException:
            await ex.aclose()
            raise
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def receive_within(self, quiet_s: float | None) -> bytes | None:
        """The next body chunk (everything that already arrived, joined), b"" at the end, or
        None when nothing arrived for quiet_s seconds (the body stays open: a streaming caller
        sends its heartbeat and calls again). upstream_read_idle_s counts from the last data
        whatever quiet_s is; None waits like aiter_bytes()."""
        return await self._ex.receive_within(quiet_s)

    def aiter_bytes(self) -> _Body:
        """Body chunks as they arrive (each waits at most upstream_read_idle_s)."""
        return _Body(self._ex)

    async def aclose(self) -> None:
        """Release the connection; an unfinished body is abandoned (h2 RST_STREAM, h1 close)."""
        await self._ex.aclose()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self._ex.aclose()

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.http_version} {self._ex!r}>"


class _Body:
    """An async iterator, not an async generator: breaking out of `async for` leaves nothing
    to finalise later, and each step is one call (no generator frame)."""

    __slots__ = ("_ex",)

    def __init__(self, ex: H1Exchange | H2Stream) -> None:
        self._ex = ex

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        data = await self._ex.receive()
        if not data:
            raise StopAsyncIteration
        return data


class UpstreamClient:
    """Pools per origin over one network backend. Enter it before use."""

    def __init__(
        self,
        upstream: UpstreamConfig,
        timeouts: TimeoutsConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backend: NetworkBackend | None = None,
    ) -> None:
        self.cfg = upstream
        self.timeouts = timeouts
        self._backend: NetworkBackend | None = backend  # default chosen inside the loop
        self._ssl_arg = ssl_context
        self._ssl: ssl.SSLContext | None = None  # built on first https use (loads the store)
        try:
            self._proxy = parse_proxy(upstream.proxy)
        except ValueError as e:
            raise ValueError(f"upstream.proxy: {e}") from None
        self._limits = Limits(
            upstream.max_connections,
            upstream.max_keepalive_connections,
            upstream.keepalive_expiry_s,
        )
        self._origins: dict[str, Origin] = {}
        self._h1_only: set[str] = set()  # cleartext origins that did not answer the h2 preface
        self._tg: TaskGroup | None = None
        self._closed = False

    # ---- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> UpstreamClient:
        if self._backend is None:
            self._backend = default_backend()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._sweeper)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        tg, self._tg = self._tg, None
        if tg is None:
            return None
        tg.cancel_scope.cancel()
        # The body's own exception is not the task group's: passing it in would come back
        # wrapped in an ExceptionGroup. Connection tasks never raise, so nothing is lost.
        await tg.__aexit__(None, None, None)
        return None

    async def aclose(self) -> None:
        """Close every pool and connection; in-flight requests fail with UpstreamClosed."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            for origin in list(self._origins.values()):
                await origin.pool.aclose()

    async def _sweeper(self) -> None:
        # Idle connections past keepalive_expiry_s close even when no request passes by;
        # a quarter of the expiry is precise enough and costs nothing measurable.
        every = max(0.05, self.cfg.keepalive_expiry_s / 4)
        while True:
            await anyio.sleep(every)
            for origin in list(self._origins.values()):
                await origin.pool.sweep()

    def __repr__(self) -> str:
        pools = [o.pool for o in self._origins.values()]
        return f"<UpstreamClient pools={pools!r}>"

    @property
    def pools(self) -> list[OriginPool]:
        return [o.pool for o in self._origins.values()]

    # ---- requests ---------------------------------------------------------------------------

    async def request(
        self, method: str, url: str, headers: list[Header], body: bytes = b""
    ) -> UpstreamResponse:
        """Send a request; returns when the response head arrived (any status)."""
        if self._tg is None:
            raise RuntimeError("UpstreamClient must be entered: `async with UpstreamClient(...)`")
        if self._closed:
            raise UpstreamClosed("the upstream client is closed")
        origin, target = self._route(url)
        m = _METHODS.get(method) or method.upper().encode()
        pool = origin.pool
        fresh = False
        while True:
            conn: Any = await pool.acquire(fresh)
            try:
                ex = await conn.start(m, target, headers, body)
            except StaleConnection:
                if fresh:
                    raise UpstreamClosed(
                        f"{origin.label} closed two connections before the request was sent"
                    ) from None
                fresh = True
                continue
            return UpstreamResponse(ex, self.cfg.max_response_bytes)

    def _route(self, url: str) -> tuple[Origin, bytes]:
        i = url.find("://")
        j = url.find("/", i + 3)
        q = url.find("?", i + 3)
        if j < 0 or 0 <= q < j:
            j = q if q >= 0 else len(url)
        prefix = url[:j]
        hit = self._origins.get(prefix)  # one dict lookup per request instead of urlsplit
        if hit is None:
            scheme = url[:i].lower() if i > 0 else ""
            hit = self._origins[prefix] = self._new_origin(scheme, url[i + 3 : j])
        target = url[j:]
        if not target or target[0] == "?":
            target = "/" + target
        if target.isascii():
            return hit, target.encode()
        return hit, quote(target, safe=_TARGET_SAFE).encode()

    def _new_origin(self, scheme: str, authority: str) -> Origin:
        # Messages name the authority only: a URL's query may carry a key (?key=...).
        if scheme not in ("http", "https") or not authority or "@" in authority:
            raise UpstreamConnectError(
                "the upstream URL must look like http(s)://host[:port]/path "
                "(see upstream.gemini_base_url / code_assist_base_url)"
            )
        try:
            origin = Origin(scheme, authority)
        except (ValueError, UnicodeError) as e:
            raise UpstreamConnectError(f"bad upstream URL: {e}") from None
        origin.pool = self._new_pool(origin)
        return origin

    def _new_pool(self, origin: Origin) -> OriginPool:
        cfg = self.cfg
        if origin.https:
            h2 = cfg.http2
        else:
            h2 = cfg.http2 and cfg.cleartext_http2 != "off"

        async def connect(conn_id: int) -> Connection:
            return await self._connect(origin, conn_id)

        return OriginPool(
            origin.label,
            self._limits,
            connect,
            pool_timeout_s=self.timeouts.upstream_pool_s,
            h2_streams=cfg.h2_max_streams_per_connection,
            http2=h2,
        )

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            if self._ssl_arg is not None:
                set_alpn(self._ssl_arg, self.cfg.http2)
                self._ssl = self._ssl_arg
            else:
                self._ssl = make_ssl_context(self.cfg.ca_file, self.cfg.http2)
        return self._ssl

    async def _connect(self, origin: Origin, conn_id: int) -> Connection:
        """TCP (+ CONNECT proxy) (+ TLS) then the HTTP/1.1 or HTTP/2 connection on it."""
        cfg = self.cfg
        t = self.timeouts.upstream_connect_s
        tls = self._tls() if origin.https else None
        assert self._backend is not None
        stream = await dial(
            self._backend, origin.host, origin.port, tls=tls, proxy=self._proxy, timeout=t
        )
        try:
            if origin.https:
                use_h2 = stream.alpn_protocol == "h2"
                probe = False
            else:
                use_h2 = (
                    cfg.http2
                    and cfg.cleartext_http2 != "off"
                    and origin.label not in self._h1_only
                )
                probe = cfg.cleartext_http2 == "auto"
            if use_h2:
                conn = H2Connection(
                    conn_id,
                    stream,
                    origin.pool,
                    cfg,
                    self.timeouts,
                    scheme=origin.scheme,
                    authority=origin.authority,
                )
                try:
                    await conn.handshake(t, probe=probe)
                except NotHTTP2:
                    # Remembered for good: one wasted connection per origin, not per request.
                    self._h1_only.add(origin.label)
                    await stream.aclose()
                    stream = await dial(
                        self._backend, origin.host, origin.port, tls=None, proxy=self._proxy,
                        timeout=t,
                    )
                else:
                    assert self._tg is not None
                    self._tg.start_soon(conn.run)
                    return conn
            return H1Connection(conn_id, stream, origin.pool, origin.authority, cfg, self.timeouts)
        except BaseException:
            await stream.aclose()
            raise
