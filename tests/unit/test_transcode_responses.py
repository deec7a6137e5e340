"""rawgate.translate.transcode_responses and rawgate.state.response_store: the Responses event
sequence (every invariant checked on every golden stream), signatures in encrypted_content and
their round trip through mapping, Codex's view of the stream, the official SDK (raw, the strict
`responses.stream()` helper, async, non-stream), and the bounded store."""

from __future__ import annotations

import re
from typing import Any

import openai
import orjson
import pytest
from hypothesis import given, settings, strategies as st

from rawgate.errors import BadRequest, RateLimited, UpstreamError
from rawgate.state.response_store import ResponseStore
from rawgate.translate import mapping, schemas
from rawgate.translate.contract import Stored, TokenUsage
from rawgate.translate.gemini import decode_reply, error_from_upstream
from rawgate.translate.signatures import split_call_id, unpack_reasoning
from rawgate.translate.transcode_responses import ResponsesStream, responses_response
from tests.unit.test_transcode_golden import (
    CASES,
    RESPONSE_ID,
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

_STREAMS = [c for c in CASES if c["api"] == "responses" and str(c["upstream"]).endswith(".sse")]


Q429 = orjson.dumps(
    {
        "error": {
            "code": 429,
            "message": "Slow down.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12.5s"}
            ],
        }
    }
)


def resp_call(model: str = "gemini-2.5-flash", **body: Any) -> Any:
    body.setdefault("model", "gpt-5-codex")
    body.setdefault("input", "hi")
    return make_call("responses", body, model)


def sse(*replies: dict[str, Any]) -> list[bytes]:
    return [b"data: " + orjson.dumps(r) + b"\r\n\r\n" for r in replies]


