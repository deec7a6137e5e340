"""Request-target parsing shared by both HTTP drivers, so auth and routing see one path.

Invariants:
- Only origin-form targets (`/path?query`) reach an application; `OPTIONS *` is the one exception
  (path "*"). Absolute-form, authority-form, non-ASCII or control bytes are 400s.
- The path is NOT normalised or percent-decoded: routing is an exact table, so `/a/../v1/models`,
  `//v1/models` or `%2F` tricks simply match no route. Auth and routing look at this same string,
  which is what makes path tricks unable to reach a protected route unauthenticated.
- A fragment (never sent by well-behaved clients) is dropped.
"""

from __future__ import annotations

from rawgate.errors import BadRequest

__all__ = ["parse_target"]

# Visible ASCII only: RFC 9112 request-target bytes. Control bytes and spaces are attacks.
_ALLOWED = frozenset(range(0x21, 0x7F))


def parse_target(raw: bytes) -> tuple[str, str]:
    """(path, query) of a request-target. Raises BadRequest for anything but origin-form."""
    if raw == b"*":
        return "*", ""
    if not raw.startswith(b"/"):
        raise BadRequest("request target must be an absolute path such as /v1/models")
    if not _ALLOWED.issuperset(raw):
        raise BadRequest("request target contains bytes that are not allowed")
    text = raw.decode("ascii")
    text = text.split("#", 1)[0]
    path, _, query = text.partition("?")
    return path, query
