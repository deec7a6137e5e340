"""Gemini -> Anthropic Messages transcoder (rawgate/transcode_messages.py) and the signature tags
(rawgate/sigtag.py), in bytes: protocols-2.md vectors 1, 2, 7, 12, 13, the A8 rules, and a
property test that any Gemini stream yields a well-formed event sequence."""

from __future__ import annotations

import re
from itertools import count
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from rawgate.errors import RateLimited, ServiceUnavailable, UpstreamError
from rawgate.translate.call import GeminiCall, ToolOrigin
from rawgate.translate.gemini import decode_reply
from rawgate.translate.sigtag import SignatureTagger
from rawgate.translate.sse import SSEDecoder
from rawgate.translate.transcode_messages import (
    MessagesOptions,
    MessagesStream,
    anthropic_error,
    messages_response,
)

KEY = b"k" * 32
SIG = SignatureTagger(KEY)


def _ids() -> Any:
    n = count()
    return lambda k: str(next(n)).rjust(k, "0")


def _call(**kw: Any) -> GeminiCall:
    base: dict[str, Any] = {
        "api": "chat",
        "model": "gemini-3-pro-preview",
        "client_model": "claude-sonnet-5-5",
        "stream": True,
        "body": {},
    }
    base.update(kw)
    return GeminiCall(**base)


def _events(data: bytes) -> list[dict[str, Any]]:
    """Parse our SSE output strictly: every frame is `event:` + one `data:` line + blank line,
    the event name equal to data.type."""
    out = []
    assert data.endswith(b"\n\n") or not data
    for frame in data.split(b"\n\n")[:-1]:
        lines = frame.split(b"\n")
        assert len(lines) == 2, frame
        assert lines[0].startswith(b"event: ") and lines[1].startswith(b"data: "), frame
        doc = orjson.loads(lines[1][6:])
        assert doc["type"] == lines[0][7:].decode(), frame
        out.append(doc)
    return out


def _run(chunks: list[dict[str, Any]], opts: MessagesOptions | None = None, **kw: Any) -> bytes:
    s = MessagesStream(_call(**kw), opts or MessagesOptions(), SIG, _ids())
    out = b"".join(s.feed(decode_reply(orjson.dumps(c))) for c in chunks)
    return out + s.finish()


def _types(evs: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in evs]


