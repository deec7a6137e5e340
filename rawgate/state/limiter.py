"""Per-client-key limits, sans-IO: the decision both state backends make, on plain numbers.

Invariants:
- Algorithm: fixed windows, counted in integer milliseconds of one clock (the Redis server's
  TIME for the redis backend, so instances with skewed clocks agree; the host's wall clock for
  the local one). `rpm` counts requests in the current UTC minute, `tpm` the tokens the upstream
  reported in it, `daily_tokens` those of the current UTC day. A fixed window admits up to 2N
  across a minute boundary; that is the price of one counter per window (GCRA would need a
  token estimate before the answer, and token limits only know tokens after it).
- `decide` is check-and-record in one step: an admitted request is counted in the same call
  (one Lua script in Redis, one locked update locally), so two callers can never both see
  "N-1 used" and both pass: exactly `rpm` requests pass per window.
- Token limits are checked before the request against tokens already recorded; the request's
  own tokens are recorded after the answer (`record_tokens`), so a key can exceed `tpm` by the
  tokens of the requests it had in flight when it crossed the line; the next ones wait.
- A refusal carries `retry_after_s`: whole seconds (>= 1) until the window that blocks ends.
- 0 means "no limit" for every field. `models` are fnmatch patterns (`*`, `?`, `[...]`) matched
  case-sensitively against the model the caller passes (the gateway passes the Gemini model the
  request maps to, after aliases and custom_mapping); empty = every model.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "DAY_MS",
    "HOUR_MS",
    "MINUTE_MS",
    "Decision",
    "Limits",
    "Usage",
    "WindowCounts",
    "decide",
    "model_allowed",
    "windows",
]

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int = 0
    tpm: int = 0
    daily_tokens: int = 0
    models: tuple[str, ...] = ()

    @property
    def unlimited(self) -> bool:
        return not (self.rpm or self.tpm or self.daily_tokens)


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """What a key used in the windows that contain `now`."""

    requests_minute: int = 0
    tokens_minute: int = 0
    tokens_day: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_s: int = 0  # > 0 only when refused
    reason: str = ""  # "rpm" | "tpm" | "daily_tokens" | "model" | "disabled" | "unknown_key"
    # | "state_unavailable" (limits_fail = closed while degraded)
    degraded: bool = False  # decided without the shared store (limits_fail applied)


@dataclass(frozen=True, slots=True)
class Usage:
    """Hourly usage of one name (a key, an account or a model)."""

    hour_ms: int  # start of the UTC hour
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


ALLOW = Decision(True)


def windows(now_ms: int) -> tuple[int, int, int]:
    """(minute start, hour start, day start) of `now_ms`, all UTC epoch milliseconds."""
    return now_ms - now_ms % MINUTE_MS, now_ms - now_ms % HOUR_MS, now_ms - now_ms % DAY_MS


def _retry_s(ms: int) -> int:
    return max(1, -(-ms // 1000))


def decide(limits: Limits, used: WindowCounts, now_ms: int) -> Decision:
    """Admit one more request (the caller then counts it) or say how long to wait."""
    minute, _, day = windows(now_ms)
    if limits.rpm and used.requests_minute >= limits.rpm:
        return Decision(False, _retry_s(minute + MINUTE_MS - now_ms), "rpm")
    if limits.tpm and used.tokens_minute >= limits.tpm:
        return Decision(False, _retry_s(minute + MINUTE_MS - now_ms), "tpm")
    if limits.daily_tokens and used.tokens_day >= limits.daily_tokens:
        return Decision(False, _retry_s(day + DAY_MS - now_ms), "daily_tokens")
    return ALLOW


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def model_allowed(patterns: tuple[str, ...], model: str) -> bool:
    """True when `model` matches one of `patterns` (none = every model)."""
    if not patterns:
        return True
    return any(p == model or _compile(p).match(model) is not None for p in patterns)
