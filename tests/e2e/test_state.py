"""Shared state (state.py): the same behaviour tests on the local backend and on a real Redis,
plus what only Redis has (pub/sub propagation between instances, degraded mode)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from rawgate.accounts.store import Account, AccountStoreError
from rawgate.config import Config, build_config
from rawgate.state.keys import KeyStoreError
from rawgate.state.redis_backend import RedisState
from rawgate.state.store import Cooldown, RefreshBusy, State, open_state, refresh_once
from tests.helpers_redis import RedisServer

pytestmark = pytest.mark.anyio

BACKENDS = ["local", "redis", "cluster"]


def _cfg(backend: str, url: str = "", **state: Any) -> Config:
    # A generous timeout: the box is shared, and only the degraded-mode tests want a short one.
    st: dict[str, Any] = {"backend": backend, "key_prefix": f"t{secrets.token_hex(4)}:",
                          "redis_timeout_ms": 3000, **state}  # fmt: skip
    if url:
        st["redis_url"] = url
    limits = {"response_store_max_age_s": state.pop("max_age_s", 3600.0)}
    st.pop("max_age_s", None)
    return build_config({"state": st, "limits": limits}, {}, {})


def _degraded(st: State) -> bool:
    # A call, not an attribute read: mypy keeps `st.degraded` narrowed across the awaits that
    # change it, and would call the later checks (and the poll loops) unreachable.
    return st.degraded


def _backend_cfg(request: pytest.FixtureRequest, backend: str, **state: Any) -> Config:
    """"local", "redis" (one server) or "cluster" (three masters, redis_cluster = true)."""
    if backend == "redis":
        return _cfg("redis", request.getfixturevalue("redis_server").url, **state)
    if backend == "cluster":
        url = request.getfixturevalue("redis_cluster").url
        return _cfg("redis", url, redis_cluster=True, **state)
    return _cfg("local", **state)


Opener = Callable[..., AbstractAsyncContextManager[State]]


@pytest.fixture
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """open(cfg=None, processes=...) -> a running State; two opens share the same store."""
    backend: str = request.param
    shared = _backend_cfg(request, backend)

    @asynccontextmanager
    async def open_(cfg: Config | None = None, processes: int = 2) -> AsyncIterator[State]:
        async with open_state(cfg or shared, tmp_path, processes=processes) as st:
            yield st

    return open_


both = pytest.mark.parametrize("opener", BACKENDS, indirect=True)


async def _minute_margin() -> None:
    """Fixed windows: keep a count test inside one minute (the server shares this clock).
    Waits on the event loop: a time.sleep here blocked the loop for up to 11 s while the
    state's own calls were in flight (the reload a key change publishes), which then ran past
    redis_timeout_ms and put the store in degraded mode (8 of 8 runs with the loop blocked
    3.5 s after add_key; test_status_and_metrics_with_bounded_key_labels failed when the
    clock was in a minute's last 10 s)."""
    if time.time() % 60 > 50:
        await anyio.sleep(61 - time.time() % 60)


# ---- cooldowns ----


@both
async def test_cooldown_only_ever_extends(opener: Opener) -> None:
    async with opener() as a:
        t0 = time.time()
        long_end = await a.set_cooldown("acc1", "gemini-2.5-pro", 30, "429")
        assert long_end >= t0 + 29
        # Shorter or equal: no change, whoever asks.
        assert await a.set_cooldown("acc1", "gemini-2.5-pro", 5, "429") == long_end
        assert a.cooldown_until("acc1", "gemini-2.5-pro") == long_end
        # Many racing writers: the longest wins, nothing shortens it.
        async with anyio.create_task_group() as tg:
            for s in (3, 60, 10, 45, 1):
                tg.start_soon(a.set_cooldown, "acc1", "gemini-2.5-pro", s, "429")
        assert a.cooldown_until("acc1", "gemini-2.5-pro") >= t0 + 59
        # Account-wide rest ("" model) covers every model.
        await a.set_cooldown("acc2", "", 20, "auth")
        assert a.cooldown_until("acc2", "any-model") >= t0 + 19
        assert a.cooldown_until("acc3", "gemini-2.5-pro") == 0.0
        await a.clear_cooldowns("acc1")
        assert a.cooldown_until("acc1", "gemini-2.5-pro") == 0.0
        assert {c.account for c in a.cooldowns()} == {"acc2"}


redis_kinds = pytest.mark.parametrize("kind", ["redis", "cluster"])


@redis_kinds
async def test_cooldown_reaches_other_instance_by_pubsub(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    cfg = _backend_cfg(request, kind)
    async with open_state(cfg, tmp_path) as a, open_state(cfg, tmp_path) as b:
        seen: list[tuple[float, Cooldown]] = []
        arrived = anyio.Event()

        def on(c: Cooldown) -> None:
            seen.append((time.perf_counter(), c))
            arrived.set()

        b.on_cooldown(on)
        delays = []
        for i in range(5):
            arrived = anyio.Event()
            t0 = time.perf_counter()
            await a.set_cooldown(f"acc{i}", "gemini-2.5-flash", 30, "429")
            with anyio.fail_after(5):
                await arrived.wait()
            delays.append((seen[-1][0] - t0) * 1000)
            assert seen[-1][1].account == f"acc{i}"
            assert b.cooldown_until(f"acc{i}", "gemini-2.5-flash") > time.time() + 25
        with capsys.disabled():
            print(f"\npub/sub cooldown propagation ({kind}), ms: {[round(d, 2) for d in delays]}")
        # The extend-only rule holds on the receiving side too: a shorter one is not an event.
        n = len(seen)
        marker = anyio.Event()
        b.on_cooldown(lambda c: marker.set() if c.account == "zz" else None)
        await a.set_cooldown("acc0", "gemini-2.5-flash", 1, "429")
        await a.set_cooldown("zz", "m", 1, "marker")  # a later event: the earlier one is past
        with anyio.fail_after(5):
            await marker.wait()
        assert [c.account for _, c in seen[n:]] == ["zz"]


# ---- client keys and limits ----


@both
async def test_key_lifecycle(opener: Opener) -> None:
    async with opener() as st:
        rec, key = await st.add_key("alice", rpm=5, models=["gemini-2.5-*"])
        assert key.startswith("rk-") and len(key) == 46
        assert key not in repr(rec.masked()) and rec.hint.startswith(key[:7])
        assert st.lookup_key(key) == rec
        assert st.lookup_key(key + "x") is None
        with pytest.raises(KeyStoreError, match="exists"):
            await st.add_key("alice")
        with pytest.raises(KeyStoreError, match="must be 1-64"):
            await st.add_key("bad name")
        d = await st.check_key(rec, "gpt-4o")
        assert (d.allowed, d.reason) == (False, "model")
        assert (await st.check_key(rec, "gemini-2.5-pro")).allowed
        await st.set_key_enabled("alice", False)
        off = st.lookup_key(key)
        assert off is not None and not off.enabled
        assert (await st.check_key(off, "gemini-2.5-pro")).reason == "disabled"
        await st.set_key_enabled("alice", True)
        new_rec, new_key = await st.rotate_key("alice")
        assert st.lookup_key(key) is None and st.lookup_key(new_key) == new_rec
        assert new_rec.rpm == 5
        assert [r.name for r in await st.list_keys()] == ["alice"]
        await _minute_margin()
        for _ in range(6):
            await st.check_key(new_rec, "gemini-2.5-pro")
        assert (await st.check_key(new_rec, "gemini-2.5-pro")).reason == "rpm"
        await st.remove_key("alice")
        again, _ = await st.add_key("alice", rpm=5)  # same name: fresh windows
        assert (await st.check_key(again, "gemini-2.5-pro")).allowed
        await st.remove_key("alice")
        assert st.lookup_key(new_key) is None and await st.list_keys() == []
        with pytest.raises(KeyStoreError, match="no key named"):
            await st.rotate_key("alice")


@both
async def test_rpm_exact_across_two_instances(opener: Opener) -> None:
    n = 7
    async with opener() as a, opener() as b:
        rec, _ = await a.add_key("busy", rpm=n)
        await _minute_margin()
        results = []

        async def hit(st: State) -> None:
            results.append(await st.check_key(rec, "m"))

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(hit, a if i % 2 else b)
        allowed = [d for d in results if d.allowed]
        refused = [d for d in results if not d.allowed]
        assert len(allowed) == n
        assert all(d.reason == "rpm" and 1 <= d.retry_after_s <= 60 for d in refused)


@both
async def test_token_limits_count_reported_tokens_and_usage(opener: Opener) -> None:
    async with opener() as st:
        rec, _ = await st.add_key("tok", tpm=1000, daily_tokens=5000)
        await _minute_margin()
        assert (await st.check_key(rec, "m")).allowed
        await st.record_usage("tok", "acc1", "gemini-2.5-flash", 600, 500)
        d = await st.check_key(rec, "m")
        assert (d.allowed, d.reason) == (False, "tpm") and 1 <= d.retry_after_s <= 60
        rec2, _ = await st.add_key("daily", daily_tokens=100)
        await st.record_usage("daily", "acc1", "gemini-2.5-flash", 50, 60)
        d2 = await st.check_key(rec2, "m")
        assert d2.reason == "daily_tokens" and d2.retry_after_s > 0
        if hasattr(st, "flush_usage"):
            st.flush_usage()  # local: memory -> usage.json, as the background tick does
        keys = await st.usage("key", None, 3600)
        assert {k: sum(u.tokens_in + u.tokens_out for u in v) for k, v in keys.items()} == {
            "tok": 1100, "daily": 110}  # fmt: skip
        acct = await st.usage("account", "acc1", 3600)
        assert acct["acc1"][0].requests == 2
        model = await st.usage("model", None, 3600)
        assert model["gemini-2.5-flash"][0].tokens_out == 560


# ---- stored Responses ----


@both
async def test_response_store_bounds(opener: Opener, tmp_path: Path, request: Any) -> None:
    backend = request.node.callspec.params["opener"]
    cfg = _backend_cfg(request, backend, response_max_bytes=2000, max_age_s=0.3)
    async with opener(cfg) as st:
        items_in = [{"role": "user", "content": "hi"}]
        items_out = [{"type": "message", "content": [{"type": "output_text", "text": "yo"}]}]
        assert await st.put_response("resp_1", items_in, items_out)
        assert await st.get_response("resp_1") == [*items_in, *items_out]
        big = [{"role": "user", "content": "x" * 3000}]
        assert not await st.put_response("resp_big", big, [])
        assert await st.get_response("resp_big") is None
        assert await st.get_response("resp_unknown") is None
        await anyio.sleep(0.6)
        assert await st.get_response("resp_1") is None


# ---- OAuth tokens: one refresh per account ----


@both
async def test_refresh_lock_one_of_fifty(opener: Opener) -> None:
    calls = 0

    async def refresh() -> tuple[str, float]:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.2)
        return f"tok-{calls}", time.time() + 3600

    async with opener() as a, opener() as b:
        if not isinstance(a, RedisState):
            b = a  # local: tokens live in the process (each worker refreshes its own)
        got: list[str] = []

        async def contender(st: State) -> None:
            got.append((await refresh_once(st, "acc-oauth", refresh, poll_s=0.02))[0])

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(contender, a if i % 2 else b)
        assert not a.degraded and not b.degraded
        assert (calls, got) == (1, ["tok-1"] * 50)
        # A lock released by someone else's token is not released by a stranger.
        owner = await a.acquire_refresh_lock("acc-x", 30)
        assert owner is not None and await b.acquire_refresh_lock("acc-x", 30) is None
        await b.release_refresh_lock("acc-x", "not-the-owner")
        assert await a.acquire_refresh_lock("acc-x", 30) is None
        await a.release_refresh_lock("acc-x", owner)
        assert await b.acquire_refresh_lock("acc-x", 30) is not None


@both
async def test_refresh_waits_a_bounded_time_and_never_takes_back_a_refused_token(
    opener: Opener,
) -> None:
    calls: list[str] = []

    async def refresh() -> tuple[str, float]:
        calls.append("r")
        return f"tok-{len(calls)}", time.time() + 3600

    async with opener() as st:
        # Another caller holds the lock (a slow or dead refresher): a bounded wait, then
        # RefreshBusy, without a refresh of our own.
        owner = await st.acquire_refresh_lock("acc-w", 30)
        assert owner is not None
        with pytest.raises(RefreshBusy):
            await refresh_once(st, "acc-w", refresh, wait_s=0.2, poll_s=0.02)
        assert calls == []
        await st.release_refresh_lock("acc-w", owner)
        assert (await refresh_once(st, "acc-w", refresh))[0] == "tok-1"
        assert (await refresh_once(st, "acc-w", refresh))[0] == "tok-1"  # shared, no call
        # The upstream refused tok-1: it is not taken back, one refresh replaces it.
        assert (await refresh_once(st, "acc-w", refresh, reject="tok-1"))[0] == "tok-2"
        assert (await refresh_once(st, "acc-w", refresh, reject="tok-1"))[0] == "tok-2"
        assert calls == ["r", "r"]
        # A lock that lapses (its holder died) lets the next caller refresh.
        assert await st.acquire_refresh_lock("acc-d", 0.2) is not None
        got = await refresh_once(st, "acc-d", refresh, wait_s=5, poll_s=0.02)
        assert got[0] == "tok-3"


# ---- accounts ----


@both
async def test_account_counters_are_added_in_batches_and_never_counted_twice(
    opener: Opener,
) -> None:
    async with opener() as st:
        acc = Account(id="c1", kind="api_key", api_key="AIza" + "c" * 35, requests=5)
        assert await st.import_accounts([acc]) == (1, 0)
        first = {"c1": (3, 10, 20, 1, "boom"), "gone": (1, 1, 1, 0, None)}
        assert await st.add_account_stats(first)
        assert await st.add_account_stats({"c1": (2, 0, 0, 0, None)})

        def disable(accounts: list[Account]) -> None:
            for a in accounts:
                a.enabled = False

        # A read-modify-write in between (a disable) neither loses nor doubles them.
        await st.update_accounts(disable)
        (got,) = await st.load_accounts()
        assert (got.requests, got.tokens_in, got.tokens_out, got.errors, got.last_error,
                got.enabled) == (10, 10, 20, 1, "boom", False)  # fmt: skip
        await st.update_accounts(lambda accounts: [])
        assert await st.load_accounts() == []
        # Its counters went with it: the same account imported again starts from its own.
        assert await st.import_accounts([acc]) == (1, 0)
        assert [a.requests for a in await st.load_accounts()] == [5]


@both
async def test_accounts_import(opener: Opener) -> None:
    async with opener() as st:
        accs = [Account(id="a1", kind="api_key", api_key="AIza" + "k" * 35, label="one"),
                Account(id="a2", kind="oauth", refresh_token="1//" + "r" * 40)]  # fmt: skip
        assert await st.import_accounts(accs) == (2, 0)
        assert await st.import_accounts(accs) == (0, 2)
        loaded = await st.load_accounts()
        assert sorted(a.label for a in loaded) == ["", "one"]


# ---- Redis unreachable ----


async def test_redis_killed_mid_use_degrades_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = RedisServer().start()
    try:
        cfg_open = _cfg("redis", srv.url, redis_timeout_ms=200, redis_backoff_max_s=1.0)
        cfg_closed = build_config(
            {"state": {**{f: getattr(cfg_open.state, f) for f in ("backend", "redis_url",
             "key_prefix", "redis_timeout_ms", "redis_backoff_max_s")}, "limits_fail": "closed"}},
            {}, {},
        )  # fmt: skip
        async with open_state(cfg_open, tmp_path) as st, open_state(cfg_closed, tmp_path) as sc:
            assert isinstance(st, RedisState) and isinstance(sc, RedisState)
            rec, key = await st.add_key("k", rpm=100)
            await sc.refresh_keys()
            assert (await st.check_key(rec, "m")).allowed and not _degraded(st)
            await st.set_cooldown("acc9", "m", 60, "429")
            caplog.clear()
            srv.kill()
            # Every call returns (no exception); the first failure starts the episode.
            end = await st.set_cooldown("acc1", "m", 30, "429")
            assert end > time.time() + 25 and st.cooldown_until("acc1", "m") == end
            d = await st.check_key(rec, "m")
            assert d.allowed and d.degraded
            dc = await sc.check_key(rec, "m")
            assert (dc.allowed, dc.reason, dc.degraded) == (False, "state_unavailable", True)
            assert dc.retry_after_s >= 1
            await st.record_usage("k", "acc1", "m", 10, 5)
            assert await st.put_response("resp_d", [{"a": 1}], [{"b": 2}])
            assert await st.get_response("resp_d") == [{"a": 1}, {"b": 2}]
            assert await st.get_access_token("acc1") is None
            assert st.lookup_key(key) == rec  # the key table mirror still answers
            await st.clear_cooldowns("acc9")  # cleared locally now, in Redis on recovery
            assert st.degraded and st.health.episodes == 1
            failures = st.health.failures
            for _ in range(20):  # degraded: calls skip Redis, no timeout paid, nothing counted
                await st.check_key(rec, "m")
            assert st.health.failures == failures
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                        and r.name == "rawgate.state.store"]  # fmt: skip
            # One warning per instance for the whole episode, however many calls failed.
            assert len([r for r in warnings if "unreachable" in r.getMessage()]) == 2
            srv.start()  # same port
            with anyio.fail_after(15):
                while _degraded(st) or _degraded(sc):  # noqa: ASYNC110 - a flag, not an event
                    await anyio.sleep(0.05)
            assert st.health.episodes == 1
            assert (await st.check_key(rec, "m")).allowed and not _degraded(st)
            # What was learned while away reached Redis: a fresh instance sees it.
            async with open_state(cfg_open, tmp_path) as fresh:
                assert fresh.cooldown_until("acc1", "m") >= end - 0.01
                assert fresh.cooldown_until("acc9", "m") == 0.0
                usage = await fresh.usage("account", "acc1", 3600)
                assert usage["acc1"][0].tokens_in == 10
    finally:
        srv.stop()