def events(out: bytes) -> list[dict[str, Any]]:
    got = []
    for block in out.split(b"\n\n"):
        if not block:
            continue
        head, _, data = block.partition(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: "), block
        ev = orjson.loads(data[6:])
        assert ev["type"] == head[7:].decode()
        got.append(ev)
    return got


def check_stream(out: bytes) -> list[dict[str, Any]]:
    """Every invariant of the module docstring (vector 20's list), for any stream we emit."""
    assert not out.endswith(b"[DONE]\n\n")
    evs = events(out)
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert [e["type"] for e in evs[:2]] == ["response.created", "response.in_progress"]
    terminal = [
        e
        for e in evs
        if e["type"] in ("response.completed", "response.failed", "response.incomplete")
    ]
    assert len(terminal) == 1 and terminal[0] is evs[-1]
    added: dict[int, dict[str, Any]] = {}
    done: dict[int, dict[str, Any]] = {}
    for e in evs:
        if e["type"] == "response.output_item.added":
            assert e["output_index"] == len(added)
            added[e["output_index"]] = e["item"]
        elif e["type"] == "response.output_item.done":
            assert e["output_index"] in added and e["output_index"] not in done
            assert e["item"]["id"] == added[e["output_index"]]["id"]
            done[e["output_index"]] = e["item"]
        elif "output_index" in e:
            assert e["output_index"] in added and e["output_index"] not in done, e
    final = evs[-1]["response"]
    assert final["id"] == evs[0]["response"]["id"]
    assert final["output"] == [done[i] for i in sorted(done)]
    if evs[-1]["type"] != "response.failed":
        assert set(done) == set(added)
        usage = final["usage"]
        for key in ("input_tokens", "output_tokens", "total_tokens"):
            assert isinstance(usage[key], int)
        assert "cached_tokens" in usage["input_tokens_details"]
        assert "reasoning_tokens" in usage["output_tokens_details"]
    return evs


def codex_view(out: bytes) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What Codex keeps (E5): items from output_item.done in arrival order, and the terminal."""
    items, end = [], {}
    for e in events(out):
        if e["type"] == "response.output_item.done":
            items.append(e["item"])
        elif e["type"] in ("response.completed", "response.failed", "response.incomplete"):
            end = e
            break
    return items, end


@pytest.mark.parametrize("c", _STREAMS, ids=[c["name"] for c in _STREAMS])
def test_every_golden_stream_keeps_the_invariants(c: dict[str, Any]) -> None:
    check_stream(run_stream(case_call(c), [upstream(c)]))


# ---- items, status, signatures ------------------------------------------------------------------


def test_max_tokens_is_incomplete_in_response_completed_by_default() -> None:
    c = case("responses_k9")
    evs = check_stream(run_stream(case_call(c), [upstream(c)]))
    assert evs[-1]["type"] == "response.completed"
    assert evs[-1]["response"]["status"] == "incomplete"
    assert evs[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    strict = events(run_stream(case_call(c), [upstream(c)], incomplete_event=True))
    assert strict[-1]["type"] == "response.incomplete"
    assert strict[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_text_after_a_call_opens_a_new_message() -> None:
    parts = [{"text": "a"}, {"functionCall": {"name": "f"}}, {"text": "b"}]
    out = run_stream(
        resp_call(stream=True),
        sse({"candidates": [{"content": {"parts": parts}, "finishReason": "STOP"}]}),
    )
    final = check_stream(out)[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "message"]
    assert final["output"][1]["arguments"] == "{}"


def test_interleaved_thoughts_open_new_reasoning_items() -> None:
    chunks = sse(
        {"candidates": [{"content": {"parts": [{"text": "t1", "thought": True}, {"text": "a"}]}}]},
        {
            "candidates": [
                {
                    "content": {"parts": [{"text": "t2", "thought": True}, {"text": "b"}]},
                    "finishReason": "STOP",
                }
            ]
        },
    )
    final = check_stream(run_stream(resp_call(stream=True), chunks))[-1]["response"]
    kinds = [(i["type"], i.get("summary") or i.get("content")) for i in final["output"]]
    assert [k for k, _ in kinds] == ["reasoning", "message", "reasoning", "message"]
    assert final["output"][0]["summary"] == [{"type": "summary_text", "text": "t1"}]
    assert final["output"][3]["content"][0]["text"] == "b"


def test_signatures_ride_in_encrypted_content_and_call_ids() -> None:
    c = case("responses_tools")
    out = run_stream(case_call(c), [upstream(c)])
    final = check_stream(out)[-1]["response"]
    types = [i["type"] for i in final["output"]]
    assert types == ["reasoning", "message", "function_call", "function_call"]  # G3 leads
    calls = final["output"][2:]
    sigs = unpack_reasoning(final["output"][0]["encrypted_content"])
    assert sigs == {calls[0]["call_id"]: "Q2lBQjEyMzQ1Njc4OQ=="}
    assert split_call_id(calls[0]["call_id"])[1] == "Q2lBQjEyMzQ1Njc4OQ=="
    assert split_call_id(calls[1]["call_id"])[1] is None


def test_lone_signed_call_carries_its_signature_in_the_call_id_only() -> None:
    fc = {"functionCall": {"name": "f"}, "thoughtSignature": "U0lH"}
    chunk = {"candidates": [{"content": {"parts": [fc]}, "finishReason": "STOP"}]}
    items, _ = codex_view(run_stream(resp_call(stream=True), sse(chunk)))
    assert [i["type"] for i in items] == ["function_call"]
    assert split_call_id(items[0]["call_id"])[1] == "U0lH"


def test_codex_round_trip_restores_every_signature() -> None:
    """Turn 1 streamed to Codex; turn 2 = Codex's history (done items, ids stripped) + outputs."""
    c = case("responses_codex")
    call = case_call(c)
    items, end = codex_view(run_stream(call, [upstream(c)]))
    assert end["type"] == "response.completed"
    history = [{k: v for k, v in it.items() if k != "id"} for it in items]
    outputs = [
        {"type": "custom_tool_call_output", "call_id": items[1]["call_id"], "output": "Done"},
        {"type": "function_call_output", "call_id": items[2]["call_id"], "output": "x = 2"},
    ]
    req = dict(c["request"])
    req["input"] = [*c["request"]["input"], *history, *outputs]
    body = mapping.responses_to_gemini(schemas.decode_responses(orjson.dumps(req)), c["model"]).body
    model_turn = body["contents"][1]
    assert model_turn["role"] == "model"
    first, second = model_turn["parts"]
    assert first["functionCall"]["name"] == "apply_patch"
    assert first["functionCall"]["args"]["input"].startswith("*** Begin Patch")
    assert first["thoughtSignature"] == "UEFUQ0hfU0lH"
    assert second["functionCall"]["name"] == "mcp__fs__read"
    assert "thoughtSignature" not in second
    names = [p["functionResponse"]["name"] for p in body["contents"][2]["parts"]]
    assert names == ["apply_patch", "mcp__fs__read"]


def test_text_signature_round_trip_for_gemini_3() -> None:
    """Vector 9 for Responses: the trailing text signature comes back on the message's text."""
    c = case("responses_g3_text")
    items, _ = codex_view(run_stream(case_call(c), [upstream(c)]))
    assert [i["type"] for i in items] == ["reasoning", "message"]
    history = [{"role": "user", "content": "hi"}, *items, {"role": "user", "content": "more"}]
    body = mapping.responses_to_gemini(
        schemas.decode_responses(orjson.dumps({"model": "m", "input": history})), c["model"]
    ).body
    assert body["contents"][1]["parts"][0] == {
        "text": "Café ☕ is open.",
        "thoughtSignature": "U0lHX1Q=",
    }


def test_request_fields_are_echoed() -> None:
    call = resp_call(
        stream=True,
        instructions="sys",
        metadata={"a": "b"},
        max_output_tokens=77,
        temperature=0.5,
        parallel_tool_calls=False,
        text={"verbosity": "low"},
        previous_response_id="resp_prev",
        store=False,
    )
    rs = ResponsesStream(call, "resp_x")
    created = events(rs.start())[0]["response"]
    assert created["instructions"] == "sys" and created["metadata"] == {"a": "b"}
    assert created["max_output_tokens"] == 77 and created["temperature"] == 0.5
    assert created["parallel_tool_calls"] is False and created["store"] is False
    assert created["previous_response_id"] == "resp_prev"
    assert created["text"] == {"verbosity": "low", "format": {"type": "text"}}
    assert created["status"] == "in_progress" and created["output"] == []
    assert rs.start() == b""


def test_fail_maps_codes_for_codex() -> None:
    cases: list[tuple[Any, str, str | None]] = [
        (
            error_from_upstream(
                429,
                Q429,
            ),
            "rate_limit_exceeded",
            "12.5",
        ),
        (RateLimited("all accounts cooling", retry_after_s=3.0), "rate_limit_exceeded", "3"),
        (
            error_from_upstream(429, b'{"error":{"code":429,"message":"limit: 0"}}'),
            "insufficient_quota",
            None,
        ),
        (BadRequest("too long", code="context_length_exceeded"), "context_length_exceeded", None),
        (BadRequest("bad"), "invalid_prompt", None),
        (UpstreamError("boom", status=503, code="upstream_unavailable"), "server_error", None),
    ]
    for err, code, secs in cases:
        rs = ResponsesStream(resp_call(stream=True), "resp_f")
        evs = check_stream(rs.fail(err))
        error = evs[-1]["response"]["error"]
        assert evs[-1]["type"] == "response.failed" and evs[-1]["response"]["status"] == "failed"
        assert error["code"] == code, err
        if secs is not None:
            m = re.search(r"(?i)try again in\s*(\d+(?:\.\d+)?)\s*(s|ms|seconds?)", error["message"])
            assert m is not None and m.group(1) == secs
        assert rs.fail(err) == b"" and rs.finish() == b""


def test_truncated_stream_fails() -> None:
    rs = ResponsesStream(resp_call(stream=True), "resp_t")
    out = rs.start() + rs.feed(
        decode_reply(orjson.dumps({"candidates": [{"content": {"parts": [{"text": "a"}]}}]}))
    )
    with pytest.raises(UpstreamError) as ei:
        rs.finish()
    out += rs.fail(ei.value)
    evs = check_stream(out)
    assert evs[-1]["response"]["error"]["code"] == "server_error"
    assert rs.error is ei.value


def test_output_items_and_usage_for_the_store() -> None:
    c = case("responses_tools")
    call = case_call(c)
    rs = ResponsesStream(call, "resp_s")
    rs.start()
    for chunk in upstream(c).split(b"\r\n\r\n"):
        if chunk:
            rs.feed(decode_reply(chunk[6:]))
    # (read into a local: mypy would keep rs.stored narrowed to None past rs.finish())
    stored_before = rs.stored
    assert stored_before is None  # nothing to keep before the answer completed
    rs.finish()
    assert rs.output_items == rs.response["output"] and len(rs.output_items) == 4
    usage = rs.response["usage"]
    assert usage["total_tokens"] == 125
    # The neutral record the gateway counts, the same numbers as the Response's usage.
    assert rs.usage == TokenUsage(usage["input_tokens"], usage["output_tokens"])
    assert rs.stored == Stored("resp_s", call.input_items, rs.output_items)
    assert rs.response["status"] == "completed"


def test_non_stream_errors_raise() -> None:
    body = b'{"candidates":[{"finishReason":"UNEXPECTED_TOOL_CALL"}]}'
    with pytest.raises(UpstreamError) as ei:
        responses_response(resp_call(), decode_reply(body), "resp_n")
    assert ei.value.code == "unexpected_tool_call"


def test_non_stream_without_finish_reason_is_complete() -> None:
    body = b'{"candidates":[{"content":{"parts":[{"text":"x"}]}}]}'
    got = orjson.loads(responses_response(resp_call(), decode_reply(body), "resp_n"))
    assert got["status"] == "completed" and got["output"][0]["content"][0]["text"] == "x"


# ---- the official SDK ---------------------------------------------------------------------------

_OK = [
    c["name"]
    for c in _STREAMS
    if c["name"] not in ("responses_error_midstream", "responses_malformed")
]


@pytest.mark.parametrize("name", _OK)
def test_sdk_stream_helper_gets_the_final_response(name: str) -> None:
    c = case(name)
    body = run_stream(case_call(c), [upstream(c)])
    with sdk(body) as client, client.responses.stream(model="gpt-5", input="hi") as stream:
        types = [e.type for e in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert final.id == RESPONSE_ID
    expect_text = {
        "responses_k9": "We",
        "responses_tools": "Checking both.",
        "responses_codex": "",
        "responses_code_assist": "Hello — nice to meet you! 👋",
        "responses_blocked": "",
        "responses_safety": "Sure, here",
        "responses_g3_text": "Café ☕ is open.",
    }[name]
    assert final.output_text == expect_text
    assert final.usage is not None


def test_sdk_raw_iteration_with_tools() -> None:
    c = case("responses_codex")
    body = run_stream(case_call(c), [upstream(c)])
    with sdk(body) as client:
        evs = list(client.responses.create(model="gpt-5", input="hi", stream=True))
    done = [e.item for e in evs if e.type == "response.output_item.done"]
    assert [d.type for d in done] == ["reasoning", "custom_tool_call", "function_call"]
    assert done[1].input.startswith("*** Begin Patch")  # type: ignore[union-attr]
    assert done[2].namespace == "mcp__fs" and done[2].name == "read"  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["responses_error_midstream", "responses_malformed"])
def test_sdk_sees_response_failed(name: str) -> None:
    c = case(name)
    body = run_stream(case_call(c), [upstream(c)])
    with sdk(body) as client, client.responses.stream(model="gpt-5", input="hi") as stream:
        evs = list(stream)
        assert evs[-1].type == "response.failed"
        assert evs[-1].response.error is not None
        with pytest.raises(RuntimeError):
            stream.get_final_response()


async def test_async_sdk_stream_helper() -> None:
    c = case("responses_tools")
    body = run_stream(case_call(c), [upstream(c)])
    async with async_sdk(body) as client:
        async with client.responses.stream(model="gpt-5", input="hi") as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_response()
    assert [o.type for o in final.output] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]


