"""RESP2, sans-IO: commands to bytes, bytes to replies. For the Redis backend's lean path
(lean_redis.py), which sends its hot-path EVALSHA calls with this instead of coredis' client
machinery.

Invariants:
- `encode` writes one command as an array of bulk strings (str as UTF-8, int in decimal,
  bytes as they are): never an inline command, so no argument can be misread.
- `Parser.feed` appends bytes; `Parser.next` returns one whole reply or NEED_MORE, and
  consumes nothing until a reply is whole (a reply split anywhere across reads parses the
  same). Error replies are returned as ReplyError values, never raised: the caller decides,
  and the stream stays in step (the next reply is the next request's).
- Replies: int, bytes (bulk), None (null bulk or array), str (simple string), list, ReplyError.
- A malformed stream raises ProtocolError: the connection is then unusable and is closed.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["NEED_MORE", "Parser", "ProtocolError", "ReplyError", "encode"]


class ProtocolError(Exception):
    """The server sent something that is not RESP2."""


class ReplyError(str):
    """An error reply ("-NOSCRIPT No matching script ..."), as its text."""

    __slots__ = ()

    @property
    def code(self) -> str:
        return self.split(" ", 1)[0]


class _NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = _NeedMore()


def encode(*args: bytes | str | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode()
        elif isinstance(a, int) and not isinstance(a, bool):
            b = b"%d" % a
        else:
            raise TypeError(f"RESP argument of type {type(a).__name__}")
        parts.append(b"$%d\r\n" % len(b))
        parts.append(b)
        parts.append(b"\r\n")
    return b"".join(parts)


# Bounds on what a reply may claim before its bytes arrive (Redis' own proto-max-bulk-len is
# 512 MiB; these replies are a few dozen bytes): a corrupt length fails fast instead of
# waiting for gigabytes.
MAX_BULK = 512 * 1024 * 1024
MAX_ITEMS = 1024 * 1024


class Parser:
    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next(self) -> Any:
        """One whole reply, or NEED_MORE (nothing consumed)."""
        res, end = self._parse(0)
        if res is NEED_MORE:
            return NEED_MORE
        del self._buf[:end]
        return res

    def _line(self, pos: int) -> tuple[bytes | None, int]:
        i = self._buf.find(b"\r\n", pos)
        if i < 0:
            return None, pos
        return bytes(self._buf[pos:i]), i + 2

    def _int(self, raw: bytes) -> int:
        try:
            return int(raw)
        except ValueError:
            raise ProtocolError(f"bad integer {raw[:40]!r}") from None

    def _parse(self, pos: int) -> tuple[Any, int]:
        if pos >= len(self._buf):
            return NEED_MORE, pos
        kind = self._buf[pos]
        line, nxt = self._line(pos + 1)
        if line is None:
            return NEED_MORE, pos
        if kind == 0x2B:  # +
            return line.decode("utf-8", "replace"), nxt
        if kind == 0x2D:  # -
            return ReplyError(line.decode("utf-8", "replace")), nxt
        if kind == 0x3A:  # :
            return self._int(line), nxt
        if kind == 0x24:  # $
            n = self._int(line)
            if n == -1:
                return None, nxt
            if not 0 <= n <= MAX_BULK:
                raise ProtocolError(f"bulk length {n}")
            if len(self._buf) < nxt + n + 2:
                return NEED_MORE, pos
            if self._buf[nxt + n : nxt + n + 2] != b"\r\n":
                raise ProtocolError("bulk string not followed by CRLF")
            return bytes(self._buf[nxt : nxt + n]), nxt + n + 2
        if kind == 0x2A:  # *
            n = self._int(line)
            if n == -1:
                return None, nxt
            if not 0 <= n <= MAX_ITEMS:
                raise ProtocolError(f"array length {n}")
            items = []
            for _ in range(n):
                item, nxt = self._parse(nxt)
                if item is NEED_MORE:
                    return NEED_MORE, pos
                items.append(item)
            return items, nxt
        raise ProtocolError(f"unknown reply type {bytes([kind])!r}")
