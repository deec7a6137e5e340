"""`rawgate accounts`: manage $RAWGATE_HOME/accounts.json (the server reloads it by itself), or
the accounts in Redis with `[state] backend = "redis"` (rawgate/state/admin.py: the same methods).

Every command goes through AccountStore (locked, atomic); a failure prints one line on stderr
and exits 1 (argparse usage errors exit 2). Secrets are read from the command line or, with
`-`, from stdin (keeps them out of shell history and `ps`), and are only ever printed masked.
`list` also shows the cooldowns a running server shares in cooldowns.json. `import` accepts
the formats documented at `parse_import` (pure: bytes in, Account records out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import orjson

from rawgate.accounts.cooldowns import CooldownBoard
from rawgate.accounts.oauth import email_from_id_token
from rawgate.accounts.store import (
    ID_RE,
    Account,
    AccountStore,
    AccountStoreError,
    decode_store,
    mask_secret,
)
from rawgate.config import ConfigError, load_config, rawgate_home

__all__ = ["add_parser", "parse_import", "run"]

ACCOUNTS_FILE = "accounts.json"
COOLDOWNS_FILE = "cooldowns.json"
# `list` truncates free text (labels, reasons, errors) to keep one account per line.
LIST_TEXT_MAX_CHARS = 48


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "accounts",
        help="manage upstream accounts (Gemini API keys, Code Assist OAuth)",
        description="Manage the upstream accounts: in $RAWGATE_HOME/accounts.json, or in Redis "
        "with [state] backend = \"redis\". A running `rawgate serve` picks up every change "
        "by itself (within a second from the file; at once from Redis, on every instance).",
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

    lg = cmds.add_parser(
        "login",
        help="add a Code Assist account by signing in with Google (installed-app OAuth)",
        description="Sign in with a Google account in a browser and add it as a Code Assist "
        "account: rawgate prints a URL, the browser comes back to a loopback port on this "
        "machine, the refresh token is stored and the Cloud project discovered. Without a "
        "display (or with --no-browser) open the URL anywhere and paste back the address the "
        "browser ends on. Needs upstream.oauth_client_id / oauth_client_secret.",
    )
    lg.add_argument("--no-browser", action="store_true",
                    help="do not open a browser; paste the redirect address (or code) back")
    lg.add_argument("--email", default="", metavar="ADDR",
                    help="the account to sign in with (a hint to Google; shown in listings)")
    lg.add_argument("--project", default="", metavar="ID",
                    help="Cloud project id (else discovered)")
    lg.add_argument("--label", default="", metavar="NAME", help="a name shown in listings")
    lg.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                    help="give up when the sign-in takes longer (default 300)")
    lg.add_argument("--config", default=None, metavar="PATH",
                    help="TOML config file (default: $RAWGATE_HOME/config.toml)")

    ls = cmds.add_parser("list", help="list accounts (secrets masked), status and counters")
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    d = cmds.add_parser("disable", help="stop using an account (kept in the list)")
    d.add_argument("id", metavar="ID", help="account id (or a unique label/email)")
    d.add_argument("--reason", default="disabled by hand", help="kept and shown in listings")

    e = cmds.add_parser("enable", help="use a disabled account again (clears its cooldowns)")
    e.add_argument("id", metavar="ID", help="account id (or a unique label/email)")

    r = cmds.add_parser("remove", help="delete an account from the list")
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
    try:
        store, board = _stores(home, getattr(args, "config", None))
    except ConfigError as e:
        return _fail(str(e))
    try:
        if cmd == "add":
            key = _secret_arg(args.api_key, "the API key")
            acc = store.add_api_key(key, label=args.label, email=args.email)
            print(f"added account {_summary(acc)}")
        elif cmd == "add-oauth":
            token = _secret_arg(args.refresh_token, "the refresh token")
            acc = store.add_oauth(token, email=args.email, project=args.project, label=args.label)
            print(f"added account {_summary(acc)}")
        elif cmd == "login":
            return _login(store, args)
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


def _stores(home: Path, config: str | None) -> tuple[AccountStore, CooldownBoard]:
    """accounts.json + cooldowns.json, or the same in Redis with [state] backend = "redis"."""
    cfg = load_config(config)
    if cfg.state.backend == "redis":
        from rawgate.state.admin import RedisAccountStore, RedisCooldownBoard

        return RedisAccountStore(cfg, home), RedisCooldownBoard(cfg, home)
    return AccountStore(home / ACCOUNTS_FILE), CooldownBoard(home / COOLDOWNS_FILE)


def _login(store: AccountStore, args: argparse.Namespace) -> int:
    import anyio

    from rawgate.cli.login import LoginOptions, login
    from rawgate.errors import RawgateError

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        return _fail(str(e))
    if not args.timeout > 0:
        return _fail("--timeout must be > 0")
    opts = LoginOptions(no_browser=args.no_browser, email=args.email.strip(),
                        project=args.project.strip(), label=args.label, timeout_s=args.timeout)
    try:
        acc, warning = anyio.run(login, cfg, store, opts)
    except RawgateError as e:
        return _fail(e.message)
    except KeyboardInterrupt:
        return _fail("sign-in interrupted")
    if warning:
        print(f"rawgate accounts: warning: {warning}", file=sys.stderr)
    print(f"added account {_summary(acc)}" + (f", project {acc.project}" if acc.project else ""))
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


# ---- import formats -----------------------------------------------------------------------------


def _looks_like_refresh_token(s: str) -> bool:
    return s.startswith("1//")  # Google OAuth refresh tokens start so; API keys with "AIza"


def _str(d: dict[str, Any], *keys: str) -> str:
    for k in keys:
        v = d.get(k)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return ""


def _from_item(item: object, now: int, where: str) -> Account:
    if isinstance(item, str):
        secret = item.strip()
        if not secret:
            raise AccountStoreError(f"{where}: empty entry")
        if _looks_like_refresh_token(secret):
            return Account(id="", kind="oauth", refresh_token=secret, created=now)
        return Account(id="", kind="api_key", api_key=secret, created=now)
    if not isinstance(item, dict):
        raise AccountStoreError(f"{where}: expected a key string or an object")
    token = item.get("token")
    tok: dict[str, Any] = token if isinstance(token, dict) else {}
    key = _str(item, "api_key", "apiKey", "key")
    refresh = _str(item, "refresh_token", "refreshToken") or _str(tok, "refresh_token")
    email = (
        _str(item, "email")
        or _str(tok, "email")
        or email_from_id_token(item.get("id_token") or tok.get("id_token"))
    )
    label = _str(item, "label", "name")
    project = _str(item, "project", "project_id", "projectId") or _str(tok, "project_id")
    enabled = not bool(item.get("disabled")) and item.get("enabled", True) is not False
    reason = _str(item, "disabled_reason") if not enabled else ""
    if key:
        acc = Account(id="", kind="api_key", api_key=key, created=now)
    elif refresh:
        acc = Account(id="", kind="oauth", refresh_token=refresh, project=project, created=now)
    else:
        raise AccountStoreError(f"{where}: no api_key or refresh_token found")
    acc.id = _str(item, "id") if ID_RE.match(_str(item, "id")) else ""
    acc.email, acc.label, acc.enabled = email, label, enabled
    acc.disabled_reason = reason or ("" if enabled else "disabled in the imported file")
    return acc


def parse_import(data: bytes, source: str, now: int | None = None) -> list[Account]:
    """Accounts from an import file. Accepted shapes (secrets never echoed in errors):

    - rawgate's own accounts.json (`{"version": 1, "accounts": [...]}`);
    - a JSON list of key strings and/or objects with `api_key`/`key` or `refresh_token`
      (+ optional `label`/`name`, `email`, `project`), or `{"accounts": [...]}` of those;
    - one object: the seed's per-account file (`{"email", "name", "token": {"refresh_token",
      "project_id"}, "disabled"}`) or gemini-cli's `oauth_creds.json` (`{"refresh_token",
      "id_token", ...}`; the email is read from the id_token for display);
    - plain text: one key per line (a `1//...` token becomes an OAuth account), text after the
      key on the same line is its label; blank lines and `#` comments are skipped.
    """
    stamp = int(time.time()) if now is None else now
    try:
        doc: Any = msgspec.json.decode(data)
    except msgspec.DecodeError:
        doc = None
        if data.lstrip()[:1] in (b"{", b"["):
            raise AccountStoreError(f"{source}: not valid JSON") from None
    if doc is None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise AccountStoreError(f"{source}: neither JSON nor UTF-8 text") from None
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            secret, _, label = line.partition(" ")
            acc = _from_item(secret, stamp, f"{source}:{n}")
            acc.label = label.strip()
            out.append(acc)
        return out
    if isinstance(doc, dict) and "version" in doc:
        return decode_store(data, source)
    if isinstance(doc, dict) and isinstance(doc.get("accounts"), list):
        doc = doc["accounts"]
    if isinstance(doc, dict):
        return [_from_item(doc, stamp, source)]
    if isinstance(doc, list):
        return [_from_item(item, stamp, f"{source}: item {i}") for i, item in enumerate(doc)]
    raise AccountStoreError(f"{source}: expected a list of accounts, an object or text lines")