@pytest.mark.parametrize("name", ["responses_k9_nonstream", "responses_tools_nonstream"])
def test_sdk_non_stream(name: str) -> None:
    c = case(name)
    status, _, body = run_whole(case_call(c), upstream(c)).partition(b"\n")
    assert status == b"HTTP 200"
    with sdk(body) as client:
        got = client.responses.create(model="gpt-5", input="hi")
    if name == "responses_k9_nonstream":
        assert got.status == "incomplete" and got.incomplete_details is not None
        assert got.output_text == "We are looking"
        assert got.usage is not None and got.usage.output_tokens_details.reasoning_tokens == 57
    else:
        assert [o.type for o in got.output] == ["message", "function_call", "function_call"]
        assert got.usage is not None and got.usage.input_tokens_details.cached_tokens == 32


def test_http_429_reaches_the_sdk_as_rate_limit_error() -> None:
    err = error_from_upstream(
        429,
        Q429,
    )
    headers = {k.decode(): v.decode() for k, v in err.headers}
    with (
        sdk(err.to_json(), status=err.status, headers=headers) as client,
        pytest.raises(openai.RateLimitError) as ei,
    ):
        client.responses.create(model="gpt-5", input="hi")
    assert ei.value.code == "rate_limit_exceeded"
    assert ei.value.response.headers["retry-after-ms"] == "12500"


