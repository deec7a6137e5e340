"""The twenty tricky vectors of protocols.md section G, one test each (numbered as there).

Request-side vectors 6 and 19 are the tests in test_mapping.py, reused here by reference; vector 7
adds the full round trip (turn 1 through the transcoder, turn 2 through the mapping) to the
mapping test it reuses. Upstream fixtures use Gemini's framing (`data: ...\\r\\n\\r\\n`)."""

from __future__ import annotations

import re
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from rawgate.config import LimitsConfig
from rawgate.translate.gemini import decode_reply, error_from_upstream
from rawgate.translate.signatures import split_call_id, unpack_reasoning
from rawgate.translate.sse import HEARTBEAT, SSEDecoder
from rawgate.translate.transcode_chat import chat_response
from rawgate.translate.transcode_responses import ResponsesStream
from tests.unit.test_mapping import (
    test_vector_6_results_out_of_order_become_one_turn_in_call_order as mapping_vector_6,
    test_vector_7_unknown_calls_get_skip_signature_in_active_loop_only as mapping_vector_7,
    test_vector_19_through_mapping as mapping_vector_19,
)
from tests.unit.test_transcode_golden import make_call, run_stream, sdk
from tests.unit.test_transcode_responses import check_stream, codex_view, events

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
FLASH = "gemini-2.5-flash"
G3 = "gemini-3-pro-preview"
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": WEATHER_PARAMS},
}
R_WEATHER = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMS}


def chat(model: str = FLASH, **body: Any) -> Any:
    return make_call("chat", {"model": "gpt-4o", "messages": HI, "stream": True, **body}, model)


def resp(model: str = FLASH, **body: Any) -> Any:
    return make_call("responses", {"model": "gpt-5", "input": "hi", "stream": True, **body}, model)


