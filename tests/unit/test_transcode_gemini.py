"""rawgate.translate.gemini: reply views (envelope, arrays, in-stream errors) and the Gemini / Code
Assist error -> OpenAI error table, one row per upstream shape."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from rawgate.errors import (
    BadRequest,
    NotFound,
    RateLimited,
    RawgateError,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamProtocolError,
)
from rawgate.translate.gemini import (
    TERMINAL_RETRY_DELAY_S,
    chat_usage,
    decode_reply,
    error_from_upstream,
    finish_kind,
    part_text,
    responses_usage,
)


def gerr(code: int, message: str, status: str, details: list[Any] | None = None) -> bytes:
    e: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        e["details"] = details
    return orjson.dumps({"error": e})


def retry_info(delay: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


def error_info(reason: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason}


# ---- replies ------------------------------------------------------------------------------------


def test_plain_reply() -> None:
    r = decode_reply(
        b'{"candidates":[{"content":{"parts":[{"text":"hi","thought":true},'
        b'{"functionCall":{"name":"f","args":{"a": [1, 2]}},"thoughtSignature":"S"}],'
        b'"role":"model"},"finishReason":"STOP","index":0}],'
        b'"usageMetadata":{"promptTokenCount":3,"cachedContentTokenCount":2},'
        b'"modelVersion":"gemini-2.5-flash","responseId":"r1","unknownField":{"x":1}}'
    )
    assert r.responseId == "r1" and r.modelVersion == "gemini-2.5-flash"
    p0, p1 = r.candidates[0].content.parts  # type: ignore[union-attr]
    assert p0.thought and p0.text == "hi"
    assert p1.functionCall is not None and bytes(p1.functionCall.args) == b'{"a": [1, 2]}'
    assert p1.thoughtSignature == "S"
    assert r.usageMetadata is not None and r.usageMetadata.cachedContentTokenCount == 2


def test_code_assist_envelope_is_unwrapped() -> None:
    r = decode_reply(b'{"response":{"candidates":[{"index":0}]},"traceId":"t9"}')
    assert r.responseId == "t9" and len(r.candidates) == 1
    r = decode_reply(b'{"response":{"responseId":"own"},"traceId":"t9"}')
    assert r.responseId == "own"


def test_single_element_array() -> None:
    assert decode_reply(b'[{"responseId":"a"}]').responseId == "a"
    with pytest.raises(UpstreamProtocolError):
        decode_reply(b"[]")


@pytest.mark.parametrize(
    "payload",
    [
        gerr(503, "The model is overloaded.", "UNAVAILABLE"),
        b"[" + gerr(503, "The model is overloaded.", "UNAVAILABLE") + b"]",
        b'{"response": ' + gerr(503, "The model is overloaded.", "UNAVAILABLE") + b"}",
        # GCLI sanitizeJsonString: SSE parsing can inject doubled commas into error JSON
        b'{"error": {"code": 503,\n ,"message": "The model is overloaded.",'
        b' "status": "UNAVAILABLE"}}',
    ],
)
def test_in_stream_error_objects_raise_upstream_errors(payload: bytes) -> None:
    with pytest.raises(UpstreamError) as ei:
        decode_reply(payload)
    assert ei.value.status == 503 and ei.value.code == "upstream_unavailable"
    assert ei.value.message == "The model is overloaded."


def test_in_stream_rate_limit_keeps_its_status_as_an_upstream_error() -> None:
    with pytest.raises(UpstreamError) as ei:
        decode_reply(gerr(429, "Quota exceeded.", "RESOURCE_EXHAUSTED", [retry_info("7s")]))
    e = ei.value
    assert (e.status, e.type, e.code, e.retry_after_s) == (
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        7.0,
    )


def test_in_stream_400_keeps_a_null_code() -> None:
    with pytest.raises(UpstreamError) as ei:
        decode_reply(gerr(400, "bad", "INVALID_ARGUMENT"))
    assert ei.value.status == 400 and ei.value.code is None


@pytest.mark.parametrize("payload", [b"", b"garbage", b'{"candidates": 5}', b"\xff\xfe", b"{"])
def test_unreadable_payloads(payload: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        decode_reply(payload)


# ---- error table --------------------------------------------------------------------------------


def _check(
    err: RawgateError, cls: type[RawgateError], status: int, type_: str, code: str | None
) -> None:
    assert isinstance(err, cls), err
    assert (err.status, err.type, err.code) == (status, type_, code)
    body = orjson.loads(err.to_json())
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_api_key_invalid_is_the_accounts_failure_not_the_clients_401() -> None:
    body = gerr(400, "API key not valid.", "INVALID_ARGUMENT", [error_info("API_KEY_INVALID")])
    err = error_from_upstream(400, body)
    _check(err, UpstreamAuthFailed, 502, "server_error", "upstream_auth_failed")
    assert isinstance(err, UpstreamAuthFailed) and err.reason == "API_KEY_INVALID"


def test_unauthenticated_is_upstream_auth_failed() -> None:
    body = gerr(401, "Request had invalid authentication credentials.", "UNAUTHENTICATED")
    err = error_from_upstream(401, body)
    _check(err, UpstreamAuthFailed, 502, "server_error", "upstream_auth_failed")
    assert isinstance(err, UpstreamAuthFailed) and err.reason == "UNAUTHENTICATED"


def test_invalid_argument_keeps_googles_message() -> None:
    msg = "Function call is missing a thought_signature in functionCall parts."
    err = error_from_upstream(400, gerr(400, msg, "INVALID_ARGUMENT"))
    _check(err, BadRequest, 400, "invalid_request_error", None)
    assert err.message == msg


def test_context_length() -> None:
    msg = "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."
    err = error_from_upstream(400, gerr(400, msg, "INVALID_ARGUMENT"))
    _check(err, BadRequest, 400, "invalid_request_error", "context_length_exceeded")


def test_failed_precondition() -> None:
    body = gerr(400, "User location is not supported for the API use.", "FAILED_PRECONDITION")
    _check(
        error_from_upstream(400, body),
        BadRequest,
        400,
        "invalid_request_error",
        "failed_precondition",
    )


def test_permission_denied_with_validation_link() -> None:
    details = [
        error_info("VALIDATION_REQUIRED"),
        {"@type": "type.googleapis.com/google.rpc.Help", "links": [{"url": "https://x/verify"}]},
    ]
    err = error_from_upstream(403, gerr(403, "Verify your account.", "PERMISSION_DENIED", details))
    _check(err, UpstreamAuthFailed, 502, "server_error", "upstream_auth_failed")
    assert isinstance(err, UpstreamAuthFailed) and err.reason == "VALIDATION_REQUIRED"
    assert "https://x/verify" in err.message


def test_model_not_found() -> None:
    body = gerr(404, "models/gemini-9 is not found for API version v1beta.", "NOT_FOUND")
    err = error_from_upstream(404, body)
    _check(err, NotFound, 404, "invalid_request_error", "model_not_found")
    assert err.param == "model"


def test_rate_limit_with_retry_info() -> None:
    msg = "You exceeded your current quota. Please retry in 56.185908122s."
    body = gerr(429, msg, "RESOURCE_EXHAUSTED", [retry_info("12.5s")])
    err = error_from_upstream(429, body)
    _check(err, RateLimited, 429, "rate_limit_error", "rate_limit_exceeded")
    assert err.retry_after_s == 12.5
    assert dict(err.headers) == {b"retry-after-ms": b"12500", b"retry-after": b"13"}
    assert "Please try again in 12.5s." in err.message
    # One "try again" sentence: Google's own "Please retry in 56.18...s." (another figure than
    # the RetryInfo rawgate honours) is replaced, not followed by a second one.
    assert err.message == "You exceeded your current quota. Please try again in 12.5s."


@pytest.mark.parametrize(
    ("message", "headers", "expect"),
    [
        ("Your quota will reset after 3s.", [], 3.0),
        ("Please retry in 900.2ms.", [], 0.9002),
        ("slow down", [(b"Retry-After", b"4")], 4.0),
        ("slow down", [(b"retry-after-ms", b"1500")], 1.5),
        ("slow down", [(b"retry-after", b"Thu, 01 Jan 1970 00:00:00 GMT")], 0.0),
        ("slow down", [], None),
    ],
)
def test_rate_limit_delay_sources(
    message: str, headers: list[tuple[bytes, bytes]], expect: float | None
) -> None:
    err = error_from_upstream(429, gerr(429, message, "RESOURCE_EXHAUSTED"), headers)
    assert err.retry_after_s == (pytest.approx(expect) if expect is not None else None)
    assert err.code == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("status", "message", "details"),
    [
        (429, "Quota exceeded for metric, limit: 0, model: gemini-2.5-pro", []),
        (429, "Quota exceeded.", [retry_info(f"{TERMINAL_RETRY_DELAY_S + 1}s")]),
        (
            429,
            "Daily quota.",
            [
                {
                    "@type": "x.QuotaFailure",
                    "violations": [
                        {"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}
                    ],
                }
            ],
        ),
        (429, "No credits.", [error_info("INSUFFICIENT_G1_CREDITS_BALANCE")]),
        (402, "Prepaid credits exhausted.", []),
    ],
)
def test_terminal_quota_is_insufficient_quota_without_retry_headers(
    status: int, message: str, details: list[Any]
) -> None:
    err = error_from_upstream(status, gerr(status, message, "RESOURCE_EXHAUSTED", details))
    _check(err, RateLimited, 429, "insufficient_quota", "insufficient_quota")
    assert err.headers == []


@pytest.mark.parametrize(
    ("status", "rpc", "out_status", "code"),
    [
        (500, "INTERNAL", 502, "upstream_error"),
        (501, "UNIMPLEMENTED", 502, "upstream_error"),
        (503, "UNAVAILABLE", 503, "upstream_unavailable"),
        (504, "DEADLINE_EXCEEDED", 504, "upstream_timeout"),
        (599, "", 502, "upstream_error"),
    ],
)
def test_server_errors(status: int, rpc: str, out_status: int, code: str) -> None:
    err = error_from_upstream(status, gerr(status, "boom", rpc))
    _check(err, UpstreamError, out_status, "server_error", code)
    assert err.message == "boom"


def test_capacity_503_with_retry_info_tells_the_client() -> None:
    details = [error_info("MODEL_CAPACITY_EXHAUSTED"), retry_info("2s")]
    err = error_from_upstream(503, gerr(503, "No capacity.", "UNAVAILABLE", details))
    assert err.retry_after_s == 2.0 and (b"retry-after", b"2") in err.headers


def test_code_assist_array_with_legacy_errors_block() -> None:
    body = (
        b'[{"error":{"code":400,"message":"Please ensure that the number of function response '
        b'parts is equal to the number of function call parts","errors":[{"message":"x",'
        b'"domain":"global","reason":"badRequest"}],"status":"INVALID_ARGUMENT"}}]'
    )
    err = error_from_upstream(400, body)
    _check(err, BadRequest, 400, "invalid_request_error", None)
    assert err.message.startswith("Please ensure")


@pytest.mark.parametrize(
    "body",
    [b"<html><body><h1>502 Bad Gateway</h1></body></html>", b"", b"\xff\xfe oops", b"null"],
)
def test_non_json_bodies(body: bytes) -> None:
    err = error_from_upstream(502, body)
    assert err.status == 502 and err.code == "upstream_error"
    assert "502" in err.message and "<" not in err.message


def test_other_4xx_keeps_its_status() -> None:
    err = error_from_upstream(409, gerr(409, "Aborted.", "ABORTED"))
    assert (err.status, err.type) == (409, "invalid_request_error")


def test_status_from_the_body_when_http_status_is_unknown() -> None:
    assert error_from_upstream(0, gerr(404, "model missing", "NOT_FOUND")).status == 404
    assert error_from_upstream(0, orjson.dumps({"error": {"status": "UNAVAILABLE"}})).status == 503
    assert error_from_upstream(0, orjson.dumps({"error": {}})).status == 502


def test_secrets_are_scrubbed_from_messages() -> None:
    key = "AIza" + "B" * 35
    body = gerr(400, f"API key {key} not valid; token ya29.a0AfH6SMBx-yz", "INVALID_ARGUMENT")
    err = error_from_upstream(400, body)
    assert key not in err.message and "ya29." not in err.message
    assert key.encode() not in err.to_json()


def test_long_messages_are_capped() -> None:
    err = error_from_upstream(500, gerr(500, "x" * 10_000, "INTERNAL"))
    assert len(err.message) < 2100


def test_oauth_style_error_body() -> None:
    body = b'{"error": "invalid_grant", "error_description": "Token has been expired or revoked."}'
    err = error_from_upstream(400, body)
    assert err.status == 400 and "invalid_grant" in err.message


# ---- finish reasons, usage, odd parts -----------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("STOP", "stop"),
        ("OTHER", "stop"),
        ("FINISH_REASON_UNSPECIFIED", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("IMAGE_SAFETY", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "error"),
        ("UNEXPECTED_TOOL_CALL", "error"),
        ("TOO_MANY_TOOL_CALLS", "error"),
        ("FUTURE_SAFETY_THING", "content_filter"),
        ("FUTURE_TOOL_CALL_PROBLEM", "error"),
        ("SOMETHING_NEW", "stop"),
    ],
)
def test_finish_kind(reason: str, kind: str) -> None:
    assert finish_kind(reason) == kind


def test_usage_mapping() -> None:
    r = decode_reply(
        b'{"usageMetadata":{"promptTokenCount":21,"candidatesTokenCount":60,'
        b'"thoughtsTokenCount":481,"totalTokenCount":562,"cachedContentTokenCount":7,'
        b'"toolUsePromptTokenCount":0}}'
    )
    assert r.usageMetadata is not None
    assert chat_usage(r.usageMetadata) == {
        "prompt_tokens": 21,
        "completion_tokens": 541,
        "total_tokens": 562,
        "prompt_tokens_details": {"cached_tokens": 7},
        "completion_tokens_details": {"reasoning_tokens": 481},
    }
    u = responses_usage(r.usageMetadata)
    assert (u["input_tokens"], u["output_tokens"], u["total_tokens"]) == (21, 541, 562)
    assert u["input_tokens_details"]["cached_tokens"] == 7
    assert u["output_tokens_details"]["reasoning_tokens"] == 481
    assert responses_usage(None)["total_tokens"] == 0


def test_part_text_for_parts_openai_has_no_slot_for() -> None:
    r = decode_reply(
        b'{"candidates":[{"content":{"parts":['
        b'{"inlineData":{"mimeType":"image/png","data":"iVBO"}},'
        b'{"executableCode":{"language":"PYTHON","code":"print(1)"}},'
        b'{"codeExecutionResult":{"outcome":"OUTCOME_OK","output":"1"}},'
        b'{"thoughtSignature":"only"}]}}]}'
    )
    parts = r.candidates[0].content.parts  # type: ignore[union-attr]
    assert part_text(parts[0]) == "![image](data:image/png;base64,iVBO)"
    assert part_text(parts[1]) == "\n```python\nprint(1)\n```\n"
    assert part_text(parts[2]) == "\n```\n1\n```\n"
    assert part_text(parts[3]) is None
