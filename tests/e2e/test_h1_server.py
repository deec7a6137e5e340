"""The HTTP/1.1 driver: raw request bytes in, raw response bytes out, over an in-memory stream.

No sockets here (tests/e2e/test_listener.py has those). Every test runs serve_h1 inside
helpers_h1.h1_serving, which checks that serve_h1 returned, closed its stream and put every
counter back at zero.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import anyio
import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rawgate.config import Config
from rawgate.conn import ServerState
from rawgate.errors import BadRequest
from rawgate.respond import error_response, json_response
from rawgate.seam import ClientDisconnected, Request, ResponseSink
from tests.helpers_h1 import h1_serving, normalize_date, parse_responses

pytestmark = pytest.mark.anyio


def make_cfg(**kw: Any) -> Config:
    """Config() with the given limits.* / timeouts.* keys replaced."""
    cfg = Config()
    sections: dict[str, dict[str, Any]] = {"limits": {}, "timeouts": {}}
    for k, v in kw.items():
        sec = "limits" if k in cfg.limits.__struct_fields__ else "timeouts"
        assert k in getattr(cfg, sec).__struct_fields__, k
        sections[sec][k] = v
    return msgspec.structs.replace(
        cfg,
        limits=msgspec.structs.replace(cfg.limits, **sections["limits"]),
        timeouts=msgspec.structs.replace(cfg.timeouts, **sections["timeouts"]),
    )


def get(path: str = "/echo", *extra: str, version: str = "1.1", method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = get(path, f"Content-Length: {len(body)}", *extra, method="POST")
    return head + body


def chunked(path: str, pieces: list[bytes], *extra: str, trailer: bytes = b"") -> bytes:
    head = get(path, "Transfer-Encoding: chunked", *extra, method="POST")
    body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces)
    return head + body + b"0\r\n" + trailer + b"\r\n"


class Recorder:
    """An app whose behaviour each test picks by path; it records what reached it."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.cancelled: list[str] = []
        self.cancelled_event = anyio.Event()
        self.finished: list[str] = []
        self.release = anyio.Event()
        self.arrived = anyio.Event()
        self.progress = 0
        self.disconnected = False

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        self.requests.append(request)
        try:
            await self._route(request, sink)
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(request.path)
            self.cancelled_event.set()
            # After cancellation the sink must refuse, never write half a response.
            try:
                with anyio.CancelScope(shield=True):
                    await sink.send(b"late")
            except (ClientDisconnected, RuntimeError):
                self.disconnected = True
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
                    "headers": [[k.decode(), v.decode("latin-1")] for k, v in req.headers],
                }
            )
            await json_response(sink, 200, body)
        elif p == "/sleep":
            await anyio.sleep(float(req.query))  # pipelining: later requests finish sooner
            await json_response(sink, 200, req.query.encode())
        elif p == "/block":
            self.arrived.set()
            await self.release.wait()
            await json_response(sink, 200, b'{"ok":true}')
        elif p == "/stream":
            n = int(req.query) if req.query else 4
            await sink.start(200, [(b"content-type", b"text/event-stream")])
            for i in range(n):
                await sink.send(b"data: %d\n\n" % i)
                self.progress += 1
            await sink.end(b"data: [DONE]\n\n")
        elif p == "/bigsend":
            await sink.start(200, [])
            self.arrived.set()
            piece = b"x" * 16384
            for _ in range(int(req.query or 512)):  # 8 MiB by default
                await sink.send(piece)
                self.progress += len(piece)
            await sink.end()
        elif p == "/hang":
            await sink.start(200, [(b"content-type", b"text/event-stream")])
            await sink.send(b"data: first\n\n")
            self.arrived.set()
            await anyio.sleep_forever()
        elif p == "/length":
            await sink.start(200, [(b"content-length", b"10")])
            await sink.send(b"01234")
            await sink.end(b"56789")
        elif p == "/short":
            await sink.start(200, [(b"content-length", b"10")])
            await sink.end(b"0123")
        elif p == "/nocontent":
            await sink.respond(204, [], b"ignored")
        elif p == "/badheader":
            await sink.respond(200, [(b"x-evil", b"a\r\nset-cookie: b")], b"")
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


