"""The HTTP/2 driver: bytes in, frames out, over real socket pairs and loopback TCP/TLS.

Raw tests write frames built by FrameFactory and parse what comes back with FrameReader; the
behaviour tests drive H2Client (h2's client state machine). Every server started here is torn
down inside the test, and serve_h2 must have returned with its counters back at zero.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import msgspec
import orjson
import pytest
from anyio.abc import ByteStream, UNIXSocketStream
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import HeadersFrame, PingFrame, RstStreamFrame
from hypothesis import HealthCheck, given, settings, strategies as st

from rawgate.config import Config, LimitsConfig, TimeoutsConfig
from rawgate.conn import ConnInfo, ServerState
from rawgate.errors import BadRequest
from rawgate.http.h2_server import serve_h2
from rawgate.respond import error_response, json_response
from rawgate.seam import Request, ResponseSink
from tests.helpers_h2 import FrameFactory, FrameReader, H2Client, h2_client

pytestmark = pytest.mark.anyio

CALM = ErrorCodes.ENHANCE_YOUR_CALM


def make_cfg(**kw: Any) -> Config:
    limits = {k: v for k, v in kw.items() if k in LimitsConfig.__struct_fields__}
    timeouts = {k: v for k, v in kw.items() if k in TimeoutsConfig.__struct_fields__}
    assert len(limits) + len(timeouts) == len(kw), kw
    cfg = Config()
    return msgspec.structs.replace(
        cfg,
        limits=msgspec.structs.replace(cfg.limits, **limits),
        timeouts=msgspec.structs.replace(cfg.timeouts, **timeouts),
    )


# ---- test apps ----------------------------------------------------------------------------------


class Recorder:
    """An app whose behaviour each test picks by path; it records what reached it."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.cancelled: list[str] = []
        self.cancelled_event = anyio.Event()
        self.finished: list[str] = []
        self.release = anyio.Event()
        self.arrived = 0
        self.arrived_event = anyio.Event()
        self.expect = 0
        self.progress = 0  # bytes a streaming handler got accepted by sink.send()
        self.sink: ResponseSink | None = None

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        self.requests.append(request)
        try:
            await self._route(request, sink)
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(request.path)
            self.cancelled_event.set()
            raise
        self.finished.append(request.path)

    async def _route(self, req: Request, sink: ResponseSink) -> None:
        p = req.path
        if p == "/echo":
            body = orjson.dumps(
                {
                    "method": req.method,
                    "path": req.path,
                    "query": req.query,
                    "len": len(req.body),
                    "sha": hashlib.sha256(req.body).hexdigest(),
                    "version": req.http_version,
                }
            )
            await json_response(sink, 200, body)
        elif p == "/block":
            self.arrived += 1
            if self.arrived >= self.expect:
                self.arrived_event.set()
            await self.release.wait()
            await json_response(sink, 200, b'{"ok":true}')
        elif p == "/stream":
            n = int(req.query.split("=")[1]) if req.query else 64
            self.sink = sink
            await sink.start(200, [(b"content-type", b"text/event-stream")])
            chunk = b"x" * 16384
            for _ in range(n):
                await sink.send(chunk)
                self.progress += len(chunk)
            await sink.end(b"data: [DONE]\n\n")
        elif p == "/bigsend":
            self.sink = sink
            await sink.start(200, [])
            await sink.send(b"x" * (8 << 20))  # one call, far more than any buffer
            await sink.end()
        elif p == "/boom":
            raise RuntimeError("handler bug")
        elif p == "/boom-late":
            await sink.start(200, [])
            await sink.send(b"partial")
            raise RuntimeError("handler bug after start")
        elif p == "/silent":
            return
        elif p == "/bad":
            await error_response(sink, BadRequest("nope", param="x"))
        else:
            await json_response(sink, 404, b"{}")


# ---- harness ------------------------------------------------------------------------------------


class Harness:
    def __init__(self, client: ByteStream, state: ServerState, done: anyio.Event) -> None:
        self.client = client
        self.state = state
        self.done = done
        self.reader = FrameReader()
        self.ff = FrameFactory()

    async def send(self, data: bytes) -> None:
        try:
            await self.client.send(data)
        except (anyio.BrokenResourceError, OSError):
            pass  # the server may close mid-flood: the frames it sent back tell the story

    async def read_until_closed(self, timeout: float = 5.0) -> FrameReader:
        with anyio.fail_after(timeout):
            while True:
                try:
                    data = await self.client.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return self.reader
                self.reader.feed(data)

    async def read_until(self, pred: Any, timeout: float = 5.0) -> FrameReader:
        with anyio.fail_after(timeout):
            while not pred(self.reader):
                data = await self.client.receive(65536)
                self.reader.feed(data)
        return self.reader


async def _socket_pair() -> tuple[UNIXSocketStream, UNIXSocketStream]:
    a, b = socket.socketpair()
    return await UNIXSocketStream.from_socket(a), await UNIXSocketStream.from_socket(b)


