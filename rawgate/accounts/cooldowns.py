"""Cooldowns shared between worker processes (`rawgate serve --workers N`): `cooldowns.json`.

Choice: a small JSON file in RAWGATE_HOME, not shared memory. Workers are separate processes
with their own event loops; a file needs no setup, survives a worker crash, is readable by
`rawgate accounts list` (which shows the cooldowns of the running server) and is trivially
portable. Its cost is one stat() per poll and a ~0.1 ms write when something new was learned.

Invariants:
- What is shared: upstream facts that hold for every worker, i.e. rate-limit cooldowns per
  (account, model) and account-wide auth blocks (see Scheduler.export_cooldowns). Breaker state
  stays per worker (it is a local health estimate and must be able to close again).
- Times in the file are wall-clock (unix seconds) so every process, and the CLI, can read
  them; schedulers work in monotonic time and `sync_cooldowns` converts with one offset sample.
- Merge rule, on publish (under an flock on `cooldowns.json.lock`) and on import alike: latest
  end wins per (account, model); expired entries are dropped. Nothing ever shortens a cooldown,
  so merging in any order converges and a lost race costs at most a redundant write.
- Staleness bound: the gateway runs `sync_cooldowns` every SYNC_INTERVAL_S; a cooldown learned
  by one worker reaches the others within 2 x SYNC_INTERVAL_S (publish on the next tick, poll on
  theirs). Meanwhile another worker may still send the requests it would have sent in that
  window; each gets the same 429 and learns the same cooldown on its own.
- Written with `write_atomic(durable=False)`: readers see the old or the new file, never a torn
  one; the fsyncs are skipped because losing the last cooldowns to a power cut is harmless.
  A file that does not parse is treated as empty (logged once) and replaced on the next publish:
  it is advisory, unlike accounts.json.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Any

import msgspec

from rawgate.accounts.store import write_atomic
from rawgate.accounts.scheduler import Cooldown, Scheduler

__all__ = ["BOARD_MAX_ENTRIES", "SYNC_INTERVAL_S", "CooldownBoard", "sync_cooldowns"]

log = logging.getLogger("rawgate.accounts.cooldowns")

# How often each worker publishes what it learned and polls what others learned.
SYNC_INTERVAL_S = 0.25
# A bound on the file: accounts x models with a live cooldown; beyond it the soonest-ending go.
BOARD_MAX_ENTRIES = 4096
BOARD_VERSION = 1


class _Entry(msgspec.Struct, array_like=True):
    account: str
    model: str
    until: float  # unix seconds
    reason: str


class _Board(msgspec.Struct):
    version: int
    entries: list[_Entry]


_decode = msgspec.json.Decoder(_Board).decode
_encode = msgspec.json.Encoder().encode


def _merge(into: dict[tuple[str, str], _Entry], entries: list[_Entry], now: float) -> None:
    for e in entries:
        if e.until <= now:
            continue
        k = (e.account, e.model)
        old = into.get(k)
        if old is None or e.until > old.until:
            into[k] = e


class CooldownBoard:
    """The shared file. `publish` merges and writes; `poll` reads only when the file changed."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._seen: tuple[int, int, int] | None = None
        self._warned = False

    def _read(self) -> list[_Entry]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            board = _decode(data)
        except msgspec.MsgspecError as e:
            if not self._warned:
                log.warning("%s unreadable (%s); treated as empty", self.path, e)
                self._warned = True
            return []
        return board.entries if board.version == BOARD_VERSION else []

    def publish(self, entries: list[Cooldown], wall_now: float) -> None:
        """Merge `entries` (wall-clock `until`) into the file; latest end wins."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            merged: dict[tuple[str, str], _Entry] = {}
            _merge(merged, self._read(), wall_now)
            _merge(merged, [_Entry(c.account, c.model, c.until, c.reason) for c in entries],
                   wall_now)  # fmt: skip
            out = sorted(merged.values(), key=lambda e: (e.account, e.model))
            if len(out) > BOARD_MAX_ENTRIES:
                out = sorted(out, key=lambda e: -e.until)[:BOARD_MAX_ENTRIES]
            write_atomic(self.path, _encode(_Board(BOARD_VERSION, out)), durable=False)
        finally:
            os.close(fd)

    def poll(self, wall_now: float) -> list[Cooldown] | None:
        """The live entries when the file changed since the last poll, else None (one stat)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen = None
            return None
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        if sig == self._seen:
            return None
        self._seen = sig
        return self.entries(wall_now)

    def entries(self, wall_now: float) -> list[Cooldown]:
        """Every live entry, read now (for the CLI)."""
        return [
            Cooldown(e.account, e.model, e.until, e.reason)
            for e in self._read()
            if e.until > wall_now
        ]

    def clear_account(self, account_id: str) -> None:
        """Forget an account's entries (it was removed or re-enabled by hand)."""
        with contextlib.suppress(OSError):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                keep = [e for e in self._read() if e.account != account_id]
                write_atomic(self.path, _encode(_Board(BOARD_VERSION, keep)), durable=False)
            finally:
                os.close(fd)


def sync_cooldowns(
    scheduler: Scheduler, board: CooldownBoard, mono_now: float, wall_now: float
) -> dict[str, Any]:
    """One tick of the background task: publish what this worker learned, import the rest.

    Blocking file I/O of ~0.1 ms; the gateway may call it on the loop or in a thread. Returns
    counts for logs/metrics.
    """
    offset = wall_now - mono_now
    published = 0
    if scheduler.cooldowns_dirty:
        local = scheduler.export_cooldowns(mono_now)
        board.publish(
            [Cooldown(c.account, c.model, c.until + offset, c.reason) for c in local], wall_now
        )
        published = len(local)
    imported = 0
    remote = board.poll(wall_now)
    if remote:
        imported = scheduler.import_cooldowns(
            [Cooldown(c.account, c.model, c.until - offset, c.reason) for c in remote], mono_now
        )
    return {"published": published, "imported": imported}