def error_of(r: Any) -> dict[str, Any]:
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# ---- basics -------------------------------------------------------------------------------------


async def test_get_exact_bytes_and_keep_alive() -> None:
    async with h1_serving(Recorder()) as c:
        await c.send(get("/nocontent") + get("/length"))
        await c.responses(2)
        raw = normalize_date(bytes(c.received))
    assert raw == (
        b"HTTP/1.1 204 No Content\r\ndate: X\r\nserver: rawgate\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ndate: X\r\nserver: rawgate\r\ncontent-length: 10\r\n\r\n0123456789"
    )


async def test_request_fields_reach_the_app() -> None:
    app = Recorder()
    async with h1_serving(app) as c:
        await c.send(get("/echo?a=1&b=2", "X-Custom: Val", "X-Custom: two"))
        r = await c.response()
    assert r.status == 200 and r.header(b"server") == b"rawgate"
    assert (r.header(b"date") or b"").endswith(b" GMT")
    assert r.header(b"content-length") == str(len(r.body)).encode()
    req = app.requests[0]
    assert (req.method, req.path, req.query) == ("GET", "/echo", "a=1&b=2")
    assert req.raw_target == b"/echo?a=1&b=2"
    assert req.http_version == "1.1" and req.scheme == "http" and req.client == ("127.0.0.1", 40000)
    assert req.headers == [(b"host", b"test"), (b"x-custom", b"Val"), (b"x-custom", b"two")]


async def test_post_body_arrives_whole() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, many reads
    async with h1_serving(Recorder()) as c:
        await c.send(post("/echo", body))
        r = await c.response()
    assert r.json()["len"] == len(body)
    assert r.json()["sha"] == hashlib.sha256(body).hexdigest()


async def test_chunked_request_body_with_extensions_and_trailer() -> None:
    pieces = [b"hello ", b"", b"chunked ", b"world" * 1000]
    raw = chunked("/echo", [p for p in pieces if p], trailer=b"X-Trailer: yes\r\n")
    raw = raw.replace(b"6\r\nhello ", b"6;ext=1\r\nhello ")
    async with h1_serving(Recorder()) as c:
        # One byte at a time for the first 200 bytes, then the rest.
        for i in range(200):
            await c.send(raw[i : i + 1])
        await c.send(raw[200:])
        r = await c.response()
    body = b"".join(pieces)
    assert r.json()["len"] == len(body)
    assert r.json()["sha"] == hashlib.sha256(body).hexdigest()


async def test_pipelined_requests_are_answered_in_order() -> None:
    app = Recorder()
    delays = ["0.05", "0.01", "0", "0.03", "0"]
    async with h1_serving(app) as c:
        await c.send(b"".join(get(f"/sleep?{d}") for d in delays) + post("/echo", b"abc"))
        rs = await c.responses(len(delays) + 1)
    assert [r.body for r in rs[:-1]] == [d.encode() for d in delays]
    assert rs[-1].json()["len"] == 3
    assert [r.path for r in app.requests] == ["/sleep"] * 5 + ["/echo"]


async def test_pipelining_is_bounded() -> None:
    app = Recorder()
    cfg = make_cfg(max_pipelined=2)
    pad = "X-Pad: " + "p" * 400
    n = 300  # ~130 KB of heads: more than two reads
    async with h1_serving(app, cfg) as c:
        await c.send(get("/block") + b"".join(get(f"/echo?{i}", pad) for i in range(n)))
        with anyio.fail_after(5):
            await app.arrived.wait()
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        # The server stopped reading: most of the pipelined bytes are still in the pipe.
        assert c.stream._out.buf, "the server read everything while a handler was blocked"
        assert len(app.requests) == 1
        app.release.set()
        rs = await c.responses(n + 1)
    assert [r.json()["query"] for r in rs[1:]] == [str(i) for i in range(n)]


