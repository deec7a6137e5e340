"""Anthropic Messages request -> Gemini (rawgate/map_messages.py): protocols-2.md vectors 4-8,
what Claude Code sends (B1/B2), every mapped body accepted by the emulator's Google-like checks."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from rawgate.emulator.models import CATALOG
from rawgate.emulator.validate import Invalid, validate_request
from rawgate.errors import BadRequest
from rawgate.translate.gemini import decode_reply
from rawgate.translate.map_messages import decode_messages, messages_to_gemini
from rawgate.translate.signatures import SKIP_SIGNATURE
from rawgate.translate.sigtag import SignatureTagger
from rawgate.translate.transcode_messages import MessagesOptions, messages_response

SIG = SignatureTagger(b"s" * 32)
PRO3 = "gemini-3-pro-preview"
FLASH = "gemini-2.5-flash"
BASH = {
    "name": "Bash",
    "description": "Run a command",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"command": {"type": "string", "maxLength": 1000}},
        "required": ["command"],
        "additionalProperties": False,
    },
}


def _map(doc: dict[str, Any], model: str = PRO3) -> tuple[dict[str, Any], MessagesOptions]:
    doc = {"model": "claude-sonnet-5-5", "max_tokens": 1024, **doc}
    call, opts = messages_to_gemini(decode_messages(orjson.dumps(doc)), model, SIG)
    try:
        validate_request(orjson.loads(orjson.dumps(call.body)), CATALOG[model])
    except Invalid as e:  # pragma: no cover - the failure message is the point
        pytest.fail(f"Google would reject the mapped body: {e.violations}")
    return call.body, opts


def test_vector4_tool_result_gets_its_name_and_signature_back() -> None:
    tid = SIG.tool_id(PRO3, "U0lHX0E=")
    body, _ = _map(
        {
            "tools": [BASH],
            "messages": [
                {"role": "user", "content": "list"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": tid, "name": "Bash", "input": {"command": "ls"}}
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": tid,
                            "content": [
                                {"type": "text", "text": "a"},
                                {"type": "text", "text": "b"},
                            ],
                            "is_error": True,
                        }
                    ],
                },
            ],
        }
    )
    model_turn, result_turn = body["contents"][1], body["contents"][2]
    assert model_turn == {
        "role": "model",
        "parts": [
            {
                "functionCall": {"name": "Bash", "args": {"command": "ls"}},
                "thoughtSignature": "U0lHX0E=",
            }
        ],
    }
    assert result_turn["parts"] == [
        {"functionResponse": {"name": "Bash", "response": {"error": "a\nb"}}}
    ]
    # the schema went through the cleaner ($schema and additionalProperties are gone)
    params = body["tools"][0]["functionDeclarations"][0]["parameters"]
    assert "$schema" not in orjson.dumps(params).decode() and "additionalProperties" not in params


def test_vector5_unknown_or_foreign_signature_never_reaches_google() -> None:
    foreign = "toolu_01A09q90qw90lq917835lq9"
    other_model = SIG.tool_id("gemini-3-flash-preview", "T1RIRVI=")
    for tid in (foreign, other_model):
        body, _ = _map(
            {
                "tools": [BASH],
                "messages": [
                    {"role": "user", "content": "go"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "x", "signature": "EqQBCkgIARAB"},
                            {
                                "type": "tool_use",
                                "id": tid,
                                "name": "Bash",
                                "input": {"command": "ls"},
                            },
                        ],
                    },
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": tid, "content": "ok"}],
                    },
                ],
            }
        )
        part = body["contents"][1]["parts"][0]
        assert part["thoughtSignature"] == SKIP_SIGNATURE
        assert (
            "EqQB" not in orjson.dumps(body).decode()
            and "T1RIRVI=" not in orjson.dumps(body).decode()
        )


def test_vector6_mid_conversation_system_and_billing_block() -> None:
    body, _ = _map(
        {
            "system": [
                {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.0b8;"},
                {
                    "type": "text",
                    "text": "You are Claude Code.",
                    "cache_control": {"type": "ephemeral"},
                },
            ],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "system", "content": "# Environment\nX"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "go"},
            ],
        }
    )
    assert body["systemInstruction"] == {"parts": [{"text": "You are Claude Code."}]}
    assert body["contents"][0] == {
        "role": "user",
        "parts": [{"text": "hi"}, {"text": "# Environment\nX"}],
    }
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]


def test_system_message_between_tool_use_and_result_waits_for_the_result() -> None:
    tid = SIG.tool_id(FLASH, None)
    body, _ = _map(
        {
            "tools": [BASH],
            "messages": [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": tid, "name": "Bash", "input": {}}],
                },
                {"role": "system", "content": "reminder"},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": tid, "content": "done"}],
                },
            ],
        },
        FLASH,
    )
    last = body["contents"][-1]["parts"]
    assert "functionResponse" in last[0] and last[-1] == {"text": "reminder"}


def test_vector7_thinking_block_signature_replayed_on_its_turn() -> None:
    wrapped = SIG.wrap(PRO3, "U0lHX1Q=")
    body, _ = _map(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "", "signature": wrapped},
                        {"type": "text", "text": "Done"},
                    ],
                },
                {"role": "user", "content": "more"},
            ]
        }
    )
    assert body["contents"][1]["parts"] == [{"text": "Done", "thoughtSignature": "U0lHX1Q="}]


def test_vector8_max_tokens_clamped_and_claude_code_thinking() -> None:
    body, opts = _map(
        {
            "max_tokens": 128000,
            "thinking": {"type": "adaptive", "display": "omitted"},
            "output_config": {"effort": "medium"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "metadata": {"user_id": '{"device_id":"d"}'},
            "messages": [{"role": "user", "content": "hi"}],
        }
    )
    gen = body["generationConfig"]
    assert gen["maxOutputTokens"] == 65536
    assert gen["thinkingConfig"] == {"thinkingLevel": "HIGH"}  # 3 Pro: medium rounds up
    assert opts.thinking_blocks and not opts.show_thinking


def test_thinking_budget_on_25_and_sampling_knobs() -> None:
    body, opts = _map(
        {
            "thinking": {"type": "enabled", "budget_tokens": 4096},
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 40,
            "stop_sequences": ["###"],
            "messages": [{"role": "user", "content": "hi"}],
        },
        FLASH,
    )
    gen = body["generationConfig"]
    assert gen["thinkingConfig"] == {"thinkingBudget": 1023, "includeThoughts": True}
    assert (gen["temperature"], gen["topP"], gen["topK"], gen["stopSequences"]) == (
        0.7,
        0.9,
        40,
        ["###"],
    )
    assert opts.stop_sequences == ("###",) and opts.show_thinking


def test_tool_choice_forms() -> None:
    base = {"tools": [BASH], "messages": [{"role": "user", "content": "hi"}]}
    body, opts = _map(
        {**base, "tool_choice": {"type": "tool", "name": "Bash", "disable_parallel_tool_use": True}}
    )
    assert body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["Bash"]}
    }
    assert opts.single_tool
    body, _ = _map({**base, "tool_choice": {"type": "none"}})
    assert body["toolConfig"]["functionCallingConfig"]["mode"] == "NONE"
    with pytest.raises(BadRequest) as ei:
        _map({**base, "tool_choice": {"type": "tool", "name": "Nope"}})
    assert ei.value.param == "tool_choice.name"


def test_web_search_alone_becomes_google_search_and_other_server_tools_are_refused() -> None:
    body, _ = _map(
        {
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
            "messages": [
                {"role": "user", "content": "Perform a web search for the query: rawgate"}
            ],
        }
    )
    assert body["tools"] == [{"googleSearch": {}}]
    with pytest.raises(BadRequest, match="combine"):
        _map(
            {
                "tools": [BASH, {"type": "web_search_20250305", "name": "web_search"}],
                "messages": [{"role": "user", "content": "x"}],
            }
        )
    with pytest.raises(BadRequest, match="code_execution"):
        _map(
            {
                "tools": [{"type": "code_execution_20250825", "name": "code_execution"}],
                "messages": [{"role": "user", "content": "x"}],
            }
        )


def test_media_blocks() -> None:
    body, _ = _map(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": "iVBORw0KGgo=",
                            },
                        },
                        {
                            "type": "document",
                            "source": {
                                "type": "base64",
                                "media_type": "application/pdf",
                                "data": "JVBERi0=",
                            },
                        },
                        {
                            "type": "document",
                            "title": "Notes",
                            "source": {"type": "text", "media_type": "text/plain", "data": "abc"},
                        },
                        {
                            "type": "image",
                            "source": {"type": "url", "url": "https://example.com/a.png"},
                        },
                        {"type": "text", "text": "describe"},
                    ],
                }
            ]
        }
    )
    parts = body["contents"][0]["parts"]
    assert parts[0] == {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
    assert parts[1]["inlineData"]["mimeType"] == "application/pdf"
    assert parts[2] == {"text": "Notes\n\nabc"}
    assert parts[3]["fileData"]["fileUri"] == "https://example.com/a.png"


@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": 3}]}, "messages[0].role"),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
        ),
    ],
)
def test_bad_requests_name_the_field(doc: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as ei:
        messages_to_gemini(decode_messages(orjson.dumps(doc)), FLASH, SIG)
    assert ei.value.param == param


def test_unknown_fields_and_blocks_are_ignored() -> None:
    body, _ = _map(
        {
            "service_tier": "auto",
            "container": "x",
            "brand_new_field": {"a": 1},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi", "citations": []}]}
            ],
        }
    )
    assert body["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]


def test_round_trip_through_the_transcoder_keeps_signatures() -> None:
    """A non-stream answer with a signed call, echoed back as Claude Code does, maps back to
    the same functionCall with the same signature."""
    first: dict[str, Any] = {"tools": [BASH], "messages": [{"role": "user", "content": "run ls"}]}
    call, opts = messages_to_gemini(
        decode_messages(orjson.dumps({"model": "c", "max_tokens": 9, **first})), PRO3, SIG
    )
    reply = decode_reply(
        b'{"candidates":[{"content":{"parts":[{"functionCall":{"name":"Bash","args":{"command":"ls"}},'
        b'"thoughtSignature":"R0VNSU5JLVNJRw=="}]},"finishReason":"STOP"}]}'
    )
    msg = orjson.loads(messages_response(call, reply, opts, SIG))
    tid = msg["content"][0]["id"]
    body, _ = _map(
        {
            "tools": [BASH],
            "messages": [
                *first["messages"],
                {"role": "assistant", "content": msg["content"]},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": tid, "content": "a.txt"}],
                },
            ],
        }
    )
    assert body["contents"][1]["parts"][0]["thoughtSignature"] == "R0VNSU5JLVNJRw=="
    assert body["contents"][2]["parts"][0]["functionResponse"]["name"] == "Bash"