def test_vector1_minimal_stream() -> None:
    chunk = {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": "Hi"}]}, "finishReason": "STOP"}
        ],
        "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 1, "totalTokenCount": 8},
        "responseId": "r1",
    }
    evs = _events(_run([chunk]))
    assert _types(evs) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    msg = evs[0]["message"]
    assert msg["id"] == "msg_r1" and msg["content"] == [] and msg["stop_reason"] is None
    assert msg["usage"]["input_tokens"] == 7 and msg["model"] == "claude-sonnet-5-5"
    assert evs[1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert evs[2]["delta"] == {"type": "text_delta", "text": "Hi"}
    assert evs[4]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert evs[4]["usage"]["output_tokens"] == 1


def test_vector2_tool_call_becomes_tool_use_with_tagged_id() -> None:
    chunk = {
        "candidates": [
            {
                "content": {
                    "parts": [
                        {"text": "Checking."},
                        {
                            "functionCall": {"name": "Bash", "args": {"command": "ls"}},
                            "thoughtSignature": "SIG_A",
                        },
                    ]
                },
                "finishReason": "STOP",
            }
        ]
    }
    evs = _events(_run([chunk], tools={"Bash": ToolOrigin(name="Bash")}))
    start = evs[4]
    assert start["type"] == "content_block_start" and start["index"] == 1
    block = start["content_block"]
    assert block["type"] == "tool_use" and block["input"] == {} and block["name"] == "Bash"
    assert re.fullmatch(r"toolu_[A-Za-z0-9_-]+", block["id"])
    args = "".join(
        e["delta"]["partial_json"]
        for e in evs
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"
    )
    assert orjson.loads(args) == {"command": "ls"}
    assert evs[-2]["delta"]["stop_reason"] == "tool_use"
    # the id carries the signature back, for this model only
    assert SIG.open_tool_id("gemini-3-pro-preview", block["id"]) == "SIG_A"
    assert SIG.open_tool_id("gemini-2.5-pro", block["id"]) is None


def test_vector2_variant_call_without_args_gives_empty_object() -> None:
    chunk = {
        "candidates": [
            {
                "content": {"parts": [{"functionCall": {"name": "ListAgents"}}]},
                "finishReason": "STOP",
            }
        ]
    }
    evs = _events(_run([chunk]))
    deltas = [e for e in evs if e["type"] == "content_block_delta"]
    assert [d["delta"] for d in deltas] == [{"type": "input_json_delta", "partial_json": "{}"}]
    assert re.fullmatch(r"toolu_[A-Za-z0-9]{24}", evs[1]["content_block"]["id"])


def test_vector7_omitted_thinking_carries_only_the_signature() -> None:
    chunks: list[dict[str, Any]] = [
        {"candidates": [{"content": {"parts": [{"text": "plan...", "thought": True}]}}]},
        {
            "candidates": [
                {
                    "content": {
                        "parts": [{"text": "", "thoughtSignature": "SIG_T"}, {"text": "Done"}]
                    },
                    "finishReason": "STOP",
                }
            ]
        },
    ]
    opts = MessagesOptions(thinking_blocks=True, show_thinking=False)
    evs = _events(_run(chunks, opts))
    assert evs[1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    deltas = [e["delta"] for e in evs if e["type"] == "content_block_delta" and e["index"] == 0]
    assert [d["type"] for d in deltas] == ["signature_delta"]  # no thinking text shown
    assert SIG.open("gemini-3-pro-preview", deltas[0]["signature"]) == "SIG_T"
    assert evs[4]["content_block"]["type"] == "text" and evs[4]["index"] == 1
    # shown thinking: the text arrives as thinking_delta
    evs = _events(_run(chunks, MessagesOptions(thinking_blocks=True)))
    assert evs[2]["delta"] == {"type": "thinking_delta", "thinking": "plan..."}


def test_vector12_error_after_the_200_is_an_error_event_and_nothing_after() -> None:
    s = MessagesStream(_call(), MessagesOptions(), SIG, _ids())
    first = s.feed(decode_reply(b'{"candidates":[{"content":{"parts":[{"text":"Hel"}]}}]}'))
    err = UpstreamError("The model is overloaded. Please try again later.", status=503)
    tail = s.fail(err)
    evs = _events(first + tail)
    assert _types(evs) == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert evs[-1]["error"] == {
        "type": "overloaded_error",
        "message": "The model is overloaded. Please try again later.",
    }
    assert s.feed(decode_reply(b'{"candidates":[]}')) == b"" and s.finish() == b""


def test_vector13_safety_stop_is_refusal_with_usage() -> None:
    chunks: list[dict[str, Any]] = [
        {"candidates": [{"content": {"parts": [{"text": "Sure"}]}}]},
        {
            "candidates": [{"finishReason": "SAFETY", "index": 0}],
            "usageMetadata": {"promptTokenCount": 9},
        },
    ]
    evs = _events(_run(chunks))
    assert _types(evs)[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert evs[-2]["delta"]["stop_reason"] == "refusal"
    assert evs[-2]["usage"]["output_tokens"] >= 0


def test_blocked_prompt_is_a_refusal_with_text() -> None:
    evs = _events(_run([{"promptFeedback": {"blockReason": "SAFETY"}}]))
    assert evs[-2]["delta"]["stop_reason"] == "refusal"
    assert "blockReason SAFETY" in evs[2]["delta"]["text"]


@pytest.mark.parametrize(
    "chunks",
    [
        [],
        [{"candidates": [{"content": {"parts": [{"text": "cut"}]}}]}],
    ],
    ids=["empty", "no-finish"],
)
def test_unusable_streams_raise_then_fail_sends_error(chunks: list[dict[str, Any]]) -> None:
    s = MessagesStream(_call(), MessagesOptions(), SIG, _ids())
    out = b"".join(s.feed(decode_reply(orjson.dumps(c))) for c in chunks)
    with pytest.raises(UpstreamError) as ei:
        s.finish()
    evs = _events(out + s.fail(ei.value))
    assert evs[0]["type"] == "message_start" and evs[-1]["type"] == "error"
    assert "message_stop" not in _types(evs)


def test_malformed_function_call_is_an_error() -> None:
    s = MessagesStream(_call(), MessagesOptions(), SIG, _ids())
    s.feed(decode_reply(b'{"candidates":[{"finishReason":"MALFORMED_FUNCTION_CALL"}]}'))
    with pytest.raises(UpstreamError, match="MALFORMED_FUNCTION_CALL"):
        s.finish()


def test_stop_sequence_and_max_tokens() -> None:
    chunk = {"candidates": [{"content": {"parts": [{"text": "a ###"}]}, "finishReason": "STOP"}]}
    evs = _events(_run([chunk], MessagesOptions(stop_sequences=("###",))))
    assert evs[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "###"}
    chunk["candidates"][0]["finishReason"] = "MAX_TOKENS"
    assert _events(_run([chunk]))[-2]["delta"]["stop_reason"] == "max_tokens"


def test_single_tool_keeps_the_first_call() -> None:
    fc = [{"functionCall": {"name": "a", "args": {}}}, {"functionCall": {"name": "b", "args": {}}}]
    chunk = {"candidates": [{"content": {"parts": fc}, "finishReason": "STOP"}]}
    evs = _events(_run([chunk], MessagesOptions(single_tool=True)))
    names = [e["content_block"]["name"] for e in evs if e["type"] == "content_block_start"]
    assert names == ["a"]


def test_usage_excludes_cached_tokens() -> None:
    chunk = {
        "candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": "STOP"}],
        "usageMetadata": {
            "promptTokenCount": 100,
            "cachedContentTokenCount": 60,
            "candidatesTokenCount": 5,
            "thoughtsTokenCount": 7,
        },
    }
    evs = _events(_run([chunk]))
    assert evs[0]["message"]["usage"]["input_tokens"] == 40
    assert evs[0]["message"]["usage"]["cache_read_input_tokens"] == 60
    assert evs[-2]["usage"]["output_tokens"] == 12


def test_non_stream_message() -> None:
    reply = decode_reply(
        orjson.dumps(
            {
                "candidates": [
                    {
                        "content": {
                            "parts": [
                                {"text": "think", "thought": True},
                                {"text": "", "thoughtSignature": "SIG_T"},
                                {"text": "Checking."},
                                {
                                    "functionCall": {
                                        "name": "get_weather",
                                        "args": {"city": "Paris"},
                                    }
                                },
                            ]
                        },
                        "finishReason": "STOP",
                    }
                ],
                "usageMetadata": {"promptTokenCount": 410, "candidatesTokenCount": 57},
                "responseId": "abc",
            }
        )
    )
    msg = orjson.loads(
        messages_response(
            _call(stream=False), reply, MessagesOptions(thinking_blocks=True), SIG, _ids()
        )
    )
    assert msg["id"] == "msg_abc" and msg["type"] == "message" and msg["role"] == "assistant"
    assert [b["type"] for b in msg["content"]] == ["thinking", "text", "tool_use"]
    assert msg["content"][0]["thinking"] == "think"
    assert SIG.open("gemini-3-pro-preview", msg["content"][0]["signature"]) == "SIG_T"
    assert msg["content"][2]["input"] == {"city": "Paris"}
    assert msg["stop_reason"] == "tool_use" and msg["stop_sequence"] is None
    assert msg["usage"]["input_tokens"] == 410 and msg["usage"]["output_tokens"] == 57


def test_errors_in_anthropic_shape() -> None:
    status, body, headers = anthropic_error(RateLimited("slow down", retry_after_s=12.5))
    assert status == 429
    assert orjson.loads(body) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }
    assert (b"retry-after", b"13") in headers and (b"retry-after-ms", b"12500") in headers
    status, body, _ = anthropic_error(ServiceUnavailable("every account rests"))
    assert status == 529 and orjson.loads(body)["error"]["type"] == "overloaded_error"
    _, _, headers = anthropic_error(RateLimited("spent", code="insufficient_quota"))
    assert (b"x-should-retry", b"false") in headers


