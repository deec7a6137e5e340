"""Tool schemas cost bounded work per request and bounded memory across requests (issue 12,
items 3 and 4): the request budget refuses the 500-distinct-fan-out-tools shape with a 400 naming
a tool after at most `max_work` units, whatever the memo holds, and the memo of cleaned schemas
never holds more than its byte budget. Work and memory are asserted as counts and bytes."""

from __future__ import annotations

import gc
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import httpx2 as httpx
import orjson
import pytest

from rawgate.errors import BadRequest
from rawgate.translate import jsonschema
from rawgate.translate.mapping import (
    SchemasOffLoop,
    ToolSchemas,
    chat_to_gemini,
    responses_to_gemini,
)
from rawgate.translate.schemas import decode_chat, decode_responses
from tests.helpers_gateway import gateway_stack

FLASH = "gemini-2.5-flash"


def fanout_params(i: int, depth: int = 11) -> dict[str, Any]:
    """2^12 - 1 nodes once inlined, under the per-tool cap; the description makes it distinct."""
    defs: dict[str, Any] = {"l0": {"type": "string"}}
    for k in range(1, depth + 1):
        prev = {"$ref": f"#/$defs/l{k - 1}"}
        defs[f"l{k}"] = {"type": "object", "properties": {"a": prev, "b": prev}}
    return {
        "type": "object",
        "description": f"tool {i}, unique so that no memo helps",
        "properties": {"r": {"$ref": f"#/$defs/l{depth}"}},
        "$defs": defs,
    }


def fanout_request(n: int) -> bytes:
    """The shape that burnt 11 s of CPU in one request (500 tools, ~0.6 MB)."""
    tools = [
        {"type": "function", "name": f"t{i}", "parameters": fanout_params(i)} for i in range(n)
    ]
    return orjson.dumps({"model": "gpt-5", "input": "hi", "tools": tools})


def _counting(monkeypatch: pytest.MonkeyPatch, thread: int | None = None) -> list[int]:
    """Sum of the work units every cleaner charges (the cleaner's own accounting); with
    `thread`, only those charged on that thread."""
    total = [0]
    real = jsonschema._Cleaner.charge

    def charge(self: Any, units: int) -> None:
        if thread is None or threading.get_ident() == thread:
            total[0] += units
        real(self, units)

    monkeypatch.setattr(jsonschema._Cleaner, "charge", charge)
    return total


def test_500_distinct_fanout_tools_are_refused_within_the_request_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = _counting(monkeypatch)
    schemas = ToolSchemas(max_work=100_000)
    body = fanout_request(500)
    with pytest.raises(BadRequest) as ei:
        responses_to_gemini(decode_responses(body), FLASH, schemas=schemas)
    err = ei.value
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.param is not None
    k = int(err.param.removeprefix("tools[").removesuffix("].parameters"))
    assert f"Tool 't{k}'" in str(err) and "tool_schema_max_work" in str(err)
    # the work before the refusal is within the budget (+ the one step that crossed it), and
    # only the tools before the one named were cleaned (and memoised)
    assert work[0] <= 100_000 + 1
    assert len(schemas) == k and 5 <= k <= 20
    # once memoised, the same request is refused at the same tool: hits charge their work too
    work[0] = 0
    with pytest.raises(BadRequest) as again:
        responses_to_gemini(decode_responses(body), FLASH, schemas=schemas)
    assert again.value.param == err.param
    assert work[0] <= 100_000 + 1
    # the chat route has the same budget, with the param in its own shape
    chat_body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [
            {"type": "function", "function": {"name": f"t{i}", "parameters": fanout_params(i)}}
            for i in range(500)
        ],
    }
    with pytest.raises(BadRequest) as chat_err:
        chat_to_gemini(decode_chat(orjson.dumps(chat_body)), FLASH, schemas=ToolSchemas())
    assert chat_err.value.param == f"tools[{k}].function.parameters"


def test_a_request_within_the_budget_maps_and_pays_only_once_per_tool() -> None:
    schemas = ToolSchemas(max_work=100_000)
    call = responses_to_gemini(decode_responses(fanout_request(8)), FLASH, schemas=schemas)
    decls = call.body["tools"][0]["functionDeclarations"]
    assert [d["name"] for d in decls] == [f"t{i}" for i in range(8)]
    assert decls[0]["parameters"]["properties"]["r"]["type"] == "object"
    assert len(schemas) == 8
    responses_to_gemini(decode_responses(fanout_request(8)), FLASH, schemas=schemas)
    assert len(schemas) == 8  # all hits


