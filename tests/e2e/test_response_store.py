"""The Responses store is bounded by bytes as well as by count and age (issue 12, item 3):
20 large requests with `store` unset never make it hold more than `max_bytes` (asserted on its own
accounting and with tracemalloc), a chained conversation's shared history counts once, and a
response too large to keep gets the usual 400 previous_response_not_found later."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from rawgate.sizes import deep_size
from rawgate.state.response_store import ResponseStore

MiB = 1024 * 1024


def _item(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def test_twenty_large_requests_never_exceed_the_byte_budget() -> None:
    """The 20 x 30 MiB case (1.23 GB held) at 1/10 the size, through a 16 MiB budget."""
    budget = 16 * MiB
    store = ResponseStore(max_bytes=budget)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(20):
            store.put(f"resp_{i}", [_item(f"{i} ".ljust(3 * MiB, "a"))], [_item("ok")])
            assert store.bytes <= budget
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held <= budget
    assert len(store) == 5  # the oldest went first
    assert store.get("resp_14") is None and store.get("resp_15") is not None


def test_a_chained_conversation_counts_its_shared_history_once() -> None:
    store = ResponseStore(max_count=1)
    a, b, c, d = _item("a" * 1000), _item("b" * 1000), _item("c"), _item("d")
    store.put("r1", [a], [b])
    assert store.bytes == deep_size(a) + deep_size(b)
    history = store.get("r1")
    assert history is not None
    store.put("r2", [*history, c], [d])  # evicts r1 (max_count) but keeps a and b for r2
    assert len(store) == 1 and store.get("r1") is None
    assert store.bytes == sum(deep_size(x) for x in (a, b, c, d))
    store.put("r3", [_item("e")], [])
    assert store.bytes == deep_size(_item("e"))


def test_a_response_larger_than_the_budget_is_not_stored_and_evicts_nothing() -> None:
    store = ResponseStore(max_bytes=1 * MiB)
    store.put("small", [_item("x")], [_item("y")])
    before = store.bytes
    store.put("huge", [_item("z" * (2 * MiB))], [])
    assert store.get("huge") is None
    assert store.get("small") is not None and store.bytes == before


def test_expired_and_evicted_entries_give_their_bytes_back() -> None:
    now = [0.0]
    store = ResponseStore(max_age_s=10, clock=lambda: now[0])
    store.put("old", [_item("x" * 1000)], [])
    now[0] = 11
    assert store.get("old") is None and store.bytes == 0
    store.put("a", [_item("x" * 1000)], [])
    now[0] = 30
    store.put("b", [_item("y")], [])  # "a" expires on the way
    assert len(store) == 1 and store.bytes == deep_size(_item("y"))


def test_live_lists_unexpired_entries_oldest_first_with_their_age() -> None:
    """What the Redis backend pushes after an outage."""
    now = [0.0]
    store = ResponseStore(max_age_s=10, clock=lambda: now[0])
    shared = _item("s" * 500)
    store.put("old", [shared], [_item("o")])
    now[0] = 4
    store.put("new", [shared, _item("n")], [])
    store.put("newer", [_item("m")], [])
    assert [(rid, age) for rid, age, _, _ in store.live()] == [
        ("old", 4.0), ("new", 0.0), ("newer", 0.0)]
    now[0] = 12  # "old" (put at 0) is past max_age, the others (put at 4) are 8 s old
    live = store.live()
    assert [(rid, age) for rid, age, _, _ in live] == [("new", 8.0), ("newer", 8.0)]
    assert live[0][2] == [shared, _item("n")] and live[0][3] == []


pytestmark = pytest.mark.anyio


async def test_the_gateway_store_stays_within_its_bytes_and_answers_400_for_dropped_ids(
    tmp_path: Path,
) -> None:
    from tests.helpers_gateway import gateway_stack

    config = {"limits": {"response_store_max_bytes": 4 * MiB}}
    async with (
        gateway_stack(tmp_path, config=config) as run,
        httpx.AsyncClient(base_url=run.base_url, timeout=30) as c,
    ):
        big = await c.post("/responses", json={"model": "gpt-5", "input": "q".ljust(5 * MiB, "x")})
        assert big.status_code == 200  # answered, just not kept
        assert run.gateway.responses.bytes == 0
        ids = []
        for i in range(20):
            r = await c.post("/responses", json={"model": "gpt-5", "input": f"{i} " * 100_000})
            assert r.status_code == 200
            ids.append(r.json()["id"])
            assert run.gateway.responses.bytes <= 4 * MiB
        for rid in (big.json()["id"], ids[0]):
            r = await c.post(
                "/responses", json={"model": "gpt-5", "input": "more", "previous_response_id": rid}
            )
            assert r.status_code == 400
            err = r.json()["error"]
            assert err["code"] == "previous_response_not_found"
            assert err["param"] == "previous_response_id"
        r = await c.post(
            "/responses", json={"model": "gpt-5", "input": "more", "previous_response_id": ids[-1]}
        )
        assert r.status_code == 200
