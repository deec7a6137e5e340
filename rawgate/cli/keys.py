"""`rawgate keys`: client keys with limits, on the configured state backend ([state] backend).

A new key is printed once, alone on stdout (scripts can capture it); notes go to stderr.
Listings show `rk-AbCd...wxyz` only. A failure prints one line on stderr and exits 1
(argparse usage errors exit 2), including "Redis does not answer" for backend = redis.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import anyio
import orjson

from rawgate.config import ConfigError, load_config, rawgate_home
from rawgate.state.keys import KeyRecord, KeyStoreError, parse_since
from rawgate.state.store import State, StateUnavailable, open_state

__all__ = ["add_parser", "run"]


def _nonneg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0 = no limit)")
    return v


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "keys",
        help="client keys with limits (rpm, tpm, daily tokens, models) and their usage",
        description="Manage the keys clients use to call rawgate, with per-key limits, on the "
        "configured state backend ([state] backend: keys.json in RAWGATE_HOME, or Redis).",
    )
    p.add_argument("--config", default=None, metavar="PATH",
                   help="TOML config file (default: $RAWGATE_HOME/config.toml)")  # fmt: skip
    p.set_defaults(run=run, keys_cmd=None, _keys_parser=p)
    cmds = p.add_subparsers(dest="keys_cmd", metavar="ACTION")

    a = cmds.add_parser("add", help="make a key (printed once) with optional limits")
    a.add_argument("name", metavar="NAME", help="1-64 of A-Z a-z 0-9 _ . -")
    a.add_argument("--rpm", type=_nonneg, default=0, metavar="N", help="requests per minute")
    a.add_argument("--tpm", type=_nonneg, default=0, metavar="N", help="tokens per minute")
    a.add_argument("--daily-tokens", type=_nonneg, default=0, metavar="N",
                   help="tokens per UTC day")  # fmt: skip
    a.add_argument("--models", nargs="+", default=[], metavar="PATTERN",
                   help="models the key may use: names or globs (gemini-2.5-*); "
                   "default all")  # fmt: skip

    ls = cmds.add_parser("list", help="list keys (masked) and their limits")
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    u = cmds.add_parser("usage", help="requests and tokens per key, from hourly buckets")
    u.add_argument("name", nargs="?", default=None, metavar="NAME")
    u.add_argument("--since", default="24h", help="how far back: 90m, 24h, 7d (default 24h)")
    u.add_argument("--json", action="store_true", help="hourly buckets, machine-readable")

    actions = (("disable", "refuse the key (kept)"), ("enable", "accept it again"),
               ("remove", "delete the key"),
               ("rotate", "replace the key (printed once); the old one stops"))  # fmt: skip
    for action, text in actions:
        c = cmds.add_parser(action, help=text)
        c.add_argument("name", metavar="NAME")


def _fail(msg: str) -> int:
    print(f"rawgate keys: {msg}", file=sys.stderr)
    return 1


def _limits(r: KeyRecord) -> str:
    def n(v: int) -> str:
        return str(v) if v else "-"

    models = ",".join(r.models) if r.models else "*"
    return f"rpm {n(r.rpm)}, tpm {n(r.tpm)}, daily tokens {n(r.daily_tokens)}, models {models}"


def run(args: argparse.Namespace) -> int:
    if args.keys_cmd is None:
        args._keys_parser.print_help()
        return 2
    try:
        cfg = load_config(args.config)
        since = parse_since(args.since) if args.keys_cmd == "usage" else 0
    except (ConfigError, KeyStoreError) as e:
        return _fail(str(e))

    async def main() -> int:
        async with open_state(cfg, rawgate_home(), background=False) as state:
            return await _act(state, args, since)

    try:
        return anyio.run(main)
    except (KeyStoreError, StateUnavailable) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{e.filename or rawgate_home()}: {e.strerror}")


async def _act(state: State, args: argparse.Namespace, since: int) -> int:
    cmd = args.keys_cmd
    if cmd in ("add", "rotate"):
        if cmd == "add":
            rec, key = await state.add_key(
                args.name, rpm=args.rpm, tpm=args.tpm, daily_tokens=args.daily_tokens,
                models=args.models,
            )  # fmt: skip
        else:
            rec, key = await state.rotate_key(args.name)
        verb = "added" if cmd == "add" else "rotated"
        print(f"{verb} key {rec.name} ({_limits(rec)})", file=sys.stderr)
        print(key)
        print("Store it now: it is not shown again.", file=sys.stderr)
    elif cmd == "list":
        recs = await state.list_keys()
        if args.json:
            sys.stdout.write(orjson.dumps([r.masked() for r in recs]).decode() + "\n")
            return 0
        if not recs:
            print("no keys (add one with `rawgate keys add NAME`)")
        for r in recs:
            status = "enabled" if r.enabled else "DISABLED"
            print(f"{r.name:<20} {r.hint}  {status:<8}  {_limits(r)}")
    elif cmd == "usage":
        rows = await state.usage("key", args.name, since)
        if args.json:
            out = {n: [{"hour": time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(u.hour_ms / 1000)),
                        "requests": u.requests, "tokens_in": u.tokens_in,
                        "tokens_out": u.tokens_out} for u in us]
                   for n, us in rows.items()}  # fmt: skip
            sys.stdout.write(orjson.dumps(out).decode() + "\n")
            return 0
        if not rows:
            print(f"no usage in the last {args.since}")
        for n, us in sorted(rows.items()):
            req = sum(u.requests for u in us)
            tin = sum(u.tokens_in for u in us)
            tout = sum(u.tokens_out for u in us)
            print(f"{n:<20} {req} requests, {tin} tokens in, {tout} tokens out"
                  f" (last {args.since})")  # fmt: skip
    elif cmd in ("disable", "enable"):
        rec = await state.set_key_enabled(args.name, cmd == "enable")
        print(f"{cmd}d key {rec.name} ({rec.hint})")
    elif cmd == "remove":
        rec = await state.remove_key(args.name)
        print(f"removed key {rec.name} ({rec.hint})")
    return 0
