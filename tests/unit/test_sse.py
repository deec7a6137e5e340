"""rawgate.translate.sse: the upstream SSE decoder (framing, Google's raw error objects, bounds)
and the downstream encoders. Hypothesis checks that any split of any input gives the same events and
that well-formed streams decode to exactly what was encoded."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from rawgate.errors import UpstreamProtocolError
from rawgate.translate.sse import DONE, HEARTBEAT, SSEDecoder, data_frame, event_frame


def decode(*chunks: bytes, limit: int | None = None) -> list[bytes]:
    d = SSEDecoder() if limit is None else SSEDecoder(limit)
    out: list[bytes] = []
    for c in chunks:
        out += d.feed(c)
    return out + d.close()


def test_gemini_crlf_framing() -> None:
    body = b'data: {"a": 1}\r\n\r\ndata: {"b": 2}\r\n\r\n'
    assert decode(body) == [b'{"a": 1}', b'{"b": 2}']


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(eol: bytes) -> None:
    body = b"data: x" + eol + eol + b": c" + eol + b"data: y" + eol + b"data: z" + eol + eol
    assert decode(body) == [b"x", b"y\nz"]


def test_mixed_line_endings_and_blank_runs() -> None:
    assert decode(b"data: a\r\n\n\r\r\n\n\ndata: b\n\r\n") == [b"a", b"b"]


def test_field_parsing() -> None:
    body = (
        b"event: message\nid: 7\nretry: 10\nfoo: bar\ndata:nospace\n\n"
        b"data:  two spaces\n\n"
        b"data\n\n"  # a field name alone: empty value, a data line of ""
        b"event: only\n\n"  # no data: nothing dispatched
    )
    assert decode(body) == [b"nospace", b" two spaces", b""]


def test_comments_and_done_are_swallowed() -> None:
    body = b": keepalive\r\n\r\ndata: 1\r\n\r\n:\n\ndata: [DONE]\r\n\r\ndata:[DONE]\n\n"
    assert decode(body) == [b"1"]


def test_multi_line_data_is_one_event() -> None:
    """Vector 2: Code Assist's pretty-printed event over several data: lines."""
    body = b'data: {\ndata:   "response": {"candidates": []},\ndata:   "traceId": "t1"\ndata: }\n\n'
    assert decode(body) == [b'{\n  "response": {"candidates": []},\n  "traceId": "t1"\n}']


def test_raw_error_object_without_data_prefix() -> None:
    """Vector 16 / A5 rule 9: Google writes a pretty JSON error with no data: prefix."""
    err = b'{\n  "error": {\n    "code": 503,\n    "message": "a } b { c \\" }",\n  }\n}\n'
    body = b'data: {"x": 1}\r\n\r\n' + err
    assert decode(body) == [b'{"x": 1}', err.rstrip(b"\n")]
    for k in range(1, len(body)):  # any split, same result
        assert decode(body[:k], body[k:]) == [b'{"x": 1}', err.rstrip(b"\n")]


def test_raw_error_array_and_following_events() -> None:
    body = b'[{\n "error": {"code": 400}\n}]\ndata: after\n\n'
    assert decode(body) == [b'[{\n "error": {"code": 400}\n}]', b"after"]


def test_unbalanced_raw_object_is_returned_at_close() -> None:
    assert decode(b'{\n "error": {\n') == [b'{\n "error": {\n']


def test_last_event_without_blank_line_is_delivered() -> None:
    """The seed system dropped it; a body may end right after the last data line."""
    assert decode(b"data: a\n\ndata: last") == [b"a", b"last"]
    assert decode(b"data: a\r\n\r\ndata: last\r") == [b"a", b"last"]


def test_cr_held_across_reads() -> None:
    # CR then LF in the next read is one line end, so these are two data lines of one event.
    assert decode(b"data: a\r", b"\ndata: b\r", b"\r\n") == [b"a\nb"]
    assert decode(b"data: a\r", b"\r") == [b"a"]


def test_bom_only_at_start() -> None:
    assert decode(b"\xef\xbb\xbfdata: a\n\n") == [b"a"]
    assert decode(b"data: \xef\xbb\xbfa\n\n") == [b"\xef\xbb\xbfa"]


