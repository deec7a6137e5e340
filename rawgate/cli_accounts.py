"""`rawgate accounts`: manage $RAWGATE_HOME/accounts.json (the server reloads it by itself).

Every command goes through AccountStore (locked, atomic); a failure prints one line on stderr
and exits 1 (argparse usage errors exit 2). Secrets are read from the command line or, with
`-`, from stdin (keeps them out of shell history and `ps`), and are only ever printed masked.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import orjson

from rawgate.accounts import Account, AccountStore, AccountStoreError, mask_secret, parse_import
from rawgate.config import rawgate_home
from rawgate.cooldowns import CooldownBoard

__all__ = ["add_parser", "run"]

ACCOUNTS_FILE = "accounts.json"
COOLDOWNS_FILE = "cooldowns.json"
# `list` truncates free text (labels, reasons, errors) to keep one account per line.
LIST_TEXT_MAX_CHARS = 48


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "accounts",
        help="manage upstream accounts (Gemini API keys, Code Assist OAuth)",
        description="Manage the upstream accounts in $RAWGATE_HOME/accounts.json. A running "
        "`rawgate serve` picks up every change within a second.",
    )
    p.set_defaults(run=run, accounts_cmd=None, _accounts_parser=p)
    cmds = p.add_subparsers(dest="accounts_cmd", metavar="ACTION")

    a = cmds.add_parser("add", help="add a Gemini API key account")
    a.add_argument("--api-key", required=True, metavar="KEY", help="the key; - reads stdin")
    a.add_argument("--label", default="", metavar="NAME", help="a name shown in listings")
    a.add_argument("--email", default="", metavar="ADDR", help="shown in X-Account-Email")

    o = cmds.add_parser("add-oauth", help="add a Code Assist account (OAuth refresh token)")
    o.add_argument(
        "--refresh-token", required=True, metavar="TOKEN", help="the token; - reads stdin"
    )
    o.add_argument("--email", default="", metavar="ADDR", help="the Google account's address")
    o.add_argument(
        "--project", default="", metavar="ID", help="Cloud project id (else discovered)"
    )
    o.add_argument("--label", default="", metavar="NAME", help="a name shown in listings")

    ls = cmds.add_parser("list", help="list accounts (secrets masked), status and counters")
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    d = cmds.add_parser("disable", help="stop using an account (kept in the file)")
    d.add_argument("id", metavar="ID", help="account id (or a unique label/email)")
    d.add_argument("--reason", default="disabled by hand", help="kept and shown in listings")

    e = cmds.add_parser("enable", help="use a disabled account again (clears its cooldowns)")
    e.add_argument("id", metavar="ID", help="account id (or a unique label/email)")

    r = cmds.add_parser("remove", help="delete an account from the file")
    r.add_argument("id", metavar="ID", help="account id (or a unique label/email)")

    i = cmds.add_parser(
        "import",
        help="import accounts from a file",
        description="Import accounts from FILE (- for stdin): rawgate's own accounts.json, a "
        "JSON list of keys or {api_key|refresh_token, label, email, project} objects, the seed "
        "system's per-account JSON, gemini-cli's oauth_creds.json, or text with one key per "
        "line (optionally followed by a label). Accounts already present are skipped.",
    )
    i.add_argument("file", metavar="FILE")


def _fail(msg: str) -> int:
    print(f"rawgate accounts: {msg}", file=sys.stderr)
    return 1


def _secret_arg(value: str, what: str) -> str:
    if value == "-":
        value = sys.stdin.readline()
    value = value.strip()
    if not value:
        raise AccountStoreError(f"{what} is empty")
    return value


def _summary(acc: Account) -> str:
    return f"{acc.id} ({acc.kind}, {acc.display_name()}, {mask_secret(acc.secret())})"


def run(args: argparse.Namespace) -> int:
    cmd = args.accounts_cmd
    if cmd is None:
        args._accounts_parser.print_help()
        return 2
    home = rawgate_home()
    store = AccountStore(home / ACCOUNTS_FILE)
    board = CooldownBoard(home / COOLDOWNS_FILE)
    try:
        if cmd == "add":
            key = _secret_arg(args.api_key, "the API key")
            acc = store.add_api_key(key, label=args.label, email=args.email)
            print(f"added account {_summary(acc)}")
        elif cmd == "add-oauth":
            token = _secret_arg(args.refresh_token, "the refresh token")
            acc = store.add_oauth(token, email=args.email, project=args.project, label=args.label)
            print(f"added account {_summary(acc)}")
        elif cmd == "list":
            return _list(store, board, as_json=args.json)
        elif cmd == "disable":
            acc = store.set_enabled(args.id, False, args.reason)
            print(f"disabled account {_summary(acc)}")
        elif cmd == "enable":
            acc = store.set_enabled(args.id, True)
            board.clear_account(acc.id)
            print(f"enabled account {_summary(acc)}")
        elif cmd == "remove":
            acc = store.remove(args.id)
            board.clear_account(acc.id)
            print(f"removed account {_summary(acc)}")
        elif cmd == "import":
            return _import(store, args.file)
        else:  # pragma: no cover - argparse only lets known actions through
            return _fail(f"unknown action {cmd!r}")
    except AccountStoreError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{e.filename or home}: {e.strerror}")
    return 0


def _import(store: AccountStore, file: str) -> int:
    if file == "-":
        data, source = sys.stdin.buffer.read(), "stdin"
    else:
        try:
            with open(file, "rb") as f:
                data = f.read()
        except OSError as e:
            return _fail(f"{file}: {e.strerror}")
        source = file
    incoming = parse_import(data, source)
    if not incoming:
        return _fail(f"{source}: no accounts found")
    added, skipped = store.import_accounts(incoming)
    for acc in added:
        print(f"added account {_summary(acc)}")
    print(f"imported {len(added)} account(s), skipped {skipped} already present")
    return 0


def _cut(text: str) -> str:
    return text if len(text) <= LIST_TEXT_MAX_CHARS else text[: LIST_TEXT_MAX_CHARS - 3] + "..."


def _list(store: AccountStore, board: CooldownBoard, *, as_json: bool) -> int:
    accounts = store.load()
    now = time.time()
    cooling: dict[str, list[dict[str, Any]]] = {}
    for c in board.entries(now):
        cooling.setdefault(c.account, []).append(
            {"model": c.model or "*", "remaining_s": round(c.until - now, 1), "reason": c.reason}
        )
    if as_json:
        out = [{**a.masked(), "cooldowns": cooling.get(a.id, [])} for a in accounts]
        sys.stdout.write(orjson.dumps({"accounts": out}, option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
        return 0
    if not accounts:
        print(f"no accounts in {store.path}")
        print("add one with: rawgate accounts add --api-key KEY [--label NAME]")
        return 0
    rows = [("ID", "KIND", "NAME", "SECRET", "STATUS", "REQUESTS", "TOKENS IN/OUT", "ERRORS")]
    for a in accounts:
        if not a.enabled:
            status = "disabled: " + (a.disabled_reason or "by hand")
        elif cooling.get(a.id):
            status = "cooling: " + ", ".join(
                f"{c['model']} {c['remaining_s']:.0f}s" for c in cooling[a.id]
            )
        else:
            status = "ok"
        rows.append(
            (a.id, a.kind, _cut(a.display_name()), mask_secret(a.secret()), _cut(status),
             str(a.requests), f"{a.tokens_in}/{a.tokens_out}", str(a.errors))
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    for a in accounts:
        if a.last_error:
            print(f"{a.id}: last error: {_cut(a.last_error)}")
    return 0
