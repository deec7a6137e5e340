"""The local state backend: one machine, files under RAWGATE_HOME (today's behaviour).

Invariants:
- Cooldowns, access tokens, refresh locks and stored Responses live in this process. With
  `shared` (serve --workers N) cooldowns also travel through cooldowns.json (cooldowns.py's
  board: published when learned, polled every SYNC_INTERVAL_S), as the gateway does today; a
  clear by hand reaches the others when they next learn from the file, not at once. Tokens are
  refreshed per worker (one refresh per worker per hour, harmless).
- Client keys: keys.json (keys.py), reloaded when its stat signature changes (checked at most
  every KEYS_POLL_S by `run`, and by `refresh_keys()`); accounts.json likewise for
  `on_accounts_changed` listeners.
- Limits: in memory with one process. With `shared` (serve --workers N) every check and
  every token record is one read-modify-write of `limits.json` under an flock, so N workers
  enforce ONE limit, not N (the honest choice; its cost is in bench/state_cost.py). The file
  holds one row per limited key: [minute_ms, requests, tokens, day_ms, day_tokens], rewritten
  in place under the flock of the file itself.
- Usage: counted in memory, merged into `usage.json` (under its flock, added, never replaced)
  every USAGE_FLUSH_S and when `run` ends; buckets older than `[state] usage_days` are dropped.
  A crash loses at most USAGE_FLUSH_S of usage.
- Stored Responses: the bounded map of response_store.py (count, age), plus the per-entry bytes
  bound of `[state] response_max_bytes` (measured as JSON), so both backends refuse the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import orjson

from rawgate.accounts.cooldowns import SYNC_INTERVAL_S, CooldownBoard
from rawgate.accounts.scheduler import Cooldown as SchedulerCooldown
from rawgate.accounts.store import Account, AccountStore, write_atomic
from rawgate.config import Config
from rawgate.state.keys import KeyFile, KeyRecord, add_record, find, rotate_record
from rawgate.state.limiter import (
    DAY_MS,
    HOUR_MS,
    Decision,
    Limits,
    Usage,
    WindowCounts,
    decide,
    windows,
)
from rawgate.state.response_store import ResponseStore
from rawgate.state.store import AccountStats, Cooldown, Health, State

__all__ = ["KEYS_POLL_S", "USAGE_FLUSH_S", "LocalState"]

log = logging.getLogger("rawgate.state.store")

KEYS_POLL_S = 1.0
USAGE_FLUSH_S = 5.0
# Cooldowns a process keeps: accounts x models with a live one; beyond it the soonest-ending go.
MAX_COOLDOWNS = 4096

_Row = list[int]  # [minute_ms, requests, tokens, day_ms, day_tokens]
_UsageKey = tuple[int, str, str]  # (hour_ms, kind, name)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _counts(row: _Row | None, now_ms: int) -> WindowCounts:
    if row is None:
        return WindowCounts()
    minute, _, day = windows(now_ms)
    r, t = (row[1], row[2]) if row[0] == minute else (0, 0)
    d = row[4] if row[3] == day else 0
    return WindowCounts(r, t, d)


def _counted(row: _Row | None, now_ms: int, requests: int, tokens: int) -> _Row:
    """The row after adding to the current windows (stale windows start from zero)."""
    minute, _, day = windows(now_ms)
    c = _counts(row, now_ms)
    return [minute, c.requests_minute + requests, c.tokens_minute + tokens, day,
            c.tokens_day + tokens]  # fmt: skip


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (orjson.JSONDecodeError, OSError) as e:
        log.warning("%s unreadable (%s); starting it afresh", path, e)
        return None


class LocalState(State):
    backend = "local"

    def __init__(self, cfg: Config, home: Path, *, shared: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.home = Path(home)
        self.health = Health("local state")  # never degraded: files do not go away
        self.keyfile = KeyFile(self.home / "keys.json")
        self.accounts = AccountStore(self.home / "accounts.json")
        self._accounts_watch = AccountStore(self.home / "accounts.json")
        self.shared = shared
        self._board = CooldownBoard(self.home / "cooldowns.json") if shared else None
        self._limits_path = self.home / "limits.json"
        self._limits_fd: int | None = None
        self._usage_path = self.home / "usage.json"
        self._salt = ""
        self._by_hash: dict[str, KeyRecord] = {}
        self._keys_checked = 0.0
        self._rows: dict[str, _Row] = {}
        self._usage: dict[_UsageKey, list[int]] = {}
        self._cooldowns: dict[tuple[str, str], Cooldown] = {}
        self._listeners: list[Callable[[Cooldown], None]] = []
        self._tokens: dict[str, tuple[str, float]] = {}
        self._accounts_listeners: list[Callable[[], None]] = []
        self._locks: dict[str, tuple[str, float]] = {}
        lim = cfg.limits
        self._responses = ResponseStore(
            lim.response_store_max_count, lim.response_store_max_age_s
        )
        self.refresh_keys(force=True)

    async def run(
        self, *, task_status: Any = anyio.TASK_STATUS_IGNORED, background: bool = True
    ) -> None:
        task_status.started()
        if not background:
            try:
                await anyio.sleep_forever()
            finally:
                self._close()
        last_flush = last_keys = time.monotonic()
        try:
            while True:
                await anyio.sleep(SYNC_INTERVAL_S if self._board else KEYS_POLL_S)
                if self._board is not None:
                    self._poll_board()
                if time.monotonic() - last_keys >= KEYS_POLL_S - 0.01:
                    self.refresh_keys()
                    self._poll_accounts()
                    last_keys = time.monotonic()
                if time.monotonic() - last_flush >= USAGE_FLUSH_S:
                    self.flush_usage()
                    last_flush = time.monotonic()
        finally:
            self._close()  # blocking and short: nothing to shield

    def _close(self) -> None:
        self.flush_usage()
        if self._limits_fd is not None:
            os.close(self._limits_fd)
            self._limits_fd = None

    # ---- cooldowns ----

    def _learn(self, c: Cooldown) -> bool:
        k = (c.account, c.model)
        old = self._cooldowns.get(k)
        if old is not None and old.until >= c.until:
            return False
        self._cooldowns[k] = c
        if len(self._cooldowns) > MAX_COOLDOWNS:
            now = time.time()
            for key in [k for k, v in self._cooldowns.items() if v.until <= now]:
                del self._cooldowns[key]
            while len(self._cooldowns) > MAX_COOLDOWNS:
                soonest = min(self._cooldowns, key=lambda k: self._cooldowns[k].until)
                del self._cooldowns[soonest]
        for fn in self._listeners:
            fn(c)
        return True

    async def set_cooldown(self, account: str, model: str, seconds: float, reason: str) -> float:
        c = Cooldown(account, model, time.time() + max(0.0, seconds), reason)
        if self._learn(c) and self._board is not None:
            try:  # ~0.1 ms, only when something new was learned (a 429, an auth failure)
                self._board.publish([SchedulerCooldown(account, model, c.until, reason)],
                                    time.time())  # fmt: skip
            except OSError as e:
                log.warning("cooldowns.json not written (%s); this worker keeps it", e.strerror)
        return self._cooldowns[(account, model)].until

    def _poll_board(self) -> None:
        """What the other workers learned (one stat when nothing changed)."""
        assert self._board is not None
        for e in self._board.poll(time.time()) or ():
            self._learn(Cooldown(e.account, e.model, e.until, e.reason))

    async def clear_cooldowns(self, account: str) -> None:
        for k in [k for k in self._cooldowns if k[0] == account]:
            del self._cooldowns[k]
        if self._board is not None:
            self._board.clear_account(account)
        for fn in self._listeners:
            fn(Cooldown(account, "", 0.0, "cleared"))

    # ---- keys ----

    def refresh_keys(self, force: bool = False) -> bool:
        """Reload keys.json if it changed; True when it was reloaded."""
        if not force and not self.keyfile.changed():
            return False
        try:
            salt, records = self.keyfile.load()
        except Exception as e:  # a broken file keeps the last good table (and says so)
            log.warning("keys.json not reloaded: %s", e)
            return False
        self._salt = salt
        self._by_hash = {r.hash: r for r in records.values()}
        return True

    async def _count_request(self, record: KeyRecord, limits: Limits) -> Decision:
        now = _now_ms()

        def check(rows: dict[str, _Row]) -> Decision:
            row = rows.get(record.name)
            d = decide(limits, _counts(row, now), now)
            if d.allowed:
                rows[record.name] = _counted(row, now, 1, 0)
            return d

        decision: Decision = self._with_rows(check, now)
        return decision

    def _with_rows(self, fn: Callable[[dict[str, _Row]], Decision | None], now: int) -> Any:
        if not self.shared:
            return fn(self._rows)
        # One open file per process, locked itself: flock, fstat, pread, pwrite, ftruncate,
        # unlock (6 syscalls; a temp file + rename would be ~11). A write torn by a crash reads
        # as unparseable and restarts the windows empty (logged): limits are advisory here.
        if self._limits_fd is None:
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._limits_fd = os.open(self._limits_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                      0o600)  # fmt: skip
        fd = self._limits_fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, size, 0) if size else b""
            try:
                rows = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                log.warning("%s unreadable; limit windows restart empty", self._limits_path)
                rows = {}
            result = fn(rows)
            day = now - now % DAY_MS
            data = orjson.dumps({k: v for k, v in rows.items() if v[3] == day})
            os.pwrite(fd, data, 0)
            if len(data) < size:
                os.ftruncate(fd, len(data))
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return result

    async def record_usage(
        self, key: str | None, account: str, model: str, tokens_in: int, tokens_out: int
    ) -> None:
        if key is not None:
            self.tally_tokens(key, tokens_in, tokens_out)
        now = _now_ms()
        tokens = max(0, tokens_in) + max(0, tokens_out)
        if key is not None and tokens:

            def add(rows: dict[str, _Row]) -> None:
                rows[key] = _counted(rows.get(key), now, 0, tokens)

            self._with_rows(add, now)
        hour = now - now % HOUR_MS
        for kind, name in (("key", key), ("account", account), ("model", model[:64])):
            if name:
                row = self._usage.setdefault((hour, kind, name), [0, 0, 0])
                row[0] += 1
                row[1] += max(0, tokens_in)
                row[2] += max(0, tokens_out)

    def flush_usage(self) -> None:
        """Add the in-memory counts into usage.json (locked) and forget them."""
        if not self._usage:
            return
        pending, self._usage = self._usage, {}
        oldest = _now_ms() - self.cfg.state.usage_days * DAY_MS
        try:
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            with _flocked(self._usage_path.with_name("usage.json.lock")):
                doc: dict[str, list[int]] = _read_json(self._usage_path) or {}
                for (hour, kind, name), (r, i, o) in pending.items():
                    row = doc.setdefault(f"{hour}\x1f{kind}\x1f{name}", [0, 0, 0])
                    row[0] += r
                    row[1] += i
                    row[2] += o
                doc = {k: v for k, v in doc.items() if int(k.split("\x1f", 1)[0]) >= oldest}
                write_atomic(self._usage_path, orjson.dumps(doc), durable=False)
        except OSError as e:
            log.warning("usage.json not written (%s); kept in memory", e.strerror)
            for k, v in pending.items():
                row = self._usage.setdefault(k, [0, 0, 0])
                for j in range(3):
                    row[j] += v[j]

    async def usage(self, kind: str, name: str | None, since_s: float) -> dict[str, list[Usage]]:
        start = _now_ms() - int(since_s * 1000)
        start -= start % HOUR_MS
        merged: dict[tuple[int, str], list[int]] = {}
        doc: dict[str, list[int]] = _read_json(self._usage_path) or {}
        rows: list[tuple[int, str, str, list[int]]] = []
        for k, v in doc.items():
            hs, kd, n = k.split("\x1f", 2)
            rows.append((int(hs), kd, n, v))
        rows += [(h, kd, n, v) for (h, kd, n), v in self._usage.items()]
        for hour, kd, n, v in rows:
            if kd != kind or (name is not None and n != name) or hour < start:
                continue
            acc = merged.setdefault((hour, n), [0, 0, 0])
            for j in range(3):
                acc[j] += v[j]
        out: dict[str, list[Usage]] = {}
        for (h, n), (r, i, o) in sorted(merged.items()):
            out.setdefault(n, []).append(Usage(h, r, i, o))
        return out

    async def list_keys(self) -> list[KeyRecord]:
        _, records = self.keyfile.load()
        return sorted(records.values(), key=lambda r: r.name)

    def _edit(self, fn: Callable[[str, dict[str, KeyRecord]], Any]) -> Any:
        result = self.keyfile.update(fn)
        self.refresh_keys(force=True)
        return result

    async def add_key(
        self, name: str, *, rpm: int = 0, tpm: int = 0, daily_tokens: int = 0,
        models: list[str] | None = None,
    ) -> tuple[KeyRecord, str]:  # fmt: skip
        out: tuple[KeyRecord, str] = self._edit(
            lambda salt, recs: add_record(
                recs, salt, name, rpm=rpm, tpm=tpm, daily_tokens=daily_tokens, models=models
            )
        )
        return out

    async def rotate_key(self, name: str) -> tuple[KeyRecord, str]:
        out: tuple[KeyRecord, str] = self._edit(
            lambda salt, recs: rotate_record(recs, salt, name)
        )
        return out

    async def set_key_enabled(self, name: str, enabled: bool) -> KeyRecord:
        def apply(salt: str, recs: dict[str, KeyRecord]) -> KeyRecord:
            recs[name] = msgspec.structs.replace(find(recs, name), enabled=enabled)
            return recs[name]

        out: KeyRecord = self._edit(apply)
        return out

    async def remove_key(self, name: str) -> KeyRecord:
        out: KeyRecord = self._edit(lambda salt, recs: recs.pop(find(recs, name).name))

        def forget(rows: dict[str, _Row]) -> None:  # a new key of that name starts afresh
            rows.pop(name, None)

        self._with_rows(forget, _now_ms())
        return out

    # ---- stored Responses ----

    async def put_response(
        self, response_id: str, input_items: list[dict[str, Any]],
        output_items: list[dict[str, Any]],
    ) -> bool:  # fmt: skip
        size = len(orjson.dumps(input_items)) + len(orjson.dumps(output_items))
        if size > self.cfg.state.response_max_bytes:
            return False
        self._responses.put(response_id, input_items, output_items)
        return True

    async def get_response(self, response_id: str) -> list[dict[str, Any]] | None:
        return self._responses.get(response_id)

    # ---- OAuth access tokens ----

    async def get_access_token(self, account: str) -> tuple[str, float] | None:
        hit = self._tokens.get(account)
        if hit is None or hit[1] <= time.time():
            return None
        return hit

    async def put_access_token(self, account: str, token: str, expires_at: float) -> None:
        self._tokens[account] = (token, expires_at)

    async def acquire_refresh_lock(self, account: str, ttl_s: float) -> str | None:
        now = time.monotonic()
        held = self._locks.get(account)
        if held is not None and held[1] > now:
            return None
        owner = secrets.token_hex(8)
        self._locks[account] = (owner, now + ttl_s)
        return owner

    async def release_refresh_lock(self, account: str, owner: str) -> None:
        held = self._locks.get(account)
        if held is not None and held[0] == owner:
            del self._locks[account]

    # ---- accounts ----

    async def load_accounts(self) -> list[Account]:
        return self.accounts.load()

    async def import_accounts(self, accounts: list[Account]) -> tuple[int, int]:
        added, skipped = self.accounts.import_accounts(accounts)
        return len(added), skipped

    async def update_accounts(
        self, fn: Callable[[list[Account]], list[Account] | None]
    ) -> list[Account]:
        return self.accounts.update(fn)

    def hold_accounts(self, accounts: list[Account]) -> None:
        pass  # accounts.json is the list: a local store never loses it behind our back

    def on_accounts_changed(self, listener: Callable[[], None]) -> None:
        if not self._accounts_listeners:
            with contextlib.suppress(Exception):  # baseline: notify on later changes only
                self._accounts_watch.load()
        self._accounts_listeners.append(listener)

    async def add_account_stats(self, deltas: dict[str, AccountStats]) -> bool:
        def apply(accounts: list[Account]) -> list[Account]:
            for a in accounts:
                d = deltas.get(a.id)
                if d is not None:
                    a.add_stats(*d)
            return accounts

        def run() -> None:
            if self.accounts.path.exists():
                self.accounts.update(apply)

        try:
            await anyio.to_thread.run_sync(run)
        except Exception:
            log.exception("writing account counters failed")
            return False
        return True

    def _poll_accounts(self) -> None:
        # Its own AccountStore: load_accounts() on self.accounts must not reset the baseline.
        if self._accounts_listeners and self._accounts_watch.changed():
            with contextlib.suppress(Exception):  # a broken file is the gateway's to report
                self._accounts_watch.load()
            for fn in self._accounts_listeners:
                fn()

    async def cooldown_entries(self) -> list[Cooldown]:
        return self.cooldowns()

