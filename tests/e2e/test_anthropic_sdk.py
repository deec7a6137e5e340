"""End to end: the official `anthropic` SDK -> rawgate's Messages front (real listener) -> the
emulator, on loopback. What Claude Code and the SDKs need (protocols-2.md A, B, E): create and
stream, the tool loop with thought signatures, thinking, stop reasons, count_tokens, the model
list, and errors as the SDK's own exception types."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import orjson
import pytest
from anthropic.types import ImageBlockParam, Message, MessageParam

from tests.helpers_gateway import gateway_stack

pytestmark = pytest.mark.anyio

TOOLS: list[Any] = [
    {
        "name": "get_weather",
        "description": "Weather of a city",
        "input_schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
]
TWO_CALLS = (
    'weather? [[emu:tool_call name=get_weather args={"city":"Paris"}]]'
    ' [[emu:tool_call name=get_weather args={"city":"Rome"}]]'
)


def _client(origin: str, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=origin, api_key="sk-test", max_retries=0, **kw)


def _body(err: anthropic.APIStatusError) -> dict[str, Any]:
    """The SDK types an error's parsed body as `object`; ours is always a JSON object."""
    assert isinstance(err.body, dict), err.body
    return err.body


def _last_upstream(run: Any) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(run.emulator.core.recent[-1][4])
    return doc


async def test_create_and_stream(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.origin) as c:
        raw = await c.messages.with_raw_response.create(
            model="claude-sonnet-4-5",
            max_tokens=200,
            system="Be brief.",
            messages=[{"role": "user", "content": "hello there"}],
        )
        msg = await raw.parse()
        assert raw.headers["x-mapped-model"] == run.cfg.routing.default_model
        assert raw.headers["request-id"] == raw.headers["x-request-id"] == msg._request_id
        assert msg.model == "claude-sonnet-4-5" and msg.role == "assistant"
        assert msg.id.startswith("msg_")
        assert msg.content[0].type == "text" and "hello there" in msg.content[0].text
        assert msg.stop_reason == "end_turn"
        assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
        sent = _last_upstream(run)
        assert sent["systemInstruction"]["parts"][0]["text"] == "Be brief."

        async with c.messages.stream(
            model="claude-opus-4-1",
            max_tokens=200,
            messages=[{"role": "user", "content": "stream me please"}],
        ) as s:
            text = "".join([t async for t in s.text_stream])
            final = await s.get_final_message()
        assert text == "stream me please"
        assert final.content[0].type == "text" and final.content[0].text == text
        assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
        assert final.model == "claude-opus-4-1"
        # Claude Code's haiku (small/fast) model maps to the lite model with no config.
        raw = await c.messages.with_raw_response.create(
            model="claude-haiku-5-5", max_tokens=50, messages=[{"role": "user", "content": "x"}]
        )
        assert raw.headers["x-mapped-model"] == run.cfg.routing.lite_model


async def test_raw_wire_beta_query_and_event_framing(tmp_path: Path) -> None:
    """What Claude Code sends (`?beta=true`, x-api-key, betas, a role:system message, the
    billing block) is accepted; the stream is `event:` + `data:` frames, no [DONE]."""
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient() as h:
        body = {
            "model": "claude-opus-5-5",
            "max_tokens": 128000,
            "stream": True,
            "thinking": {"type": "adaptive", "display": "omitted"},
            "output_config": {"effort": "medium"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "metadata": {"user_id": '{"device_id":"d","session_id":"s"}'},
            "system": [
                {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332;"},
                {"type": "text", "text": "You are Claude Code.",
                 "cache_control": {"type": "ephemeral"}},
            ],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "say hi"}]},
                {"role": "system", "content": "# Environment"},
            ],
        }  # fmt: skip
        headers = {
            "x-api-key": "sk-test",
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "claude-code-20250219,unknown-beta-2099-01-01",
            "accept": "application/json",
        }
        url = run.origin + "/v1/messages?beta=true"
        async with h.stream("POST", url, json=body, headers=headers) as r:
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            raw = b"".join([c async for c in r.aiter_bytes()])
        frames = raw.split(b"\n\n")[:-1]
        names = [f.split(b"\n")[0] for f in frames]
        assert names[0] == b"event: message_start" and names[-1] == b"event: message_stop"
        assert b"[DONE]" not in raw
        sent = _last_upstream(run)
        assert "billing" not in orjson.dumps(sent).decode()
        assert sent["generationConfig"]["maxOutputTokens"] == 65536  # clamped


