"""Structured fuzz of the three OpenAI routes through the whole gateway (in memory on the client
side, the real emulator upstream): whatever the body, the answer is a 2xx or an OpenAI-shaped
4xx/5xx from the upstream's own words, never a 500 from rawgate."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers_app import call
from tests.helpers_gateway import gateway_stack

pytestmark = pytest.mark.anyio

ROLES = ["system", "developer", "user", "user", "user", "assistant", "assistant", "tool"]
WILD_ROLES = ["function", "bogus", None, 3]
WILD = 0.08  # share of deliberately wrong values: most examples must reach the upstream
SCALARS: list[Any] = [None, True, 0, -1, 2**70, 1.5, "", "x", "\u00e9\u20ac\U0001f600", [], {}]


def _scalar(r: random.Random) -> Any:
    return r.choice(SCALARS)


def _part(r: random.Random) -> Any:
    kinds = ["text", "text", "text", "image_url", "input_audio", "file"]
    kind = r.choice(["input_text", "weird", None] if r.random() < WILD else kinds)
    p: dict[str, Any] = {"type": kind}
    if kind in ("text", "input_text"):
        p["text"] = _scalar(r) if r.random() < WILD else r.choice(["hello", "a\u00e9\U0001f600"])
    elif kind == "image_url":
        p["image_url"] = r.choice(
            [{"url": "data:image/png;base64,iVBORw0KGgo="}, {"url": "https://x.test/a.jpg"},
             {"url": "file:///etc/passwd"}, {"url": "data:,"}, "notadict", {"url": _scalar(r)}]
        )  # fmt: skip
    elif kind == "input_audio":
        p["input_audio"] = {"data": r.choice(["AAAA", "", 5]), "format": r.choice(["wav", "x"])}
    elif kind == "file":
        p["file"] = r.choice([{"file_data": "data:application/pdf;base64,JVBE"}, {"file_id": "f"}])
    return p


def _content(r: random.Random) -> Any:
    if r.random() < WILD:
        return r.choice(["", None, _scalar(r)])
    return r.choice(["hi there", "tell me more", [_part(r) for _ in range(r.randint(1, 3))]])


def _tool(r: random.Random) -> Any:
    params = r.choice(
        [{"type": "object", "properties": {"a": {"type": "string"}}},
         {"type": "object", "properties": {}, "additionalProperties": False},
         {"$ref": "#/$defs/x", "$defs": {"x": {"type": "object"}}}, {"type": ["string", "null"]},
         None, "str", {"anyOf": [{"type": "string"}, {"type": "integer"}]}]
    )  # fmt: skip
    fn: dict[str, Any] = {"name": r.choice(["get_weather", "", "a b", "x" * 80, 7])}
    if params is not None:
        fn["parameters"] = params
    return r.choice([{"type": "function", "function": fn}, {"type": "custom", "name": "c"}, fn])


def _message(r: random.Random) -> Any:
    role = r.choice(WILD_ROLES if r.random() < WILD else ROLES)
    m: dict[str, Any] = {"role": role, "content": _content(r)}
    if r.random() < 0.2:
        m["tool_calls"] = [
            {"id": r.choice(["call_1", "", None]), "type": "function",
             "function": {"name": "get_weather", "arguments": r.choice(['{"a":1}', "{bad", "", 5])}}
        ]  # fmt: skip
    if r.random() < 0.15:
        m["tool_call_id"] = r.choice(["call_1", "nope", 3])
    return m if r.random() > WILD / 4 else _scalar(r)


def chat_body(r: random.Random) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": r.choice(["", "nope-model", 5])
        if r.random() < WILD
        else r.choice(["gpt-4o", "gemini-2.5-flash", "gemini-3-flash", "o3", "gemini-2.5-pro"]),
        "messages": [{"role": "user", "content": "start"}]
        + [_message(r) for _ in range(r.randint(0, 4))],
    }
    options: dict[str, list[Any]] = {
        "stream": [True, False],
        "temperature": [0.2, 1.0, 2.0],
        "max_tokens": [5, 64, 2**40],
        "n": [1, 2],
        "stop": ["x", ["a", "b"]],
        "tools": [[_tool(r)], [_tool(r), _tool(r)]],
        "tool_choice": [
            "auto",
            "none",
            "required",
            {"type": "function", "function": {"name": "z"}},
        ],
        "response_format": [
            {"type": "json_object"},
            {"type": "text"},
            {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}},
        ],
        "reasoning_effort": ["low", "high", "minimal", "none"],
        "stream_options": [{"include_usage": True}],
        "seed": [1, 7],
    }
    for key, values in options.items():
        if r.random() < 0.25:
            b[key] = r.choice(values)
    if r.random() < WILD:  # one wrong-typed field
        b[r.choice(["stream", "temperature", "tools", "n"])] = _scalar(r)
    return b


def responses_body(r: random.Random) -> dict[str, Any]:
    def item() -> Any:
        return r.choice(
            [{"role": "user", "content": _content(r)},
             {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "ok"}]},
             {"type": "function_call", "call_id": "c1", "name": "get_weather",
              "arguments": r.choice(["{}", "{bad"])},
             {"type": "function_call_output", "call_id": r.choice(["c1", "c9"]), "output": "21"},
             {"type": "reasoning", "encrypted_content": r.choice(["rg1.xx", "garbage", ""]),
              "summary": []},
             {"type": "custom_tool_call_output", "call_id": "c2", "output": "o"},
             {"type": "unknown_item"}, _scalar(r)]
        )  # fmt: skip

    items = [item() for _ in range(r.randint(0, 4))]
    b: dict[str, Any] = {
        "model": r.choice(["gpt-5", "gemini-2.5-pro", "gpt-4o", "gemini-3-flash"]),
        "input": r.choice(["", None, 5]) if r.random() < WILD else r.choice([items, "just text"]),
    }
    options: dict[str, list[Any]] = {
        "instructions": ["be brief", "you are a reviewer"],
        "stream": [True, False],
        "tools": [[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
                  [{"type": "web_search"}], [{"type": "namespace", "name": "ns", "tools": []}],
                  [{"type": "custom", "name": "apply_patch"}], [{"type": "weird"}]],
        "reasoning": [{"effort": "high"}, {"effort": "low"}, {"summary": "auto"}],
        "text": [{"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
                 {"format": {"type": "text"}}],
        "max_output_tokens": [16, 200],
        "store": [False, True],
        "include": [["reasoning.encrypted_content"]],
    }  # fmt: skip
    for key, values in options.items():
        if r.random() < 0.3:
            b[key] = r.choice(values)
    return b


def completion_body(r: random.Random) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": "gpt-4o",
        "prompt": r.choice([["a", "b"], [], [1, 2], None, ""])
        if r.random() < WILD
        else r.choice(["say", ["only one"], "with \u00e9"]),
    }
    options: dict[str, list[Any]] = {"echo": [True], "n": [2, 1], "stream": [True], "user": ["u"]}
    for key, values in options.items():
        if r.random() < 0.3:
            b[key] = r.choice(values)
    return b


@pytest.mark.parametrize(
    ("path", "make"),
    [
        ("/v1/chat/completions", chat_body),
        ("/v1/responses", responses_body),
        ("/v1/completions", completion_body),
    ],
)
async def test_no_body_gets_a_500(tmp_path: Path, path: str, make: Any) -> None:
    r = random.Random(f"fuzz{path}")
    async with gateway_stack(tmp_path) as run:
        for i in range(150):
            body = make(r)
            raw = json.dumps(body).encode()
            sink = await call(
                run.server.app, "POST", path, [("content-type", "application/json")], raw
            )
            where = f"example {i}: {raw[:300]!r}"
            assert sink.status != 500, where + " -> " + sink.body[:500].decode("utf-8", "replace")
            if sink.status >= 400:
                err = orjson.loads(sink.body)["error"]
                assert set(err) == {"message", "type", "param", "code"}, where
                assert err["message"], where
