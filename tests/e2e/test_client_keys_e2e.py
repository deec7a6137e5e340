"""Client keys on requests, end to end: `rawgate keys` records (state/, keys.json) authenticate
in the app and are limited by the gateway, over a real socket against the emulator.

What is proven: a key turns auth on under auth.mode = auto; a disabled key is a 401; rpm, tpm
and daily tokens are 429 with Retry-After (OpenAI shape on OpenAI routes, the front's own shape
on a front that has one); a model outside the key's patterns is a 403 naming the model; the
answer's tokens land on the key's windows and usage; auth.api_keys keeps working unlimited.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import openai
import pytest

from rawgate.config import build_config
from rawgate.http.app import GatewayApp
from rawgate.monitor.request_log import query_rows
from rawgate.state.store import open_state
from tests.e2e.test_front_seam import ToyFront
from tests.helpers_gateway import gateway_stack, serve_process

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"


async def _add_key(home: Path, name: str, limits: dict[str, Any] | None = None, **more: Any) -> str:
    async with open_state(build_config({}, {}, {}), home, background=False) as st:
        _, key = await st.add_key(name, **(limits or {}), **more)
    return key


def _log_rows(home: Path) -> list[dict[str, Any]]:
    """The request log's rows (the stack closed: everything is written)."""
    conn = sqlite3.connect(f"file:{home / 'requests.db'}?mode=ro", uri=True)
    try:
        return list(query_rows(conn))
    finally:
        conn.close()


async def _clear_of_minute_boundary() -> None:
    """Limits are fixed UTC-minute windows: start a burst that must fit one window at least
    5 s before the minute ends (waits at most 5 s)."""
    left = 60.0 - time.time() % 60.0
    if left < 5.0:
        await anyio.sleep(left + 0.05)


def _chat(model: str = "gemini-2.5-flash", text: str = "hi") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_a_client_key_turns_auth_on_and_answers(tmp_path: Path) -> None:
    key = await _add_key(tmp_path, "team-a")
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.origin) as c:
        r = await c.post(CHAT, json=_chat())
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = await c.post(CHAT, json=_chat(), headers=_auth("rk-" + "x" * 43))
        assert r.status_code == 401
        # /healthz stays open (auto -> all_except_health) and tells the state's health.
        h = await c.get("/healthz")
        assert h.status_code == 200 and h.json()["state"] == "ok"
        r = await c.post(CHAT, json=_chat(), headers=_auth(key))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        # The OpenAI SDK with the key as its api_key.
        async with openai.AsyncOpenAI(base_url=run.base_url, api_key=key, max_retries=0) as sdk:
            out = await sdk.chat.completions.create(**_chat())  # type: ignore[call-overload]
            assert out.choices[0].message.content
        # The answer's tokens were recorded for the key, the account and the model.
        usage = await run.gateway.state.usage("key", "team-a", 3600)  # type: ignore[union-attr]
        rows = usage["team-a"]
        assert sum(u.requests for u in rows) == 2
        assert sum(u.tokens_in for u in rows) > 0 and sum(u.tokens_out for u in rows) > 0


async def test_rpm_limit_is_a_429_with_retry_after(tmp_path: Path) -> None:
    key = await _add_key(tmp_path, "small", rpm=2)
    async with (
        gateway_stack(tmp_path) as run,
        openai.AsyncOpenAI(base_url=run.base_url, api_key=key, max_retries=0) as sdk,
    ):
        await _clear_of_minute_boundary()
        ok = 0
        refused: list[openai.RateLimitError] = []
        for _ in range(4):
            try:
                await sdk.chat.completions.create(**_chat())  # type: ignore[call-overload]
                ok += 1
            except openai.RateLimitError as e:
                refused.append(e)
        assert ok == 2 and len(refused) == 2
        err = refused[-1]
        assert err.status_code == 429
        body = err.body
        assert isinstance(body, dict) and body["code"] == "key_rate_limited"
        assert "requests per minute" in body["message"] and "try again" in body["message"]
        assert 1 <= int(err.response.headers["retry-after"]) <= 60
        assert err.response.headers["x-mapped-model"] == "gemini-2.5-flash"
    # The request log names the key on every row; the refusals never reached an account.
    rows = _log_rows(tmp_path)
    assert [r["status"] for r in rows] == [200, 200, 429, 429]
    assert {r["key_name"] for r in rows} == {"small"}
    assert [r["error_code"] for r in rows[2:]] == ["key_rate_limited"] * 2
    assert [r["attempts"] for r in rows[2:]] == [[], []]


async def test_token_limits_count_the_answers_tokens(tmp_path: Path) -> None:
    key = await _add_key(tmp_path, "tok", tpm=1)
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.origin) as c:
        await _clear_of_minute_boundary()
        r = await c.post(CHAT, json=_chat(), headers=_auth(key))
        assert r.status_code == 200
        # Its tokens are now over tpm = 1: the next request waits for the next minute.
        r = await c.post(CHAT, json=_chat(), headers=_auth(key))
        assert r.status_code == 429, r.text
        assert "tokens per minute" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 60
    day = await _add_key(tmp_path, "day", daily_tokens=1)
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.origin) as c:
        assert (await c.post(CHAT, json=_chat(), headers=_auth(day))).status_code == 200
        r = await c.post(CHAT, json=_chat(), headers=_auth(day))
        assert r.status_code == 429 and "tokens per day" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 86400


