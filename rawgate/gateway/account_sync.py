"""Accounts kept in step with accounts.json and with the other workers: hot reload, batched
per-account counters, stored account changes, shared cooldowns.

Invariants:
- The scheduler is only touched on the event loop; blocking file I/O (accounts.json writes, the
  cooldown board) runs in a worker thread.
- accounts.json is stat()ed every ACCOUNTS_POLL_S; a file that does not load keeps the last good
  accounts (logged), never stops the server.
- Per-request counters are batched in memory and written every STATS_FLUSH_S (never one write
  per request), and once more when the gateway stops.
- With `serve --workers N`, cooldowns are exchanged through the board every COOLDOWN_SYNC_S.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from rawgate.accounts.cooldowns import CooldownBoard
from rawgate.accounts.scheduler import Cooldown, Scheduler
from rawgate.accounts.store import Account, AccountStore

__all__ = ["ACCOUNTS_POLL_S", "COOLDOWN_SYNC_S", "STATS_FLUSH_S", "AccountSync"]

log = logging.getLogger("rawgate.gateway.core")

# How often the running server stats accounts.json for changes made by `rawgate accounts`
# (one stat() call: ~2 us).
ACCOUNTS_POLL_S = 1.0
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
    ) -> None:
        self.store = store
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
        accounts = self.store.load()
        if not accounts and self.demo:
            accounts = list(self.demo)
        self.accounts = {a.id: a for a in accounts}
        self.scheduler.set_accounts(accounts)

    async def watch(self) -> None:
        """Hot reload of accounts.json and batched stats flushes; runs until cancelled."""
        last_flush = time.monotonic()
        while True:
            await anyio.sleep(ACCOUNTS_POLL_S)
            try:
                if self.store.changed():
                    self.reload()
                    self.on_reload()
                    log.info("accounts reloaded: %d account(s)", len(self.accounts))
                now = time.monotonic()
                if self.dirty and now - last_flush >= STATS_FLUSH_S:
                    last_flush = now
                    await anyio.to_thread.run_sync(self.flush)
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
        """Set fields of one stored account (in a thread: lock + fsync take milliseconds)."""

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


# cooldowns.sync_cooldowns does both halves in one call; the gateway splits it so that the
# scheduler is only touched on the event loop while the file I/O runs in a thread.
def _to_wall(entries: list[Cooldown], mono: float, wall: float) -> list[Cooldown]:
    off = wall - mono
    return [Cooldown(c.account, c.model, c.until + off, c.reason) for c in entries]


def _to_mono(entries: list[Cooldown], mono: float, wall: float) -> list[Cooldown]:
    off = wall - mono
    return [Cooldown(c.account, c.model, c.until - off, c.reason) for c in entries]
