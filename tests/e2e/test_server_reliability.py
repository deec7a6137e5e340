"""Inbound-server reliability regressions (issue 12), each in the attack's shape at suite size.

Memory is asserted as bytes still held (tracemalloc, gc disabled so no collection can hide a
reference cycle) or bytes buffered, CPU as bytes scanned; never as wall time. Real loopback
sockets (127.0.0.1, port 0) unless the item is about parsing bytes.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.lowlevel
import h2.exceptions
import h11
import msgspec
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame, RstStreamFrame

from rawgate.config import Config
from rawgate.conn import ConnInfo, ServerState
from rawgate.http import h1_parse, h1_server, h2_server, listener
from rawgate.http.app import GatewayApp
from rawgate.respond import json_response
from rawgate.seam import Request, ResponseSink
from tests.helpers_gateway import gateway_stack
from tests.helpers_h1 import h1_serving, memory_stream_pair
from tests.helpers_h2 import FrameFactory, FrameReader, H2Client, h2_client

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def make_cfg(**sections: dict[str, Any]) -> Config:
    cfg = Config()
    for name, values in sections.items():
        cfg = msgspec.structs.replace(
            cfg, **{name: msgspec.structs.replace(getattr(cfg, name), **values)}
        )
    return cfg


class EchoApp:
    """Answers with the body length; counts what reached it."""

    def __init__(self) -> None:
        self.bodies: list[int] = []

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        self.bodies.append(len(request.body))
        await json_response(sink, 200, b'{"n":%d}' % len(request.body))


@asynccontextmanager
async def serving(app: Any, cfg: Config | None = None) -> AsyncIterator[listener.Server]:
    async with listener.open_server(app, cfg or Config(), host="127.0.0.1", port=0) as server:
        yield server
    assert server.connections == 0


@contextmanager
def no_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


async def wait_idle(server: listener.Server) -> None:
    for _ in range(1000):  # bounded: 10 s at most
        if not server.connections:
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"{server.connections} connection(s) still open")


# ---- 1. aborted HTTP/1.1 uploads are freed without a collection -----------------------------


async def test_aborted_h1_uploads_are_freed_without_gc() -> None:
    size = 2 * MiB
    n = 6
    app = EchoApp()
    async with serving(app) as server:
        port = server.port
        head = (
            b"POST /up HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % size
        )
        body = b"x" * (size - 1)  # one byte short, then close

        async def abort_one() -> None:
            s = await anyio.connect_tcp("127.0.0.1", port)
            await s.send(head + body)
            await s.aclose()

        await abort_one()  # warm up: first-use allocations are not a leak
        await wait_idle(server)
        with no_gc():
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                for _ in range(n):
                    await abort_one()
                await wait_idle(server)
                held = tracemalloc.get_traced_memory()[0] - base
                # Not one connection or exchange object survives: no cycle waits for a gc.
                alive = [
                    o for o in gc.get_objects() if type(o) in (h1_server._Conn, h1_server._Exchange)
                ]
            finally:
                tracemalloc.stop()
        print(f"\nbytes still held after {n} aborted {size}-byte uploads: {held}")
        assert held < size // 2, held
        assert alive == []
    assert app.bodies == []


# ---- 5. a slow HTTP/1.1 head is scanned once, not once per read -----------------------------


class _ScanCount:
    """Bytes offered to the head parsers: rawgate's fast-path regex, h11, the end-of-head search."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fast = self.h11 = self.search = self.calls = 0
        fast = h1_parse.fast_head  # what h1_server calls (it imports it from h1_parse)
        next_event = h11.Connection.next_event
        count = self

        def fast_head(data: Any) -> Any:
            count.fast += len(data)
            count.calls += 1
            return fast(data)

        def h11_next_event(h: h11.Connection) -> Any:
            count.h11 += len(h._receive_buffer)
            count.calls += 1
            return next_event(h)

        monkeypatch.setattr(h1_server, "fast_head", fast_head)
        monkeypatch.setattr(h11.Connection, "next_event", h11_next_event)
        search = getattr(h1_server, "head_end", None)
        if search is not None:

            def head_end(data: Any, start: int) -> Any:
                count.search += len(data) - start
                count.calls += 1
                return search(data, start)

            monkeypatch.setattr(h1_server, "head_end", head_end)

    @property
    def total(self) -> int:
        return self.fast + self.h11 + self.search


