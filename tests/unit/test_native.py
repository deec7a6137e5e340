"""The Gemini-native front's sans-IO pieces (rawgate/native.py), in bytes: route parsing, the Code
Assist envelope around a byte-faithful body (vector 15), unwrapping, and Google-shaped errors
(vector 10's RetryInfo, a bad client key as API_KEY_INVALID)."""

from __future__ import annotations

import orjson
import pytest

from rawgate.errors import AuthenticationError, BadRequest, RateLimited, UpstreamError
from rawgate.translate.native import (
    check_body,
    google_error,
    has_finish_reason,
    parse_native_path,
    unwrap_code_assist,
    wrap_code_assist,
)


@pytest.mark.parametrize(
    ("path", "want"),
    [
        (
            "/v1beta/models/gemini-2.5-flash:generateContent",
            ("v1beta", "gemini-2.5-flash", "generateContent"),
        ),
        (
            "/v1/models/gemini-2.5-flash:streamGenerateContent",
            ("v1", "gemini-2.5-flash", "streamGenerateContent"),
        ),
        (
            "/v1beta/models/gemini-embedding-001:batchEmbedContents",
            ("v1beta", "gemini-embedding-001", "batchEmbedContents"),
        ),
        ("/v1beta/models/gemini-2.5-flash:deleteEverything", None),
        ("/v1beta/models/a/b:generateContent", None),
        ("/v2/models/m:generateContent", None),
    ],
)
def test_parse_native_path(path: str, want: tuple[str, str, str] | None) -> None:
    r = parse_native_path(path)
    assert (None if r is None else (r.version, r.model, r.method)) == want


def test_vector15_envelope_keeps_the_body_byte_for_byte() -> None:
    body = (
        b'{"contents":[{"role":"model","parts":[{"functionCall":{"name":"run_shell_command",'
        b'"id":"run_shell_command_1796522117618_0","args":{}},"thoughtSignature":"c2ln"}]}],'
        b'"generationConfig":{"thinkingConfig":{"thinking_budget":0}},"futureField":  [1, 2]}'
    )
    check_body(body, "streamGenerateContent")
    env = wrap_code_assist(body, "gemini-2.5-flash", "proj-1", "p-9")
    assert env.endswith(b',"request":' + body + b"}")
    doc = orjson.loads(env)
    assert (doc["model"], doc["project"], doc["user_prompt_id"]) == (
        "gemini-2.5-flash",
        "proj-1",
        "p-9",
    )
    inner = b'{"candidates":[{"content":{"parts":[{"text":"x"}]},"finishReason":"STOP"}]}'
    assert unwrap_code_assist(b'{"response":' + inner + b',"traceId":"t"}') == inner
    assert unwrap_code_assist(inner) == inner
    assert has_finish_reason(inner) and not has_finish_reason(b'{"candidates":[]}')


@pytest.mark.parametrize(
    ("body", "method"),
    [
        (b"[]", "generateContent"),
        (b"{", "generateContent"),
        (b"{}", "generateContent"),
        (b"{}", "batchEmbedContents"),
        (b"{}", "embedContent"),
    ],
)
def test_bodies_gemini_cannot_take_are_400s(body: bytes, method: str) -> None:
    with pytest.raises(BadRequest):
        check_body(body, method)


def test_google_shaped_errors() -> None:
    status, body, _ = google_error(
        RateLimited("All accounts are cooling down.", retry_after_s=12.5)
    )
    doc = orjson.loads(body)["error"]
    assert status == 429 and doc["status"] == "RESOURCE_EXHAUSTED" and doc["code"] == 429
    assert doc["details"] == [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12.5s"}
    ]
    status, body, _ = google_error(AuthenticationError("Invalid API key."))
    doc = orjson.loads(body)["error"]
    assert status == 400 and doc["status"] == "INVALID_ARGUMENT"
    assert doc["details"][0]["reason"] == "API_KEY_INVALID"
    status, body, _ = google_error(UpstreamError("upstream failed"))
    assert status == 503 and orjson.loads(body)["error"]["status"] == "UNAVAILABLE"
