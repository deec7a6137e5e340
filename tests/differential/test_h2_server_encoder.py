"""h2_server's response HPACK encoder, checked against hpack's decoder (RFC 7541)."""

from __future__ import annotations

from hpack import Decoder
from hypothesis import given, settings, strategies as st

from rawgate.http.hpack_encode import ResponseEncoder as _Encoder
from rawgate.wire import hpack_int as _hpack_int

HEAD = [
    (b":status", b"200"),
    (b"date", b"Mon, 01 Dec 2026 10:00:00 GMT"),
    (b"server", b"rawgate"),
    (b"content-type", b"application/json"),
    (b"x-mapped-model", b"gemini-2.5-flash"),
    (b"x-request-id", b"0123456789abcdef"),
    (b"content-length", b"1234"),
]


def decode(d: Decoder, block: bytes) -> list[tuple[bytes, bytes]]:
    return [(bytes(k), bytes(v)) for k, v in d.decode(block, raw=True)]


def test_integers() -> None:
    assert _hpack_int(10, 5, 0) == b"\x0a"
    assert _hpack_int(1337, 5, 0) == b"\x1f\x9a\x0a"  # RFC 7541 C.1.2
    assert _hpack_int(42, 8, 0) == b"\x2a"
    assert _hpack_int(127, 7, 0x80) == b"\xff\x00"


def test_repeated_fields_become_indexes_and_unique_ones_stay_out() -> None:
    enc, dec = _Encoder(), Decoder()
    sizes = []
    for i in range(20):
        head = [*HEAD[:5], (b"x-request-id", b"%016x" % i), (b"content-length", b"%d" % i)]
        block = enc.encode(head)
        sizes.append(len(block))
        assert decode(dec, block) == head
    # Only the repeating fields were inserted (server and content-type are static names).
    table = {(bytes(n), bytes(v)) for n, v in dec.header_table.dynamic_entries}
    assert table == set(HEAD[1:5])
    assert sizes[1] < sizes[0] - 60  # indexes from the second response on
    assert len(set(sizes[1:])) <= 2  # ids and short lengths only


def test_date_changes_evict_old_entries_within_the_table_size() -> None:
    enc, dec = _Encoder(), Decoder()
    for second in range(300):  # 300 distinct dates: far more than 4096 bytes of entries
        head = [(b":status", b"200"), (b"date", b"Mon, 01 Dec 2026 10:%05d GMT" % second)]
        assert decode(dec, enc.encode(head)) == head
    assert dec.header_table._current_size <= 4096
    assert enc._size == dec.header_table._current_size


def test_table_size_updates() -> None:
    enc, dec = _Encoder(), Decoder()
    assert decode(dec, enc.encode(HEAD)) == HEAD
    enc.header_table_size = 0  # the peer says: no table
    dec.max_allowed_table_size = 0
    block = enc.encode(HEAD)
    assert block[:1] == b"\x20"
    assert decode(dec, block) == HEAD
    assert len(dec.header_table.dynamic_entries) == 0
    # Down to 0 and back up before the next block: both sizes are signalled, smallest first.
    enc.header_table_size = 4096
    enc.header_table_size = 100
    enc.header_table_size = 8192  # more than the encoder ever uses: it stays at 4096
    dec.max_allowed_table_size = 8192
    block = enc.encode(HEAD)
    assert block[:5] == _hpack_int(100, 5, 0x20) + _hpack_int(4096, 5, 0x20)
    assert decode(dec, block) == HEAD
    assert enc.encode(HEAD)[:1] != b"\x20"  # signalled once


def test_per_response_fields_stay_out_of_the_literal_cache() -> None:
    enc = _Encoder()
    for i in range(50):
        enc.encode([(b"x-request-id", b"%016x" % i), (b"content-length", b"%d" % i)])
    assert enc._literal == {}
    for i in range(enc.MAX_CACHED + 10):
        enc.encode([(b"x-other", b"%d" % i)])
    assert len(enc._literal) <= enc.MAX_CACHED


_NAMES = st.sampled_from(
    [b"date", b"server", b"content-type", b"x-mapped-model", b"x-account-email", b"vary",
     b"x-request-id", b"content-length", b"retry-after", b"x-other", b"allow", b":status"]
)  # fmt: skip
_FIELDS = st.tuples(_NAMES, st.binary(max_size=300) | st.sampled_from([b"", b"200", b"a"]))
_STEP = st.one_of(
    st.lists(_FIELDS, max_size=8).map(lambda fs: ("block", fs)),
    st.integers(0, 8192).map(lambda n: ("size", n)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_STEP, max_size=30))
def test_any_sequence_decodes(steps: list[tuple[str, object]]) -> None:
    enc, dec = _Encoder(), Decoder()
    dec.max_allowed_table_size = 8192
    for kind, arg in steps:
        if kind == "size":
            assert isinstance(arg, int)
            enc.header_table_size = arg
            continue
        assert isinstance(arg, list)
        assert decode(dec, enc.encode(arg)) == arg
        assert enc._size == dec.header_table._current_size <= enc._max
