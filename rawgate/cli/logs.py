"""`rawgate logs`: the request log (RAWGATE_HOME/requests.db), filtered, as text or JSON lines.

Invariants: read-only (its own SQLite connection in `mode=ro`; the server keeps writing
meanwhile, WAL); `--follow` polls for rows after the last one shown, every FOLLOW_POLL_S, until
interrupted (exit 0 on Ctrl-C / SIGTERM). Rows hold no bodies and no secrets, so printing them
is safe.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from typing import Any

import orjson

from rawgate.config import rawgate_home
from rawgate.monitor.request_log import query_rows, status_filter

__all__ = ["add_parser", "format_row", "run"]

FOLLOW_POLL_S = 0.5


def _since(text: str) -> float:
    """`90s`, `30m`, `1h`, `7d` -> seconds."""
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(t) < 2 or t[-1] not in units or not t[:-1].isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number and s, m, h or d (1h)")
    return int(t[:-1]) * units[t[-1]]


def _status(text: str) -> str:
    try:
        status_filter(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "logs",
        help="the request log: one row per request (no bodies, no secrets)",
        description="Show the request log the server writes to $RAWGATE_HOME/requests.db "
        "([log] request_log): time, status, route, models, account, attempts, latency, tokens.",
    )
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new rows")
    p.add_argument("--since", type=_since, default=3600, metavar="AGE",
                   help="how far back: 90s, 30m, 1h, 7d (default 1h)")  # fmt: skip
    p.add_argument("--key", default=None, metavar="NAME", help="only this client key")
    p.add_argument("--model", default=None, metavar="M", help="client or mapped model")
    p.add_argument("--status", type=_status, default=None, metavar="S",
                   help="429, or a class: 4xx, 5xx")  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--limit", type=int, default=1000, metavar="N",
                   help="at most N rows before --follow takes over (default 1000)")  # fmt: skip
    p.set_defaults(run=run)


def format_row(r: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["ts"]))
    model = r["client_model"] or "-"
    if r["mapped_model"] and r["mapped_model"] != r["client_model"]:
        model += f"->{r['mapped_model']}"
    tries = ",".join(f"{a}:{s or 'conn'}" for a, s in r["attempts"]) or "-"
    err = f" {r['error_code']}" if r["error_code"] else ""
    ttfb = f" ttfb={r['ttfb_ms']:.0f}ms" if r["ttfb_ms"] is not None else ""
    return (
        f"{when} {r['status']}{err} {r['protocol']} {r['route']} {model} "
        f"key={r['key_name'] or '-'} account={r['account'] or '-'} attempts={tries} "
        f"{r['latency_ms']:.0f}ms{ttfb} {'stream ' if r['stream'] else ''}"
        f"tokens={r['tokens_in']}/{r['tokens_out']} id={r['request_id']}"
    )


def run(args: argparse.Namespace) -> int:
    path = rawgate_home() / "requests.db"
    if not path.exists():
        print(
            f"rawgate logs: no request log at {path} yet (the server writes it when "
            "[log] request_log is on, the default)",
            file=sys.stderr,
        )
        return 1
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as e:
        print(f"rawgate logs: cannot open {path}: {e}", file=sys.stderr)
        return 1
    filters = {"key": args.key, "model": args.model, "status": args.status}
    last = 0
    since: float | None = time.time() - args.since
    limit = args.limit
    try:
        while True:
            for r in query_rows(conn, since_ts=since, after_id=last, limit=limit, **filters):
                last = r["id"]
                out = orjson.dumps(r).decode() if args.json else format_row(r)
                print(out, flush=True)
            if not args.follow:
                return 0
            since, limit = None, 10_000
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        return 0
    except sqlite3.Error as e:
        print(f"rawgate logs: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()