def test_utf8_split_is_never_broken() -> None:
    """Vector 1 at this layer: payload bytes pass through whole, whatever the split."""
    body = 'data: {"text": "Café ☕"}\r\n\r\n'.encode()
    for k in range(1, len(body)):
        assert decode(body[:k], body[k:]) == ['{"text": "Café ☕"}'.encode()]


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: " + b"x" * 200],  # one incomplete line
        [b"data: " + b"x" * 50 + b"\n"] * 5,  # many data lines of one event
        [b"{\n" + b'"a": 1,\n' * 40],  # a raw object that never closes
        [b"data: " + b"y" * 300 + b"\n\n"],  # one complete but oversized event
    ],
)
def test_bounded_buffering(chunks: list[bytes]) -> None:
    d = SSEDecoder(max_event_bytes=128)
    with pytest.raises(UpstreamProtocolError) as ei:
        for c in chunks:
            d.feed(c)
        d.close()
    assert ei.value.code == "upstream_sse_too_large"


def test_big_event_in_many_reads_is_fine_under_the_limit() -> None:
    d = SSEDecoder(max_event_bytes=1 << 20)
    payload = b"z" * 300_000
    body = b"data: " + payload + b"\n\n"
    got: list[bytes] = []
    for i in range(0, len(body), 1000):
        got += d.feed(body[i : i + 1000])
    assert got == [payload]


def test_decoder_is_reusable_after_close() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: a") == []
    assert d.close() == [b"a"]
    assert d.feed(b"\xef\xbb\xbfdata: b\n\n") == [b"b"]
    assert d.close() == []


def test_encoders() -> None:
    assert data_frame(b"{}") == b"data: {}\n\n"
    assert event_frame(b"response.created", b"{}") == b"event: response.created\ndata: {}\n\n"
    assert DONE == b"data: [DONE]\n\n"
    assert HEARTBEAT.startswith(b":") and HEARTBEAT.endswith(b"\n\n")
    assert decode(HEARTBEAT + data_frame(b"1") + DONE) == [b"1"]


# ---- properties ---------------------------------------------------------------------------------

_TOKENS = [b"data:", b"data: ", b": c", b"event: e", b"\r", b"\n", b"\r\n", b"{", b"}", b"["]
_ALPHABET = st.sampled_from([*_TOKENS, b'"', b"\\", b"x", b"[DONE]", b"\xc3", b"\xa9", b" "])


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(st.lists(_ALPHABET, max_size=60), st.lists(st.integers(0, 10_000), max_size=10))
def test_property_any_split_of_any_input_gives_the_same_events(
    tokens: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(tokens)
    assert decode(*_split(data, cuts)) == decode(data)


_PAYLOAD = st.binary(max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").lstrip(b" ")
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(_PAYLOAD, min_size=1, max_size=3), max_size=8),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.booleans(),
    st.lists(st.integers(0, 10_000), max_size=8),
)
def test_property_well_formed_streams_round_trip(
    events: list[list[bytes]], eol: bytes, comments: bool, cuts: list[int]
) -> None:
    body = b""
    expected = []
    for lines in events:
        if comments:
            body += b": ping" + eol + eol
        body += b"".join(b"data: " + ln + eol for ln in lines) + eol
        joined = b"\n".join(lines)
        if joined.strip() != b"[DONE]":
            expected.append(joined)
    assert decode(*_split(body, cuts)) == expected


def _general(*chunks: bytes) -> list[bytes]:
    d = SSEDecoder()
    d._fast = False  # the general parser only, as a reference for the CRLF fast path
    out: list[bytes] = []
    for c in chunks:
        out += d.feed(c)
    return out + d.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(_ALPHABET, max_size=60), st.lists(st.integers(0, 10_000), max_size=10))
def test_property_fast_path_agrees_with_the_general_parser(
    tokens: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(tokens)
    assert decode(*_split(data, cuts)) == _general(data)


def test_fast_path_hands_over_mid_stream() -> None:
    body = (
        b"data: 1\r\n\r\n: keep\r\n\r\ndata: 2\r\n\r\n"  # fast path, comments included
        b"data: 3\n\n"  # LF framing from here on
        b"data: 4\r\ndata: 5\r\n\r\n"  # multi-line
    )
    assert decode(body) == [b"1", b"2", b"3", b"4\n5"]
    for k in range(1, len(body)):
        assert decode(body[:k], body[k:]) == [b"1", b"2", b"3", b"4\n5"]