async def test_pipelined_bodies_are_bounded_by_the_body_limit() -> None:
    app = Recorder()
    cfg = make_cfg(max_body_bytes=25_000)
    bodies = [bytes([65 + i]) * 20_000 for i in range(8)]
    async with h1_serving(app, cfg) as c:
        await c.send(get("/block") + b"".join(post("/echo", b) for b in bodies))
        with anyio.fail_after(5):
            await app.arrived.wait()
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        # Reading stopped once more than one body limit of pipelined bodies was held (the
        # queue limit, 16, would have let all 8 in): at most two reads were taken.
        assert len(c.stream._out.buf) >= 8 * 20_000 - 2 * 65536
        app.release.set()
        rs = await c.responses(len(bodies) + 1)
    assert [r.json()["sha"] for r in rs[1:]] == [hashlib.sha256(b).hexdigest() for b in bodies]


async def test_split_request_at_every_offset_on_fresh_connections() -> None:
    raw = post("/echo?q=1", b"0123456789", "X-A: 1", "Accept: */*")
    expected = None
    for i in range(1, len(raw)):
        async with h1_serving(Recorder()) as c:
            await c.send(raw[:i])
            await anyio.lowlevel.checkpoint()
            await c.send(raw[i:])
            r = await c.response()
        got = r.json()
        assert got["len"] == 10 and got["query"] == "q=1", i
        expected = expected or r.body
        assert r.body == expected


async def test_split_requests_at_every_offset_on_one_keep_alive_connection() -> None:
    raw = get("/echo?k=v", "X-Long: " + "z" * 50)
    async with h1_serving(Recorder()) as c:
        for i in range(1, len(raw)):
            await c.send(raw[:i])
            await anyio.lowlevel.checkpoint()
            await c.send(raw[i:])
            await c.responses(1)
            (r,) = c.take(1)
            assert r.status == 200 and r.json()["query"] == "k=v", i


async def test_head_has_get_length_and_no_body() -> None:
    async with h1_serving(Recorder()) as c:
        await c.send(get("/echo") + get("/echo", method="HEAD") + get("/stream", method="HEAD"))
        await c.send(get("/nocontent"))
        rs = await c.responses(4, ["GET", "HEAD", "HEAD", "GET"])
    g, h, hs, nc = rs
    assert h.status == 200 and h.body == b"" and h.raw.endswith(b"\r\n\r\n")
    # "GET" vs "HEAD" in the echoed method: one byte longer.
    assert int(h.header(b"content-length") or 0) == len(g.body) + 1
    assert hs.status == 200 and hs.header(b"transfer-encoding") == b"chunked" and hs.body == b""
    assert nc.status == 204  # parsed right after: nothing stray was written for the HEADs


async def test_connection_close_is_honoured() -> None:
    app = Recorder()
    async with h1_serving(app) as c:
        await c.send(get("/echo", "Connection: close") + get("/echo"))
        data = await c.read_until_closed()
    (r,) = parse_responses(data)
    assert r.header(b"connection") == b"close"
    assert len(app.requests) == 1  # nothing after a close request is answered


@pytest.mark.parametrize(
    ("value", "closes"),
    [
        ("close", True),
        ("Keep-Alive, CLOSE", True),
        (" close ", True),
        ("closed", False),
        ("keep-alive", False),
        ("upgrade", False),
    ],
)
async def test_connection_header_tokens(value: str, closes: bool) -> None:
    app = Recorder()
    async with h1_serving(app) as c:
        await c.send(post("/echo", b"", f"Connection: {value}") + get("/echo"))
        if closes:
            rs = parse_responses(await c.read_until_closed())
        else:
            rs = await c.responses(2)
    assert len(rs) == (1 if closes else 2)
    assert (rs[0].header(b"connection") == b"close") is closes


async def test_http10_gets_one_answer_then_close() -> None:
    app = Recorder()
    async with h1_serving(app) as c:
        await c.send(get("/echo", version="1.0") + get("/echo", version="1.0"))
        data = await c.read_until_closed()
    (r,) = parse_responses(data)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert r.header(b"connection") == b"close" and r.json()["version"] == "1.0"
    assert len(app.requests) == 1


