"""resp.py: RESP2 commands to bytes and bytes to replies, split anywhere."""

from __future__ import annotations

import pytest

from rawgate.state.resp import NEED_MORE, Parser, ProtocolError, ReplyError, encode


def test_encode_is_an_array_of_bulk_strings() -> None:
    assert encode("EVALSHA", b"ab", 1, "k\x1fé", -5) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$4\r\nk\x1f\xc3\xa9\r\n$2\r\n-5\r\n"
    )
    assert encode("X", b"") == b"*2\r\n$1\r\nX\r\n$0\r\n\r\n"
    assert encode("x", b"a\r\nb") == b"*2\r\n$1\r\nx\r\n$4\r\na\r\nb\r\n"  # binary-safe
    with pytest.raises(TypeError):
        encode("X", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode("X", True)


STREAM = (
    b"+OK\r\n"
    b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
    b":-42\r\n"
    b"$5\r\nhe\r\nl\r\n"
    b"$-1\r\n"
    b"*-1\r\n"
    b"*0\r\n"
    b"*3\r\n:1\r\n$0\r\n\r\n*2\r\n$3\r\nrpm\r\n:60000\r\n"
)
EXPECTED = [
    "OK",
    ReplyError("NOSCRIPT No matching script. Please use EVAL."),
    -42,
    b"he\r\nl",
    None,
    None,
    [],
    [1, b"", [b"rpm", 60000]],
]


def _drain(p: Parser) -> list[object]:
    out = []
    while (r := p.next()) is not NEED_MORE:
        out.append(r)
    return out


def test_replies_whole_and_split_at_every_byte() -> None:
    p = Parser()
    p.feed(STREAM)
    got = _drain(p)
    assert got == EXPECTED and p.buffered == 0
    assert isinstance(got[1], ReplyError) and got[1].code == "NOSCRIPT"
    assert not isinstance(got[0], ReplyError)
    for cut in range(len(STREAM) + 1):  # one split point anywhere
        p = Parser()
        p.feed(STREAM[:cut])
        got = _drain(p)
        p.feed(STREAM[cut:])
        assert got + _drain(p) == EXPECTED, cut
    p = Parser()  # one byte at a time
    got = []
    for i in range(len(STREAM)):
        p.feed(STREAM[i : i + 1])
        got += _drain(p)
    assert got == EXPECTED and p.buffered == 0


def test_incomplete_consumes_nothing() -> None:
    p = Parser()
    p.feed(b"*2\r\n:1\r\n$3\r\nab")
    assert p.next() is NEED_MORE and p.buffered == len(b"*2\r\n:1\r\n$3\r\nab")
    p.feed(b"c\r\n:7")
    assert p.next() == [1, b"abc"]
    assert p.next() is NEED_MORE and p.buffered == 2


@pytest.mark.parametrize(
    "bad",
    [b"?x\r\n", b":12a\r\n", b"$3\r\nabcXY", b"$-2\r\n", b"*-3\r\n", b"$99999999999\r\n"],
)
def test_malformed_raises(bad: bytes) -> None:
    p = Parser()
    p.feed(bad)
    with pytest.raises(ProtocolError):
        p.next()
