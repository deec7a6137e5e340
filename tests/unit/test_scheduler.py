"""Scheduler: modes, cooldowns from the upstream's words, breaker, budget, shared cooldowns."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from rawgate.accounts import scheduler as sched_mod
from rawgate.accounts.cooldowns import CooldownBoard, sync_cooldowns
from rawgate.accounts.scheduler import (
    BREAKER_OPEN_S,
    BREAKER_THRESHOLD,
    RATE_LIMIT_DEFAULT_S,
    RETRY_BUDGET_MIN,
    RETRY_BUDGET_WINDOW_S,
    AccountsCooling,
    AccountsFailing,
    Cooldown,
    Scheduler,
)
from rawgate.accounts.store import Account
from rawgate.errors import NoAccountAvailable, RateLimited, ServiceUnavailable

M = "gemini-2.5-flash"
P = "gemini-2.5-pro"


def accs(n: int, prefix: str = "a") -> list[Account]:
    return [
        Account(id=f"{prefix}{i}", kind="api_key", api_key=f"key-{prefix}{i}-0123456789abcdef",
                label=f"label{i}")
        for i in range(n)
    ]  # fmt: skip


def make(n: int = 3, mode: sched_mod.Mode = "round_robin") -> tuple[Scheduler, list[Account]]:
    s = Scheduler(mode, max_attempts=3, retry_budget_ratio=0.2)
    pool = accs(n)
    s.set_accounts(pool)
    return s, pool


def header(err: Exception, name: bytes) -> bytes | None:
    for k, v in getattr(err, "headers", []):
        if k == name:
            return bytes(v)
    return None


# ---- modes -----------------------------------------------------------------------------------


def test_round_robin_cycles_in_order() -> None:
    s, _ = make(3)
    assert [s.pick(M, 0.0).id for _ in range(7)] == ["a0", "a1", "a2", "a0", "a1", "a2", "a0"]


def test_round_robin_skips_excluded_disabled_and_cooling() -> None:
    s, pool = make(4)
    pool[1].enabled = False
    s.set_accounts(pool)
    s.report_failure(pool[2], M, 0.0, "rate_limited", 30.0)
    picks = [s.pick(M, 1.0).id for _ in range(4)]
    assert picks == ["a0", "a3", "a0", "a3"]
    assert s.pick(M, 1.0, exclude={"a0"}).id == "a3"
    assert s.pick(P, 1.0, exclude={"a0", "a3"}).id == "a2"  # the cooldown is per model


def test_least_loaded_prefers_fewest_in_flight() -> None:
    s, pool = make(3, "least_loaded")
    a = s.pick(M, 0.0)
    s.acquire(a)
    b = s.pick(M, 0.0)
    s.acquire(b)
    c = s.pick(M, 0.0)
    s.acquire(c)
    assert {a.id, b.id, c.id} == {"a0", "a1", "a2"}
    s.acquire(pool[0])  # a0: 2, a1: 1, a2: 1
    s.release(pool[1])  # a1: 0
    assert s.pick(M, 0.0).id == "a1"
    s.release(pool[2])  # a2: 0 as well: ties rotate
    got = {s.pick(M, 0.0).id for _ in range(4)}
    assert got == {"a1", "a2"}


def test_least_loaded_ignores_a_cooling_idle_account() -> None:
    s, pool = make(2, "least_loaded")
    s.acquire(pool[1])
    s.report_failure(pool[0], M, 0.0, "rate_limited", 5.0)
    assert s.pick(M, 1.0).id == "a1"


def test_sticky_same_key_same_account_and_spread() -> None:
    s, _ = make(4, "sticky")
    homes = {f"conv-{i}": s.pick(M, 0.0, key=f"conv-{i}").id for i in range(200)}
    for k, home in homes.items():
        assert s.pick(M, 0.0, key=k).id == home
    spread = collections.Counter(homes.values())
    assert len(spread) == 4 and min(spread.values()) >= 20  # rendezvous spreads keys


def test_sticky_is_consistent_across_workers_and_reorders() -> None:
    a, _ = make(5, "sticky")
    b = Scheduler("sticky")
    b.set_accounts(list(reversed(accs(5))))
    for i in range(50):
        assert a.pick(M, 0.0, key=f"k{i}").id == b.pick(M, 0.0, key=f"k{i}").id


def test_sticky_fails_over_while_home_cools_then_goes_home() -> None:
    s, _ = make(3, "sticky")
    home = s.pick(M, 0.0, key="conv")
    s.report_failure(home, M, 0.0, "rate_limited", 10.0)
    other = s.pick(M, 1.0, key="conv")
    assert other.id != home.id
    assert s.pick(M, 2.0, key="conv").id == other.id  # stable while home is cooling
    assert s.pick(M, 11.0, key="conv").id == home.id


def test_sticky_removing_an_account_moves_only_its_keys() -> None:
    s, pool = make(4, "sticky")
    before = {f"k{i}": s.pick(M, 0.0, key=f"k{i}").id for i in range(100)}
    s.set_accounts([a for a in pool if a.id != "a2"])
    after = {k: s.pick(M, 0.0, key=k).id for k in before}
    for k in before:
        if before[k] != "a2":
            assert after[k] == before[k]
        else:
            assert after[k] != "a2"


def test_sticky_without_key_is_round_robin() -> None:
    s, _ = make(3, "sticky")
    assert [s.pick(M, 0.0).id for _ in range(3)] == ["a0", "a1", "a2"]


def test_sticky_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sched_mod, "STICKY_CACHE_MAX", 10)
    s, _ = make(3, "sticky")
    for i in range(100):
        s.pick(M, 0.0, key=f"k{i}")
    assert len(s._sticky) <= 10


# ---- cooldowns -------------------------------------------------------------------------------


def test_cooldown_follows_retry_delay_exactly() -> None:
    s, pool = make(2)
    s.report_failure(pool[0], M, 100.0, "rate_limited", 7.0)
    for t in (100.0, 103.0, 106.99):
        assert s.pick(M, t).id == "a1"
    seen = {s.pick(M, 107.0).id for _ in range(2)}
    assert seen == {"a0", "a1"}


def test_hintless_429_backs_off_exponentially_and_success_resets() -> None:
    s, pool = make(1)
    a = pool[0]
    t = 0.0
    lengths = []
    for _ in range(4):
        s.report_failure(a, M, t, "rate_limited")
        with pytest.raises(AccountsCooling) as ei:
            s.pick(M, t)
        lengths.append(ei.value.retry_after_s)
        t += ei.value.retry_after_s or 0.0
    assert lengths == [RATE_LIMIT_DEFAULT_S * 2**i for i in range(4)]
    s.report_success(a, M, t)
    s.report_failure(a, M, t, "rate_limited")
    with pytest.raises(AccountsCooling) as ei:
        s.pick(M, t)
    assert ei.value.retry_after_s == RATE_LIMIT_DEFAULT_S


def test_long_quota_delay_is_honoured_not_capped_at_300s() -> None:
    s, pool = make(1)
    s.report_failure(pool[0], M, 0.0, "rate_limited", 51820.6)
    with pytest.raises(AccountsCooling) as ei:
        s.pick(M, 3600.0)
    assert header(ei.value, b"retry-after") == b"48221"


def test_short_hint_never_shortens_a_longer_cooldown() -> None:
    s, pool = make(1)
    s.report_failure(pool[0], M, 0.0, "rate_limited", 60.0)
    s.report_failure(pool[0], M, 1.0, "rate_limited", 2.0)  # a request that was in flight
    with pytest.raises(AccountsCooling):
        s.pick(M, 10.0)


def test_all_cooling_raises_429_with_soonest_retry_after() -> None:
    s, pool = make(3)
    for a, d in zip(pool, (30.0, 7.2, 12.0), strict=True):
        s.report_failure(a, M, 0.0, "rate_limited", d)
    with pytest.raises(AccountsCooling) as ei:
        s.pick(M, 1.0)
    e = ei.value
    assert isinstance(e, RateLimited) and e.status == 429
    assert e.code == "rate_limit_exceeded"
    assert header(e, b"retry-after") == b"7"  # 6.2 s left, rounded up
    assert header(e, b"retry-after-ms") == b"6200"
    assert e.retry_after_s == pytest.approx(6.2)
    assert "in 7 s" in e.message and "3 upstream account(s)" in e.message
    assert "label" not in e.message and "key-" not in e.message  # no account names/secrets
    assert s.pick(P, 1.0).id == "a0"  # other models are unaffected


def test_all_failing_is_503_not_429() -> None:
    s, pool = make(2)
    for a in pool:
        s.report_failure(a, M, 0.0, "server", 4.0)  # the upstream asked for 4 s: a hard block
    with pytest.raises(AccountsFailing) as ei:
        s.pick(M, 0.5)
    assert ei.value.status == 503 and isinstance(ei.value, ServiceUnavailable)
    assert header(ei.value, b"retry-after") == b"4"
    assert "resting after upstream failures" in ei.value.message


def test_mixed_causes_report_both() -> None:
    s, pool = make(2)
    s.report_failure(pool[0], M, 0.0, "rate_limited", 20.0)
    s.report_failure(pool[1], M, 0.0, "auth")
    with pytest.raises(AccountsCooling) as ei:
        s.pick(M, 0.1)
    assert "1 rate limited" in ei.value.message and "1 resting" in ei.value.message
    assert header(ei.value, b"retry-after") == b"20"


# ---- short rests steer, they never refuse (panic threshold) -----------------------------------


def test_one_5xx_on_the_only_account_does_not_refuse_the_next_requests() -> None:
    s, pool = make(1)
    blk = s.report_failure(pool[0], M, 0.0, "server")  # one INTERNAL, no hint
    assert blk is not None and blk.reason == "server_rest" and blk.until == 1.0
    # Inside the 1 s rest every request still gets the account (it is all there is).
    assert [s.pick(M, t).id for t in (0.0, 0.1, 0.5, 0.99)] == ["a0"] * 4
    assert s.resting_picks == 4
    assert s.snapshot(0.5)[0]["cooldowns"][M] == {"remaining_s": 0.5, "reason": "server"}
    s.report_success(pool[0], M, 0.6)  # it answered: the rest is over
    assert s.snapshot(0.7)[0]["cooldowns"] == {}
    s.pick(M, 0.7)
    assert s.resting_picks == 4


def test_a_rest_steers_to_a_free_account_and_the_retry_never_repeats() -> None:
    s, pool = make(2)
    s.report_failure(pool[0], M, 0.0, "server")
    assert {s.pick(M, 0.1).id for _ in range(4)} == {"a1"}  # free accounts first
    assert s.pick(M, 0.1, exclude={"a0"}).id == "a1"
    with pytest.raises(NoAccountAvailable, match="already tried"):  # a retry never goes back
        s.pick(M, 0.1, exclude={"a0", "a1"})
    assert s.resting_picks == 0
    assert s.pick(P, 0.1).id in {"a0", "a1"}  # the rest is per model


def test_when_all_rest_the_soonest_end_serves() -> None:
    s, pool = make(3)
    s.report_failure(pool[0], M, 0.3, "server")  # rest ends 1.3
    s.report_failure(pool[1], M, 0.1, "connect")  # account-wide rest ends 1.1
    s.report_failure(pool[2], M, 0.2, "server")  # ends 1.2
    assert s.pick(M, 0.5).id == "a1"
    assert s.pick(M, 0.5, exclude={"a1"}).id == "a2"
    assert s.pick(M, 0.5, exclude={"a1", "a2"}).id == "a0"


@pytest.mark.parametrize("mode", ["round_robin", "least_loaded", "sticky"])
def test_a_real_429_is_exact_and_a_resting_account_serves_instead(mode: sched_mod.Mode) -> None:
    s, pool = make(2, mode)
    s.report_failure(pool[0], M, 0.0, "rate_limited", 2.0)  # the upstream's RetryInfo
    s.report_failure(pool[1], M, 0.0, "server")  # one 5xx, no hint
    for t in (0.0, 0.5, 1.9):
        assert s.pick(M, t, key="conv-1").id == "a1"
    with pytest.raises(AccountsCooling) as ei:  # the 429 is never overridden
        s.pick(M, 0.5, exclude={"a1"}, key="conv-1")
    assert ei.value.retry_after_s == pytest.approx(1.5)
    assert s.pick(M, 2.0, exclude={"a1"}, key="conv-1").id == "a0"  # exactly when it ends


def test_hard_blocks_are_never_overridden_by_the_panic_pick() -> None:
    s, pool = make(3)
    s.report_failure(pool[0], M, 0.0, "auth")
    for _ in range(BREAKER_THRESHOLD):  # consecutive 5xx: the breaker opens
        s.report_failure(pool[1], M, 0.0, "server")
    s.import_cooldowns([Cooldown("a2", M, 30.0, "rate_limited")], 0.0)
    with pytest.raises(AccountsCooling):
        s.pick(M, 0.5)
    assert s.resting_picks == 0


def test_report_failure_returns_the_block_it_set() -> None:
    s, pool = make(2)
    a = pool[0]
    limited = s.report_failure(a, M, 0.0, "rate_limited", 2.5)
    assert limited == Cooldown("a0", M, 2.5, "rate_limited")
    assert s.report_failure(a, M, 0.0, "server", 4.0) == Cooldown("a0", M, 4.0, "server")
    assert s.report_failure(a, M, 0.0, "connect") == Cooldown("a0", "", 1.0, "connect_rest")
    opened = s.report_failure(a, M, 0.0, "server")  # the third in a row
    assert opened == Cooldown("a0", "", BREAKER_OPEN_S, "breaker_open")
    assert s.report_failure(pool[1], M, 0.0, "auth") == Cooldown("a1", "", 60.0, "auth")


def test_no_accounts_and_all_disabled_say_how_to_fix() -> None:
    s = Scheduler()
    with pytest.raises(NoAccountAvailable) as ei:
        s.pick(M, 0.0)
    assert ei.value.status == 503
    assert "rawgate accounts add --api-key" in ei.value.message
    pool = accs(2)
    pool[0].enabled = False
    pool[0].disabled_reason = "invalid_grant: Token has been expired or revoked."
    pool[1].enabled = False
    s.set_accounts(pool)
    with pytest.raises(NoAccountAvailable) as ei:
        s.pick(M, 0.0)
    msg = ei.value.message
    assert "All 2 upstream account(s) are disabled" in msg
    assert "invalid_grant" in msg and "rawgate accounts enable" in msg


def test_every_account_tried_is_not_a_rate_limit() -> None:
    s, _ = make(2)
    with pytest.raises(NoAccountAvailable, match="already tried"):
        s.pick(M, 0.0, exclude={"a0", "a1"})


def test_auth_failure_rests_the_account_and_grows() -> None:
    s, pool = make(2)
    s.report_failure(pool[0], M, 0.0, "auth")
    assert {s.pick(P, 1.0).id for _ in range(3)} == {"a1"}  # account-wide
    assert s.pick(P, 61.0, exclude={"a1"}).id == "a0"
    s.report_failure(pool[0], M, 61.0, "auth")
    with pytest.raises(AccountsFailing):
        s.pick(M, 61.0 + 100.0, exclude={"a1"})  # second time: 120 s
    assert s.pick(M, 61.0 + 121.0, exclude={"a1"}).id == "a0"


def test_server_error_uses_retry_after_hint() -> None:
    s, pool = make(1)
    s.report_failure(pool[0], M, 0.0, "server", 4.0)
    with pytest.raises(AccountsFailing):
        s.pick(M, 3.9)
    assert s.pick(M, 4.0).id == "a0"


def test_no_reset_all_shortcut_when_everything_cools() -> None:
    s, pool = make(2)
    for a in pool:
        s.report_failure(a, M, 0.0, "rate_limited", 60.0)
    for t in (1.0, 2.0, 30.0, 59.9):
        with pytest.raises(AccountsCooling):
            s.pick(M, t)


def test_model_cooldown_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sched_mod, "MODEL_COOLDOWNS_MAX", 8)
    s, pool = make(1)
    for i in range(50):
        s.report_failure(pool[0], f"m{i}", float(i), "rate_limited", 1000.0 + i)
    assert len(s._by_id["a0"].cooldowns) == 8


# ---- circuit breaker ---------------------------------------------------------------------------


def test_breaker_opens_half_opens_with_one_probe_and_closes() -> None:
    s, pool = make(2)
    a = pool[0]
    for i in range(BREAKER_THRESHOLD):
        s.report_failure(a, M, float(i) * 2, "server")  # spaced: the 1 s rest has ended
    t = (BREAKER_THRESHOLD - 1) * 2.0
    snap = {x["id"]: x for x in s.snapshot(t)}
    assert snap["a0"]["breaker"] == "open"
    assert {s.pick(P, t + 1).id for _ in range(3)} == {"a1"}  # open: every model
    t_half = t + BREAKER_OPEN_S
    assert s.snapshot(t_half)[0]["breaker"] == "half_open"
    probe = s.pick(P, t_half, exclude={"a1"})
    assert probe.id == "a0"
    s.acquire(probe)
    with pytest.raises(AccountsFailing):  # one probe at a time
        s.pick(P, t_half, exclude={"a1"})
    s.report_success(probe, P, t_half + 0.1, 5, 7)
    s.release(probe)
    assert s.snapshot(t_half + 0.2)[0]["breaker"] == "closed"
    assert s.pick(P, t_half + 0.2, exclude={"a1"}).id == "a0"


def test_failed_probe_reopens_for_longer() -> None:
    s, pool = make(1)
    a = pool[0]
    for i in range(BREAKER_THRESHOLD):
        s.report_failure(a, M, i * 2.0, "connect")
    t = (BREAKER_THRESHOLD - 1) * 2.0 + BREAKER_OPEN_S
    probe = s.pick(P, t)
    s.acquire(probe)
    s.report_failure(probe, P, t, "connect")
    s.release(probe)
    with pytest.raises(AccountsFailing) as ei:
        s.pick(P, t + 0.1)
    assert ei.value.retry_after_s == pytest.approx(2 * BREAKER_OPEN_S - 0.1)


def test_unreported_probe_frees_the_slot_on_release() -> None:
    s, pool = make(1)
    for i in range(BREAKER_THRESHOLD):
        s.report_failure(pool[0], M, i * 2.0, "server")
    t = 100.0
    probe = s.pick(P, t)
    s.acquire(probe)
    s.release(probe)  # cancelled: no report
    assert s.pick(P, t).id == "a0"


def test_reload_keeps_state_and_reenable_clears_it() -> None:
    s, pool = make(2)
    s.acquire(pool[0])
    s.report_failure(pool[0], M, 0.0, "rate_limited", 100.0)
    reloaded = accs(2)  # new objects, same ids (hot reload)
    s.set_accounts(reloaded)
    assert s.snapshot(1.0)[0]["in_flight"] == 1
    assert s.pick(M, 1.0).id == "a1"
    s.release(reloaded[0])
    assert s.snapshot(1.0)[0]["in_flight"] == 0
    reloaded[0].enabled = False
    s.set_accounts(reloaded)
    fixed = accs(2)
    s.set_accounts(fixed)  # a human re-enabled it
    assert s.pick(M, 1.0, exclude={"a1"}).id == "a0"


def test_unknown_account_reports_are_ignored() -> None:
    s, _ = make(1)
    ghost = accs(1, "zz")[0]
    s.acquire(ghost)
    s.report_failure(ghost, M, 0.0, "server")
    s.report_success(ghost, M, 0.0)
    s.release(ghost)
    assert s.pick(M, 0.0).id == "a0"


def test_attempts_allowed_is_bounded_by_the_pool() -> None:
    s, _ = make(2)
    assert s.attempts_allowed() == 2
    s.set_accounts(accs(5))
    assert s.attempts_allowed() == 3
    s.set_accounts([])
    assert s.attempts_allowed() == 1


# ---- retry budget ----------------------------------------------------------------------------


def test_retry_budget_floor_and_window_are_settings() -> None:
    s = Scheduler(retry_budget_ratio=0.0, retry_budget_min=1, retry_budget_window_s=2.0)
    assert [s.may_retry(0, 0.0), s.may_retry(0, 1.0)] == [True, False]
    assert s.may_retry(0, 2.1)
    off = Scheduler(retry_budget_ratio=0.0, retry_budget_min=0)
    assert not off.may_retry(50, 0.0)


def test_retry_budget_floor_ratio_and_window() -> None:
    s, _ = make(3)
    assert [s.may_retry(0, 0.0) for _ in range(RETRY_BUDGET_MIN + 1)] == [True] * 3 + [False]
    assert s.may_retry(0, RETRY_BUDGET_WINDOW_S + 0.1)  # the window slid
    s2, _ = make(3)
    # 100 requests in flight against a failing upstream: at most 20 retries (20 %).
    allowed = sum(s2.may_retry(100, 1.0) for _ in range(100))
    assert allowed == 20
    assert s2.retries_denied == 80


# ---- snapshot ----------------------------------------------------------------------------------


def test_snapshot_has_counters_and_no_secrets() -> None:
    s, pool = make(2)
    s.report_success(pool[0], M, 0.0, 11, 22)
    s.report_failure(pool[1], M, 0.0, "rate_limited", 9.0)
    snap = s.snapshot(1.0)
    assert snap[0]["requests"] == 1 and snap[0]["tokens_in"] == 11 and snap[0]["tokens_out"] == 22
    assert snap[1]["errors"] == 1
    assert snap[1]["cooldowns"][M] == {"remaining_s": 8.0, "reason": "rate_limited"}
    assert "key-a" not in repr(snap)


# ---- sharing across workers ------------------------------------------------------------------


def test_export_import_latest_end_wins() -> None:
    w1, p1 = make(2)
    w2, _ = make(2)
    w1.report_failure(p1[0], M, 0.0, "rate_limited", 30.0)
    w1.report_failure(p1[1], M, 0.0, "server")  # breaker/5xx state is not shared
    dirty_before = w1.cooldowns_dirty  # a local: mypy would keep the attribute narrowed to True
    assert dirty_before
    out = w1.export_cooldowns(1.0)
    assert not w1.cooldowns_dirty
    assert [(c.account, c.model, c.until) for c in out] == [("a0", M, 30.0)]
    assert w2.import_cooldowns(out, 1.0) == 1
    assert w2.pick(M, 2.0).id == "a1"
    assert w2.import_cooldowns([Cooldown("a0", M, 10.0, "rate_limited")], 2.0) == 0  # older
    assert w2.export_cooldowns(2.0) == []  # imported entries are not re-exported
    with pytest.raises(AccountsCooling):
        w2.pick(M, 29.0, exclude={"a1"})
    assert w2.import_cooldowns([Cooldown("a1", "", 50.0, "auth")], 2.0) == 1
    with pytest.raises(AccountsFailing):  # an auth block is a failure, not a rate limit
        w2.pick(P, 3.0, exclude={"a0"})  # account-wide entry ("" = every model)


def test_board_propagates_between_two_workers(tmp_path: Path) -> None:
    board1 = CooldownBoard(tmp_path / "cooldowns.json")
    board2 = CooldownBoard(tmp_path / "cooldowns.json")
    w1, p1 = make(2)
    w2, _ = make(2)
    # Different monotonic clocks per process: only wall time goes to the file.
    w1.report_failure(p1[0], M, 100.0, "rate_limited", 20.0)
    r1 = sync_cooldowns(w1, board1, mono_now=100.0, wall_now=1_000_000.0)
    assert r1["published"] == 1
    r2 = sync_cooldowns(w2, board2, mono_now=5.0, wall_now=1_000_000.5)
    assert r2["imported"] == 1
    with pytest.raises(AccountsCooling) as ei:
        w2.pick(M, 5.0, exclude={"a1"})
    assert ei.value.retry_after_s == pytest.approx(19.5)
    # Nothing changed: a poll is one stat and imports nothing.
    assert sync_cooldowns(w2, board2, 6.0, 1_000_001.5) == {"published": 0, "imported": 0}
    # Merge keeps both workers' entries; latest end wins.
    w2.report_failure(p1[1], P, 6.0, "rate_limited", 5.0)
    sync_cooldowns(w2, board2, 6.0, 1_000_001.5)
    w1.report_failure(p1[0], M, 101.0, "rate_limited", 2.0)  # shorter: must not shrink it
    sync_cooldowns(w1, board1, 101.0, 1_000_001.0)
    entries = {(c.account, c.model): c.until for c in board1.entries(1_000_001.6)}
    assert entries == {("a0", M): 1_000_020.0, ("a1", P): 1_000_006.5}


def test_board_drops_expired_and_tolerates_garbage(tmp_path: Path) -> None:
    path = tmp_path / "cooldowns.json"
    board = CooldownBoard(path)
    board.publish([Cooldown("a0", M, 10.0, "rate_limited")], wall_now=0.0)
    board.publish([Cooldown("a1", M, 30.0, "rate_limited")], wall_now=20.0)
    assert [(c.account, c.until) for c in board.entries(20.0)] == [("a1", 30.0)]
    path.write_bytes(b"{garbage")
    assert board.poll(21.0) == []
    board.publish([Cooldown("a2", M, 40.0, "rate_limited")], wall_now=21.0)
    assert [c.account for c in board.entries(21.0)] == ["a2"]
    board.clear_account("a2")
    assert board.entries(21.0) == []


def test_metrics_collectors_render() -> None:
    from rawgate.metrics import Metrics

    s, pool = make(2)
    s.report_success(pool[0], M, 0.0, 3, 4)
    s.report_failure(pool[1], M, 0.0, "auth")
    s.may_retry(0, 0.0)
    m = Metrics()
    for entry in s.metrics_collectors(lambda: 1.0):
        m.add_collector(*entry)
    text = m.render().decode()
    assert 'rawgate_account_up{account="a0"} 1' in text
    assert 'rawgate_account_up{account="a1"} 0' in text
    assert 'rawgate_account_tokens_total{account="a0",direction="out"} 4' in text
    assert 'rawgate_retries_total{outcome="allowed"} 1' in text
    assert "key-a" not in text and "label" not in text


_PUBLISHER = """
import sys, time
from rawgate.accounts.cooldowns import CooldownBoard
from rawgate.accounts.scheduler import Cooldown
board = CooldownBoard(sys.argv[1])
me = sys.argv[2]
for i in range(100):
    now = time.time()
    board.publish([Cooldown(f"{me}-{i}", "m", now + 600, "rate_limited")], now)