def test_past_inline_work_the_caller_is_told_to_map_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = _counting(monkeypatch)
    schemas = ToolSchemas()
    body = decode_responses(fanout_request(500))
    with pytest.raises(SchemasOffLoop):
        responses_to_gemini(body, FLASH, schemas=schemas, inline_work=5_000)
    assert work[0] <= 5_001  # the inline attempt stopped at its cap
    assert len(schemas) == 0  # one fan-out tool is ~8,200 units: none fitted
    # memo hits cost no cleaning, so a warm request within the budget stays inline
    warm = decode_responses(fanout_request(3))
    responses_to_gemini(warm, FLASH, schemas=schemas)
    work[0] = 0
    call = responses_to_gemini(warm, FLASH, schemas=schemas, inline_work=5_000)
    assert work[0] == 0 and len(call.body["tools"][0]["functionDeclarations"]) == 3


def _big_schema(i: int, chars: int) -> dict[str, Any]:
    desc = f"schema {i} ".ljust(chars, "x")
    return {"type": "object", "properties": {"q": {"type": "string", "description": desc}}}


def test_the_schema_memo_never_holds_more_than_its_byte_budget() -> None:
    """40 distinct large schemas (the 770 MB case, at 1/20 the size) through a 4 MiB memo."""
    budget = 4 * 1024 * 1024
    schemas = ToolSchemas(max_bytes=budget)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(40):
            out, *_ = schemas.clean(orjson.dumps(_big_schema(i, 512 * 1024)), 100_000)
            assert out is not None and len(out["properties"]["q"]["description"]) == 512 * 1024
            del out
            assert schemas.bytes <= budget
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert 4 <= len(schemas) <= 8
    assert held <= budget  # the estimate is an upper bound: what is really kept is less
    # a schema larger than the whole budget is cleaned but not kept, and evicts nothing
    before = (len(schemas), schemas.bytes)
    out, *_ = schemas.clean(orjson.dumps(_big_schema(99, 5 * 1024 * 1024)), 100_000)
    assert out is not None and (len(schemas), schemas.bytes) == before


def test_small_schemas_count_their_keys_too() -> None:
    """Schemas up to 1 KiB are their own memo key: 2,000 distinct ones through a 256 KiB memo
    stay within it as measured by tracemalloc (orjson's output, kept as is, would hold ~4 KiB
    of spare capacity per key)."""
    budget = 256 * 1024
    schemas = ToolSchemas(max_bytes=budget, max_entries=10_000)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            schemas.clean(orjson.dumps(_big_schema(i, 500)), 100_000)
            assert schemas.bytes <= budget
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert 50 <= len(schemas) < 2000
    assert held <= budget


def test_the_schema_memo_evicts_the_least_recently_used() -> None:
    raw = [orjson.dumps(_big_schema(i, 100_000)) for i in range(4)]
    one = ToolSchemas()
    one.clean(raw[0], 100_000)
    size = one.bytes
    schemas = ToolSchemas(max_bytes=3 * size + size // 2)
    for r in raw[:3]:
        schemas.clean(r, 100_000)
    schemas.clean(raw[0], 100_000)  # a hit: now the most recent
    schemas.clean(raw[3], 100_000)  # evicts raw[1], the least recently used
    assert len(schemas) == 3
    assert [schemas.holds(r) for r in raw] == [True, False, True, True]


pytestmark = pytest.mark.anyio


async def test_the_gateway_answers_the_500_tool_request_with_a_400_naming_a_tool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """...from a worker thread: the event loop's thread cleans at most tool_schema_inline_work."""
    on_loop = _counting(monkeypatch, threading.get_ident())
    everywhere = _counting(monkeypatch)
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.origin) as c:
        json_type = {"content-type": "application/json"}
        r = await c.post("/v1/responses", content=fanout_request(500), headers=json_type)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error"
        assert err["param"].startswith("tools[") and err["param"].endswith("].parameters")
        assert "Tool 't" in err["message"]
        assert on_loop[0] <= run.cfg.limits.tool_schema_inline_work + 1
        assert run.cfg.limits.tool_schema_max_work <= everywhere[0] - on_loop[0] <= 100_001
        assert (await c.get("/healthz")).status_code == 200
        ok = await c.post("/v1/responses", json={"model": "gpt-5", "input": "hi", "stream": False})
        assert ok.status_code == 200