# ---- the response store -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_store_returns_the_whole_conversation() -> None:
    s = ResponseStore(10, 60.0)
    s.put(
        "r1",
        [{"type": "message", "role": "user", "content": "q"}],
        [{"type": "message", "role": "assistant", "content": []}],
    )
    got = s.get("r1")
    assert got is not None and [i["role"] for i in got] == ["user", "assistant"]
    got.append({"x": 1})  # a new list every time
    assert len(s.get("r1") or []) == 2
    assert s.get("nope") is None


def test_store_bounded_by_count() -> None:
    s = ResponseStore(3, 60.0)
    for i in range(5):
        s.put(f"r{i}", [], [{"i": i}])
    assert len(s) == 3 and s.get("r0") is None and s.get("r1") is None and s.get("r4") == [{"i": 4}]
    s.put("r2", [], [{"i": 22}])  # a re-put is the newest
    s.put("r5", [], [])
    assert s.get("r2") == [{"i": 22}] and s.get("r3") is None


def test_store_bounded_by_age() -> None:
    clock = Clock()
    s = ResponseStore(10, 60.0, clock=clock)
    s.put("old", [], [])
    clock.t += 30
    s.put("new", [], [])
    clock.t += 31
    assert s.get("old") is None and s.get("new") == []
    s.put("newer", [], [])  # expiry at the front on put
    assert len(s) == 2
    clock.t += 61
    s.put("last", [], [])
    assert len(s) == 1


