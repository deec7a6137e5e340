"""`rawgate accounts` on `[state] backend = "redis"`: AccountStore and CooldownBoard with the
same methods, kept in Redis, so cli_accounts.py and cli_login.py run unchanged on either backend.

Invariants:
- For the CLI only: every call is a short `anyio.run` that connects (no subscriber), does one
  read-modify-write and leaves. The server uses the async State methods instead.
- `update(fn)` keeps AccountStore.update's contract (validated, all or nothing, no lost
  update between concurrent writers) through RedisState.update_accounts' version compare-and-
  set; every helper of AccountStore (add, remove, set_enabled, import_accounts ...) is built on
  it and therefore behaves the same on Redis as on accounts.json.
- A store that does not answer raises AccountStoreError with one line (never the URL).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from rawgate.accounts.cooldowns import CooldownBoard
from rawgate.accounts.scheduler import Cooldown as SchedulerCooldown
from rawgate.accounts.store import Account, AccountStore, AccountStoreError
from rawgate.config import Config
from rawgate.state.redis_backend import RedisState
from rawgate.state.store import StateUnavailable, open_state

__all__ = ["RedisAccountStore", "RedisCooldownBoard"]


def _run(cfg: Config, home: Path, fn: Callable[[RedisState], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with open_state(cfg, home, background=False) as st:
            assert isinstance(st, RedisState)
            return await fn(st)

    try:
        return anyio.run(main)
    except StateUnavailable as e:
        raise AccountStoreError(str(e)) from None


class RedisAccountStore(AccountStore):
    def __init__(self, cfg: Config, home: Path) -> None:
        super().__init__(f"redis:{cfg.state.key_prefix}{{accts}}")
        self.cfg = cfg
        self.home = home
        self._version: int | None = None

    def load(self) -> list[Account]:
        version, accounts = _run(self.cfg, self.home, lambda st: st.accounts_snapshot())
        self._version = version
        return list(accounts)

    def changed(self) -> bool:
        version, _ = _run(self.cfg, self.home, lambda st: st.accounts_snapshot())
        return bool(version != self._version)

    def update(self, fn: Callable[[list[Account]], list[Account] | None]) -> list[Account]:
        out: list[Account] = _run(self.cfg, self.home, lambda st: st.update_accounts(fn))
        return out


class RedisCooldownBoard(CooldownBoard):
    def __init__(self, cfg: Config, home: Path) -> None:
        super().__init__(home / "cooldowns.json")  # never written: the cooldowns are in Redis
        self.cfg = cfg
        self.home = home

    def entries(self, wall_now: float) -> list[SchedulerCooldown]:
        live = _run(self.cfg, self.home, lambda st: st.cooldown_entries())
        return [SchedulerCooldown(c.account, c.model, c.until, c.reason)
                for c in live if c.until > wall_now]  # fmt: skip

    def clear_account(self, account_id: str) -> None:
        _run(self.cfg, self.home, lambda st: st.clear_cooldowns(account_id))
