"""Gemini replies, read narrowly, and Gemini / Code Assist errors, mapped honestly to OpenAI's.

Invariants:
- `decode_reply(payload)` accepts one GenerateContentResponse (a non-stream body or one SSE
  event), the Code Assist envelope `{"response": {...}, "traceId": ...}` (unwrapped; traceId
  stands in for a missing responseId) and single-element arrays. A payload that is an error
  object (Google's mid-stream errors, A5 rule 9) raises an `UpstreamError`-family error; bytes
  that are not a reply raise `UpstreamProtocolError`. It never returns half a record.
- The views decode only what the transcoders read (msgspec skips the rest without building it);
  field names are Gemini's own camelCase, so a view reads like the wire. `functionCall.args` is
  kept as raw JSON bytes: the OpenAI side wants the JSON text, so it is never parsed and rebuilt.
- `error_from_upstream(status, body, headers)` always returns a `RawgateError` whose status and
  OpenAI type/code say what really happened (protocols.md A6, B5, C5), with Google's message
  (API keys and OAuth tokens scrubbed), `retry_after_s` from RetryInfo / the message / the
  Retry-After headers, and `retry-after` + `retry-after-ms` headers on retryable 429s and 503s.
  Any body works: JSON object, array-wrapped, with legacy `errors[]`, slightly malformed, HTML.

HTTP / RPC status -> OpenAI (status, type, code):

| upstream                                         | OpenAI                                        |
|--------------------------------------------------|-----------------------------------------------|
| ErrorInfo API_KEY_INVALID (Google says 400),     | 502 server_error upstream_auth_failed: the    |
|   401 UNAUTHENTICATED, 403 PERMISSION_DENIED     |   account's credential, never the client's    |
|                                                  |   401 (the gateway names the account, rests   |
|                                                  |   it and rotates; Help links are kept)        |
| 400 "input token count ... exceeds"              | 400 invalid_request_error context_length_...  |
| 400 FAILED_PRECONDITION                          | 400 invalid_request_error failed_precondition |
| 400 INVALID_ARGUMENT / other                     | 400 invalid_request_error (code null)         |
| 402; 429 terminal (limit: 0, per-day quota, no   | 429 insufficient_quota insufficient_quota, no |
|   credits, delay > TERMINAL_RETRY_DELAY_S)       |   Retry-After                                 |
| 429 RESOURCE_EXHAUSTED                           | 429 rate_limit_error rate_limit_exceeded      |
| 404 NOT_FOUND                                    | 404 invalid_request_error model_not_found     |
| other 4xx                                        | same status, invalid_request_error            |
| 500 INTERNAL / UNKNOWN / 501 / other 5xx         | 502 server_error upstream_error               |
| 503 UNAVAILABLE                                  | 503 server_error upstream_unavailable         |
| 504 DEADLINE_EXCEEDED                            | 504 server_error upstream_timeout             |
"""

from __future__ import annotations

import math
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any

import msgspec
import orjson

from rawgate.errors import (
    BadRequest,
    InsufficientQuota,
    ModelFailed,
    NotFound,
    RateLimited,
    RawgateError,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamRejectedInAnswer,
    UpstreamRequestTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
    try_again_message,
)

__all__ = [
    "TERMINAL_RETRY_DELAY_S",
    "Candidate",
    "Content",
    "FunctionCall",
    "LogprobsResult",
    "Part",
    "PromptFeedback",
    "Reply",
    "Usage",
    "arguments_text",
    "chat_usage",
    "custom_input",
    "decode_reply",
    "error_from_upstream",
    "finish_error",
    "finish_kind",
    "part_text",
    "responses_usage",
    "retry_headers",
]

# gemini-cli treats a quota delay above 5 minutes as terminal (MAX_RETRYABLE_DELAY_SECONDS):
# such a 429 is a spent daily quota, not a rate limit worth waiting for in a request.
TERMINAL_RETRY_DELAY_S = 300.0
# Google's messages are short; a proxy's HTML error page is not. Cap what reaches the client.
MAX_MESSAGE_CHARS = 2000


class _V(msgspec.Struct, gc=False):
    """Views hold no cycles, so gc=False: the collector need not track the dozens of small
    objects each chunk decodes into."""


class FunctionCall(_V):
    name: str = ""
    args: msgspec.Raw = msgspec.Raw()  # raw JSON text of the arguments; empty when absent
    id: str | None = None


