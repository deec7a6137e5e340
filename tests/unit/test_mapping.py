"""OpenAI -> Gemini mapping: one table test per rule, the request-side vectors of protocols.md G
(6, 7, 19 and the quick tool_choice vectors), Codex's Responses shapes, and hypothesis properties
over whole chat conversations."""

from __future__ import annotations

import base64
import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from rawgate.errors import BadRequest
from rawgate.translate.mapping import (
    chat_to_gemini,
    code_assist_body,
    completion_to_gemini,
    gemini_body,
    responses_to_gemini,
)
from rawgate.translate.schemas import decode_chat, decode_completion, decode_responses
from rawgate.translate.signatures import SKIP_SIGNATURE, mint_call_id, pack_reasoning
from rawgate.translate.thinking import family, thinking_config

DATA = Path(__file__).resolve().parents[1] / "data" / "requests"
FLASH = "gemini-2.5-flash"
G3 = "gemini-3-pro-preview"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def chat(model: str = FLASH, **body: Any) -> dict[str, Any]:
    body.setdefault("model", "gpt-4o")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return chat_to_gemini(decode_chat(orjson.dumps(body)), model).body


def chat_err(**body: Any) -> BadRequest:
    with pytest.raises(BadRequest) as ei:
        chat(**body)
    return ei.value


def resp_call(model: str = FLASH, history: list[dict[str, Any]] | None = None, **body: Any) -> Any:
    body.setdefault("model", "gpt-5-codex")
    return responses_to_gemini(decode_responses(orjson.dumps(body)), model, history)


def tc(cid: str, name: str, args: str) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


# ---- system, roles, merging, parts -----------------------------------------------------------


def test_system_and_developer_go_to_system_instruction_verbatim() -> None:
    text = "Current date: 2026-01-01\n<cwd>/x</cwd>   "
    b = chat(
        messages=[
            {"role": "system", "content": text},
            {"role": "user", "content": "a"},
            {"role": "developer", "content": [{"type": "text", "text": "dev"}]},
            {"role": "user", "content": "b"},
        ]
    )
    assert b["systemInstruction"] == {"parts": [{"text": text}, {"text": "dev"}]}
    assert b["contents"] == [{"role": "user", "parts": [{"text": "a"}, {"text": "b"}]}]


def test_only_system_text_becomes_the_user_turn() -> None:
    b = chat(messages=[{"role": "system", "content": "Translate: chat"}])
    assert "systemInstruction" not in b
    assert b["contents"] == [{"role": "user", "parts": [{"text": "Translate: chat"}]}]


def test_roles_merge_and_empty_parts_drop() -> None:
    b = chat(
        messages=[
            {"role": "user", "content": ""},
            {
                "role": "user",
                "content": [{"type": "text", "text": ""}, {"type": "text", "text": "q"}],
            },
            {"role": "assistant", "content": "a1"},
            {"role": "assistant", "content": None},
            {"role": "assistant", "content": [{"type": "text", "text": "a2"}]},
            {"role": "user", "content": "q2"},
        ]
    )
    assert b["contents"] == [
        {"role": "user", "parts": [{"text": "q"}]},
        {"role": "model", "parts": [{"text": "a1"}, {"text": "a2"}]},
        {"role": "user", "parts": [{"text": "q2"}]},
    ]


def test_no_message_at_all_is_400() -> None:
    assert chat_err(messages=[{"role": "user", "content": ""}]).param == "messages"


def test_media_parts() -> None:
    b = chat_to_gemini(decode_chat((DATA / "chat_full.json").read_bytes()), FLASH).body
    parts = b["contents"][0]["parts"]
    assert parts[0] == {"text": "What is in these?"}
    assert parts[1] == {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
    assert parts[2] == {
        "fileData": {"fileUri": "https://example.com/cat.JPG", "mimeType": "image/jpeg"}
    }
    assert parts[3] == {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}}
    assert parts[4] == {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}}


def test_http_url_without_known_extension_leaves_mime_to_gemini() -> None:
    img = {"type": "image_url", "image_url": {"url": "https://x.test/render?id=3"}}
    b = chat(messages=[{"role": "user", "content": [img]}])
    assert b["contents"][0]["parts"] == [{"fileData": {"fileUri": "https://x.test/render?id=3"}}]


