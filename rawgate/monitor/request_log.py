"""The request log: one row per request in `RAWGATE_HOME/requests.db` (SQLite, WAL).

Invariants:
- Never a body, never a secret: a row holds names (client key name, account label, models),
  numbers and codes only. The caller builds rows from what the gateway already knows.
- The request path pays one tuple and one deque append (`record`, no lock, no I/O: deque
  appends are atomic under the GIL); a writer thread drains the queue in batches, one
  transaction per batch, off the event loop. The queue is bounded (`queue_max` rows): when it
  is full the row is dropped and counted (`dropped`), so the log never slows or fails a request
  and never grows without bound.
- Retention: rows older than `days` are deleted by the writer, at most once per
  RETENTION_EVERY_S, in bounded chunks (a large backlog never holds the database for long).
- Readers (`rawgate logs`, the admin API) open their own read-only connection: WAL lets them
  read while the writer writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = ["COLUMNS", "RequestLog", "Row", "query_rows", "status_filter"]

log = logging.getLogger("rawgate.monitor")

# How often the writer wakes when rows wait (seconds) and how many rows go in one transaction.
FLUSH_INTERVAL_S = 0.2
BATCH_MAX = 1000
RETENTION_EVERY_S = 3600.0
RETENTION_CHUNK = 5000  # rows deleted per statement, so a big backlog never blocks for long

COLUMNS = (
    "ts",
    "request_id",
    "key_name",
    "protocol",
    "route",
    "client_model",
    "mapped_model",
    "account",
    "attempts",
    "status",
    "error_code",
    "latency_ms",
    "ttfb_ms",
    "stream",
    "tokens_in",
    "tokens_out",
    "tokens_cached",
    "tokens_thoughts",
    "bytes_in",
    "bytes_out",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    request_id TEXT NOT NULL,
    key_name TEXT,
    protocol TEXT NOT NULL,
    route TEXT NOT NULL,
    client_model TEXT,
    mapped_model TEXT,
    account TEXT,
    attempts TEXT NOT NULL,
    status INTEGER NOT NULL,
    error_code TEXT,
    latency_ms REAL NOT NULL,
    ttfb_ms REAL,
    stream INTEGER NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    tokens_cached INTEGER NOT NULL,
    tokens_thoughts INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE INDEX IF NOT EXISTS requests_key ON requests (key_name, ts);
CREATE INDEX IF NOT EXISTS requests_model ON requests (mapped_model, ts);
"""
_INSERT = (
    f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
)


@dataclass(slots=True)
class Row:
    """One request, as the gateway saw it. `attempts`: (account label, upstream status or 0
    for a connection failure) per upstream attempt, in order."""

    request_id: str
    protocol: str  # openai | anthropic | gemini | rawgate
    route: str  # the route pattern, e.g. /v1/chat/completions
    status: int
    latency_ms: float
    ts: float = field(default_factory=time.time)
    key_name: str | None = None
    client_model: str | None = None
    mapped_model: str | None = None
    account: str | None = None
    attempts: list[tuple[str, int]] = field(default_factory=list)
    error_code: str | None = None
    ttfb_ms: float | None = None
    stream: bool = False
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cached: int = 0
    tokens_thoughts: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def values(self) -> tuple[Any, ...]:
        return (
            self.ts,
            self.request_id,
            self.key_name,
            self.protocol,
            self.route,
            self.client_model,
            self.mapped_model,
            self.account,
            orjson.dumps(self.attempts).decode(),
            self.status,
            self.error_code,
            self.latency_ms,
            self.ttfb_ms,
            int(self.stream),
            self.tokens_in,
            self.tokens_out,
            self.tokens_cached,
            self.tokens_thoughts,
            self.bytes_in,
            self.bytes_out,
        )


# `serve --workers N` opens the file from N processes at once: switching a new database to WAL
# takes an exclusive lock that SQLite reports as "locked" without waiting on its busy handler, so
# the set-up is retried (bounded: SETUP_TRIES x SETUP_WAIT_S).
SETUP_TRIES = 50
SETUP_WAIT_S = 0.1


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    for attempt in range(SETUP_TRIES):
        conn = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut loses the last rows only
            conn.executescript(_SCHEMA)
            return conn
        except sqlite3.OperationalError as e:
            conn.close()
            if "locked" not in str(e) or attempt == SETUP_TRIES - 1:
                raise
            time.sleep(SETUP_WAIT_S)
    raise AssertionError("unreachable")