@asynccontextmanager
async def serving(
    app: Any, cfg: Config | None = None, state: ServerState | None = None
) -> AsyncIterator[Harness]:
    server_stream, client_stream = await _socket_pair()
    state = state or ServerState()
    done = anyio.Event()

    async def run() -> None:
        try:
            info = ConnInfo(client=("127.0.0.1", 40000), scheme="http")
            await serve_h2(server_stream, app, cfg or Config(), info, state)
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        h = Harness(client_stream, state, done)
        try:
            yield h
        finally:
            await anyio.aclose_forcefully(client_stream)
            with anyio.fail_after(5):
                await done.wait()
    # No leaks: the driver returned and put every counter back.
    assert state.open_connections["h2"] == 0
    assert state.in_flight == 0


@asynccontextmanager
async def client_for(
    app: Any, cfg: Config | None = None, state: ServerState | None = None, **kw: Any
) -> AsyncIterator[tuple[H2Client, Harness]]:
    async with serving(app, cfg, state) as h, H2Client(h.client, **kw) as c:
        yield c, h


# ---- basic requests -----------------------------------------------------------------------------


async def test_get_response_has_date_server_and_length() -> None:
    app = Recorder()
    async with client_for(app) as (c, _):
        r = await c.request("GET", "/echo?a=1&b=2", headers=[(b"x-custom", b"Val")])
    assert r.status == 200
    assert r.header(b"server") == b"rawgate"
    date = r.header(b"date")
    assert date is not None and date.endswith(b" GMT")
    assert r.header(b"content-length") == str(len(r.body)).encode()
    got = r.json()
    assert got["method"] == "GET" and got["path"] == "/echo" and got["query"] == "a=1&b=2"
    assert got["version"] == "2"
    req = app.requests[0]
    assert req.http_version == "2" and req.scheme == "http"
    assert req.client == ("127.0.0.1", 40000)
    assert req.raw_target == b"/echo?a=1&b=2"
    # Pseudo-headers are gone, :authority became Host, names stay lower-case bytes.
    assert all(not k.startswith(b":") for k, _ in req.headers)
    assert req.header(b"host") == b"localhost"
    assert req.header(b"x-custom") == b"Val"


async def test_post_body_larger_than_windows_arrives_whole() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: > stream window, = connection window
    async with client_for(Recorder()) as (c, _):
        r = await c.request("POST", "/echo", body=body)
    got = r.json()
    assert got["len"] == len(body)
    assert got["sha"] == hashlib.sha256(body).hexdigest()


async def test_head_sends_headers_only_with_the_get_length() -> None:
    async with client_for(Recorder()) as (c, _):
        get = await c.request("GET", "/echo")
        head = await c.request("HEAD", "/echo")
    assert head.status == 200 and head.body == b""
    assert head.header(b"content-length") is not None
    assert int(head.header(b"content-length") or 0) == len(get.body) + 1  # "GET" vs "HEAD"


async def test_head_of_a_streamed_response_has_no_body() -> None:
    async with client_for(Recorder()) as (c, _):
        r = await c.request("HEAD", "/stream?n=3")
    assert r.status == 200 and r.body == b""


async def test_stream_response_reaches_the_client_in_order() -> None:
    async with client_for(Recorder()) as (c, _):
        r = await c.request("GET", "/stream?n=40")
    assert r.header(b"content-type") == b"text/event-stream"
    assert r.body == b"x" * 16384 * 40 + b"data: [DONE]\n\n"


async def test_openai_error_from_app_is_passed_through() -> None:
    async with client_for(Recorder()) as (c, _):
        r = await c.request("GET", "/bad")
    assert r.status == 400
    assert r.json()["error"]["param"] == "x"


# ---- handler failures ---------------------------------------------------------------------------


async def test_handler_exception_gives_openai_500() -> None:
    async with client_for(Recorder()) as (c, _):
        r = await c.request("GET", "/boom")
        again = await c.request("GET", "/echo")  # the connection survives
    assert r.status == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "internal_error"
    assert "handler bug" not in r.body.decode()  # no internals leak to the client
    assert again.status == 200


async def test_handler_exception_after_start_resets_the_stream() -> None:
    async with client_for(Recorder()) as (c, _):
        sid = await c.open_stream("GET", "/boom-late")
        with pytest.raises(ConnectionResetError, match=str(int(ErrorCodes.INTERNAL_ERROR))):
            await c.response(sid)
        assert c.received(sid) == b"partial"
        assert (await c.request("GET", "/echo")).status == 200


async def test_handler_that_never_responds_gives_500() -> None:
    async with client_for(Recorder()) as (c, _):
        r = await c.request("GET", "/silent")
    assert r.status == 500


# ---- limits -------------------------------------------------------------------------------------