def test_percent_encoded_data_url() -> None:
    img = {"type": "image_url", "image_url": {"url": "data:image/svg+xml,%3Csvg%2F%3E"}}
    b = chat(messages=[{"role": "user", "content": [img]}])
    data = b["contents"][0]["parts"][0]["inlineData"]
    assert data["mimeType"] == "image/svg+xml"
    assert base64.b64decode(data["data"]) == b"<svg/>"


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "/etc/passwd", "C:\\x.png", "ftp://h/x.png", "~/.ssh/id_rsa"]
)
def test_local_files_are_never_read(url: str) -> None:
    img = {"type": "image_url", "image_url": {"url": url}}
    e = chat_err(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}, img]}])
    assert e.param == "messages[0].content[1].image_url.url"
    assert "local" in e.message


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "image_url"}, "messages[0].content[0].image_url"),
        (
            {"type": "image_url", "image_url": {"url": "data:;base64,AA=="}},
            "messages[0].content[0].image_url.url",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64"}},
            "messages[0].content[0].image_url.url",
        ),
        (
            {"type": "input_audio", "input_audio": {"data": "x", "format": "midi"}},
            "messages[0].content[0].input_audio.format",
        ),
        ({"type": "file", "file": {"file_id": "file-abc"}}, "messages[0].content[0].file.file_id"),
        ({"type": "file", "file": {}}, "messages[0].content[0].file"),
        (
            {"type": "file", "file": {"file_data": "JVBERi0="}},
            "messages[0].content[0].file.file_data",
        ),
    ],
)
def test_bad_parts(part: dict[str, Any], param: str) -> None:
    assert chat_err(messages=[{"role": "user", "content": [part]}]).param == param


def test_unknown_part_types_are_tolerated() -> None:
    parts = [{"type": "cache_marker"}, {"type": "future_text", "text": "t"}]
    b = chat(messages=[{"role": "user", "content": parts}])
    assert b["contents"][0]["parts"] == [{"text": "t"}]


# ---- generationConfig ------------------------------------------------------------------------


def test_no_hidden_defaults() -> None:
    b = chat()
    assert set(b) == {"contents"}


def test_generation_knobs() -> None:
    b = chat(
        max_tokens=10,
        max_completion_tokens=20,
        temperature=0.3,
        top_p=0.5,
        n=2,
        stop="END",
        seed=2**40 + 5,
        presence_penalty=0.1,
        frequency_penalty=-0.1,
        logprobs=True,
        top_logprobs=2,
    )
    assert b["generationConfig"] == {
        "maxOutputTokens": 20,
        "temperature": 0.3,
        "topP": 0.5,
        "candidateCount": 2,
        "stopSequences": ["END"],
        "seed": 5,
        "presencePenalty": 0.1,
        "frequencyPenalty": -0.1,
        "responseLogprobs": True,
        "logprobs": 2,
    }


def test_gemini_limits_are_named() -> None:
    assert chat_err(n=9).param == "n"
    assert chat_err(stop=["a", "b", "c", "d", "e", "f"]).param == "stop"


@pytest.mark.parametrize(
    ("fmt", "expect"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"responseMimeType": "application/json"}),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "o", "schema": {"type": "object", "$schema": "x"}},
            },
            {"responseMimeType": "application/json", "responseJsonSchema": {"type": "object"}},
        ),
    ],
)
def test_response_format(fmt: dict[str, Any], expect: dict[str, Any] | None) -> None:
    assert chat(response_format=fmt).get("generationConfig") == expect