async def _tool_loop(c: anthropic.AsyncAnthropic, model: str, stream: bool) -> list[Any]:
    """Turn 1 gets two parallel tool_use blocks; turn 2 sends their results back."""
    first: list[Any] = [{"role": "user", "content": TWO_CALLS}]
    m1: Message  # the stream's final message is a ParsedMessage, a Message subclass
    if stream:
        async with c.messages.stream(model=model, max_tokens=300, tools=TOOLS, messages=first) as s:
            m1 = await s.get_final_message()
    else:
        m1 = await c.messages.create(model=model, max_tokens=300, tools=TOOLS, messages=first)
    assert m1.stop_reason == "tool_use"
    uses = [b for b in m1.content if b.type == "tool_use"]
    assert [u.input for u in uses] == [{"city": "Paris"}, {"city": "Rome"}]
    assert all(u.name == "get_weather" and u.id.startswith("toolu_") for u in uses)
    assert len({u.id for u in uses}) == 2
    history = [
        *first,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m1.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": u.id, "content": f"sunny in {u.input}"}
                for u in uses
            ],
        },
    ]
    m2: Message
    if stream:
        async with c.messages.stream(
            model=model, max_tokens=300, tools=TOOLS, messages=history
        ) as s:
            m2 = await s.get_final_message()
    else:
        m2 = await c.messages.create(model=model, max_tokens=300, tools=TOOLS, messages=history)
    assert m2.stop_reason == "end_turn"
    assert m2.content[0].type == "text"
    assert (
        m2.content[0].text
        == "received functionResponse(get_weather), functionResponse(get_weather)"
    )
    return uses


@pytest.mark.parametrize("stream", [False, True])
async def test_two_turn_tool_loop_with_parallel_calls(tmp_path: Path, stream: bool) -> None:
    """On Gemini 3 the first call carries a thought signature: it rides in the tool_use id,
    comes back with the history and reaches Gemini again (the emulator validates it)."""
    async with gateway_stack(tmp_path) as run, _client(run.origin) as c:
        uses = await _tool_loop(c, "gemini-3-pro-preview", stream)
        assert "-ts-" in uses[0].id  # the signed first call
        sent = _last_upstream(run)
        calls = [p for p in sent["contents"][1]["parts"] if "functionCall" in p]
        assert [p["functionCall"]["args"]["city"] for p in calls] == ["Paris", "Rome"]
        sig = calls[0].get("thoughtSignature")
        assert sig and sig != "skip_thought_signature_validator"
        results = [p["functionResponse"] for p in sent["contents"][2]["parts"]]
        assert [r["name"] for r in results] == ["get_weather", "get_weather"]
        assert "Paris" in results[0]["response"]["output"]
        # A tampered id is not rawgate's: its signature is not sent (Gemini would reject it).
        t = uses[0].id
        forged = t[:-3] + ("AAA" if not t.endswith("AAA") else "BBB")
        history: list[Any] = [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": forged, "name": "get_weather", "input": {"city": "X"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": forged, "content": "ok"}]},
        ]  # fmt: skip
        await c.messages.create(
            model="gemini-3-pro-preview", max_tokens=50, tools=TOOLS, messages=history
        )
        part = _last_upstream(run)["contents"][1]["parts"][0]
        assert part.get("thoughtSignature") == "skip_thought_signature_validator"


async def test_thinking_blocks(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.origin) as c:
        prompt = 'think [[emu:thought text="pondering deeply"]]'
        msg = await c.messages.create(
            model="gemini-2.5-flash",
            max_tokens=2000,
            thinking={"type": "enabled", "budget_tokens": 1024},
            messages=[{"role": "user", "content": prompt}],
        )
        kinds = [b.type for b in msg.content]
        assert kinds[0] == "thinking" and "text" in kinds
        assert msg.content[0].type == "thinking"
        assert "pondering deeply" in msg.content[0].thinking
        sent = _last_upstream(run)
        assert sent["generationConfig"]["thinkingConfig"] == {
            "thinkingBudget": 1024,
            "includeThoughts": True,
        }
        async with c.messages.stream(
            model="gemini-2.5-flash",
            max_tokens=2000,
            thinking={"type": "enabled", "budget_tokens": 1024},
            messages=[{"role": "user", "content": prompt}],
        ) as s:
            thoughts = ""
            async for ev in s:
                if ev.type == "thinking":
                    thoughts += ev.thinking
            final = await s.get_final_message()
        assert "pondering deeply" in thoughts
        assert final.content[0].type == "thinking"


async def test_max_tokens_and_refusal_stop_reasons(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.origin) as c:
        long = "word " * 200
        msg = await c.messages.create(
            model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": long}]
        )
        assert msg.stop_reason == "max_tokens"
        assert _last_upstream(run)["generationConfig"]["maxOutputTokens"] == 5
        async with c.messages.stream(
            model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": long}]
        ) as s:
            assert (await s.get_final_message()).stop_reason == "max_tokens"
        bad = "tell me [[emu:finish reason=SAFETY]]"
        msg = await c.messages.create(
            model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": bad}]
        )
        assert msg.stop_reason == "refusal"
        async with c.messages.stream(
            model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": bad}]
        ) as s:
            assert (await s.get_final_message()).stop_reason == "refusal"
        stop = await c.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=50,
            stop_sequences=["STOPHERE"],
            messages=[{"role": "user", "content": '[[emu:reply text="abc STOPHERE"]]'}],
        )
        assert stop.content[0].type == "text" and "STOPHERE" not in stop.content[0].text
        assert _last_upstream(run)["generationConfig"]["stopSequences"] == ["STOPHERE"]


