"""The Gemini-native front's sans-IO pieces: route parsing, the Code Assist envelope around a
client body kept byte for byte, stream-end checks, and errors in Google's shape (protocols-2.md C).

Invariants:
- The client's body is forwarded byte-faithfully: unknown fields, snake_case keys, client-made
  `functionCall.id`s and thought signatures travel as sent. rawgate decodes only what it must
  understand (that the body is a JSON object, and its size) and never re-encodes it; the model
  lives in the URL and only it is rewritten.
- Code Assist accounts get `{"model", "project", "user_prompt_id"?, "request": <client body>}`
  built by concatenation, and every answer (whole or per stream event) is unwrapped to its raw
  `response` object, so a Gemini client cannot tell which kind of account answered.
- When the model router renames the URL model, a `model` the body repeats (top-level, each
  `requests[i].model` of batchEmbedContents, countTokens' `generateContentRequest.model`) that
  named the client's model is renamed with it (`rename_body_models`), by splicing only those
  string values: Google rejects an item model that differs from the URL's. Anything else (an
  omitted model, one naming a third model) travels as sent, so Google answers it as it would
  have answered the client directly.
- Errors are `{"error": {"code", "message", "status", "details"?}}` with Google's status names;
  a 429 carries a `google.rpc.RetryInfo` detail with the delay rawgate knows; a bad client key is
  400 `INVALID_ARGUMENT` with `ErrorInfo.reason API_KEY_INVALID`, as Google answers it (the
  Gemini CLI and google-genai never retry a 400).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import msgspec
import orjson

from rawgate.errors import AuthenticationError, BadRequest, RawgateError

__all__ = [
    "NativeRoute",
    "check_body",
    "google_error",
    "has_finish_reason",
    "parse_native_path",
    "rename_body_models",
    "unwrap_code_assist",
    "wrap_code_assist",
]

Method = Literal[
    "generateContent", "streamGenerateContent", "countTokens", "embedContent", "batchEmbedContents"
]
_METHODS = frozenset(
    {
        "generateContent",
        "streamGenerateContent",
        "countTokens",
        "embedContent",
        "batchEmbedContents",
    }
)
# /v1beta/models/gemini-2.5-flash:generateContent (also /v1/..., and "models/" doubled by some
# clients is not accepted by Google either).
_PATH = re.compile(r"/(v1|v1beta)/models/([^/:]+):([A-Za-z]+)")


@dataclass(slots=True, frozen=True)
class NativeRoute:
    version: str  # "v1" | "v1beta"
    model: str  # as the client wrote it (the router resolves it)
    method: str


def parse_native_path(path: str) -> NativeRoute | None:
    """The route of a native POST path, or None when it is not one (-> the app's 404)."""
    m = _PATH.fullmatch(path)
    if m is None or m.group(3) not in _METHODS:
        return None
    return NativeRoute(m.group(1), m.group(2), m.group(3))


class _Shape(msgspec.Struct):
    """Only what the gateway must know; every other field stays raw and untouched."""

    contents: msgspec.Raw = msgspec.Raw()
    requests: msgspec.Raw = msgspec.Raw()
    content: msgspec.Raw = msgspec.Raw()


_shape = msgspec.json.Decoder(_Shape)


def check_body(body: bytes, method: str) -> None:
    """A 400 (Google's words) unless the body is a JSON object fit for `method`."""
    try:
        doc = _shape.decode(body)
    except msgspec.DecodeError:
        raise BadRequest(
            "Invalid JSON payload received. The request body must be a JSON object."
        ) from None
    if method == "batchEmbedContents":
        if not doc.requests:
            raise BadRequest(
                "* BatchEmbedContentsRequest.requests: requests is required", param="requests"
            )
    elif method == "embedContent":
        if not doc.content:
            raise BadRequest("* EmbedContentRequest.content: content is required", param="content")
    elif method != "countTokens" and not doc.contents:
        raise BadRequest(
            "* GenerateContentRequest.contents: contents is not specified", param="contents"
        )


# Where a Gemini request body repeats its model (key paths; "*" is every array element).
_MODEL_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "generateContent": (("model",),),
    "streamGenerateContent": (("model",),),
    "countTokens": (
        ("model",),
        ("generateContentRequest", "model"),
        ("generate_content_request", "model"),
    ),
    "embedContent": (("model",),),
    "batchEmbedContents": (("model",), ("requests", "*", "model")),
}
# A `"model"` key anywhere (inside a JSON string the quotes would be escaped).
_MODEL_KEY = re.compile(rb'"model"\s*:')
# JSON tokens that matter for the walk: whole strings (skipped in C, escapes included) and the
# structural characters. Numbers, literals and whitespace are never needed.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]', re.S)