@pytest.mark.parametrize(
    ("model", "effort", "expect"),
    [
        (FLASH, "low", {"thinkingBudget": 1024, "includeThoughts": True}),
        (FLASH, "none", {"thinkingBudget": 0}),
        ("gemini-2.5-pro", "none", {"thinkingBudget": 128}),
        ("gemini-2.5-pro", "max", {"thinkingBudget": 32768, "includeThoughts": True}),
        ("gemini-2.5-flash-lite", "high", {"thinkingBudget": 24576, "includeThoughts": True}),
        (G3, "medium", {"thinkingLevel": "HIGH", "includeThoughts": True}),
        (
            "gemini-3-flash-preview",
            "minimal",
            {"thinkingLevel": "MINIMAL", "includeThoughts": True},
        ),
        ("gemini-3.1-pro-preview", "medium", {"thinkingLevel": "MEDIUM", "includeThoughts": True}),
        ("gemini-2.0-flash", "high", None),
        ("gemma-3-27b-it", "high", None),
    ],
)
def test_reasoning_effort_table(model: str, effort: str, expect: dict[str, Any] | None) -> None:
    got = chat(model, reasoning_effort=effort).get("generationConfig", {}).get("thinkingConfig")
    assert got == expect


def test_thinking_helpers() -> None:
    assert family("models/gemini-3-pro-preview") == "3-pro"
    assert family("gemini-3.5-flash") == "3-flash"
    assert family("gemini-2.5-flash-lite") == "2.5-flash"
    assert family("gpt-4o") == "none"
    assert family("gemini-x-flash") == "none"
    assert thinking_config(FLASH, None, False) is None
    assert thinking_config(FLASH, None, True) == {"includeThoughts": True}


# ---- tools -----------------------------------------------------------------------------------


def test_tools_and_tool_choice_vectors() -> None:
    assert chat(tools=[WEATHER], tool_choice="required")["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY"}
    }
    assert chat(tools=[WEATHER], tool_choice="none")["toolConfig"] == {
        "functionCallingConfig": {"mode": "NONE"}
    }
    assert chat(tools=[WEATHER], tool_choice="auto")["toolConfig"] == {
        "functionCallingConfig": {"mode": "AUTO"}
    }
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert chat(tools=[WEATHER], tool_choice=named)["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }
    assert "toolConfig" not in chat(tools=[WEATHER])
    assert "toolConfig" not in chat(tool_choice="auto")  # no tools: nothing to configure
    other = {"type": "function", "function": {"name": "nope"}}
    assert chat_err(tools=[WEATHER], tool_choice=other).param == "tool_choice"


def test_allowed_tools_choice() -> None:
    lookup = {"type": "function", "function": {"name": "lookup"}}
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "auto",
            "tools": [{"type": "function", "function": {"name": "lookup"}}],
        },
    }
    b = chat(tools=[WEATHER, lookup], tool_choice=allowed)
    assert [d["name"] for d in b["tools"][0]["functionDeclarations"]] == ["lookup"]
    allowed["allowed_tools"]["mode"] = "required"  # type: ignore[index]
    b = chat(tools=[WEATHER, lookup], tool_choice=allowed)
    assert b["toolConfig"]["functionCallingConfig"] == {
        "mode": "ANY",
        "allowedFunctionNames": ["lookup"],
    }


def test_tool_without_parameters_gets_none_invented() -> None:
    b = chat(tools=[{"type": "function", "function": {"name": "now", "description": "time"}}])
    assert b["tools"] == [{"functionDeclarations": [{"name": "now", "description": "time"}]}]


def test_illegal_tool_names_are_mapped_reversibly() -> None:
    tools = [
        {"type": "function", "function": {"name": "my tool/v2"}},
        {"type": "function", "function": {"name": "9lives"}},
        {"type": "function", "function": {"name": "x" * 100}},
    ]
    hist = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [tc("call_1", "my tool/v2", "{}")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    call = chat_to_gemini(
        decode_chat(orjson.dumps({"model": "m", "messages": hist, "tools": tools})), FLASH
    )
    names = [d["name"] for d in call.body["tools"][0]["functionDeclarations"]]
    import re

    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,63}", n) for n in names)
    assert len(set(names)) == 3
    assert [call.tools[n].name for n in names] == ["my tool/v2", "9lives", "x" * 100]
    fc = call.body["contents"][1]["parts"][0]["functionCall"]
    assert fc["name"] == names[0]
    assert call.body["contents"][2]["parts"][0]["functionResponse"]["name"] == names[0]


def test_duplicate_tool_name_is_400() -> None:
    assert chat_err(tools=[WEATHER, WEATHER]).param == "tools[1].function.name"


