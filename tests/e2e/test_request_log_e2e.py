"""The request log on the running server: one row per proxied request in requests.db, built
from the request's access record (monitor/request_log.py, cli/stack.py), read back with SQL and
with `rawgate logs`. Real sockets, the emulator upstream.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import orjson
import pytest

from rawgate.__main__ import main
from rawgate.config import build_config
from rawgate.monitor.request_log import RequestLog, Row, query_rows
from rawgate.state.store import open_state
from tests.helpers_gateway import gateway_stack

pytestmark = pytest.mark.anyio

TWO_KEYS = [("key-aaaaaaaaaaaaaaaaaaaaaaaa", "A"), ("key-bbbbbbbbbbbbbbbbbbbbbbbb", "B")]
KEY_A = TWO_KEYS[0][0]
CHAT = "/v1/chat/completions"
WAIT_S = 10.0


def _body(text: str, *, stream: bool = False, model: str = "gemini-2.5-flash") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}


def _db_bytes(home: Path) -> bytes:
    """Every byte of the database and its WAL."""
    return b"".join(f.read_bytes() for f in sorted(home.glob("requests.db*")))


async def _rows(home: Path, n: int) -> list[dict[str, Any]]:
    """The log's rows once there are at least `n` (the writer flushes every 0.2 s)."""
    deadline = time.monotonic() + WAIT_S
    path = home / "requests.db"
    while True:
        if path.exists():
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                rows = list(query_rows(conn))
            finally:
                conn.close()
            if len(rows) >= n:
                return rows
        assert time.monotonic() < deadline, f"fewer than {n} rows in {WAIT_S} s"
        await anyio.sleep(0.05)


async def test_rows_for_a_non_stream_and_a_stream_request(tmp_path: Path) -> None:
    async with open_state(build_config({}, {}, {}), tmp_path, background=False) as st:
        _, key = await st.add_key("team-a")
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.origin) as c:
        auth = {"authorization": f"Bearer {key}", "x-request-id": "req-one"}
        r = await c.post(CHAT, json=_body("hello there", model="gpt-4o"), headers=auth)
        assert r.status_code == 200
        auth["x-request-id"] = "req-two"
        r = await c.post(CHAT, json=_body("[[emu:chunks n=4]] a b c d", stream=True),
                         headers=auth)  # fmt: skip
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        stream_bytes = len(r.content)
        await c.get("/healthz")  # not proxied: no row
        await c.get("/v1/models", headers=auth)  # not a front: no row
        rows = await _rows(tmp_path, 2)
    assert len(rows) == 2
    one, two = rows
    assert one["request_id"] == "req-one" and one["key_name"] == "team-a"
    assert one["protocol"] == "openai" and one["route"] == CHAT
    assert one["client_model"] == "gpt-4o" and one["mapped_model"] == "gemini-2.5-flash"
    assert one["account"] == "emulator-demo" and one["attempts"] == [["emulator-demo", 200]]
    assert one["status"] == 200 and one["error_code"] is None and one["stream"] is False
    assert one["tokens_in"] > 0 and one["tokens_out"] > 0
    assert one["bytes_in"] > 0 and one["bytes_out"] > 0
    assert 0 < one["ttfb_ms"] <= one["latency_ms"]
    assert two["request_id"] == "req-two" and two["stream"] is True
    assert two["status"] == 200 and two["tokens_out"] > 0
    assert two["bytes_out"] == stream_bytes
    assert two["ttfb_ms"] <= two["latency_ms"]
    # Never a body or a secret in the file.
    data = _db_bytes(tmp_path)
    assert data and key.encode() not in data and b"hello there" not in data


