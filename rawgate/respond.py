"""Response helpers over a ResponseSink: JSON bodies, OpenAI-style errors, SSE heads.

Invariants:
- Constant header pairs are built once at import; every call still hands the sink a NEW list,
  because drivers and sink wrappers may append (date, server, x-request-id) to the list they get.
- `error_response` always sends the OpenAI shape `{"error": {...}}` with the error's own status
  and its headers (Retry-After, Allow, WWW-Authenticate ...), then the caller's extra headers.
- Nothing here formats per-request strings beyond what the caller passes in.
"""

from __future__ import annotations

from collections.abc import Iterable

from rawgate.errors import RawgateError
from rawgate.seam import Header, ResponseSink

__all__ = [
    "JSON_CONTENT_TYPE",
    "SSE_DONE",
    "error_response",
    "json_response",
    "sse_headers",
]


JSON_CONTENT_TYPE: Header = (b"content-type", b"application/json")
# Error bodies describe one failure; a cache or proxy must never replay them.
_NO_STORE: Header = (b"cache-control", b"no-store")
_SSE_CONTENT_TYPE: Header = (b"content-type", b"text/event-stream; charset=utf-8")
_SSE_NO_CACHE: Header = (b"cache-control", b"no-cache")
# nginx (and proxies copying it) buffer responses unless told otherwise; SSE must flow per event.
_SSE_NO_BUFFER: Header = (b"x-accel-buffering", b"no")

SSE_DONE = b"data: [DONE]\n\n"
"""The terminator every OpenAI SDK waits for at the end of a chat/completions stream."""


async def json_response(
    sink: ResponseSink, status: int, body: bytes, extra_headers: Iterable[Header] = ()
) -> None:
    """Send a complete JSON response (head and body in one driver write)."""
    headers = [JSON_CONTENT_TYPE]
    headers.extend(extra_headers)
    await sink.respond(status, headers, body)


async def error_response(
    sink: ResponseSink, err: RawgateError, extra_headers: Iterable[Header] = ()
) -> None:
    """Send `err` as an OpenAI-style JSON error with its status and headers."""
    headers = [JSON_CONTENT_TYPE, _NO_STORE]
    headers.extend(err.headers)
    headers.extend(extra_headers)
    await sink.respond(err.status, headers, err.to_json())


def sse_headers() -> list[Header]:
    """A fresh list of the response headers of a server-sent-events stream."""
    return [_SSE_CONTENT_TYPE, _SSE_NO_CACHE, _SSE_NO_BUFFER]
