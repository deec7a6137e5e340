"""The emulator's sans-IO pieces: the directive parser, the reply plan and the wire encoders."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from rawgate.emulator.directives import ScriptError, parse_directives
from rawgate.emulator.script import Options, build_plan, count_tokens, prompt_tokens
from rawgate.emulator.wire import encode_array, encode_sse


def test_parse_values_and_strip() -> None:
    ds, rest = parse_directives('a [[emu:tool_call name=f args={"s":"]]","n":[[1]]}]] b '
                                '[[emu:reply text="say \\"hi\\""]] [[emu:delay ms=2.5]]'
                                "[[emu:error status=429 html=false for=key-1]]")
    assert rest == "a  b"
    assert [d.name for d in ds] == ["tool_call", "reply", "delay", "error"]
    assert ds[0].args == {"name": "f", "args": {"s": "]]", "n": [[1]]}}
    assert ds[1].args == {"text": 'say "hi"'}
    assert ds[2].args == {"ms": 2.5}
    assert ds[3].args == {"status": 429, "html": False, "for": "key-1"}
    assert ds[3].raw == "[[emu:error status=429 html=false for=key-1]]"


def test_text_without_directives_is_untouched() -> None:
    text = "  plain [[not a directive]]  "
    assert parse_directives(text) == ([], text)


@pytest.mark.parametrize(("text", "needle"), [
    ("[[emu:warp]]", "unknown emulator directive 'warp'"),
    ("[[emu:reply texts=1]]", "unknown argument 'texts'"),
    ("[[emu:reply text=1", "not closed"),
    ('[[emu:reply text="open]]', "unterminated JSON"),
    ("[[emu:reply text={bad}]]", "bad JSON value"),
    ("[[emu:reply =1]]", "expected key=value"),
])
def test_parse_errors(text: str, needle: str) -> None:
    with pytest.raises(ScriptError, match=needle):
        parse_directives(text)


def req(text: str, **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], **extra}


def test_token_counts() -> None:
    assert [count_tokens(s) for s in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]
    body = {"contents": [{"role": "user", "parts": [{"text": "abcdefgh"},
                                                    {"inlineData": {"mimeType": "image/png",
                                                                    "data": ""}}]}],
            "systemInstruction": {"parts": [{"text": "abcd"}]}}
    assert prompt_tokens(body) == 2 + 258 + 1


def test_plan_is_deterministic() -> None:
    a = build_plan(req("same text"), "m", Options(), "rid")
    b = build_plan(req("same text"), "m", Options(), "rid")
    assert encode_sse(a.events) == encode_sse(b.events)
    assert orjson.dumps(a.unary) == orjson.dumps(b.unary)


def test_encoders_frame_exactly() -> None:
    events = [{"a": 1}, {"b": 2}]
    assert encode_sse(events) == [b'data: {"a":1}\r\n\r\n', b'data: {"b":2}\r\n\r\n']
    assert encode_sse(events, "t")[0] == b'data: {"response":{"a":1},"traceId":"t"}\r\n\r\n'
    assert encode_array(events) == [b'[{"a":1}', b'\n,\r\n{"b":2}\n]']
    assert b"".join(encode_array([], None, {"error": {}})) == b'[{"error":{}}\n]'
    assert encode_array([]) == [b"[]"]
    err = encode_sse(events[:1], None, {"error": {"code": 503}})
    assert err[1] == b'{\n  "error": {\n    "code": 503\n  }\n}\n'


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=200).filter(lambda t: "[[emu:" not in t and t.strip()),
       st.integers(1, 12), st.integers(0, 9))
def test_stream_chunks_reassemble_to_the_unary_text(text: str, n: int, size: int) -> None:
    plan = build_plan(req(text), "m", Options(chunks=n, chunk_chars=size), "rid")
    streamed = "".join(p["text"] for e in plan.events
                       for p in e["candidates"][0]["content"]["parts"])
    unary = plan.unary["candidates"][0]["content"]["parts"][0]["text"]
    assert streamed == unary == text  # no directive: echoed verbatim
    assert (plan.events[-1]["usageMetadata"]["candidatesTokenCount"]
            == plan.unary["usageMetadata"]["candidatesTokenCount"] == count_tokens(unary))
    assert len(plan.events) == (-(-len(unary) // size) if size else min(n, len(unary)))
