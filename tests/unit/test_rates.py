"""The per-minute rate ring (monitor/rates.py): buckets, wrap-around, errors, tokens, the
log-scale latency histogram and its percentiles, the trailing minute; O(1) and no allocation
per record. Also the admin key file (monitor/admin_key.py)."""

from __future__ import annotations

import math
import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from rawgate.monitor.admin_key import AdminKeyError, admin_keys, load_or_create
from rawgate.monitor.rates import BUCKET_S, BUCKETS, LATENCY_BINS, RateRing, bin_of, bin_value_ms

T0 = 1_800_000_000.0  # a whole minute (divisible by 60)


def test_bins_are_log_scale_and_cover_their_values() -> None:
    assert bin_of(0.0) == 0 and bin_of(0.999) == 0 and bin_of(1.0) == 0
    assert bin_of(1.5) == 1 and bin_of(2.0) == 2 and bin_of(3.0) == 3 and bin_of(4.0) == 4
    assert bin_of(1e12) == LATENCY_BINS - 1
    prev = 0
    for i in range(1, 200_000, 7):
        b = bin_of(i / 10)
        assert b >= prev
        prev = b


@given(st.floats(min_value=1.0, max_value=2.0**20, allow_nan=False))
def test_a_bins_value_is_within_19_percent_of_any_latency_in_it(ms: float) -> None:
    v = bin_value_ms(bin_of(ms))
    assert abs(v - ms) / ms <= math.sqrt(math.sqrt(2)) - 1 + 1e-9


def test_counts_errors_tokens_and_percentiles_of_one_minute() -> None:
    ring = RateRing()
    for i in range(98):
        ring.record(T0 + i * 0.5, 0.010, 200, 3, 5)  # 10 ms
    ring.record(T0 + 50, 2.0, 429)  # 2 s, an error
    ring.record(T0 + 51, 2.0, 499)  # the client left: not an error
    view = ring.view(T0 + 59)
    assert view["bucket_s"] == BUCKET_S and len(view["series"]) == BUCKETS
    cur = view["series"][-1]
    assert cur["t"] == T0 and cur["requests"] == 100 and cur["errors"] == 1
    assert cur["tokens_in"] == 294 and cur["tokens_out"] == 490
    assert cur["p50_ms"] == pytest.approx(10, rel=0.19)
    assert cur["p95_ms"] == pytest.approx(10, rel=0.19)
    assert cur["p99_ms"] == pytest.approx(2000, rel=0.19)
    assert all(b["requests"] == 0 and b["p50_ms"] is None for b in view["series"][:-1])
    ts = [b["t"] for b in view["series"]]
    assert ts == [T0 - (BUCKETS - 1 - i) * BUCKET_S for i in range(BUCKETS)]


def test_the_ring_wraps_after_an_hour_and_zeroes_skipped_minutes() -> None:
    ring = RateRing()
    ring.record(T0, 0.001, 200)
    ring.record(T0 + 5 * 60, 0.001, 500)
    view = ring.view(T0 + 59 * 60)
    assert view["series"][0]["requests"] == 1 and view["series"][0]["t"] == T0
    assert view["series"][5]["errors"] == 1
    assert sum(b["requests"] for b in view["series"]) == 2
    view = ring.view(T0 + 60 * 60)  # the first minute fell out
    assert sum(b["requests"] for b in view["series"]) == 1
    # A record 3 hours later: everything before is gone, however the slots line up.
    ring.record(T0 + 3 * 3600 + 5 * 60, 0.001, 200)
    view = ring.view(T0 + 3 * 3600 + 5 * 60)
    assert sum(b["requests"] for b in view["series"]) == 1
    assert sum(b["errors"] for b in view["series"]) == 0


def test_a_clock_step_back_records_into_the_current_minute() -> None:
    ring = RateRing()
    ring.record(T0 + 120, 0.001, 200)
    ring.record(T0, 0.001, 200)  # wall clock stepped back two minutes
    view = ring.view(T0 + 120)
    assert view["series"][-1]["requests"] == 2
    assert sum(b["requests"] for b in view["series"]) == 2


def test_the_last_minute_blends_in_the_part_of_the_previous_one_still_inside() -> None:
    ring = RateRing()
    for _ in range(60):
        ring.record(T0 + 10, 0.02, 200)
    for _ in range(30):
        ring.record(T0 + 60 + 5, 0.02, 503)
    last = ring.view(T0 + 60 + 15)["last_minute"]  # 45 s of the previous minute still count
    assert last["requests"] == 30 + 45
    assert last["errors"] == 30
    assert last["rps"] == pytest.approx(75 / 60, rel=1e-3)
    assert last["error_rate"] == pytest.approx(30 / 75, rel=1e-3)
    assert last["p50_ms"] == pytest.approx(20, rel=0.19)
    empty = RateRing().view(T0)["last_minute"]
    assert empty["requests"] == 0 and empty["rps"] == 0 and empty["error_rate"] == 0.0
    assert empty["p50_ms"] is None


def test_record_allocates_nothing_and_memory_is_fixed() -> None:
    ring = RateRing()
    for i in range(1000):  # warm: every slot touched once
        ring.record(T0 + i * 60, 0.01, 200)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(20_000):
            ring.record(T0 + 60_000 + i * 0.5, (i % 5000) / 1000, 200 + i % 400, i, i)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(d.size_diff for d in after.compare_to(before, "filename") if d.size_diff > 0)
    # The held counters are a fixed set of ints (a few KiB, however many records): less than
    # one byte per record, so nothing is kept per record.
    assert grown < 20_000


# ---- the admin key file -----------------------------------------------------------------------


def test_the_admin_key_file_is_made_0600_once_and_reused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key, made = load_or_create(home)
    assert made and len(key) == 43
    path = home / "admin_key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create(home) == (key, False)
    assert admin_keys([], home) == ([key], key)
    assert admin_keys(["configured-key"], home) == (["configured-key"], None)
    path.chmod(0o644)  # loosened by hand: tightened again
    assert load_or_create(home) == (key, False)
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("")  # an empty file: a new key
    key2, made = load_or_create(home)
    assert made and key2 != key and path.read_text().strip() == key2
    assert not [p for p in home.iterdir() if p.name != "admin_key"]  # no temp file left


def test_a_lost_race_reads_the_winners_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_link = os.link

    def link(src: str, dst: str) -> None:
        Path(dst).write_text("winner-key\n")  # another process got there first
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    assert load_or_create(tmp_path) == ("winner-key", False)
    assert [p.name for p in tmp_path.iterdir()] == ["admin_key"]


def test_an_unwritable_home_is_one_line_without_the_key(tmp_path: Path) -> None:
    home = tmp_path / "file"
    home.write_text("not a directory")
    with pytest.raises(AdminKeyError) as e:
        load_or_create(home)
    assert str(home / "admin_key") in str(e.value) and "\n" not in str(e.value)
