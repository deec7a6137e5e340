"""Stored Responses for `previous_response_id`: a bounded, in-memory, insertion-ordered map.

Invariants:
- Bounded by count (`max_count`, the oldest entry is evicted first) and by age (`max_age_s`
  since `put`; an expired entry is never returned and is dropped when seen or when it reaches
  the front). `put` is O(1) amortised, `get` O(1); nothing runs in the background.
- `get(id)` returns the whole conversation up to and including that response — its input items
  (which already hold the earlier history) followed by its output items — as a new list, which is
  exactly `mapping.responses_to_gemini`'s `history` argument; None when unknown or expired (the
  gateway answers 400 previous_response_not_found).
- Items are shared, not copied: a chained conversation stores references to the same dicts, so
  memory grows with the new items only. Nobody may mutate an item after `put`.
- `clock` is injectable (monotonic seconds) so that tests never sleep.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["DEFAULT_MAX_AGE_S", "DEFAULT_MAX_COUNT", "ResponseStore"]

# Same defaults as config.LimitsConfig.response_store_max_count / _max_age_s.
DEFAULT_MAX_COUNT = 1024
DEFAULT_MAX_AGE_S = 3600.0

_Entry = tuple[float, list[dict[str, Any]], list[dict[str, Any]]]


class ResponseStore:
    __slots__ = ("_clock", "_entries", "max_age_s", "max_count")

    def __init__(
        self,
        max_count: int = DEFAULT_MAX_COUNT,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_count < 0 or max_age_s < 0:
            raise ValueError("ResponseStore limits must be >= 0")
        self.max_count = max_count
        self.max_age_s = max_age_s
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(
        self,
        response_id: str,
        input_items: list[dict[str, Any]],
        output_items: list[dict[str, Any]],
    ) -> None:
        if self.max_count == 0:
            return
        now = self._clock()
        entries = self._entries
        entries[response_id] = (now, input_items, output_items)
        entries.move_to_end(response_id)
        self._expire(now)
        while len(entries) > self.max_count:
            entries.popitem(last=False)

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        stamp, inputs, outputs = entry
        if self._clock() - stamp > self.max_age_s:
            del self._entries[response_id]
            return None
        return [*inputs, *outputs]

    def _expire(self, now: float) -> None:
        entries = self._entries
        limit = now - self.max_age_s
        while entries:
            first = next(iter(entries.values()))
            if first[0] >= limit:
                break
            entries.popitem(last=False)