def _h1_conn(cfg: Config) -> Any:
    return h1_server._Conn(
        cast(Any, None), EchoApp(), cfg, ConnInfo(client=("127.0.0.1", 1)), ServerState()
    )


@pytest.mark.parametrize("extra", [b"", b"transfer-encoding: chunked\r\n"])
async def test_slow_head_is_scanned_in_linear_bytes(
    monkeypatch: pytest.MonkeyPatch, extra: bytes
) -> None:
    # A 60 KB head in 3-byte pieces (the fast path's shape, and one that needs h11).
    filler = b"".join(b"x-f%d: %s\r\n" % (i, b"v" * 50) for i in range(1000))
    head = b"GET /x HTTP/1.1\r\nhost: localhost\r\n" + extra + filler + b"\r\n"
    if extra:
        head += b"0\r\n\r\n"
    assert 55_000 < len(head) < 64 * 1024
    count = _ScanCount(monkeypatch)
    conn = _h1_conn(make_cfg(limits={"max_header_count": 1100}))
    for i in range(0, len(head), 3):
        conn._feed(head[i : i + 3])
    assert len(conn._queue) == 1 and conn._queue[0].error is None
    print(
        f"\n{len(head)}-byte head in 3-byte pieces: {count.total} bytes scanned"
        f" (fast {count.fast}, h11 {count.h11}, search {count.search}), {count.calls} calls"
    )
    assert count.total < 4 * len(head)


# ---- smaller HTTP/1.1 items -------------------------------------------------------------------


@pytest.mark.parametrize("piece", [0, 1000, 7])
async def test_long_target_gets_414_however_the_bytes_arrive(piece: int) -> None:
    raw = b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\nhost: localhost\r\n\r\n"
    app = EchoApp()
    async with h1_serving(app, Config()) as c:
        if not piece:
            await c.send(raw)
        else:
            for i in range(0, len(raw), piece):
                await c.send(raw[i : i + piece])
                await anyio.lowlevel.checkpoint()  # the server reads each piece on its own
        (r,) = await c.responses(1)
    assert r.status == 414, r
    assert app.bodies == []


async def test_obs_folded_header_is_400() -> None:
    raw = (
        b"POST /x HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer\r\n sk-key\r\n"
        b"content-length: 0\r\n\r\n"
    )
    app = EchoApp()
    async with h1_serving(app, Config()) as c:
        await c.send(raw)
        (r,) = await c.responses(1)
    assert r.status == 400 and b"folding" in r.body
    assert app.bodies == []


# ---- 10. a connection that never completes a request head gets the head timeout ------------


async def _held_until_closed(port: int, first: bytes) -> bytes:
    """Everything the server sends after `first` until it closes (bounded: 10 s)."""
    got = bytearray()
    s = await anyio.connect_tcp("127.0.0.1", port)
    async with s:
        await s.send(first)
        with anyio.fail_after(10):
            while True:
                try:
                    got += await s.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return bytes(got)


@pytest.mark.parametrize("proto", ["h2c", "h1"])
async def test_connection_without_a_request_head_gets_the_head_timeout(proto: str) -> None:
    # keep-alive 1 h: before the fix an h2c preface-only connection was held that long.
    cfg = make_cfg(timeouts={"header_read_s": 0.3, "keepalive_idle_s": 3600.0})
    first = FrameFactory().preface() if proto == "h2c" else b"GET / HT"
    async with serving(EchoApp(), cfg) as server:
        got = await _held_until_closed(server.port, first)
        await wait_idle(server)
    if proto == "h2c":
        goaway = FrameReader().feed(got)[-1]
        assert isinstance(goaway, GoAwayFrame) and goaway.error_code == 0
    else:
        assert got.startswith(b"HTTP/1.1 408 ")


