"""Google-like request validation, and rawgate's own translation checked by it.

The last section is the point of the emulator's validator: OpenAI requests mapped by
rawgate.translate.mapping and schemas cleaned by rawgate.translate.jsonschema must pass it.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from rawgate.emulator.models import CATALOG
from rawgate.emulator.validate import SKIP_SIGNATURE, Invalid, validate_request
from rawgate.translate import mapping, schemas
from rawgate.translate.jsonschema import to_gemini_parameters

FLASH = CATALOG["gemini-2.5-flash"]
PRO3 = CATALOG["gemini-3-pro-preview"]
U = {"role": "user", "parts": [{"text": "hi"}]}


def errors(body: Any, spec: Any = FLASH, **kw: Any) -> list[str]:
    try:
        validate_request(body, spec, **kw)
    except Invalid as e:
        return [d for _, d in e.violations]
    return []


def one(body: Any, spec: Any = FLASH, **kw: Any) -> str:
    errs = errors(body, spec, **kw)
    assert len(errs) == 1, errs
    return errs[0]


def tool(params: Any) -> dict[str, Any]:
    return {"contents": [U], "tools": [{"functionDeclarations": [
        {"name": "f", "description": "d", "parameters": params}]}]}


def test_minimal_request_passes() -> None:
    assert errors({"contents": [U]}) == []
    assert errors({"contents": [{"parts": [{"text": "no role is fine"}]}]}) == []


def test_unknown_fields_everywhere() -> None:
    assert one({"contents": [U], "temperature": 1}) == (
        'Invalid JSON payload received. Unknown name "temperature": Cannot find field.')
    assert one({"contents": [{"role": "user", "parts": [{"text": "a", "cache": 1}]}]}) == (
        "Invalid JSON payload received. Unknown name \"cache\" at 'contents[0].parts[0]': "
        "Cannot find field.")
    assert "Unknown name \"n\" at 'generation_config'" in one(
        {"contents": [U], "generationConfig": {"n": 2}})


def test_snake_case_is_accepted_like_proto_json() -> None:
    body = {"contents": [U], "system_instruction": {"parts": [{"text": "s"}]},
            "generation_config": {"max_output_tokens": 5, "thinking_config": {
                "thinking_budget": 0}},
            "tool_config": {"function_calling_config": {"mode": "AUTO"}}}
    assert errors(body) == []


def test_code_assist_inner_request_may_carry_session_id() -> None:
    body = {"contents": [U], "session_id": "s"}
    assert errors(body, code_assist=True) == []
    assert errors(body) != []


@pytest.mark.parametrize("body", [{}, {"contents": []}, {"contents": None}])
def test_empty_contents(body: Any) -> None:
    assert one(body) == "* GenerateContentRequest.contents: contents is not specified"


def test_roles_parts_and_data_fields() -> None:
    assert one({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}) == (
        "Please use a valid role: user, model.")
    assert one({"contents": [{"role": "user", "parts": []}]}) == (
        "* GenerateContentRequest.contents[0].parts: contents.parts must not be empty.")
    assert one({"contents": [{"role": "user", "parts": [{"thought": True}]}]}) == (
        "* GenerateContentRequest.contents[0].parts[0].data: required oneof field 'data' must "
        "have one initialized field")
    assert "oneof field 'data' is already set" in one(
        {"contents": [{"role": "user", "parts": [{"text": "a", "functionCall": {"name": "f"}}]}]})
    assert "(type.googleapis.com/google.ai.generativelanguage.v1beta.Content)" in one(
        {"contents": "hello"})
    assert "Invalid value at 'system_instruction'" in one(
        {"contents": [U], "systemInstruction": "be terse"})


def test_media_parts() -> None:
    good = {"inlineData": {"mimeType": "image/png", "data": "aGVsbG8="}}
    assert errors({"contents": [{"role": "user", "parts": [good]}]}) == []
    bad = {"inlineData": {"mimeType": "image/png", "data": "not base64!"}}
    assert "Base64 decoding failed" in one({"contents": [{"role": "user", "parts": [bad]}]})
    assert "file_uri must be set" in one(
        {"contents": [{"role": "user", "parts": [{"fileData": {"mimeType": "a/b"}}]}]})


@pytest.mark.parametrize("key", ["$schema", "$ref", "$defs", "const", "exclusiveMinimum",
                                 "exclusiveMaximum", "propertyNames", "additionalProperties",
                                 "oneOf", "allOf", "examples"])
def test_schema_keywords_gemini_rejects(key: str) -> None:
    params = {"type": "object", "properties": {"a": {"type": "string", key: 1}}}
    assert one(tool(params)) == (
        f'Invalid JSON payload received. Unknown name "{key}" at '
        f"'tools[0].function_declarations[0].parameters.properties[0].value': Cannot find field.")


def test_schema_shape_rules() -> None:
    assert "Proto field is not repeating, cannot start list" in one(
        tool({"type": "object", "properties": {"a": {"type": ["string", "null"]}}}))
    assert one(tool({"type": "object", "properties": {}})) == (
        "* GenerateContentRequest.tools[0].function_declarations[0].parameters.properties: "
        "should be non-empty for OBJECT type")
    assert one(tool({"type": "object", "properties": {"a": {"type": "string"}},
                     "required": ["b"]})).endswith("parameters.required[0]: property is not "
                                                   "defined")
    assert "only 'date-time' and 'enum' are supported for STRING type" in one(
        tool({"type": "object", "properties": {"a": {"type": "string", "format": "uri"}}}))
    assert "(TYPE_STRING), 1" in one(
        tool({"type": "object", "properties": {"a": {"type": "integer", "enum": [1]}}}))
    assert "Type), \"whatever\"" in one(tool({"type": "whatever"}))
    ok = {"type": "OBJECT", "properties": {"a": {"type": "string", "nullable": True,
                                                 "enum": ["x"], "format": "enum"},
                                           "b": {"anyOf": [{"type": "integer"},
                                                           {"type": "number"}]}},
          "required": ["a"], "propertyOrdering": ["a", "b"]}
    assert errors(tool(ok)) == []


def test_function_declarations() -> None:
    body = tool(None)
    body["tools"][0]["functionDeclarations"][0]["name"] = "bad name!"
    assert "Invalid function name" in one(body)
    body = {"contents": [U], "tools": [{"functionDeclarations": [{"name": "f"}, {"name": "f"}]}]}
    assert one(body) == "Duplicate function declaration found: f"
    body = {"contents": [U], "tools": [{"functionDeclarations": [
        {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}},
         "parametersJsonSchema": {"type": "object"}}]}]}
    assert "mutually exclusive" in one(body)
    body = {"contents": [U], "tools": [{"functionDeclarations": [
        {"name": "f", "parametersJsonSchema": {"type": "object", "additionalProperties": False,
                                               "$defs": {}}}]}]}
    assert errors(body) == []  # full JSON Schema is fine there


def test_search_with_functions_depends_on_the_model() -> None:
    body = {"contents": [U], "tools": [{"googleSearch": {}},
                                       {"functionDeclarations": [{"name": "f"}]}]}
    assert one(body) == "Tool use with function calling is unsupported"
    assert errors(body, PRO3) == []


def test_gemma_has_no_system_instruction_or_tools() -> None:
    gemma = CATALOG["gemma-3-27b-it"]
    body = {"contents": [U], "systemInstruction": {"parts": [{"text": "s"}]}}
    assert one(body, gemma) == "Developer instruction is not enabled for models/gemma-3-27b-it"


def call_turn(*names: str, sig: str | None = None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"functionCall": {"name": n, "args": {}}} for n in names]
    if sig is not None:
        parts[0]["thoughtSignature"] = sig
    return {"role": "model", "parts": parts}


def results(*names: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"functionResponse": {"name": n, "response": {"ok": 1}}}
                                      for n in names]}


def test_function_response_count_must_match() -> None:
    assert errors({"contents": [U, call_turn("a", "b"), results("a", "b")]}) == []
    assert one({"contents": [U, call_turn("a", "b"), results("a")]}) == (
        "Please ensure that the number of function response parts is equal to the number of "
        "function call parts of the function call turn.")


def test_turn_order_rules() -> None:
    assert "function call turn comes immediately after a user turn" in one(
        {"contents": [U, {"role": "model", "parts": [{"text": "x"}]}, call_turn("a"),
                      results("a")]})
    assert "function response turn comes immediately after a function call turn" in one(
        {"contents": [U, results("a")]})
    assert errors({"contents": [U, call_turn("a"), results("a"), call_turn("b"),
                                results("b")]}) == []


def test_gemini3_requires_a_signature_in_the_active_loop() -> None:
    body = {"contents": [U, call_turn("Bash"), results("Bash")]}
    msg = one(body, PRO3)
    assert msg.startswith("Function call is missing a thought_signature in functionCall parts")
    assert "`default_api:Bash` , position 2" in msg
    assert errors(body, FLASH) == []  # 2.5 does not require it
    for sig in (SKIP_SIGNATURE, "ZW11LXNpZzp4"):
        ok = {"contents": [U, call_turn("Bash", "b", sig=sig), results("Bash", "b")]}
        assert errors(ok, PRO3) == []
    # turns before the last user text are outside the active loop
    old = {"contents": [U, call_turn("a"), results("a"), {"role": "model", "parts": [
        {"text": "done"}]}, U]}
    assert errors(old, PRO3) == []


def test_signature_must_be_base64() -> None:
    body = {"contents": [U, call_turn("a", sig="%%%"), results("a")]}
    assert "Base64 decoding failed for \"%%%\"" in one(body, PRO3)


@pytest.mark.parametrize(("model", "tc", "needle"), [
    ("gemini-2.5-pro", {"thinkingBudget": 0}, "Budget 0 is invalid"),
    ("gemini-2.5-flash", {"thinkingBudget": 99999}, "between 1 and 24576"),
    ("gemini-2.5-flash", {"thinkingLevel": "HIGH"}, "Thinking level is not supported"),
    ("gemini-3-pro-preview", {"thinkingLevel": "MEDIUM"}, "Thinking level MEDIUM is not"),
    ("gemini-3-flash-preview", {"thinkingLevel": "LOW", "thinkingBudget": 5}, "same time"),
    ("gemini-2.0-flash", {"includeThoughts": True}, "Thinking is not enabled"),
])
def test_thinking_config_per_model(model: str, tc: dict[str, Any], needle: str) -> None:
    body = {"contents": [U], "generationConfig": {"thinkingConfig": tc}}
    assert needle in one(body, CATALOG[model])


@pytest.mark.parametrize(("model", "tc"), [
    ("gemini-2.5-flash", {"thinkingBudget": 0}), ("gemini-2.5-flash", {"thinkingBudget": -1}),
    ("gemini-2.5-pro", {"thinkingBudget": 128, "includeThoughts": True}),
    ("gemini-3-flash-preview", {"thinkingLevel": "MINIMAL"}),
    ("gemini-3-pro-preview", {"thinkingLevel": "HIGH", "includeThoughts": True}),
    ("gemini-2.0-flash", {"thinkingBudget": 0}),
])
def test_thinking_config_accepted(model: str, tc: dict[str, Any]) -> None:
    assert errors({"contents": [U], "generationConfig": {"thinkingConfig": tc}},
                  CATALOG[model]) == []


@pytest.mark.parametrize(("gen", "needle"), [
    ({"candidateCount": 9}, "candidate_count"), ({"maxOutputTokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"), ({"topP": 1.5}, "top_p"),
    ({"responseMimeType": "text/html"}, "allowed mimetypes"),
    ({"responseMimeType": "application/json", "responseSchema": {"type": "STRING"},
      "responseJsonSchema": {}}, "mutually exclusive"),
    ({"responseJsonSchema": {"type": "object"}}, "response_mime_type must be"),
    ({"stopSequences": ["1", "2", "3", "4", "5", "6"]}, "at most 5"),
    ({"responseLogprobs": True, "logprobs": 21}, "range of [0, 20]"),
    ({"responseLogprobs": True, "logprobs": -1}, "range of [0, 20]"),
    ({"logprobs": 3}, "only valid if response_logprobs"),
])
def test_generation_config_rules(gen: dict[str, Any], needle: str) -> None:
    assert needle in one({"contents": [U], "generationConfig": gen})


def test_logprobs_in_range_pass() -> None:
    for n in (0, 1, 20):
        gen = {"responseLogprobs": True, "logprobs": n}
        assert errors({"contents": [U], "generationConfig": gen}) == []


def test_many_violations_are_all_reported_up_to_a_cap() -> None:
    body = {"contents": [U], **{f"bogus{i}": i for i in range(50)}}
    assert len(errors(body)) == 20


def test_safety_settings_enums() -> None:
    ok = {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}
    assert errors({"contents": [U], "safetySettings": [ok]}) == []
    assert "HarmCategory" in one({"contents": [U], "safetySettings": [
        {"category": "HARM_X", "threshold": "OFF"}]})


# ---- rawgate's own translation passes -----------------------------------------------------------


def _chat(body: dict[str, Any], model: str) -> dict[str, Any]:
    import orjson

    req = schemas.decode_chat(orjson.dumps({"model": "x", **body}))
    return mapping.chat_to_gemini(req, model).body


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
    "additionalProperties": False,
    "properties": {"city": {"type": ["string", "null"], "format": "uri"},
                   "unit": {"const": "C"}, "n": {"type": "integer", "exclusiveMinimum": 0}},
    "required": ["city"]}}}


@pytest.mark.parametrize("model", ["gemini-2.5-flash", "gemini-3-pro-preview"])
def test_rawgate_chat_mapping_is_accepted(model: str) -> None:
    body = _chat({
        "messages": [
            {"role": "system", "content": "be terse"},
            {"role": "user", "content": "weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
            {"role": "tool", "tool_call_id": "call_2", "content": "24C"},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        ],
        "tools": [WEATHER], "tool_choice": "auto", "max_tokens": 100, "temperature": 0.2,
        "reasoning_effort": "low", "response_format": {"type": "json_object"},
    }, model)
    assert errors(body, CATALOG[model]) == []


_json_leaf = st.sampled_from([
    {"type": "string"}, {"type": "integer", "minimum": 0, "exclusiveMaximum": 9},
    {"type": ["number", "null"]}, {"const": "x"}, {"enum": [1, "a", None]},
    {"type": "string", "format": "uri"}, {"type": "boolean", "default": True},
    {"$ref": "#/$defs/leaf"}, {"type": "object"}, {}, {"type": "array"},
])


def _json_node(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.builds(lambda p, r: {"type": "object", "properties": p, "required": r,
                                "additionalProperties": False},
                  st.dictionaries(st.sampled_from(["a", "b", "c"]), kids, max_size=3),
                  st.lists(st.sampled_from(["a", "b", "z"]), max_size=2)),
        st.builds(lambda i: {"type": "array", "items": i}, kids),
        st.builds(lambda xs: {"anyOf": xs}, st.lists(kids, min_size=1, max_size=3)),
        st.builds(lambda xs: {"oneOf": xs}, st.lists(kids, min_size=1, max_size=3)),
        st.builds(lambda xs: {"allOf": xs}, st.lists(kids, min_size=1, max_size=2)),
    )


@settings(max_examples=150, deadline=None)
@given(st.recursive(_json_leaf, _json_node, max_leaves=12))
def test_rawgate_schema_cleaner_output_is_always_accepted(schema: Any) -> None:
    root = {"type": "object", "properties": {"x": schema}, "$defs": {"leaf": {"type": "string"}}}
    params = to_gemini_parameters(root)
    if params is not None:
        assert errors(tool(params)) == []
