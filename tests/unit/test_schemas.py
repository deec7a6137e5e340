"""Request decoding: realistic bodies decode, every bad input is a BadRequest naming its field,
and no input whatsoever produces any other exception (hypothesis fuzz)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rawgate.errors import BadRequest
from rawgate.translate.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponsesRequest,
    decode_chat,
    decode_completion,
    decode_responses,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "requests"
OK_CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


def _err(fn: Any, body: bytes, **kw: Any) -> BadRequest:
    with pytest.raises(BadRequest) as ei:
        fn(body, **kw)
    e = ei.value
    assert e.status == 400
    assert e.type == "invalid_request_error"
    assert e.message
    return e


# ---- good bodies -----------------------------------------------------------------------------


def test_full_chat_body_decodes_with_unknown_fields() -> None:
    req = decode_chat((DATA / "chat_full.json").read_bytes())
    assert isinstance(req, ChatCompletionRequest)
    assert req.max_completion_tokens == 1000
    assert req.stream_options is not None and req.stream_options.include_usage
    assert req.reasoning_effort == "high"
    assert req.stop == ["###"]
    user = req.messages[2]
    assert isinstance(user.content, list)
    assert [p.type for p in user.content] == [
        "text",
        "image_url",
        "image_url",
        "input_audio",
        "file",
    ]
    assert req.messages[3].tool_calls is not None
    assert req.messages[3].reasoning_content == "thinking..."


def test_codex_body_decodes() -> None:
    req = decode_responses((DATA / "codex_turn.json").read_bytes())
    assert isinstance(req, ResponsesRequest)
    assert isinstance(req.input, list)
    assert [i.type for i in req.input][-3:] == [
        "custom_tool_call",
        "custom_tool_call_output",
        "message",
    ]
    assert req.tools is not None and req.tools[2].tools is not None
    assert req.store is False
    assert req.reasoning is not None and req.reasoning.effort == "medium"


def test_codex_null_reasoning_and_empty_include() -> None:
    req = decode_responses(b'{"model":"m","input":"hi","reasoning":null,"include":[]}')
    assert req.reasoning is None and req.include == []


def test_easy_input_message_without_type() -> None:
    req = decode_responses(b'{"model":"m","input":[{"role":"user","content":"hi"}]}')
    assert isinstance(req.input, list) and req.input[0].type is None


@pytest.mark.parametrize("prompt", [b'"hello"', b'["hello"]', b'["a","b"]'])
def test_completion_prompt_forms(prompt: bytes) -> None:
    req = decode_completion(b'{"model":"m","prompt":' + prompt + b"}")
    assert isinstance(req, CompletionRequest)


def test_stop_string_or_list() -> None:
    assert decode_chat(OK_CHAT[:-1] + b',"stop":"x"}').stop == "x"
    assert decode_chat(OK_CHAT[:-1] + b',"stop":["x","y"]}').stop == ["x", "y"]


def test_big_numbers_inside_strings_are_fine() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"12345678901234567890123"}]}'
    assert decode_chat(body).messages[0].content == "12345678901234567890123"


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"' + b"[{" * 500 + b'"}]}'
    assert decode_chat(body).messages[0].content == "[{" * 500


def test_depth_exactly_at_limit_is_accepted() -> None:
    # the body object is level 1; tools[] 2; tool 3; function 4; parameters 5; ...
    inner = b"[" * 10 + b"]" * 10
    body = OK_CHAT[:-1] + b',"metadata_x":' + inner + b"}"
    assert decode_chat(body, max_depth=11).model == "m"
    e = _err(decode_chat, body, max_depth=10)
    assert "nests deeper" in e.message


# ---- the error matrix ------------------------------------------------------------------------

CHAT_ERRORS: list[tuple[bytes, str | None]] = [
    (b"", None),
    (b"   ", None),
    (b"[]", None),
    (b'"str"', None),
    (b"null", None),
    (b"{", None),
    (b'{"model":"m"', None),
    (b'{"model":"m","messages":[]', None),
    (b"\xff\xfe{}", None),
    (b'{"model":"m","messages":[{"role":"user","content":"\xc3"}]}', None),
    (b'{"messages":[]}', "model"),
    (b'{"model":"m"}', "messages"),
    (b'{"model":5,"messages":[]}', "model"),
    (b'{"model":"m","messages":{}}', "messages"),
    (b'{"model":"m","messages":[{"content":"x"}]}', "messages[0].role"),
    (b'{"model":"m","messages":[{"role":"wizard","content":"x"}]}', "messages[0].role"),
    (b'{"model":"m","messages":[{"role":"user","content":5}]}', "messages[0].content"),
    (
        b'{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user","content":"b"},'
        b'{"role":"user","content":[{"type":"text","text":7}]}]}',
        "messages[2].content[0].text",
    ),
    (
        b'{"model":"m","messages":[{"role":"user","content":[{"text":"x"}]}]}',
        "messages[0].content[0].type",
    ),
    (OK_CHAT[:-1] + b',"temperature":"hot"}', "temperature"),
    (OK_CHAT[:-1] + b',"temperature":3}', "temperature"),
    (OK_CHAT[:-1] + b',"temperature":NaN}', "temperature"),
    (OK_CHAT[:-1] + b',"temperature":Infinity}', "temperature"),
    (OK_CHAT[:-1] + b',"temperature":-Infinity}', "temperature"),
    (OK_CHAT[:-1] + b',"temperature":1e999}', "temperature"),
    (OK_CHAT[:-1] + b',"top_p":1.5}', "top_p"),
    (OK_CHAT[:-1] + b',"n":0}', "n"),
    (OK_CHAT[:-1] + b',"n":1.5}', "n"),
    (OK_CHAT[:-1] + b',"max_tokens":99999999999999999999999}', "max_tokens"),
    (OK_CHAT[:-1] + b',"max_tokens":-1}', "max_tokens"),
    (OK_CHAT[:-1] + b',"seed":99999999999999999999999}', "seed"),
    (OK_CHAT[:-1] + b',"stream":"true"}', "stream"),
    (OK_CHAT[:-1] + b',"stop":[1]}', "stop[0]"),
    (OK_CHAT[:-1] + b',"reasoning_effort":"extreme"}', "reasoning_effort"),
    (OK_CHAT[:-1] + b',"tool_choice":"sometimes"}', "tool_choice"),
    (
        OK_CHAT[:-1] + b',"tools":[{"type":"function","function":{"description":"x"}}]}',
        "tools[0].function.name",
    ),
    (
        OK_CHAT[:-1]
        + b',"tools":[{"type":"function","function":{"name":"f",'
        + b'"parameters":{"x":123456789012345678901234}}}]}',
        "tools[0].function.parameters.x",
    ),
    (
        OK_CHAT[:-1]
        + b',"tools":[{"type":"function","function":{"name":"f",'
        + b'"parameters":{"x":[-99999999999999999999]}}}]}',
        "tools[0].function.parameters.x[0]",
    ),
    (b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}', "messages[0].content"),
    (
        b'{"model":"m","messages":[{"role":"user","content":"ok \\udc00 no"}]}',
        "messages[0].content",
    ),
    (
        b'{"model":"m","messages":[{"role":"user","content":"\\ud800\\u0041"}]}',
        "messages[0].content",
    ),
    (OK_CHAT[:-1] + b',"x":' + b"[" * 65 + b"]" * 65 + b"}", None),
    (OK_CHAT[:-1] + b',"x":' + b"[" * 100000 + b"]" * 100000 + b"}", None),
    (OK_CHAT[:-1] + b',"x":' + b'{"a":' * 200 + b"1" + b"}" * 200 + b"}", None),
]


@pytest.mark.parametrize(("body", "param"), CHAT_ERRORS)
def test_chat_error_matrix(body: bytes, param: str | None) -> None:
    e = _err(decode_chat, body)
    assert e.param == param, e.message


def test_error_messages_do_not_echo_huge_bodies() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":' + b"7" * 100000 + b"}]}"
    e = _err(decode_chat, body)
    assert e.param == "messages[0].content"
    assert len(e.message) < 300


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model":"m"}', "prompt"),
        (b'{"model":"m","prompt":[1,2,3]}', "prompt[0]"),
        (b'{"model":"m","prompt":[[1,2]]}', "prompt[0]"),
        (b'{"model":"m","prompt":"x","echo":1}', "echo"),
        (b'{"model":"m","prompt":"x","logprobs":true}', "logprobs"),
        (b'{"model":"m","prompt":"x","best_of":0}', "best_of"),
    ],
)
def test_completion_error_matrix(body: bytes, param: str) -> None:
    assert _err(decode_completion, body).param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"input":"x"}', "model"),
        (b'{"model":"m","input":5}', "input"),
        (b'{"model":"m","input":[5]}', "input[0]"),
        (
            b'{"model":"m","input":[{"type":"message","role":"user","content":5}]}',
            "input[0].content",
        ),
        (b'{"model":"m","input":"x","tools":[{"name":"f"}]}', "tools[0].type"),
        (
            b'{"model":"m","input":"x","tools":[{"type":"namespace","tools":[{"type":1}]}]}',
            "tools[0].tools[0].type",
        ),
        (b'{"model":"m","input":"x","reasoning":{"effort":"huge"}}', "reasoning.effort"),
        (b'{"model":"m","input":"x","max_output_tokens":0}', "max_output_tokens"),
        (b'{"model":"m","input":"x","metadata":{"a":1}}', "metadata"),
        (b'{"model":"m","input":"x","store":"no"}', "store"),
        (b'{"model":"m","input":"x","text":{"format":{"type":5}}}', "text.format.type"),
    ],
)
def test_responses_error_matrix(body: bytes, param: str) -> None:
    assert _err(decode_responses, body).param == param


# ---- fuzzing: BadRequest or success, nothing else ---------------------------------------------

DECODERS = [decode_chat, decode_completion, decode_responses]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.sampled_from(DECODERS))
def test_fuzz_arbitrary_bytes(body: bytes, fn: Any) -> None:
    try:
        fn(body)
    except BadRequest as e:
        assert e.status == 400


_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_json = st.recursive(
    _json_leaf,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=20,
)
_FIELDS = [
    "model", "messages", "prompt", "input", "tools", "tool_choice", "temperature", "n", "stop",
    "stream", "stream_options", "response_format", "reasoning", "text", "instructions", "seed",
    "max_tokens", "metadata", "reasoning_effort", "functions", "function_call", "include",
]  # fmt: skip
_MSG_FIELDS = ["role", "content", "tool_calls", "tool_call_id", "name", "type", "call_id", "output"]


@st.composite
def _wrong_typed(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": draw(st.sampled_from(["m", 1, None]))}
    for f in draw(st.lists(st.sampled_from(_FIELDS), max_size=6)):
        body[f] = draw(_json)
    if draw(st.booleans()):
        msgs = draw(
            st.lists(
                st.dictionaries(
                    st.sampled_from(_MSG_FIELDS),
                    _json
                    | st.sampled_from(
                        [
                            "user",
                            "assistant",
                            "tool",
                            "system",
                            "text",
                            "image_url",
                            "function_call",
                        ]
                    ),
                    max_size=5,
                ),
                max_size=4,
            )
        )
        body["messages"] = msgs
        body["input"] = msgs
    return body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_wrong_typed(), st.sampled_from(DECODERS))
def test_fuzz_structurally_valid_wrong_types(body: dict[str, Any], fn: Any) -> None:
    try:
        raw = orjson.dumps(body)
    except TypeError:  # ints beyond 64 bits: write them by hand
        import json

        raw = json.dumps(body).encode()
    try:
        req = fn(raw)
    except BadRequest as e:
        assert e.status == 400
        return
    # whatever decoded must be safe to re-encode (the store saves Responses input)
    import msgspec

    orjson.dumps(msgspec.to_builtins(req))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.integers(min_value=0, max_value=60))
def test_fuzz_mutated_valid_body(noise: bytes, at: int) -> None:
    body = OK_CHAT[:at] + noise + OK_CHAT[at:]
    try:
        decode_chat(body)
    except BadRequest:
        pass


def _depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((_depth(x) for x in v), default=0)
    return 0


_tricky_text = st.text(alphabet='[]{}"\\abnu/\n\x01\u00bf', max_size=12)
_nested = st.recursive(
    st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | _tricky_text,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_tricky_text, kids, max_size=3),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(_nested, st.integers(min_value=0, max_value=8))
def test_depth_check_is_exact(value: Any, limit: int) -> None:
    from rawgate.translate.schemas import _too_deep

    body = orjson.dumps(value)
    assert _too_deep(body, limit) == (_depth(value) > limit)