def ev(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\r\n\r\n"


def cand(parts: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"index": 0, **kw}
    if parts is not None:
        c["content"] = {"parts": parts, "role": "model"}
    return {"candidates": [c]}


def chat_frames(out: bytes) -> list[Any]:
    blocks = [b for b in out.split(b"\n\n") if b]
    return ["[DONE]" if b == b"data: [DONE]" else orjson.loads(b[6:]) for b in blocks]


def deltas(frames: list[Any]) -> list[dict[str, Any]]:
    return [f["choices"][0]["delta"] for f in frames if isinstance(f, dict) and f.get("choices")]


def content(frames: list[Any]) -> str:
    return "".join(d.get("content") or "" for d in deltas(frames))


STOP = ev(cand([{"text": ""}], finishReason="STOP"))


def test_vector_01_utf8_split_across_reads() -> None:
    first = b'data: {"candidates":[{"content":{"parts":[{"text":"Caf\xc3'
    second = b"\xa9 " + "☕".encode() + b'"}],"role":"model"},"index":0}]}\r\n\r\n'
    out = run_stream(chat(), [first, second + STOP])
    frames = chat_frames(out)
    assert content(frames) == "Café ☕"
    assert "\ufffd" not in out.decode("utf-8")
    assert sum("role" in d for d in deltas(frames)) == 1
    assert frames[-1] == "[DONE]"


def test_vector_02_multi_line_data_event() -> None:
    body = (
        b'data: {\ndata:   "response": {"candidates": [{"content": {"role":"model","parts":'
        b'[{"text":"hi"}]},"finishReason":"STOP"}]},\ndata:   "traceId": "t1"\ndata: }\n\n'
    )
    assert len(SSEDecoder().feed(body)) == 1
    frames = chat_frames(run_stream(chat(), [body]))
    assert content(frames) == "hi" and frames[0]["id"] == "chatcmpl-t1"


def test_vector_03_one_whole_function_call() -> None:
    fc = {"functionCall": {"name": "get_weather", "args": {"city": "Paris", "units": "c"}}}
    out = run_stream(chat(tools=[WEATHER]), [ev(cand([fc], finishReason="STOP"))])
    ds = deltas(chat_frames(out))
    tcs = [tc for d in ds for tc in d.get("tool_calls", [])]
    assert {tc["index"] for tc in tcs} == {0}
    assert sum("id" in tc for tc in tcs) == 1 and re.match(r"^call_", tcs[0]["id"])
    assert sum("type" in tc for tc in tcs) == 1 and tcs[0]["type"] == "function"
    assert sum("name" in tc.get("function", {}) for tc in tcs) == 1
    args = "".join(tc["function"].get("arguments", "") for tc in tcs)
    assert orjson.loads(args) == {"city": "Paris", "units": "c"}
    assert chat_frames(out)[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert sum("role" in d for d in ds) == 1
    with sdk(out) as client, client.chat.completions.stream(model="m", messages=HI) as s:
        final = s.get_final_completion()
    (tc,) = final.choices[0].message.tool_calls or []
    assert tc.function.name == "get_weather"


def test_vector_04_call_with_no_arguments() -> None:
    chunk = ev(cand([{"functionCall": {"name": "list_files"}}], finishReason="STOP"))
    ds = deltas(chat_frames(run_stream(chat(), [chunk])))
    (tc,) = [tc for d in ds for tc in d.get("tool_calls", [])]
    assert tc["function"]["arguments"] == "{}"
    evs = events(run_stream(resp(), [chunk]))
    (done,) = [e for e in evs if e["type"] == "response.function_call_arguments.done"]
    assert done["arguments"] == "{}"


_V5 = [
    ev(
        cand(
            [
                {"text": "Checking both."},
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": "SIG_A",
                },
            ]
        )
    ),
    ev(
        cand(
            [{"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}],
            finishReason="STOP",
        )
    ),
]


def test_vector_05_parallel_calls_split_across_chunks() -> None:
    ds = deltas(chat_frames(run_stream(chat(tools=[WEATHER]), _V5)))
    kinds = ["content" if d.get("content") else "tools" if "tool_calls" in d else "" for d in ds]
    assert kinds.index("content") < kinds.index("tools")
    tcs = [tc for d in ds for tc in d.get("tool_calls", [])]
    assert [tc["index"] for tc in tcs] == [0, 1] and tcs[0]["id"] != tcs[1]["id"]
    assert (
        ds[-1] == {}
        and chat_frames(run_stream(chat(tools=[WEATHER]), _V5))[-2]["choices"][0]["finish_reason"]
        == "tool_calls"
    )

    evs = check_stream(run_stream(resp(tools=[R_WEATHER]), _V5))
    added = [
        (e["output_index"], e["item"]["type"])
        for e in evs
        if e["type"] == "response.output_item.added"
    ]
    assert added == [(0, "message"), (1, "function_call"), (2, "function_call")]
    for i in (1, 2):
        seq = [e["type"] for e in evs if e.get("output_index") == i]
        assert seq == [
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
        ]
        (done,) = [
            e
            for e in evs
            if e["type"] == "response.function_call_arguments.done" and e["output_index"] == i
        ]
        assert done["name"] == "get_weather"
    assert [o["type"] for o in evs[-1]["response"]["output"]] == [
        "message",
        "function_call",
        "function_call",
    ]


def test_vector_06_tool_results_out_of_order() -> None:
    mapping_vector_6()  # tests/unit/test_mapping.py owns the request side


def test_vector_07_thought_signature_round_trip() -> None:
    # Turn 1: the vector-5 stream through the chat transcoder (Gemini 3).
    out = run_stream(chat(G3, tools=[WEATHER]), _V5)
    tcs = [tc for d in deltas(chat_frames(out)) for tc in d.get("tool_calls", [])]
    assert split_call_id(tcs[0]["id"])[1] == "SIG_A" and split_call_id(tcs[1]["id"])[1] is None
    # Turn 2: the client replays the calls with its results.
    history = [
        *HI,
        {
            "role": "assistant",
            "content": "Checking both.",
            "tool_calls": [{k: tc[k] for k in ("id", "type", "function")} for tc in tcs],
        },
        {"role": "tool", "tool_call_id": tcs[1]["id"], "content": "24C"},
        {"role": "tool", "tool_call_id": tcs[0]["id"], "content": "18C"},
    ]
    body = make_call("chat", {"model": "gpt-4o", "messages": history, "tools": [WEATHER]}, G3).body
    model_parts = body["contents"][1]["parts"]
    calls = [p for p in model_parts if "functionCall" in p]
    assert calls[0]["thoughtSignature"] == "SIG_A" and "thoughtSignature" not in calls[1]
    # Calls rawgate never produced: the documented fallback, active loop only.
    mapping_vector_7()


def test_vector_08_thought_parts() -> None:
    chunks = [
        ev(cand([{"text": "Plan: compare.", "thought": True}])),
        ev(
            {
                **cand([{"text": "Answer."}], finishReason="STOP"),
                "usageMetadata": {
                    "promptTokenCount": 5,
                    "candidatesTokenCount": 2,
                    "thoughtsTokenCount": 40,
                },
            }
        ),
    ]
    frames = chat_frames(run_stream(chat(stream_options={"include_usage": True}), chunks))
    ds = deltas(frames)
    r_at = next(i for i, d in enumerate(ds) if d.get("reasoning_content"))
    c_at = next(i for i, d in enumerate(ds) if d.get("content"))
    assert ds[r_at]["reasoning_content"] == "Plan: compare." and r_at < c_at
    assert content(frames) == "Answer."
    assert frames[-2]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 40

    evs = check_stream(run_stream(resp(), chunks))
    first = evs[2]
    assert first["type"] == "response.output_item.added" and first["item"]["type"] == "reasoning"
    assert first["output_index"] == 0
    types = [e["type"] for e in evs]
    assert "response.reasoning_summary_part.added" in types
    (delta,) = [e for e in evs if e["type"] == "response.reasoning_summary_text.delta"]
    assert delta["summary_index"] == 0 and delta["delta"] == "Plan: compare."
    msg = [e for e in evs if e["type"] == "response.output_item.added"][1]
    assert msg["item"]["type"] == "message" and msg["output_index"] == 1


def test_vector_09_empty_and_signature_only_parts() -> None:
    chunks = [
        ev(cand([{"text": "Done."}])),
        ev(cand([{"text": ""}, {"text": "", "thoughtSignature": "SIG_T"}], finishReason="STOP")),
    ]
    ds = deltas(chat_frames(run_stream(chat(), chunks)))
    assert [d for d in ds if d.get("content") == ""] == [ds[0]] and "role" in ds[0]
    evs = check_stream(run_stream(resp(G3), chunks))
    text_deltas = [e["delta"] for e in evs if e["type"] == "response.output_text.delta"]
    assert text_deltas == ["Done."]
    output = evs[-1]["response"]["output"]
    assert output[-1]["content"][0]["text"] == "Done."
    (reasoning,) = [o for o in output if o["type"] == "reasoning"]
    assert unpack_reasoning(reasoning["encrypted_content"]) == {"": "SIG_T"}


_BLOCKED = ev(
    {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 12},
    }
)


def test_vector_10_prompt_blocked() -> None:
    out = run_stream(chat(stream_options={"include_usage": True}), [_BLOCKED])
    frames = chat_frames(out)
    assert deltas(frames)[0] == {"role": "assistant", "content": "", "refusal": None}
    finish = [
        f
        for f in frames
        if isinstance(f, dict) and f["choices"] and f["choices"][0]["finish_reason"]
    ]
    assert len(finish) == 1 and finish[0]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "content_filter",
    }
    usage = frames[-2]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        12,
        0,
        12,
    )
    assert frames[-1] == "[DONE]"
    with sdk(out) as client:
        list(client.chat.completions.create(model="m", messages=HI, stream=True))
    whole = orjson.loads(chat_response(chat(), decode_reply(_BLOCKED[6:-4])))
    choice = whole["choices"][0]
    assert (
        choice["message"]["content"] in ("", None) and choice["finish_reason"] == "content_filter"
    )