# ---- 2. auth on the head; a process-wide budget for buffered bodies; h2 windows -------------

KEY = "sk-test-key-1"


def auth_cfg(**limits: Any) -> Config:
    return make_cfg(auth={"mode": "strict", "api_keys": [KEY]}, limits=limits)


async def _flood(c: H2Client, streams: int, size: int, headers: list[tuple[bytes, bytes]]) -> int:
    """Open `streams` POSTs and push `size` body bytes on each as far as flow control lets;
    returns the DATA bytes the server let in (the client stops at a reset or an answer)."""
    body = b"x" * 16384
    sent = 0
    sids = [
        await c.open_stream("POST", "/v1/chat/completions", headers, end_stream=False)
        for _ in range(streams)
    ]

    async def push(sid: int) -> None:
        nonlocal sent
        off = 0
        st = c.streams[sid]
        while off < size and st.reset_code is None and not st.ended and not c.eof:
            n = min(size - off, len(body), c.conn.local_flow_control_window(sid))
            if n <= 0:
                with anyio.move_on_after(0.5):  # a window that stays shut ends the push
                    await c.wait_for(
                        lambda: (
                            c.conn.local_flow_control_window(sid) > 0
                            or st.reset_code is not None
                            or st.ended
                        )
                    )
                if c.conn.local_flow_control_window(sid) <= 0:
                    return
                continue
            try:
                c.conn.send_data(sid, body[:n], end_stream=off + n >= size)
            except h2.exceptions.StreamClosedError:
                return
            off += n
            sent += n
            await c.flush()

    async with anyio.create_task_group() as tg:
        for sid in sids:
            tg.start_soon(push, sid)
    for sid in sids:
        await c.wait_for(lambda s=sid: c.streams[s].ended or c.streams[s].reset_code is not None)  # type: ignore[misc]
    return sent


async def test_h2_keyless_upload_flood_gets_401_on_the_head_and_no_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The shape at suite size: one h2c connection, no key, 20 streams x 1 MiB.
    streams, size = 20, 1 * MiB
    held = _track_h2_buffered(monkeypatch)
    app = GatewayApp(auth_cfg())
    async with serving(app, auth_cfg()) as server:
        async with h2_client("127.0.0.1", server.port) as c:
            with no_gc():
                tracemalloc.start()
                try:
                    base = tracemalloc.get_traced_memory()[0]
                    sent = await _flood(c, streams, size, [(b"content-type", b"application/json")])
                    peak = tracemalloc.get_traced_memory()[1] - base
                finally:
                    tracemalloc.stop()
            statuses = {c.streams[s].status for s in c.streams}
        await wait_idle(server)
        assert server.state.buffered_body_bytes == 0
    print(
        f"\nh2 keyless flood {streams} x {size}: {sent} DATA bytes let in, peak traced {peak},"
        f" peak held {held[0]}"
    )
    assert statuses == {401}
    assert held[0] == 0  # not one body byte kept
    # At most each stream's initial window (64 KiB - 1), never reopened: 1.25 MiB of 20 MiB.
    assert sent <= streams * 65535
    assert peak < 4 * MiB