async def test_content_length_over_limit_is_413_before_the_body() -> None:
    cfg = make_cfg(max_body_bytes=1000)
    app = Recorder()
    async with client_for(app, cfg) as (c, _):
        sid = await c.open_stream(
            "POST", "/echo", headers=[(b"content-length", b"5000")], end_stream=False
        )
        r = await c.response(sid)
        assert r.status == 413
        assert r.json()["error"]["code"] == "request_too_large"
        # RFC 9113 8.1: the unfinished request is stopped with RST_STREAM(NO_ERROR).
        await c.wait_for(lambda: c.streams[sid].reset_code is not None)
        assert c.streams[sid].reset_code == ErrorCodes.NO_ERROR
        assert (await c.request("GET", "/echo")).status == 200
    assert [r.path for r in app.requests] == ["/echo"]  # the 413 never reached the app


async def test_streamed_body_over_limit_is_413() -> None:
    cfg = make_cfg(max_body_bytes=100_000)
    app = Recorder()
    async with client_for(app, cfg) as (c, _):
        r = await c.request("POST", "/echo", body=b"y" * 300_000)
        assert r.status == 413
        assert (await c.request("GET", "/echo")).status == 200
    assert len(app.requests) == 1


async def test_body_exactly_at_limit_is_accepted() -> None:
    cfg = make_cfg(max_body_bytes=100_000)
    async with client_for(Recorder(), cfg) as (c, _):
        r = await c.request("POST", "/echo", body=b"y" * 100_000)
    assert r.status == 200 and r.json()["len"] == 100_000


async def test_too_many_headers_is_431() -> None:
    cfg = make_cfg(max_header_count=10)
    extra = [(f"x-h{i}".encode(), b"v") for i in range(11)]
    async with client_for(Recorder(), cfg) as (c, _):
        r = await c.request("GET", "/echo", headers=extra)
        ok = await c.request("GET", "/echo", headers=extra[:9])
    assert r.status == 431 and ok.status == 200


async def test_long_target_is_414_and_bad_target_is_400() -> None:
    cfg = make_cfg(max_url_bytes=100)
    async with client_for(Recorder(), cfg) as (c, _):
        long = await c.request("GET", "/echo?" + "a" * 200)
        bad = await c.request("GET", "/echo?\x7f")
    assert long.status == 414
    assert bad.status == 400 and bad.json()["error"]["type"] == "invalid_request_error"


async def test_request_body_idle_timeout_is_408() -> None:
    cfg = make_cfg(body_read_s=0.2)
    app = Recorder()
    async with client_for(app, cfg) as (c, _):
        sid = await c.open_stream("POST", "/echo", body=b"partial", end_stream=False)
        r = await c.response(sid)
    assert r.status == 408
    assert app.requests == []


# ---- concurrency, flow control, resets ----------------------------------------------------------


async def test_200_concurrent_streams_on_one_connection() -> None:
    cfg = make_cfg(h2_max_concurrent_streams=256)
    app = Recorder()
    app.expect = 200
    async with client_for(app, cfg) as (c, h):
        await c.wait_for(lambda: c.conn.remote_settings.max_concurrent_streams == 256)
        sids = [await c.open_stream("GET", "/block") for _ in range(200)]
        with anyio.fail_after(10):
            await app.arrived_event.wait()  # all 200 handlers run at the same time
        assert h.state.in_flight == 200
        app.release.set()
        for sid in sids:
            assert (await c.response(sid)).status == 200
    assert len(app.finished) == 200


async def test_streams_over_the_advertised_limit_are_refused() -> None:
    cfg = make_cfg(h2_max_concurrent_streams=5)
    app = Recorder()
    app.expect = 5
    async with serving(app, cfg) as h:
        # Sent before reading our SETTINGS, as a client may: 7 streams, the limit is 5.
        ff = h.ff
        await h.send(
            ff.preface() + b"".join(ff.headers(2 * i + 1, path_headers(ff)) for i in range(7))
        )
        await h.read_until(lambda r: r.rst_code(13) is not None and r.rst_code(11) is not None)
        assert h.reader.rst_code(11) == ErrorCodes.REFUSED_STREAM
        assert h.reader.rst_code(13) == ErrorCodes.REFUSED_STREAM
        with anyio.fail_after(5):
            await app.arrived_event.wait()
        app.release.set()
        await h.read_until(lambda r: all(r.status(2 * i + 1) == 200 for i in range(5)))
        assert h.reader.goaway() is None  # a stream error, not a connection error
    assert app.arrived == 5


def path_headers(ff: FrameFactory, path: str = "/block") -> list[tuple[bytes, bytes]]:
    return ff.request_headers("GET", path)


async def test_slow_reader_pauses_the_handler_and_resumes_on_window_update() -> None:
    app = Recorder()
    async with client_for(app, auto_ack=False) as (c, _):
        sid = await c.open_stream("GET", "/stream?n=64")  # 1 MiB
        window = 65535  # RFC default stream window: the client never acknowledges
        await c.wait_for(lambda: len(c.received(sid)) >= window)
        await anyio.sleep(0.2)  # give a misbehaving server time to push more
        assert len(c.received(sid)) == window
        # Bounded: the handler is parked in send(); it got at most one chunk past the window.
        assert app.progress <= window + 16384
        assert app.finished == []
        while not c.streams[sid].ended:
            await c.ack(sid)
            await c.wait_for(lambda: c.streams[sid].unacked > 0 or c.streams[sid].ended)
        assert c.received(sid) == b"x" * 16384 * 64 + b"data: [DONE]\n\n"
    assert app.finished == ["/stream"]