def test_vector_11_candidate_safety_after_partial_text() -> None:
    blocked = {
        "candidates": [
            {
                "finishReason": "SAFETY",
                "safetyRatings": [
                    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH", "blocked": True}
                ],
                "index": 0,
            }
        ]
    }
    chunks = [ev(cand([{"text": "Sure, here"}])), ev(blocked)]
    frames = chat_frames(run_stream(chat(), chunks))
    assert content(frames) == "Sure, here"
    assert frames[-2]["choices"][0]["finish_reason"] == "content_filter"
    final = check_stream(run_stream(resp(), chunks))[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {
        "reason": "content_filter"
    }


_K9 = [
    ev(cand([{"text": "**Initiating the Descent**\n\n...", "thought": True}])),
    ev(cand([{"text": "We"}], finishReason="MAX_TOKENS")),
]


def test_vector_12_max_tokens() -> None:
    frames = chat_frames(run_stream(chat(), _K9))
    assert frames[-2]["choices"][0]["finish_reason"] == "length"
    assert content(frames) == "We"
    assert "Descent" in "".join(d.get("reasoning_content") or "" for d in deltas(frames))
    generic = check_stream(run_stream(resp(), _K9, incomplete_event=True))
    assert generic[-1]["type"] == "response.incomplete"
    assert generic[-1]["response"]["incomplete_details"]["reason"] == "max_output_tokens"
    # The default (Codex profile): a terminal event Codex does not retry; status still honest.
    items, end = codex_view(run_stream(resp(), _K9))
    assert end["type"] == "response.completed" and end["response"]["status"] == "incomplete"
    assert items[-1]["content"][0]["text"] == "We"


def test_vector_13_cumulative_usage() -> None:
    def chunk(text: str, cand_tokens: int, total: int, last: bool = False) -> bytes:
        usage = {
            "promptTokenCount": 21,
            "candidatesTokenCount": cand_tokens,
            "thoughtsTokenCount": 481,
            "totalTokenCount": total,
        }
        extra = {"finishReason": "STOP"} if last else {}
        return ev({**cand([{"text": text}], **extra), "usageMetadata": usage})

    chunks = [chunk("a", 15, 517), chunk("b", 43, 545), chunk("c", 60, 562, True)]
    frames = chat_frames(run_stream(chat(stream_options={"include_usage": True}), chunks))
    assert all(f["usage"] is None for f in frames[:-2])
    assert frames[-1] == "[DONE]" and frames[-2]["choices"] == []
    u = frames[-2]["usage"]
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (21, 541, 562)
    assert u["completion_tokens_details"]["reasoning_tokens"] == 481
    assert sum(1 for f in frames if isinstance(f, dict) and f.get("usage")) == 1
    plain = chat_frames(run_stream(chat(), chunks))
    assert all("usage" not in f for f in plain if isinstance(f, dict))


_Q429 = orjson.dumps(
    {
        "error": {
            "code": 429,
            "message": "You exceeded your current quota.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12.5s"}
            ],
        }
    }
)