def test_vector_19_through_mapping() -> None:
    params = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "additionalProperties": False,
        "properties": {"mode": {"const": "fast"}, "p": {"$ref": "#/$defs/P"}},
        "$defs": {"P": {"type": "string"}},
    }
    b = chat(tools=[{"type": "function", "function": {"name": "f", "parameters": params}}])
    text = orjson.dumps(b["tools"]).decode()
    for bad in ("$schema", "additionalProperties", "const", "$ref", "$defs"):
        assert bad not in text


def test_args_in_history_are_never_schema_cleaned() -> None:
    args = '{"$ref": "#/x", "const": 1, "type": ["a", "null"], "additionalProperties": false}'
    hist = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [tc("call_1", "f", args)]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    b = chat(messages=hist)
    assert b["contents"][1]["parts"][0]["functionCall"]["args"] == orjson.loads(args)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        ("", {}),
        ("{}", {}),
        ("[1]", {"_raw": "[1]"}),
        ('{"a":', {"_raw": '{"a":'}),
        ("NaN", {"_raw": "NaN"}),
    ],
)
def test_odd_arguments(args: str, expect: dict[str, Any]) -> None:
    hist = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [tc("call_1", "f", args)]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    assert chat(messages=hist)["contents"][1]["parts"][0]["functionCall"]["args"] == expect


# ---- tool results and signatures (vectors 6, 7) ------------------------------------------------


def test_vector_6_results_out_of_order_become_one_turn_in_call_order() -> None:
    hist = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                tc("call_a", "get_weather", '{"city":"Paris"}'),
                tc("call_b", "get_weather", '{"city":"Rome"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "call_b", "content": "24C"},
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
    ]
    b = chat(messages=hist, tools=[WEATHER])
    assert b["contents"][2] == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"output": "18C"}}},
            {"functionResponse": {"name": "get_weather", "response": {"output": "24C"}}},
        ],
    }
    assert len(b["contents"]) == 3


def test_missing_result_gets_an_explicit_error_response() -> None:
    hist = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [tc("call_a", "f", "{}"), tc("call_b", "g", "{}")]},
        {"role": "tool", "tool_call_id": "call_b", "content": "B"},
        {"role": "user", "content": "and?"},
    ]
    parts = chat(messages=hist)["contents"][2]["parts"]
    assert parts[0]["functionResponse"]["name"] == "f"
    assert "error" in parts[0]["functionResponse"]["response"]
    assert parts[1]["functionResponse"] == {"name": "g", "response": {"output": "B"}}
    assert parts[2] == {"text": "and?"}


@pytest.mark.parametrize(
    ("msgs", "param"),
    [
        ([{"role": "tool", "tool_call_id": "call_x", "content": "r"}], "messages[0]"),
        (
            [
                {"role": "user", "content": "go"},
                {"role": "assistant", "tool_calls": [tc("call_a", "f", "{}")]},
                {"role": "tool", "tool_call_id": "call_a", "content": "1"},
                {"role": "assistant", "tool_calls": [tc("call_b", "f", "{}")]},
                {"role": "tool", "tool_call_id": "call_a", "content": "again"},
            ],
            "messages[4]",
        ),
        ([{"role": "tool", "content": "r"}], "messages[0].tool_call_id"),
    ],
)
def test_orphan_tool_results(msgs: list[dict[str, Any]], param: str) -> None:
    assert chat_err(messages=msgs).param == param


