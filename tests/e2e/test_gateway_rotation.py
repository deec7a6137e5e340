"""Retries, rotation, cooldowns and OAuth end to end: openai SDK -> rawgate -> emulator."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import httpx2 as httpx
import openai
import pytest

from rawgate.accounts.store import AccountStore
from rawgate.emulator.server import DEMO_ACCOUNT, Settings
from tests.helpers_gateway import gateway_stack

pytestmark = pytest.mark.anyio

TWO_KEYS = [("key-aaaaaaaaaaaaaaaaaaaaaaaa", "A"), ("key-bbbbbbbbbbbbbbbbbbbbbbbb", "B")]
KEY_A = TWO_KEYS[0][0]
COOL_A = f"[[emu:error status=429 retry_delay=30s limit=10 for={KEY_A}]]"


def _client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0)


async def _chat(
    c: openai.AsyncOpenAI, text: str, model: str = "gemini-2.5-flash"
) -> tuple[str, str]:
    r = await c.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}]
    )
    return r.headers["x-account-email"], r.parse().choices[0].message.content or ""


async def test_429_rotates_and_the_cooling_account_is_skipped(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, _client(run.base_url) as c:
        for _ in range(2):  # whichever account round robin starts with, A answers 429 once
            who, text = await _chat(c, COOL_A + " hi")
            assert who == "B" and "hi" in text
        assert run.emulator.stats.get("quota_429", 0) >= 1
        # A cools for 30 s on that model: every next request goes to B without trying A again.
        before = run.emulator.stats.get("quota_429", 0)
        for _ in range(4):
            who, _ = await _chat(c, "plain")
            assert who == "B"
        assert run.emulator.stats.get("quota_429", 0) == before
        snap = run.gateway.scheduler.snapshot(time.monotonic())
        cooling = {s["id"]: s for s in snap}
        assert any("gemini-2.5-flash" in str(s) for s in cooling.values())
        # Another model is not cooling on A.
        seen = {(await _chat(c, "other", model="gemini-2.5-pro"))[0] for _ in range(4)}
        assert seen == {"A", "B"}


async def test_every_account_cooling_gives_429_with_retry_after(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, _client(run.base_url) as c:
        with pytest.raises(openai.RateLimitError) as ei:
            await _chat(c, "[[emu:error status=429 retry_delay=20s limit=10]] x")
        assert ei.value.response.headers["x-mapped-model"] == "gemini-2.5-flash"
        assert 19 <= float(ei.value.response.headers["retry-after"]) <= 21
        # Both accounts are now cooling for that model: rawgate answers by itself, upstream idle.
        stats = run.emulator.stats
        calls = stats.get("generate", 0) + stats.get("quota_429", 0)
        with pytest.raises(openai.RateLimitError) as ei2:
            await _chat(c, "no directive")
        body = ei2.value.body
        assert isinstance(body, dict) and body["code"] == "rate_limit_exceeded"
        assert 1 <= int(ei2.value.response.headers["retry-after"]) <= 21
        assert (
            run.emulator.stats.get("generate", 0) + run.emulator.stats.get("quota_429", 0) == calls
        )


async def test_5xx_rotates_and_all_5xx_is_not_a_429(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, _client(run.base_url) as c:
        who, text = await _chat(c, f"[[emu:error status=503 for={KEY_A}]] ok")
        assert who == "B" and "ok" in text
        with pytest.raises(openai.InternalServerError) as ei:
            await _chat(c, "[[emu:error status=500]] boom", model="gemini-2.5-pro")
        assert ei.value.status_code == 502
        assert run.emulator.stats.get("status_500", 0) == 2  # both accounts, then no more


async def test_400_is_returned_at_once(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, _client(run.base_url) as c:
        with pytest.raises(openai.BadRequestError):
            await _chat(c, "[[emu:error status=400 message=bad]] x")
        assert run.emulator.stats.get("status_400", 0) == 1


DROP = "[[emu:chunks n=4]] [[emu:drop after=1]] a b c d"


async def test_mid_stream_failure_is_not_retried(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, httpx.AsyncClient() as h:
        body = {
            "model": "gemini-2.5-flash",
            "stream": True,
            "messages": [{"role": "user", "content": DROP}],
        }
        async with h.stream("POST", run.base_url + "/chat/completions", json=body) as r:
            assert r.status_code == 200
            raw = b"".join([x async for x in r.aiter_bytes()])
        assert b'"error"' in raw and not raw.endswith(b"data: [DONE]\n\n")
        assert run.emulator.stats.get("stream", 0) == 1


MALFORMED = "[[emu:finish reason=MALFORMED_FUNCTION_CALL]] call the tool"


@pytest.mark.parametrize("stream", [True, False])
async def test_a_malformed_turn_is_the_models_failure_not_the_accounts(
    tmp_path: Path, stream: bool
) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, httpx.AsyncClient() as h:
        body = {
            "model": "gemini-2.5-flash",
            "stream": stream,
            "messages": [{"role": "user", "content": MALFORMED}],
        }
        r = await h.post(run.base_url + "/chat/completions", json=body)
        if stream:
            assert r.status_code == 200
            assert b"malformed_function_call" in r.content
        else:
            assert r.status_code == 502
            assert r.json()["error"]["code"] == "malformed_function_call"
        # Neither account is blamed: no breaker streak, no cooldown, both keep answering.
        snap = run.gateway.scheduler.snapshot(time.monotonic())
        assert [s["consecutive_failures"] for s in snap] == [0, 0]
        assert all(s["breaker"] == "closed" for s in snap)
        async with _client(run.base_url) as c:
            seen = {(await _chat(c, "plain"))[0] for _ in range(4)}
        assert seen == {"A", "B"}


async def test_oauth_refresh_once_under_50_concurrent_requests(tmp_path: Path) -> None:
    AccountStore(tmp_path / "accounts.json").add_oauth(
        DEMO_ACCOUNT.refresh_token, email=DEMO_ACCOUNT.email
    )
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        results: list[str] = []

        async def one(i: int) -> None:
            results.append((await _chat(c, f"concurrent {i}"))[0])

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
        assert results == [DEMO_ACCOUNT.email] * 50
        assert run.gateway.tokens.refresh_count == 1
        assert run.emulator.stats.get("token", 0) == 1
        assert run.emulator.stats.get("load_code_assist", 0) == 1
        stored = AccountStore(tmp_path / "accounts.json").load()[0]
        for _ in range(50):  # the discovered project is written back once, in the background
            if stored.project:
                break
            await anyio.sleep(0.05)
            stored = AccountStore(tmp_path / "accounts.json").load()[0]
        assert stored.project == DEMO_ACCOUNT.project
        # The token expires: the next burst refreshes exactly once more.
        run.emulator.advance(7200)
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
        assert run.gateway.tokens.refresh_count == 2


async def test_invalid_grant_disables_the_account_and_another_answers(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "accounts.json")
    store.add_oauth(DEMO_ACCOUNT.refresh_token, email=DEMO_ACCOUNT.email)
    store.add_api_key(TWO_KEYS[1][0], label="B")
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        run.emulator.revoke(DEMO_ACCOUNT.refresh_token)
        for _ in range(2):
            who, text = await _chat(c, "still works")
            assert who == "B" and "still works" in text
        accounts = {a.display_name(): a for a in run.gateway.accounts}
        assert not accounts[DEMO_ACCOUNT.email].enabled
        assert "invalid_grant" in accounts[DEMO_ACCOUNT.email].disabled_reason
        for _ in range(50):
            stored = {a.display_name(): a for a in store.load()}
            if not stored[DEMO_ACCOUNT.email].enabled:
                break
            await anyio.sleep(0.05)
        assert not stored[DEMO_ACCOUNT.email].enabled


async def test_bad_key_gets_401(tmp_path: Path) -> None:
    cfg = {"auth": {"mode": "strict", "api_keys": ["sk-right"]}}
    async with gateway_stack(tmp_path, config=cfg) as run:
        async with openai.AsyncOpenAI(
            base_url=run.base_url, api_key="sk-wrong", max_retries=0
        ) as c:
            with pytest.raises(openai.AuthenticationError):
                await _chat(c, "x")
        async with openai.AsyncOpenAI(
            base_url=run.base_url, api_key="sk-right", max_retries=0
        ) as c:
            assert "x" in (await _chat(c, "x"))[1]


async def test_quota_per_key_rotates(tmp_path: Path) -> None:
    settings = Settings(quota_requests=2, quota_window_s=60.0)
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS, settings=settings) as run:
        async with _client(run.base_url) as c:
            seen = [(await _chat(c, f"q{i}"))[0] for i in range(4)]
            assert sorted(seen) == ["A", "A", "B", "B"]
            with pytest.raises(openai.RateLimitError):
                await _chat(c, "over quota")


async def test_a_cooled_account_returns_when_its_cooldown_ends(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, _client(run.base_url) as c:
        lite = "gemini-2.5-flash-lite"
        d = f"[[emu:error status=429 retry_delay=0.5s limit=10 for={KEY_A}]]"
        assert {(await _chat(c, d + " x", model=lite))[0] for _ in range(2)} == {"B"}
        assert {(await _chat(c, "y", model=lite))[0] for _ in range(3)} == {"B"}
        await anyio.sleep(0.6)
        assert "A" in {(await _chat(c, "z", model=lite))[0] for _ in range(2)}