# ---- signature tags ---------------------------------------------------------------------------


def test_sigtag_refuses_foreign_tampered_and_other_model_signatures() -> None:
    w = SIG.wrap("gemini-3-pro-preview", "AbC+/=")
    assert SIG.open("gemini-3-pro-preview", w) == "AbC+/="
    assert SIG.open("gemini-3-flash-preview", w) is None  # another model
    assert SIG.open("gemini-3-pro-preview", w[:-1] + "X") is None  # tampered
    assert SIG.open("gemini-3-pro-preview", "EqQBCkgIARABGAIiQL") is None  # real Anthropic's
    assert SignatureTagger(b"o" * 32).open("gemini-3-pro-preview", w) is None  # another install
    tid = SIG.tool_id("gemini-3-pro-preview", "AbC+/=")
    assert re.fullmatch(r"toolu_[A-Za-z0-9_-]+", tid)
    assert SIG.open_tool_id("gemini-3-pro-preview", tid) == "AbC+/="
    assert SIG.open_tool_id("gemini-3-pro-preview", tid[:-2] + "zz") is None
    assert SIG.open_tool_id("gemini-3-pro-preview", "toolu_01A09q90qw90lq917835lq9") is None


# ---- property: any Gemini stream yields a well-formed event sequence ----------------------------

