"""Short rests, the panic threshold and the retry budget end to end: client -> rawgate -> emulator.

Each test reproduces a scenario of issue 12 (items 9 and 11) at suite size over real sockets; the
counts in the comments are what the code before the fix did with the same requests.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest

from rawgate.accounts import scheduler as sched_mod
from rawgate.accounts.store import AccountStore
from rawgate.emulator.server import Settings
from rawgate.emulator.state import OAuthAccount
from tests.helpers_gateway import Running, gateway_stack

pytestmark = pytest.mark.anyio

M = "gemini-2.5-flash"
KEYS = [
    ("key-aaaaaaaaaaaaaaaaaaaaaaaa", "A"),
    ("key-bbbbbbbbbbbbbbbbbbbbbbbb", "B"),
    ("key-cccccccccccccccccccccccc", "C"),
]
KEY_A = KEYS[0][0]


def _body(text: str, stream: bool = False) -> dict[str, Any]:
    return {"model": M, "stream": stream, "messages": [{"role": "user", "content": text}]}


async def _post(h: httpx.AsyncClient, run: Running, text: str) -> httpx.Response:
    return await h.post(run.base_url + "/chat/completions", json=_body(text))


async def _burst(
    h: httpx.AsyncClient, run: Running, n: int, text: str = "plain"
) -> list[httpx.Response]:
    out: list[httpx.Response] = []

    async def one(i: int) -> None:
        out.append(await _post(h, run, f"{text} {i}"))

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return out


def _who(rs: list[httpx.Response]) -> set[str]:
    return {r.headers["x-account-email"] for r in rs}


# ---- item 9: one transient 5xx refuses nobody ------------------------------------------------


async def test_single_account_one_internal_stream_error_then_every_request_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 30 s rest instead of 1 s: the burst is inside the rest however slow the machine is.
    monkeypatch.setattr(sched_mod, "SERVER_REST_S", 30.0)
    async with gateway_stack(tmp_path, api_keys=KEYS[:1]) as run, httpx.AsyncClient() as h:
        body = _body("[[emu:stream_error after=1 status=500]] hiccup", stream=True)
        r = await h.post(run.base_url + "/chat/completions", json=body)
        assert r.status_code == 200 and b'"error"' in r.content  # the one failed request
        snap = run.gateway.scheduler.snapshot(time.monotonic())[0]
        assert snap["cooldowns"][M]["reason"] == "server"  # the account is resting
        before = run.emulator.stats.get("generate", 0)
        rs = await _burst(h, run, 100)
        # Before: 100 of 100 got 503 "all accounts cooling down".
        assert [r.status_code for r in rs] == [200] * 100
        assert run.emulator.stats.get("generate", 0) == before + 100
        assert run.gateway.scheduler.resting_picks >= 1
        # The successes ended the rest: later requests take the normal path again.
        assert run.gateway.scheduler.snapshot(time.monotonic())[0]["cooldowns"] == {}


async def test_requests_go_to_the_resting_account_while_the_other_has_a_real_429(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sched_mod, "SERVER_REST_S", 30.0)
    async with gateway_stack(tmp_path, api_keys=KEYS[:2]) as run, httpx.AsyncClient() as h:
        cool_a = f"[[emu:error status=429 retry_delay=30s limit=10 for={KEY_A}]] a"
        t0 = time.monotonic()
        for _ in range(2):  # whichever account round robin starts with, A answers 429 once
            assert (await _post(h, run, cool_a)).status_code == 200
        r = await _post(h, run, "[[emu:error status=500 times=1]] b")  # B rests after one 5xx
        assert r.status_code == 502  # A is rate limited: nothing to rotate to, the 5xx is told
        quota_429 = run.emulator.stats.get("quota_429", 0)
        rs = await _burst(h, run, 50)
        # Before: 50 of 50 got 429 (A's cooldown) while B was only resting.
        assert [r.status_code for r in rs] == [200] * 50
        assert _who(rs) == {"B"}
        assert run.emulator.stats.get("quota_429", 0) == quota_429  # A's 429 stays exact
        now = time.monotonic()
        snap = {s["name"]: s for s in run.gateway.scheduler.snapshot(now)}
        assert snap["A"]["cooldowns"][M]["reason"] == "rate_limited"
        # Exactly the upstream's 30 s from the moment of the 429 (which came after t0).
        assert 30.0 - (now - t0) - 0.01 <= snap["A"]["cooldowns"][M]["remaining_s"] <= 30.0


# ---- item 11: rotations that cost the upstream nothing are free ------------------------------


def _oauth_accounts(n: int) -> list[OAuthAccount]:
    return [
        OAuthAccount(f"user{i}@rawgate.invalid", f"1//0gRefresh{i}Token-test", f"proj-{i}")
        for i in range(n)
    ]


@pytest.mark.parametrize("budget", ["default", "zero"])
async def test_revoked_refresh_token_30_concurrent_all_served_by_the_healthy_accounts(
    tmp_path: Path, budget: str
) -> None:
    accounts = _oauth_accounts(3)
    store = AccountStore(tmp_path / "accounts.json")
    for a in accounts:
        store.add_oauth(a.refresh_token, email=a.email, project=a.project)
    cfg: dict[str, Any] = {}
    if budget == "zero":  # no retry budget at all: skipping a dead account still works
        cfg = {"routing": {"retry_budget_ratio": 0.0, "retry_budget_min": 0}}
    settings = Settings(oauth_accounts=tuple(accounts))
    async with gateway_stack(tmp_path, settings=settings, config=cfg) as run:
        run.emulator.revoke(accounts[0].refresh_token)
        async with httpx.AsyncClient() as h:
            rs = await _burst(h, run, 30)
        # Before: 1-5 of 30 got 503 while two healthy accounts sat idle.
        assert [r.status_code for r in rs] == [200] * 30
        assert _who(rs) == {accounts[1].email, accounts[2].email}
        sched = run.gateway.scheduler
        assert sched.retries_allowed == 0 and sched.retries_denied == 0
        dead = {a.display_name(): a for a in run.gateway.accounts}[accounts[0].email]
        assert not dead.enabled


async def test_a_429_account_in_a_30_request_burst_costs_no_retry_budget(
    tmp_path: Path,
) -> None:
    cfg = {"routing": {"retry_budget_ratio": 0.0, "retry_budget_min": 0}}
    async with gateway_stack(tmp_path, api_keys=KEYS, config=cfg) as run:
        async with httpx.AsyncClient() as h:
            rs = await _burst(h, run, 30, f"[[emu:error status=429 retry_delay=30s for={KEY_A}]]")
        # Before (default budget): 1-5 of 30 got 429 "try again in 30 s".
        assert [r.status_code for r in rs] == [200] * 30
        assert _who(rs) == {"B", "C"}
        assert run.emulator.stats.get("quota_429", 0) >= 1
        assert run.gateway.scheduler.retries_allowed == 0


async def test_sequential_requests_with_short_429s_on_one_account_never_get_a_429(
    tmp_path: Path,
) -> None:
    async with gateway_stack(tmp_path, api_keys=KEYS[:2]) as run, httpx.AsyncClient() as h:
        # Code Assist sends 0.5-4 s delays; 0.25 s makes A come back (and 429 again) often.
        text = f"[[emu:error status=429 retry_delay=0.25s for={KEY_A}]] one after another"
        statuses: list[int] = []
        deadline = time.monotonic() + 30.0
        while run.emulator.stats.get("quota_429", 0) < 8 and len(statuses) < 5000:
            assert time.monotonic() < deadline, f"only {run.emulator.stats} after 30 s"
            statuses.append((await _post(h, run, text)).status_code)
        # Before: every 429 beyond the third in 10 s reached the client ("try again in 0.25 s").
        assert set(statuses) == {200}, f"{statuses.count(429)} of {len(statuses)} failed"
        assert run.gateway.scheduler.retries_allowed == 0


async def test_a_5xx_storm_is_still_limited_by_the_retry_budget(tmp_path: Path) -> None:
    n = 20
    cfg = {"routing": {"retry_budget_window_s": 3600.0}}  # one window, however slow the machine
    async with gateway_stack(tmp_path, api_keys=KEYS, config=cfg) as run, httpx.AsyncClient() as h:
        statuses = [(await _post(h, run, f"[[emu:error status=500]] storm {i}")).status_code
                    for i in range(n)]  # fmt: skip
        assert all(s >= 500 for s in statuses)
        sched = run.gateway.scheduler
        # One attempt per request plus at most the floor (3 per 10 s, one request in flight)
        # of re-sends; then the breakers (3 failures in a row) open and the upstream rests.
        assert sched.retries_allowed <= sched_mod.RETRY_BUDGET_MIN
        assert sched.retries_denied >= 1
        assert run.emulator.stats.get("status_500", 0) <= n + sched_mod.RETRY_BUDGET_MIN
        assert all(s["breaker"] != "closed" for s in sched.snapshot(time.monotonic()))


# ---- issue 11: the DEBUG attempt log ---------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_debug_log_tells_each_attempt_and_never_a_secret(tmp_path: Path) -> None:
    oauth = OAuthAccount("ops@rawgate.invalid", "1//0gSecretRefreshTokenZq81", "proj-ops")
    key_b = "AIzaSyTestKeyBbbb0123456789abcdefghijkl"
    store = AccountStore(tmp_path / "accounts.json")
    store.add_oauth(oauth.refresh_token, email=oauth.email, project=oauth.project)
    store.add_api_key(key_b, label="team-b")
    # The OAuth account has no quota at all: every call gets 429 with RetryInfo (window left).
    settings = Settings(oauth_accounts=(oauth,), key_quotas={oauth.email: 0}, quota_window_s=600)
    logger = logging.getLogger("rawgate")
    cap = _Capture()
    old_level = logger.level
    logger.addHandler(cap)
    logger.setLevel(logging.DEBUG)
    try:
        async with gateway_stack(tmp_path, settings=settings) as run, httpx.AsyncClient() as h:
            r = await h.post(
                run.base_url + "/chat/completions",
                json=_body("rotate me"),
                headers={"x-request-id": "req-rotation-1"},
            )
            assert r.status_code == 200 and r.headers["x-account-email"] == "team-b"
            issued = list(run.emulator.core.creds.access)  # the access tokens rawgate got
            sent = [v.decode() for *_, hs, _ in run.emulator.core.recent for k, v in hs
                    if k in (b"authorization", b"x-goog-api-key")]  # fmt: skip
    finally:
        logger.removeHandler(cap)
        logger.setLevel(old_level)
    lines = [x for x in cap.lines if "rid=req-rotation-1 attempt" in x]
    assert len(lines) == 2, cap.lines
    first, second = lines
    assert "attempt 1/2 account=ops@rawgate.invalid model=gemini-2.5-flash status=429" in first
    # A 10-minute wait reads as a spent quota to the client; to the scheduler it is a 429.
    assert "error=insufficient_quota cooldown=rate_limited:" in first
    assert first.endswith(":gemini-2.5-flash decision=rotate")
    left = float(first.split("cooldown=rate_limited:")[1].split("s:")[0])
    assert 590.0 < left <= 600.0  # the upstream's RetryInfo (the window left), not a guess
    assert second.endswith(
        "attempt 2/2 account=team-b model=gemini-2.5-flash status=200 error=- decision=answer"
    )
    # No secret, not even part of one, in anything rawgate logged.
    assert issued and sent
    secrets = {oauth.refresh_token, key_b, *issued, *(s.removeprefix("Bearer ") for s in sent)}
    text = "\n".join(cap.lines)
    for secret in secrets:
        for i in range(len(secret) - 7):
            assert secret[i : i + 8] not in text, f"part of a secret in the log: {secret[:4]}..."


async def test_debug_log_says_why_rawgate_gave_up(tmp_path: Path) -> None:
    logger = logging.getLogger("rawgate")
    cap = _Capture()
    old_level = logger.level
    logger.addHandler(cap)
    logger.setLevel(logging.DEBUG)
    try:
        async with gateway_stack(tmp_path, api_keys=KEYS[:2]) as run, httpx.AsyncClient() as h:
            r = await h.post(
                run.base_url + "/chat/completions",
                json=_body("[[emu:error status=400 message=nope]] x"),
                headers={"x-request-id": "req-400"},
            )
            assert r.status_code == 400
            r = await h.post(
                run.base_url + "/chat/completions",
                json=_body("[[emu:error status=503]] y"),
                headers={"x-request-id": "req-503"},
            )
            assert r.status_code == 503
    finally:
        logger.removeHandler(cap)
        logger.setLevel(old_level)
    bad = [x for x in cap.lines if "rid=req-400 attempt" in x]
    assert len(bad) == 1 and "status=400" in bad[0]
    assert bad[0].endswith("decision=give_up:not_retryable")
    down = [x for x in cap.lines if "rid=req-503 attempt" in x]
    assert len(down) == 2
    assert "status=503" in down[0] and "cooldown=server_rest:" in down[0]
    assert down[0].endswith("decision=rotate")
    assert down[1].endswith("decision=give_up:max_attempts")


def test_serve_log_level_debug_logs_a_real_rotation(tmp_path: Path) -> None:
    """The CLI flag end to end: a `rawgate serve --emulate --log-level debug` process."""
    home = tmp_path / "home"
    home.mkdir()
    store = AccountStore(home / "accounts.json")
    for key, label in KEYS[:2]:
        store.add_api_key(key, label=label)
    err_path = tmp_path / "stderr.log"
    env = {**os.environ, "RAWGATE_HOME": str(home)}
    argv = [sys.executable, "-m", "rawgate", "serve", "--emulate", "--port", "0",
            "--log-level", "debug"]  # fmt: skip
    with err_path.open("w") as err:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            m = re.search(r"listening on (http://\S+)", line)
            assert m, f"no start-up line: {line!r}"
            with httpx.Client() as h:
                r = h.post(
                    m.group(1) + "/v1/chat/completions",
                    json=_body(f"[[emu:error status=429 retry_delay=7s for={KEY_A}]] hi"),
                    headers={"x-request-id": "cli-rotation"},
                )
            assert r.status_code == 200 and r.headers["x-account-email"] == "B"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    log = err_path.read_text()
    lines = [x for x in log.splitlines() if "rid=cli-rotation attempt" in x]
    assert len(lines) == 2, log
    assert " DEBUG rawgate.gateway.core " in lines[0]
    assert "attempt 1/2 account=A model=gemini-2.5-flash status=429" in lines[0]
    assert "cooldown=rate_limited:" in lines[0] and lines[0].endswith("decision=rotate")
    assert lines[1].endswith("account=B model=gemini-2.5-flash status=200 error=- decision=answer")
    for key, _ in KEYS[:2]:
        secret = key.removeprefix("key-")
        for i in range(len(secret) - 7):
            assert secret[i : i + 8] not in log


async def test_an_account_that_fails_before_its_call_leaves_rotates_for_free(
    tmp_path: Path,
) -> None:
    # The OAuth client secret is wrong: the token endpoint refuses every refresh (invalid_client),
    # so the model call never leaves; with no retry budget at all the request still moves on.
    store = AccountStore(tmp_path / "accounts.json")
    oauth = _oauth_accounts(1)[0]
    store.add_oauth(oauth.refresh_token, email=oauth.email, project=oauth.project)
    for key, label in KEYS[:2]:
        store.add_api_key(key, label=label)
    cfg = {
        "upstream": {"oauth_client_secret": "not-the-right-secret"},
        "routing": {"retry_budget_ratio": 0.0, "retry_budget_min": 0},
    }
    settings = Settings(oauth_accounts=(oauth,))
    async with gateway_stack(tmp_path, settings=settings, config=cfg) as run:
        async with httpx.AsyncClient() as h:
            rs = await _burst(h, run, 12)
        assert [r.status_code for r in rs] == [200] * 12
        assert _who(rs) == {"A", "B"}
        assert run.emulator.stats.get("token", 0) >= 1  # the OAuth account was tried
        assert run.gateway.scheduler.retries_denied == 0