async def test_h1_keyless_upload_gets_401_before_its_body() -> None:
    app = GatewayApp(auth_cfg())
    async with serving(app, auth_cfg()) as server:
        s = await anyio.connect_tcp("127.0.0.1", server.port)
        async with s:
            # Only the head is sent: the answer must not wait for the 10 MiB it announces.
            await s.send(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n"
                b"content-type: application/json"
                b"\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n" % (10 * MiB)
            )
            got = b""
            with anyio.fail_after(10):
                while b"\r\n\r\n" not in got:
                    got += await s.receive()
        assert got.startswith(b"HTTP/1.1 401 "), got[:200]  # no 100 Continue first
        assert b"connection: close" in got and b"x-request-id: " in got
        await wait_idle(server)
        assert server.state.buffered_body_bytes == 0


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        (b"origin: https://evil.example\r\ncontent-type: text/plain", b"403"),
        (b"content-type: application/x-www-form-urlencoded", b"415"),
    ],
    ids=["foreign-origin", "non-json"],
)
async def test_h1_web_page_upload_is_refused_before_its_body(extra: bytes, status: bytes) -> None:
    """Auth off (the loopback default): a request __call__ refuses whatever its body (a web
    page's Origin, a form body) is refused on its head too, so its body is never read."""
    app = GatewayApp(Config())
    bodies: list[bytes] = []

    async def handler(request: Request, sink: ResponseSink) -> None:  # never reached
        bodies.append(request.body)
        await sink.respond(200, [], b"{}")

    app.router.add("POST", "/v1/chat/completions", handler)
    async with serving(app) as server:
        s = await anyio.connect_tcp("127.0.0.1", server.port)
        async with s:
            await s.send(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n"
                + extra
                + b"\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n" % (10 * MiB)
            )
            got = b""
            with anyio.fail_after(10):
                while b"\r\n\r\n" not in got:
                    got += await s.receive()
        assert got.startswith(b"HTTP/1.1 " + status + b" "), got[:200]  # no 100 Continue
        await wait_idle(server)
        assert server.state.buffered_body_bytes == 0 and bodies == []


async def test_h1_keyed_upload_still_works() -> None:
    app = EchoApp()
    admitted: list[str] = []

    def admit_head(method: str, path: str, query: str, headers: list[Any]) -> bool:
        admitted.append(path)
        return True

    app.admit_head = admit_head  # type: ignore[attr-defined]
    async with serving(app) as server:
        s = await anyio.connect_tcp("127.0.0.1", server.port)
        async with s:
            await s.send(b"POST /up HTTP/1.1\r\nhost: localhost\r\ncontent-length: 3\r\n\r\nabc")
            got = b""
            with anyio.fail_after(10):
                while b'{"n":3}' not in got:
                    got += await s.receive()
    assert admitted == ["/up"] and app.bodies == [3]