def test_tool_result_with_image_parts() -> None:
    hist = [
        {"role": "user", "content": "shot"},
        {"role": "assistant", "tool_calls": [tc("call_a", "screenshot", "{}")]},
        {
            "role": "tool",
            "tool_call_id": "call_a",
            "content": [
                {"type": "text", "text": "here"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    ]
    parts = chat(messages=hist)["contents"][2]["parts"]
    assert parts[0]["functionResponse"]["response"] == {"output": "here"}
    assert parts[1] == {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}


def _vector7_history(id_a: str, id_b: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking both.",
            "tool_calls": [
                tc(id_a, "get_weather", '{"city":"Paris"}'),
                tc(id_b, "get_weather", '{"city":"Rome"}'),
            ],
        },
        {"role": "tool", "tool_call_id": id_a, "content": "18C"},
        {"role": "tool", "tool_call_id": id_b, "content": "24C"},
    ]


@pytest.mark.parametrize("model", [FLASH, G3])
def test_vector_7_signature_round_trip(model: str) -> None:
    sig = base64.b64encode(b"SIG_A \xff\xfe opaque").decode()
    b = chat(model, messages=_vector7_history(mint_call_id(sig), mint_call_id()))
    parts = b["contents"][1]["parts"]
    assert parts[0] == {"text": "Checking both."}
    assert parts[1]["thoughtSignature"] == sig
    assert "thoughtSignature" not in parts[2]


def test_vector_7_unknown_calls_get_skip_signature_in_active_loop_only() -> None:
    older = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "tool_calls": [tc("toolu_1", "f", "{}")]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "1"},
        {"role": "assistant", "content": "done"},
    ]
    active = [
        {"role": "user", "content": "second"},
        {"role": "assistant", "tool_calls": [tc("toolu_2", "f", "{}"), tc("toolu_3", "f", "{}")]},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "2"},
        {"role": "tool", "tool_call_id": "toolu_3", "content": "3"},
        {"role": "assistant", "tool_calls": [tc("toolu_4", "f", "{}")]},
        {"role": "tool", "tool_call_id": "toolu_4", "content": "4"},
    ]
    c = chat(G3, messages=older + active)["contents"]
    assert "thoughtSignature" not in c[1]["parts"][0]  # before the last user text: untouched
    assert c[5]["parts"][0]["thoughtSignature"] == SKIP_SIGNATURE
    assert "thoughtSignature" not in c[5]["parts"][1]  # never on every call
    assert c[7]["parts"][0]["thoughtSignature"] == SKIP_SIGNATURE
    # Gemini 2.5 does not require signatures: no sentinel anywhere.
    assert SKIP_SIGNATURE not in orjson.dumps(chat(FLASH, messages=older + active)).decode()


def test_deprecated_functions_and_function_call() -> None:
    b = chat(
        messages=[
            {"role": "user", "content": "go"},
            {"role": "assistant", "function_call": {"name": "f", "arguments": '{"a":1}'}},
            {"role": "function", "name": "f", "content": "done"},
        ],
        functions=[
            {
                "name": "f",
                "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
            }
        ],
        function_call={"name": "f"},
    )
    assert b["contents"][1]["parts"] == [{"functionCall": {"name": "f", "args": {"a": 1}}}]
    assert b["contents"][2]["parts"][0]["functionResponse"]["name"] == "f"
    assert b["toolConfig"]["functionCallingConfig"]["allowedFunctionNames"] == ["f"]


def test_chat_call_record() -> None:
    body: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "n": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [WEATHER],
    }
    call = chat_to_gemini(decode_chat(orjson.dumps(body)), FLASH)
    assert (call.api, call.model, call.client_model) == ("chat", FLASH, "gpt-4o")
    assert call.stream and call.include_usage and call.n == 3
    assert call.tools["get_weather"].kind == "function"
    assert call.conversation_key
    # same system + first user turn -> same key, whatever follows
    body2 = {**body, "messages": [*body["messages"], {"role": "assistant", "content": "yo"}]}
    assert (
        chat_to_gemini(decode_chat(orjson.dumps(body2)), FLASH).conversation_key
        == call.conversation_key
    )
    other = {**body, "messages": [{"role": "user", "content": "hello"}]}
    assert (
        chat_to_gemini(decode_chat(orjson.dumps(other)), FLASH).conversation_key
        != call.conversation_key
    )


# ---- legacy completions ----------------------------------------------------------------------


def test_completion_mapping() -> None:
    req = decode_completion(
        b'{"model":"text-davinci","prompt":["Say hi"],"max_tokens":5,"echo":true,"n":2}'
    )
    call = completion_to_gemini(req, FLASH)
    assert call.body == {
        "contents": [{"role": "user", "parts": [{"text": "Say hi"}]}],
        "generationConfig": {"maxOutputTokens": 5, "candidateCount": 2},
    }
    assert call.echo_prompt == "Say hi" and call.n == 2 and call.api == "completions"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model":"m","prompt":["a","b"]}', "prompt"),
        (b'{"model":"m","prompt":[]}', "prompt"),
        (b'{"model":"m","prompt":""}', "prompt"),
        (b'{"model":"m","prompt":"a","suffix":"z"}', "suffix"),
        (b'{"model":"m","prompt":"a","best_of":3}', "best_of"),
    ],
)
def test_completion_errors(body: bytes, param: str) -> None:
    with pytest.raises(BadRequest) as ei:
        completion_to_gemini(decode_completion(body), FLASH)
    assert ei.value.param == param


