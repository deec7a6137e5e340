"""End to end: the official openai SDK -> rawgate (real listener) -> the emulator, on loopback."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx2 as httpx
import openai
import pytest

from tests.helpers_gateway import gateway_stack

pytestmark = pytest.mark.anyio


def _client(base_url: str, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0, **kw)  # type: ignore[arg-type]


async def test_chat_non_stream_and_stream(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run:
        async with _client(run.base_url) as c:
            r = await c.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hello there"}]
            )
            chat = r.parse()
            assert r.headers["x-mapped-model"] == run.cfg.routing.default_model
            assert r.headers["x-account-email"] == "emulator-demo"
            assert r.headers["x-request-id"]
            assert "hello there" in (chat.choices[0].message.content or "")
            assert chat.choices[0].finish_reason == "stop"
            assert chat.usage is not None and chat.usage.prompt_tokens > 0
            stream = await c.chat.completions.create(
                model="gemini-2.5-flash",
                messages=[{"role": "user", "content": "stream me"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            text = ""
            usage = None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    usage = chunk.usage
            assert "stream me" in text
            assert usage is not None and usage.completion_tokens > 0


async def test_raw_stream_ends_with_done(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient() as h:
        body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        async with h.stream("POST", run.base_url + "/chat/completions", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            raw = b"".join([c async for c in r.aiter_bytes()])
        assert raw.endswith(b"data: [DONE]\n\n")


async def test_responses_and_completions_and_models(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run:
        async with _client(run.base_url) as c:
            resp = await c.responses.create(
                model="gpt-4o", instructions="You review code.", input="find the bug"
            )
            assert resp.status == "completed"
            assert "find the bug" in resp.output_text
            async with c.responses.stream(model="gpt-4o", input="streamed words") as s:
                async for _ in s:
                    pass
                final = await s.get_final_response()
            assert "streamed words" in final.output_text
            cmpl = await c.completions.create(model="gpt-4o", prompt="legacy prompt")
            assert "legacy prompt" in cmpl.choices[0].text
            models = await c.models.list()
            ids = [m.id for m in models.data]
            assert "gemini-2.5-flash" in ids and "gpt-4o" in ids


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL = '[[emu:tool_call name=get_weather args={"city":"Paris"} signature=sig-abc]]'


async def test_chat_tool_call_round_trip_over_two_turns(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        model = "gemini-3-flash-preview"  # needs its thought signature back on the next turn
        first = await c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "weather in Paris? " + CALL}],
            tools=[WEATHER],  # type: ignore[list-item]
        )
        msg = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls"
        assert msg.tool_calls and msg.tool_calls[0].function.name == "get_weather"  # type: ignore[union-attr]
        tc = msg.tool_calls[0]
        second = await c.chat.completions.create(
            model=model,
            messages=[
                {"role": "user", "content": "weather in Paris? " + CALL},
                msg.model_dump(exclude_none=True),  # type: ignore[list-item]
                {"role": "tool", "tool_call_id": tc.id, "content": '{"temp_c": 21}'},
                {"role": "user", "content": "thanks, summarise"},
            ],
            tools=[WEATHER],  # type: ignore[list-item]
        )
        assert second.choices[0].finish_reason == "stop"
        assert "summarise" in (second.choices[0].message.content or "")


async def test_responses_tool_call_round_trip_with_previous_response_id(tmp_path: Path) -> None:
    tool = {
        "type": "function",
        "name": "get_weather",
        "parameters": WEATHER["function"]["parameters"],  # type: ignore[index]
    }
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        model = "gemini-3-flash-preview"
        first = await c.responses.create(model=model, input="weather? " + CALL, tools=[tool])  # type: ignore[list-item]
        calls = [o for o in first.output if o.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "get_weather"
        second = await c.responses.create(
            model=model,
            previous_response_id=first.id,
            input=[
                {"type": "function_call_output", "call_id": calls[0].call_id, "output": "21C"},
                {"role": "user", "content": "and now?"},
            ],
            tools=[tool],  # type: ignore[list-item]
        )
        assert second.status == "completed" and "and now?" in second.output_text
        with pytest.raises(openai.BadRequestError) as ei:
            await c.responses.create(model=model, previous_response_id="resp_nope", input="x")
        assert ei.value.code == "previous_response_not_found"


async def test_accounts_added_while_running_are_picked_up(tmp_path: Path) -> None:
    from rawgate.accounts.store import AccountStore

    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        r = await c.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "a"}]
        )
        assert r.headers["x-account-email"] == "emulator-demo"
        key = "key-hot-reload-aaaaaaaaaaaaaaa"
        run.emulator.core.creds.api_keys.add(key)  # the emulator learns it like Google would
        AccountStore(tmp_path / "accounts.json").add_api_key(key, label="hot")
        seen = ""
        for _ in range(40):  # the server polls accounts.json every second
            await anyio.sleep(0.1)
            r = await c.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": "b"}]
            )
            seen = r.headers["x-account-email"]
            if seen == "hot":
                break
        assert seen == "hot"
        # Counters are written back in batches (and on shutdown) without tearing the file.
    stored = AccountStore(tmp_path / "accounts.json").load()
    assert stored[0].requests >= 1
