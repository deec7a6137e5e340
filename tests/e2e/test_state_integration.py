"""The shared state wired into the running server (issue 16's integration step): two gateway
stacks (in-process, each with its own emulator, the same demo account id) on one real
redis-server share client-key limits, stored Responses and cooldowns; an unreachable Redis shows
in /healthz and /metrics while requests keep being served.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import orjson
import pytest

from rawgate.cli.stack import DEMO_ACCOUNT_ID
from tests.helpers_gateway import Running, gateway_stack
from tests.helpers_redis import RedisServer, free_port

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
WAIT_S = 5.0


def _redis(url: str, prefix: str, **more: Any) -> dict[str, Any]:
    return {"state": {"backend": "redis", "redis_url": url, "key_prefix": prefix, **more}}


def _chat(text: str = "hi", model: str = "gemini-2.5-flash") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


@asynccontextmanager
async def _two(home: Path, url: str) -> AsyncIterator[tuple[Running, Running]]:
    cfg = _redis(url, f"t{secrets.token_hex(4)}:")
    (home / "a").mkdir()
    (home / "b").mkdir()
    async with (
        gateway_stack(home / "a", config=cfg) as a,
        gateway_stack(home / "b", config=cfg) as b,
    ):
        yield a, b


async def _until(pred: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not pred():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        await anyio.sleep(0.01)


async def test_a_key_limited_to_n_rpm_gets_exactly_n_through_both(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with _two(tmp_path, redis_server.url) as (a, b):
        sa, sb = a.gateway.state, b.gateway.state
        assert sa is not None and sb is not None
        _, key = await sa.add_key("fleet", rpm=5)
        await _until(lambda: sb.lookup_key(key) is not None, "b learns the new key")
        left = 60.0 - time.time() % 60.0
        if left < 5.0:  # one fixed UTC-minute window for the whole burst
            await anyio.sleep(left + 0.05)
        auth = {"authorization": f"Bearer {key}"}
        codes: list[int] = []
        async with httpx.AsyncClient() as c:

            async def one(origin: str) -> None:
                r = await c.post(origin + CHAT, json=_chat(), headers=auth)
                codes.append(r.status_code)

            async with anyio.create_task_group() as tg:
                for i in range(12):
                    tg.start_soon(one, (a, b)[i % 2].origin)
        assert sorted(codes) == [200] * 5 + [429] * 7
        served = a.emulator.stats.get("generate", 0) + b.emulator.stats.get("generate", 0)
        assert served == 5
        # Both instances recorded their answers' usage for the key in the one store.
        deadline = time.monotonic() + WAIT_S
        while True:
            rows = (await sa.usage("key", "fleet", 3600)).get("fleet", [])
            if sum(u.requests for u in rows) == 5:
                break
            assert time.monotonic() < deadline, f"usage {rows}"
            await anyio.sleep(0.05)
        assert sum(u.tokens_in for u in rows) > 0 and sum(u.tokens_out for u in rows) > 0


async def test_previous_response_id_continues_on_the_other_instance(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with _two(tmp_path, redis_server.url) as (a, b), httpx.AsyncClient() as c:
        body: dict[str, Any] = {"model": "gemini-2.5-flash", "input": "remember the word kiwi"}
        r = await c.post(a.origin + "/v1/responses", json=body)
        assert r.status_code == 200, r.text
        first = r.json()["id"]
        r = await c.post(
            b.origin + "/v1/responses",
            json={"model": "gemini-2.5-flash", "input": "and now?", "previous_response_id": first},
        )
        assert r.status_code == 200, r.text
        # A streamed one stored on b continues on a.
        body = {"model": "gemini-2.5-flash", "input": "streamed", "stream": True}
        r = await c.post(b.origin + "/v1/responses", json=body)
        assert r.status_code == 200
        ids = [line for line in r.text.splitlines() if '"response.completed"' in line]
        assert ids, r.text
        done = orjson.loads(ids[0].removeprefix("data: "))
        r = await c.post(
            a.origin + "/v1/responses",
            json={"model": "gemini-2.5-flash", "input": "more",
                  "previous_response_id": done["response"]["id"]},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        # An unknown id is still the usual 400.
        r = await c.post(
            a.origin + "/v1/responses",
            json={"model": "gemini-2.5-flash", "input": "x", "previous_response_id": "resp_nope"},
        )
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "previous_response_not_found"


async def test_a_429_learned_on_one_instance_cools_the_account_on_the_other(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with _two(tmp_path, redis_server.url) as (a, b), httpx.AsyncClient() as c:
        r = await c.post(
            a.origin + CHAT,
            json=_chat("[[emu:error status=429 retry_delay=30s limit=10]] x", "gemini-2.5-pro"),
        )
        assert r.status_code == 429

        def b_cools() -> bool:
            snap = b.gateway.scheduler.snapshot(time.monotonic())
            return any(s["id"] == DEMO_ACCOUNT_ID and "gemini-2.5-pro" in s["cooldowns"]
                       for s in snap)  # fmt: skip

        await _until(b_cools, "b learns a's cooldown")
        before = b.emulator.stats.get("generate", 0)
        r = await c.post(b.origin + CHAT, json=_chat("plain", "gemini-2.5-pro"))
        assert r.status_code == 429  # rawgate's own "all cooling": b never asked its upstream
        assert 20 <= int(r.headers["retry-after"]) <= 31
        assert b.emulator.stats.get("generate", 0) == before
        # Another model is not cooling on b.
        assert (await c.post(b.origin + CHAT, json=_chat("other"))).status_code == 200


async def test_an_unreachable_redis_is_degraded_in_healthz_and_metrics(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    cfg = _redis(url, "dead:", redis_timeout_ms=100, redis_backoff_max_s=1.0)
    async with gateway_stack(tmp_path, config=cfg) as run, httpx.AsyncClient() as c:
        r = await c.post(run.origin + CHAT, json=_chat())
        assert r.status_code == 200  # served on local state

        async def health() -> dict[str, Any]:
            return (await c.get(run.origin + "/healthz")).json()

        deadline = time.monotonic() + WAIT_S
        while (await health())["state"] != "degraded":
            assert time.monotonic() < deadline, "never degraded"
            await anyio.sleep(0.05)
        metrics = (await c.get(run.origin + "/metrics")).text
        assert 'rawgate_state_degraded{backend="redis"} 1' in metrics
        assert "rawgate_state_degraded_episodes_total" in metrics


async def test_local_state_health_and_metrics(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient() as c:
        h = (await c.get(run.origin + "/healthz")).json()
        assert h["status"] == "ok" and h["state"] == "ok"
        metrics = (await c.get(run.origin + "/metrics")).text
        assert 'rawgate_state_degraded{backend="local"} 0' in metrics


@pytest.mark.parametrize("fail", ["open", "closed"])
async def test_limits_fail_while_redis_is_down(tmp_path: Path, fail: str) -> None:
    srv = RedisServer().start()
    try:
        # A killed server refuses at once: no short timeout needed to see it (a 100 ms one
        # made the request before the kill time out on a busy machine: a 429 in closed mode).
        cfg = _redis(srv.url, "down:", redis_timeout_ms=3000, redis_backoff_max_s=1.0,
                     limits_fail=fail)  # fmt: skip
        async with gateway_stack(tmp_path, config=cfg) as run, httpx.AsyncClient() as c:
            st = run.gateway.state
            assert st is not None
            _, key = await st.add_key("fleet", rpm=100)
            auth = {"authorization": f"Bearer {key}"}
            assert (await c.post(run.origin + CHAT, json=_chat(), headers=auth)).status_code == 200
            srv.kill()  # the key stays known from the local mirror
            r = await c.post(run.origin + CHAT, json=_chat(), headers=auth)
            if fail == "open":
                assert r.status_code == 200
            else:
                assert r.status_code == 429
                assert r.json()["error"]["code"] == "state_unavailable"
                assert int(r.headers["retry-after"]) >= 1
            assert (await c.get(run.origin + "/healthz")).json()["state"] == "degraded"
    finally:
        srv.stop()