async def test_connection_window_is_shared_and_respected() -> None:
    # Big stream windows but the default 64 KiB connection window: two streams share it.
    app = Recorder()
    settings = {SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20}
    async with client_for(app, auto_ack=False, settings=settings) as (c, _):
        await c.wait_for(lambda: c.conn.remote_settings.initial_window_size > 0)
        a = await c.open_stream("GET", "/stream?n=16")
        b = await c.open_stream("GET", "/stream?n=16")
        await c.wait_for(lambda: len(c.received(a)) + len(c.received(b)) >= 65535)
        await anyio.sleep(0.2)
        assert len(c.received(a)) + len(c.received(b)) == 65535
        for _ in range(200):
            if c.streams[a].ended and c.streams[b].ended:
                break
            await c.ack(a)
            await c.ack(b)
            await c.wait_for(
                lambda: (
                    c.streams[a].unacked + c.streams[b].unacked > 0
                    or (c.streams[a].ended and c.streams[b].ended)
                )
            )
        assert c.received(a) == c.received(b) == b"x" * 16384 * 16 + b"data: [DONE]\n\n"


async def test_reset_cancels_only_that_stream() -> None:
    app = Recorder()
    app.expect = 2
    async with client_for(app) as (c, h):
        one = await c.open_stream("GET", "/block")
        two = await c.open_stream("GET", "/block")
        with anyio.fail_after(5):
            await app.arrived_event.wait()
        await c.reset(one)
        with anyio.fail_after(5):
            await app.cancelled_event.wait()
        assert app.cancelled == ["/block"] and h.state.in_flight == 1
        app.release.set()
        assert (await c.response(two)).status == 200
    assert app.finished == ["/block"]


async def test_client_disconnect_cancels_every_handler() -> None:
    app = Recorder()
    app.expect = 3
    async with serving(app) as h:
        c = H2Client(h.client)
        async with c:
            for _ in range(3):
                await c.open_stream("GET", "/block")
            with anyio.fail_after(5):
                await app.arrived_event.wait()
        # H2Client closed the socket: serving() checks serve_h2 returned with counters at zero.
        with anyio.fail_after(5):
            await h.done.wait()
    assert sorted(app.cancelled) == ["/block"] * 3


async def test_zero_window_hold_resets_the_stream() -> None:
    cfg = make_cfg(write_s=0.3)
    app = Recorder()
    settings = {SettingCodes.INITIAL_WINDOW_SIZE: 0}
    async with client_for(app, cfg, settings=settings) as (c, _):
        await c.wait_for(lambda: c.conn.remote_settings.initial_window_size > 0)
        sid = await c.open_stream("GET", "/stream?n=2")
        await c.wait_for(lambda: c.streams[sid].reset_code is not None)
        assert c.streams[sid].reset_code == ErrorCodes.CANCEL
        assert c.streams[sid].status == 200
        assert (await c.request("HEAD", "/echo")).status == 200  # connection still fine
    assert app.finished == ["/echo"]


@pytest.mark.parametrize("target", ["/stream?n=512", "/bigsend"])
async def test_peer_that_does_not_read_bounds_output_then_times_out(target: str) -> None:
    cfg = make_cfg(write_s=0.5, max_pending_output_bytes=64 * 1024)
    app = Recorder()
    async with serving(app, cfg) as h:
        ff = h.ff
        huge = {SettingCodes.INITIAL_WINDOW_SIZE: (1 << 31) - 1}
        await h.send(
            ff.preface(huge)
            + ff.window_update(0, (1 << 31) - 1 - 65535)
            + ff.headers(1, ff.request_headers("GET", target))
        )
        # The client reads nothing. The server must stop producing, then give up on write_s.
        with anyio.fail_after(10):
            await h.done.wait()
        # Never the whole 8 MiB handed to h2 / buffered: pending output stopped the sender.
        assert app.sink is not None and app.sink.bytes_sent < 4 * 1024 * 1024
        assert len(app.requests) == 1 and app.finished == []  # the handler was stopped


# ---- abuse: GOAWAY(ENHANCE_YOUR_CALM) -----------------------------------------------------------


async def _abuse(payload: bytes, cfg: Config | None = None, app: Any = None) -> FrameReader:
    async with serving(app or Recorder(), cfg) as h:
        await h.send(payload)
        reader = await h.read_until_closed()
    return reader


def _assert_calm(r: FrameReader) -> None:
    g = r.goaway()
    assert g is not None, [type(f).__name__ for f in r.frames]
    assert g.error_code == CALM