_part = st.one_of(
    st.builds(lambda t: {"text": t}, st.text(max_size=5)),
    st.builds(lambda t: {"text": t, "thought": True}, st.text(max_size=5)),
    st.builds(lambda s: {"text": "", "thoughtSignature": s}, st.sampled_from(["S1", "S2+/="])),
    st.builds(
        lambda n, s: {
            "functionCall": {"name": n, "args": {"a": 1}},
            **({"thoughtSignature": s} if s else {}),
        },
        st.sampled_from(["f", "g"]),
        st.sampled_from([None, "SIGF"]),
    ),
)
_chunk = st.builds(
    lambda parts, fin: {
        "candidates": [{"content": {"parts": parts}, **({"finishReason": fin} if fin else {})}]
    },
    st.lists(_part, max_size=4),
    st.sampled_from([None, None, None, "STOP", "MAX_TOKENS", "SAFETY", "MALFORMED_FUNCTION_CALL"]),
)


def _well_formed(evs: list[dict[str, Any]]) -> None:
    assert evs and evs[0]["type"] == "message_start"
    ended = evs[-1]["type"]
    assert ended in ("message_stop", "error")
    if ended == "message_stop":
        assert evs[-2]["type"] == "message_delta" and "output_tokens" in evs[-2]["usage"]
    open_idx = None
    next_idx = 0
    for e in evs[1:-1]:
        t = e["type"]
        if t == "content_block_start":
            assert open_idx is None and e["index"] == next_idx
            open_idx = next_idx
            next_idx += 1
            if e["content_block"]["type"] == "tool_use":
                assert e["content_block"]["input"] == {}
        elif t == "content_block_delta":
            assert e["index"] == open_idx
        elif t == "content_block_stop":
            assert e["index"] == open_idx
            open_idx = None
        else:
            assert t == "message_delta" and open_idx is None
    assert ended == "error" or open_idx is None