def test_store_zero_count_stores_nothing() -> None:
    s = ResponseStore(0, 60.0)
    s.put("r", [], [])
    assert s.get("r") is None
    with pytest.raises(ValueError):
        ResponseStore(-1, 1.0)


def test_chained_turn_through_the_store() -> None:
    """previous_response_id: the stored items are valid mapping history."""
    c = case("responses_tools")
    call = case_call(c)
    rs = ResponsesStream(call, "resp_1")
    run = rs.start()
    for p in upstream(c).split(b"\r\n\r\n"):
        if p:
            run += rs.feed(decode_reply(p[6:]))
    run += rs.finish()
    store = ResponseStore()
    store.put("resp_1", call.input_items, rs.output_items)
    outputs = [
        {"type": "function_call_output", "call_id": it["call_id"], "output": "sunny"}
        for it in rs.output_items
        if it["type"] == "function_call"
    ]
    req = schemas.decode_responses(
        orjson.dumps({"model": "gpt-5", "input": outputs, "previous_response_id": "resp_1"})
    )
    body = mapping.responses_to_gemini(req, c["model"], store.get("resp_1")).body
    assert [x["role"] for x in body["contents"]] == ["user", "model", "user"]
    model_parts = body["contents"][1]["parts"]
    assert model_parts[0] == {"text": "Checking both."}
    assert model_parts[1]["thoughtSignature"] == "Q2lBQjEyMzQ1Njc4OQ=="
    assert "thoughtSignature" not in model_parts[2]