async def test_ping_flood() -> None:
    ff = FrameFactory()
    r = await _abuse(ff.preface() + ff.ping() * 5000, make_cfg(h2_max_pings_per_s=20))
    _assert_calm(r)
    # Counted per frame: the flood stops at the cap, ACKs queued by it are dropped.
    assert len([f for f in r.of_type(PingFrame) if "ACK" in f.flags]) <= 20


async def test_pings_under_the_cap_are_answered() -> None:
    async with serving(Recorder()) as h:
        ff = h.ff
        await h.send(ff.preface() + ff.ping() * 10)
        await h.read_until(lambda r: len(r.of_type(PingFrame)) == 10)
        assert h.reader.goaway() is None


async def test_settings_flood() -> None:
    ff = FrameFactory()
    _assert_calm(await _abuse(ff.preface() + ff.settings() * 1000))


async def test_rst_stream_flood_on_a_closed_stream() -> None:
    # h2 absorbs RST_STREAM on a closed stream without an event: only per-frame counting sees it.
    ff = FrameFactory()
    payload = ff.preface() + ff.headers(1, path_headers(ff, "/echo")) + ff.rst(1) * 1000
    _assert_calm(await _abuse(payload))


async def test_rst_stream_on_an_idle_stream_is_protocol_error() -> None:
    ff = FrameFactory()
    r = await _abuse(ff.preface() + ff.rst(7))
    g = r.goaway()
    assert g is not None and g.error_code == ErrorCodes.PROTOCOL_ERROR


async def test_rapid_reset_never_reaches_the_app() -> None:
    ff = FrameFactory()
    app = Recorder()
    pairs = b"".join(
        ff.headers(2 * i + 1, path_headers(ff, "/echo")) + ff.rst(2 * i + 1) for i in range(5000)
    )
    r = await _abuse(ff.preface() + pairs, app=app)
    _assert_calm(r)
    assert app.requests == []


async def test_reset_in_the_same_batch_starts_no_work_even_under_the_cap() -> None:
    ff = FrameFactory()
    app = Recorder()
    async with serving(app) as h:
        pairs = b"".join(
            ff.headers(2 * i + 1, path_headers(ff, "/echo")) + ff.rst(2 * i + 1) for i in range(50)
        )
        await h.send(ff.preface() + pairs)
        # A request after them proves the batch was processed.
        await h.send(ff.headers(101, path_headers(ff, "/echo")))
        await h.read_until(lambda r: r.status(101) == 200)
        assert h.reader.goaway() is None
    assert [q.path for q in app.requests] == ["/echo"]


async def test_empty_data_flood() -> None:
    ff = FrameFactory()
    payload = ff.preface() + ff.headers(1, ff.request_headers("POST", "/echo"), end_stream=False)
    payload += ff.data(1, b"") * 500
    _assert_calm(await _abuse(payload, make_cfg(h2_max_empty_frames=100)))


async def test_window_update_flood() -> None:
    ff = FrameFactory()
    _assert_calm(await _abuse(ff.preface() + ff.window_update(0, 1) * 2000))


async def test_window_update_flood_on_closed_streams() -> None:
    ff = FrameFactory()
    payload = ff.preface() + ff.headers(1, path_headers(ff, "/echo")) + ff.rst(1)
    _assert_calm(await _abuse(payload + ff.window_update(1, 1) * 2000))


async def test_priority_flood() -> None:
    ff = FrameFactory()
    _assert_calm(await _abuse(ff.preface() + b"".join(ff.priority(2 * i + 1) for i in range(2000))))


async def test_unknown_frame_flood() -> None:
    ff = FrameFactory()
    r = await _abuse(ff.preface() + ff.raw(0xFA, 0, b"junk") * 2000)
    _assert_calm(r)


async def test_a_few_unknown_frames_are_ignored() -> None:
    async with serving(Recorder()) as h:
        ff = h.ff
        await h.send(
            ff.preface() + ff.raw(0xFA, 0, b"x") * 5 + ff.headers(1, path_headers(ff, "/echo"))
        )
        await h.read_until(lambda r: r.status(1) == 200)


async def test_continuation_flood() -> None:
    ff = FrameFactory()
    block = ff.header_block(ff.request_headers("GET", "/echo"))
    payload = ff.preface() + ff.headers(1, block=block[:5], end_headers=False)
    payload += ff.continuation(1, b"") * 200
    _assert_calm(await _abuse(payload))


async def test_hpack_bomb() -> None:
    ff = FrameFactory()
    big = (b"x-bomb", b"b" * 3000)
    # First block puts a 3 KB entry in the dynamic table; the second refers to it 40 times
    # (~1 byte per reference on the wire, 120 KB decoded > the 64 KiB header list limit).
    first = ff.header_block([*ff.request_headers("GET", "/echo"), big])
    second = ff.header_block([*ff.request_headers("GET", "/echo"), *([big] * 40)])
    assert len(second) < 200
    payload = ff.preface() + ff.headers(1, block=first) + ff.headers(3, block=second)
    app = Recorder()
    r = await _abuse(payload, app=app)
    _assert_calm(r)
    assert [q.path for q in app.requests] in ([], ["/echo"])