async def test_http10_streamed_response_is_close_delimited() -> None:
    async with h1_serving(Recorder()) as c:
        await c.send(get("/stream?2", version="1.0"))
        data = await c.read_until_closed()
    (r,) = parse_responses(data)
    assert r.header(b"transfer-encoding") is None and r.header(b"content-length") is None
    assert r.body == b"data: 0\n\ndata: 1\n\ndata: [DONE]\n\n"


async def test_streamed_response_is_chunked() -> None:
    async with h1_serving(Recorder()) as c:
        await c.send(get("/stream?3") + get("/length"))
        s, ln = await c.responses(2)
    assert s.chunked and s.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert not ln.chunked and ln.body == b"0123456789"


async def test_response_shorter_than_its_content_length_closes() -> None:
    async with h1_serving(Recorder()) as c:
        await c.send(get("/short") + get("/echo"))
        data = await c.read_until_closed()
    assert data.endswith(b"\r\n\r\n0123") and data.count(b"HTTP/1.1") == 1


async def test_expect_100_continue() -> None:
    async with h1_serving(Recorder()) as c:
        await c.send(get("/echo", "Content-Length: 5", "Expect: 100-continue", method="POST"))
        with anyio.fail_after(5):
            while b"\r\n\r\n" not in c.received:
                await c.read_some()
        assert bytes(c.received) == b"HTTP/1.1 100 Continue\r\n\r\n"
        await c.send(b"hello")
        rs = await c.responses(1)
    assert [r.status for r in rs] == [100, 200] and rs[1].json()["len"] == 5


async def test_expect_100_with_body_already_sent_gets_no_interim() -> None:
    async with h1_serving(Recorder()) as c:
        await c.send(post("/echo", b"hello", "Expect: 100-continue"))
        rs = await c.responses(1)
    assert [r.status for r in rs] == [200]


async def test_expect_100_over_the_body_limit_is_413_without_continue() -> None:
    cfg = make_cfg(max_body_bytes=100)
    async with h1_serving(Recorder(), cfg) as c:
        await c.send(get("/echo", "Content-Length: 101", "Expect: 100-continue", method="POST"))
        data = await c.read_until_closed()
    (r,) = parse_responses(data)
    assert r.status == 413 and error_of(r)["code"] == "request_too_large"


# ---- limits -------------------------------------------------------------------------------------


async def test_header_bytes_over_the_limit_in_one_chunk_is_431() -> None:
    # h11 alone accepts a complete head of any size when it arrives in one piece (h11#182).
    cfg = make_cfg(max_header_bytes=4096)
    app = Recorder()
    async with h1_serving(app, cfg) as c:
        await c.send(get("/echo", "X-Big: " + "b" * 4100))
        data = await c.read_until_closed()
    (r,) = parse_responses(data)
    assert r.status == 431 and r.header(b"connection") == b"close"
    assert error_of(r)["type"] == "invalid_request_error"
    assert app.requests == []


async def test_header_bytes_at_the_limit_pass() -> None:
    cfg = make_cfg(max_header_bytes=4096)
    base = len(get("/echo", "X-Big: "))
    async with h1_serving(Recorder(), cfg) as c:
        await c.send(get("/echo", "X-Big: " + "b" * (4096 - base)))
        r = await c.response()
    assert r.status == 200


async def test_header_bytes_over_the_limit_trickled_is_431() -> None:
    cfg = make_cfg(max_header_bytes=4096)
    raw = get("/echo", *(f"X-H{i}: " + "v" * 60 for i in range(80)))
    async with h1_serving(Recorder(), cfg) as c:
        for i in range(0, len(raw), 100):
            try:
                await c.send(raw[i : i + 100])
            except anyio.ClosedResourceError:
                break
        data = await c.read_until_closed()
    assert parse_responses(data)[0].status == 431


async def test_too_many_headers_is_431() -> None:
    cfg = make_cfg(max_header_count=10)
    async with h1_serving(Recorder(), cfg) as c:
        await c.send(get("/echo", *(f"X-{i}: v" for i in range(10))))  # 11 with Host
        data = await c.read_until_closed()
    assert parse_responses(data)[0].status == 431


async def test_long_target_is_414() -> None:
    cfg = make_cfg(max_url_bytes=100)
    async with h1_serving(Recorder(), cfg) as c:
        await c.send(get("/echo?" + "q" * 100))
        data = await c.read_until_closed()
    assert parse_responses(data)[0].status == 414