"""


def test_board_publishers_in_two_processes_lose_nothing(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    script = tmp_path / "pub.py"
    script.write_text(_PUBLISHER)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    path = tmp_path / "cooldowns.json"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(path), me], env=env)
        for me in ("w1", "w2")
    ]
    for p in procs:
        assert p.wait(timeout=50) == 0
    got = {c.account for c in CooldownBoard(path).entries(time.time())}
    assert got == {f"{w}-{i}" for w in ("w1", "w2") for i in range(100)}


def test_retry_budget_settings_reach_the_scheduler_and_are_checked(tmp_path: Path) -> None:
    from rawgate.config import ConfigError, build_config
    from rawgate.gateway.core import Gateway

    env = {"RAWGATE_ROUTING_RETRY_BUDGET_MIN": "0", "RAWGATE_ROUTING_RETRY_BUDGET_WINDOW_S": "2.5"}
    cfg = build_config({}, env, {})
    s = Gateway(cfg, home=tmp_path).scheduler
    assert (s.retry_budget_min, s.retry_budget_window_s, s.retry_budget_ratio) == (0, 2.5, 0.2)
    assert not s.may_retry(4, 0.0)  # 20 % of 4 in flight rounds down to 0, and no floor
    assert s.may_retry(5, 0.0)
    with pytest.raises(ConfigError, match="retry_budget_min"):
        build_config({"routing": {"retry_budget_min": -1}}, {}, {})
    with pytest.raises(ConfigError, match="retry_budget_window_s"):
        build_config({"routing": {"retry_budget_window_s": 0}}, {}, {})