class Blob(_V):
    mimeType: str = "application/octet-stream"
    data: str = ""


class ExecutableCode(_V):
    language: str = ""
    code: str = ""


class CodeExecutionResult(_V):
    outcome: str = ""
    output: str = ""


class Part(_V):
    text: str | None = None
    thought: bool = False
    thoughtSignature: str | None = None
    functionCall: FunctionCall | None = None
    inlineData: Blob | None = None
    executableCode: ExecutableCode | None = None
    codeExecutionResult: CodeExecutionResult | None = None


class Content(_V):
    parts: list[Part] = []
    role: str | None = None


class LogprobCandidate(_V):
    token: str = ""  # proto3 JSON omits defaults: an absent token is "", an absent logprob 0.0
    logProbability: float = 0.0


class TopCandidates(_V):
    candidates: list[LogprobCandidate] = []  # sorted by logProbability, descending


class LogprobsResult(_V):
    """One entry per decoding step in each list (generationConfig.responseLogprobs)."""

    topCandidates: list[TopCandidates] = []
    chosenCandidates: list[LogprobCandidate] = []


class Candidate(_V):
    content: Content | None = None
    finishReason: str | None = None
    finishMessage: str | None = None
    index: int = 0
    logprobsResult: LogprobsResult | None = None


class Usage(_V):
    promptTokenCount: int = 0
    candidatesTokenCount: int = 0
    totalTokenCount: int = 0
    cachedContentTokenCount: int = 0
    thoughtsTokenCount: int = 0
    toolUsePromptTokenCount: int = 0


class PromptFeedback(_V):
    blockReason: str | None = None
    blockReasonMessage: str | None = None


class Reply(_V):
    candidates: list[Candidate] = []
    promptFeedback: PromptFeedback | None = None
    usageMetadata: Usage | None = None
    modelVersion: str | None = None
    responseId: str | None = None
    # Code Assist envelope and error objects share the decode: one pass for every shape.
    response: Reply | None = None
    traceId: str | None = None
    error: msgspec.Raw = msgspec.Raw()  # empty unless this is an error object


_decode = msgspec.json.Decoder(Reply).decode
_decode_list = msgspec.json.Decoder(list[Reply]).decode


def decode_reply(payload: bytes) -> Reply:
    """One Gemini reply (see the module invariants)."""
    try:
        # `{` first: Gemini's own shape skips the lstrip() copy (113 -> 50 ns per chunk:
        # bench.micro `decode_reply (one chunk)`)
        head = payload[:1]
        if head != b"{" and (head == b"[" or payload.lstrip()[:1] == b"["):
            items = _decode_list(payload)
            if not items:
                raise UpstreamProtocolError("upstream sent an empty JSON array")
            reply = items[0]
        else:
            reply = _decode(payload)
    except msgspec.DecodeError:  # ValidationError is a DecodeError too
        err = _error_from_body(payload)
        if err is not None:
            raise _in_stream(err) from None
        raise UpstreamProtocolError(
            "upstream sent a reply rawgate cannot read (not a GenerateContentResponse)"
        ) from None
    if reply.error:
        raise _in_stream(error_from_upstream(0, payload, None))
    inner = reply.response
    if inner is not None:
        if inner.error:
            raise _in_stream(error_from_upstream(0, bytes(inner.error), None))
        if inner.responseId is None:
            inner.responseId = reply.traceId
        return inner
    return reply


def _in_stream(err: RawgateError) -> UpstreamError:
    """An error object inside a 200 answer is the upstream failing mid-answer, whatever its code:
    keep the mapped status/type/code (a 429 stays a rate limit) but as an UpstreamError."""
    if isinstance(err, UpstreamError):
        return err
    out: UpstreamError
    kw: dict[str, Any] = {"headers": err.headers, "retry_after_s": err.retry_after_s}
    if isinstance(err, InsufficientQuota):
        out = UpstreamQuotaExhausted(err.message, **kw)
    elif isinstance(err, RateLimited):
        out = UpstreamRateLimited(err.message, **kw)
    else:  # NotFound, BadRequest, UpstreamRejected, UpstreamRequestTimeout: a 4xx
        out = UpstreamRejectedInAnswer(err.message, status=err.status, **kw)
    out.code = err.code  # may be None, which the constructor would replace by the default
    return out


