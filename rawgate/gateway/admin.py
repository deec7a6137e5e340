"""The dashboard's JSON API under /admin/... and the page at /ui (issue 17; the contract is the
"Admin API" section of the README).

Invariants:
- The app (http/app.py) checks the admin key before any handler here runs (routes registered
  `auth="admin"`: a header only, whatever auth.mode says; client keys are not admin keys) and
  refuses foreign Origins, preflights and non-JSON bodies on /admin and /ui. `/ui` holds no data
  and is served without a key (a browser navigation cannot send a header).
- Every answer is JSON; every error is `{"error": {"type", "code", "message"}}` with the status
  of its type (`admin_error`), never the OpenAI shape and never a 500 for bad input. Nothing
  here returns a secret: account keys and tokens, client keys (only their hint, and the plain
  key once, in the 201 of its creation), admin keys, the Redis password.
- Reads are cheap and bounded: the overview is O(accounts + 60 buckets) from memory; usage is
  one State read; requests one indexed SQLite query (at most REQUESTS_MAX rows) in a worker
  thread on a read-only connection.
- An account disabled or enabled here takes effect for the next request: the scheduler gets
  the new record at once (on the event loop), then accounts.json is written in a worker thread
  (and the accounts in Redis with `[state] backend = "redis"`).
"""

from __future__ import annotations

import math
import os
import re
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import anyio
import msgspec
import orjson