@settings(max_examples=300, deadline=None)
@given(st.lists(_chunk, max_size=5), st.booleans(), st.booleans())
def test_any_gemini_stream_gives_a_well_formed_sequence(
    chunks: list[dict[str, Any]], thinking: bool, show: bool
) -> None:
    s = MessagesStream(_call(), MessagesOptions(thinking_blocks=thinking, show_thinking=show), SIG)
    out = b"".join(s.feed(decode_reply(orjson.dumps(c))) for c in chunks)
    try:
        out += s.finish()
    except UpstreamError as e:
        out += s.fail(e)
    _well_formed(_events(out))


def test_the_anthropic_sdk_accumulates_our_stream() -> None:
    anthropic = pytest.importorskip("anthropic")
    from anthropic._models import construct_type
    from anthropic.lib.streaming._messages import accumulate_event
    from anthropic.types import RawMessageStreamEvent

    chunks: list[dict[str, Any]] = [
        {"candidates": [{"content": {"parts": [{"text": "hm", "thought": True}]}}]},
        {
            "candidates": [
                {
                    "content": {
                        "parts": [
                            {"text": "", "thoughtSignature": "SIG_T"},
                            {"text": "Run"},
                            {"functionCall": {"name": "Bash", "args": {"command": "ls"}}},
                        ]
                    },
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4},
        },
    ]
    evs = _events(_run(chunks, MessagesOptions(thinking_blocks=True)))
    snap = None
    bufs: dict[int, bytes] = {}
    for e in evs:
        # construct_type is typed `object`; it builds the union member the type tag names.
        ev = cast(RawMessageStreamEvent, construct_type(type_=RawMessageStreamEvent, value=e))
        snap = accumulate_event(event=ev, current_snapshot=snap, json_bufs=bufs)
    assert snap is not None and anthropic is not None
    assert [b.type for b in snap.content] == ["thinking", "text", "tool_use"]
    assert snap.content[1].type == "text" and snap.content[1].text == "Run"
    assert snap.content[2].type == "tool_use" and snap.content[2].input == {"command": "ls"}
    assert snap.stop_reason == "tool_use" and snap.usage.output_tokens == 4


# ---- golden upstream streams, split at every byte offset -----------------------------------------

_GOLDEN = Path(__file__).resolve().parents[1] / "data" / "gemini"
_SSE_FILES = sorted(p.name for p in _GOLDEN.glob("*.sse"))


def _pump(data: bytes, cuts: list[int], thinking: bool) -> bytes:
    """Upstream body pieces -> the Messages stream, as the gateway's pump does it."""
    s = MessagesStream(_call(), MessagesOptions(thinking_blocks=thinking), SIG, _ids())
    dec = SSEDecoder()
    out = [s.start()]
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    try:
        for piece in pieces:
            out.extend(s.feed(decode_reply(p)) for p in dec.feed(piece))
        out.extend(s.feed(decode_reply(p)) for p in dec.close())
        out.append(s.finish())
    except UpstreamError as e:
        out.append(s.fail(e))
    return b"".join(out)


@pytest.mark.parametrize("name", _SSE_FILES)
def test_golden_streams_split_at_every_offset(name: str) -> None:
    """Every recorded Gemini stream (text, tools with signatures, thoughts, safety, blocked,
    usage, an error mid-stream, Code Assist's envelope), whole and cut at every byte offset,
    gives the same well-formed event sequence: UTF-8 and frames are never torn."""
    data = (_GOLDEN / name).read_bytes()
    for thinking in (False, True):
        whole = _pump(data, [], thinking)
        _well_formed(_events(whole))
        for k in range(1, len(data)):
            assert _pump(data, [k], thinking) == whole, f"{name}: split at {k}"