# ---- Responses --------------------------------------------------------------------------------


def test_codex_turn() -> None:
    call = responses_to_gemini(decode_responses((DATA / "codex_turn.json").read_bytes()), G3)
    b = call.body
    assert b["systemInstruction"]["parts"][0] == {"text": "You are Codex, a coding agent."}
    assert "permissions" in b["systemInstruction"]["parts"][1]["text"]
    roles = [c["role"] for c in b["contents"]]
    assert roles == ["user", "model", "user", "model", "user", "model"]
    assert len(b["contents"][0]["parts"]) == 2  # env context + task merged
    fc = b["contents"][1]["parts"][0]
    assert fc["functionCall"] == {"name": "exec_command", "args": {"cmd": "ls"}}
    assert fc["thoughtSignature"] == SKIP_SIGNATURE  # foreign encrypted_content, Gemini 3
    assert b["contents"][2]["parts"][0]["functionResponse"]["response"] == {
        "output": "file_a\nfile_b"
    }
    custom = b["contents"][3]["parts"][0]["functionCall"]
    assert custom == {"name": "apply_patch", "args": {"input": "*** Begin Patch\n*** End Patch"}}
    assert b["contents"][5]["parts"] == [{"text": "Patched."}]
    decls = {d["name"]: d for d in b["tools"][0]["functionDeclarations"]}
    assert set(decls) == {"exec_command", "apply_patch", "mcp__fs__read"}
    assert decls["exec_command"]["parameters"]["properties"]["workdir"] == {
        "type": "string",
        "nullable": True,
    }
    assert "lark grammar" in decls["apply_patch"]["description"]
    assert decls["apply_patch"]["parameters"]["required"] == ["input"]
    assert len(b["tools"]) == 1  # web_search dropped: functions are declared; hosted tools dropped
    assert call.tools["apply_patch"].kind == "custom"
    assert call.tools["mcp__fs__read"].namespace == "mcp__fs"
    assert call.tools["mcp__fs__read"].name == "read"
    assert b["generationConfig"] == {
        "thinkingConfig": {"thinkingLevel": "HIGH", "includeThoughts": True}
    }
    assert b["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert call.store is False and call.stream is True
    assert call.request_echo["include"] == ["reasoning.encrypted_content"]
    assert call.request_echo["parallel_tool_calls"] is True
    assert call.input_items[0]["type"] == "message"
    assert len(call.input_items) == 9
    orjson.dumps(call.input_items)


def test_reasoning_encrypted_content_restores_signatures() -> None:
    sig = base64.b64encode(b"the real signature").decode()
    items = [
        {"role": "user", "content": "go"},
        {
            "type": "reasoning",
            "summary": [],
            "encrypted_content": pack_reasoning({"call_1": sig}, "t"),
        },
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_2", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_2", "output": "2"},
        {"type": "function_call_output", "call_id": "call_1", "output": "1"},
    ]
    b = resp_call(G3, input=items, tools=[{"type": "function", "name": "f"}]).body
    model = b["contents"][1]["parts"]
    assert model[0]["thoughtSignature"] == sig
    assert "thoughtSignature" not in model[1]
    outs = [p["functionResponse"]["response"]["output"] for p in b["contents"][2]["parts"]]
    assert outs == ["1", "2"]


def test_text_signature_from_reasoning_item() -> None:
    items = [
        {"role": "user", "content": "hi"},
        {
            "type": "reasoning",
            "summary": [],
            "encrypted_content": pack_reasoning({"": "U0lH"}, None),
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "yo"}],
        },
        {"role": "user", "content": "again"},
    ]
    b = resp_call(input=items).body
    assert b["contents"][1]["parts"] == [{"text": "yo", "thoughtSignature": "U0lH"}]


