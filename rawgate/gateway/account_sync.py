"""Accounts kept in step with accounts.json (or Redis) and with the other workers: hot reload,
batched per-account counters, stored account changes, shared cooldowns.

Invariants:
- The source of the accounts list is the configured `[state]` backend: accounts.json locally,
  the P{accts} hash with `backend = "redis"` (then accounts.json is not read, except as the
  fallback below). On Redis a change made anywhere (`rawgate accounts ...` on any machine, a
  disable by another instance) is published (pub/sub "accts") and every instance re-reads the
  list at once (one HGETALL); after a reconnection too, since an event may have been missed.
- Redis holding no account while accounts.json holds some is never resolved by importing on
  our own (an instance with a stale file would bring back accounts removed from the fleet):
  the server serves what Redis holds and warns, naming `rawgate accounts import`.
- Redis not answering at start: the server starts on the list it last read from Redis
  (RAWGATE_HOME/accounts.redis-cache.json, 0600, rewritten after every read), else on
  accounts.json, and says so; a reload that fails keeps the list in use. Either way, Redis
  answering again reloads.
- Redis back without its data (an empty restart: the list's version key is gone) never
  replaces the list in use, nor the cache, with an empty one: the state backend first puts
  back the list this instance read from Redis (or started on from the cache; never
  accounts.json's), the first instance back wins, and only then are the listeners told.
- The scheduler is only touched on the event loop; blocking file I/O (accounts.json writes, the
  cooldown board) runs in a worker thread.
- accounts.json is stat()ed every ACCOUNTS_POLL_S; a file that does not load keeps the last good
  accounts (logged), never stops the server.
- Per-request counters are batched in memory and written every STATS_FLUSH_S (never one write
  per request), and once more when the gateway stops: into accounts.json, or on Redis as
  HINCRBYs of one script per flush (no version bump, no reload anywhere); a flush Redis does
  not take is kept for the next one (bounded: one row per account).
- With `serve --workers N`, cooldowns are exchanged through the board every COOLDOWN_SYNC_S.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from rawgate.accounts.cooldowns import CooldownBoard
from rawgate.accounts.scheduler import Cooldown, Scheduler
from rawgate.accounts.store import (
    Account,
    AccountStore,
    AccountStoreError,
    encode_store,
    write_atomic,
)
from rawgate.state.store import State

__all__ = ["ACCOUNTS_POLL_S", "COOLDOWN_SYNC_S", "STATS_FLUSH_S", "AccountSync"]

log = logging.getLogger("rawgate.gateway.core")

# How often the running server stats accounts.json for changes made by `rawgate accounts`
# (one stat() call: ~2 us).
ACCOUNTS_POLL_S = 1.0
# The accounts last read from Redis, for a start while it does not answer (under RAWGATE_HOME).
REDIS_CACHE_NAME = "accounts.redis-cache.json"
# How often per-account counters are written back (batched: never one write per request).
STATS_FLUSH_S = 10.0
# How often a worker of `serve --workers N` exchanges cooldowns with the others (cooldowns.py).
COOLDOWN_SYNC_S = 0.25


class AccountSync:
    """The accounts the scheduler serves, and what flows back to accounts.json and the board.

    `tg` is the gateway's task group while it runs (None otherwise): stored changes started
    from the request path (a rotated refresh token, a discovered project) run there."""

    def __init__(
        self,
        store: AccountStore,
        scheduler: Scheduler,
        board: CooldownBoard | None,
        demo: list[Account],
        on_reload: Callable[[], None],
        shared: State | None = None,
    ) -> None:
        self.store = store
        # The accounts list's store when it is not accounts.json (`[state] backend = "redis"`).
        self.shared = shared
        self._changed = anyio.Event()
        self.cache = AccountStore(store.path.with_name(REDIS_CACHE_NAME))
        self.scheduler = scheduler
        self.board = board
        self.demo = demo
        self.on_reload = on_reload
        self.accounts: dict[str, Account] = {}
        self.dirty: dict[str, list[Any]] = {}  # per-account counters not yet written
        # The last failure message per account id (the admin API shows it; bounded by the pool)
        self.last_error: dict[str, str] = {}
        self.tg: Any = None

    def reload(self) -> None:
        """Load accounts.json (or the demo accounts while it holds none) into the scheduler.
        Raises AccountStoreError for a corrupt file (start-up stops; a reload keeps the old set)."""
        self.install(self.store.load())

    def install(self, accounts: list[Account]) -> None:
        if not accounts and self.demo:
            accounts = list(self.demo)
        self.accounts = {a.id: a for a in accounts}
        self.scheduler.set_accounts(accounts)

    async def start(self) -> None:
        """With a shared accounts list: listen for changes, then load it (see the module note).
        Locally nothing to do: __init__ loaded accounts.json."""
        st = self.shared
        if st is None:
            return
        st.on_accounts_changed(self._shared_changed)
        try:
            accounts = await st.load_accounts()
        except Exception as e:
            source, fallback = await anyio.to_thread.run_sync(self._fallback)
            if source == self.cache.path:
                st.hold_accounts(fallback)  # put back should Redis return without its data
            self.install(fallback)
            log.warning(
                "accounts: the list in Redis ([state] redis_url) cannot be read (%s); serving "
                "the %d account(s) of %s until it can", _one_line(e), len(fallback), source,
            )  # fmt: skip
            return
        await anyio.to_thread.run_sync(self._save_cache, accounts)
        if not accounts:
            n = len(await anyio.to_thread.run_sync(self._file_accounts))
            if n:
                log.warning(
                    "accounts: Redis holds no account, %s holds %d: serving none of them (with "
                    "[state] backend = \"redis\" the list is in Redis). Copy them once with "
                    "`rawgate accounts import %s`; every instance picks them up at once.",
                    self.store.path, n, self.store.path,
                )  # fmt: skip
        self.install(accounts)

    def _shared_changed(self) -> None:
        self._changed.set()  # (the watcher replaces the event after each wake-up)

    def _file_accounts(self) -> list[Account]:
        try:
            return self.store.load()
        except AccountStoreError as e:
            log.warning("accounts: %s", e)
            return []

    def _fallback(self) -> tuple[Path, list[Account]]:
        """Where to start while Redis does not answer: its last list, else accounts.json."""
        if self.cache.path.exists():  # (an empty list read from Redis counts)
            try:
                return self.cache.path, self.cache.load()
            except AccountStoreError as e:
                log.warning("accounts: %s", e)
        return self.store.path, self._file_accounts()

    def _save_cache(self, accounts: list[Account]) -> None:
        try:
            write_atomic(self.cache.path, encode_store(accounts), durable=False)
        except OSError as e:
            log.warning("accounts: %s cannot be written: %s", self.cache.path, e.strerror or e)

    async def watch_shared(self) -> None:
        """Re-read the shared list whenever it changed (pub/sub or a reconnection); runs until
        cancelled. A burst of changes costs one read."""
        st = self.shared
        assert st is not None
        while True:
            await self._changed.wait()
            self._changed = anyio.Event()
            try:
                accounts = await st.load_accounts()
            except Exception as e:
                log.warning(
                    "accounts: reloading from Redis failed (%s); keeping the %d account(s) in "
                    "use", _one_line(e), len(self.accounts),
                )  # fmt: skip
                continue
            self.install(accounts)
            self.on_reload()
            await anyio.to_thread.run_sync(self._save_cache, accounts)
            log.info("accounts reloaded from Redis: %d account(s)", len(self.accounts))

    async def watch(self) -> None:
        """Hot reload of accounts.json and batched stats flushes; runs until cancelled."""
        last_flush = time.monotonic()
        while True:
            await anyio.sleep(ACCOUNTS_POLL_S)
            try:
                if self.shared is None and self.store.changed():
                    self.reload()
                    self.on_reload()
                    log.info("accounts reloaded: %d account(s)", len(self.accounts))
                now = time.monotonic()
                if self.dirty and now - last_flush >= STATS_FLUSH_S:
                    last_flush = now
                    await self.flush_async()
            except Exception:  # a bad file must not kill the server: keep the last good state
                log.exception("accounts reload failed; keeping the previous accounts")

    async def sync_cooldowns(self) -> None:
        board = self.board
        assert board is not None
        while True:
            await anyio.sleep(COOLDOWN_SYNC_S)
            try:
                # The scheduler is only touched on the loop: the thread does the file I/O.
                if self.scheduler.cooldowns_dirty:
                    mono, wall = time.monotonic(), time.time()
                    local = self.scheduler.export_cooldowns(mono)
                    self.scheduler.cooldowns_dirty = False
                    await anyio.to_thread.run_sync(board.publish, _to_wall(local, mono, wall), wall)
                wall = time.time()
                remote = await anyio.to_thread.run_sync(board.poll, wall)
                if remote:
                    mono = time.monotonic()
                    self.scheduler.import_cooldowns(_to_mono(remote, mono, time.time()), mono)
            except Exception:
                log.exception("cooldown sync failed")

    def count(self, acc: Account, tokens_in: int, tokens_out: int, error: str | None) -> None:
        d = self.dirty.get(acc.id)
        if d is None:
            d = self.dirty[acc.id] = [0, 0, 0, 0, None]
        d[0] += 1
        d[1] += tokens_in
        d[2] += tokens_out
        if error is not None:
            d[3] += 1
            d[4] = self.last_error[acc.id] = error

    async def flush_async(self) -> None:
        """Write the batched counters: to the shared store, or accounts.json in a thread."""
        if self.shared is None:
            await anyio.to_thread.run_sync(self.flush)
            return
        dirty, self.dirty = self.dirty, {}
        if not dirty:
            return
        deltas = {k: (d[0], d[1], d[2], d[3], d[4]) for k, d in dirty.items()}
        if not await self.shared.add_account_stats(deltas):
            # Redis is away: keep them (one row per account) for the next flush.
            for k, d in dirty.items():
                cur = self.dirty.get(k)
                if cur is None:
                    self.dirty[k] = d
                else:
                    for i in range(4):
                        cur[i] += d[i]
                    cur[4] = cur[4] or d[4]

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, {}
        if not dirty or not self.store.path.exists():
            return

        def apply(accounts: list[Account]) -> list[Account]:
            for a in accounts:
                d = dirty.get(a.id)
                if d is not None:
                    a.add_stats(d[0], d[1], d[2], d[3], d[4])
            return accounts

        try:
            self.store.update(apply)
            self.store.changed()  # our own write is not a change to reload
        except Exception:
            log.exception("writing account counters failed")

    async def persist(self, acc_id: str, **fields: Any) -> None:
        """Set fields of one stored account (in a thread: lock + fsync take milliseconds; on
        Redis one compare-and-set, which every instance then reloads)."""

        def apply(accounts: list[Account]) -> list[Account]:
            for a in accounts:
                if a.id == acc_id:
                    for k, v in fields.items():
                        setattr(a, k, v)
            return accounts

        def run() -> None:
            if self.store.path.exists():
                self.store.update(apply)

        with anyio.CancelScope(shield=True):
            if self.shared is not None:
                try:
                    await self.shared.update_accounts(apply)
                except Exception as e:
                    log.warning("updating account %s in Redis failed: %s", acc_id, _one_line(e))
                return
            try:
                await anyio.to_thread.run_sync(run)
            except Exception:
                log.exception("updating account %s in accounts.json failed", acc_id)

    async def disable(self, acc: Account, reason: str) -> None:
        acc.enabled = False
        acc.disabled_reason = reason
        self.scheduler.set_accounts(list(self.accounts.values()))
        log.warning("account %s disabled: %s", acc.display_name(), reason)
        await self.persist(acc.id, enabled=False, disabled_reason=reason)

    def on_refresh_token(self, acc: Account, new_token: str) -> None:
        """TokenManager's hook: Google rotated the refresh token; store the new one."""
        self.later(acc.id, refresh_token=new_token)

    def later(self, acc_id: str, **fields: Any) -> None:
        """Store `fields` of one account in the background (no-op while the gateway is not
        running)."""
        if self.tg is not None:
            self.tg.start_soon(self._persist_later, acc_id, fields)

    async def _persist_later(self, acc_id: str, fields: dict[str, Any]) -> None:
        await self.persist(acc_id, **fields)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


# cooldowns.sync_cooldowns does both halves in one call; the gateway splits it so that the
# scheduler is only touched on the event loop while the file I/O runs in a thread.
def _to_wall(entries: list[Cooldown], mono: float, wall: float) -> list[Cooldown]:
    off = wall - mono
    return [Cooldown(c.account, c.model, c.until + off, c.reason) for c in entries]


def _to_mono(entries: list[Cooldown], mono: float, wall: float) -> list[Cooldown]:
    off = wall - mono
    return [Cooldown(c.account, c.model, c.until - off, c.reason) for c in entries]