from rawgate import __version__
from rawgate.accounts.store import Account, AccountStoreError, one_line
from rawgate.errors import (
    BadRequest,
    Conflict,
    MethodNotAllowed,
    NotFound,
    RawgateError,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from rawgate.model_router import BUILTIN_ALIASES
from rawgate.monitor.rates import RateRing
from rawgate.monitor.request_log import RequestLog, query_rows, status_filter
from rawgate.state.keys import NAME_RE, KeyRecord, KeyStoreError
from rawgate.state.store import StateUnavailable

if TYPE_CHECKING:
    from rawgate.gateway.core import Gateway
    from rawgate.http.app import GatewayApp
    from rawgate.seam import Header, Request, ResponseSink

__all__ = ["REQUESTS_MAX", "Admin", "admin_error", "ui_page"]

# /admin/requests: rows per page (default and most).
REQUESTS_DEFAULT = 100
REQUESTS_MAX = 500
# A disable reason is shown in listings: one line, bounded.
REASON_MAX_CHARS = 200
# A request body of the admin API is a few fields: anything larger is refused before decoding.
BODY_MAX_BYTES = 64 * 1024

_JSON: Header = (b"content-type", b"application/json")
_NO_STORE: Header = (b"cache-control", b"no-store")
_NOSNIFF: Header = (b"x-content-type-options", b"nosniff")
_HEADERS: list[Header] = [_JSON, _NO_STORE, _NOSNIFF]
_UI_HEADERS: list[Header] = [
    (b"content-type", b"text/html; charset=utf-8"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self'"
        b" 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none';"
        b" base-uri 'none'; form-action 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    _NOSNIFF,
    (b"referrer-policy", b"no-referrer"),
    _NO_STORE,
]
# Error type by status (the contract's names); other statuses use the error's code.
_TYPES = {
    400: "bad_request",
    401: "admin_auth",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "bad_request",
    415: "unsupported_media_type",
}
_SINCE = re.compile(r"(\d{1,7})([smhd])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# How the overview names a block (scheduler reasons).
_REASONS = {
    "rate_limited": "429 RESOURCE_EXHAUSTED: rate limited by the upstream",
    "server": "5xx: the upstream failed",
    "auth": "401/403: the upstream refused the account's credential",
    "connect": "the connection to the upstream failed",
    "breaker": "circuit breaker open after repeated upstream failures",
    "remote": "blocked by another instance",
}


def admin_error(err: RawgateError) -> tuple[int, list[Header], bytes]:
    """The admin API's error shape (the route shape the app uses for its refusals too)."""
    kind = _TYPES.get(err.status) or err.code or err.type
    body = {"error": {"type": kind, "code": err.code or kind, "message": err.message}}
    return err.status, list(_HEADERS), orjson.dumps(body)


def ui_page() -> bytes:
    """The dashboard page (package data, read once at start)."""
    return (resources.files("rawgate.monitor") / "ui" / "index.html").read_bytes()


def _mask_email(email: str) -> str | None:
    if not email:
        return None
    user, at, domain = email.partition("@")
    return f"{user[:1]}***{at}{domain}" if at else f"{email[:1]}***"


def _mask_url(url: str) -> str:
    """A store URL without its password (user names go too: `redis://***@host:6379/0`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, "***@" + host, parts.path, "", ""))


def _opt(n: int) -> int | None:
    """A limit as the API shows it: null for 0 (no limit)."""
    return n or None


def key_view(rec: KeyRecord) -> dict[str, Any]:
    return {
        "name": rec.name,
        "masked": rec.hint,
        "enabled": rec.enabled,
        "rpm": _opt(rec.rpm),
        "tpm": _opt(rec.tpm),
        "daily_tokens": _opt(rec.daily_tokens),
        "models": list(rec.models),
        "created_at": float(rec.created),
    }


def _since(text: str, name: str = "since") -> int:
    m = _SINCE.match(text.strip().lower())
    if m is None:
        raise BadRequest(f"{name}={text[:32]!r}: expected a number and s, m, h or d (1h)")
    return int(m.group(1)) * _UNITS[m.group(2)]


Handler = Callable[["Request", "ResponseSink", str], Awaitable[None]]


class Admin:
    """The /admin routes of one process. `rates`: this process's per-minute ring; `rlog`: the
    request log (None when off); `home`: RAWGATE_HOME (requests.db is read from there)."""

    def __init__(
        self,
        gateway: Gateway,
        app: GatewayApp,
        *,
        rates: RateRing,
        rlog: RequestLog | None,
        home: Path,
        emulated: bool,
    ) -> None:
        self.gw = gateway
        self.app = app
        self.rates = rates
        self.rlog = rlog
        self.home = home
        self.emulated = emulated
        self.started_at = time.time()
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.page = ui_page()
        self._get: dict[str, Callable[[Request], Awaitable[tuple[int, Any]]]] = {
            "/admin/overview": self.overview,
            "/admin/usage": self.usage,
            "/admin/requests": self.requests,
            "/admin/config": self.config,
            "/admin/keys": self.keys,
        }

    def install(self, app: GatewayApp) -> None:
        add = app.router.add
        add("GET", "/ui", self.ui, auth="public")
        add("GET", "/ui/", self.ui, auth="public")
        # One dispatcher for every method under /admin: whatever the path or the method, the
        # admin key is checked first and the answer is in the admin shape (404/405 included).
        for method in ("GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"):
            add(method, "/admin", self.dispatch, auth="admin", shape=admin_error)
            add(method, "/admin/", self.dispatch, auth="admin", shape=admin_error)
            add(method, "/admin/", self.dispatch, auth="admin", prefix=True,
                label="/admin/{path}", shape=admin_error)  # fmt: skip

    # ---- the page ------------------------------------------------------------------------------

    async def ui(self, req: Request, sink: ResponseSink) -> None:
        await sink.respond(200, list(_UI_HEADERS), self.page)

    # ---- dispatch ------------------------------------------------------------------------------

    async def dispatch(self, req: Request, sink: ResponseSink) -> None:
        status, doc = await self._route(req)
        await sink.respond(status, list(_HEADERS), orjson.dumps(doc))

    async def _route(self, req: Request) -> tuple[int, Any]:
        path, method = req.path, req.method
        if method == "HEAD":
            method = "GET"
        if path == "/admin/keys" and method == "POST":
            return await self.add_key(req)
        get = self._get.get(path)
        if get is not None:
            if method != "GET":
                allow = "GET, HEAD, POST" if path == "/admin/keys" else "GET, HEAD"
                raise _not_allowed(path, allow)
            return await get(req)
        parts = path.split("/")  # "", "admin", collection, name, action
        if len(parts) == 5 and parts[2] == "accounts" and parts[4] in ("enable", "disable"):
            if method != "POST":
                raise _not_allowed(path, "POST")
            return 200, await self.set_account(req, _name(parts[3]), parts[4] == "enable")
        if len(parts) == 5 and parts[2] == "keys" and parts[4] in ("enable", "disable"):
            if method != "POST":
                raise _not_allowed(path, "POST")
            _body(req)  # an optional, empty JSON body: checked like any other
            rec = await self._keys_call(
                lambda st: st.set_key_enabled(_name(parts[3]), parts[4] == "enable")
            )
            return 200, key_view(rec)
        if len(parts) == 4 and parts[2] == "keys" and parts[3]:
            if method != "DELETE":
                raise _not_allowed(path, "DELETE")
            rec = await self._keys_call(lambda st: st.remove_key(_name(parts[3])))
            return 200, key_view(rec)
        raise NotFound(
            f"Unknown admin route {method} {path[:200]}. Routes: GET /admin/overview, "
            "/admin/usage, /admin/requests, /admin/config, /admin/keys; POST /admin/keys, "
            "/admin/accounts/{label}/disable|enable, /admin/keys/{name}/disable|enable; "
            "DELETE /admin/keys/{name}."
        )

    # ---- GET -----------------------------------------------------------------------------------

    async def overview(self, req: Request) -> tuple[int, Any]:
        now = time.time()
        st = self.gw.state
        status = st.status() if st is not None else {"backend": "local", "state": "ok"}
        rlog = self.rlog
        doc = {
            "instance": {
                "id": self.instance,
                "version": __version__,
                "started_at": self.started_at,
                "uptime_s": round(now - self.started_at, 3),
                "state_backend": status["backend"],
                "state": status["state"],
                "fleet": status["backend"] == "redis",
                "emulated": self.emulated,
                "request_log": {
                    "enabled": rlog is not None,
                    "queued": rlog.queued if rlog is not None else 0,
                    "dropped": rlog.dropped if rlog is not None else 0,
                    "days": rlog.days if rlog is not None else 0.0,
                },
            },
            "now": now,
            "accounts": self.accounts_view(now, time.monotonic()),
            "rates": self.rates.view(now),
        }
        return 200, doc

    def accounts_view(self, now: float, mono: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        sync = self.gw.sync
        for snap in self.gw.scheduler.snapshot(mono):
            acc = sync.accounts.get(snap["id"])
            cooldowns: list[dict[str, Any]] = []
            for reason, left in snap["blocked"].items():
                phrase = _REASONS.get(reason, _REASONS["remote"])
                if reason != "breaker":
                    cooldowns.append(_cooldown("", now, left, phrase))
            for model, cd in snap["cooldowns"].items():
                phrase = _REASONS.get(cd["reason"], cd["reason"])
                cooldowns.append(_cooldown(model, now, cd["remaining_s"], phrase))
            cooldowns.sort(key=lambda c: -c["remaining_s"])
            if not snap["enabled"]:
                state = "disabled"
            elif snap["breaker"] != "closed":
                state = "breaker_open"
            elif "auth" in snap["blocked"]:
                state = "auth_rest"
            elif cooldowns:
                state = "cooling"
            else:
                state = "up"
            if snap["breaker"] == "open":
                left = snap["blocked"].get("breaker", 0.0)
                cooldowns.insert(0, _cooldown("", now, left, _REASONS["breaker"]))
            out.append(
                {
                    "label": snap["name"],
                    "id": snap["id"],
                    "email": _mask_email(acc.email) if acc is not None else None,
                    "kind": snap["kind"],
                    "enabled": snap["enabled"],
                    "disabled_reason": snap["disabled_reason"],
                    "state": state,
                    "cooldowns": cooldowns,
                    "in_flight": snap["in_flight"],
                    "requests": snap["requests"],
                    "errors": snap["errors"],
                    "tokens_in": snap["tokens_in"],
                    "tokens_out": snap["tokens_out"],
                    "last_error": sync.last_error.get(snap["id"], "")
                    or (acc.last_error if acc is not None else ""),
                }
            )
        return out

    async def usage(self, req: Request) -> tuple[int, Any]:
        q = _query(req, ("range", "by"))
        rng = q.get("range", "today")
        by = q.get("by", "model")
        now = time.time()
        if rng == "today":
            since_s = now - math.floor(now / 86400.0) * 86400.0  # since 00:00 UTC
        elif rng == "7d":
            since_s = 7 * 86400.0
        else:
            raise BadRequest(f"range={rng[:32]!r}: expected today or 7d", code="bad_range")
        if by not in ("model", "account", "key"):
            raise BadRequest(f"by={by[:32]!r}: expected model, account or key", code="bad_by")
        st = self.gw.state
        rows: list[dict[str, Any]] = []
        if st is not None:
            try:
                buckets = await st.usage(by, None, since_s)
            except StateUnavailable as e:
                raise _unavailable(str(e)) from None
            for name, hours in buckets.items():
                rows.append(
                    {
                        "name": name,
                        "requests": sum(h.requests for h in hours),
                        "tokens_in": sum(h.tokens_in for h in hours),
                        "tokens_out": sum(h.tokens_out for h in hours),
                    }
                )
        rows.sort(key=lambda r: (-(r["tokens_in"] + r["tokens_out"]), -r["requests"], r["name"]))
        fleet = st is not None and st.backend == "redis"
        return 200, {"range": rng, "by": by, "fleet": fleet, "rows": rows}

    async def requests(self, req: Request) -> tuple[int, Any]:
        q = _query(req, ("limit", "before", "status", "model", "key", "account", "since"))
        try:
            limit = int(q.get("limit", REQUESTS_DEFAULT))
        except ValueError:
            raise BadRequest("limit: expected an integer", code="bad_limit") from None
        if not 1 <= limit <= REQUESTS_MAX:
            raise BadRequest(f"limit must be 1..{REQUESTS_MAX}", code="bad_limit")
        before: float | None = None
        if "before" in q:
            try:
                before = float(q["before"])
            except ValueError:
                raise BadRequest("before: expected a unix time", code="bad_before") from None
            if not math.isfinite(before):
                raise BadRequest("before: expected a unix time", code="bad_before")
        status = q.get("status")
        if status is not None:
            try:
                status_filter(status)
            except ValueError as e:
                raise BadRequest(str(e), code="bad_status") from None
        since = time.time() - _since(q["since"]) if "since" in q else None
        path = self.home / "requests.db"
        model, key, account = q.get("model"), q.get("key"), q.get("account")
        if account is not None:
            # Rows name the account as it is shown (label, email or id): accept any of them.
            try:
                account = self._find_account(account).display_name()
            except (NotFound, Conflict):
                pass  # an account removed since: its rows still carry the name given

        def read() -> list[dict[str, Any]]:
            if not path.exists():
                return []
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
            try:
                rows = query_rows(
                    conn, since_ts=since, before_ts=before, status=status, model=model, key=key,
                    account=account, limit=limit, newest_first=True,
                )  # fmt: skip
                return list(rows)
            finally:
                conn.close()

        try:
            rows = await anyio.to_thread.run_sync(read)
        except sqlite3.Error as e:
            raise ServiceUnavailable(
                f"the request log cannot be read: {e}", code="request_log_unavailable"
            ) from None
        for r in rows:
            r["attempts"] = [{"account": a, "status": s} for a, s in r["attempts"]]
        return 200, {"instance": self.instance, "rows": rows}

    async def config(self, req: Request) -> tuple[int, Any]:
        cfg = self.gw.cfg
        s, r, st, up = cfg.server, cfg.routing, cfg.state, cfg.upstream
        targets = {"default": r.default_model, "pro": r.pro_model, "lite": r.lite_model}
        models = {alias: targets[tier] for alias, tier in BUILTIN_ALIASES}
        models.update(r.custom_mapping)
        return 200, {
            "server": {
                "host": s.host or ("0.0.0.0" if s.allow_lan_access else "127.0.0.1"),
                "port": s.port,
                "workers": s.workers,
                "tls": bool(s.tls_cert),
                "allow_lan_access": s.allow_lan_access,
                "cors_allowed_origins": list(s.cors_allowed_origins),
                "allowed_hosts": list(s.allowed_hosts),
            },
            "routing": {
                "default_model": r.default_model,
                "pro_model": r.pro_model,
                "lite_model": r.lite_model,
                "embedding_model": r.embedding_model,
                "scheduling": r.scheduling,
                "max_attempts": r.max_attempts,
                "expose_account_header": r.expose_account_header,
                "retry_budget_ratio": r.retry_budget_ratio,
                "retry_budget_min": r.retry_budget_min,
                "retry_budget_window_s": r.retry_budget_window_s,
            },
            "limits": msgspec.structs.asdict(cfg.limits),
            "timeouts": msgspec.structs.asdict(cfg.timeouts),
            "upstream": {
                "gemini_base_url": _mask_url(up.gemini_base_url),
                "code_assist_base_url": _mask_url(up.code_assist_base_url),
                "http2": up.http2,
                "proxy": bool(up.proxy),  # the URL may carry credentials
                "emulated": self.emulated,
            },
            "state": {
                "backend": st.backend,
                "redis_url": _mask_url(st.redis_url) if st.backend == "redis" else None,
                "key_prefix": st.key_prefix,
                "limits_fail": st.limits_fail,
                "usage_days": st.usage_days,
            },
            "auth": {
                "mode": cfg.auth.mode,
                "effective_mode": self.app.effective_auth_mode(),
                "keys": len(cfg.auth.api_keys),
            },
            "admin": {
                "keys": len(cfg.admin.api_keys) or 1,
                "source": "config" if cfg.admin.api_keys else "admin_key file",
            },
            "log": {
                "format": cfg.log.format,
                "level": cfg.log.level,
                "access_log": cfg.log.access_log,
                "request_log": cfg.log.request_log,
                "request_log_days": cfg.log.request_log_days,
            },
            "models": models,
        }

    async def keys(self, req: Request) -> tuple[int, Any]:
        recs = await self._keys_call(lambda st: st.list_keys())
        return 200, {"keys": [key_view(r) for r in recs]}

    # ---- POST / DELETE -------------------------------------------------------------------------

    async def add_key(self, req: Request) -> tuple[int, Any]:
        doc = _body(req)
        allowed = {"name", "rpm", "tpm", "daily_tokens", "models"}
        extra = sorted(set(doc) - allowed)
        if extra:
            raise BadRequest(
                f"unknown field(s) {', '.join(extra)[:200]}; allowed: {', '.join(sorted(allowed))}",
                code="unknown_field",
            )
        name = doc.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise BadRequest(
                "name: expected 1-64 of A-Z a-z 0-9 _ . -", param="name", code="bad_name"
            )
        limits: dict[str, int] = {}
        for field in ("rpm", "tpm", "daily_tokens"):
            v = doc.get(field)
            if v is None:
                v = 0
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise BadRequest(
                    f"{field}: expected an integer >= 0 or null (no limit)", param=field,
                    code="bad_limit",
                )  # fmt: skip
            limits[field] = v
        models = doc.get("models")
        if models is None:
            models = []
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise BadRequest(
                "models: expected a list of model names or patterns (gemini-*)", param="models",
                code="bad_models",
            )  # fmt: skip
        rec, plain = await self._keys_call(lambda st: st.add_key(name, models=models, **limits))
        return 201, {**key_view(rec), "key": plain}

    async def set_account(self, req: Request, label: str, enable: bool) -> dict[str, Any]:
        doc = _body(req)
        reason = ""
        if not enable:
            raw = doc.get("reason", "disabled from the dashboard")
            if not isinstance(raw, str):
                raise BadRequest("reason: expected a string", param="reason", code="bad_reason")
            reason = one_line(raw, REASON_MAX_CHARS) or "disabled from the dashboard"
        acc = self._find_account(label)
        gw = self.gw
        sync = gw.sync
        # A new record, so the scheduler sees the transition (enabling clears its health).
        new = msgspec.structs.replace(acc, enabled=enable, disabled_reason=reason)
        sync.accounts[acc.id] = new
        gw.scheduler.set_accounts(list(sync.accounts.values()))
        sync.on_reload()
        await self._store_account(acc.id, enable, reason)
        now = time.time()
        return next(a for a in self.accounts_view(now, time.monotonic()) if a["id"] == acc.id)

    def _find_account(self, label: str) -> Account:
        accounts = list(self.gw.sync.accounts.values())
        for acc in accounts:
            if acc.id == label:
                return acc
        hits = [a for a in accounts if label in (a.display_name(), a.label, a.email)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise Conflict(
                f"{label[:100]!r} names {len(hits)} accounts; use the account id",
                code="ambiguous_account",
            )
        raise NotFound(f"no account {label[:100]!r}", code="account_not_found")

    async def _store_account(self, acc_id: str, enable: bool, reason: str) -> None:
        """accounts.json (what `serve` reads) in a thread; with Redis, the shared list too."""
        store = self.gw.store

        def apply(accounts: list[Account]) -> list[Account]:
            for a in accounts:
                if a.id == acc_id:
                    a.enabled = enable
                    a.disabled_reason = reason
            return accounts

        def write() -> None:
            if store.path.exists():
                store.update(apply)

        try:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(write)
                st = self.gw.state
                if st is not None and st.backend == "redis":
                    await st.update_accounts(apply)
        except (AccountStoreError, StateUnavailable, OSError) as e:
            raise _unavailable(
                f"applied in this process, but not stored: {one_line(str(e), 300)}"
            ) from None

    async def _keys_call(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        st = self.gw.state
        if st is None:
            raise _unavailable("client keys need the state store, which is not open")
        try:
            return await fn(st)
        except KeyStoreError as e:
            msg = str(e)
            if "exists" in msg:
                raise Conflict(msg, code="key_exists") from None
            if msg.startswith("no key named"):
                raise NotFound(msg, code="key_not_found") from None
            raise BadRequest(msg, code="bad_key") from None
        except StateUnavailable as e:
            raise _unavailable(str(e)) from None


def _cooldown(model: str, now: float, left: float, reason: str) -> dict[str, Any]:
    left = max(0.0, float(left))
    return {"model": model, "until": round(now + left, 3), "remaining_s": round(left, 3),
            "reason": reason}  # fmt: skip


def _unavailable(message: str) -> ServiceUnavailable:
    return ServiceUnavailable(message, code="state_unavailable")


def _not_allowed(path: str, allow: str) -> MethodNotAllowed:
    return MethodNotAllowed(
        f"{path[:200]} answers {allow} only.", headers=[(b"allow", allow.encode())]
    )


def _name(raw: str) -> str:
    try:
        name = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("the name in the path is not valid UTF-8") from None
    if not name:
        raise NotFound("missing name in the path")
    return name


def _query(req: Request, known: tuple[str, ...]) -> dict[str, str]:
    try:
        pairs = parse_qsl(req.query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the query string is not valid UTF-8", code="bad_query") from None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k not in known:
            raise BadRequest(
                f"unknown parameter {k[:40]!r}; known: {', '.join(known)}", code="bad_query"
            )
        if k in out:
            raise BadRequest(f"parameter {k!r} given twice", code="bad_query")
        out[k] = v
    return out


def _body(req: Request) -> dict[str, Any]:
    """The JSON object of a write's body; {} for none. application/json only (415)."""
    body = req.body
    if not body:
        return {}
    ct = req.header(b"content-type")
    media = (ct or b"").split(b";", 1)[0].strip(b" \t").lower()
    if media != b"application/json":
        raise UnsupportedMediaType(
            "a body must be JSON with 'Content-Type: application/json'"
        )
    if len(body) > BODY_MAX_BYTES:
        raise BadRequest(f"the body is over {BODY_MAX_BYTES} bytes", code="body_too_large")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    return doc
