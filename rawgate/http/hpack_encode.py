"""The HPACK encoder of the inbound HTTP/2 driver's responses (h2's `encoder` stand-in).

Invariants:
- Sans-IO: `encode(headers)` returns one header block; `header_table_size = n` is how h2 passes
  on the peer's SETTINGS_HEADER_TABLE_SIZE. h2 uses an encoder through those two alone (the
  "h2.H2Connection.encoder" canary), so this class stands in for hpack.Encoder.
- Output is valid RFC 7541 for any input; tests/differential/test_h2_server_encoder.py decodes
  it with hpack's Decoder, table size changes included.
- With compat.fast_paths() off, h2_server keeps h2's own encoder and this module is unused.
"""

from __future__ import annotations

from collections import deque

from rawgate.compat import HPACK_STATIC_TABLE
from rawgate.seam import Header
from rawgate.wire import hpack_int

__all__ = ["ResponseEncoder", "hpack_str"]


def hpack_str(b: bytes) -> bytes:
    return hpack_int(len(b), 7, 0) + b  # raw octets: no Huffman to code or to decode


_STATIC_FIELD: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(HPACK_STATIC_TABLE, 1):
    _STATIC_FIELD.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)
del _i, _n, _v


class ResponseEncoder:
    """HPACK for responses, written for what rawgate sends.

    (bench.bare_server: h2) h2's encoder searches its tables, Huffman-codes and inserts every
    field, and each unique x-request-id churns its dynamic table: ~10 % of an h2 response's CPU
    on the bench box (a quarter of h2_server's own share). Here:
    - fields whose names are in INDEXED (date, server, content-type, x-mapped-model, ...) enter
      the dynamic table once and are one byte (an index) in every later response, as with h2;
    - every other field (x-request-id, content-length, error details) is a literal without
      indexing: it never touches the table; its bytes are cached unless its name is PER_RESPONSE;
    - strings are raw octets: no Huffman coding here, none to undo in the client's decoder.
    The table follows RFC 7541 (entry size 32 + name + value, oldest evicted first, max size
    min(peer's SETTINGS_HEADER_TABLE_SIZE, 4096), size updates at the start of the next block).
    """

    INDEXED = frozenset(
        {
            b"date", b"server", b"content-type", b"cache-control", b"x-accel-buffering",
            b"x-mapped-model", b"x-account-email", b"vary", b"www-authenticate",
            b"access-control-allow-origin", b"access-control-expose-headers",
            b"access-control-allow-methods", b"access-control-allow-headers",
            b"access-control-max-age",
        }
    )  # fmt: skip
    PER_RESPONSE = frozenset(
        {b"x-request-id", b"content-length", b"retry-after", b"retry-after-ms"}
    )
    MAX_TABLE = 4096  # HPACK's default; a peer may ask for less, never makes us use more
    MAX_CACHED = 1024  # cached literal fields; then the cache starts over

    def __init__(self) -> None:
        self._max = self.MAX_TABLE
        self._size = 0
        self._entries: deque[tuple[tuple[bytes, bytes], int, int]] = deque()  # oldest first
        self._seq: dict[tuple[bytes, bytes], int] = {}  # field -> insertion number
        self._inserted = 0
        self._literal: dict[tuple[bytes, bytes], bytes] = {}
        self._updates: list[int] = []  # table size updates owed to the peer

    @property
    def header_table_size(self) -> int:
        return self._max

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # Called by h2 when the peer's SETTINGS_HEADER_TABLE_SIZE changes.
        new = min(value, self.MAX_TABLE)
        if new == self._max and not self._updates:
            return
        self._max = new
        self._evict()
        # RFC 7541 4.2: the smallest size since the last block, then the final one.
        self._updates = [min([*self._updates, new]), new]

    def _evict(self) -> None:
        while self._size > self._max:
            field, size, seq = self._entries.popleft()
            self._size -= size
            if self._seq.get(field) == seq:
                del self._seq[field]

    def encode(self, headers: list[Header], huffman: bool = True) -> bytes:
        out: list[bytes] = []
        if self._updates:
            low, final = self._updates
            out.append(hpack_int(low, 5, 0x20))
            if final != low:
                out.append(hpack_int(final, 5, 0x20))
            self._updates = []
        literal = self._literal
        for field in headers:
            b = literal.get(field)
            if b is not None:
                out.append(b)
                continue
            i = _STATIC_FIELD.get(field)
            if i is not None:
                out.append(hpack_int(i, 7, 0x80))
                continue
            name, value = field
            if name in self.INDEXED:
                seq = self._seq.get(field)
                if seq is not None:
                    out.append(hpack_int(62 + self._inserted - 1 - seq, 7, 0x80))
                    continue
                size = 32 + len(name) + len(value)
                if size <= self._max:
                    out.append(self._name(name, 6, 0x40) + hpack_str(value))
                    self._insert(field, size)
                    continue
            b = self._name(name, 4, 0x00) + hpack_str(value)
            if name not in self.PER_RESPONSE:
                if len(literal) >= self.MAX_CACHED:
                    literal.clear()
                literal[field] = b
            out.append(b)
        return b"".join(out)

    def _name(self, name: bytes, bits: int, flags: int) -> bytes:
        i = _STATIC_NAME.get(name)
        if i is not None:
            return hpack_int(i, bits, flags)
        return bytes((flags,)) + hpack_str(name)

    def _insert(self, field: tuple[bytes, bytes], size: int) -> None:
        self._entries.append((field, size, self._inserted))
        self._size += size
        self._seq[field] = self._inserted
        self._inserted += 1
        self._evict()
