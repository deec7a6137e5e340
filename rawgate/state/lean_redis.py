"""The Redis backend's lean path: its hot-path script calls (EVALSHA) written and read by the
calling task itself on a leased connection (resp.py), instead of through coredis' writer and
reader tasks. bench.state_cost ("redis c=1", check, median of 3 runs): 89 us CPU per check
here against 182 through coredis' connection (c=16: 69 against 81); bench/README.md "Shared
state per request".

Invariants:
- One call at a time per connection, leased for the whole call (write, then read every reply).
  A call that does not end normally (cancelled, timed out, a connection or protocol error)
  closes its connection: it is never reused, so a late reply can never be taken for the next
  call's (the mixed-up replies redis-py had after a cancellation).
- At most `max_connections` open; a caller waits for one under its own deadline.
- A new connection sends AUTH (username, password from the URL) and SELECT (the URL's db)
  before its first call. redis:// and unix:// only; rediss:// (TLS) and clusters stay on
  coredis.
- Error replies are returned as resp.ReplyError values (the caller handles NOSCRIPT).
- An idle connection the server closed meanwhile (restarted, client timeout) is dropped when
  next taken, not used (its descriptor is readable: the end of stream), so a server restart
  nobody saw costs no failed call.
"""

from __future__ import annotations

import select
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import anyio.abc

from rawgate.state.resp import NEED_MORE, Parser, ReplyError, encode

__all__ = ["LeanPool", "lean_supported"]

READ_SIZE = 65536


def lean_supported(url: str) -> bool:
    return url.startswith(("redis://", "unix://"))


class _Conn:
    __slots__ = ("parser", "stream")

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.parser = Parser()


def _closed(conn: _Conn) -> bool:
    """An idle connection with something to read: the server's end of stream (or bytes no
    call asked for): either way not usable. One poll of the descriptor, no wait (~1-2 us)."""
    sock = conn.stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if sock is None:
        return False
    fd = sock.fileno()
    return fd < 0 or bool(select.select([fd], [], [], 0)[0])


class LeanPool:
    def __init__(self, url: str, max_connections: int) -> None:
        u = urlsplit(url)
        q = parse_qs(u.query)
        self._unix = u.path if u.scheme == "unix" else ""
        self._host = u.hostname or "127.0.0.1"
        self._port = u.port or 6379
        self._username = unquote(u.username) if u.username else None
        pw = unquote(u.password) if u.password else (q.get("password") or [""])[0]
        self._password = pw or None
        db = (q.get("db") or [""])[0] if u.scheme == "unix" else u.path.lstrip("/")
        self._db = int(db) if db else 0
        self._idle: list[_Conn] = []
        self._slots = anyio.Semaphore(max_connections)
        self.opened = 0  # connections opened so far (tests: cancellations close them)

    async def _connect(self) -> _Conn:
        stream: anyio.abc.ByteStream
        if self._unix:
            stream = await anyio.connect_unix(self._unix)
        else:
            stream = await anyio.connect_tcp(self._host, self._port)
        conn = _Conn(stream)
        self.opened += 1
        try:
            hello: list[tuple[Any, ...]] = []
            if self._password is not None:
                hello.append(("AUTH", *(() if self._username is None else (self._username,)),
                              self._password))  # fmt: skip
            if self._db:
                hello.append(("SELECT", self._db))
            if hello:
                for r in await self._exchange(conn, hello):
                    if isinstance(r, ReplyError):
                        raise ConnectionError(f"redis refused the connection setup: {r.code}")
        except BaseException:
            await self._close(conn)
            raise
        return conn

    async def _exchange(self, conn: _Conn, commands: list[tuple[Any, ...]]) -> list[Any]:
        await conn.stream.send(b"".join(encode(*c) for c in commands))
        out: list[Any] = []
        while len(out) < len(commands):
            r = conn.parser.next()
            if r is NEED_MORE:
                try:
                    conn.parser.feed(await conn.stream.receive(READ_SIZE))
                except anyio.EndOfStream:
                    raise ConnectionError("connection closed by the server") from None
                continue
            out.append(r)
        return out

    async def call(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send `commands` back to back on one connection (one round trip) and return their
        replies in order."""
        async with self._slots:
            conn = None
            while self._idle and conn is None:
                conn = self._idle.pop()
                if _closed(conn):
                    await self._close(conn)
                    conn = None
            if conn is None:
                conn = await self._connect()
            ok = False
            try:
                out = await self._exchange(conn, commands)
                ok = conn.parser.buffered == 0  # anything more would be out of step
                return out
            finally:
                if ok:
                    self._idle.append(conn)
                else:
                    await self._close(conn)

    async def _close(self, conn: _Conn) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await conn.stream.aclose()
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._close(conn)
