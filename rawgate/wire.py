"""HTTP wire tables and tiny encoders shared by the drivers (inbound and outbound) and the
emulator: defined once here, since http, upstream and emulator may not import each other.

Invariants:
- Pure and dependency-free (stdlib only): constants built once at import, functions that take
  and return bytes.
- `per_second_date` formats the Date header at most once per second per caller (formatdate
  costs ~5 us on the bench box) and builds the caller's derived value (a header line, a header
  tuple) in the same step, so the per-response cost is one time() and one compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import formatdate
from typing import TypeVar

__all__ = ["METHODS", "TOKEN_BYTES", "hpack_int", "per_second_date"]

T = TypeVar("T")

# Interned method strings: no decode per request for the methods clients actually send.
METHODS: dict[bytes, str] = {
    m.encode(): m for m in ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH")
}
# RFC 9110 5.6.2 tchar, as byte values.
TOKEN_BYTES = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


def per_second_date(build: Callable[[bytes], T]) -> Callable[[], T]:
    """A function returning `build(<IMF-fixdate of now>)`, rebuilt at most once per second."""
    second = -1
    value: T | None = None

    def current() -> T:
        nonlocal second, value
        now = int(time.time())
        if now != second:
            value = build(formatdate(now, usegmt=True).encode("ascii"))
            second = now
        return value  # type: ignore[return-value]

    return current


def hpack_int(value: int, bits: int, flags: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with a `bits`-bit prefix, OR-ed with the representation's
    flag bits in the first byte."""
    top = (1 << bits) - 1
    if value < top:
        return bytes((flags | value,))
    out = bytearray((flags | top,))
    value -= top
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
