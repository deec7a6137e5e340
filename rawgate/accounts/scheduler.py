"""Which account serves the next upstream attempt: selection modes, cooldowns, breaker, budget.

Invariants:
- Sans-IO: every method takes `now` (time.monotonic() seconds) and returns at once; no await,
  no file, no clock read. One scheduler per worker process; the event loop is its only thread.
- `pick()` is O(1) amortised for round_robin and sticky (a cursor; a bounded key -> account map
  over rendezvous hashing) and O(accounts) at worst (many accounts cooling, least_loaded).
- An account is usable for model M when it is enabled, not in `exclude`, and no block applies:
  a cooldown for (account, M), an account-wide rest (connect failure, auth failure, a cooldown
  learned from another worker), or an open circuit breaker. A half-open breaker admits exactly
  one probe request; its result closes or re-opens the breaker.
- Cooldowns come from the upstream's own words first: RetryInfo.retryDelay / Retry-After (the
  gateway passes them as `retry_after_s`), honoured up to COOLDOWN_MAX_S (a day: quota resets).
  Without a hint, repeated failures back off exponentially. There is no "reset all cooldowns"
  shortcut (the seed's "optimistic reset" turned every exhaustion into a 429 storm): when every
  account is blocked, `pick()` raises with Retry-After = the soonest end, rounded up.
- The client learns the real cause: all blocked with at least one rate limit -> 429
  (AccountsCooling); all blocked by failures only -> 503 (AccountsFailing), both with
  Retry-After; none configured or all disabled -> 503 NoAccountAvailable saying how to add one.
  Messages carry counts and models, never account names or secrets (shared deployments).
- Bookkeeping is keyed by account id, so a hot reload of accounts.json (new Account objects)
  keeps in-flight counts, cooldowns and breakers. Re-enabling a disabled account clears its
  health state (a human said it is fixed).
- Retry budget (Envoy/Finagle style): retries in the last RETRY_BUDGET_WINDOW_S may not exceed
  max(RETRY_BUDGET_MIN, ratio x in-flight requests), so a failing upstream is not hammered.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rawgate.accounts.store import Account
from rawgate.errors import NoAccountAvailable, RateLimited, RawgateError, ServiceUnavailable
from rawgate.metrics import Collector, Sample

__all__ = [
    "AccountsCooling",
    "AccountsFailing",
    "Cooldown",
    "FailureKind",
    "Mode",
    "Scheduler",
]

Mode = Literal["round_robin", "least_loaded", "sticky"]
FailureKind = Literal["rate_limited", "server", "connect", "auth"]
Exclude = set[str] | frozenset[str]

# 429 without a hint: the first cooldown of that (account, model); doubles per consecutive 429
# up to the cap (10 s, 20 s, ... 640 s), reset by a success on that pair.
RATE_LIMIT_DEFAULT_S = 10.0
RATE_LIMIT_BACKOFF_MAX_S = 640.0
# Upstream hints are honoured as given between these bounds: sub-second retryDelays exist
# ("900ms"), and daily quotas say "retry in 51820s"; longer than a day is a bogus value.
COOLDOWN_MIN_S = 0.25
COOLDOWN_MAX_S = 86_400.0
# One 5xx rests that (account, model) briefly so the retry rotates instead of re-hitting it.
SERVER_COOLDOWN_S = 1.0
# One connect failure rests the whole account briefly (it is not model-specific).
CONNECT_COOLDOWN_S = 1.0
# Circuit breaker per account over consecutive server/connect failures (any model): opens at
# the threshold for BREAKER_OPEN_S, doubling per further failure up to the cap; then half-open.
BREAKER_THRESHOLD = 3
BREAKER_OPEN_S = 5.0
BREAKER_OPEN_MAX_S = 300.0
# Retry-After hint while a half-open account's single probe is in flight.
HALF_OPEN_WAIT_S = 1.0
# 401/403: the key or token is bad for a while (it rarely heals by itself): 60 s doubling to 1 h.
AUTH_COOLDOWN_S = 60.0
AUTH_COOLDOWN_MAX_S = 3_600.0
# Retry budget: sliding window and the floor that lets a quiet gateway still retry.
RETRY_BUDGET_WINDOW_S = 10.0
RETRY_BUDGET_MIN = 3
# Model names are client-controlled: bound the per-account cooldown table.
MODEL_COOLDOWNS_MAX = 256
# sticky: conversation key -> home account id cache; FIFO-evicted beyond this many keys
# (~100 bytes each: 1 MB).
STICKY_CACHE_MAX = 10_000


class AccountsCooling(RateLimited):
    """429: every usable account is cooling down for the model (rate limited upstream)."""


class AccountsFailing(ServiceUnavailable):
    """503: every usable account is resting after upstream failures (5xx, connect, auth)."""

    default_code = "upstream_unavailable"


@dataclass(slots=True)
class Cooldown:
    """One shareable block: `model` "" means every model. `until` is in the caller's clock."""

    account: str
    model: str
    until: float
    reason: str