def test_responses_history_prepended_and_saved() -> None:
    history = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q1"}]},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "a1", "annotations": []}],
        },
    ]
    call = resp_call(history=history, input="q2", instructions="sys", previous_response_id="resp_1")
    assert [c["role"] for c in call.body["contents"]] == ["user", "model", "user"]
    assert call.body["contents"][2]["parts"] == [{"text": "q2"}]
    assert call.previous_response_id == "resp_1" and call.instructions == "sys"
    assert call.input_items[:2] == history
    assert call.input_items[2] == {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "q2"}],
    }


def test_responses_knobs() -> None:
    call = resp_call(
        input="hi",
        max_output_tokens=50,
        temperature=0.1,
        top_p=0.2,
        reasoning={"summary": "auto"},
        text={"format": {"type": "json_schema", "name": "o", "schema": {"type": "object"}}},
        metadata={"a": "b"},
        tool_choice={"type": "function", "name": "f"},
        tools=[{"type": "function", "name": "f"}],
    )
    assert call.body["generationConfig"] == {
        "maxOutputTokens": 50,
        "temperature": 0.1,
        "topP": 0.2,
        "thinkingConfig": {"includeThoughts": True},
        "responseMimeType": "application/json",
        "responseJsonSchema": {"type": "object"},
    }
    assert call.body["toolConfig"]["functionCallingConfig"]["allowedFunctionNames"] == ["f"]
    assert call.metadata == {"a": "b"} and call.store is True
    assert call.request_echo["temperature"] == 0.1


def test_web_search_alone_becomes_google_search() -> None:
    b = resp_call(input="news?", tools=[{"type": "web_search"}, {"type": "image_generation"}]).body
    assert b["tools"] == [{"googleSearch": {}}]
    assert "toolConfig" not in b


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]},
            "input[0].name",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": "x"},
                    {"type": "function_call_output", "call_id": "zz", "output": "o"},
                ]
            },
            "input[1].call_id",
        ),
        ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ],
)
def test_responses_errors(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as ei:
        resp_call(**body)
    assert ei.value.param == param


# ---- encoding ---------------------------------------------------------------------------------


def test_bodies_and_code_assist_envelope() -> None:
    call = chat_to_gemini(
        decode_chat(b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'), FLASH
    )
    assert orjson.loads(gemini_body(call)) == call.body
    env = orjson.loads(code_assist_body(call, "proj-1", "pid"))
    assert env == {
        "model": FLASH,
        "project": "proj-1",
        "user_prompt_id": "pid",
        "request": call.body,
    }
    assert "user_prompt_id" not in orjson.loads(code_assist_body(call, "proj-1"))


# ---- properties over whole conversations --------------------------------------------------------

_text = st.text(min_size=0, max_size=8)


@st.composite
def _conversation(draw: st.DrawFn) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    counter = 0
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["system", "user", "assistant", "calls"]))
        if kind == "calls":
            n = draw(st.integers(1, 3))
            ids = []
            calls = []
            for _ in range(n):
                counter += 1
                sig = draw(st.none() | st.just(base64.b64encode(b"s%d" % counter).decode()))
                cid = mint_call_id(sig)
                ids.append(cid)
                calls.append(
                    tc(
                        cid,
                        draw(st.sampled_from(["f", "g"])),
                        draw(st.sampled_from(["{}", '{"a":1}', "bad"])),
                    )
                )
            msgs.append(
                {"role": "assistant", "content": draw(st.none() | _text), "tool_calls": calls}
            )
            answered = draw(st.permutations(ids))[: draw(st.integers(0, n))]
            msgs.extend(
                {"role": "tool", "tool_call_id": i, "content": draw(_text)} for i in answered
            )
        else:
            msgs.append({"role": kind, "content": draw(_text)})
    return msgs


