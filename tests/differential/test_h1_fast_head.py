"""h1_server's fast request-head parser against h11, the parser it stands in for.

The fast path must accept only heads h11 accepts, read them exactly as h11 does (method,
target, lower-case names, values without OWS, head length), and hand everything whose meaning
h11's state machine owns back to h11 (it returns None for those).
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings, strategies as st

from rawgate.http.h1_parse import fast_head as _fast_head
from rawgate.seam import Request, ResponseSink
from tests.helpers_h1 import h1_serving

PLAIN = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


def h11_head(data: bytes) -> tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], int] | None:
    """(method, target, version, headers, head bytes) as h11 reads them; None if it rejects or
    needs more data."""
    h = h11.Connection(h11.SERVER)
    h.receive_data(data)
    try:
        ev = h.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(ev, h11.Request):
        return None
    headers = [(name, value) for _, name, value in ev.headers._full_items]
    return ev.method, ev.target, ev.http_version, headers, len(data) - len(h._receive_buffer)


def test_plain_head() -> None:
    head = _fast_head(PLAIN)
    assert head is not None
    assert head.method == b"POST"
    assert head.target == b"/v1/chat/completions"
    assert head.headers == [
        (b"host", b"x"),
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
    ]
    assert head.length == b"2"
    assert not head.close
    assert head.size == len(PLAIN) - 2
    assert h11_head(PLAIN) == (b"POST", head.target, b"1.1", head.headers, head.size)


def test_values_lose_their_ows_and_keep_inner_blanks() -> None:
    head = _fast_head(b"GET / HTTP/1.1\r\nHost:  a \t\r\nX-A:\t b  c \r\nX-E:\r\n\r\n")
    assert head is not None
    assert head.headers == [(b"host", b"a"), (b"x-a", b"b  c"), (b"x-e", b"")]


def test_connection_close_is_seen() -> None:
    head = _fast_head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n")
    assert head is not None and head.close


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n",  # incomplete
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",  # HTTP/1.0 rules live in h11 + _on_head
        b"GET / HTTP/1.1\nHost: a\n\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n",  # a control byte h11 tolerates
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",  # blank before the colon
        b"GET / HTTP/1.1\r\n\r\n",  # no host
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # two hosts
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # leading empty line
        b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
def test_left_to_h11(data: bytes) -> None:
    assert _fast_head(data) is None


def test_pipelined_heads_stop_at_the_first_blank_line() -> None:
    one = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    head = _fast_head(one + b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head is not None and head.target == b"/a" and head.size == len(one)


_GOOD_NAMES = [b"Content-Type", b"accept", b"X-Request-Id", b"User-Agent", b"x-a", b"Authorization"]
_ODD_NAMES = [b"Host", b"Content-Length", b"Connection", b"Transfer-Encoding", b"Expect",
              b"Upgrade", b"b c", b"x:y", b"", b"\xff"]
_NAMES = st.sampled_from(_GOOD_NAMES * 3 + _ODD_NAMES)
_VALUE_BYTES = b" \t\x00\x01\x7f\x80\xffa0,:\r\n"
_VALUE = (
    st.text(" \tab,;=/0", max_size=8).map(str.encode)
    | st.text(" \tab,;=/0", max_size=8).map(str.encode)
    | st.sampled_from([b"1", b"12", b"0012", b"x", b"close", b"chunked", b"100-continue", b""])
    | st.binary(max_size=6).map(lambda b: bytes(_VALUE_BYTES[x % len(_VALUE_BYTES)] for x in b))
)
_SEP = st.sampled_from([b":", b": ", b": ", b":  ", b":\t", b" :"])
_LINE = st.tuples(_NAMES, _SEP, _VALUE).map(b"".join)
# Mostly CRLF, sometimes a bare LF or CR.
_EOL = st.integers(0, 39).map(lambda i: b"\n" if i == 0 else b"\r" if i == 1 else b"\r\n")


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"POST", b"HEAD", b"CONNECT", b"G(T", b""]))
    target = draw(st.sampled_from([b"/", b"/v1/chat/completions?x=1", b"*", b"/\x80", b"/ a"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"]))
    lines = draw(st.lists(_LINE, max_size=6))
    if draw(st.integers(0, 4)):  # usually exactly one Host line, anywhere
        host = draw(st.sampled_from([b"Host: a", b"host:127.0.0.1:8045", b"HOST: \t"]))
        lines.insert(draw(st.integers(0, len(lines))), host)
    out = [method, b" ", target, b" ", version, draw(_EOL)]
    for line in lines:
        out += [line, draw(_EOL)]
        if draw(st.integers(0, 19)) == 0:
            out += [b" folded", b"\r\n"]
    out.append(draw(_EOL))
    out.append(draw(st.sampled_from([b"", b"{}", b"GET / HTTP/1.1\r\n"])))
    return b"".join(out)


@settings(max_examples=500, deadline=None)
@given(heads())
def test_agrees_with_h11(data: bytes) -> None:
    fast = _fast_head(data)
    if fast is None:
        return  # h11 decides, as before
    ref = h11_head(data)
    assert ref is not None, "fast path accepted a head h11 rejects"
    assert ref == (fast.method, fast.target, b"1.1", fast.headers, fast.size)
    names = [n for n, _ in fast.headers]
    assert names.count(b"host") == 1
    assert b"transfer-encoding" not in names and b"expect" not in names
    lengths = [v for n, v in fast.headers if n == b"content-length"]
    assert lengths == ([fast.length] if fast.length is not None else [])


_VALID = (
    b"POST /v1/chat/completions?a=1 HTTP/1.1\r\nHost: 127.0.0.1:8045\r\n"
    b"User-Agent: OpenAI/Python 1.99.0\r\nContent-Type:application/json\r\n"
    b"Connection: keep-alive\r\nContent-Length: 17\r\nX-Stainless-Retry-Count:  0 \t\r\n\r\n"
)


@settings(max_examples=500, deadline=None)
@given(
    st.integers(0, len(_VALID) - 1),
    st.sampled_from(b"\x00\x01\t\n\x0b\r :\x7f\x80/1a") | st.integers(0, 255),
    st.sampled_from(["set", "ins", "del"]),
)
def test_one_byte_off_a_valid_head_agrees_with_h11(pos: int, byte: int, op: str) -> None:
    if op == "set":
        data = _VALID[:pos] + bytes([byte]) + _VALID[pos + 1 :]
    elif op == "ins":
        data = _VALID[:pos] + bytes([byte]) + _VALID[pos:]
    else:
        data = _VALID[:pos] + _VALID[pos + 1 :]
    test_agrees_with_h11.hypothesis.inner_test(data)  # type: ignore[attr-defined]


class _Echo:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes, bytes | None]] = []

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        self.seen.append((request.method, request.path, request.body, request.header(b"x-n")))
        await sink.respond(200, [(b"content-type", b"text/plain")], request.body or b"-")


@pytest.mark.anyio
async def test_fast_and_h11_heads_pipelined_on_one_connection() -> None:
    """Fast heads, chunked and 100-continue heads (h11's) and bare-LF heads alternate in one
    write; every one is answered in order with its own body."""
    raw = b"".join(
        [
            b"POST /a HTTP/1.1\r\nHost: t\r\nX-N: 1\r\nContent-Length: 3\r\n\r\none",
            b"POST /b HTTP/1.1\r\nHost: t\r\nX-N: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\ntwo\r\n0\r\n\r\n",
            b"GET /c HTTP/1.1\r\nHost: t\r\nX-N: 3\r\n\r\n",
            b"GET /d HTTP/1.1\r\nHost: t\r\nX-N: 4\n\r\n",
            b"POST /e HTTP/1.1\r\nHost: t\r\nX-N: 5\r\nContent-Length: 4\r\n\r\nfive",
        ]
    )
    app = _Echo()
    async with h1_serving(app) as c:
        await c.send(raw)
        rs = await c.responses(5)
    assert [r.status for r in rs] == [200] * 5
    assert [r.body for r in rs] == [b"one", b"two", b"-", b"-", b"five"]
    assert app.seen == [
        ("POST", "/a", b"one", b"1"),
        ("POST", "/b", b"two", b"2"),
        ("GET", "/c", b"", b"3"),
        ("GET", "/d", b"", b"4"),
        ("POST", "/e", b"five", b"5"),
    ]