def test_vector_14_upstream_429_with_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    err = error_from_upstream(429, _Q429, [])
    assert err.status == 429 and dict(err.headers) == {
        b"retry-after-ms": b"12500",
        b"retry-after": b"13",
    }
    body = orjson.loads(err.to_json())["error"]
    assert (body["type"], body["code"], body["param"]) == (
        "rate_limit_error",
        "rate_limit_exceeded",
        None,
    )
    assert "12.5s" in body["message"]
    # OAI-PY raises RateLimitError and its retry sleeps 12.5 s.
    slept: list[float] = []
    monkeypatch.setattr("openai._base_client.time.sleep", slept.append)
    headers = {k.decode(): v.decode() for k, v in err.headers}
    with sdk(err.to_json(), status=429, headers=headers) as client:
        with pytest.raises(openai.RateLimitError):
            client.with_options(max_retries=1).chat.completions.create(model="m", messages=HI)
    assert slept == [12.5]
    # Responses / Codex: HTTP 200 stream with response.failed and "try again in 12.5s".
    rs = ResponsesStream(resp(), "resp_v14")
    evs = check_stream(rs.start() + rs.fail(err))
    error = evs[-1]["response"]["error"]
    assert evs[-1]["type"] == "response.failed" and error["code"] == "rate_limit_exceeded"
    assert re.search(r"(?i)try again in\s*12\.5\s*s", error["message"])


@pytest.mark.parametrize(
    "body",
    [
        b'{"error":{"code":429,"message":"Quota exceeded for metric: x, limit: 0",'
        b'"status":"RESOURCE_EXHAUSTED"}}',
        b'{"error":{"code":429,"message":"Quota.","status":"RESOURCE_EXHAUSTED","details":'
        b'[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"51820.6s"}]}}',
    ],
)
def test_vector_15_hard_quota(body: bytes) -> None:
    err = error_from_upstream(429, body, [])
    assert (err.status, err.type, err.code) == (429, "insufficient_quota", "insufficient_quota")
    assert err.headers == []


