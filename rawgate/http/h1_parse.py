"""The sans-IO half of the inbound HTTP/1.1 driver: bytes in, parsed heads and verdicts out.

Invariants:
- Nothing here does I/O, keeps state between calls or touches h11: every function takes bytes
  (or what h11 already parsed) and returns records, offsets or an error to answer. The driver
  (h1_server) owns the buffer, the exchanges and the clock; h11's private buffer is reached only
  through rawgate/compat.py.
- `fast_head` accepts a strict subset of what h11 accepts and reads it exactly as h11 does
  (tests/differential/test_h1_fast_head.py is the differential test against h11); everything
  it declines goes to h11 untouched.
- `head_end` is incremental: given how many leading bytes are known to hold no end of head, it
  looks only at the rest, so a head trickled a few bytes at a time costs linear CPU.
- The limit checks (`head_error`, `overflow_error`) are pure functions of the bytes and the
  limits; a long target is 414 whether its head arrived whole or in pieces, then head bytes and
  header count are 431.
"""

from __future__ import annotations

import re

from rawgate.errors import HeadersTooLarge, RawgateError, URITooLong
from rawgate.seam import Header

__all__ = [
    "OBS_FOLD",
    "FastHead",
    "fast_head",
    "h11_fields",
    "head_end",
    "head_error",
    "overflow_error",
    "says_close",
]

# (bench.micro: h1_fast_head) The common request head parsed without h11: one regex over the
# request line and CRLF header lines, then one partition per header: ~9 us against h11's ~70 us
# for the bench's 4-header POST on the bench box. It accepts a strict subset of what h11 accepts
# (token method, VCHAR target, exactly HTTP/1.1, token names, values of HTAB/SP/VCHAR/obs-text,
# CRLF line ends only; h11 also takes bare LF, obs-fold and control bytes in values) and yields
# what h11 would (lower-case names, values without surrounding OWS). Whatever needs h11's
# judgement goes to h11 untouched: heads that do not match (incomplete ones included), CONNECT,
# and heads with transfer-encoding, expect or upgrade, a missing or repeated host, or a repeated
# or non-digit content-length. The character classes exclude CR and LF, so the match is linear
# and ends at the first blank line.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_FAST_HEAD = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1\r\n"
    rb"((?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*)\r\n"
)
_TO_H11 = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_OWS = b" \t"

# h11's end of a head: a blank line, CRLF or bare LF (its blank_line_regex).
_BLANK_LINE = re.compile(rb"\n\r?\n")
# A header line that starts with whitespace: obs-fold (RFC 9112 5.2), refused with 400.
OBS_FOLD = re.compile(rb"\n[ \t]")


class FastHead:
    """A request head parsed by fast_head (the fields the driver's _start needs)."""

    __slots__ = ("close", "headers", "length", "method", "size", "target")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: list[Header],
        length: bytes | None,
        close: bool,
        size: int,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.length = length
        self.close = close
        self.size = size  # head bytes


def fast_head(data: bytes | bytearray) -> FastHead | None:
    """The head at the start of `data` if it is a plain HTTP/1.1 head, else None."""
    m = _FAST_HEAD.match(data)
    if m is None:
        return None
    method, target, block = m.groups()
    if method == b"CONNECT":
        return None
    headers: list[Header] = []
    length: bytes | None = None
    hosts = 0
    close = False
    if block:
        for line in block[:-2].split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.lower()
            value = value.strip(_OWS)
            headers.append((name, value))
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                if length is not None or not value.isdigit():
                    return None
                length = value
            elif name == b"connection":
                close = close or says_close(value)
            elif name in _TO_H11:
                return None
    if hosts != 1:
        return None
    return FastHead(method, target, headers, length, close, m.end())


def head_end(data: bytes | bytearray, scanned: int) -> int:
    """The offset just past the head's end in `data`, or -1. The first `scanned` bytes are known
    to hold no end, so the search starts 2 bytes before them (the longest end is 3 bytes)."""
    m = _BLANK_LINE.search(data, max(0, scanned - 2))
    return -1 if m is None else m.end()


def says_close(value: bytes) -> bool:
    """Whether a Connection header value holds the `close` token (h11's rule, RFC 9112 9.6)."""
    return any(t.strip() == b"close" for t in value.lower().split(b","))


def h11_fields(
    pairs: list[Header],
) -> tuple[bytes | None, bool, bool]:
    """(content-length, chunked, close) of headers h11 parsed (lower-case names): h11 checked the
    digits and merged duplicate lengths, and allows no transfer-coding but chunked (501)."""
    length: bytes | None = None
    chunked = close = False
    for name, value in pairs:
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"connection" and says_close(value):
            close = True
    return length, chunked, close


def head_error(
    head_bytes: int,
    n_headers: int,
    target: bytes,
    *,
    max_url: int,
    max_head: int,
    max_count: int,
) -> RawgateError | None:
    """The limit a complete head breaks, if any: target length (414) first, then head bytes and
    header count (431)."""
    if len(target) > max_url:
        return URITooLong(f"request target longer than {max_url} bytes")
    if head_bytes > max_head:
        return HeadersTooLarge(f"request head larger than {max_head} bytes")
    if n_headers > max_count:
        return HeadersTooLarge(f"more than {max_count} request headers")
    return None


def overflow_error(data: bytes | bytearray, *, max_url: int, max_head: int) -> RawgateError:
    """An incomplete head over max_head: 414 if its request line ended with (or has not yet
    ended within) a target over max_url, else 431, as a complete head gets."""
    nl = data.find(b"\n", 0, max_head + 1)
    if nl < 0:
        return URITooLong("request line too long")
    parts = bytes(data[:nl]).split(b" ")
    if len(parts) >= 2 and len(parts[1]) > max_url:
        return URITooLong(f"request target longer than {max_url} bytes")
    return HeadersTooLarge(f"request head larger than {max_head} bytes")