async def test_request_line_longer_than_the_head_limit_is_414() -> None:
    cfg = make_cfg(max_header_bytes=1024, max_url_bytes=8192)
    async with h1_serving(Recorder(), cfg) as c:
        await c.send(b"GET /" + b"a" * 2000)  # no line end yet
        data = await c.read_until_closed()
    assert parse_responses(data)[0].status == 414


async def test_content_length_over_the_limit_is_413_before_the_body() -> None:
    cfg = make_cfg(max_body_bytes=1000)
    app = Recorder()
    async with h1_serving(app, cfg) as c:
        await c.send(get("/echo", "Content-Length: 1001", method="POST") + b"x" * 100)
        data = await c.read_until_closed()
    (r,) = parse_responses(data)
    assert r.status == 413 and r.header(b"connection") == b"close" and app.requests == []


async def test_chunked_body_over_the_limit_is_413_as_it_arrives() -> None:
    cfg = make_cfg(max_body_bytes=1000)
    app = Recorder()
    async with h1_serving(app, cfg) as c:
        await c.send(get("/echo", "Transfer-Encoding: chunked", method="POST"))
        for _ in range(20):
            try:
                await c.send(b"64\r\n" + b"y" * 100 + b"\r\n")
            except anyio.ClosedResourceError:
                break
        data = await c.read_until_closed()
    (r,) = parse_responses(data)
    assert r.status == 413 and app.requests == []


async def test_body_exactly_at_the_limit_is_accepted() -> None:
    cfg = make_cfg(max_body_bytes=1000)
    async with h1_serving(Recorder(), cfg) as c:
        await c.send(post("/echo", b"z" * 1000) + chunked("/echo", [b"c" * 500, b"d" * 500]))
        a, b = await c.responses(2)
    assert a.json()["len"] == 1000 and b.json()["len"] == 1000


async def test_max_requests_per_connection() -> None:
    cfg = make_cfg(max_requests_per_connection=2)
    app = Recorder()
    async with h1_serving(app, cfg) as c:
        await c.send(get("/echo") + get("/echo") + get("/echo"))
        data = await c.read_until_closed()
    first, second = parse_responses(data)
    assert first.header(b"connection") is None and second.header(b"connection") == b"close"
    assert len(app.requests) == 2


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", 505),
        (b"GET http://evil/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # absolute-form
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ],
)
async def test_unparseable_requests_get_openai_4xx_and_close(raw: bytes, status: int) -> None:
    app = Recorder()
    async with h1_serving(app) as c:
        await c.send(get("/echo") + raw)
        data = await c.read_until_closed()
    ok, bad = parse_responses(data)
    assert ok.status == 200  # what came before the bad request is answered first
    assert bad.status == status and bad.header(b"connection") == b"close"
    assert error_of(bad)["type"] == "invalid_request_error"
    assert len(app.requests) == 1


