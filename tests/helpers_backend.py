"""Upstream-client test tooling: in-memory network, scripted HTTP/1.1 and HTTP/2 origins.

- `pipe_pair()` makes two connected in-memory anyio ByteStreams (no sockets). A side can be
  told to stop accepting bytes after a limit (backpressure) for write-timeout tests.
- `MockBackend` is the real `AnyIOBackend` (so the real error translation is under test) whose
  raw connect returns a pipe; the other end is served by the origin registered for that
  host:port, in the backend's own task group. Knobs: refuse, hang on connect, ALPN via real TLS
  over the pipe (trustme), connection counts.
- `H1Origin` / `H2Origin` are small scripted origins over ANY anyio ByteStream (a pipe here,
  a socket in test_upstream_e2e.py). The script is an async `app(req, reply)`; the origin
  counts connections, requests, open streams, resets, PINGs and WINDOW_UPDATEs so tests can
  assert what the upstream saw.
Everything is bounded: waits take WAIT_S and fail the test instead of hanging it.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import h11
from anyio.abc import ByteStream, TaskGroup
from anyio.streams.tls import TLSAttribute, TLSStream
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from rawgate.upstream.backends import AnyIOBackend
from rawgate.config import TimeoutsConfig, UpstreamConfig

WAIT_S = 10.0
Header = tuple[bytes, bytes]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def wait_until(cond: Callable[[], object], what: str = "condition") -> None:
    """Poll a condition the code under test makes true in the background (bounded)."""
    with anyio.fail_after(WAIT_S):
        while not cond():  # noqa: ASYNC110 - nothing to wait on: the state is someone else's
            await anyio.sleep(0.005)
    assert cond(), what


# ---- in-memory byte pipes -------------------------------------------------------------------


class _Half:
    """One direction of a pipe."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self.broken = False
        self.limit = math.inf  # bytes the reader side may have queued before writers block
        self.changed = anyio.Event()

    def poke(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class PipeStream(ByteStream):
    """One end of an in-memory connection."""

    def __init__(self, rx: _Half, tx: _Half) -> None:
        self._rx = rx
        self._tx = tx
        self.closed = False
        self.sent = 0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        rx = self._rx
        while not rx.buf:
            if self.closed:
                raise anyio.ClosedResourceError
            if rx.broken:
                raise anyio.BrokenResourceError
            if rx.eof:
                raise anyio.EndOfStream
            await rx.changed.wait()
        data = bytes(rx.buf[:max_bytes])
        del rx.buf[:max_bytes]
        rx.poke()
        return data

    async def send(self, item: bytes) -> None:
        tx = self._tx
        while len(tx.buf) >= tx.limit and not tx.broken:
            await tx.changed.wait()
        if self.closed:
            raise anyio.ClosedResourceError
        if tx.broken or tx.eof:
            raise anyio.BrokenResourceError
        tx.buf += item
        self.sent += len(item)
        tx.poke()
        await anyio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self._tx.eof = True
        self._tx.poke()

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._tx.eof = True
        self._tx.poke()
        self._rx.broken = True  # the peer's writes now fail, like a reset socket
        self._rx.poke()
        await anyio.lowlevel.checkpoint()

    def is_readable(self) -> bool:
        return bool(self._rx.buf) or self._rx.eof or self._rx.broken

    def reset(self) -> None:
        """Abort both directions at once (like SO_LINGER 0)."""
        self.closed = True
        for half in (self._rx, self._tx):
            half.broken = True
            half.poke()


def pipe_pair() -> tuple[PipeStream, PipeStream]:
    a, b = _Half(), _Half()
    return PipeStream(a, b), PipeStream(b, a)


# ---- the mock backend -----------------------------------------------------------------------

Serve = Callable[[ByteStream], Awaitable[None]]


class MockBackend(AnyIOBackend):
    """AnyIOBackend whose raw TCP connect is an in-memory pipe to a registered origin.

    Use as `async with MockBackend() as net: net.add("origin", 80, origin.serve)`.
    """

    def __init__(self) -> None:
        self._routes: dict[tuple[str, int], Serve] = {}
        self.refuse: set[tuple[str, int]] = set()
        self.hang: set[tuple[str, int]] = set()
        self.connects: list[tuple[str, int]] = []
        self.client_ends: list[PipeStream] = []
        self.server_ends: list[PipeStream] = []
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> MockBackend:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(*exc)

    def add(self, host: str, port: int, serve: Serve) -> None:
        self._routes[(host, port)] = serve

    async def _open(self, host: str, port: int) -> ByteStream:
        self.connects.append((host, port))
        if (host, port) in self.hang:
            await anyio.sleep_forever()
        if (host, port) in self.refuse or (host, port) not in self._routes:
            raise ConnectionRefusedError(111, "Connection refused")
        client, server = pipe_pair()
        self.client_ends.append(client)
        self.server_ends.append(server)
        assert self._tg is not None, "enter the MockBackend first"
        self._tg.start_soon(_serve_quietly, self._routes[(host, port)], server)
        return client


async def _serve_quietly(serve: Serve, stream: ByteStream) -> None:
    try:
        await serve(stream)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
        pass
    finally:
        await stream.aclose()


def tls_server(serve_h1: Serve | None, serve_h2: Serve | None, ctx: ssl.SSLContext) -> Serve:
    """Wrap origins in real TLS (works over pipes and sockets); ALPN picks h2 or h1."""

    async def serve(stream: ByteStream) -> None:
        tls = await TLSStream.wrap(
            stream, server_side=True, ssl_context=ctx, standard_compatible=False
        )
        alpn = tls.extra(TLSAttribute.alpn_protocol, None)
        if alpn == "h2":
            assert serve_h2 is not None
            await serve_h2(tls)
        else:
            assert serve_h1 is not None
            await serve_h1(tls)

    return serve


def server_tls_context(ca: Any, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("origin.test", "localhost", "127.0.0.1").configure_cert(ctx)
    ctx.set_alpn_protocols(alpn)
    return ctx


def client_tls_context(ca: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def config(**upstream: Any) -> UpstreamConfig:
    return UpstreamConfig(**upstream)


def timeouts(**t: Any) -> TimeoutsConfig:
    base: dict[str, Any] = {
        "upstream_connect_s": 5.0,
        "upstream_pool_s": 5.0,
        "upstream_headers_s": 5.0,
        "upstream_read_idle_s": 5.0,
        "upstream_write_s": 5.0,
    }
    base.update(t)
    return TimeoutsConfig(**base)


# ---- scripted origins -----------------------------------------------------------------------


class OriginRequest:
    def __init__(self, method: bytes, path: bytes, headers: list[Header], body: bytes):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


App = Callable[[OriginRequest, Any], Awaitable[None]]


async def echo_app(req: OriginRequest, reply: Any) -> None:
    """200 with `path|body` as the body, in one piece."""
    await reply.respond(200, [(b"content-type", b"text/plain")], req.path + b"|" + req.body)


class _Counters:
    def __init__(self) -> None:
        self.connections = 0  # accepted so far
        self.open_connections = 0
        self.requests = 0
        self.active = 0  # requests whose app is running now
        self.max_active = 0
        self.cancelled = 0  # apps cancelled because the client went away / reset the stream


class H1Reply:
    def __init__(self, origin: H1Origin, conn: h11.Connection, stream: ByteStream) -> None:
        self._o = origin
        self._h = conn
        self._s = stream
        self.started = False

    async def start(self, status: int = 200, headers: list[Header] | None = None) -> None:
        hdrs = list(headers or [])
        if not any(n == b"content-length" for n, _ in hdrs):
            hdrs.append((b"transfer-encoding", b"chunked"))
        self.started = True
        await self._s.send(self._h.send(h11.Response(status_code=status, headers=hdrs)))

    async def send(self, data: bytes) -> None:
        if data:
            await self._s.send(self._h.send(h11.Data(data=data)))

    async def end(self, data: bytes = b"") -> None:
        await self.send(data)
        await self._s.send(self._h.send(h11.EndOfMessage()))

    async def respond(self, status: int, headers: list[Header], body: bytes) -> None:
        hdrs = [*headers, (b"content-length", b"%d" % len(body))]
        self.started = True
        out = self._h.send(h11.Response(status_code=status, headers=hdrs))
        out += self._h.send(h11.Data(data=body)) if body else b""
        out += self._h.send(h11.EndOfMessage())
        await self._s.send(out)

    async def raw(self, data: bytes) -> None:
        """Bytes straight to the socket (broken framing scripts)."""
        await self._s.send(data)

    async def abort(self) -> None:
        """Close the connection now (mid-response)."""
        raise _Abort


class _Abort(Exception):
    pass


class H1Origin:
    """A keep-alive HTTP/1.1 origin running `app` for each request."""

    def __init__(self, app: App = echo_app) -> None:
        self.app = app
        self.stats = _Counters()
        self.per_connection: list[int] = []  # requests served on each connection

    async def serve(self, stream: ByteStream, initial: bytes = b"") -> None:
        st = self.stats
        st.connections += 1
        st.open_connections += 1
        idx = len(self.per_connection)
        self.per_connection.append(0)
        h = h11.Connection(h11.SERVER)
        if initial:
            h.receive_data(initial)
        try:
            while True:
                req = await self._read_request(h, stream)
                if req is None:
                    return
                st.requests += 1
                self.per_connection[idx] += 1
                reply = H1Reply(self, h, stream)
                st.active += 1
                st.max_active = max(st.max_active, st.active)
                try:
                    await self.app(req, reply)
                except _Abort:
                    return
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    st.cancelled += 1
                    return
                finally:
                    st.active -= 1
                if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                    return
                h.start_next_cycle()
        finally:
            st.open_connections -= 1
            await stream.aclose()

    async def _read_request(self, h: h11.Connection, stream: ByteStream) -> OriginRequest | None:
        head: h11.Request | None = None
        body = b""
        while True:
            try:
                ev = h.next_event()
            except h11.RemoteProtocolError:
                return None
            if ev is h11.NEED_DATA:
                try:
                    data = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    data = b""
                h.receive_data(data)
                if not data and head is None:
                    return None
                continue
            if isinstance(ev, h11.Request):
                head = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                assert head is not None
                return OriginRequest(head.method, head.target, list(head.headers), body)
            elif isinstance(ev, h11.ConnectionClosed):
                return None


class H2Reply:
    def __init__(self, conn: _H2ServerConn, sid: int) -> None:
        self._c = conn
        self.sid = sid
        self.started = False
        self.reset_by_client = anyio.Event()

    async def start(self, status: int = 200, headers: list[Header] | None = None) -> None:
        self.started = True
        self._c.h.send_headers(self.sid, [(b":status", b"%d" % status), *(headers or [])])
        await self._c.flush()

    async def send(self, data: bytes, end: bool = False) -> None:
        c = self._c
        view = memoryview(data)
        while view or end:
            if self.reset_by_client.is_set():
                await anyio.sleep_forever()  # our scope is cancelled: this raises at once
            win = c.h.local_flow_control_window(self.sid)
            if view and win <= 0:
                await c.window_changed()
                continue
            n = min(len(view), win, c.h.max_outbound_frame_size)
            last = end and n == len(view)
            c.h.send_data(self.sid, bytes(view[:n]), end_stream=last)
            view = view[n:]
            await c.flush()
            if last:
                return

    async def end(self, data: bytes = b"") -> None:
        await self.send(data, end=True)

    async def respond(self, status: int, headers: list[Header], body: bytes) -> None:
        await self.start(status, [*headers, (b"content-length", b"%d" % len(body))])
        await self.end(body)

    async def reset(self, code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        self._c.h.reset_stream(self.sid, code)
        await self._c.flush()

    async def abort(self) -> None:
        """Drop the whole TCP connection now."""
        await self._c.stream.aclose()
        await anyio.sleep_forever()  # the connection's task group cancels us

    async def goaway(self, last_stream_id: int | None = None, code: int = 0) -> None:
        await self._c.goaway(last_stream_id, code)


class H2Origin:
    """An HTTP/2 origin (h2c or inside TLS) running `app` per stream, one task per stream."""

    def __init__(
        self,
        app: App = echo_app,
        *,
        max_streams: int = 100,
        window: int = 65535,
        answer_pings: bool = True,
    ) -> None:
        self.app = app
        self.max_streams = max_streams
        self.window = window
        self.answer_pings = answer_pings
        self.stats = _Counters()
        self.conns: list[_H2ServerConn] = []
        self.resets: list[tuple[int, int]] = []  # (stream id, code) the client sent
        self.window_updates: list[tuple[int, int]] = []  # (stream id, increment) received
        self.pings = 0

    async def serve(self, stream: ByteStream, initial: bytes = b"") -> None:
        conn = _H2ServerConn(self, stream)
        self.conns.append(conn)
        await conn.run(initial)

    @property
    def open_streams(self) -> int:
        return sum(len(c.replies) for c in self.conns)

    async def goaway_all(self, last_stream_id: int | None = None) -> None:
        for c in self.conns:
            await c.goaway(last_stream_id, 0)


class _H2ServerConn:
    def __init__(self, origin: H2Origin, stream: ByteStream) -> None:
        self.o = origin
        self.stream = stream
        self.h = H2Connection(
            H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True)
        )
        self.replies: dict[int, H2Reply] = {}
        self.scopes: dict[int, anyio.CancelScope] = {}
        self.bodies: dict[int, list[bytes]] = {}
        self.heads: dict[int, list[Header]] = {}
        self._lock = anyio.Lock()
        self._window = anyio.Event()
        self.frozen = False  # stop reading and writing: a peer that died without a FIN
        self.error: ProtocolError | None = None  # why the origin dropped the connection

    async def flush(self) -> None:
        async with self._lock:
            data = self.h.data_to_send()
            if data and not self.frozen:
                try:
                    await self.stream.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass

    async def window_changed(self) -> None:
        with anyio.fail_after(WAIT_S):
            await self._window.wait()

    async def goaway(self, last_stream_id: int | None, code: int) -> None:
        last = self.h.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        async with self._lock:
            await self.stream.send(
                GoAwayFrame(0, last_stream_id=last, error_code=code).serialize()
            )

    async def run(self, initial: bytes) -> None:
        o, h, st = self.o, self.h, self.o.stats
        st.connections += 1
        st.open_connections += 1
        h.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: o.max_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: o.window,
            },
        )
        h.initiate_connection()
        await self.flush()
        try:
            async with anyio.create_task_group() as tg:
                data = initial
                while True:
                    if not data:
                        try:
                            data = await self.stream.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError,
                                anyio.ClosedResourceError):
                            break
                    if self.frozen:
                        await anyio.sleep_forever()  # a dead peer: never reads again
                    try:
                        events = h.receive_data(data)
                    except ProtocolError as exc:
                        self.error = exc
                        break
                    data = b""
                    for ev in events:
                        self._event(ev, tg)
                    await self.flush()
                tg.cancel_scope.cancel()
        finally:
            st.open_connections -= 1
            for scope in self.scopes.values():
                scope.cancel()

    def _event(self, ev: Any, tg: TaskGroup) -> None:
        o, h = self.o, self.h
        if isinstance(ev, RequestReceived):
            self.heads[ev.stream_id] = list(ev.headers)
            self.bodies[ev.stream_id] = []
            if ev.stream_ended is not None:
                self._start(ev.stream_id, tg)
        elif isinstance(ev, DataReceived):
            self.bodies.setdefault(ev.stream_id, []).append(ev.data)
            if ev.flow_controlled_length:
                try:
                    h.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                except StreamClosedError:
                    pass
        elif isinstance(ev, StreamEnded):
            if ev.stream_id in self.heads and ev.stream_id not in self.replies:
                self._start(ev.stream_id, tg)
        elif isinstance(ev, StreamReset):
            o.resets.append((ev.stream_id, int(ev.error_code)))
            r = self.replies.get(ev.stream_id)
            if r is not None:
                r.reset_by_client.set()
            scope = self.scopes.get(ev.stream_id)
            if scope is not None:
                scope.cancel()
        elif isinstance(ev, WindowUpdated):
            o.window_updates.append((ev.stream_id, ev.delta))
            self._window.set()
            self._window = anyio.Event()
        elif isinstance(ev, PingReceived):
            o.pings += 1
            if not o.answer_pings:
                self.frozen = True
        elif isinstance(ev, ConnectionTerminated):
            pass

    def _start(self, sid: int, tg: TaskGroup) -> None:
        head = dict(self.heads.pop(sid))
        body = b"".join(self.bodies.pop(sid, []))
        req = OriginRequest(head[b":method"], head[b":path"], list(head.items()), body)
        reply = H2Reply(self, sid)
        self.replies[sid] = reply
        tg.start_soon(self._run_app, req, reply)

    async def _run_app(self, req: OriginRequest, reply: H2Reply) -> None:
        st = self.o.stats
        st.requests += 1
        st.active += 1
        st.max_active = max(st.max_active, st.active)
        scope = self.scopes[reply.sid] = anyio.CancelScope()
        try:
            with scope:
                await self.o.app(req, reply)
            if scope.cancelled_caught or reply.reset_by_client.is_set():
                st.cancelled += 1
        finally:
            st.active -= 1
            self.replies.pop(reply.sid, None)
            self.scopes.pop(reply.sid, None)