async def test_count_tokens_is_the_documented_estimate(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.origin) as c:
        r = await c.messages.count_tokens(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "a" * 400}]
        )
        assert r.input_tokens == 100
        system = "s" * 40
        image: ImageBlockParam = {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        }
        r = await c.messages.count_tokens(
            model="claude-sonnet-4-5",
            system=system,
            tools=TOOLS,
            messages=[{"role": "user", "content": [{"type": "text", "text": "a" * 400}, image]}],
        )
        chars = 40 + 400 + len(orjson.dumps(TOOLS[0]))
        assert r.input_tokens == math.ceil(chars / 4) + 258
        # No upstream call: count_tokens never spends an account's quota.
        assert not run.emulator.core.recent
        with pytest.raises(anthropic.BadRequestError):
            await c.messages.count_tokens(model="claude-sonnet-4-5", messages=[])


async def test_models_list_in_both_shapes(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.origin) as c:
        page = await c.models.list(limit=3)
        ids = [m.id for m in page.data]
        assert ids == ["claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5"]
        assert page.has_more and page.last_id == "claude-haiku-5-5"
        assert all(m.type == "model" and m.display_name for m in page.data)
        everything = [m.id async for m in c.models.list(limit=5)]  # auto-pagination (after_id)
        assert "gemini-2.5-pro" in everything and len(everything) == len(set(everything))
        one = await c.models.retrieve("gemini-2.5-flash")
        assert one.id == "gemini-2.5-flash" and one.type == "model"
        with pytest.raises(anthropic.NotFoundError):
            await c.models.retrieve("no-such-model")
        async with httpx.AsyncClient() as h:
            openai_shape = (await h.get(run.origin + "/v1/models")).json()
        assert openai_shape["object"] == "list" and openai_shape["data"][0]["object"] == "model"


async def test_errors_are_the_sdks_own_types(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.origin) as c:
        user: list[MessageParam] = [
            {"role": "user", "content": "[[emu:error status=429 limit=10 retry_delay=2s]]"}
        ]
        with pytest.raises(anthropic.RateLimitError) as rl:
            await c.messages.create(model="gemini-2.5-pro", max_tokens=10, messages=user)
        assert rl.value.response.headers["retry-after"] == "2"
        assert rl.value.response.headers["retry-after-ms"] == "2000"
        assert rl.value.request_id == rl.value.response.headers["x-request-id"]
        assert _body(rl.value)["error"]["type"] == "rate_limit_error"

        # A spent quota (limit: 0) is final: no retry can fix it, and the SDK is told so.
        user = [{"role": "user", "content": "[[emu:error status=429]]"}]
        with pytest.raises(anthropic.RateLimitError) as rl:
            await c.messages.create(model="gemini-2.0-flash", max_tokens=10, messages=user)
        assert rl.value.response.headers["x-should-retry"] == "false"
        assert "retry-after" not in rl.value.response.headers

        user = [{"role": "user", "content": "[[emu:error status=503]]"}]
        with pytest.raises(anthropic.OverloadedError) as ov:
            await c.messages.create(model="gemini-2.5-flash-lite", max_tokens=10, messages=user)
        assert ov.value.status_code == 529
        assert _body(ov.value)["error"]["type"] == "overloaded_error"

        with pytest.raises(anthropic.BadRequestError) as br:
            await c.messages.create(
                model="claude-sonnet-4-5", max_tokens=0, messages=[{"role": "user", "content": "x"}]
            )
        assert "max_tokens" in br.value.message
        assert _body(br.value)["type"] == "error"

        # Vector 9: Gemini's context overflow in the words Claude Code's compaction parses.
        msg = ("The input token count (1200293) exceeds the maximum number of tokens allowed"
               " (1048576).")  # fmt: skip
        user = [{"role": "user", "content": f'[[emu:error status=400 message="{msg}"]]'}]
        with pytest.raises(anthropic.BadRequestError) as br:
            await c.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=user)
        assert (
            _body(br.value)["error"]["message"]
            == "prompt is too long: 1200293 tokens > 1048576 maximum"
        )
        assert br.value.response.headers["x-should-retry"] == "false"
        assert br.value.response.headers["x-mapped-model"] == run.cfg.routing.default_model


