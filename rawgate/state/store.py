"""Shared state: one interface, two backends (state/local.py: files under RAWGATE_HOME;
state/redis_backend.py: Redis/Valkey through coredis), chosen by `[state] backend`.

What is shared: cooldowns and auth rests per (account, model) (model "" = every model), stored
Responses (previous_response_id), client keys with their limits and usage, usage per key /
account / model in hourly buckets, OAuth access tokens with one refresh per account at a time,
the accounts list. What is not: circuit breakers (a per-instance health estimate), connection
pools, in-flight counts.

Invariants (both backends; tests/e2e/test_state.py runs the same tests on each):
- Hot path, per request: `lookup_key` and `cooldown_until` read a local mirror (no I/O);
  `check_key` is one round trip (one script that checks and counts); `record_usage` one more,
  after the answer (Redis: buffered, one round trip per `[state] usage_flush_ms` for all the
  answers meanwhile). Nothing else touches the store while serving.
- A cooldown only ever grows: `set_cooldown` with an earlier end than the current one is a
  no-op (the Lua script, or the same rule locally), whoever calls it and in whatever order.
- Request-path methods (cooldowns, lookup_key, check_key, record_usage, responses, tokens,
  refresh locks) never raise for a store failure: the Redis backend answers from local state,
  flips `degraded` (one warning per episode), retries with backoff in the background and, once
  back, pushes what it learned meanwhile (cooldowns, clears, usage, stored Responses: until
  then those continue on this instance only; it keeps the Responses it stored and reads them
  first). Limits then follow `[state] limits_fail`.
- Admin methods (keys add/list/rotate/..., usage, accounts) need the store: they raise
  StateUnavailable (one line, no URL) when it does not answer, KeyStoreError /
  AccountStoreError for bad arguments (an unknown key name ...).
- Times crossing the interface are wall-clock unix seconds (floats), because they are compared
  across processes and machines.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import anyio

from rawgate.accounts.store import Account
from rawgate.config import Config, StateConfig
from rawgate.state.keys import KeyRecord, KeyStoreError, hash_key
from rawgate.state.limiter import Decision, Limits, Usage, model_allowed

__all__ = [
    "BACKOFF_BASE_S",
    "METRIC_KEYS_MAX",
    "OTHER_KEY",
    "AccountStats",
    "Cooldown",
    "Health",
    "KeyStoreError",
    "RefreshBusy",
    "State",
    "StateUnavailable",
    "open_state",
    "refresh_once",
]

log = logging.getLogger("rawgate.state.store")

# First retry of an unreachable store after this; doubling up to [state] redis_backoff_max_s.
BACKOFF_BASE_S = 0.5
# Usage kinds: per client key, per upstream account, per (mapped) model.
USAGE_KINDS = ("key", "account", "model")
# /metrics: per-key series for at most this many key names; the rest are summed as OTHER_KEY.
METRIC_KEYS_MAX = 256
OTHER_KEY = "_other"


# Per-account counter deltas: requests, tokens in, tokens out, errors, last error (None: none).
AccountStats = tuple[int, int, int, int, str | None]


def _no_text(err: BaseException) -> str:
    """Words for an error that carries none (anyio's stream errors on a dropped connection, as
    the lean Redis path meets them), so the one warning per episode still names a cause."""
    if isinstance(err, (anyio.BrokenResourceError, anyio.EndOfStream, anyio.ClosedResourceError)):
        return "the connection was closed"
    return "no detail given"


class StateUnavailable(Exception):
    """`rawgate keys` needs the store and it does not answer (one line for the user)."""


@dataclass(frozen=True, slots=True)
class Cooldown:
    account: str
    model: str  # "" = every model of the account (an auth rest)
    until: float  # wall-clock unix seconds
    reason: str


class Health:
    """Degraded-mode bookkeeping, sans-IO: episodes, one warning each, and the backoff.

    An episode starts at the first failure after a success and ends at the next success. The
    gateway shows `degraded` in /healthz and exports `episodes` / `failures` as metrics.
    """

    __slots__ = ("_clock", "backoff_max_s", "degraded", "delay_s", "episodes", "failures",
                 "name", "since")  # fmt: skip

    def __init__(
        self, name: str, backoff_max_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.backoff_max_s = max(BACKOFF_BASE_S, backoff_max_s)
        self._clock = clock
        self.degraded = False
        self.since = 0.0
        self.episodes = 0
        self.failures = 0
        self.delay_s = BACKOFF_BASE_S

    def failed(self, err: BaseException) -> None:
        self.failures += 1
        if not self.degraded:
            self.degraded = True
            self.since = self._clock()
            self.episodes += 1
            self.delay_s = BACKOFF_BASE_S
            # The message of a connection error names host:port, never the URL's password.
            log.warning(
                "%s unreachable (%s: %s); serving on local state until it is back",
                self.name, type(err).__name__, str(err)[:200] or _no_text(err),
            )  # fmt: skip

    def next_delay(self) -> float:
        """How long to wait before the next attempt (doubles each call while degraded)."""
        d = self.delay_s
        self.delay_s = min(self.backoff_max_s, self.delay_s * 2)
        return d

    def succeeded(self) -> None:
        if self.degraded:
            log.warning("%s is back after %.1f s", self.name, self._clock() - self.since)
        self.degraded = False
        self.delay_s = BACKOFF_BASE_S


class State(abc.ABC):
    """The interface the gateway, the CLI and the token manager call. See the module note."""

    health: Health
    backend: str = ""
    _by_hash: dict[str, KeyRecord]  # key hash -> record: the local mirror of the key table
    _salt: str  # the key table's salt ('' until the table has one)
    # (account, model or '' for account-wide) -> its cooldown: the local mirror, and who hears
    _cooldowns: dict[tuple[str, str], Cooldown]
    _listeners: list[Callable[[Cooldown], None]]

    def __init__(self) -> None:
        # Per-key counters of this process for /metrics: name -> outcome -> count, and
        # name -> [tokens in, tokens out]. Names beyond METRIC_KEYS_MAX share OTHER_KEY.
        self.key_outcomes: dict[str, dict[str, int]] = {}
        self.key_tokens: dict[str, list[int]] = {}

    @property
    def degraded(self) -> bool:
        return self.health.degraded

    def has_keys(self) -> bool:
        """True while at least one client key exists (from the local mirror, no I/O)."""
        return bool(self._by_hash)

    def status(self) -> dict[str, Any]:
        """For /healthz: {"backend", "state": "ok" | "degraded", "degraded_episodes"}."""
        return {
            "backend": self.backend,
            "state": "degraded" if self.health.degraded else "ok",
            "degraded_episodes": self.health.episodes,
        }

    def _metric_name(self, name: str, table: dict[str, Any]) -> str:
        return name if name in table or len(table) < METRIC_KEYS_MAX else OTHER_KEY

    def tally_decision(self, key: str, decision: Decision) -> None:
        """Count a check_key outcome (both backends call it; the gateway need not)."""
        outcomes = self.key_outcomes.setdefault(self._metric_name(key, self.key_outcomes), {})
        outcome = "allowed" if decision.allowed else decision.reason
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    def tally_tokens(self, key: str, tokens_in: int, tokens_out: int) -> None:
        row = self.key_tokens.setdefault(self._metric_name(key, self.key_tokens), [0, 0])
        row[0] += max(0, tokens_in)
        row[1] += max(0, tokens_out)

    def metrics_collectors(self) -> list[tuple[str, Literal["gauge", "counter"], str, Any]]:
        """Series for `Metrics.add_collector(*entry)`. Key names are chosen by the admin and
        bounded (METRIC_KEYS_MAX, then "_other"); the keys themselves never appear."""

        def degraded() -> list[tuple[dict[str, str], float]]:
            return [({"backend": self.backend}, 1.0 if self.health.degraded else 0.0)]

        def episodes() -> list[tuple[dict[str, str], float]]:
            return [({"backend": self.backend}, float(self.health.episodes))]

        def failures() -> list[tuple[dict[str, str], float]]:
            return [({"backend": self.backend}, float(self.health.failures))]

        def outcomes() -> list[tuple[dict[str, str], float]]:
            return [({"key": k, "outcome": o}, float(n))
                    for k, per in self.key_outcomes.items() for o, n in per.items()]  # fmt: skip

        def tokens() -> list[tuple[dict[str, str], float]]:
            out: list[tuple[dict[str, str], float]] = []
            for k, (tin, tout) in self.key_tokens.items():
                out.append(({"key": k, "direction": "in"}, float(tin)))
                out.append(({"key": k, "direction": "out"}, float(tout)))
            return out

        return [
            ("rawgate_state_degraded", "gauge",
             "1 while the shared state store does not answer (served on local state).", degraded),
            ("rawgate_state_degraded_episodes_total", "counter",
             "Times the shared state store became unreachable.", episodes),
            ("rawgate_state_errors_total", "counter",
             "Shared state store calls that failed or timed out.", failures),
            ("rawgate_key_requests_total", "counter",
             "Client-key checks by outcome (allowed, rpm, tpm, daily_tokens, model, disabled, "
             "state_unavailable).", outcomes),
            ("rawgate_key_tokens_total", "counter", "Tokens per client key and direction.",
             tokens),
        ]  # fmt: skip

    @abc.abstractmethod
    async def run(
        self, *, task_status: Any = anyio.TASK_STATUS_IGNORED, background: bool = True
    ) -> None:
        """Background work (subscriber, reconnection, usage flushes) until cancelled.
        `background=False` (the CLI): connect only, no subscriber, no periodic work."""

    # ---- cooldowns: per (account, model), shared within 100 ms (redis: pub/sub) ----

    @abc.abstractmethod
    async def set_cooldown(self, account: str, model: str, seconds: float, reason: str) -> float:
        """Block (account, model) for `seconds` unless already blocked longer; the end in force."""

    @abc.abstractmethod
    async def clear_cooldowns(self, account: str) -> None:
        """Forget every cooldown of an account (re-enabled or removed by hand)."""

    def cooldowns(self) -> list[Cooldown]:
        """Every live cooldown, from the local mirror (both backends keep `_cooldowns`)."""
        now = time.time()
        return [c for c in self._cooldowns.values() if c.until > now]

    def cooldown_until(self, account: str, model: str) -> float:
        """When (account, model) is usable again: the later of its own and the account-wide
        end; 0.0 = now. From the local mirror (no I/O)."""
        a = self._cooldowns.get((account, model))
        b = self._cooldowns.get((account, ""))
        end = max(a.until if a else 0.0, b.until if b else 0.0)
        return end if end > time.time() else 0.0

    def on_cooldown(self, listener: Callable[[Cooldown], None]) -> None:
        """Call `listener` for every cooldown learned (here or on another instance); a clear
        arrives as Cooldown(account, "", 0.0, "cleared")."""
        self._listeners.append(listener)

    # ---- client keys ----

    def lookup_key(self, plain: str) -> KeyRecord | None:
        """The record of a presented client key (enabled or not), None if unknown. No I/O:
        the local mirror of the key table, by salted hash (both backends keep it)."""
        if not self._salt:
            return None
        return self._by_hash.get(hash_key(self._salt, plain))

    async def check_key(self, record: KeyRecord, model: str) -> Decision:
        """Admit one request of `record` for `model` and count it, or refuse (429/403 data).
        The rules that need no counting are decided here for both backends; only a limited
        key reaches the backend's atomic check-and-record."""
        if not record.enabled:
            decision = Decision(False, 0, "disabled")
        else:
            limits = record.limits()
            if not model_allowed(limits.models, model):
                decision = Decision(False, 0, "model")
            elif limits.unlimited:
                decision = Decision(True)
            else:
                decision = await self._count_request(record, limits)
        self.tally_decision(record.name, decision)
        return decision

    @abc.abstractmethod
    async def _count_request(self, record: KeyRecord, limits: Limits) -> Decision:
        """Check-and-record one request of a limited key against its windows, atomically
        across every process that shares the backend."""

    @abc.abstractmethod
    async def record_usage(
        self, key: str | None, account: str, model: str, tokens_in: int, tokens_out: int
    ) -> None:
        """After the answer: the key's token windows (tpm, daily) and the hourly usage of the
        key, the account and the model. `model` is the mapped upstream model (bounded set)."""

    async def before_stop(self) -> None:
        """Called by `open_state` before the background tasks stop (the connections are still
        up): Redis sends the usage it buffered. Never raises."""
        return None

    @abc.abstractmethod
    async def usage(self, kind: str, name: str | None, since_s: float) -> dict[str, list[Usage]]:
        """Hourly buckets of `kind` ("key" | "account" | "model") since `since_s` ago."""

    @abc.abstractmethod
    async def list_keys(self) -> list[KeyRecord]: ...

    @abc.abstractmethod
    async def add_key(
        self, name: str, *, rpm: int = 0, tpm: int = 0, daily_tokens: int = 0,
        models: list[str] | None = None,
    ) -> tuple[KeyRecord, str]:  # fmt: skip
        """A new key (the plain key is returned once and stored hashed)."""

    @abc.abstractmethod
    async def rotate_key(self, name: str) -> tuple[KeyRecord, str]: ...

    @abc.abstractmethod
    async def set_key_enabled(self, name: str, enabled: bool) -> KeyRecord: ...

    @abc.abstractmethod
    async def remove_key(self, name: str) -> KeyRecord: ...

    # ---- stored Responses (previous_response_id) ----

    @abc.abstractmethod
    async def put_response(
        self, response_id: str, input_items: list[dict[str, Any]],
        output_items: list[dict[str, Any]],
    ) -> bool:  # fmt: skip
        """Store now (write-through, before response.completed); False when over the bytes
        bound (then not stored)."""

    @abc.abstractmethod
    async def get_response(self, response_id: str) -> list[dict[str, Any]] | None:
        """The conversation up to and including that response, None if unknown or expired."""

    # ---- OAuth access tokens ----

    @abc.abstractmethod
    async def get_access_token(self, account: str) -> tuple[str, float] | None:
        """(token, expires_at) if one is cached and not expired."""

    @abc.abstractmethod
    async def put_access_token(self, account: str, token: str, expires_at: float) -> None: ...

    @abc.abstractmethod
    async def acquire_refresh_lock(self, account: str, ttl_s: float) -> str | None:
        """An owner token if this caller may refresh the account's token now, else None. The
        lock lapses by itself after `ttl_s` (a refresher that died does not block others)."""

    @abc.abstractmethod
    async def release_refresh_lock(self, account: str, owner: str) -> None:
        """Release if still held by `owner` (a lapsed and re-taken lock is left alone)."""

    # ---- accounts ----

    @abc.abstractmethod
    async def load_accounts(self) -> list[Account]: ...

    @abc.abstractmethod
    async def import_accounts(self, accounts: list[Account]) -> tuple[int, int]:
        """Add the accounts whose secret is not there yet: (added, skipped)."""

    @abc.abstractmethod
    async def update_accounts(
        self, fn: Callable[[list[Account]], list[Account] | None]
    ) -> list[Account]:
        """AccountStore.update's contract: `fn` edits the current list (or returns a new one),
        the result is validated and written all or nothing; concurrent writers never lose each
        other's changes (flock locally, a version compare-and-set in Redis)."""

    @abc.abstractmethod
    def hold_accounts(self, accounts: list[Account]) -> None:
        """The list a server started on while the store did not answer, last read from it in
        an earlier run (the gateway's cache): what to put back should the store come back
        without its data (Redis: like a list read in this run; locally nothing to do)."""

    @abc.abstractmethod
    def on_accounts_changed(self, listener: Callable[[], None]) -> None:
        """Call `listener` (no arguments) after the accounts list changed anywhere (Redis: also
        after every reconnection, since a change may have been missed meanwhile)."""

    @abc.abstractmethod
    async def add_account_stats(self, deltas: dict[str, AccountStats]) -> bool:
        """Add per-account counters, batched by the gateway (never one call per request):
        id -> (requests, tokens in, tokens out, errors, last error or None). Unknown ids are
        ignored. False when the store did not take them (the caller keeps them for the next
        flush); never raises for a store failure."""

    @abc.abstractmethod
    async def cooldown_entries(self) -> list[Cooldown]:
        """Every live cooldown read from the store itself (for the CLI, which has no mirror)."""