async def test_far_too_many_streams() -> None:
    ff = FrameFactory()
    cfg = make_cfg(h2_max_concurrent_streams=10)
    app = Recorder()
    payload = ff.preface() + b"".join(ff.headers(2 * i + 1, path_headers(ff)) for i in range(100))
    _assert_calm(await _abuse(payload, cfg, app))


# ---- protocol errors ----------------------------------------------------------------------------


async def test_bad_preface_is_protocol_error() -> None:
    r = await _abuse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    g = r.goaway()
    assert g is not None and g.error_code == ErrorCodes.PROTOCOL_ERROR


async def test_data_on_stream_zero_is_protocol_error() -> None:
    ff = FrameFactory()
    r = await _abuse(ff.preface() + ff.raw(0x0, 0, b"abc"))
    g = r.goaway()
    assert g is not None and g.error_code == ErrorCodes.PROTOCOL_ERROR


async def test_stream_id_going_backwards_is_protocol_error() -> None:
    ff = FrameFactory()
    payload = (
        ff.preface()
        + ff.headers(5, path_headers(ff, "/echo"))
        + ff.headers(3, path_headers(ff, "/echo"))
    )
    r = await _abuse(payload)
    g = r.goaway()
    assert g is not None and g.error_code == ErrorCodes.PROTOCOL_ERROR


async def test_oversized_frame_is_frame_size_error() -> None:
    ff = FrameFactory()
    r = await _abuse(ff.preface() + ff.raw(0x0, 1, b"z" * 20000))
    g = r.goaway()
    assert g is not None and g.error_code == ErrorCodes.FRAME_SIZE_ERROR


async def test_continuation_on_stream_zero_is_protocol_error_not_calm() -> None:
    ff = FrameFactory()
    r = await _abuse(ff.preface() + ff.raw(0x9, 0, b"x", flags=0x4))
    g = r.goaway()
    assert g is not None and g.error_code == ErrorCodes.PROTOCOL_ERROR


async def test_uppercase_header_name_is_rejected() -> None:
    ff = FrameFactory()
    r = await _abuse(ff.preface() + ff.headers(1, [*path_headers(ff, "/echo"), (b"X-Up", b"1")]))
    g = r.goaway()
    assert g is not None and g.error_code == ErrorCodes.PROTOCOL_ERROR


async def test_initial_bytes_from_the_listener_are_used() -> None:
    ff = FrameFactory()
    wire = ff.preface() + ff.headers(1, path_headers(ff, "/echo"))
    server_stream, client_stream = await _socket_pair()
    state = ServerState()
    async with anyio.create_task_group() as tg:
        # The listener sniffed the preface: it hands those bytes over as `initial`.
        info = ConnInfo()
        tg.start_soon(
            partial(serve_h2, server_stream, Recorder(), Config(), info, state, wire[:24])
        )
        await client_stream.send(wire[24:])
        reader = FrameReader()
        with anyio.fail_after(5):
            while reader.status(1) is None:
                reader.feed(await client_stream.receive())
        await client_stream.aclose()
    assert reader.status(1) == 200 and state.open_connections["h2"] == 0


# ---- lifecycle ----------------------------------------------------------------------------------


async def test_idle_connection_gets_goaway_and_close() -> None:
    cfg = make_cfg(keepalive_idle_s=0.2)
    async with client_for(Recorder(), cfg) as (c, h):
        assert (await c.request("GET", "/echo")).status == 200
        with anyio.fail_after(5):
            await h.done.wait()
        await c.wait_for(lambda: c.goaway is not None or c.eof)
        assert c.goaway is not None and c.goaway.error_code == ErrorCodes.NO_ERROR


async def test_pings_do_not_keep_an_idle_connection_open() -> None:
    # No request yet, so the head timeout applies (keep-alive only after a first request).
    cfg = make_cfg(header_read_s=0.3, keepalive_idle_s=3600.0)
    async with serving(Recorder(), cfg) as h:
        await h.send(h.ff.preface())
        with anyio.fail_after(5):
            while not h.done.is_set():
                await h.send(h.ff.ping())
                await anyio.sleep(0.05)
        r = await h.read_until_closed()
        g = r.goaway()
        assert g is not None and g.error_code == ErrorCodes.NO_ERROR


async def test_graceful_drain_finishes_open_streams_and_refuses_new_ones() -> None:
    app = Recorder()
    app.expect = 1
    state = ServerState()
    async with client_for(app, state=state) as (c, h):
        sid = await c.open_stream("GET", "/block")
        with anyio.fail_after(5):
            await app.arrived_event.wait()
        state.draining.set()
        await c.wait_for(lambda: c.goaway is not None)
        assert c.goaway is not None
        assert c.goaway.error_code == ErrorCodes.NO_ERROR
        assert c.goaway.last_stream_id == sid
        assert not h.done.is_set()  # the open stream keeps the connection alive
        app.release.set()
        # h2's client state machine refuses to open streams after GOAWAY; write one raw.
        await c.wait_for(lambda: c.streams[sid].ended)
        assert (await c.response(sid)).status == 200
        with anyio.fail_after(5):
            await h.done.wait()
    assert app.finished == ["/block"]