async def test_stream_error_after_the_200_is_an_error_event(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.origin) as c:
        user: Any = [{"role": "user", "content": "abc def ghi [[emu:stream_error after=1]]"}]
        with pytest.raises(anthropic.APIStatusError):
            async with c.messages.stream(
                model="claude-sonnet-4-5", max_tokens=50, messages=user
            ) as s:
                await s.get_final_message()


async def test_auth_on_gives_authentication_error(tmp_path: Path) -> None:
    cfg = {"auth": {"mode": "strict", "api_keys": ["sk-right"]}}
    async with gateway_stack(tmp_path, config=cfg) as run:
        async with _client(run.origin) as c:
            with pytest.raises(anthropic.AuthenticationError) as au:
                await c.messages.create(
                    model="claude-sonnet-4-5",
                    max_tokens=10,
                    messages=[{"role": "user", "content": "x"}],
                )
            # rawgate's own refusal, in Anthropic's shape, and final (E6).
            assert _body(au.value)["type"] == "error"
            assert _body(au.value)["error"]["type"] == "authentication_error"
            assert au.value.response.headers["x-should-retry"] == "false"
            with pytest.raises(anthropic.AuthenticationError) as au:
                await c.messages.count_tokens(
                    model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}]
                )
            assert _body(au.value)["error"]["type"] == "authentication_error"
        # x-api-key (what Claude Code sends for ANTHROPIC_API_KEY) and Bearer both work.
        for kw in ({"api_key": "sk-right"}, {"auth_token": "sk-right", "api_key": None}):
            async with anthropic.AsyncAnthropic(base_url=run.origin, max_retries=0, **kw) as ok:
                m = await ok.messages.create(
                    model="claude-sonnet-4-5",
                    max_tokens=10,
                    messages=[{"role": "user", "content": "hi"}],
                )
                assert m.content


async def test_probe_telemetry_and_signature_key(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient() as h:
        assert (await h.get(run.origin + "/")).status_code == 200
        assert (await h.head(run.origin + "/")).status_code == 200
        r = await h.post(run.origin + "/api/event_logging/batch", json={"events": []})
        assert r.status_code == 200 and r.json() == {}
    cfg = {"auth": {"mode": "strict", "api_keys": ["sk-right"]}}
    async with gateway_stack(tmp_path, config=cfg) as run, httpx.AsyncClient() as h:
        assert (await h.head(run.origin + "/")).status_code == 401  # strict: every route
        ok = await h.head(run.origin + "/", headers={"x-api-key": "sk-right"})
        assert ok.status_code == 200
    key_file = tmp_path / "signature_key"
    assert len(key_file.read_bytes()) == 32
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    key = key_file.read_bytes()
    async with gateway_stack(tmp_path):  # a restart keeps the key: old histories stay valid
        pass
    assert key_file.read_bytes() == key


async def test_base_url_with_v1_gets_a_404_that_names_the_fix(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        with pytest.raises(anthropic.NotFoundError) as nf:
            await c.messages.create(
                model="claude-sonnet-4-5",
                max_tokens=10,
                messages=[{"role": "user", "content": "x"}],
            )
        assert f"set it (ANTHROPIC_BASE_URL) to {run.origin}" in nf.value.message


async def test_pings_while_gemini_is_quiet(tmp_path: Path) -> None:
    """limits.sse_heartbeat_s sends Anthropic `ping` events between whole events; the SDK
    skips them and the text is intact."""
    cfg = {"limits": {"sse_heartbeat_s": 0.05}}
    async with gateway_stack(tmp_path, config=cfg) as run, httpx.AsyncClient() as h:
        body: dict[str, Any] = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 100,
            "stream": True,
            "messages": [
                {"role": "user", "content": "[[emu:chunks n=3]] [[emu:delay ms=300]] quiet"}
            ],
        }
        async with h.stream("POST", run.origin + "/v1/messages", json=body) as r:
            raw = b"".join([c async for c in r.aiter_bytes()])
        ping = b'event: ping\ndata: {"type":"ping"}\n\n'
        assert ping in raw
        assert raw.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        async with (
            _client(run.origin) as c,
            c.messages.stream(
                model="claude-sonnet-4-5", max_tokens=100, messages=body["messages"]
            ) as s,
        ):
            assert await s.get_final_text() == "quiet"


def test_signature_key_made_once_and_shared(tmp_path: Path) -> None:
    """Workers and instances sharing a home start at once: they all end with one key."""
    import threading

    from rawgate.gateway.fronts.anthropic import load_signature_key

    keys: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: keys.append(load_signature_key(tmp_path))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signature_key"]  # no temp files left
    (tmp_path / "signature_key").write_bytes(b"short")  # a truncated file is replaced
    fresh = load_signature_key(tmp_path)
    assert len(fresh) == 32 and fresh != keys[0]