class RefreshBusy(Exception):
    """refresh_once waited its bound while another caller held the account's refresh lock."""


async def refresh_once(
    state: State,
    account: str,
    refresh: Callable[[], Awaitable[tuple[str, float]]],
    *,
    lock_ttl_s: float = 45.0,
    wait_s: float = 10.0,
    poll_s: float = 0.05,
    min_valid_s: float = 0.0,
    reject: str = "",
) -> tuple[str, float]:
    """(token, good_until) for `account`, refreshed by at most one caller in the fleet at a time.

    A shared token good for `min_valid_s` more is returned as is. Otherwise the caller that
    takes the lock calls `refresh()` (-> token, good_until), stores and releases; the others
    poll the shared token every `poll_s` until it appears or the lock is free (a holder that
    failed released it; one that died let it lapse after `lock_ttl_s`): then they try to take
    it. A caller that waited `wait_s` in all raises RefreshBusy (the lock holder is slow or
    dead; its lock lapses by itself). `refresh()`'s errors propagate to its caller; waiters
    then take the lock in turn. `reject`: a token the caller saw refused (a shared copy of it
    counts as none).
    """

    def usable(cached: tuple[str, float] | None) -> bool:
        return (cached is not None and cached[0] != reject
                and cached[1] - time.time() > min_valid_s)  # fmt: skip

    deadline = time.monotonic() + wait_s
    while True:
        cached = await state.get_access_token(account)
        if usable(cached):
            assert cached is not None
            return cached
        owner = await state.acquire_refresh_lock(account, lock_ttl_s)
        if owner is not None:
            try:
                # Checked again under the lock: a holder may have stored a token and released
                # between our cache miss and our acquire (else that is a second refresh).
                cached = await state.get_access_token(account)
                if usable(cached):
                    assert cached is not None
                    return cached
                token, until = await refresh()
                await state.put_access_token(account, token, until)
                return token, until
            finally:
                with anyio.CancelScope(shield=True):  # a cancelled refresher frees the lock
                    await state.release_refresh_lock(account, owner)
        if time.monotonic() >= deadline:
            raise RefreshBusy(account)
        await anyio.sleep(poll_s)