async def test_a_model_outside_the_patterns_is_a_403(tmp_path: Path) -> None:
    key = await _add_key(tmp_path, "pro-only", models=["gemini-2.5-pro*"])
    cfg = {"routing": {"custom_mapping": {"my-pro": "gemini-2.5-pro"}}}
    async with (
        gateway_stack(tmp_path, config=cfg) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        r = await c.post(CHAT, json=_chat("gemini-2.5-flash"), headers=_auth(key))
        assert r.status_code == 403
        e = r.json()["error"]
        assert e["code"] == "model_not_allowed" and e["param"] == "model"
        assert "gemini-2.5-flash" in e["message"]
        # Patterns match the model the request maps to: an alias of an allowed model passes.
        r = await c.post(CHAT, json=_chat("my-pro"), headers=_auth(key))
        assert r.status_code == 200, r.text
        assert r.headers["x-mapped-model"] == "gemini-2.5-pro"


async def test_a_disabled_key_is_a_401_and_api_keys_stay_unlimited(tmp_path: Path) -> None:
    key = await _add_key(tmp_path, "gone", rpm=1)
    async with open_state(build_config({}, {}, {}), tmp_path, background=False) as st:
        await st.set_key_enabled("gone", False)
    cfg = {"auth": {"api_keys": ["sk-admin-key"]}}
    async with (
        gateway_stack(tmp_path, config=cfg) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        r = await c.post(CHAT, json=_chat(), headers=_auth(key))
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "key_disabled" and "gone" in r.text
        assert key not in r.text
        for _ in range(3):  # auth.api_keys: no limits
            r = await c.post(CHAT, json=_chat(), headers=_auth("sk-admin-key"))
            assert r.status_code == 200


async def test_a_key_added_while_running_turns_auth_on(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.origin) as c:
        assert (await c.post(CHAT, json=_chat())).status_code == 200  # auto on loopback: off
        st = run.gateway.state
        assert st is not None
        _, key = await st.add_key("late")
        assert (await c.post(CHAT, json=_chat())).status_code == 401
        assert (await c.post(CHAT, json=_chat(), headers=_auth(key))).status_code == 200
        await st.remove_key("late")
        assert (await c.post(CHAT, json=_chat())).status_code == 200  # no key left: off again


async def test_explicit_auth_off_still_limits_a_presented_key(tmp_path: Path) -> None:
    key = await _add_key(tmp_path, "one", rpm=1)
    cfg = {"auth": {"mode": "off"}}
    async with (
        gateway_stack(tmp_path, config=cfg) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        assert (await c.post(CHAT, json=_chat())).status_code == 200  # off: no key needed
        await _clear_of_minute_boundary()
        codes = [(await c.post(CHAT, json=_chat(), headers=_auth(key))).status_code
                 for _ in range(3)]  # fmt: skip
        assert codes == [200, 429, 429]


async def test_strict_mode_with_client_keys_only_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAWGATE_HOME", str(tmp_path))
    key = await _add_key(tmp_path, "only")
    cfg = {"auth": {"mode": "strict"}}
    async with (
        gateway_stack(tmp_path, config=cfg) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        assert (await c.get("/healthz")).status_code == 401  # strict: every route
        assert (await c.get("/healthz", headers=_auth(key))).status_code == 200
        assert (await c.post(CHAT, json=_chat(), headers=_auth(key))).status_code == 200


async def test_a_front_with_its_own_error_shape_gets_its_429_and_403(tmp_path: Path) -> None:
    key = await _add_key(tmp_path, "toy", rpm=1, models=["gemini-2.5-flash"])
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.origin) as c:
        app = run.server.app  # typed as the seam's App protocol; the stack builds a GatewayApp
        assert isinstance(app, GatewayApp)
        run.gateway.add_front(app, "/toy", ToyFront())
        r = await c.post("/toy", content=b"gemini-2.5-pro\nhi", headers=_auth(key))
        assert r.status_code == 403 and r.text == "toy-error 403 model_not_allowed"
        await _clear_of_minute_boundary()
        codes = []
        for _ in range(3):
            r = await c.post("/toy", content=b"gemini-2.5-flash\nhi", headers=_auth(key))
            codes.append(r.status_code)
            if r.status_code == 429:
                assert r.text == "toy-error 429 key_rate_limited"
                assert int(r.headers["retry-after"]) >= 1
        assert codes == [200, 429, 429]


def test_serve_workers_enforce_one_limit(tmp_path: Path) -> None:
    """`rawgate serve --workers 2` (real processes, SO_REUSEPORT): the two workers count one
    key's requests in one locked file, so a 4-rpm key gets exactly 4 of 10 through."""
    key = anyio.run(_add_key, tmp_path, "w", {"rpm": 4})
    left = 60.0 - time.time() % 60.0
    if left < 8.0:  # one fixed UTC-minute window for the whole burst (and the start-up)
        time.sleep(left + 0.05)
    with serve_process(tmp_path, "--workers", "2") as origin, httpx.Client() as c:
        codes = []
        for _ in range(10):
            # A new connection each time: the kernel spreads them over both workers.
            r = c.post(origin + CHAT, json=_chat(), headers={**_auth(key), "connection": "close"})
            codes.append(r.status_code)
    assert sorted(codes) == [200] * 4 + [429] * 6
