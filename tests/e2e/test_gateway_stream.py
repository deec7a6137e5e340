"""The gateway's stream pump end to end (raw bytes through the real listener and the emulator):
heartbeats while the upstream is silent, the idle limit across heartbeats, batched reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2 as httpx
import orjson
import pytest

from rawgate.emulator.server import Settings
from rawgate.translate.sse import DONE, HEARTBEAT
from tests.helpers_gateway import gateway_stack

pytestmark = pytest.mark.anyio


def _body(prompt: str) -> dict[str, Any]:
    return {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": prompt}]}


async def _raw_stream(base_url: str, prompt: str) -> bytes:
    async with httpx.AsyncClient(timeout=20) as h:
        async with h.stream("POST", base_url + "/chat/completions", json=_body(prompt)) as r:
            assert r.status_code == 200
            return b"".join([c async for c in r.aiter_bytes()])


def _events(raw: bytes) -> list[Any]:
    """The JSON data events of a chat stream (heartbeat comments and [DONE] left out)."""
    done = DONE.rstrip(b"\n")
    return [
        orjson.loads(b[6:]) for b in raw.split(b"\n\n") if b.startswith(b"data: ") and b != done
    ]


async def test_heartbeats_while_the_upstream_is_silent(tmp_path: Path) -> None:
    cfg = {"limits": {"sse_heartbeat_s": 0.05}}
    async with gateway_stack(tmp_path, config=cfg) as run:
        raw = await _raw_stream(run.base_url, "[[emu:chunks n=3]] [[emu:delay ms=300]] quiet one")
    assert HEARTBEAT in raw
    assert raw.endswith(DONE)
    # Heartbeats only ever sit between whole events.
    assert raw.replace(HEARTBEAT, b"").count(b"\n\n") == raw.count(b"\n\n") - raw.count(HEARTBEAT)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in _events(raw))
    assert "quiet one" in text


async def test_no_heartbeat_when_turned_off(tmp_path: Path) -> None:
    cfg = {"limits": {"sse_heartbeat_s": 0}}
    async with gateway_stack(tmp_path, config=cfg) as run:
        raw = await _raw_stream(run.base_url, "[[emu:chunks n=2]] [[emu:delay ms=150]] hi")
    assert HEARTBEAT not in raw
    assert raw.endswith(DONE)


async def test_idle_limit_counts_across_heartbeats(tmp_path: Path) -> None:
    # Heartbeats every 50 ms must not reset the upstream's 400 ms idle limit: the stalled
    # stream ends with the read-timeout error event, not after the emulator's 10 s stall.
    cfg = {"limits": {"sse_heartbeat_s": 0.05}, "timeouts": {"upstream_read_idle_s": 0.4}}
    settings = Settings(stall_max_s=10.0)
    async with gateway_stack(tmp_path, config=cfg, settings=settings) as run:
        raw = await _raw_stream(run.base_url, "[[emu:chunks n=3]] [[emu:stall after=1]] x")
    assert HEARTBEAT in raw
    assert not raw.endswith(DONE)
    *_, last = _events(raw)
    assert last["error"]["code"] == "upstream_read_timeout"


async def test_many_chunks_arrive_whole_and_in_order(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run:
        raw = await _raw_stream(run.base_url, "[[emu:chunks n=50]] many small pieces")
    events = _events(raw)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert "many small pieces" in text
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert raw.endswith(DONE)