@dataclass(slots=True)
class _ModelCooldown:
    until: float
    reason: str
    streak: int = 0  # consecutive hint-less 429s (exponential backoff)
    local: bool = True  # learned here (exported) or imported from another worker


@dataclass(slots=True)
class _State:
    acc: Account
    id_bytes: bytes
    in_flight: int = 0
    cooldowns: dict[str, _ModelCooldown] = field(default_factory=dict)
    rest_until: float = 0.0  # connect failure (local, short)
    auth_until: float = 0.0
    auth_streak: int = 0
    remote_until: float = 0.0  # account-wide block learned from another worker
    remote_reason: str = ""
    failures: int = 0  # consecutive server/connect failures
    open_until: float = 0.0
    probing: bool = False
    # live counters since start (the store keeps the persistent ones)
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    errors: int = 0


def _rendezvous(key: bytes, st: _State) -> bytes:
    # Highest-random-weight hashing: every worker maps a key to the same account without
    # sharing state, and removing an account moves only the keys that lived on it.
    return hashlib.blake2b(key + b"\0" + st.id_bytes, digest_size=8).digest()


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


class Scheduler:
    def __init__(
        self,
        mode: Mode = "round_robin",
        *,
        max_attempts: int = 3,
        retry_budget_ratio: float = 0.2,
    ) -> None:
        if mode not in ("round_robin", "least_loaded", "sticky"):
            raise ValueError(f"unknown scheduling mode {mode!r}")
        self.mode: Mode = mode
        self.max_attempts = max(1, max_attempts)
        self.retry_budget_ratio = retry_budget_ratio
        self._states: list[_State] = []
        self._by_id: dict[str, _State] = {}
        self._cursor = 0
        self._sticky: dict[bytes, str] = {}
        self._retries: deque[float] = deque()
        self.retries_allowed = 0
        self.retries_denied = 0
        self.cooldowns_dirty = False  # a local cooldown was learned since the last export

    # ---- the pool ----------------------------------------------------------------------------

    def set_accounts(self, accounts: list[Account]) -> None:
        """Install the pool (on start and on every hot reload); state survives by account id."""
        old = self._by_id
        states: list[_State] = []
        for acc in accounts:
            st = old.get(acc.id)
            if st is None:
                st = _State(acc, acc.id.encode())
            else:
                if acc.enabled and not st.acc.enabled:
                    self._reset_health(st)
                st.acc = acc
            states.append(st)
        self._states = states
        self._by_id = {st.acc.id: st for st in states}
        self._cursor = self._cursor % len(states) if states else 0
        self._sticky.clear()

    @staticmethod
    def _reset_health(st: _State) -> None:
        st.cooldowns.clear()
        st.rest_until = st.auth_until = st.remote_until = st.open_until = 0.0
        st.auth_streak = st.failures = 0
        st.probing = False

    def attempts_allowed(self) -> int:
        """Attempts per request: max_attempts bounded by the enabled accounts (at least 1)."""
        enabled = sum(1 for st in self._states if st.acc.enabled)
        return max(1, min(self.max_attempts, enabled))

    # ---- picking -----------------------------------------------------------------------------

    def _blocked_until(self, st: _State, model: str, now: float) -> float:
        """When `st` becomes usable for `model`; 0.0 if it is usable now."""
        until = st.rest_until
        if st.auth_until > until:
            until = st.auth_until
        if st.remote_until > until:
            until = st.remote_until
        cd = st.cooldowns.get(model)
        if cd is not None and cd.until > until:
            until = cd.until
        if st.failures >= BREAKER_THRESHOLD:
            if st.open_until > now:
                until = max(until, st.open_until)
            elif st.probing:
                until = max(until, now + HALF_OPEN_WAIT_S)
        return until if until > now else 0.0

    def _usable(self, st: _State, model: str, now: float, exclude: Exclude) -> bool:
        return (
            st.acc.enabled and st.acc.id not in exclude and not self._blocked_until(st, model, now)
        )

    def pick(
        self,
        model: str,
        now: float,
        *,
        exclude: Exclude = frozenset(),
        key: str | None = None,
    ) -> Account:
        """The account for the next attempt, or raise (see the module docstring)."""
        states = self._states
        n = len(states)
        chosen: _State | None = None
        if n:
            if self.mode == "sticky" and key:
                chosen = self._pick_sticky(key.encode(), model, now, exclude)
            elif self.mode == "least_loaded":
                chosen = self._pick_least_loaded(model, now, exclude)
            else:
                chosen = self._pick_round_robin(model, now, exclude)
        if chosen is None:
            raise self._exhausted(model, now, exclude)
        if chosen.failures >= BREAKER_THRESHOLD:
            chosen.probing = True  # half-open: this request is the single probe
        return chosen.acc

    def _pick_round_robin(
        self, model: str, now: float, exclude: Exclude
    ) -> _State | None:
        states = self._states
        n = len(states)
        start = self._cursor
        for i in range(n):
            idx = start + i
            if idx >= n:
                idx -= n
            st = states[idx]
            if self._usable(st, model, now, exclude):
                self._cursor = idx + 1 if idx + 1 < n else 0
                return st
        return None

    def _pick_least_loaded(
        self, model: str, now: float, exclude: Exclude
    ) -> _State | None:
        # Fewest in-flight; ties go to the first from a rotating start, so equal load spreads.
        states = self._states
        n = len(states)
        start = self._cursor
        best: _State | None = None
        best_idx = 0
        for i in range(n):
            idx = (start + i) % n
            st = states[idx]
            if (best is None or st.in_flight < best.in_flight) and self._usable(
                st, model, now, exclude
            ):
                best, best_idx = st, idx
                if st.in_flight == 0:
                    break
        if best is not None:
            self._cursor = (best_idx + 1) % n
        return best

    def _pick_sticky(
        self, key: bytes, model: str, now: float, exclude: Exclude
    ) -> _State | None:
        home_id = self._sticky.get(key)
        if home_id is None:
            enabled = [st for st in self._states if st.acc.enabled]
            if enabled:
                home_id = max(enabled, key=lambda st: _rendezvous(key, st)).acc.id
                if len(self._sticky) >= STICKY_CACHE_MAX:
                    del self._sticky[next(iter(self._sticky))]
                self._sticky[key] = home_id
        home = self._by_id.get(home_id) if home_id is not None else None
        if home is not None and self._usable(home, model, now, exclude):
            return home
        # The home account is resting: the next-highest weight among the usable ones, so every
        # worker fails over to the same account, and the key goes home when it recovers.
        usable = [st for st in self._states if self._usable(st, model, now, exclude)]
        if not usable:
            return None
        return max(usable, key=lambda st: _rendezvous(key, st))

    def _exhausted(
        self, model: str, now: float, exclude: Exclude
    ) -> RawgateError:
        add = "`rawgate accounts add --api-key KEY` (or `rawgate accounts add-oauth ...`)"
        if not self._states:
            return NoAccountAvailable(
                f"No upstream account is configured. Add one with {add}, "
                "or try rawgate with `rawgate serve --emulate`."
            )
        enabled = [st for st in self._states if st.acc.enabled]
        if not enabled:
            reasons = sorted({st.acc.disabled_reason or "disabled by hand" for st in self._states})
            shown = "; ".join(r[:120] for r in reasons[:3])
            return NoAccountAvailable(
                f"All {len(self._states)} upstream account(s) are disabled ({shown}). "
                f"Re-enable one with `rawgate accounts enable ID` or add one with {add}."
            )
        candidates = [st for st in enabled if st.acc.id not in exclude]
        if not candidates:
            return NoAccountAvailable(
                f"Every usable upstream account ({len(enabled)}) was already tried for this "
                "request."
            )
        ends = [(self._blocked_until(st, model, now), self._block_reason(st, model, now))
                for st in candidates]  # fmt: skip
        wait = max(0.0, min(e for e, _ in ends) - now)
        secs = max(1, math.ceil(wait))
        headers = [
            (b"retry-after", str(secs).encode()),
            (b"retry-after-ms", str(max(1, math.ceil(wait * 1000))).encode()),
        ]
        limited = sum(1 for _, r in ends if r == "rate_limited")
        failing = len(ends) - limited
        parts = []
        if limited:
            parts.append(f"{limited} rate limited by the upstream")
        if failing:
            parts.append(f"{failing} resting after upstream failures")
        msg = (
            f"All {len(candidates)} upstream account(s) are cooling down for model "
            f"'{model}' ({', '.join(parts)}); the first is available again in {secs} s. "
            f"Retry after {secs} s."
        )
        if limited:
            return AccountsCooling(msg, retry_after_s=wait, headers=headers)
        return AccountsFailing(msg, retry_after_s=wait, headers=headers)

    def _block_reason(self, st: _State, model: str, now: float) -> str:
        """The reason of the block that ends last (the one that decides availability)."""
        cands: list[tuple[float, str]] = [
            (st.rest_until, "connect"),
            (st.auth_until, "auth"),
            (st.remote_until, st.remote_reason or "rate_limited"),
        ]
        cd = st.cooldowns.get(model)
        if cd is not None:
            cands.append((cd.until, cd.reason))
        if st.failures >= BREAKER_THRESHOLD and (st.open_until > now or st.probing):
            cands.append((max(st.open_until, now + HALF_OPEN_WAIT_S), "breaker"))
        return max(cands)[1]

    # ---- in-flight accounting ----------------------------------------------------------------

    def acquire(self, acc: Account) -> None:
        st = self._by_id.get(acc.id)
        if st is not None:
            st.in_flight += 1

    def release(self, acc: Account) -> None:
        """Always called (finally) after acquire; frees a half-open probe slot left unreported."""
        st = self._by_id.get(acc.id)
        if st is not None:
            st.in_flight = max(0, st.in_flight - 1)
            st.probing = False

    # ---- outcomes ----------------------------------------------------------------------------

    def report_success(
        self, acc: Account, model: str, now: float, tokens_in: int = 0, tokens_out: int = 0
    ) -> None:
        st = self._by_id.get(acc.id)
        if st is None:
            return
        st.requests += 1
        st.tokens_in += tokens_in
        st.tokens_out += tokens_out
        st.failures = 0
        st.open_until = 0.0
        st.probing = False
        st.auth_streak = 0
        cd = st.cooldowns.get(model)
        if cd is not None and cd.until <= now:
            del st.cooldowns[model]

    def report_failure(
        self,
        acc: Account,
        model: str,
        now: float,
        kind: FailureKind,
        retry_after_s: float | None = None,
    ) -> None:
        """Learn from a failed attempt. `retry_after_s` is the upstream's own hint, if any."""
        st = self._by_id.get(acc.id)
        if st is None:
            return
        st.requests += 1
        st.errors += 1
        hint = retry_after_s if retry_after_s is not None and retry_after_s >= 0 else None
        if kind == "rate_limited":
            cd = st.cooldowns.get(model)
            streak = cd.streak + 1 if cd is not None and cd.local else 1
            if hint is not None:
                length = _clamp(hint, COOLDOWN_MIN_S, COOLDOWN_MAX_S)
            else:
                length = min(RATE_LIMIT_DEFAULT_S * 2 ** (streak - 1), RATE_LIMIT_BACKOFF_MAX_S)
            self._cool(st, model, now + length, "rate_limited", streak)
        elif kind == "auth":
            length = min(AUTH_COOLDOWN_S * 2**st.auth_streak, AUTH_COOLDOWN_MAX_S)
            st.auth_streak += 1
            st.auth_until = max(st.auth_until, now + length)
            self.cooldowns_dirty = True
        elif kind in ("server", "connect"):
            if kind == "server":
                length = _clamp(hint, COOLDOWN_MIN_S, COOLDOWN_MAX_S) if hint else SERVER_COOLDOWN_S
                self._cool(st, model, now + length, "server", 0)
            else:
                st.rest_until = max(st.rest_until, now + CONNECT_COOLDOWN_S)
            st.failures += 1
            st.probing = False
            if st.failures >= BREAKER_THRESHOLD:
                extra = st.failures - BREAKER_THRESHOLD
                st.open_until = now + min(BREAKER_OPEN_S * 2 ** min(extra, 16), BREAKER_OPEN_MAX_S)
        else:
            raise ValueError(f"unknown failure kind {kind!r}")

    def _cool(self, st: _State, model: str, until: float, reason: str, streak: int) -> None:
        cds = st.cooldowns
        cd = cds.get(model)
        if cd is None:
            if len(cds) >= MODEL_COOLDOWNS_MAX:
                # Drop the entry that ends first (expired ones first of all).
                del cds[min(cds, key=lambda m: cds[m].until)]
            cds[model] = _ModelCooldown(until, reason, streak)
        else:
            # Latest end wins: a short hint never shortens a longer cooldown already learned.
            if until >= cd.until:
                cd.until, cd.reason = until, reason
            cd.streak, cd.local = streak, True
        if reason == "rate_limited":
            self.cooldowns_dirty = True

    # ---- the retry budget --------------------------------------------------------------------

    def may_retry(self, in_flight: int, now: float) -> bool:
        """True (and one retry spent) when the budget allows another attempt right now."""
        window = self._retries
        cutoff = now - RETRY_BUDGET_WINDOW_S
        while window and window[0] <= cutoff:
            window.popleft()
        allowed = max(RETRY_BUDGET_MIN, int(self.retry_budget_ratio * in_flight))
        if len(window) >= allowed:
            self.retries_denied += 1
            return False
        window.append(now)
        self.retries_allowed += 1
        return True

    # ---- sharing with other workers (see cooldowns.py) ---------------------------------------

    def export_cooldowns(self, now: float) -> list[Cooldown]:
        """Active blocks worth sharing: upstream rate limits and auth failures learned here.

        Breaker state is NOT shared: it is this worker's own health estimate and closes on a
        successful probe, which "latest end wins" merging could not propagate.
        """
        out: list[Cooldown] = []
        for st in self._states:
            aid = st.acc.id
            for model, cd in st.cooldowns.items():
                if cd.local and cd.reason == "rate_limited" and cd.until > now:
                    out.append(Cooldown(aid, model, cd.until, cd.reason))
            if st.auth_until > now:
                out.append(Cooldown(aid, "", st.auth_until, "auth"))
        self.cooldowns_dirty = False
        return out

    def import_cooldowns(self, entries: list[Cooldown], now: float) -> int:
        """Merge blocks from other workers (same clock as `now`); latest end wins. Returns how
        many changed anything here. Imported entries are not exported again."""
        changed = 0
        for e in entries:
            st = self._by_id.get(e.account)
            if st is None or e.until <= now:
                continue
            until = min(e.until, now + COOLDOWN_MAX_S)
            if not e.model:
                if until > st.remote_until + 1e-3:
                    st.remote_until, st.remote_reason = until, e.reason
                    changed += 1
                continue
            cd = st.cooldowns.get(e.model)
            if cd is not None and cd.until >= until - 1e-3:
                continue  # ours ends as late (1 ms slack absorbs clock-offset jitter)
            if cd is None:
                if len(st.cooldowns) >= MODEL_COOLDOWNS_MAX:
                    continue
                st.cooldowns[e.model] = _ModelCooldown(until, e.reason, 0, local=False)
            else:
                cd.until, cd.reason, cd.local = until, e.reason, False
            changed += 1
        return changed

    # ---- views -------------------------------------------------------------------------------

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Per-account live state for `accounts list`, /metrics and logs (no secrets)."""
        out: list[dict[str, Any]] = []
        for st in self._states:
            if st.failures < BREAKER_THRESHOLD:
                breaker = "closed"
            elif st.open_until > now:
                breaker = "open"
            else:
                breaker = "half_open"
            blocks = {
                "connect": st.rest_until,
                "auth": st.auth_until,
                st.remote_reason or "remote": st.remote_until,
                "breaker": st.open_until if breaker == "open" else 0.0,
            }
            account_block = {r: round(u - now, 3) for r, u in blocks.items() if u > now}
            out.append(
                {
                    "id": st.acc.id,
                    "name": st.acc.display_name(),
                    "kind": st.acc.kind,
                    "enabled": st.acc.enabled,
                    "disabled_reason": st.acc.disabled_reason,
                    "in_flight": st.in_flight,
                    "requests": st.requests,
                    "tokens_in": st.tokens_in,
                    "tokens_out": st.tokens_out,
                    "errors": st.errors,
                    "consecutive_failures": st.failures,
                    "breaker": breaker,
                    "blocked": account_block,
                    "cooldowns": {
                        m: {"remaining_s": round(cd.until - now, 3), "reason": cd.reason}
                        for m, cd in st.cooldowns.items()
                        if cd.until > now
                    },
                }
            )
        return out

    def metrics_collectors(
        self, clock: Callable[[], float]
    ) -> list[tuple[str, Literal["gauge", "counter"], str, Collector]]:
        """Series for `Metrics.add_collector(*entry)`, labelled by account id (bounded by the
        pool; ids are not secret, emails are kept out of metrics). `clock` is time.monotonic."""

        def per_account(fn: Callable[[_State, float], float]) -> Collector:
            def collect() -> list[Sample]:
                now = clock()
                return [({"account": st.acc.id}, fn(st, now)) for st in self._states]

            return collect

        def up(st: _State, now: float) -> float:
            blocked = max(st.rest_until, st.auth_until, st.remote_until)
            broken = st.failures >= BREAKER_THRESHOLD and st.open_until > now
            return 1.0 if st.acc.enabled and blocked <= now and not broken else 0.0

        def tokens() -> list[Sample]:
            out: list[Sample] = []
            for st in self._states:
                out.append(({"account": st.acc.id, "direction": "in"}, st.tokens_in))
                out.append(({"account": st.acc.id, "direction": "out"}, st.tokens_out))
            return out

        def retries() -> list[Sample]:
            return [
                ({"outcome": "allowed"}, self.retries_allowed),
                ({"outcome": "denied"}, self.retries_denied),
            ]

        return [
            ("rawgate_account_up", "gauge",
             "1 when the account is enabled and not resting account-wide.", per_account(up)),
            ("rawgate_account_in_flight", "gauge", "Upstream attempts in flight per account.",
             per_account(lambda st, now: st.in_flight)),
            ("rawgate_account_cooling_models", "gauge",
             "Models this account is cooling down for.",
             per_account(lambda st, now: sum(1 for c in st.cooldowns.values() if c.until > now))),
            ("rawgate_account_requests_total", "counter", "Upstream attempts per account.",
             per_account(lambda st, now: st.requests)),
            ("rawgate_account_errors_total", "counter", "Failed upstream attempts per account.",
             per_account(lambda st, now: st.errors)),
            ("rawgate_account_tokens_total", "counter", "Tokens per account and direction.",
             tokens),
            ("rawgate_retries_total", "counter", "Retries the retry budget allowed or denied.",
             retries),
        ]  # fmt: skip
