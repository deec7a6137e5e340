"""BodyReader (rawgate.upstream.h1_client): the upstream HTTP/1.1 response body framing, sans-IO."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings, strategies as st

from rawgate.errors import UpstreamClosed, UpstreamProtocolError
from rawgate.upstream.h1_client import BodyReader


def chunked(pieces: list[bytes], trailers: bytes = b"") -> bytes:
    """The wire form as h11 writes it."""
    h = h11.Connection(h11.SERVER)
    h.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    h.next_event()
    h.next_event()
    h.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
    out = b"".join(h.send(h11.Data(data=p)) or b"" for p in pieces if p)
    end = h.send(h11.EndOfMessage()) or b""
    if trailers:
        assert end == b"0\r\n\r\n"
        end = b"0\r\n" + trailers + b"\r\n"
    return out + end


def run(reader: BodyReader, reads: list[bytes], eof: bool = False) -> list[bytes]:
    """Feed the reads one by one, taking after each; what take() handed out, in order."""
    got = []
    for r in reads:
        reader.feed(r)
        data = reader.take()
        if data:
            got.append(data)
    if eof:
        reader.end_of_input()
        data = reader.take()
        if data:
            got.append(data)
    return got


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return [x for x in out if x]


def test_chunks_in_one_read_come_out_as_one_piece() -> None:
    wire = chunked([b"data: 1\r\n\r\n", b"data: 2\r\n\r\n", b"x"])
    r = BodyReader(None)
    assert run(r, [wire]) == [b"data: 1\r\n\r\ndata: 2\r\n\r\nx"]
    assert r.done and not r.leftover()


def test_every_split_point_gives_the_same_body() -> None:
    pieces = [b"a", b"bc" * 40, b"\r\n", b"0", b"z" * 300]
    wire = chunked(pieces)
    for i in range(len(wire) + 1):
        r = BodyReader(None)
        got = run(r, [wire[:i], wire[i:]] if i else [wire])
        assert b"".join(got) == b"".join(pieces), i
        assert r.done and not r.leftover()


def test_byte_by_byte() -> None:
    pieces = [b"hello", b" ", b"world"]
    wire = chunked(pieces, trailers=b"x-trailer: 1\r\nx-other: 2\r\n")
    r = BodyReader(None)
    assert b"".join(run(r, [wire[i : i + 1] for i in range(len(wire))])) == b"hello world"
    assert r.done and not r.leftover()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=70), max_size=12),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_any_chunks_any_reads(pieces: list[bytes], cuts: list[int]) -> None:
    wire = chunked(pieces)
    r = BodyReader(None)
    assert b"".join(run(r, splits(wire, cuts))) == b"".join(pieces)
    assert r.done and not r.leftover()


def test_extensions_upper_case_hex_and_spaces_before_crlf() -> None:
    wire = b"A;name=value\r\n0123456789\r\n1 \r\nx\r\n0\r\n\r\n"
    r = BodyReader(None)
    assert run(r, [wire]) == [b"0123456789x"]
    assert r.done


def test_empty_chunked_body() -> None:
    r = BodyReader(None)
    assert run(r, [b"0\r\n\r\n"]) == []
    assert r.done


def test_bytes_after_the_body_are_leftover() -> None:
    r = BodyReader(None)
    assert run(r, [b"1\r\na\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n"]) == [b"a"]
    assert r.done and r.leftover()
    r = BodyReader(3)
    assert run(r, [b"abcdef"]) == [b"abc"]
    assert r.done and r.leftover()


@pytest.mark.parametrize(
    "size_line", [b"x", b"0x1", b"+1", b" 1", b"1_0", b"", b"1" * 17, b"-1"]
)
def test_bad_chunk_sizes_are_protocol_errors(size_line: bytes) -> None:
    r = BodyReader(None)
    r.feed(size_line + b"\r\nabc\r\n")
    with pytest.raises(UpstreamProtocolError, match="chunk size"):
        r.take()


def test_data_before_a_framing_error_comes_first() -> None:
    r = BodyReader(None)
    r.feed(b"2\r\nab\r\n1\r\ncXX")  # no CRLF after the chunk data
    assert r.take() == b"abc"
    with pytest.raises(UpstreamProtocolError, match="CRLF"):
        r.take()
    with pytest.raises(UpstreamProtocolError):
        r.take()  # stays broken


def test_an_endless_size_line_is_bounded() -> None:
    r = BodyReader(None, max_line=100)
    r.feed(b"1" * 50)
    assert r.take() == b""
    r.feed(b";" + b"e" * 100)
    with pytest.raises(UpstreamProtocolError, match="over-long"):
        r.take()


def test_content_length_body_in_pieces_and_cut_short() -> None:
    r = BodyReader(10)
    assert run(r, [b"abc", b"defg", b"hij"]) == [b"abc", b"defg", b"hij"]
    assert r.done and not r.leftover()
    r = BodyReader(10)
    r.feed(b"abc")
    assert r.take() == b"abc"
    r.end_of_input()
    with pytest.raises(UpstreamClosed, match="mid-body"):
        r.take()


def test_zero_length_is_done_at_once_and_eof_body_ends_at_eof() -> None:
    assert BodyReader(0).done
    r = BodyReader(None, until_eof=True)
    assert run(r, [b"a", b"b"], eof=True) == [b"a", b"b"]
    assert r.done


def test_chunked_cut_short_by_eof() -> None:
    r = BodyReader(None)
    assert run(r, [b"5\r\nab"]) == [b"ab"]
    r.end_of_input()
    with pytest.raises(UpstreamClosed):
        r.take()