def _error_from_body(payload: bytes) -> RawgateError | None:
    """The error in a payload that failed the strict decode (Google's in-stream error JSON may
    carry doubled commas, GCLI `sanitizeJsonString`), or None if it is no error object."""
    if b'"error"' not in payload:
        return None
    if _parse_error_doc(payload) is None:
        return None
    return error_from_upstream(0, payload, None)


# ---- finish reasons, usage, odd parts (shared by both transcoders) ------------------------------

# finishReason -> outcome. "error" reasons fail the answer (gemini-cli retries them too): a
# 200 with an empty message and a raw MALFORMED_FUNCTION_CALL is what the seed system's users
# hit (complaint #10). Unknown future reasons never leak raw: a name that smells of a filter is
# content_filter, of a tool call an error, anything else a plain stop.
_FINISH = {
    "STOP": "stop",
    "FINISH_REASON_UNSPECIFIED": "stop",
    "OTHER": "stop",  # Antigravity ends tool turns with OTHER (protocols.md A4)
    "NO_IMAGE": "stop",
    "IMAGE_OTHER": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "LANGUAGE": "content_filter",  # stopped by policy (unsupported language), not naturally
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "MALFORMED_FUNCTION_CALL": "error",
    "UNEXPECTED_TOOL_CALL": "error",
    "TOO_MANY_TOOL_CALLS": "error",
}
_FILTER_WORDS = ("SAFETY", "PROHIBITED", "RECITATION", "BLOCK", "SPII")


def finish_kind(reason: str) -> str:
    """ "stop" | "length" | "content_filter" | "error" for a Gemini finishReason."""
    kind = _FINISH.get(reason)
    if kind is not None:
        return kind
    if any(w in reason for w in _FILTER_WORDS):
        return "content_filter"
    if "TOOL_CALL" in reason or "FUNCTION_CALL" in reason:
        return "error"
    return "stop"


def finish_error(reason: str, finish_message: str | None) -> ModelFailed:
    """The error for an "error" finishReason: a 502 the SDKs retry, naming what Gemini did."""
    detail = _clean(finish_message or "")
    if len(detail) > 300:
        detail = detail[:300] + "..."
    msg = f"Gemini stopped with {reason}" + (f": {detail}" if detail else ".")
    return ModelFailed(msg, code=reason.lower())


def chat_usage(u: Usage) -> dict[str, Any]:
    """Chat / Completions usage from Gemini's (running-total) usageMetadata."""
    prompt = u.promptTokenCount + u.toolUsePromptTokenCount
    completion = u.candidatesTokenCount + u.thoughtsTokenCount
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": u.totalTokenCount or prompt + completion,
        "prompt_tokens_details": {"cached_tokens": u.cachedContentTokenCount},
        "completion_tokens_details": {"reasoning_tokens": u.thoughtsTokenCount},
    }


def responses_usage(u: Usage | None) -> dict[str, Any]:
    """Responses usage; every field present (the SDK's ResponseUsage requires them all)."""
    if u is None:
        u = Usage()
    prompt = u.promptTokenCount + u.toolUsePromptTokenCount
    output = u.candidatesTokenCount + u.thoughtsTokenCount
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": u.cachedContentTokenCount,
            "cache_write_tokens": 0,
        },
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": u.thoughtsTokenCount},
        "total_tokens": u.totalTokenCount or prompt + output,
    }


def logprob_tokens(res: LogprobsResult, top: int) -> list[dict[str, Any]]:
    """OpenAI's per-token logprob entries (Chat `logprobs.content`, Responses `logprobs`) for
    Gemini's logprobsResult, with `top` alternatives per token."""
    tops = res.topCandidates
    out: list[dict[str, Any]] = []
    for i, c in enumerate(res.chosenCandidates):
        alts = tops[i].candidates[:top] if top and i < len(tops) else ()
        out.append(
            {
                "token": c.token,
                "logprob": c.logProbability,
                "bytes": list(c.token.encode()),
                "top_logprobs": [
                    {"token": a.token, "logprob": a.logProbability, "bytes": list(a.token.encode())}
                    for a in alts
                ],
            }
        )
    return out


def part_text(p: Part) -> str | None:
    """Text for the parts OpenAI has no slot for: images inline as Markdown data URLs, code
    execution as fenced blocks. None for parts with nothing to show."""
    if p.inlineData is not None and p.inlineData.data:
        b = p.inlineData
        return f"![image](data:{b.mimeType};base64,{b.data})"
    if p.executableCode is not None:
        lang = p.executableCode.language.lower()
        lang = "" if lang in ("", "language_unspecified") else lang
        return f"\n```{lang}\n{p.executableCode.code}\n```\n"
    if p.codeExecutionResult is not None and p.codeExecutionResult.output:
        return f"\n```\n{p.codeExecutionResult.output}\n```\n"
    return None


