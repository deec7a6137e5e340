"""Two gateways sharing RAWGATE_HOME, as the workers of `rawgate serve --workers N` do: a
cooldown learned by one reaches the other through cooldowns.json."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from rawgate.accounts.store import AccountStore
from rawgate.config import Config
from rawgate.errors import RateLimited
from rawgate.gateway.core import Gateway

pytestmark = pytest.mark.anyio


async def test_a_cooldown_learned_by_one_worker_reaches_the_other(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "accounts.json")
    a = store.add_api_key("key-aaaaaaaaaaaaaaaaaaaaaaaa", label="A")
    b = store.add_api_key("key-bbbbbbbbbbbbbbbbbbbbbbbb", label="B")
    cfg = Config()
    async with (
        Gateway(cfg, home=tmp_path, share_cooldowns=True) as one,
        Gateway(cfg, home=tmp_path, share_cooldowns=True) as two,
    ):
        acc = next(x for x in one.accounts if x.id == a.id)
        one.scheduler.report_failure(acc, "gemini-2.5-flash", time.monotonic(), "rate_limited", 30)
        # Before the board is read, worker two would still pick A.
        learned = False
        for _ in range(40):
            await anyio.sleep(0.1)
            try:
                two.scheduler.pick("gemini-2.5-flash", time.monotonic(), exclude={b.id})
            except RateLimited as e:
                learned = True
                assert 25 <= float(dict(e.headers)[b"retry-after"]) <= 31
                break
        assert learned
        # Other models on A are not affected, and B still serves the cooled model.
        assert two.scheduler.pick("gemini-2.5-pro", time.monotonic(), exclude={b.id}).id == a.id
        assert two.scheduler.pick("gemini-2.5-flash", time.monotonic()).id == b.id