async def test_drain_refuses_streams_opened_after_goaway() -> None:
    app = Recorder()
    app.expect = 1
    state = ServerState()
    async with serving(app, state=state) as h:
        ff = h.ff
        await h.send(ff.preface() + ff.headers(1, path_headers(ff, "/block")))
        with anyio.fail_after(5):
            await app.arrived_event.wait()
        state.draining.set()
        await h.read_until(lambda r: r.goaway() is not None)
        await h.send(ff.headers(3, path_headers(ff, "/echo")))
        await h.read_until(lambda r: r.rst_code(3) is not None)
        assert h.reader.rst_code(3) == ErrorCodes.REFUSED_STREAM
        app.release.set()
        r = await h.read_until_closed()
        assert r.status(1) == 200
    assert [q.path for q in app.requests] == ["/block"]


async def test_max_requests_per_connection_sends_goaway() -> None:
    cfg = make_cfg(max_requests_per_connection=3)
    async with client_for(Recorder(), cfg) as (c, h):
        for _ in range(3):
            assert (await c.request("GET", "/echo")).status == 200
        await c.wait_for(lambda: c.goaway is not None)
        assert c.goaway is not None and c.goaway.last_stream_id == 5
        with anyio.fail_after(5):
            await h.done.wait()


async def test_peer_goaway_closes_the_connection() -> None:
    async with serving(Recorder()) as h:
        ff = h.ff
        await h.send(ff.preface() + ff.goaway())
        r = await h.read_until_closed()  # closes without waiting for the idle timeout
        assert not r.of_type(HeadersFrame) and not r.of_type(RstStreamFrame)


# ---- real sockets -------------------------------------------------------------------------------


@asynccontextmanager
async def tcp_server(
    app: Any, cfg: Config | None = None, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[int, ServerState, anyio.Event]]:
    """A minimal listener of our own: TCP (optionally TLS) on 127.0.0.1:0, serve_h2 per conn."""
    state = ServerState()
    closed = anyio.Event()  # set when a connection's serve_h2 has returned
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(stream: ByteStream) -> None:
        scheme = "http"
        if ssl_context is not None:
            from anyio.streams.tls import TLSAttribute, TLSStream

            stream = await TLSStream.wrap(stream, server_side=True, ssl_context=ssl_context)
            assert stream.extra(TLSAttribute.alpn_protocol) == "h2"
            scheme = "https"
        try:
            await serve_h2(stream, app, cfg or Config(), ConnInfo(scheme=scheme), state)
        finally:
            closed.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield port, state, closed
        finally:
            tg.cancel_scope.cancel()
    await listener.aclose()


async def test_h2c_prior_knowledge_over_loopback_tcp() -> None:
    async with tcp_server(Recorder()) as (port, state, closed):
        async with h2_client("127.0.0.1", port) as c:
            rs = [await c.request("POST", "/echo", body=b"a" * n) for n in (0, 10, 70000)]
        assert [r.json()["len"] for r in rs] == [0, 10, 70000]
        with anyio.fail_after(5):
            await closed.wait()
        assert state.open_connections["h2"] == 0


async def test_h2_over_tls_with_alpn() -> None:
    server_ctx, client_ctx = _tls_contexts()
    app = Recorder()
    async with tcp_server(app, ssl_context=server_ctx) as (port, _, _closed):
        async with h2_client("127.0.0.1", port, ssl_context=client_ctx, authority="localhost") as c:
            r = await c.request("GET", "/echo")
            s = await c.request("GET", "/stream?n=8")
    assert r.status == 200 and len(s.body) == 8 * 16384 + 14
    assert app.requests[0].scheme == "https"


async def test_continuation_trickle_is_cut_by_the_idle_timeout() -> None:
    # An unfinished header block opens no stream, so it cannot hold the connection open: no
    # request head has completed, so the head timeout applies.
    cfg = make_cfg(header_read_s=0.3, keepalive_idle_s=3600.0)
    app = Recorder()
    async with serving(app, cfg) as h:
        ff = h.ff
        block = ff.header_block(ff.request_headers("GET", "/echo"))
        await h.send(ff.preface() + ff.headers(1, block=block[:3], end_headers=False))
        with anyio.fail_after(5):
            for i in range(60):
                if h.done.is_set():
                    break
                await h.send(ff.continuation(1, block[3 + i : 4 + i]))
                await anyio.sleep(0.05)
        r = await h.read_until_closed()
        assert r.goaway() is not None
    assert app.requests == []


_FRAME_TYPES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xA, 0xFA])
_FRAMES = st.lists(
    st.tuples(
        _FRAME_TYPES,
        st.integers(0, 255),  # flags
        st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),  # stream id
        st.binary(max_size=40),
    ),
    max_size=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames=_FRAMES)