@settings(max_examples=300, deadline=None)
@given(_conversation(), st.sampled_from([FLASH, G3]))
def test_property_any_conversation_maps_validly(msgs: list[dict[str, Any]], model: str) -> None:
    req = decode_chat(orjson.dumps({"model": "m", "messages": msgs}))
    try:
        call = chat_to_gemini(req, model)
    except BadRequest as e:
        assert e.param == "messages"  # only possible failure: nothing to send
        assert all(not m.get("content") and not m.get("tool_calls") for m in msgs)
        return
    contents = call.body["contents"]
    raw = gemini_body(call)
    assert orjson.loads(raw) == call.body
    for c in contents:
        assert c["role"] in ("user", "model")
        assert c["parts"]
        assert all(p != {"text": ""} for p in c["parts"])
    for a, b in itertools.pairwise(contents):
        assert a["role"] != b["role"]  # merged: roles alternate
    for i, c in enumerate(contents):
        calls = [p for p in c["parts"] if "functionCall" in p]
        if c["role"] == "model" and calls and i + 1 < len(contents):
            nxt = contents[i + 1]["parts"]
            responses = [p["functionResponse"]["name"] for p in nxt if "functionResponse" in p]
            assert responses == [p["functionCall"]["name"] for p in calls]
        if c["role"] == "user":
            if i == 0 or not any("functionCall" in p for p in contents[i - 1]["parts"]):
                assert not any("functionResponse" in p for p in c["parts"])
        signed = [p for p in calls if "thoughtSignature" in p]
        for p in signed:
            assert p["thoughtSignature"] != SKIP_SIGNATURE or p is calls[0]


def test_reasoning_item_after_the_call_still_signs_it() -> None:
    items = [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {
            "type": "reasoning",
            "summary": [],
            "encrypted_content": pack_reasoning({"call_1": "QQ"}, None),
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "1"},
    ]
    b = resp_call(G3, input=items).body
    assert b["contents"][1]["parts"][0]["thoughtSignature"] == "QQ"


@st.composite
def _responses_input(draw: st.DrawFn) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    counter = 0
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["user", "developer", "assistant", "reasoning", "calls"]))
        if kind == "calls":
            ids = []
            sigs = {}
            for _ in range(draw(st.integers(1, 3))):
                counter += 1
                cid = f"call_{counter}"
                ids.append(cid)
                if draw(st.booleans()):
                    sigs[cid] = base64.b64encode(b"s%d" % counter).decode()
                custom = draw(st.booleans())
                items.append(
                    {"type": "custom_tool_call", "call_id": cid, "name": "p", "input": "x"}
                    if custom
                    else {"type": "function_call", "call_id": cid, "name": "f", "arguments": "{}"}
                )
            if sigs:
                blob = pack_reasoning(sigs, None)
                items.insert(
                    len(items) - len(ids), {"type": "reasoning", "encrypted_content": blob}
                )
            answered = draw(st.permutations(ids))[: draw(st.integers(0, len(ids)))]
            items.extend(
                {"type": "function_call_output", "call_id": i, "output": draw(_text)}
                for i in answered
            )
        elif kind == "reasoning":
            items.append({"type": "reasoning", "summary": [], "encrypted_content": draw(_text)})
        else:
            items.append({"type": "message", "role": kind, "content": draw(_text)})
    return items


@settings(max_examples=300, deadline=None)
@given(_responses_input(), st.sampled_from([FLASH, G3]))
def test_property_any_responses_input_maps_validly(items: list[dict[str, Any]], model: str) -> None:
    req = decode_responses(orjson.dumps({"model": "m", "input": items}))
    try:
        call = responses_to_gemini(req, model)
    except BadRequest as e:
        assert e.param == "input"
        return
    contents = call.body["contents"]
    assert orjson.loads(gemini_body(call)) == call.body
    for a, b in itertools.pairwise(contents):
        assert a["role"] != b["role"]
    for i, c in enumerate(contents):
        calls = [p for p in c["parts"] if "functionCall" in p]
        if calls and i + 1 < len(contents):
            nxt = contents[i + 1]["parts"]
            assert len([p for p in nxt if "functionResponse" in p]) == len(calls)
        active = all(
            not any("text" in p for p in later["parts"])
            for later in contents[i + 1 :]
            if later["role"] == "user"
        )
        if model == G3 and calls and active:
            assert "thoughtSignature" in calls[0]
    assert call.input_items == [{k: v for k, v in it.items()} for it in msgspec_items(items)]


def msgspec_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [it if "type" in it else {**it, "type": "message"} for it in items]
