"""Wire encoders of the Gemini emulator: google.rpc.Status errors, SSE frames, the JSON array.

Invariants:
- Encoders frame what the plan says and nothing more: SSE `data: <json>\\r\\n\\r\\n` (CRLF, no
  [DONE], protocols.md A5), the non-alt stream as one JSON array written element by element, the
  Code Assist `{"response": ..., "traceId": ...}` wrap (protocols.md B2).
- An error after the 200 head is raw pretty-printed JSON without `data:` (A5 rule 9).
- QUIRKS bend the SSE framing on purpose (reliability.md 3.7) and only when a directive asks.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["QUIRKS", "STATUS_NAMES", "encode_array", "encode_sse", "google_error"]

# SSE framing oddities seen from proxies and Code Assist (reliability.md 3.7), for parser tests.
QUIRKS = ("lf", "keepalive", "done", "no_finish", "bad_json", "multiline", "event_lines",
          "non_utf8")
STATUS_NAMES = {
    200: "OK", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
    500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
_STOCK_MESSAGES = {
    400: "Request contains an invalid argument.",
    401: "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project.",
    403: "The caller does not have permission",
    404: "Requested entity was not found.",
    500: "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
    504: "The request timed out. Please try again.",
}

# ---- errors -------------------------------------------------------------------------------------


def google_error(
    code: int, message: str | None = None, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A google.rpc.Status error envelope `{"error": {code, message, status, details?}}`."""
    err: dict[str, Any] = {
        "code": code,
        "message": message or _STOCK_MESSAGES.get(code, "Error."),
        "status": STATUS_NAMES.get(code, "UNKNOWN"),
    }
    if details:
        err["details"] = details
    return {"error": err}


# ---- wire encoders ------------------------------------------------------------------------------


def _wrap(events: list[dict[str, Any]], trace: str | None) -> list[bytes]:
    if trace is None:
        return [orjson.dumps(e) for e in events]
    tail = b',"traceId":"' + trace.encode() + b'"}'
    return [b'{"response":' + orjson.dumps(e) + tail for e in events]


def _error_json(error: dict[str, Any] | None) -> bytes:
    # After the 200 head Google writes the error as raw, pretty-printed JSON without `data:`
    # (protocols.md A5 rule 9); python-genai reassembles it by brace counting.
    return orjson.dumps(error, option=orjson.OPT_INDENT_2) + b"\n"


def encode_sse(
    events: list[dict[str, Any]], trace: str | None = None, error: dict[str, Any] | None = None,
    quirks: tuple[str, ...] = (),
) -> list[bytes]:
    """One `data: <json>\r\n\r\n` frame per event (CRLF framing, no [DONE], protocols.md A5),
    then `error` (if any) as a raw JSON object; `quirks` bend the framing (QUIRKS)."""
    js = _wrap(events, trace)
    if "multiline" in quirks:  # pretty JSON over several data: lines (reliability.md 3.7)
        out = [b"".join(b"data: " + line + b"\r\n" for line in orjson.dumps(
            orjson.loads(j), option=orjson.OPT_INDENT_2).split(b"\n")) + b"\r\n" for j in js]
    else:
        out = [b"data: " + j + b"\r\n\r\n" for j in js]
    if "lf" in quirks:
        out = [c.replace(b"\r\n", b"\n") for c in out]
    if "keepalive" in quirks:
        out = [p for c in out for p in (b": keepalive\r\n\r\n", c)]
    if "event_lines" in quirks:
        out = [b"event: message\r\nid: 1\r\n" + c for c in out]
    if "bad_json" in quirks:
        out.insert(1, b"data: {not json\r\n\r\n")
    if "non_utf8" in quirks:
        out.insert(1, b'data: {"candidates":[{"content":{"parts":[{"text":"\xff\xfe"}]}}]}\r\n\r\n')
    if "done" in quirks:
        out.append(b"data: [DONE]\r\n\r\n")
    if error is not None:
        out.append(_error_json(error))
    return out


def encode_array(
    events: list[dict[str, Any]], trace: str | None = None, error: dict[str, Any] | None = None
) -> list[bytes]:
    """The non-alt stream: one JSON array written element by element (`error` last, if any)."""
    js = _wrap(events, trace)
    if error is not None:
        js.append(orjson.dumps(error))
    if not js:
        return [b"[]"]
    # Google's own framing: `[{...}` then `\n,\r\n{...}` per element, `\n]` at the end.
    # Clients that parse the array incrementally (Portkey's gateway) split on exactly these
    # separators and strip exactly `\n]` from the last element.
    out = [b"[" + js[0]] + [b"\n,\r\n" + j for j in js[1:]]
    out[-1] += b"\n]"
    return out