class RequestLog:
    """The writer side (see the module note). Use as a context manager, or start()/close()."""

    def __init__(self, path: Path | str, *, days: float = 7.0, queue_max: int = 10_000) -> None:
        self.path = Path(path)
        self.days = days
        self.queue_max = queue_max
        self._q: deque[tuple[Any, ...]] = deque()
        self.dropped = 0
        self.written = 0
        self.failed_batches = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_retention = 0.0

    # ---- the request path ---------------------------------------------------------------------

    def record(self, row: Row) -> None:
        """Queue one row (O(1), no I/O); dropped and counted when the queue is full."""
        if len(self._q) >= self.queue_max:
            self.dropped += 1
            return
        self._q.append(row.values())
        if len(self._q) >= BATCH_MAX:
            self._wake.set()

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0600 BEFORE SQLite opens it: SQLite gives the -wal and -shm files it creates the
        # database file's mode, so a chmod afterwards left them 0644 while serve ran.
        with contextlib.suppress(OSError):
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self.path.chmod(0o600)
        conn = connect(self.path)  # created (schema, WAL) before the first request
        self._thread = threading.Thread(
            target=self._run, args=(conn,), name="rawgate-request-log", daemon=True
        )
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (bounded by `timeout`) and stop the writer."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> RequestLog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def queued(self) -> int:
        return len(self._q)

    # ---- the writer thread ---------------------------------------------------------------------

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                self._wake.wait(FLUSH_INTERVAL_S)
                self._wake.clear()
                self._flush(conn)
                self._retain(conn, time.time())
                if self._stop.is_set():
                    self._flush(conn)
                    return
        finally:
            conn.close()

    def _flush(self, conn: sqlite3.Connection) -> None:
        q = self._q
        while q:
            batch = [q.popleft() for _ in range(min(len(q), BATCH_MAX))]
            try:
                with conn:
                    conn.executemany(_INSERT, batch)
            except sqlite3.Error as e:
                # A full disk or a locked file must not kill the writer: the batch is lost and
                # counted as dropped, and the next one is tried.
                self.failed_batches += 1
                self.dropped += len(batch)
                log.warning("request log: a batch of %d rows was lost: %s", len(batch), e)
                return
            self.written += len(batch)

    def _retain(self, conn: sqlite3.Connection, now: float) -> None:
        if now - self._last_retention < RETENTION_EVERY_S or self.days <= 0:
            return
        self._last_retention = now
        self.prune(conn, now)

    def prune(self, conn: sqlite3.Connection, now: float) -> int:
        """Delete rows older than `days`, in chunks; returns how many went."""
        cutoff = now - self.days * 86400.0
        gone = 0
        while True:
            with conn:
                cur = conn.execute(
                    "DELETE FROM requests WHERE id IN "
                    "(SELECT id FROM requests WHERE ts < ? ORDER BY id LIMIT ?)",
                    (cutoff, RETENTION_CHUNK),
                )
            gone += cur.rowcount
            if cur.rowcount < RETENTION_CHUNK:
                return gone


# ---- the reader side -----------------------------------------------------------------------------


def status_filter(text: str) -> tuple[str, tuple[int, ...]]:
    """`429` -> exact, `4xx` / `5xx` -> a range: (SQL condition, parameters)."""
    t = text.strip().lower()
    if len(t) == 3 and t[0] in "12345" and t[1:] == "xx":
        lo = int(t[0]) * 100
        return "status BETWEEN ? AND ?", (lo, lo + 99)
    if t.isdigit() and 100 <= int(t) <= 599:
        return "status = ?", (int(t),)
    raise ValueError(f"status {text!r}: expected a code like 429, or 4xx / 5xx")


def query_rows(
    conn: sqlite3.Connection,
    *,
    since_ts: float | None = None,
    after_id: int = 0,
    key: str | None = None,
    model: str | None = None,
    status: str | None = None,
    limit: int = 1000,
    before_ts: float | None = None,
    account: str | None = None,
    newest_first: bool = False,
) -> Iterator[dict[str, Any]]:
    """Rows matching the filters, oldest first (each with its `id`); `newest_first` for the
    admin API's pages (`before_ts`: rows strictly older, the next page)."""
    where = ["id > ?"]
    params: list[Any] = [after_id]
    if since_ts is not None:
        where.append("ts >= ?")
        params.append(since_ts)
    if before_ts is not None:
        where.append("ts < ?")
        params.append(before_ts)
    if account is not None:
        where.append("account = ?")
        params.append(account)
    if key is not None:
        where.append("key_name = ?")
        params.append(key)
    if model is not None:
        where.append("(mapped_model = ? OR client_model = ?)")
        params.extend((model, model))
    if status is not None:
        cond, args = status_filter(status)
        where.append(cond)
        params.extend(args)
    sql = (
        f"SELECT id, {', '.join(COLUMNS)} FROM requests WHERE {' AND '.join(where)} "
        f"ORDER BY id {'DESC' if newest_first else ''} LIMIT ?"
    )
    params.append(limit)
    for rec in conn.execute(sql, params):
        row = dict(zip(("id", *COLUMNS), rec, strict=True))
        row["attempts"] = orjson.loads(row["attempts"])
        row["stream"] = bool(row["stream"])
        yield row
