"""The request log (rawgate/monitor/request_log.py) and `rawgate logs`: rows written in batches
off the caller's thread, queue-full drops counted, retention, filters, --follow, never a body or
a secret (rows hold only what the caller put in the named fields)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from rawgate.__main__ import main
from rawgate.monitor import request_log as rl
from rawgate.monitor.request_log import RequestLog, Row, query_rows, status_filter


def _row(i: int, **kw: object) -> Row:
    base: dict[str, object] = {
        "request_id": f"req-{i}",
        "protocol": "openai",
        "route": "/v1/chat/completions",
        "status": 200,
        "latency_ms": 12.5,
        "client_model": "gpt-4o",
        "mapped_model": "gemini-2.5-flash",
        "account": "acct-a",
        "attempts": [("acct-a", 200)],
        "tokens_in": 7,
        "tokens_out": 3,
    }
    base.update(kw)
    return Row(**base)  # type: ignore[arg-type]


def _wait(cond: object, what: str) -> None:
    for _ in range(500):  # bounded: 10 s at most
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _rows(path: Path, **kw: object) -> list[dict[str, object]]:
    with sqlite3.connect(path) as conn:
        return list(query_rows(conn, **kw))  # type: ignore[arg-type]


def test_rows_are_written_in_batches_off_the_callers_thread(tmp_path: Path) -> None:
    db = tmp_path / "requests.db"
    writers: set[str] = set()
    real = rl.RequestLog._flush

    def spy(self: RequestLog, conn: sqlite3.Connection) -> None:
        writers.add(threading.current_thread().name)
        real(self, conn)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rl.RequestLog, "_flush", spy)
        with RequestLog(db) as log:
            for i in range(2500):
                log.record(_row(i, stream=i % 2 == 0))
            _wait(lambda: log.written == 2500, "2,500 rows written")
    assert writers == {"rawgate-request-log"}
    rows = _rows(db, limit=5000)
    assert [r["request_id"] for r in rows] == [f"req-{i}" for i in range(2500)]
    assert rows[0]["attempts"] == [["acct-a", 200]] and rows[0]["stream"] is True
    assert oct(db.stat().st_mode & 0o777) == "0o600"


def test_a_full_queue_drops_and_counts_and_never_blocks(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "requests.db", queue_max=100)  # writer not started: nothing drains
    for i in range(250):
        log.record(_row(i))
    assert (log.queued, log.dropped) == (100, 150)
    log.start()
    _wait(lambda: log.written == 100, "the queued rows")
    log.close()


def test_retention_deletes_only_old_rows(tmp_path: Path) -> None:
    db = tmp_path / "requests.db"
    now = time.time()
    with RequestLog(db, days=0) as log:  # 0: the writer never prunes; prune() is called below
        for i in range(10):
            log.record(_row(i, ts=now - 8 * 86400))  # too old
        for i in range(10, 13):
            log.record(_row(i, ts=now - 86400))
        _wait(lambda: log.written == 13, "13 rows")
    conn = rl.connect(db)
    assert RequestLog(db, days=7).prune(conn, now) == 10
    conn.close()
    assert [r["request_id"] for r in _rows(db)] == ["req-10", "req-11", "req-12"]


def test_filters(tmp_path: Path) -> None:
    db = tmp_path / "requests.db"
    with RequestLog(db) as log:
        log.record(_row(1, key_name="team-a"))
        log.record(_row(2, key_name="team-b", status=429, error_code="rate_limit_exceeded"))
        log.record(_row(3, status=502, mapped_model="gemini-2.5-pro", client_model="gpt-5"))
        log.record(_row(4, status=404))
        _wait(lambda: log.written == 4, "4 rows")
    ids = lambda **kw: [r["request_id"] for r in _rows(db, **kw)]  # noqa: E731
    assert ids(key="team-a") == ["req-1"]
    assert ids(status="429") == ["req-2"]
    assert ids(status="4xx") == ["req-2", "req-4"]
    assert ids(status="5xx") == ["req-3"]
    assert ids(model="gpt-5") == ids(model="gemini-2.5-pro") == ["req-3"]
    assert ids(since_ts=time.time() + 60) == []
    with pytest.raises(ValueError, match="4xx"):
        status_filter("teapot")


def test_cli_logs_text_json_and_filters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RAWGATE_HOME", str(tmp_path))
    assert main(["logs"]) == 1 and "no request log" in capsys.readouterr().err
    with RequestLog(tmp_path / "requests.db") as log:
        log.record(_row(1, key_name="team-a", ttfb_ms=3.0, stream=True))
        log.record(_row(2, status=429, error_code="rate_limit_exceeded",
                        attempts=[("acct-a", 429), ("acct-b", 0)]))  # fmt: skip
        _wait(lambda: log.written == 2, "2 rows")
    assert main(["logs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "key=team-a" in out[0] and "ttfb=3ms stream" in out[0]
    assert "429 rate_limit_exceeded" in out[1] and "attempts=acct-a:429,acct-b:conn" in out[1]
    assert main(["logs", "--status", "4xx", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [orjson.loads(x)["request_id"] for x in lines] == ["req-2"]
    with pytest.raises(SystemExit):
        main(["logs", "--status", "teapot"])
    assert "4xx" in capsys.readouterr().err


def test_cli_logs_follow_prints_new_rows_until_stopped(tmp_path: Path) -> None:
    db = tmp_path / "requests.db"
    with RequestLog(db) as log:
        log.record(_row(1))
        _wait(lambda: log.written == 1, "the first row")
        proc = subprocess.Popen(
            [sys.executable, "-m", "rawgate", "logs", "--follow", "--json"],
            env={**os.environ, "RAWGATE_HOME": str(tmp_path)},
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert orjson.loads(proc.stdout.readline())["request_id"] == "req-1"
            log.record(_row(2))
            assert orjson.loads(proc.stdout.readline())["request_id"] == "req-2"
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
            if proc.stdout is not None:
                proc.stdout.close()


def test_many_writers_opening_a_fresh_database_at_once(tmp_path: Path) -> None:
    """`serve --workers N`: N processes create requests.db together; switching it to WAL is
    retried instead of failing start-up with "database is locked"."""
    db = tmp_path / "requests.db"
    logs = [RequestLog(db) for _ in range(8)]
    errors: list[BaseException] = []
    go = threading.Barrier(len(logs))

    def start(log: RequestLog) -> None:
        go.wait()
        try:
            log.start()
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(lg,)) for lg in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert errors == []
        for i, lg in enumerate(logs):
            lg.record(_row(i))
        _wait(lambda: sum(lg.written for lg in logs) == len(logs), "one row per writer")
    finally:
        for lg in logs:
            lg.close()
    assert len(_rows(db)) == len(logs)


def test_the_wal_and_shm_files_are_0600_like_the_database(tmp_path: Path) -> None:
    """SQLite gives -wal/-shm the database file's mode when it creates them: the file must be
    0600 before SQLite first opens it (a chmod afterwards left them 0644 while serve ran)."""
    db = tmp_path / "requests.db"
    with RequestLog(db) as log:
        log.record(_row(0, stream=False))
        _wait(lambda: log.written == 1, "a row written")
        modes = {
            p.name: oct(p.stat().st_mode & 0o777)
            for p in tmp_path.iterdir()
            if p.name.startswith("requests.db")
        }
        assert {"requests.db", "requests.db-wal", "requests.db-shm"} <= set(modes)
        assert set(modes.values()) == {"0o600"}, modes