async def test_a_retried_request_logs_both_attempts(tmp_path: Path) -> None:
    async with (
        gateway_stack(tmp_path, api_keys=TWO_KEYS) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        # A 429 for account A: rotation to B (whichever account round robin starts with,
        # one of two such requests meets A first).
        cool_a = f"[[emu:error status=429 retry_delay=30s limit=10 for={KEY_A}]] hi"
        for _ in range(2):
            assert (await c.post(CHAT, json=_body(cool_a))).status_code == 200
        # A 500 once, on another model: retried on the other account.
        once = _body("[[emu:error status=500 times=1]] once", model="gemini-2.5-pro")
        assert (await c.post(CHAT, json=once)).status_code == 200
        # Every account answers 429: the error is logged with its code and both attempts.
        r = await c.post(CHAT, json=_body("[[emu:error status=429 retry_delay=20s limit=10]] x",
                                          model="gemini-2.5-flash-lite"))  # fmt: skip
        assert r.status_code == 429
        rows = await _rows(tmp_path, 4)
    rotated = [r["attempts"] for r in rows[:2] if len(r["attempts"]) == 2]
    assert rotated == [[["A", 429], ["B", 200]]]
    retried = rows[2]["attempts"]
    assert len(retried) == 2 and retried[0][1] == 500 and retried[1][1] == 200
    assert {retried[0][0], retried[1][0]} == {"A", "B"}
    assert rows[2]["status"] == 200 and rows[2]["account"] == retried[1][0]
    last = rows[3]
    assert last["status"] == 429 and last["error_code"] == "rate_limit_exceeded"
    assert sorted(a for a, _ in last["attempts"]) == ["A", "B"]
    assert all(s == 429 for _, s in last["attempts"])


async def test_a_client_disconnect_mid_stream_is_a_499_row(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.origin) as c:
        body = _body("[[emu:chunks n=50]] [[emu:delay ms=100]] " + "word " * 50, stream=True)
        async with c.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            async for _ in r.aiter_raw():
                break  # the first bytes arrived: go away
        rows = await _rows(tmp_path, 1)
    row = rows[0]
    assert row["status"] == 499 and row["stream"] is True
    assert row["attempts"] == [["emulator-demo", 200]]
    assert row["ttfb_ms"] is not None and row["ttfb_ms"] <= row["latency_ms"]


async def test_rawgate_logs_reads_the_servers_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RAWGATE_HOME", str(tmp_path))
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.origin) as c:
        assert (await c.post(CHAT, json=_body("fine"))).status_code == 200
        assert (await c.post(CHAT, json={"model": 3})).status_code == 400
        metrics = (await c.get("/metrics")).text
        assert "rawgate_request_log_dropped_total 0" in metrics
        await _rows(tmp_path, 2)
    assert main(["logs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and " 200 " in out[0] and "400" in out[1]
    assert main(["logs", "--status", "4xx", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    row = orjson.loads(line)
    assert row["status"] == 400 and row["error_code"] and row["attempts"] == []


async def test_request_log_off_writes_nothing(tmp_path: Path) -> None:
    cfg = {"log": {"request_log": False}}
    async with (
        gateway_stack(tmp_path, config=cfg) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        assert (await c.post(CHAT, json=_body("x"))).status_code == 200
        assert "rawgate_request_log_dropped_total" not in (await c.get("/metrics")).text
    assert not (tmp_path / "requests.db").exists()


async def test_the_server_drops_rows_older_than_request_log_days(tmp_path: Path) -> None:
    old = time.time() - 3 * 86400.0
    with RequestLog(tmp_path / "requests.db") as log:
        log.record(Row("old-1", "openai", CHAT, 200, 5.0, ts=old))
        log.record(Row("recent", "openai", CHAT, 200, 5.0, ts=time.time() - 3600.0))
    cfg = {"log": {"request_log_days": 1.0}}
    async with (
        gateway_stack(tmp_path, config=cfg) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        r = await c.post(CHAT, json=_body("new"), headers={"x-request-id": "new-1"})
        assert r.status_code == 200
        await _rows(tmp_path, 2)
        deadline = time.monotonic() + WAIT_S
        while {r["request_id"] for r in await _rows(tmp_path, 1)} != {"recent", "new-1"}:
            assert time.monotonic() < deadline, "the old row was not pruned"
            await anyio.sleep(0.05)