def _value_spans(body: bytes, paths: tuple[tuple[str, ...], ...]) -> list[tuple[int, int]]:
    """(start, end) of every string value found at one of `paths` (a JSON object's keys; "*"
    any array element), in body order. The body is a valid JSON object (check_body ran)."""
    spans: list[tuple[int, int]] = []
    # One frame per open container: (is it an object, its key path).
    stack: list[tuple[bool, tuple[str, ...]]] = []
    key: str | None = None  # the key just read in the innermost object (awaiting its value)
    expect_key = False
    for m in _TOKEN.finditer(body):
        tok = m.group()
        c = tok[0]
        if c == 0x22:  # a string
            if stack and stack[-1][0] and expect_key:
                key = _string(tok)
                expect_key = False
                continue
            here = _child(stack, key)
            if here is not None and here in paths:
                spans.append((m.start(), m.end()))
            key = None
        elif c == 0x7B or c == 0x5B:  # { or [
            here = _child(stack, key) if stack else ()
            stack.append((c == 0x7B, here if here is not None else ("\x00",)))
            key = None
            expect_key = c == 0x7B
        elif c == 0x7D or c == 0x5D:  # } or ]
            stack.pop()
            key = None
        elif c == 0x2C:  # ,
            expect_key = bool(stack) and stack[-1][0]
            key = None
    return spans


def _string(tok: bytes) -> str | None:
    """A JSON string token's value; None when it is not valid UTF-8 (check_body's decoder
    skips the bytes of fields it keeps raw, so they may hold anything; Google judges them)."""
    try:
        v = orjson.loads(tok)
    except orjson.JSONDecodeError:
        return None
    return v if isinstance(v, str) else None


def _child(stack: list[tuple[bool, tuple[str, ...]]], key: str | None) -> tuple[str, ...] | None:
    """The path of the value about to be read in the innermost container."""
    if not stack:
        return ()
    is_obj, path = stack[-1]
    if is_obj:
        return None if key is None else (*path, key)
    return (*path, "*")


def rename_body_models(body: bytes, method: str, client_model: str, model: str) -> bytes:
    """`body` with each repeated model that named `client_model` (bare or as
    `models/<client_model>`) renamed to `model` in the same form; every other byte as sent."""
    paths = _MODEL_PATHS.get(method)
    if not paths or _MODEL_KEY.search(body) is None:
        return body  # the common case: a conversation's `"role":"model"` is no key
    names = {client_model: model, "models/" + client_model: "models/" + model}
    out: list[bytes] = []
    last = 0
    for start, end in _value_spans(body, paths):
        name = _string(body[start:end])
        new = names.get(name) if name is not None else None
        if new is None:
            continue
        out.append(body[last:start])
        out.append(orjson.dumps(new))
        last = end
    if not out:
        return body
    out.append(body[last:])
    return b"".join(out)


def wrap_code_assist(body: bytes, model: str, project: str, prompt_id: str | None) -> bytes:
    """The Code Assist envelope around the client's body, without re-encoding it."""
    head = b'{"model":' + orjson.dumps(model) + b',"project":' + orjson.dumps(project)
    if prompt_id:
        head += b',"user_prompt_id":' + orjson.dumps(prompt_id)
    return head + b',"request":' + body.strip() + b"}"


class _Envelope(msgspec.Struct):
    response: msgspec.Raw = msgspec.Raw()


_envelope = msgspec.json.Decoder(_Envelope)


def unwrap_code_assist(payload: bytes) -> bytes:
    """The raw `response` object of a Code Assist answer or stream event; anything else (an
    error object, a Developer API reply) is returned as it is."""
    try:
        env = _envelope.decode(payload)
    except msgspec.DecodeError:
        return payload
    return bytes(env.response) if env.response else payload


def has_finish_reason(payload: bytes) -> bool:
    """Whether a reply (or stream event) ends a candidate. A bytes search: the key appears in
    Gemini replies only as the field itself (a JSON string value would escape nothing here, but
    text containing the literal `"finishReason"` with quotes would be escaped as \\")."""
    return b'"finishReason"' in payload


_RPC = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _duration(seconds: float) -> str:
    # google.protobuf.Duration JSON: whole seconds when exact, else up to millisecond precision.
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{math.ceil(seconds * 1000) / 1000:.3f}".rstrip("0").rstrip(".") + "s"


def google_error(err: RawgateError) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """(status, body, headers) for an error on a Gemini-native route."""
    status = err.status
    details: list[dict[str, object]] = []
    if isinstance(err, AuthenticationError) and err.code == "invalid_api_key":
        status = 400  # Google's own answer to a bad key; clients do not retry it
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
        )
    if status == 502:
        status = 503  # Google has no 502; UNAVAILABLE is what its clients retry
    rpc = _RPC.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
    if status == 429 and err.retry_after_s is not None and err.retry_after_s > 0:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": _duration(err.retry_after_s),
            }
        )
    doc: dict[str, object] = {"code": status, "message": err.message, "status": rpc}
    if details:
        doc["details"] = details
    headers = [h for h in err.headers if h[0].lower() in (b"retry-after", b"retry-after-ms")]
    return status, orjson.dumps({"error": doc}), headers