async def test_random_frames_never_escape_serve_h2(
    frames: list[tuple[int, int, int, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    ff = FrameFactory()
    wire = ff.preface() + ff.headers(1, path_headers(ff, "/echo"))
    wire += b"".join(ff.raw(t, sid, payload, flags) for t, flags, sid, payload in frames)
    async with serving(Recorder()) as h:
        await h.send(wire)
        await h.send(ff.ping())
        with anyio.move_on_after(0.3):  # whatever the server answers, it must not crash
            await h.read_until_closed()
    # serving() checked that serve_h2 returned and its counters are back at zero.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---- the sans-IO guard --------------------------------------------------------------------------


def _guard(**kw: Any) -> Any:
    from rawgate.http.h2_server import _new_h2

    h2 = _new_h2(make_cfg(**kw).limits)
    h2.new_batch(0.0)
    return h2


def test_rate_window_rolls_over_each_second() -> None:
    ff = FrameFactory()
    h2 = _guard(h2_max_pings_per_s=20)
    h2.receive_data(ff.preface() + ff.ping() * 20)
    h2.new_batch(0.5)  # same window: one more is one too many
    with pytest.raises(ProtocolError):
        h2.receive_data(ff.ping())
    h2 = _guard(h2_max_pings_per_s=20)
    h2.receive_data(ff.preface() + ff.ping() * 20)
    h2.new_batch(1.0)  # a new second: the count starts again
    h2.receive_data(ff.ping() * 20)


def test_window_updates_earned_by_data_are_not_noop() -> None:
    ff = FrameFactory()
    h2 = _guard(h2_max_noop_frames_per_s=10)
    h2.receive_data(ff.preface())
    h2.wu_credit = 100  # as if we had sent 50 DATA frames
    h2.receive_data(ff.window_update(0, 1) * 100)
    assert h2.noop == 0
    with pytest.raises(ProtocolError):
        h2.receive_data(ff.window_update(0, 1) * 11)


def test_closed_streams_do_not_pile_up_inside_h2() -> None:
    ff = FrameFactory()
    h2 = _guard(h2_max_concurrent_streams=5)
    h2.receive_data(ff.preface())
    cap = h2.local_settings.max_concurrent_streams
    for i in range(500):
        sid = 2 * i + 1
        h2.receive_data(ff.headers(sid, path_headers(ff, "/echo")))
        h2.send_headers(sid, [(b":status", b"204")], end_stream=True)
        h2.data_to_send()
        assert len(h2.streams) <= cap


# ---- with the real application ------------------------------------------------------------------


async def test_gateway_app_over_h2() -> None:
    from rawgate.http.app import GatewayApp

    cfg = Config()
    state = ServerState()
    app = GatewayApp(cfg, state)
    async with client_for(app, cfg, state) as (c, _):
        health = await c.request("GET", "/healthz", headers=[(b"x-request-id", b"req-h2-1")])
        missing = await c.request("GET", "/v1/chat/completions/responses")
        metrics = await c.request("GET", "/metrics")
    assert health.status == 200 and health.json()["status"] == "ok"
    assert health.header(b"x-request-id") == b"req-h2-1"
    assert missing.status == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    assert metrics.status == 200 and b'protocol="h2"' in metrics.body


# ---- through the shared listener (rawgate.http.listener, written alongside this driver) ---


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    server_ctx.set_alpn_protocols(["h2", "http/1.1"])
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


async def test_listener_h2c_prior_knowledge_and_tls_alpn() -> None:
    from rawgate.http import listener
    server_ctx, client_ctx = _tls_contexts()
    app = Recorder()
    async with listener.open_server(app, Config(), host="127.0.0.1", port=0) as server:
        async with h2_client("127.0.0.1", server.port) as c:
            plain = await c.request("POST", "/echo", body=b"z" * 100_000)
    async with listener.open_server(
        app, Config(), ssl_context=server_ctx, host="127.0.0.1", port=0
    ) as server:
        async with h2_client("127.0.0.1", server.port, ssl_context=client_ctx) as c:
            tls = await c.request("GET", "/echo")
    assert plain.status == 200 and plain.json()["len"] == 100_000
    assert tls.status == 200 and tls.json()["version"] == "2"
    assert [r.scheme for r in app.requests] == ["http", "https"]


async def test_listener_graceful_shutdown_lets_an_h2_stream_finish() -> None:
    from rawgate.http import listener
    app = Recorder()
    app.expect = 1
    async with listener.open_server(app, Config(), host="127.0.0.1", port=0) as server:
        async with h2_client("127.0.0.1", server.port) as c, anyio.create_task_group() as tg:
            sid = await c.open_stream("GET", "/block")
            with anyio.fail_after(5):
                await app.arrived_event.wait()
            tg.start_soon(server.shutdown, 10.0)
            await c.wait_for(lambda: c.goaway is not None)
            app.release.set()
            assert (await c.response(sid)).status == 200
    assert app.finished == ["/block"]
