"""Several `rawgate serve` processes on one real redis-server (issue 16, the fleet's accounts and
OAuth tokens): the accounts list is Redis's (imported with `rawgate accounts import`, changed by
`rawgate accounts disable` and seen by every running instance without a restart), and the
fleet refreshes each OAuth account's access token once per expiry, also when the instance
holding the refresh lock is killed mid-refresh (another takes over once the lock lapses).

Every process is real (`python -m rawgate ...`) and stopped at the end; waits poll with a
deadline, nothing asserts on speed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest

from rawgate.emulator import server as emulator
from rawgate.emulator.state import OAuthAccount, Settings
from tests.helpers_gateway import gateway_stack
from tests.helpers_redis import RedisServer, free_port

CHAT = "/v1/chat/completions"
WAIT_S = 15.0  # bound of every poll below (never an assertion on speed)
KEY_A = "AIza" + "A" * 35
KEY_B = "AIza" + "B" * 35


def _env(home: Path, url: str, prefix: str, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAWGATE_")}
    env.update(
        RAWGATE_HOME=str(home),
        RAWGATE_STATE_BACKEND="redis",
        RAWGATE_STATE_REDIS_URL=url,
        RAWGATE_STATE_KEY_PREFIX=prefix,
        RAWGATE_LOG_REQUEST_LOG="false",
        **more,
    )
    return env


def _cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "rawgate", *args], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def _chat(text: str = "hi") -> dict[str, Any]:
    return {"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": text}]}


class Serve:
    """One `rawgate serve --port 0` process; `origin` once it printed its start-up line."""

    def __init__(self, env: dict[str, str], emulate: bool) -> None:
        # Its log (access lines included) to a file: a pipe nobody reads could fill and block it.
        self.log = Path(env["RAWGATE_HOME"]) / "serve.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rawgate", "serve", *(["--emulate"] if emulate else []),
                 "--port", "0"],
                env=env, stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        self.origin = ""

    def started(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (http://\S+)", line)
        assert m, f"no start-up line: {line!r}"
        self.origin = m.group(1)
        return self.origin

    def stop(self) -> str:
        """SIGTERM (graceful: counters flushed), then its stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def _serving(*envs: dict[str, str], emulate: bool = True) -> Iterator[list[Serve]]:
    procs = [Serve(env, emulate) for env in envs]
    try:
        for p in procs:
            p.started()
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.stop()


def _account_up(origin: str) -> dict[str, float]:
    text = httpx.get(origin + "/metrics").text
    found = re.finditer(r'^rawgate_account_up\{account="([^"]+)"\} (\S+)$', text, re.M)
    return {m.group(1): float(m.group(2)) for m in found}


def _until(pred: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not pred():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.02)