_V16 = [
    ev(cand([{"text": "Once upon"}])),
    ev(cand([{"text": " a time"}])),
    b'{\n  "error": {\n    "code": 503,\n'
    b'    "message": "The model is overloaded. Please try again later.",\n'
    b'    "status": "UNAVAILABLE"\n  }\n}\n',
]


def test_vector_16_error_mid_stream() -> None:
    out = run_stream(chat(), _V16)
    frames = chat_frames(out)
    assert content(frames) == "Once upon a time"
    assert frames[-1] == {
        "error": {
            "message": "The model is overloaded. Please try again later.",
            "type": "server_error",
            "param": None,
            "code": "upstream_unavailable",
        }
    }
    assert "[DONE]" not in frames and all(
        f["choices"][0]["finish_reason"] is None for f in frames[:-1]
    )
    with sdk(out) as client, pytest.raises(openai.APIError) as ei:
        list(client.chat.completions.create(model="m", messages=HI, stream=True))
    assert ei.value.message == "The model is overloaded. Please try again later."
    evs = check_stream(run_stream(resp(), _V16))
    assert evs[-1]["type"] == "response.failed"
    assert evs[-1]["response"]["status"] == "failed"
    assert evs[-1]["response"]["error"]["code"] == "server_error"
    assert not any(e["type"] == "response.completed" for e in evs)


def test_vector_17_silent_truncation() -> None:
    frames = chat_frames(run_stream(chat(), [ev(cand([{"text": "Half an ans"}]))]))
    assert "error" in frames[-1] and "[DONE]" not in frames
    evs = check_stream(run_stream(resp(), [ev(cand([{"text": "Half an ans"}]))]))
    assert evs[-1]["type"] == "response.failed"


def test_vector_18_array_wrapped_400_that_is_an_auth_error() -> None:
    key = "AIzaSyD-THIS-IS-THE-UPSTREAM-KEY-0123456"
    body = (
        b'[{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.",'
        b'"status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo",'
        b'"reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":'
        b'{"service":"generativelanguage.googleapis.com"}}]}}]'
    )
    err = error_from_upstream(400, body, [(b"x-goog-api-key", key.encode())])
    # protocols.md vector 18 said 401 invalid_api_key; design.md overrides it: an upstream
    # credential Google rejects is never the client's 401 (issue: the client checked its own key).
    assert (err.status, err.code, err.type) == (502, "upstream_auth_failed", "server_error")
    assert key.encode() not in err.to_json()


def test_vector_19_schema_sanitisation() -> None:
    mapping_vector_19()  # tests/unit/test_mapping.py owns the request side


def test_vector_20_sse_hygiene_under_long_thinking() -> None:
    """The gateway writes HEARTBEAT while upstream is silent; the streams around it stay valid."""
    assert HEARTBEAT.startswith(b":") and LimitsConfig().sse_heartbeat_s < 300  # Codex idle limit
    chunks = [
        ev(cand([{"text": "Plan", "thought": True}])),
        ev(cand([{"text": "Go."}], finishReason="STOP")),
    ]
    chat_out = run_stream(chat(), chunks)
    assert b"event:" not in chat_out
    with_beats = HEARTBEAT * 3 + chat_out.replace(b"\n\n", b"\n\n" + HEARTBEAT, 2)
    with sdk(with_beats) as client:
        got = list(client.chat.completions.create(model="m", messages=HI, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Go."

    resp_out = run_stream(resp(), chunks)
    evs = check_stream(resp_out)  # seq 0.. without gaps, created first, added/done pairs, output
    assert evs[0]["type"] == "response.created"
    with_beats = HEARTBEAT + resp_out.replace(b"\n\n", b"\n\n" + HEARTBEAT, 3)
    with sdk(with_beats) as client, client.responses.stream(model="gpt-5", input="hi") as s:
        assert s.get_final_response().output_text == "Go."
    items, end = codex_view(resp_out)
    assert end["type"] == "response.completed" and [i["type"] for i in items] == [
        "reasoning",
        "message",
    ]
    assert not any(
        b.startswith(b"event:") and b"\ndata:" not in b for b in resp_out.split(b"\n\n") if b
    )