_JUNK = st.lists(st.binary(min_size=1, max_size=60), min_size=1, max_size=6)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pieces=_JUNK)
async def test_random_bytes_never_escape_serve_h1(
    pieces: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    cfg = make_cfg(header_read_s=0.05, lingering_close_s=0)
    async with h1_serving(Recorder(), cfg) as c:
        for p in pieces:
            try:
                await c.send(p)
            except anyio.ClosedResourceError:
                break
        with anyio.move_on_after(0.3):
            await c.read_until_closed()
    for r in parse_responses(bytes(c.received), at_eof=False):
        assert r.status in (200, 400, 404, 408, 413, 414, 431, 501, 505)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---- timeouts -----------------------------------------------------------------------------------


async def test_slowloris_head_is_408_then_close() -> None:
    cfg = make_cfg(header_read_s=0.3, lingering_close_s=0)
    raw = get("/echo", "X-Slow: " + "s" * 100)
    async with h1_serving(Recorder(), cfg) as c:
        # A byte every 20 ms keeps the connection busy but never finishes the head in time.
        for i in range(len(raw) - 1):
            if c.received:
                break
            try:
                await c.send(raw[i : i + 1])
            except anyio.ClosedResourceError:
                break
            await anyio.sleep(0.02)
        data = await c.read_until_closed()
    (r,) = parse_responses(data)
    assert r.status == 408 and error_of(r)["code"] == "request_timeout"


async def test_connection_that_never_sends_is_closed_quietly() -> None:
    cfg = make_cfg(header_read_s=0.1)
    async with h1_serving(Recorder(), cfg) as c:
        assert await c.read_until_closed() == b""


async def test_keep_alive_idle_timeout_closes_quietly() -> None:
    cfg = make_cfg(keepalive_idle_s=0.2)
    async with h1_serving(Recorder(), cfg) as c:
        await c.send(get("/echo"))
        data = await c.read_until_closed()
    (r,) = parse_responses(data)
    assert r.status == 200


async def test_body_idle_timeout_is_408() -> None:
    cfg = make_cfg(body_read_s=0.2, lingering_close_s=0)
    app = Recorder()
    async with h1_serving(app, cfg) as c:
        await c.send(get("/echo", "Content-Length: 10", method="POST") + b"12345")
        data = await c.read_until_closed()
    (r,) = parse_responses(data)
    assert r.status == 408 and app.requests == []


async def test_body_clock_waits_for_our_100_continue() -> None:
    # The client waits for 100 Continue; a pipelined request ahead of it is still running.
    cfg = make_cfg(body_read_s=0.2)
    app = Recorder()
    async with h1_serving(app, cfg) as c:
        await c.send(
            get("/sleep?0.4")
            + get("/echo", "Content-Length: 3", "Expect: 100-continue", method="POST")
        )
        with anyio.fail_after(5):
            while b"100 Continue" not in c.received:
                await c.read_some()
        await c.send(b"abc")
        rs = await c.responses(2)
    assert [r.status for r in rs] == [200, 100, 200]


# ---- disconnects and backpressure ---------------------------------------------------------------


async def test_eof_cancels_a_blocked_handler_at_once() -> None:
    app = Recorder()
    async with h1_serving(app) as c:
        await c.send(get("/block"))
        with anyio.fail_after(5):
            await app.arrived.wait()
        await c.stream.send_eof()
        with anyio.fail_after(5):
            await app.cancelled_event.wait()
            await c.done.wait()
    assert app.cancelled == ["/block"] and app.finished == []
    assert app.disconnected


async def test_reset_mid_stream_cancels_the_handler() -> None:
    app = Recorder()
    async with h1_serving(app) as c:
        await c.send(get("/hang"))
        with anyio.fail_after(5):
            await app.arrived.wait()
        c.stream.reset()
        with anyio.fail_after(5):
            await app.cancelled_event.wait()
            await c.done.wait()
    assert app.cancelled == ["/hang"] and app.disconnected


async def test_send_waits_for_a_peer_that_does_not_read() -> None:
    app = Recorder()
    cap = 64 * 1024
    async with h1_serving(app, capacity=cap) as c:
        await c.send(get("/bigsend?64"))
        with anyio.fail_after(5):
            await app.arrived.wait()
        for _ in range(50):
            await anyio.lowlevel.checkpoint()
        # The pipe holds at most `cap` plus one write; send() did not return for more.
        assert app.progress <= cap + 16384
        queued = c.stream.queued
        assert queued <= cap + 16384 + 100
        r = await c.response(timeout=10)  # reading lets the handler finish
    assert len(r.body) == 1 << 20 and app.finished == ["/bigsend"]


async def test_peer_that_does_not_read_is_aborted_after_write_timeout() -> None:
    cfg = make_cfg(write_s=0.3)
    app = Recorder()
    async with h1_serving(app, cfg, capacity=64 * 1024) as c:
        await c.send(get("/bigsend"))
        with anyio.fail_after(5):
            await c.done.wait()  # nobody reads: the server gives up by itself
    assert app.cancelled == ["/bigsend"] and app.progress < 1 << 20


# ---- handler failures ---------------------------------------------------------------------------


async def test_handler_exception_gives_openai_500_and_the_connection_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with h1_serving(Recorder()) as c:
        await c.send(get("/boom") + get("/echo"))
        boom, ok = await c.responses(2)
    assert boom.status == 500
    err = error_of(boom)
    assert err["type"] == "server_error" and err["code"] == "internal_error"
    assert b"handler bug" not in boom.body
    assert ok.status == 200
    assert any("handler bug" in str(r.exc_info) for r in caplog.records if r.exc_info)


async def test_handler_exception_after_start_closes_the_connection() -> None:
    async with h1_serving(Recorder()) as c:
        await c.send(get("/boom-late") + get("/echo"))
        data = await c.read_until_closed()
    assert data.count(b"HTTP/1.1 ") == 1
    assert data.endswith(b"7\r\npartial\r\n")  # no last chunk: the client sees a cut response


async def test_handler_without_response_gives_500() -> None:
    async with h1_serving(Recorder()) as c:
        await c.send(get("/silent"))
        r = await c.response()
    assert r.status == 500


async def test_response_header_with_crlf_is_refused() -> None:
    async with h1_serving(Recorder()) as c:
        await c.send(get("/badheader"))
        r = await c.response()
    assert r.status == 500 and r.header(b"set-cookie") is None


async def test_openai_error_from_app_passes_through() -> None:
    async with h1_serving(Recorder()) as c:
        await c.send(get("/bad"))
        r = await c.response()
    assert r.status == 400 and error_of(r)["param"] == "x"


# ---- draining -----------------------------------------------------------------------------------


async def test_draining_closes_after_the_current_response() -> None:
    app = Recorder()
    state = ServerState()
    async with h1_serving(app, state=state) as c:
        await c.send(get("/block") + get("/echo"))
        with anyio.fail_after(5):
            await app.arrived.wait()
        state.draining.set()
        app.release.set()
        data = await c.read_until_closed()
    (r,) = parse_responses(data)
    assert r.status == 200 and r.header(b"connection") == b"close"
    assert [q.path for q in app.requests] == ["/block"]


async def test_draining_closes_an_idle_connection() -> None:
    state = ServerState()
    async with h1_serving(Recorder(), state=state) as c:
        await c.send(get("/echo"))
        await c.responses(1)
        state.draining.set()
        data = await c.read_until_closed()
    assert parse_responses(data)[0].status == 200


# ---- with the real application ------------------------------------------------------------------


async def test_gateway_app_over_h1() -> None:
    from rawgate.config import ServerConfig
    from rawgate.http.app import GatewayApp

    cfg = Config(server=ServerConfig(allowed_hosts=["test"]))  # get() sends Host: test
    state = ServerState()
    app = GatewayApp(cfg, state)
    async with h1_serving(app, cfg, state) as c:
        await c.send(
            get("/healthz", "X-Request-Id: req-h1-1")
            + get("/v1/chat/completions/responses")
            + get("/metrics")
        )
        health, missing, metrics = await c.responses(3)
    assert health.status == 200 and health.json()["status"] == "ok"
    assert health.header(b"x-request-id") == b"req-h1-1"
    assert missing.status == 404 and error_of(missing)["type"] == "invalid_request_error"
    assert metrics.status == 200 and b'protocol="h1"' in metrics.body


@pytest.mark.parametrize("on_asyncio", [True, False])
async def test_wakeup_wakes_its_waiter(monkeypatch: pytest.MonkeyPatch, on_asyncio: bool) -> None:
    from rawgate.http import h1_server

    if not on_asyncio:  # what a non-asyncio backend sees: no running asyncio loop

        def no_loop() -> None:
            raise RuntimeError("no running event loop")

        monkeypatch.setattr("rawgate.http.h1_server.asyncio.get_running_loop", no_loop)
    w = h1_server._Wakeup()
    monkeypatch.undo()
    assert (w._asyncio is not None) is on_asyncio
    woken = []

    async def waiter() -> None:
        await w.wait()
        woken.append(1)

    async with anyio.create_task_group() as tg:
        for round_ in range(2):  # reusable
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert len(woken) == round_  # blocked until set()
            w.set()
            await anyio.wait_all_tasks_blocked()
            assert len(woken) == round_ + 1
    assert woken == [1, 1]