def _served_by(origin: str, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    with httpx.Client() as c:
        for i in range(n):
            r = c.post(origin + CHAT, json=_chat(f"q{i}"))
            assert r.status_code == 200, r.text
            seen[r.headers["x-account-email"]] += 1
    return seen


# ---- the accounts list ------------------------------------------------------------------------


def test_accounts_only_in_redis_reach_every_instance_and_a_disable_reaches_both(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    prefix = f"f{secrets.token_hex(4)}:"
    homes = [tmp_path / n for n in ("cli", "a", "b")]
    for h in homes:
        h.mkdir()
    cli, env_a, env_b = (_env(h, redis_server.url, prefix) for h in homes)
    src = tmp_path / "import.json"
    src.write_text(json.dumps([{"api_key": KEY_A, "label": "A"}, {"api_key": KEY_B, "label": "B"}]))
    _cli(cli, "accounts", "import", str(src))
    listed = json.loads(_cli(cli, "accounts", "list", "--json"))["accounts"]
    ids = {a["label"]: a["id"] for a in listed}
    assert set(ids) == {"A", "B"}
    # No accounts.json anywhere: what the instances serve can only come from Redis.
    assert not any((h / "accounts.json").exists() for h in homes)
    with _serving(env_a, env_b) as (a, b):
        for s in (a, b):
            assert _account_up(s.origin) == {ids["A"]: 1.0, ids["B"]: 1.0}
            assert set(_served_by(s.origin, 6)) == {"A", "B"}
        _cli(cli, "accounts", "disable", "A")
        for s in (a, b):
            _until(lambda s=s: _account_up(s.origin).get(ids["A"]) == 0.0,
                   f"{s.origin} sees A disabled")  # fmt: skip
            assert _served_by(s.origin, 6) == {"B": 6}
        # Re-enabled and a third account added: both instances serve all three again.
        _cli(cli, "accounts", "enable", "A")
        _cli(cli, "accounts", "add", "--api-key", "AIza" + "C" * 35, "--label", "C")
        for s in (a, b):
            _until(lambda s=s: list(_account_up(s.origin).values()) == [1.0] * 3,
                   f"{s.origin} sees A, B, C")  # fmt: skip
            assert set(_served_by(s.origin, 9)) == {"A", "B", "C"}
        errs = [a.stop(), b.stop()]
    # Each instance's per-account counters went to Redis in batches (the last at shutdown):
    # together they account for every request both served (12 + 12 + 18).
    listed = json.loads(_cli(cli, "accounts", "list", "--json"))["accounts"]
    assert sum(a["requests"] for a in listed) == 42, (listed, errs)
    assert {a["label"]: a["requests"] for a in listed}["B"] >= 12  # all of the disabled phase


@pytest.mark.anyio
async def test_redis_down_at_start_serves_accounts_json_then_takes_redis_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis not answering at start: the instance starts on accounts.json and says so; once
    Redis answers (reconnection), its list replaces the file's without a restart; the next
    start without Redis uses the list last read from it."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    prefix = f"f{secrets.token_hex(4)}:"
    cfg = {"state": {"backend": "redis", "redis_url": url, "key_prefix": prefix,
                     "redis_backoff_max_s": 0.5}}  # fmt: skip
    caplog.set_level("WARNING", "rawgate.gateway.core")
    async with gateway_stack(tmp_path, api_keys=[(KEY_A, "file-A")], config=cfg) as run:
        assert [a.label for a in run.gateway.accounts] == ["file-A"]
        assert "does not answer" in caplog.text and "accounts.json" in caplog.text
        srv = RedisServer(port).start()
        try:
            cli = _env(tmp_path / "cli", url, prefix)
            (tmp_path / "cli").mkdir()
            await anyio.to_thread.run_sync(
                lambda: _cli(cli, "accounts", "add", "--api-key", KEY_B, "--label", "redis-B")
            )
            deadline = time.monotonic() + WAIT_S
            while [a.label for a in run.gateway.accounts] != ["redis-B"]:
                assert time.monotonic() < deadline, [a.label for a in run.gateway.accounts]
                await anyio.sleep(0.05)
        finally:
            srv.stop()
    # The next start with Redis down again: the list last read from Redis, not the file's.
    caplog.clear()
    async with gateway_stack(tmp_path, config=cfg) as run:
        assert [a.label for a in run.gateway.accounts] == ["redis-B"]
        assert "accounts.redis-cache.json" in caplog.text
        # Redis back without its data (the server above is gone, this one is empty): the
        # list started on is put back, not replaced by an empty one (nor is the cache).
        srv = RedisServer(port).start()
        try:
            st = run.gateway.state
            assert st is not None
            with anyio.fail_after(WAIT_S):
                while not st.status()["state"] == "ok":  # noqa: ASYNC110 - a flag
                    await anyio.sleep(0.05)
                while [a.label for a in await st.load_accounts()] != [  # noqa: ASYNC110
                    "redis-B"
                ]:  # polled: the restore may come from the reconnection or from this read
                    await anyio.sleep(0.05)
            assert [a.label for a in run.gateway.accounts] == ["redis-B"]
            assert "came back without its data" in caplog.text
        finally:
            srv.stop()
    cached = json.loads((tmp_path / "accounts.redis-cache.json").read_text())["accounts"]
    assert [a["label"] for a in cached] == ["redis-B"]
    assert (tmp_path / "accounts.redis-cache.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.anyio
async def test_empty_redis_with_an_accounts_json_warns_and_imports_nothing(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"f{secrets.token_hex(4)}:"
    cfg = {"state": {"backend": "redis", "redis_url": redis_server.url, "key_prefix": prefix}}
    caplog.set_level("WARNING", "rawgate.gateway.core")
    async with gateway_stack(tmp_path, api_keys=[(KEY_A, "file-A")], config=cfg) as run:
        # Redis is the list: the emulator's demo account (none stored), never the file's.
        assert [a.label for a in run.gateway.accounts] == ["emulator-demo"]
        assert "rawgate accounts import" in caplog.text
        st = run.gateway.state
        assert st is not None and await st.load_accounts() == []


# ---- OAuth: one refresh per account for the fleet --------------------------------------------


def _oauth_accounts(n: int) -> list[OAuthAccount]:
    return [OAuthAccount(f"fleet{i}@rawgate.invalid", f"1//fleet-refresh-{i}-" + "r" * 30,
                         f"fleet-project-{i}") for i in range(n)]  # fmt: skip


def _upstream_env(emu: emulator.RunningEmulator, token_url: str | None = None) -> dict[str, str]:
    return {
        "RAWGATE_UPSTREAM_GEMINI_BASE_URL": emu.base_url,
        "RAWGATE_UPSTREAM_CODE_ASSIST_BASE_URL": emu.base_url,
        "RAWGATE_UPSTREAM_OAUTH_TOKEN_URL": token_url or emu.token_url,
        "RAWGATE_UPSTREAM_OAUTH_CLIENT_ID": emu.client_id,
        "RAWGATE_UPSTREAM_OAUTH_CLIENT_SECRET": emu.client_secret,
    }


@asynccontextmanager
async def _oauth_fleet(
    tmp_path: Path, url: str, n: int
) -> AsyncIterator[tuple[emulator.RunningEmulator, dict[str, str], str, list[OAuthAccount]]]:
    """One emulator (in this process) with `n` OAuth accounts, imported into Redis under a
    fresh prefix: (emulator, CLI env, prefix, accounts)."""
    accs = _oauth_accounts(n)
    settings = Settings(oauth_accounts=tuple(accs))
    async with emulator.serve(host="127.0.0.1", port=0, settings=settings) as emu:
        prefix = f"f{secrets.token_hex(4)}:"
        (tmp_path / "cli").mkdir()
        cli = _env(tmp_path / "cli", url, prefix)
        src = tmp_path / "oauth.json"
        src.write_text(json.dumps([{"refresh_token": a.refresh_token, "email": a.email,
                                    "project": a.project} for a in accs]))  # fmt: skip
        await anyio.to_thread.run_sync(lambda: _cli(cli, "accounts", "import", str(src)))
        yield emu, cli, prefix, accs


async def _start(*servers: Serve) -> None:
    for s in servers:
        await anyio.to_thread.run_sync(s.started)


def _refreshes(emu: emulator.RunningEmulator) -> Counter[str]:
    """Access tokens the emulator minted, per refresh token (one per refresh)."""
    return Counter(refresh for refresh, _ in emu.core.creds.access.values())


async def _burst(origins: list[str], n: int) -> Counter[str]:
    served: Counter[str] = Counter()
    codes: Counter[int] = Counter()
    async with httpx.AsyncClient(timeout=60) as c:

        async def one(i: int) -> None:
            r = await c.post(origins[i % len(origins)] + CHAT, json=_chat(f"load {i}"))
            codes[r.status_code] += 1
            served[r.headers.get("x-account-email", "")] += 1

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
    assert codes == {200: n}, codes
    return served


@pytest.mark.anyio
async def test_one_oauth_refresh_per_account_for_two_instances_under_load(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with _oauth_fleet(tmp_path, redis_server.url, 3) as (emu, _cli_env, prefix, accs):
        envs = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            envs.append(_env(tmp_path / name, redis_server.url, prefix, **_upstream_env(emu)))
        servers = [Serve(env, emulate=False) for env in envs]
        try:
            await _start(*servers)
            origins = [s.origin for s in servers]
            # No access token anywhere yet: 40 concurrent requests over both instances.
            served = await _burst(origins, 40)
            assert set(served) == {a.email for a in accs}
            assert _refreshes(emu) == {a.refresh_token: 1 for a in accs}
            assert emu.core.stats.get("token", 0) == 3
            # Google-side expiry (the emulator's clock jumps 2 h; rawgate's copies look
            # fresh): both instances get 401s for the same dead tokens, and the fleet still
            # refreshes each account once.
            emu.advance(7200)
            await _burst(origins, 40)
            assert _refreshes(emu) == {a.refresh_token: 2 for a in accs}
            assert emu.core.stats.get("token", 0) == 6
        finally:
            for s in servers:
                s.kill()
                s.stop()


@pytest.mark.anyio
async def test_a_lock_holder_killed_mid_refresh_lets_another_instance_refresh_after_the_ttl(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    lock_s = "2"
    async with _oauth_fleet(tmp_path, redis_server.url, 1) as (emu, _cli_env, prefix, accs):
        # A's token endpoint never answers (a listening socket nobody reads): A takes the
        # lock and hangs in the refresh until it is killed.
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        dead_url = f"http://127.0.0.1:{hole.getsockname()[1]}/token"
        more = {"RAWGATE_STATE_OAUTH_REFRESH_LOCK_S": lock_s,
                "RAWGATE_STATE_OAUTH_REFRESH_WAIT_S": "20"}  # fmt: skip
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        env_a = _env(tmp_path / "a", redis_server.url, prefix, **_upstream_env(emu, dead_url),
                     **more)  # fmt: skip
        env_b = _env(tmp_path / "b", redis_server.url, prefix, **_upstream_env(emu), **more)
        a, b = Serve(env_a, emulate=False), Serve(env_b, emulate=False)
        try:
            await _start(a, b)
            port = redis_server.port

            def locks() -> list[str]:
                out = subprocess.run(
                    ["redis-cli", "-p", str(port), "--raw", "keys", f"{prefix}*:lock"],
                    capture_output=True, text=True, timeout=10,
                )  # fmt: skip
                return out.stdout.split()

            async with httpx.AsyncClient(timeout=60) as c, anyio.create_task_group() as tg:

                async def hanging() -> None:
                    try:
                        await c.post(a.origin + CHAT, json=_chat("to the hanging one"))
                    except httpx.HTTPError:
                        pass  # killed under it

                tg.start_soon(hanging)
                deadline = time.monotonic() + WAIT_S
                while not (held := await anyio.to_thread.run_sync(locks)):
                    assert time.monotonic() < deadline, "A never took the refresh lock"
                    await anyio.sleep(0.02)
                assert len(held) == 1 and emu.core.stats.get("token", 0) == 0
                a.kill()  # mid-refresh, lock held: it lapses after oauth_refresh_lock_s
                r = await c.post(b.origin + CHAT, json=_chat("to the survivor"))
                assert r.status_code == 200, r.text
                assert r.headers["x-account-email"] == accs[0].email
                tg.cancel_scope.cancel()
            assert _refreshes(emu) == {accs[0].refresh_token: 1}
            assert await anyio.to_thread.run_sync(locks) == []  # released by B
        finally:
            hole.close()
            for s in (a, b):
                s.kill()
                s.stop()