def arguments_text(fc: FunctionCall) -> str:
    """Compact arguments JSON text (Gemini's non-stream bodies are pretty-printed); `{}` when
    there are none (vector 4). Text orjson cannot round-trip (integers beyond 64 bits) is
    passed through as Gemini wrote it."""
    raw = bytes(fc.args).strip()
    if not raw or raw == b"null":
        return "{}"
    try:
        return orjson.dumps(orjson.loads(raw)).decode()
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return raw.decode("utf-8", "replace")


def custom_input(fc: FunctionCall) -> str:
    """The freeform text of a custom tool call: mapping declares custom tools to Gemini with one
    string parameter, `input`."""
    raw = bytes(fc.args)
    if not raw:
        return ""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")
    val = doc.get("input") if isinstance(doc, dict) else None
    if isinstance(val, str):
        return val
    return "" if val is None else orjson.dumps(val).decode()


# ---- errors --------------------------------------------------------------------------------------

_DOUBLE_COMMA = re.compile(rb",\s*,")
_SECRETS = re.compile(r"AIza[0-9A-Za-z_\-]{30,}|ya29\.[0-9A-Za-z_\-.]+|1//[0-9A-Za-z_\-]{20,}")
_DELAY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$")
_DELAY_IN_MESSAGE = re.compile(
    r"(?i)(?:retry|try again|reset)\s+(?:in|after)\s+(\d+(?:\.\d+)?)\s*(ms|s|sec|seconds?)\b"
)
_CONTEXT = re.compile(r"(?i)input token count|exceeds the maximum number of tokens|too long")
_RPC_BY_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_HTTP_BY_RPC = {v: k for k, v in _RPC_BY_HTTP.items()} | {
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "ABORTED": 409,
    "ALREADY_EXISTS": 409,
    "CANCELLED": 499,
}


def _parse_error_doc(body: bytes) -> dict[str, Any] | None:
    for attempt in (body, _DOUBLE_COMMA.sub(b",", body)):
        try:
            doc = orjson.loads(attempt)
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, list) and doc and isinstance(doc[0], dict):
            doc = doc[0]
        if isinstance(doc, dict):
            inner = doc.get("error")
            if isinstance(inner, dict):
                return inner
            if isinstance(inner, str):  # {"error": "text", "error_description": ...} (OAuth)
                desc = doc.get("error_description")
                return {"message": f"{inner}: {desc}" if desc else inner, "status": inner}
            return doc
    return None


def _strings(items: object, key: str) -> list[str]:
    """`item[key]` of each dict in a list, where it is a string (error details are untyped)."""
    if not isinstance(items, list):
        return []
    return [v for it in items if isinstance(it, dict) for v in (it.get(key),) if isinstance(v, str)]


def _seconds(text: str) -> float | None:
    m = _DELAY.match(text)
    if m is None:
        return None
    v = float(m.group(1))
    return v / 1000.0 if m.group(2) == "ms" else v


def _header(headers: list[tuple[bytes, bytes]] | None, name: bytes) -> str | None:
    for k, v in headers or ():
        if k.lower() == name:
            return v.decode("latin-1").strip()
    return None


