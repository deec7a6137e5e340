"""The Gemini-native front's sans-IO pieces (rawgate/native.py), in bytes: route parsing, the Code
Assist envelope around a byte-faithful body (vector 15), unwrapping, and Google-shaped errors
(vector 10's RetryInfo, a bad client key as API_KEY_INVALID)."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, strategies as st

from rawgate.errors import AuthenticationError, BadRequest, RateLimited, UpstreamError
from rawgate.translate.native import (
    check_body,
    google_error,
    has_finish_reason,
    parse_native_path,
    rename_body_models,
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


def test_renamed_url_model_renames_the_items_that_named_it_and_nothing_else() -> None:
    # Odd spacing, escapes, a text that quotes a "model" key, key order and unknown fields:
    # only the three item models that named the client's model change, in their own form.
    body = (
        b'{ "requests" : [\n'
        b'  {"model": "models/my-embedder", "content": {"parts": [{"text": '
        b'"say \\"model\\": \\"models/my-embedder\\" \\u00e9"}]}, "x": [1, 2.50, {}]},\n'
        b'  {"content": {"parts": [{"text": "no model"}]}, "model":"my-embedder"},\n'
        b'  {"content": {"parts": [{"text": "omitted"}]}},\n'
        b'  {"model": "models/other", "content": {"parts": [{"text": "third"}]}},\n'
        b'  {"model": "models/my-embedder", "content": {"model": "models/my-embedder"}}\n'
        b'], "extra": {"model": "models/my-embedder"}}'
    )
    out = rename_body_models(body, "batchEmbedContents", "my-embedder", "gemini-embedding-001")
    want = (
        body.replace(
            b'{"model": "models/my-embedder", "content": {"parts"',
            b'{"model": "models/gemini-embedding-001", "content": {"parts"',
        )
        .replace(b'"model":"my-embedder"}', b'"model":"gemini-embedding-001"}')
        .replace(
            b'{"model": "models/my-embedder", "content": {"model"',
            b'{"model": "models/gemini-embedding-001", "content": {"model"',
        )
    )
    assert out == want
    doc = orjson.loads(out)
    assert [r.get("model") for r in doc["requests"]] == [
        "models/gemini-embedding-001",
        "gemini-embedding-001",
        None,
        "models/other",
        "models/gemini-embedding-001",
    ]
    assert doc["requests"][4]["content"] == {"model": "models/my-embedder"}  # not an item model
    assert doc["extra"] == {"model": "models/my-embedder"}
    assert "models/my-embedder" in doc["requests"][0]["content"]["parts"][0]["text"]


def test_renamed_model_in_count_tokens_embed_content_and_generate() -> None:
    ct = (
        b'{"generateContentRequest": {"model": "models/alias", "contents": '
        b'[{"parts": [{"text": "hi"}]}]}}'
    )
    assert rename_body_models(ct, "countTokens", "alias", "gemini-2.5-flash") == ct.replace(
        b'"models/alias"', b'"models/gemini-2.5-flash"'
    )
    one = b'{"model":"models/alias","content":{"parts":[{"text":"models/alias"}]}}'
    assert rename_body_models(one, "embedContent", "alias", "g") == (
        b'{"model":"models/g","content":{"parts":[{"text":"models/alias"}]}}'
    )
    gen = b'{"contents":[{"parts":[{"text":"model"}]}],"model":"alias"}'
    assert rename_body_models(gen, "generateContent", "alias", "g") == gen.replace(
        b'"alias"', b'"g"'
    )
    # No repeated model, or one naming another model: the very same bytes object.
    plain = b'{"contents":[{"parts":[{"text":"hi"}]}]}'
    assert rename_body_models(plain, "generateContent", "alias", "g") is plain
    turns = b'{"contents":[{"role":"model","parts":[{"text":"say \\"model\\": alias"}]}]}'
    assert rename_body_models(turns, "generateContent", "alias", "g") is turns
    other = b'{"requests":[{"model":"models/x","content":{"parts":[{"text":"a"}]}}]}'
    assert rename_body_models(other, "batchEmbedContents", "alias", "g") is other


def test_bytes_check_body_keeps_raw_are_never_a_crash() -> None:
    # check_body skips the bytes of the fields it keeps raw: invalid UTF-8 gets past it, and
    # the rename leaves such strings (keys or values) alone instead of failing.
    body = (
        b'{"requests":[{"model":"\xff","content":{}},{"\xfe":{"model":"al"},'
        b'"model":"models/al"}]}'
    )
    check_body(body, "batchEmbedContents")
    out = rename_body_models(body, "batchEmbedContents", "al", "real")
    assert out == body.replace(b'"models/al"', b'"models/real"')


def test_a_body_without_a_model_key_is_not_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    # A remapped conversation pays one regex search, not a token walk of its whole history.
    from rawgate.translate import native

    def walked(*_a: object) -> list[tuple[int, int]]:
        raise AssertionError("walked")

    monkeypatch.setattr(native, "_value_spans", walked)
    turns = b'{"contents":[{"role":"model","parts":[{"text":"say \\"model\\": alias"}]}]}'
    assert rename_body_models(turns, "generateContent", "alias", "g") is turns
    with pytest.raises(AssertionError, match="walked"):
        rename_body_models(b'{"model":"alias"}', "generateContent", "alias", "g")


_TEXT = st.lists(
    st.sampled_from(['"', "\\", "{", "}", "[", "]", ":", ",", "é", "a", '"model"', "models/al"]),
    max_size=12,
).map("".join)


@given(
    items=st.lists(
        st.tuples(
            st.sampled_from([None, "al", "models/al", "models/other", "x"]),
            _TEXT,
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    ),
    indent=st.booleans(),
)
def test_rename_is_exactly_the_item_models_whatever_the_text(
    items: list[tuple[str | None, str, bool]], indent: bool
) -> None:
    reqs = []
    for model, text, first in items:
        r: dict[str, object] = {"content": {"parts": [{"text": text}], "model": text}}
        if model is not None:
            r = {"model": model, **r} if first else {**r, "model": model}
        reqs.append(r)
    doc = {"requests": reqs, "model": "models/al", "note": {"model": "models/al"}}
    body = json.dumps(doc, indent=2 if indent else None, ensure_ascii=indent).encode()
    out = rename_body_models(body, "batchEmbedContents", "al", "real")
    want = orjson.loads(body)
    want["model"] = "models/real"
    renamed = {"al": "real", "models/al": "models/real"}
    for r in want["requests"]:
        if "model" in r:
            r["model"] = renamed.get(str(r["model"]), r["model"])
    assert orjson.loads(out) == want


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6) | st.just("models/al"),
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.sampled_from(["model", "requests", "content", "x", "é"]), kids,
                      max_size=4),
    max_leaves=20,
)


@given(
    doc=st.dictionaries(st.sampled_from(["model", "requests", "contents"]), _JSON, max_size=3),
    noise=st.binary(max_size=3),
    at=st.integers(min_value=0),
)
def test_any_body_check_body_takes_renames_without_raising(
    doc: dict[str, object], noise: bytes, at: int
) -> None:
    body = json.dumps(doc, ensure_ascii=False).encode()
    k = at % (len(body) + 1)
    body = body[:k] + noise + body[k:]
    for method in ("batchEmbedContents", "countTokens", "generateContent"):
        try:
            check_body(body, method)
        except BadRequest:
            continue
        out = rename_body_models(body, method, "al", "real")
        if out != body:  # something was renamed: it named the alias, and only it changed
            assert b'"models/al"' in body or b'"al"' in body
            assert len(out) - len(body) == 2 * (out.count(b'"real"') + out.count(b'/real"'))
