"""Accepted connections as anyio ByteStreams straight on asyncio's protocol/transport API.

Why: anyio's SocketStream pays, per send(), a cancellation check plus a shielded checkpoint (a
CancelScope and one extra event-loop round trip for the writing task), and per receive() a
resume_reading/pause_reading pair (with uvloop, two io_uring submissions) and an asyncio.Event.
On the bench box that was ~15 % of rawgate's CPU per proxied non-stream request
(bench.bare_server: h1).

Invariants:
- Same contract as anyio's SocketStream for what the drivers use: receive() returns what
  arrived (at most max_bytes), raises EndOfStream at a clean EOF, BrokenResourceError after a
  reset, ClosedResourceError after aclose(); send() returns only once the kernel took every
  byte (the write-buffer high-water mark is 0, as anyio sets it), so a stalled client blocks the
  writer and the drivers' write timeouts see it (or `send_timeout`: TimeoutError after that many
  seconds without the kernel taking the rest); send_eof() half-closes; aclose() aborts the
  transport and never raises. Extra attributes: SocketAttribute.* like anyio's.
- One reader and one writer at a time (the drivers' own rule): each waits on its own future.
- Reading is paused only while more than READ_BUFFER_BYTES wait in the buffer, so an idle
  keep-alive connection costs no syscall per request and a flooding client is bounded.
- A receive() that finds data buffered returns without yielding: it can only find data the
  loop delivered while the caller was away, so a reader loop still yields once per batch.
- Only for asyncio (uvloop included); open_server uses anyio's streams on other backends.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketAttribute

__all__ = ["CONNECTION_GONE", "READ_BUFFER_BYTES", "ServerStream", "accept", "close_stream"]

# What a receive/send/close on an accepted connection (this stream or anyio's) raises once the
# peer is gone: the drivers and the listener treat these alike, as a quiet end of the connection.
CONNECTION_GONE = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)



async def close_stream(stream: ByteStream, timeout: float) -> None:
    """Close an accepted connection, shielded from the caller's cancellation and bounded: a TLS
    stream may try to send close_notify to a peer that does not read, so after `timeout` seconds
    it is closed forcefully. Never raises."""
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(timeout):
            try:
                await stream.aclose()
            except CONNECTION_GONE:
                pass
            return
        await anyio.aclose_forcefully(stream)


# Bytes a connection may hold unread before reading pauses: a few reads of 64 KiB.
READ_BUFFER_BYTES = 256 * 1024


class _Protocol(asyncio.Protocol):
    __slots__ = ("chunks", "closed", "drain", "eof", "exc", "paused", "reader", "size", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.eof = False
        self.closed = False  # connection_lost ran
        self.exc: BaseException | None = None
        self.reader: asyncio.Future[None] | None = None
        self.drain: asyncio.Future[None] | None = None
        self.paused = False  # reading paused: the buffer is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = t
        # Every unsent byte counts as "buffer full": send() waits until the kernel took it all.
        t.set_write_buffer_limits(0)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > READ_BUFFER_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        _wake(self.reader)

    def eof_received(self) -> bool:
        self.eof = True
        _wake(self.reader)
        return True  # keep the write side: a half-closed client may still read (anyio's rule)

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.closed = True
        self.exc = exc
        _wake(self.reader)
        _wake(self.drain)

    def pause_writing(self) -> None:
        if self.drain is None or self.drain.done():
            self.drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        _wake(self.drain)


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("no write progress"))


class ServerStream(ByteStream):
    """An accepted TCP connection (see the module invariants)."""

    __slots__ = ("_closed", "_loop", "_p", "_peer", "_t", "send_timeout")

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol, peer: Any) -> None:
        self._t = transport
        self._p = protocol
        self._peer = peer
        self._loop = asyncio.get_running_loop()
        self._closed = False
        # Seconds a send() may wait for the kernel to take its bytes before TimeoutError (None:
        # no limit). The timer exists only while a send waits, so a driver that sets this skips
        # a fail_after per write (~12 us on the bench box) for the common send that never waits.
        self.send_timeout: float | None = None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        p = self._p
        if not p.chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if not p.eof:
                fut = p.reader = self._loop.create_future()
                try:
                    await fut
                finally:
                    p.reader = None
            if not p.chunks:
                if self._closed:
                    raise anyio.ClosedResourceError
                if p.exc is not None:
                    raise anyio.BrokenResourceError from p.exc
                raise anyio.EndOfStream
        chunks = p.chunks
        data = chunks.popleft()
        if chunks and len(data) < max_bytes:
            # Everything that arrived meanwhile, in one piece (bounded by max_bytes).
            parts = [data]
            n = len(data)
            while chunks and n + len(chunks[0]) <= max_bytes:
                nxt = chunks.popleft()
                parts.append(nxt)
                n += len(nxt)
            data = b"".join(parts)
        if len(data) > max_bytes:
            chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        p.size -= len(data)
        if p.paused and p.size <= READ_BUFFER_BYTES // 2:
            p.paused = False
            self._t.resume_reading()
        return data

    async def send(self, item: bytes) -> None:
        p = self._p
        if self._closed:
            raise anyio.ClosedResourceError
        if p.closed or self._t.is_closing():
            raise anyio.BrokenResourceError from p.exc
        self._t.write(item)
        drain = p.drain
        if drain is not None and not drain.done():
            # The kernel did not take it all: wait until it did (or the peer died).
            timer = None
            if self.send_timeout is not None:
                timer = self._loop.call_later(self.send_timeout, _expire, drain)
            try:
                await drain
            finally:
                if timer is not None:
                    timer.cancel()
            if self._closed:
                raise anyio.ClosedResourceError
            if p.closed:
                raise anyio.BrokenResourceError from p.exc

    async def send_eof(self) -> None:
        try:
            self._t.write_eof()
        except (OSError, RuntimeError):
            pass

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._t.abort()
            _wake(self._p.reader)
            _wake(self._p.drain)

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        t = self._t
        peer = self._peer
        attrs: dict[Any, Callable[[], Any]] = {
            SocketAttribute.family: lambda: t.get_extra_info("socket").family,
            SocketAttribute.local_address: lambda: t.get_extra_info("sockname"),
            SocketAttribute.raw_socket: lambda: t.get_extra_info("socket"),
        }
        if isinstance(peer, tuple):
            attrs[SocketAttribute.remote_address] = lambda: peer
            attrs[SocketAttribute.local_port] = lambda: t.get_extra_info("sockname")[1]
            attrs[SocketAttribute.remote_port] = lambda: peer[1]
        return attrs


async def accept(listen_sock: socket.socket) -> ServerStream:
    """Accept one connection from a listening socket on the running asyncio loop.

    Raises OSError like socket.accept(); cancellation leaves the listening socket clean.
    """
    loop = asyncio.get_running_loop()
    try:
        sock, peer = await loop.sock_accept(listen_sock)
    except asyncio.CancelledError:
        # bpo-41317: a cancelled sock_accept can leave its reader registered (anyio does this
        # too), and the next accept on the socket would then fail.
        try:
            loop.remove_reader(listen_sock)
        except (ValueError, NotImplementedError):
            pass
        raise
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport, protocol = await loop.connect_accepted_socket(_Protocol, sock)
    except BaseException:
        sock.close()
        raise
    return ServerStream(transport, protocol, peer)
