"""server_stream.ServerStream over real loopback sockets: the anyio SocketStream contract the
HTTP drivers rely on (data, EOF, reset, close, backpressure, read pausing)."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import SocketAttribute

from rawgate.http import server_stream
from rawgate.http.server_stream import ServerStream, accept

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[("asyncio", {}), ("asyncio", {"use_uvloop": True})], ids=["asyncio", "uvloop"]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return request.param


async def _pair() -> tuple[ServerStream, socket.socket, socket.socket]:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    lst.setblocking(False)
    cli = socket.create_connection(lst.getsockname())
    srv = await accept(lst)
    return srv, cli, lst


@pytest.fixture
async def pair() -> AsyncIterator[tuple[ServerStream, socket.socket]]:
    srv, cli, lst = await _pair()
    try:
        yield srv, cli
    finally:
        await srv.aclose()
        cli.close()
        lst.close()


async def test_receive_send_and_attributes(pair: tuple[ServerStream, socket.socket]) -> None:
    srv, cli = pair
    cli.sendall(b"hello")
    assert await srv.receive() == b"hello"
    await srv.send(b"world")
    assert cli.recv(100) == b"world"
    assert srv.extra(SocketAttribute.remote_address) == cli.getsockname()
    assert srv.extra(SocketAttribute.local_address) == cli.getpeername()
    assert srv.extra(SocketAttribute.remote_port) == cli.getsockname()[1]
    raw = srv.extra(SocketAttribute.raw_socket)
    assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def test_max_bytes_splits_and_joins(pair: tuple[ServerStream, socket.socket]) -> None:
    srv, cli = pair
    cli.sendall(b"abcdef")
    await anyio.sleep(0.05)
    cli.sendall(b"gh")
    await anyio.sleep(0.05)
    assert await srv.receive(4) == b"abcd"
    assert await srv.receive() == b"efgh"  # the rest and what came meanwhile, joined


async def test_eof_after_the_data(pair: tuple[ServerStream, socket.socket]) -> None:
    srv, cli = pair
    cli.sendall(b"last")
    cli.shutdown(socket.SHUT_WR)
    assert await srv.receive() == b"last"
    with pytest.raises(anyio.EndOfStream):
        await srv.receive()
    await srv.send(b"still writable")  # a half-closed client may read
    assert cli.recv(100) == b"still writable"


async def test_reset_is_broken_resource(pair: tuple[ServerStream, socket.socket]) -> None:
    srv, cli = pair
    cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    cli.close()  # RST
    with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
        await srv.receive()
    with pytest.raises(anyio.BrokenResourceError):
        await srv.send(b"x")


async def test_aclose_wakes_a_waiting_reader(pair: tuple[ServerStream, socket.socket]) -> None:
    srv, _ = pair
    seen: list[type[BaseException]] = []

    async def read() -> None:
        try:
            await srv.receive()
        except anyio.ClosedResourceError as e:
            seen.append(type(e))

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await anyio.sleep(0.05)
        await srv.aclose()
    assert seen == [anyio.ClosedResourceError]
    with pytest.raises(anyio.ClosedResourceError):
        await srv.send(b"x")


async def test_receive_is_cancellable(pair: tuple[ServerStream, socket.socket]) -> None:
    srv, cli = pair
    with anyio.move_on_after(0.05) as scope:
        await srv.receive()
    assert scope.cancelled_caught
    cli.sendall(b"after")
    assert await srv.receive() == b"after"  # the stream is still usable


async def test_send_waits_for_a_reader(pair: tuple[ServerStream, socket.socket]) -> None:
    srv, cli = pair
    big = b"x" * (64 << 20)  # more than loopback's socket buffers can hold
    done = anyio.Event()

    async def write() -> None:
        await srv.send(big)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        await anyio.sleep(0.1)
        assert not done.is_set()  # the kernel could not take it all: send() is still waiting
        got = 0
        cli.setblocking(False)
        with anyio.fail_after(10):
            while got < len(big):
                try:
                    got += len(cli.recv(4 << 20))
                except BlockingIOError:
                    await anyio.lowlevel.checkpoint()
        await done.wait()
    assert got == len(big)


async def test_reading_pauses_while_the_buffer_is_full(
    pair: tuple[ServerStream, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_stream, "READ_BUFFER_BYTES", 64 * 1024)
    srv, cli = pair
    cli.setblocking(False)
    sent = 0
    chunk = b"y" * 65536
    with anyio.fail_after(10):
        while True:  # fill until the client's send buffer is full too
            try:
                sent += cli.send(chunk)
            except BlockingIOError:
                await anyio.sleep(0.05)
                try:
                    sent += cli.send(chunk)
                except BlockingIOError:
                    break
    p = srv._p
    assert p.paused and p.size <= sent
    got = 0
    with anyio.fail_after(10):
        while got < sent:
            got += len(await srv.receive())
            try:
                cli.send(b"")
            except BlockingIOError:
                pass
    assert got == sent and not p.paused


async def test_send_timeout_only_while_waiting(pair: tuple[ServerStream, socket.socket]) -> None:
    srv, _ = pair
    srv.send_timeout = 0.2
    await srv.send(b"small")  # taken at once: no timer at all
    with anyio.fail_after(5), pytest.raises(TimeoutError):
        await srv.send(b"x" * (64 << 20))  # the client never reads
