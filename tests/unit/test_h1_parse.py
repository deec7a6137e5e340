"""rawgate/http/h1_parse.py, the sans-IO half of the HTTP/1.1 driver, tested in bytes.

Every head is also fed split at every offset, the way a socket may deliver it, through the
incremental end-of-head search the driver runs (head_end with its `scanned` carry-over): the end
is found exactly once, at the same offset as in one piece, and never before the last byte of
the blank line has arrived.
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from rawgate import compat
from rawgate.config import Config
from rawgate.conn import ConnInfo, ServerState
from rawgate.errors import HeadersTooLarge, URITooLong
from rawgate.http import h1_server
from rawgate.http.h1_parse import (
    OBS_FOLD,
    fast_head,
    h11_fields,
    head_end,
    head_error,
    overflow_error,
    says_close,
)

POST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Connection: keep-alive\r\nContent-Length: 2\r\n\r\n{}"
)
BARE_LF = b"GET / HTTP/1.1\nHost: x\n\nGET /2 HTTP/1.1\n"
MIXED = b"GET / HTTP/1.1\r\nHost: x\n\r\nrest"

HEADS = [POST, BARE_LF, MIXED, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]


def _end_when_trickled(data: bytes, cuts: list[int]) -> tuple[int, int]:
    """(end found, bytes buffered when it was found), feeding `data` cut at `cuts` the way the
    driver does: the search resumes where the last one stopped."""
    buf = bytearray()
    scanned = 0
    prev = 0
    for cut in [*cuts, len(data)]:
        buf += data[prev:cut]
        prev = cut
        end = head_end(buf, scanned)
        if end >= 0:
            return end, len(buf)
        scanned = len(buf)
    return -1, len(buf)


@pytest.mark.parametrize("data", HEADS)
def test_head_end_split_at_every_offset(data: bytes) -> None:
    whole = head_end(data, 0)
    assert whole > 0
    for i in range(1, len(data)):
        end, seen = _end_when_trickled(data, [i])
        assert end == whole, (i, end)
        assert seen >= whole
    # One byte per read: still found once, at the same place.
    end, seen = _end_when_trickled(data, list(range(1, len(data))))
    assert (end, seen) == (whole, whole)


def test_head_end_ends() -> None:
    assert head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0) == 27
    assert head_end(b"GET / HTTP/1.1\nHost: x\n\n", 0) == 24
    assert head_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 0) == -1
    assert head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r", 0) == -1


@pytest.mark.parametrize("cut", range(len(POST)))
def test_fast_head_only_on_a_whole_head(cut: int) -> None:
    head = fast_head(POST[:cut])
    end = POST.index(b"\r\n\r\n") + 4
    if cut < end:
        assert head is None  # an incomplete head never matches (h11 gets it once complete)
    else:
        assert head is not None and head.size == end


def test_fast_head_fields() -> None:
    head = fast_head(POST)
    assert head is not None
    assert (head.method, head.target, head.length, head.close) == (
        b"POST", b"/v1/chat/completions", b"2", False,
    )
    assert head.headers == [
        (b"host", b"x"),
        (b"content-type", b"application/json"),
        (b"connection", b"keep-alive"),
        (b"content-length", b"2"),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n",
        b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
        BARE_LF,
    ],
)
def test_fast_head_hands_these_to_h11(data: bytes) -> None:
    assert fast_head(data) is None


def test_says_close() -> None:
    assert says_close(b"close")
    assert says_close(b"keep-alive, Close ")
    assert not says_close(b"closed")
    assert not says_close(b"keep-alive")


def test_h11_fields() -> None:
    assert h11_fields([(b"host", b"x")]) == (None, False, False)
    assert h11_fields(
        [(b"content-length", b"5"), (b"transfer-encoding", b"chunked"), (b"connection", b"close")]
    ) == (b"5", True, True)


def test_obs_fold() -> None:
    assert OBS_FOLD.search(b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n") is not None
    assert OBS_FOLD.search(b"GET / HTTP/1.1\r\nA: b\r\n\tc\r\n\r\n") is not None
    assert OBS_FOLD.search(POST) is None


def test_head_error_order() -> None:
    lim = {"max_url": 10, "max_head": 100, "max_count": 3}
    assert head_error(50, 2, b"/short", **lim) is None
    # A long target is 414 even when the head is also too big.
    assert isinstance(head_error(500, 9, b"/" + b"a" * 20, **lim), URITooLong)
    assert isinstance(head_error(101, 2, b"/", **lim), HeadersTooLarge)
    e = head_error(50, 4, b"/", **lim)
    assert isinstance(e, HeadersTooLarge) and "headers" in str(e)


def test_overflow_error() -> None:
    # No line end yet within the limit: the request line alone is too long.
    assert isinstance(overflow_error(b"GET /" + b"a" * 200, max_url=10, max_head=100), URITooLong)
    # The request line ended with a target over max_url: 414 as a whole head would get.
    data = b"GET /" + b"a" * 20 + b" HTTP/1.1\r\nX: " + b"b" * 200
    assert isinstance(overflow_error(data, max_url=10, max_head=100), URITooLong)
    data = b"GET / HTTP/1.1\r\nX: " + b"b" * 200
    assert isinstance(overflow_error(data, max_url=10, max_head=100), HeadersTooLarge)


# ---- the driver's parser, fed in bytes split at every offset ---------------------------------

# Pipelined on one connection: a fast head with a Content-Length body, a chunked body (h11's),
# a bare-LF head (h11's), a bodiless fast head with Connection: keep-alive, a HEAD.
WIRE = b"".join(
    [
        b"POST /a?x=1 HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 7\r\n\r\n{\"a\":1}",
        b"POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\ntwo\r\n4;ext=1\r\n-two\r\n0\r\n\r\n",
        b"GET /c HTTP/1.1\nHost: t\nX-N: 3\n\n",
        b"GET /d HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\n\r\n",
        b"HEAD /e HTTP/1.1\r\nHost: t\r\n\r\n",
    ]
)


async def _noop_app(request: Any, sink: Any) -> None:
    return None


def _parsed(pieces: list[bytes], fast: bool) -> list[tuple[Any, ...]]:
    """What the driver queued for the app after being fed `pieces`, one _feed per piece."""
    before = compat.fast_paths()
    compat.set_fast_paths(fast)
    try:
        c = h1_server._Conn(cast(Any, None), _noop_app, Config(), ConnInfo(), ServerState())
    finally:
        compat.set_fast_paths(before)
    for p in pieces:
        c._feed(p)
    return [
        (ex.method, ex.target, ex.path, ex.query, ex.headers, b"".join(ex.body), ex.done,
         ex.close, ex.is_head, None if ex.error is None else (type(ex.error), str(ex.error)))
        for ex in c._queue
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("fast", [True, False], ids=["fast_paths", "public_api"])
async def test_driver_parse_split_at_every_offset(fast: bool) -> None:
    whole = _parsed([WIRE], fast)
    assert [(m, p, body) for m, _, p, _, _, body, *_ in whole] == [
        ("POST", "/a", b'{"a":1}'),
        ("POST", "/b", b"two-two"),
        ("GET", "/c", b""),
        ("GET", "/d", b""),
        ("HEAD", "/e", b""),
    ]
    assert all(done and err is None for *_, done, _, _, err in whole)
    # Both switch positions read the same requests.
    assert whole == _parsed([WIRE], not fast)
    for i in range(1, len(WIRE)):
        assert _parsed([WIRE[:i], WIRE[i:]], fast) == whole, i
    assert _parsed([WIRE[i : i + 1] for i in range(len(WIRE))], fast) == whole


@pytest.mark.anyio
@pytest.mark.parametrize("fast", [True, False], ids=["fast_paths", "public_api"])
async def test_driver_limits_hold_at_every_split(fast: bool) -> None:
    """A head over max_header_bytes is refused the same whether it arrives whole or cut."""
    big = b"GET /x HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 70_000 + b"\r\n\r\n"
    whole = _parsed([big], fast)
    assert len(whole) == 1 and whole[0][-1] is not None and whole[0][-1][0] is HeadersTooLarge
    for i in (1, 17, 30, 10_000, 66_000, len(big) - 1):
        got = _parsed([big[:i], big[i:]], fast)
        assert len(got) == 1 and got[0][-1] is not None and got[0][-1][0] is HeadersTooLarge, i