def _header_delay(headers: list[tuple[bytes, bytes]] | None) -> float | None:
    ms = _header(headers, b"retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    ra = _header(headers, b"retry-after")
    if not ra:
        return None
    try:
        return float(ra)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(ra)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retry_headers(seconds: float) -> list[tuple[bytes, bytes]]:
    """`retry-after-ms` (read first by the openai SDKs) and the whole-second `retry-after`."""
    return [
        (b"retry-after-ms", str(math.ceil(seconds * 1000)).encode()),
        (b"retry-after", str(max(1, math.ceil(seconds))).encode()),
    ]


def _clean(message: str) -> str:
    message = _SECRETS.sub("[redacted]", message).strip()
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return message


def error_from_upstream(
    status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> RawgateError:
    """The OpenAI error for a failed Gemini / Code Assist call (table in the module docstring).
    `status` is the HTTP status, or 0 for an error object found inside a 200 answer."""
    doc = _parse_error_doc(body)
    if doc is None:
        text = body.decode("utf-8", "replace")
        text = re.sub(r"<[^>]*>", " ", text)
        text = " ".join(text.split())[:200]
        message = f"Gemini upstream answered HTTP {status} without a JSON error" + (
            f": {text}" if text else ""
        )
        doc = {}
    else:
        raw_message = doc.get("message")
        message = raw_message if isinstance(raw_message, str) and raw_message else ""
    code = doc.get("code")
    rpc = doc.get("status") if isinstance(doc.get("status"), str) else None
    if not status:
        status = code if isinstance(code, int) and 100 <= code <= 599 else 0
    if not status:
        status = _HTTP_BY_RPC.get(rpc or "", 500)
    rpc = rpc or _RPC_BY_HTTP.get(status, "")

    reasons: list[str] = []
    delay: float | None = None
    quota_ids: list[str] = []
    links: list[str] = []
    for d in doc.get("details") or ():
        if not isinstance(d, dict):
            continue
        kind = str(d.get("@type", ""))
        if kind.endswith("ErrorInfo") and isinstance(d.get("reason"), str):
            reasons.append(d["reason"])
        elif kind.endswith("RetryInfo") and isinstance(d.get("retryDelay"), str):
            delay = _seconds(d["retryDelay"])
        elif kind.endswith("QuotaFailure"):
            quota_ids.extend(_strings(d.get("violations"), "quotaId"))
        elif kind.endswith("Help"):
            links.extend(_strings(d.get("links"), "url"))
    reasons.extend(_strings(doc.get("errors"), "reason"))  # legacy Code Assist block
    if delay is None:
        m = _DELAY_IN_MESSAGE.search(message)
        if m is not None:
            v = float(m.group(1))
            delay = v / 1000.0 if m.group(2).lower() == "ms" else v
    if delay is None:
        delay = _header_delay(headers)
    message = _clean(message) or f"Gemini upstream error (HTTP {status} {rpc})".strip()

    if (
        "API_KEY_INVALID" in reasons
        or status in (401, 403)
        or rpc in ("UNAUTHENTICATED", "PERMISSION_DENIED")
    ):
        # The account's credential, not the client's: rawgate's key to Google was refused.
        if links and "VALIDATION_REQUIRED" in reasons:
            message = f"{message} ({links[0]})"
        reason = reasons[0] if reasons else rpc or f"HTTP {status}"
        return UpstreamAuthFailed(message, reason=reason)
    if status == 404:
        is_model = "model" in message.lower()
        return NotFound(
            message,
            code="model_not_found" if is_model else "not_found",
            param="model" if is_model else None,
        )
    if status in (402, 429) or rpc == "RESOURCE_EXHAUSTED":
        return _quota_error(message, reasons, quota_ids, delay, status)
    if 400 <= status < 500:
        if _CONTEXT.search(message):
            return BadRequest(message, code="context_length_exceeded", param="messages")
        if rpc == "FAILED_PRECONDITION":
            return BadRequest(message, code="failed_precondition")
        if status == 408:  # the upstream timed the request out: worth another try
            return UpstreamRequestTimeout(message)
        return UpstreamRejected(message, status=status)
    retry = (
        retry_headers(delay) if delay is not None and 0 < delay <= TERMINAL_RETRY_DELAY_S else []
    )
    if status == 503:
        return UpstreamUnavailable(message, headers=retry, retry_after_s=delay)
    if status == 504:
        return UpstreamTimeout(message, code="upstream_timeout", retry_after_s=delay)
    return UpstreamError(message, code="upstream_error", headers=retry, retry_after_s=delay)


def _quota_error(
    message: str, reasons: list[str], quota_ids: list[str], delay: float | None, status: int
) -> RateLimited:
    terminal = (
        status == 402
        or "limit: 0" in message
        or any("PerDay" in q for q in quota_ids)
        or any(r.startswith("INSUFFICIENT") for r in reasons)
        or (delay is not None and delay > TERMINAL_RETRY_DELAY_S)
    )
    if terminal:
        return InsufficientQuota(message, retry_after_s=delay)
    headers: list[tuple[bytes, bytes]] = []
    if delay is not None and delay > 0:
        headers = retry_headers(delay)
        # One "Please try again in Ns." sentence with the wait rawgate honours: Google's own
        # ("Please retry in 56.18s.", often another figure than RetryInfo's) is replaced.
        message = try_again_message(message, delay)
    return RateLimited(message, headers=headers, retry_after_s=delay)