async def test_redis_down_at_start_serves_degraded(tmp_path: Path) -> None:
    from tests.helpers_redis import free_port

    cfg = _cfg("redis", f"redis://127.0.0.1:{free_port()}/0", redis_timeout_ms=100)
    with anyio.fail_after(10):
        async with open_state(cfg, tmp_path) as st:
            assert st.degraded
            assert await st.set_cooldown("a", "m", 10, "429") > time.time()
            assert st.lookup_key("rk-nothing") is None


@redis_kinds
async def test_key_changes_reach_other_instances_by_themselves(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    cfg = _backend_cfg(request, kind)
    async with open_state(cfg, tmp_path) as a, open_state(cfg, tmp_path) as b:
        _, key = await a.add_key("shared", rpm=10)

        async def seen_by_b(pred: Callable[[Any], bool]) -> None:
            with anyio.fail_after(5):
                while not pred(b.lookup_key(key)):  # noqa: ASYNC110 - a mirror, not an event
                    await anyio.sleep(0.005)

        await seen_by_b(lambda r: r is not None and r.enabled)
        await a.set_key_enabled("shared", False)
        await seen_by_b(lambda r: r is not None and not r.enabled)
        _, new_key = await a.rotate_key("shared")
        await seen_by_b(lambda r: r is None)
        assert b.lookup_key(new_key) is not None


async def _evalsha_calls(st: RedisState) -> int:
    stats = await st.client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_usage_is_buffered_and_sent_in_one_round_trip(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """`record_usage` on Redis buffers (same fields merged) and a push sends it all: one script
    call per key's token windows and one per hour of usage, whatever the number of answers.
    A key's buffered tokens ride along with its next check on the same instance (exact there);
    another instance sees them once they are sent (up to `usage_flush_ms` late). What is still
    buffered at shutdown is sent then."""
    await _minute_margin()
    cfg = _cfg("redis", redis_server.url, usage_flush_ms=3_600_000)  # explicit pushes only
    async with open_state(cfg, tmp_path) as a, open_state(cfg, tmp_path) as b:
        assert isinstance(a, RedisState) and isinstance(b, RedisState)
        rec, _ = await a.add_key("batch", tpm=1000)
        await b.refresh_keys()
        await a.record_usage("batch", "acc1", "m", 0, 0)  # scripts loaded: counts exact below
        await a.push_usage()
        calls = await _evalsha_calls(a)
        for _ in range(50):
            await a.record_usage("batch", "acc1", "m", 12, 8)  # 1,000 tokens in all
        assert await _evalsha_calls(a) == calls  # nothing sent yet
        assert len(a._pending_usage) == 9  # 3 kinds x (r, i, o): merged, not 150 rows
        assert (await b.check_key(rec, "m")).allowed  # not seen by another instance yet
        d = await a.check_key(rec, "m")  # the tokens go with a's own check: refused at once
        assert (d.allowed, d.reason) == (False, "tpm")
        assert (await b.check_key(rec, "m")).reason == "tpm"  # and now in Redis for everyone
        await a.push_usage()  # the usage hash: one call (the tokens went with the check)
        assert await _evalsha_calls(a) == calls + 4  # b, a, b checks + one push
        assert not a._pending_usage and not a._pending_tokens and not a.degraded
        usage = (await b.usage("key", "batch", 3600))["batch"]
        assert [(u.requests, u.tokens_in, u.tokens_out) for u in usage] == [(51, 600, 400)]
        await a.record_usage("batch", "acc2", "m", 3, 4)  # buffered when a stops
    async with open_state(cfg, tmp_path) as fresh:
        usage = (await fresh.usage("account", "acc2", 3600))["acc2"]
        assert [(u.requests, u.tokens_in, u.tokens_out) for u in usage] == [(1, 3, 4)]


async def test_limiter_survives_a_script_cache_flush(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A restarted or failed-over server has no scripts: NOSCRIPT loads it, not degraded mode."""
    async with open_state(_cfg("redis", redis_server.url), tmp_path) as st:
        assert isinstance(st, RedisState)
        rec, _ = await st.add_key("flush", rpm=1000)
        assert (await st.check_key(rec, "m")).allowed
        await st.client.script_flush()
        d = await st.check_key(rec, "m")
        assert d.allowed and not d.degraded and not st.degraded
        await st.client.script_flush()
        await st.record_usage("flush", "acc1", "m", 4, 5)  # two scripts in one round trip
        assert not st.degraded
        assert (await st.usage("key", "flush", 3600))["flush"][0].tokens_out == 5


@both
async def test_account_updates_from_two_instances_lose_nothing(opener: Opener) -> None:
    async with opener() as a, opener() as b:
        changed = anyio.Event()
        b.on_accounts_changed(changed.set)

        async def add(st: State, i: int) -> None:
            acc = Account(id=f"id{i}", kind="api_key", api_key=f"AIza{i:035d}")
            await st.update_accounts(lambda accs: [*accs, acc])

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(add, a if i % 2 else b, i)
        assert sorted(x.id for x in await a.load_accounts()) == sorted(f"id{i}" for i in range(20))
        with pytest.raises(AccountStoreError, match="duplicate id"):
            await a.update_accounts(lambda accs: [*accs, accs[0]])
        assert len(await b.load_accounts()) == 20  # the refused write changed nothing
        with anyio.fail_after(5):  # redis: pub/sub; local: accounts.json polled every second
            await changed.wait()


@redis_kinds
async def test_an_accounts_list_the_server_lost_is_put_back_once(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The server lost its data (restarted empty, FLUSHALL, failover to an empty replica): the
    accounts' version key is gone (every write INCRs it, nothing deletes it). An instance
    holding a list it read puts it back (_RESTORE_ACCTS, SET-if-absent: of two racing, one
    writes), with the counters it read; a read or a write finding no version restores first;
    a list emptied on purpose keeps its version and is not brought back; an instance that
    never read a list has nothing to put back."""
    cfg = _backend_cfg(request, kind)
    async with open_state(cfg, tmp_path) as a, open_state(cfg, tmp_path) as b:
        assert isinstance(a, RedisState) and isinstance(b, RedisState)

        async def lose() -> None:  # what an empty restart does to our keys (one slot each)
            for k in (a.k_accts, a.k_accts_v, a.k_accts_n):
                await a.client.delete([k])

        accs = [Account(id="r1", kind="api_key", api_key="AIza" + "1" * 35, label="one"),
                Account(id="r2", kind="api_key", api_key="AIza" + "2" * 35)]  # fmt: skip
        assert await a.import_accounts(accs) == (2, 0)
        assert await a.add_account_stats({"r1": (4, 10, 20, 1, "boom")})
        for st in (a, b):
            assert [x.id for x in await st.load_accounts()] == ["r1", "r2"]
        version = int(await a.client.get(a.k_accts_v))
        heard = anyio.Event()
        b.on_accounts_changed(heard.set)

        await lose()
        async with open_state(cfg, tmp_path) as fresh:  # holds nothing: reads the empty server
            assert await fresh.load_accounts() == []
        assert await a.client.exists([a.k_accts_v]) == 0
        # Two instances back at once: exactly one writes its list.
        done: list[bool] = []

        async def restore(st: RedisState) -> None:
            done.append(await st._restore_accounts())

        async with anyio.create_task_group() as tg:
            tg.start_soon(restore, a)
            tg.start_soon(restore, b)
        assert sorted(done) == [False, True]
        with anyio.fail_after(5):  # published: every instance re-reads
            await heard.wait()
        assert int(await a.client.get(a.k_accts_v)) == version
        got = {x.id: x for x in await b.load_accounts()}
        assert sorted(got) == ["r1", "r2"] and got["r1"].label == "one"
        # The counters came back inside the JSON (P{accts}:n was lost with the rest): the
        # next increments add to them, nothing counted twice.
        assert (got["r1"].requests, got["r1"].tokens_out, got["r1"].last_error) == (4, 20, "boom")
        assert await a.add_account_stats({"r1": (1, 0, 0, 0, None)})
        assert [x.requests for x in await a.load_accounts()] == [5, 0]

        # A read racing the reconnection (no version yet) restores first, never returns [].
        await lose()
        assert [x.id for x in await b.load_accounts()] == ["r1", "r2"]
        # So does a write (a disable learned meanwhile): applied to the list put back.
        await lose()

        def disable_r2(current: list[Account]) -> None:
            for x in current:
                x.enabled = x.id != "r2"

        await a.update_accounts(disable_r2)
        assert [(x.id, x.enabled) for x in await b.load_accounts()] == [("r1", True),
                                                                        ("r2", False)]

        # Emptied on purpose: the version is there, nothing comes back.
        await a.update_accounts(lambda current: [])
        assert await a.load_accounts() == [] and await b.load_accounts() == []
        assert not await a._restore_accounts() and not await b._restore_accounts()
        await lose()  # and a server losing an empty list has nothing to get back
        assert await b.load_accounts() == []
        assert await a.client.exists([a.k_accts_v]) == 0


def test_accounts_cli_on_redis(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from rawgate.__main__ import main

    monkeypatch.setenv("RAWGATE_HOME", str(tmp_path))
    monkeypatch.setenv("RAWGATE_STATE_BACKEND", "redis")
    monkeypatch.setenv("RAWGATE_STATE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("RAWGATE_STATE_KEY_PREFIX", f"acli{secrets.token_hex(4)}:")
    secret = "AIza" + "s" * 35
    assert main(["accounts", "add", "--api-key", secret, "--label", "work"]) == 0
    (tmp_path / "more.txt").write_text("AIza" + "t" * 35 + " second\n")
    assert main(["accounts", "import", str(tmp_path / "more.txt")]) == 0
    capsys.readouterr()
    assert main(["accounts", "list", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"work"' in out and '"second"' in out and secret not in out
    assert main(["accounts", "disable", "work", "--reason", "paused"]) == 0
    assert main(["accounts", "list"]) == 0
    assert "disabled: paused" in capsys.readouterr().out
    assert main(["accounts", "remove", "work"]) == 0
    assert main(["accounts", "remove", "work"]) == 1
    assert "no account 'work'" in capsys.readouterr().err
    assert not (tmp_path / "accounts.json").exists()  # everything went to Redis


async def test_accounts_list_shows_redis_cooldowns(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from rawgate.state.admin import RedisCooldownBoard

    cfg = _cfg("redis", redis_server.url)
    async with open_state(cfg, tmp_path) as st:
        await st.set_cooldown("acc1", "gemini-2.5-pro", 60, "429")
        board = RedisCooldownBoard(cfg, tmp_path)
        entries = await anyio.to_thread.run_sync(board.entries, time.time())
        assert [(c.account, c.model) for c in entries] == [("acc1", "gemini-2.5-pro")]
        await anyio.to_thread.run_sync(board.clear_account, "acc1")
        with anyio.fail_after(5):
            while st.cooldown_until("acc1", "gemini-2.5-pro"):  # noqa: ASYNC110 - a mirror
                await anyio.sleep(0.01)


async def test_redis_stalled_times_out_into_degraded_and_recovers(tmp_path: Path) -> None:
    """SIGSTOP: the server accepts nothing and answers nothing (a slow or hung Redis)."""
    import signal

    srv = RedisServer().start()
    try:
        cfg = _cfg("redis", srv.url, redis_timeout_ms=100, redis_backoff_max_s=1.0)
        async with open_state(cfg, tmp_path) as st:
            rec, _ = await st.add_key("slow", rpm=5)
            assert (await st.check_key(rec, "m")).allowed and not _degraded(st)
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGSTOP)
            try:
                with anyio.fail_after(5):  # bounded by redis_timeout_ms, far below this
                    d = await st.check_key(rec, "m")
                assert d.allowed and d.degraded and st.degraded
                assert await st.put_response("resp_s", [{"a": 1}], []) is True
            finally:
                srv.proc.send_signal(signal.SIGCONT)
            with anyio.fail_after(15):
                while _degraded(st):  # noqa: ASYNC110 - a flag, not an event
                    await anyio.sleep(0.05)
            d = await st.check_key(rec, "m")
            assert d.allowed and not d.degraded
    finally:
        srv.stop()


async def test_local_workers_share_cooldowns_through_the_board(tmp_path: Path) -> None:
    """serve --workers N on the local backend: what one worker learns reaches the others."""
    cfg = _cfg("local")
    async with open_state(cfg, tmp_path, processes=2) as a, \
            open_state(cfg, tmp_path, processes=2) as b:  # fmt: skip
        learned = anyio.Event()
        b.on_cooldown(lambda c: learned.set() if c.account == "acc1" else None)
        end = await a.set_cooldown("acc1", "gemini-2.5-pro", 30, "429")
        with anyio.fail_after(5):  # polled every cooldowns.SYNC_INTERVAL_S
            await learned.wait()
        assert b.cooldown_until("acc1", "gemini-2.5-pro") == end
        assert (tmp_path / "cooldowns.json").exists()


@both
async def test_status_and_metrics_with_bounded_key_labels(opener: Opener) -> None:
    from rawgate.metrics import Metrics
    from rawgate.state.limiter import Decision
    from rawgate.state.store import METRIC_KEYS_MAX, OTHER_KEY

    async with opener() as st:
        rec, key = await st.add_key("alice", rpm=1, models=["gemini-*"])
        await _minute_margin()
        await st.check_key(rec, "gemini-2.5-pro")
        await st.check_key(rec, "gemini-2.5-pro")
        await st.check_key(rec, "gpt-4o")
        await st.record_usage("alice", "acc1", "gemini-2.5-pro", 7, 3)
        for i in range(METRIC_KEYS_MAX + 50):  # names beyond the bound share one series
            st.tally_decision(f"k{i}", Decision(True))
        m = Metrics()
        for entry in st.metrics_collectors():
            m.add_collector(*entry)
        text = m.render().decode()
        assert st.status() == {"backend": st.backend, "state": "ok", "degraded_episodes": 0}
        assert f'rawgate_state_degraded{{backend="{st.backend}"}} 0' in text
        assert 'rawgate_key_requests_total{key="alice",outcome="allowed"} 1' in text
        assert 'rawgate_key_requests_total{key="alice",outcome="rpm"} 1' in text
        assert 'rawgate_key_requests_total{key="alice",outcome="model"} 1' in text
        assert 'rawgate_key_tokens_total{key="alice",direction="in"} 7' in text
        assert len(st.key_outcomes) == METRIC_KEYS_MAX + 1 and OTHER_KEY in st.key_outcomes
        assert key not in text


async def test_cluster_client_refuses_cross_slot_commands(
    redis_cluster: Any, tmp_path: Path
) -> None:
    """What makes the cluster runs of the tests above a proof of the key layout: with
    redis_cluster = true a command spanning two slots fails instead of being split."""
    import coredis.exceptions

    async with open_state(_cfg("redis", redis_cluster.url, redis_cluster=True), tmp_path) as st:
        assert isinstance(st, RedisState) and st.cluster
        with pytest.raises(coredis.exceptions.RedisError, match=r"(?i)slot"):
            await st.client.mget(["a{one}", "b{two}"])
        assert await st.client.mget(["a{one}", "b{one}"]) == (None, None)