def _make(cfg: Config, home: Path, processes: int) -> State:
    st: StateConfig = cfg.state
    if st.backend == "redis":
        try:
            from rawgate.state.redis_backend import RedisState
        except ImportError as e:  # pragma: no cover - coredis is a runtime dependency
            raise StateUnavailable(f"[state] backend = redis needs coredis: {e}") from None
        return RedisState(cfg, home)
    from rawgate.state.local import LocalState

    return LocalState(cfg, home, shared=processes > 1)


@contextlib.asynccontextmanager
async def open_state(
    cfg: Config, home: Path, *, processes: int = 1, background: bool = True
) -> AsyncIterator[State]:
    """The configured backend, running (its background tasks live in this context).

    `processes` > 1 (serve --workers N) makes the local backend count limits in a shared,
    locked file instead of in memory, so N workers on one host enforce one limit, and share
    cooldowns through cooldowns.json.
    """
    state = _make(cfg, home, processes)
    raised: Exception | None = None
    async with anyio.create_task_group() as tg:
        await tg.start(partial(state.run, background=background))
        try:
            yield state
        except Exception as e:  # re-raised as itself below, not inside an ExceptionGroup
            raised = e
        finally:
            with anyio.CancelScope(shield=True):  # also when leaving by cancellation
                await state.before_stop()
            tg.cancel_scope.cancel()
    if raised is not None:
        raise raised

