"""rawgate.translate.transcode_chat: Chat and legacy Completions, streamed and whole, checked rule
by rule and through the official openai SDK (raw iteration, the strict `chat.completions.stream()`
helper, AsyncOpenAI, error events), all without sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from hypothesis import given, settings, strategies as st
from openai.types.chat import ChatCompletionMessageParam

from rawgate.errors import RateLimited, UpstreamError, UpstreamProtocolError
from rawgate.translate.contract import TokenUsage
from rawgate.translate.gemini import decode_reply
from rawgate.translate.signatures import split_call_id
from rawgate.translate.transcode_chat import ChatStream, chat_response, completion_response
from tests.unit.test_transcode_golden import (
    CASES,
    async_sdk,
    case,
    case_call,
    make_call,
    run_stream,
    run_whole,
    sdk,
    upstream,
)

pytestmark = pytest.mark.anyio

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}


def chat_call(model: str = "gemini-2.5-flash", **body: Any) -> Any:
    body.setdefault("model", "gpt-4o")
    body.setdefault("messages", HI)
    return make_call("chat", body, model)


def sse(*replies: dict[str, Any]) -> list[bytes]:
    return [b"data: " + orjson.dumps(r) + b"\r\n\r\n" for r in replies]


def frames(out: bytes) -> list[Any]:
    """The JSON of each data: frame ("[DONE]" kept as a string)."""
    got: list[Any] = []
    for block in out.split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: ") and b"\n" not in block, block
        payload = block[6:]
        got.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return got


def text_chunk(text: str, **cand: Any) -> dict[str, Any]:
    return {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, **cand}]}


# ---- stream rules -------------------------------------------------------------------------------


def test_role_once_then_deltas_then_finish() -> None:
    out = frames(
        run_stream(
            chat_call(stream=True), sse(text_chunk("a"), text_chunk("b", finishReason="STOP"))
        )
    )
    deltas = [f["choices"][0]["delta"] for f in out[:-1]]
    assert deltas == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "a"},
        {"content": "b"},
        {},
    ]
    assert out[-2]["choices"][0]["finish_reason"] == "stop"
    assert out[-1] == "[DONE]"
    assert len({f["id"] for f in out[:-1]}) == 1 and len({f["created"] for f in out[:-1]}) == 1
    assert all("usage" not in f for f in out[:-1])  # no include_usage: no usage key at all


def test_no_event_lines_ever() -> None:
    for c in CASES:
        if c["api"] != "responses" and str(c["upstream"]).endswith(".sse"):
            assert b"event:" not in run_stream(case_call(c), [upstream(c)])


def test_several_parts_in_one_chunk_coalesce_by_kind() -> None:
    parts = [
        {"text": "t1", "thought": True},
        {"text": "t2", "thought": True},
        {"text": "a"},
        {"text": ""},
        {"text": "b"},
    ]
    chunk = {"candidates": [{"content": {"parts": parts}, "finishReason": "STOP"}]}
    out = frames(run_stream(chat_call(stream=True), sse(chunk)))
    assert [f["choices"][0]["delta"] for f in out[1:-1]] == [
        {"reasoning_content": "t1t2"},
        {"content": "ab"},
        {},
    ]


def test_tool_names_come_back_as_declared() -> None:
    tool = {"type": "function", "function": {"name": "my tool!", "parameters": {"type": "object"}}}
    call = chat_call(stream=True, tools=[tool])
    (gname,) = call.tools
    assert gname != "my tool!"
    chunk = {
        "candidates": [
            {
                "content": {"parts": [{"functionCall": {"name": gname, "args": {"x": 1}}}]},
                "finishReason": "STOP",
            }
        ]
    }
    out = frames(run_stream(call, sse(chunk)))
    tc = out[1]["choices"][0]["delta"]["tool_calls"][0]
    assert tc["function"] == {"name": "my tool!", "arguments": '{"x":1}'}
    whole = orjson.loads(chat_response(call, decode_reply(orjson.dumps(chunk))))
    assert whole["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "my tool!"


def test_custom_tool_call_in_chat() -> None:
    tool = {"type": "custom", "custom": {"name": "apply_patch", "description": "patch"}}
    call = chat_call(tools=[tool])
    fc = {"functionCall": {"name": "apply_patch", "args": {"input": "*** Begin Patch"}}}
    reply = decode_reply(
        orjson.dumps({"candidates": [{"content": {"parts": [fc]}, "finishReason": "STOP"}]})
    )
    msg = orjson.loads(chat_response(call, reply))["choices"][0]["message"]
    (tc,) = msg["tool_calls"]
    assert tc["type"] == "custom" and tc["custom"] == {
        "name": "apply_patch",
        "input": "*** Begin Patch",
    }
    assert msg["content"] is None


def test_each_signature_only_on_its_call() -> None:
    parts = [
        {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": "U0lHMQ=="},
        {"functionCall": {"name": "f", "args": {}}},
        {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": "U0lHMg=="},
    ]
    chunk = {"candidates": [{"content": {"parts": parts}, "finishReason": "STOP"}]}
    out = frames(run_stream(chat_call(stream=True), sse(chunk)))
    ids = [f["choices"][0]["delta"]["tool_calls"][0]["id"] for f in out[1:4]]
    assert [split_call_id(i)[1] for i in ids] == ["U0lHMQ==", None, "U0lHMg=="]
    assert len(set(ids)) == 3
    idx = [f["choices"][0]["delta"]["tool_calls"][0]["index"] for f in out[1:4]]
    assert idx == [0, 1, 2]


def test_truncated_stream_is_an_error_not_a_stop() -> None:
    out = frames(run_stream(chat_call(stream=True), sse(text_chunk("partial"))))
    assert out[-1]["error"]["code"] == "upstream_truncated"
    assert "[DONE]" not in out and all(
        f.get("choices", [{}])[0].get("finish_reason") is None for f in out[:-1]
    )


def test_empty_stream_is_an_error() -> None:
    cs = ChatStream(chat_call(stream=True))
    with pytest.raises(UpstreamProtocolError):
        cs.finish()
    assert b'"upstream_truncated"' in cs.fail(cs.error or UpstreamError("x"))


def test_tool_call_without_finish_reason_is_complete() -> None:
    """Code Assist may end a tool turn with no finishReason (GCLI accepts a call as an end)."""
    chunk = {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f"}}]}}]}
    out = frames(run_stream(chat_call(stream=True), sse(chunk)))
    assert out[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    assert out[-1] == "[DONE]"


def test_nothing_after_the_end() -> None:
    cs = ChatStream(chat_call(stream=True))
    cs.feed(decode_reply(orjson.dumps(text_chunk("a", finishReason="STOP"))))
    assert cs.finish().endswith(b"data: [DONE]\n\n")
    assert cs.feed(decode_reply(orjson.dumps(text_chunk("late")))) == b""
    assert cs.finish() == b""
    assert cs.fail(RateLimited("late")) == b""


def test_fail_once() -> None:
    cs = ChatStream(chat_call(stream=True))
    cs.feed(decode_reply(orjson.dumps(text_chunk("a"))))
    first = cs.fail(UpstreamError("boom"))
    assert orjson.loads(first[6:]) == {
        "error": {
            "message": "boom",
            "type": "server_error",
            "param": None,
            "code": "upstream_error",
        }
    }
    assert cs.fail(UpstreamError("again")) == b"" and cs.finish() == b""
    assert cs.feed(decode_reply(orjson.dumps(text_chunk("b")))) == b""


def test_usage_property_keeps_the_last_running_total() -> None:
    cs = ChatStream(chat_call(stream=True))
    assert cs.usage == TokenUsage(0, 0)
    for n in (5, 9, 12):
        chunk = {
            **text_chunk("x"),
            "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": n},
        }
        cs.feed(decode_reply(orjson.dumps(chunk)))
    # The neutral record the gateway counts (translate/contract.py), not Chat's usage dict.
    assert cs.usage == TokenUsage(input=3, output=12)


def test_blocked_prompt_with_n_2_gives_each_choice_a_refusal() -> None:
    call = chat_call(stream=True, n=2)
    out = frames(run_stream(call, sse({"promptFeedback": {"blockReason": "OTHER"}})))
    finishes = [f["choices"][0] for f in out[:-1] if f["choices"][0]["finish_reason"]]
    assert [c["index"] for c in finishes] == [0, 1]
    assert all(c["finish_reason"] == "content_filter" for c in finishes)
    assert (
        sum(
            "refusal" in f["choices"][0]["delta"]
            and f["choices"][0]["delta"]["refusal"] is not None
            for f in out[:-1]
        )
        == 2
    )


def test_late_candidate_after_finish_is_ignored() -> None:
    out = frames(
        run_stream(
            chat_call(stream=True), sse(text_chunk("a", finishReason="STOP"), text_chunk("zzz"))
        )
    )
    assert [f["choices"][0]["delta"] for f in out[1:-1]] == [{"content": "a"}, {}]


# ---- non-stream ---------------------------------------------------------------------------------


def test_non_stream_n2_and_usage() -> None:
    body = {
        "candidates": [
            {"content": {"parts": [{"text": "B"}]}, "finishReason": "MAX_TOKENS", "index": 1},
            {"content": {"parts": [{"text": "A"}]}, "finishReason": "STOP", "index": 0},
        ],
        "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2, "totalTokenCount": 6},
    }
    got = orjson.loads(chat_response(chat_call(n=2), decode_reply(orjson.dumps(body))))
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in got["choices"]] == [
        (0, "A", "stop"),
        (1, "B", "length"),
    ]
    assert got["usage"]["total_tokens"] == 6 and got["object"] == "chat.completion"


def test_non_stream_malformed_call_is_a_502() -> None:
    body = {"candidates": [{"finishReason": "MALFORMED_FUNCTION_CALL", "finishMessage": "bad"}]}
    with pytest.raises(UpstreamError) as ei:
        chat_response(chat_call(), decode_reply(orjson.dumps(body)))
    assert ei.value.status == 502 and ei.value.code == "malformed_function_call"
    assert "MALFORMED_FUNCTION_CALL" in ei.value.message


def test_non_stream_without_candidates_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        chat_response(chat_call(), decode_reply(b'{"usageMetadata": {}}'))


def test_non_stream_empty_answer_is_an_empty_string() -> None:
    body = {"candidates": [{"content": {"parts": [{"text": ""}]}, "finishReason": "STOP"}]}
    msg = orjson.loads(chat_response(chat_call(), decode_reply(orjson.dumps(body))))["choices"][0]
    assert msg["message"]["content"] == "" and msg["finish_reason"] == "stop"


def test_completion_non_stream_echo_and_blocked() -> None:
    call = make_call(
        "completions", {"model": "m", "prompt": "Say", "echo": True}, "gemini-2.5-flash"
    )
    out = orjson.loads(
        completion_response(
            call, decode_reply(orjson.dumps(text_chunk(" hi", finishReason="STOP")))
        )
    )
    assert out["choices"] == [
        {"text": "Say hi", "index": 0, "logprobs": None, "finish_reason": "stop"}
    ]
    blocked = orjson.loads(
        completion_response(call, decode_reply(b'{"promptFeedback":{"blockReason":"SAFETY"}}'))
    )
    assert blocked["choices"][0]["finish_reason"] == "content_filter"


def test_completion_stream_drops_thoughts_and_calls() -> None:
    call = make_call(
        "completions", {"model": "m", "prompt": "p", "stream": True}, "gemini-2.5-flash"
    )
    parts = [{"text": "plan", "thought": True}, {"functionCall": {"name": "f"}}, {"text": "ok"}]
    out = frames(
        run_stream(
            call, sse({"candidates": [{"content": {"parts": parts}, "finishReason": "STOP"}]})
        )
    )
    assert [f["choices"][0]["text"] for f in out[:-1]] == ["ok", ""]
    assert all(f["object"] == "text_completion" for f in out[:-1])


# ---- the official SDK ---------------------------------------------------------------------------

_CHAT_OK = [
    "chat_k9",
    "chat_tools",
    "chat_code_assist",
    "chat_blocked",
    "chat_safety",
    "chat_usage",
    "chat_n2",
    "chat_g3_text",
]


@pytest.mark.parametrize("name", _CHAT_OK)
def test_sdk_raw_iteration(name: str) -> None:
    c = case(name)
    body = run_stream(case_call(c), [upstream(c)])
    with sdk(body) as client:
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=HI, stream=True))
    texts: dict[int, str] = {}
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    expect = {
        "chat_k9": {0: "We"},
        "chat_tools": {0: "Checking both."},
        "chat_code_assist": {0: "Hello — nice to meet you! 👋"},
        "chat_blocked": {0: ""},
        "chat_safety": {0: "Sure, here"},
        "chat_usage": {0: "The answer is forty-two."},
        "chat_n2": {0: "Red apple", 1: "Blue sky"},
        "chat_g3_text": {0: "Café ☕ is open."},
    }[name]
    assert texts == expect
    if c["request"].get("stream_options"):
        assert chunks[-1].choices == [] and chunks[-1].usage is not None


# What the strict helper raises at get_final_completion(), exactly as it does against OpenAI.
_HELPER_RAISES: dict[str, type[Exception]] = {
    "chat_k9": openai.LengthFinishReasonError,
    "chat_blocked": openai.ContentFilterFinishReasonError,
    "chat_safety": openai.ContentFilterFinishReasonError,
}


@pytest.mark.parametrize("name", [n for n in _CHAT_OK if n != "chat_n2"])
def test_sdk_stream_helper(name: str) -> None:
    c = case(name)
    body = run_stream(case_call(c), [upstream(c)])
    with sdk(body) as client, client.chat.completions.stream(model="gpt-4o", messages=HI) as stream:
        events = [e.type for e in stream]
        assert "chunk" in events
        if name in _HELPER_RAISES:
            with pytest.raises(_HELPER_RAISES[name]) as ei:
                stream.get_final_completion()
            final = ei.value.completion  # type: ignore[attr-defined]
        else:
            final = stream.get_final_completion()
    msg = final.choices[0].message
    assert msg.role == "assistant"  # never "assistantassistant"
    if name == "chat_tools":
        calls = msg.tool_calls or []
        assert [tc.function.name for tc in calls] == ["get_weather", "get_weather"]
        assert [orjson.loads(tc.function.arguments) for tc in calls] == [
            {"city": "Paris"},
            {"city": "Rome", "units": "c"},
        ]
        assert "tool_calls.function.arguments.done" in events
        assert final.choices[0].finish_reason == "tool_calls"
    if name == "chat_k9":
        assert (msg.model_extra or {}).get("reasoning_content", "").startswith("**Initiating")
        assert msg.content == "We"
    if name == "chat_blocked":
        assert msg.refusal and msg.refusal.startswith("Gemini blocked the prompt")
    if name == "chat_usage":
        assert final.usage is not None and final.usage.total_tokens == 562


@pytest.mark.parametrize("name", ["chat_error_midstream", "chat_malformed"])
def test_sdk_raises_on_error_events(name: str) -> None:
    c = case(name)
    body = run_stream(case_call(c), [upstream(c)])
    with sdk(body) as client, pytest.raises(openai.APIError) as ei:
        for _ in client.chat.completions.create(model="gpt-4o", messages=HI, stream=True):
            pass
    expect = (
        "The model is overloaded" if name == "chat_error_midstream" else "MALFORMED_FUNCTION_CALL"
    )
    assert expect in ei.value.message


def test_sdk_stream_helper_raises_on_error_events() -> None:
    c = case("chat_error_midstream")
    body = run_stream(case_call(c), [upstream(c)])
    with sdk(body) as client, pytest.raises(openai.APIError):
        with client.chat.completions.stream(model="gpt-4o", messages=HI) as stream:
            for _ in stream:
                pass


async def test_async_sdk() -> None:
    c = case("chat_tools")
    body = run_stream(case_call(c), [upstream(c)])
    async with async_sdk(body) as client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=HI, stream=True)
        n_tools = 0
        async for ch in stream:
            for choice in ch.choices:
                n_tools += len(choice.delta.tool_calls or [])
    assert n_tools == 2


@pytest.mark.parametrize("name", ["chat_k9_nonstream", "chat_tools_nonstream"])
def test_sdk_non_stream(name: str) -> None:
    c = case(name)
    status, _, body = run_whole(case_call(c), upstream(c)).partition(b"\n")
    assert status == b"HTTP 200"
    with sdk(body) as client:
        got = client.chat.completions.create(model="gpt-4o", messages=HI)
    assert got.usage is not None and got.usage.completion_tokens_details is not None
    if name == "chat_tools_nonstream":
        calls = got.choices[0].message.tool_calls or []
        assert [tc.function.arguments for tc in calls] == ['{"city":"Paris"}', "{}"]  # type: ignore[union-attr]
        assert (
            got.usage.prompt_tokens_details and got.usage.prompt_tokens_details.cached_tokens == 32
        )
    else:
        assert got.choices[0].finish_reason == "length"
        assert got.usage.completion_tokens_details.reasoning_tokens == 57


def test_sdk_completions_stream_and_whole() -> None:
    c = case("completions_usage")
    body = run_stream(case_call(c), [upstream(c)])
    with sdk(body) as client:
        chunks = list(client.completions.create(model="m", prompt="p", stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == "The answer is forty-two."
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 562
    c = case("completions_nonstream")
    _, _, body = run_whole(case_call(c), upstream(c)).partition(b"\n")
    with sdk(body) as client:
        got = client.completions.create(model="m", prompt="p")
    assert got.choices[0].text == "We are looking" and got.choices[0].finish_reason == "length"


# ---- properties: any Gemini stream gives a stream the SDK accepts --------------------------------

_PART = st.one_of(
    st.builds(lambda t: {"text": t}, st.text(max_size=12)),
    st.builds(lambda t: {"text": t, "thought": True}, st.text(max_size=12)),
    st.builds(lambda t: {"text": t, "thoughtSignature": "U0lH"}, st.text(max_size=4)),
    st.builds(
        lambda n: {"functionCall": {"name": "get_weather", "args": {"n": n}}},
        st.integers(0, 3),
    ),
)
_REPLY = st.lists(
    st.tuples(st.integers(0, 1), st.lists(_PART, max_size=3)), min_size=1, max_size=3
).map(
    lambda cands: {
        "candidates": [{"index": i, "content": {"parts": p, "role": "model"}} for i, p in cands]
    }
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_REPLY, max_size=5), st.sampled_from([None, "STOP", "MAX_TOKENS", "SAFETY"]))
def test_property_chat_stream_invariants(replies: list[dict[str, Any]], end: str | None) -> None:
    call = chat_call(stream=True, n=2, stream_options={"include_usage": True}, tools=[WEATHER])
    if end is not None:
        replies = [*replies, {"candidates": [{"index": i, "finishReason": end} for i in (0, 1)]}]
    out = run_stream(call, sse(*replies))
    frames_ = frames(out)
    seen: set[int] = set()
    for i in (0, 1):
        mine = [
            f["choices"][0]
            for f in frames_
            if isinstance(f, dict) and f.get("choices") and f["choices"][0]["index"] == i
        ]
        if not mine:
            continue
        seen.add(i)
        assert sum("role" in c["delta"] for c in mine) == 1 and "role" in mine[0]["delta"]
        idx = [tc["index"] for c in mine for tc in c["delta"].get("tool_calls", [])]
        assert idx == list(range(len(idx)))
        assert sum(c["finish_reason"] is not None for c in mine) <= 1
        want = "".join(
            p["text"]
            for r in replies
            for cand in r["candidates"]
            if cand["index"] == i and "content" in cand
            for p in cand["content"]["parts"]
            if "text" in p and not p.get("thought")
        )
        assert "".join(c["delta"].get("content") or "" for c in mine) == want
    if frames_[-1] == "[DONE]":
        assert frames_[-2]["choices"] == [] and frames_[-2]["usage"] is not None
    else:
        assert "error" in frames_[-1]
    with sdk(out) as client:
        try:
            list(client.chat.completions.create(model="m", messages=HI, stream=True))
        except openai.APIError:
            assert "error" in frames_[-1]


# ---- logprobs ------------------------------------------------------------------------------------


def _lp(*tokens: tuple[str, float]) -> dict[str, Any]:
    return {
        "chosenCandidates": [{"token": t, "logProbability": v} for t, v in tokens],
        "topCandidates": [
            {
                "candidates": [
                    {"token": t, "logProbability": v},
                    {"token": t + "?", "logProbability": v - 1},
                ]
            }
            for t, v in tokens
        ],
    }


def test_stream_logprobs_ride_on_the_text_frame_not_the_thought() -> None:
    call = chat_call(logprobs=True, top_logprobs=1, reasoning_effort="low")
    cs = ChatStream(call)
    chunk = {
        "candidates": [
            {
                "content": {"parts": [{"text": "hmm", "thought": True}, {"text": "Hi!"}]},
                "index": 0,
                "logprobsResult": _lp(("Hi", -0.5), ("!", -0.25)),
            }
        ]
    }
    got = frames(cs.feed(decode_reply(orjson.dumps(chunk))))
    by_kind = {next(iter(f["choices"][0]["delta"]), ""): f["choices"][0]["logprobs"] for f in got}
    assert by_kind["role"] is None and by_kind["reasoning_content"] is None
    assert by_kind["content"] == {
        "content": [
            {"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
             "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]},
            {"token": "!", "logprob": -0.25, "bytes": [33],
             "top_logprobs": [{"token": "!", "logprob": -0.25, "bytes": [33]}]},
        ],
        "refusal": None,
    }
    # A chunk without a logprobsResult says null, even though the call asked.
    nxt = {"candidates": [{"content": {"parts": [{"text": " more"}]}, "index": 0}]}
    (f,) = frames(cs.feed(decode_reply(orjson.dumps(nxt))))
    assert f["choices"][0]["logprobs"] is None


def test_logprobs_not_asked_stay_null_even_if_gemini_sends_them() -> None:
    reply = {
        "candidates": [
            {"content": {"parts": [{"text": "Hi"}]}, "finishReason": "STOP", "index": 0,
             "logprobsResult": _lp(("Hi", -0.5))}
        ]
    }
    doc = orjson.loads(chat_response(chat_call(), decode_reply(orjson.dumps(reply))))
    assert doc["choices"][0]["logprobs"] is None
    got = frames(ChatStream(chat_call()).feed(decode_reply(orjson.dumps(reply))))
    assert [f["choices"][0]["logprobs"] for f in got] == [None] * len(got)


def test_injected_clock_and_ids_make_replies_deterministic() -> None:
    """chat_response with the clock and id factory injected (translate/contract.py): the id,
    `created` and the tool-call ids come from them, so two renderings are byte-identical."""
    data = Path(__file__).resolve().parents[1] / "data" / "gemini" / "tools_nonstream.json"
    reply = decode_reply(data.read_bytes())
    reply.responseId = None  # the id then comes from the factory

    def render() -> bytes:
        seq = iter(range(100))
        return chat_response(
            chat_call(),
            reply,
            lambda: 1_700_000_000.0,
            lambda prefix, digits: f"{prefix}{next(seq):0{digits}d}",
        )

    first = render()
    assert first == render()
    doc = orjson.loads(first)
    calls = doc["choices"][0]["message"]["tool_calls"]
    assert calls and all(c["id"].startswith("call_") for c in calls)
    # The tool-call ids took the first numbers of the sequence, the response id the next one.
    assert doc["id"] == f"chatcmpl-{len(calls):032d}" and doc["created"] == 1_700_000_000
