"""The sans-IO response half of the inbound HTTP/1.1 driver: response heads and framing as bytes.

Invariants:
- No I/O and no state but the per-second Date line: `response_head` returns the bytes of a head,
  the framing constants end one; h1_server decides which framing a response gets and writes.
- Only final statuses (200..599) get a head here (100 Continue is the CONTINUE constant); a
  header name or value holding CR, LF or NUL is a ValueError before anything is written
  (response splitting), found with counts over the joined block, not a loop per header.
- Header names are the handler's, lower-case, with no hop-by-hop headers (seam.py); the date and
  server lines are added here, the framing line (content-length or chunked, connection: close)
  by the caller's choice of constant.
"""

from __future__ import annotations

from http import HTTPStatus

from rawgate.seam import Header
from rawgate.wire import per_second_date

__all__ = [
    "CHUNKED",
    "CHUNKED_CLOSE",
    "CONTINUE",
    "END",
    "END_CLOSE",
    "LAST_CHUNK",
    "LENGTH",
    "LENGTH_CLOSE",
    "NO_BODY",
    "STATUS_LINE",
    "response_head",
]

# (bench.micro: h1_head) Status lines for every code, built once: no per-response formatting.
STATUS_LINE: dict[int, bytes] = {}
for _s in range(100, 600):
    try:
        _phrase = HTTPStatus(_s).phrase.encode("ascii")
    except ValueError:
        _phrase = b""
    STATUS_LINE[_s] = b"HTTP/1.1 %d %s\r\n" % (_s, _phrase)
del _s, _phrase
# Statuses whose responses never carry a body or framing headers (RFC 9110 6.4.1).
NO_BODY = frozenset({204, 304})
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# (bench.micro: h1_head) Framing lines, each ending the head. %d is the only per-response
# formatting.
END = b"\r\n"
END_CLOSE = b"connection: close\r\n\r\n"
LENGTH = b"content-length: %d\r\n\r\n"
LENGTH_CLOSE = b"content-length: %d\r\nconnection: close\r\n\r\n"
CHUNKED = b"transfer-encoding: chunked\r\n\r\n"
CHUNKED_CLOSE = b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"

# (bench.micro: h1_head) `date` + `server` lines, formatted at most once per second (formatdate
# costs ~5 us).
_common_lines = per_second_date(lambda d: b"date: " + d + b"\r\nserver: rawgate\r\n")


def response_head(status: int, headers: list[Header], framing: bytes) -> bytes:
    """A response head. Raises ValueError for a bad status or a header holding CR/LF/NUL."""
    line = STATUS_LINE.get(status)
    if line is None or status < 200:
        raise ValueError(f"response status {status} is not a final status (200..599)")
    if not headers:
        return line + _common_lines() + framing
    # (bench.micro: h1_head) map + join run in C: no Python loop per header. A CR or LF inside a
    # name or value shows up as one more than the separators in the block.
    block = b"\r\n".join(map(b": ".join, headers))
    n = len(headers) - 1
    if block.count(b"\n") != n or block.count(b"\r") != n or b"\0" in block:
        raise ValueError("response header name or value contains CR, LF or NUL")
    return b"".join((line, _common_lines(), block, b"\r\n", framing))
