"""Stored Responses for `previous_response_id`: a bounded, in-memory, insertion-ordered map.

Invariants:
- Bounded by count (`max_count`), by bytes (`max_bytes`) and by age (`max_age_s` since `put`).
  Over count or bytes the oldest entries are evicted first; an expired entry is never returned
  and is dropped when seen or when it reaches the front. Nothing runs in the background.
- Bytes are those of the distinct items held (`sizes.deep_size`, an upper estimate): a chained
  conversation's entries share their earlier items, and a shared item is counted once, when the
  first entry holding it arrives, and released when the last one goes. `put` costs O(new items
  + evicted entries) plus one dict lookup per item; `get` O(1).
- An entry whose own items exceed `max_bytes` is not stored (nothing is evicted for it): a later
  `previous_response_id` naming it gets the same 400 previous_response_not_found as any unknown
  id. So do ids whose entry was evicted.
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

from rawgate.sizes import deep_size

__all__ = ["DEFAULT_MAX_AGE_S", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_COUNT", "ResponseStore"]

# Same defaults as config.LimitsConfig.response_store_max_count / _max_bytes / _max_age_s.
DEFAULT_MAX_COUNT = 1024
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_AGE_S = 3600.0

_Entry = tuple[float, list[dict[str, Any]], list[dict[str, Any]]]


class ResponseStore:
    __slots__ = ("_clock", "_entries", "_held", "bytes", "max_age_s", "max_bytes", "max_count")

    def __init__(
        self,
        max_count: int = DEFAULT_MAX_COUNT,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_count < 0 or max_age_s < 0 or max_bytes < 0:
            raise ValueError("ResponseStore limits must be >= 0")
        self.max_count = max_count
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.bytes = 0  # of the distinct items held
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # id(item) -> [entries holding it, its bytes]; the entries keep the item alive, so its
        # id cannot be reused while it is here.
        self._held: dict[int, list[int]] = {}

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
        held = self._held
        new: dict[int, int] = {}
        size = 0
        for item in (*input_items, *output_items):
            key = id(item)
            if key in held or key in new:
                continue
            new[key] = deep_size(item)
            size += new[key]
        if size > self.max_bytes:
            return  # too large on its own: not stored, and nothing evicted for it
        now = self._clock()
        entries = self._entries
        old = entries.pop(response_id, None)
        if old is not None:
            self._release(old)
        entries[response_id] = (now, input_items, output_items)
        for item in (*input_items, *output_items):
            key = id(item)
            got = held.get(key)
            if got is None:
                held[key] = [1, new[key]]
                self.bytes += new[key]
            else:
                got[0] += 1
        self._expire(now)
        while len(entries) > self.max_count or self.bytes > self.max_bytes:
            self._release(entries.popitem(last=False)[1])

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        stamp, inputs, outputs = entry
        if self._clock() - stamp > self.max_age_s:
            del self._entries[response_id]
            self._release(entry)
            return None
        return [*inputs, *outputs]

    def live(self) -> list[tuple[str, float, list[dict[str, Any]], list[dict[str, Any]]]]:
        """(id, age in seconds, input items, output items) of every unexpired entry, oldest
        first (a copy: the store may change while the caller goes through them)."""
        now = self._clock()
        return [(rid, now - stamp, inputs, outputs)
                for rid, (stamp, inputs, outputs) in self._entries.items()
                if now - stamp <= self.max_age_s]  # fmt: skip

    def _release(self, entry: _Entry) -> None:
        held = self._held
        for item in (*entry[1], *entry[2]):
            key = id(item)
            got = held[key]
            got[0] -= 1
            if got[0] == 0:
                del held[key]
                self.bytes -= got[1]

    def _expire(self, now: float) -> None:
        entries = self._entries
        limit = now - self.max_age_s
        while entries:
            first = next(iter(entries.values()))
            if first[0] >= limit:
                break
            self._release(entries.popitem(last=False)[1])