# ---- properties: any Gemini stream keeps every invariant -----------------------------------------

_PART = st.one_of(
    st.builds(lambda t: {"text": t}, st.text(max_size=12)),
    st.builds(lambda t: {"text": t, "thought": True}, st.text(max_size=12)),
    st.builds(lambda t: {"text": t, "thoughtSignature": "U0lH"}, st.text(max_size=4)),
    st.builds(
        lambda name, sig: (
            {"functionCall": {"name": name, "args": {"q": 1}}}
            | ({"thoughtSignature": "Q0FMTA=="} if sig else {})
        ),
        st.sampled_from(["get_weather", "apply_patch", "mcp__fs__read", "unknown_tool"]),
        st.booleans(),
    ),
)
_CHUNKS = st.lists(st.lists(_PART, max_size=4), max_size=6)
_END = st.sampled_from([None, "STOP", "MAX_TOKENS", "SAFETY", "MALFORMED_FUNCTION_CALL", "OTHER"])
_CODEX = case("responses_codex")


@settings(max_examples=60, deadline=None)
@given(_CHUNKS, _END, st.sampled_from(["gemini-3-pro-preview", "gemini-2.5-flash"]))
def test_property_any_stream_keeps_the_invariants(
    chunks: list[list[dict[str, Any]]], end: str | None, model: str
) -> None:
    call = make_call("responses", _CODEX["request"], model)
    replies: list[dict[str, Any]] = [
        {"candidates": [{"content": {"parts": p, "role": "model"}}]} for p in chunks
    ]
    if end is not None:
        replies.append({"candidates": [{"finishReason": end}]})
    out = run_stream(call, sse(*replies))
    evs = check_stream(out)
    items, terminal = codex_view(out)
    if terminal["type"] == "response.completed":
        assert items == terminal["response"]["output"]
        calls = [i for i in items if i["type"] in ("function_call", "custom_tool_call")]
        n_calls = sum("functionCall" in p for c in chunks for p in c)
        assert len(calls) == n_calls and len({c["call_id"] for c in calls}) == n_calls
        text = "".join(p["text"] for c in chunks for p in c if "text" in p and not p.get("thought"))
        got = "".join(
            part["text"] for i in items if i["type"] == "message" for part in i["content"]
        )
        assert got == text
    assert evs[-1]["sequence_number"] == len(evs) - 1


def test_injected_clock_and_ids_make_the_stream_deterministic() -> None:
    """With the clock and the id factory injected (translate/contract.py), two transcodings of
    the same upstream body are byte-identical: item ids and created_at come from them."""
    c = case("responses_tools")

    def run() -> bytes:
        seq = iter(range(100))
        rs = ResponsesStream(
            case_call(c),
            "resp_fixed",
            clock=lambda: 1_700_000_000.5,
            ids=lambda prefix, digits: f"{prefix}{next(seq):0{digits}d}",
        )
        out = [rs.start()]
        out.extend(rs.feed(decode_reply(ch[6:])) for ch in upstream(c).split(b"\r\n\r\n") if ch)
        out.append(rs.finish())
        return b"".join(out)

    first, second = run(), run()
    assert first == second
    assert b'"created_at":1700000000' in first
    assert b'"id":"rs_' + b"0" * 24 in first or b'"id":"msg_' + b"0" * 24 in first