async def test_h1_body_budget_is_503_before_more_is_read() -> None:
    budget = 1 * MiB
    cfg = make_cfg(limits={"max_buffered_body_bytes": budget})
    app = EchoApp()
    async with serving(app, cfg) as server:
        state = server.state
        a = await anyio.connect_tcp("127.0.0.1", server.port)
        b = await anyio.connect_tcp("127.0.0.1", server.port)
        ch = await anyio.connect_tcp("127.0.0.1", server.port)
        async with a, b, ch:
            size = 800 * 1024
            await a.send(
                b"POST /a HTTP/1.1\r\nhost: localhost\r\ncontent-length: %d\r\n\r\n" % size
            )
            await a.send(b"x" * (700 * 1024))  # held: 700 KiB of the 1 MiB budget
            for _ in range(1000):  # bounded: 10 s at most
                if state.buffered_body_bytes >= 700 * 1024:
                    break
                await anyio.sleep(0.01)
            # Declared over what is left: 503 on the head, before any body byte.
            await b.send(
                b"POST /b HTTP/1.1\r\nhost: localhost\r\ncontent-length: %d\r\n\r\n" % size
            )
            rb = await _read_head(b)
            # Chunked: 503 once the bytes held would pass the budget.
            await ch.send(
                b"POST /c HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            piece = b"%x\r\n%s\r\n" % (100 * 1024, b"y" * 100 * 1024)
            for _ in range(4):
                await ch.send(piece)
            rc = await _read_head(ch)
            assert state.buffered_body_bytes <= budget
            await a.send(b"x" * (size - 700 * 1024))
            ra = await _read_head(a)
        assert rb.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in rb, rb
        assert rc.startswith(b"HTTP/1.1 503 ") and b"max_buffered_body_bytes" in rc, rc
        assert ra.startswith(b"HTTP/1.1 200 "), ra
        await wait_idle(server)
        assert state.buffered_body_bytes == 0
    assert app.bodies == [size]


async def _read_head(s: Any) -> bytes:
    got = b""
    with anyio.fail_after(10):
        while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
            got += await s.receive()
    return got


def _track_h2_buffered(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """[peak of ServerState.buffered_body_bytes], sampled after every DATA event."""
    peak = [0]
    on_data = h2_server._Conn._on_data

    def wrapped(self: Any, ev: Any) -> None:
        on_data(self, ev)
        peak[0] = max(peak[0], self._state.buffered_body_bytes)

    monkeypatch.setattr(h2_server._Conn, "_on_data", wrapped)
    return peak


async def test_h2_body_budget_is_503_and_held_bytes_stay_under_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    budget = 200 * 1024
    cfg = make_cfg(limits={"max_buffered_body_bytes": budget})
    app = EchoApp()
    peak = _track_h2_buffered(monkeypatch)
    async with serving(app, cfg) as server:
        async with h2_client("127.0.0.1", server.port) as c:
            # 6 streams x 1 MiB: far more than the 200 KiB that may be held at once.
            await _flood(c, 6, 1 * MiB, [])
            codes = {c.streams[s].status for s in c.streams}
            r = next(c.streams[s] for s in c.streams if c.streams[s].status == 503)
        await wait_idle(server)
        assert server.state.buffered_body_bytes == 0
    print(f"\nh2 6 x 1 MiB under a {budget}-byte budget: peak held {peak[0]}")
    assert codes == {503}
    assert (b"retry-after", b"1") in (r.headers or [])
    assert 0 < peak[0] <= budget
    assert app.bodies == []


# ---- smaller HTTP/2 items ---------------------------------------------------------------------


async def test_data_on_a_closed_stream_counts_toward_the_flood_cap() -> None:
    cap = 50
    cfg = make_cfg(limits={"h2_max_noop_frames_per_s": cap})
    ff = FrameFactory()
    frames = 4 * cap
    raw = (
        ff.preface()
        + ff.headers(1, ff.request_headers("POST", "/x"), end_stream=False)
        + ff.rst(1)
        + b"".join(ff.data(1, b"x") for _ in range(frames))
    )
    async with serving(EchoApp(), cfg) as server:
        got = await _held_until_closed(server.port, raw)
    out = FrameReader().feed(got)
    resets = [f for f in out if isinstance(f, RstStreamFrame)]
    goaway = out[-1]
    # Before: one RST_STREAM per DATA frame (200) and the connection stayed open.
    assert len(resets) <= cap + 1, len(resets)
    assert isinstance(goaway, GoAwayFrame) and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


class HangApp:
    """/hang starts an SSE response and never finishes it."""

    def __init__(self) -> None:
        self.started = anyio.Event()

    async def __call__(self, req: Request, sink: ResponseSink) -> None:
        await sink.start(200, [(b"content-type", b"text/event-stream")])
        await sink.send(b"data: 1\n\n")
        self.started.set()
        await anyio.sleep_forever()


async def test_h2_streams_cut_by_the_shutdown_grace_get_rst_and_a_final_goaway() -> None:
    app = HangApp()
    async with serving(app) as server:
        s = await anyio.connect_tcp("127.0.0.1", server.port)
        async with s:
            ff = FrameFactory()
            await s.send(ff.preface() + ff.headers(1, ff.request_headers("GET", "/hang")))
            with anyio.fail_after(10):
                await app.started.wait()
            got = bytearray()
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.shutdown, 0.2)
                with anyio.fail_after(10):
                    while True:
                        try:
                            got += await s.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            break
    out = FrameReader().feed(bytes(got))
    goaways = [f for f in out if isinstance(f, GoAwayFrame)]
    resets = [f for f in out if isinstance(f, RstStreamFrame)]
    # The drain's GOAWAY(NO_ERROR), then, once the grace ran out, the cut stream's RST_STREAM
    # and a last GOAWAY with an error code.
    assert [g.error_code for g in goaways] == [0, ErrorCodes.INTERNAL_ERROR]
    assert [(r.stream_id, r.error_code) for r in resets] == [(1, ErrorCodes.INTERNAL_ERROR)]
    assert out[-1] is goaways[-1]


async def test_the_sniff_time_is_passed_to_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []

    async def fake_h2(stream: Any, *args: Any) -> None:
        seen.append(args[-1])
        await stream.aclose()

    monkeypatch.setattr(listener, "serve_h2", fake_h2)
    async with serving(EchoApp()) as server:
        s = await anyio.connect_tcp("127.0.0.1", server.port)
        async with s:
            await s.send(FrameFactory().preface()[:10])
            await anyio.sleep(0.3)  # the preface trickles in
            await s.send(FrameFactory().preface()[10:])
            gone = (anyio.EndOfStream, anyio.BrokenResourceError)
            with anyio.fail_after(10), pytest.raises(gone):
                await s.receive()
        await wait_idle(server)
    assert len(seen) == 1 and seen[0] >= 0.3


@pytest.mark.parametrize("proto", ["h2", "h1"])
async def test_time_spent_sniffing_counts_against_the_head_timeout(proto: str) -> None:
    # 29.9 of the 30 s head allowance went to the sniff: the driver has 0.1 s left, not 30.
    cfg = make_cfg(timeouts={"header_read_s": 30.0, "keepalive_idle_s": 3600.0})
    server_end, client = memory_stream_pair()
    state = ServerState()
    info = ConnInfo(client=("127.0.0.1", 1))
    got = bytearray()
    async with anyio.create_task_group() as tg:
        if proto == "h2":
            tg.start_soon(
                h2_server.serve_h2,
                server_end,
                EchoApp(),
                cfg,
                info,
                state,
                FrameFactory().preface(),
                29.9,
            )
        else:
            tg.start_soon(
                h1_server.serve_h1,
                server_end,
                EchoApp(),
                cfg,
                info,
                state,
                b"POST /x HTTP/1.1\r\nhost: localhost\r\n",
                29.9,
            )
        with anyio.fail_after(10):
            while True:
                try:
                    got += await client.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        await client.aclose()
    if proto == "h2":
        goaway = FrameReader().feed(bytes(got))[-1]
        assert isinstance(goaway, GoAwayFrame) and goaway.error_code == 0
    else:
        assert got.startswith(b"HTTP/1.1 408 ")


async def test_h1_stream_cut_by_the_shutdown_grace_ends_with_an_error_event(
    tmp_path: Path,
) -> None:
    """Issue 12: when the grace runs out, an SSE client on HTTP/1.1 gets an error event it can
    see (openai SDKs raise APIError), not a stream that merely stops."""
    async with gateway_stack(tmp_path, config={"limits": {"sse_heartbeat_s": 0}}) as run:
        s = await anyio.connect_tcp("127.0.0.1", run.server.port)
        async with s:
            body = msgspec.json.encode(
                {
                    "model": "gemini-2.5-flash",
                    "stream": True,
                    "messages": [
                        {
                            "role": "user",
                            "content": "[[emu:reply chars=500]] [[emu:chunks n=50]]"
                            " [[emu:delay ms=200]]",
                        }
                    ],
                }
            )
            await s.send(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body
            )
            got = b""
            with anyio.fail_after(10):
                while b"data: {" not in got:  # the stream is running
                    got += await s.receive()
            async with anyio.create_task_group() as tg:
                tg.start_soon(run.server.shutdown, 0.3)
                with anyio.fail_after(10):
                    while True:
                        try:
                            got += await s.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            break
    assert b'"code":"server_shutting_down"' in got, got[-400:]
    assert b"data: [DONE]" not in got  # a cut answer is never passed off as complete
