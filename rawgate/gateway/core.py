"""The gateway: front protocols (gateway/front.py) wired to the account scheduler and the upstream
pool. The OpenAI routes are fronts (gateway/fronts/openai.py); nothing here knows their shapes.

Invariants:
- One request = decode -> resolve model -> (pick account -> upstream call) x attempts -> transcode.
  Every step but the upstream call is sans-IO and lives in its own module; this module only
  orchestrates and does the I/O.
- Retries happen only before the first byte went to the client, at most
  `scheduler.attempts_allowed()` (routing.max_attempts bounded by the enabled accounts); never
  after the client has gone (the driver cancels the handler). Only re-sends after a model call
  that went out and met a 5xx, a timeout or a connection failure spend the scheduler's retry
  budget: rotating off a 429, a refused credential, or an account that failed before its call
  left (token refresh refused or failing, Code Assist set-up) costs the upstream nothing. 4xx
  answers other than 401/403/429 are the request's fault and return at once. The client always
  learns the real cause: the error of the last attempt, never a 429 for a 5xx.
- At DEBUG, one line per attempt: request id, attempt number, account label, model, upstream
  status, error code, the block it set and the decision (answer, rotate, give_up + why). Never a
  key, token or upstream message (Google's can quote the request URL).
- Non-stream requests use the upstream's non-stream call; stream requests send the response head
  as soon as the upstream answered 200, then one downstream write per upstream read (every frame
  that read completed), with SSE comment heartbeats while the upstream is silent.
- Every proxied response, errors included, carries X-Mapped-Model once the model is known (a
  body that does not decode has none) and X-Account-Email once an account was picked (none for
  a 400 of the mapping, or a 503 with no usable account; never when
  routing.expose_account_header is off); the app layer adds x-request-id.
- The scheduler's bookkeeping (acquire/release) is balanced on every path, cancellation included;
  the upstream response is closed (shielded) on every path, which resets an abandoned h2 stream.
- Blocking file I/O (accounts.json writes, the cooldown board) runs in a worker thread, never on
  the event loop; per-request counters are batched and written every STATS_FLUSH_S.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode

import anyio
import orjson

from rawgate import __version__
from rawgate.accounts.cooldowns import CooldownBoard
from rawgate.accounts.oauth import AccountRevoked, TokenManager
from rawgate.accounts.scheduler import AccountsFailing, Cooldown, FailureKind, Scheduler
from rawgate.accounts.store import Account, AccountStore
from rawgate.errors import (
    AccountsAuthResting,
    AuthenticationError,
    HTTPVersionNotSupported,
    InsufficientQuota,
    InternalError,
    MethodNotImplemented,
    ModelFailed,
    NotFound,
    PermissionDenied,
    RateLimited,
    RawgateError,
    RequestTimeout,
    ServiceUnavailable,
    UpstreamAuthFailed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejectedInAnswer,
    UpstreamRequestTimeout,
    try_again_message,
)
from rawgate.gateway.fronts.openai import ChatFront, CompletionsFront, ResponsesFront
from rawgate.logs import safe_text
from rawgate.model_router import ModelRouter
from rawgate.state.response_store import ResponseStore
from rawgate.translate import mapping
from rawgate.translate.contract import random_id, wall_clock
from rawgate.translate.gemini import decode_reply, error_from_upstream
from rawgate.translate.sse import SSEDecoder
from rawgate.upstream.client import UpstreamClient, UpstreamResponse

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

    from rawgate.config import Config
    from rawgate.gateway.front import Front
    from rawgate.http.app import GatewayApp
    from rawgate.seam import AccessRecord, Request, ResponseSink
    from rawgate.translate.call import GeminiCall
    from rawgate.translate.contract import Clock, IdFactory

__all__ = ["Gateway"]

log = logging.getLogger("rawgate.gateway.core")

# A stream cut by the server's shutdown (its grace ran out) ends with this error event; writing
# it may take at most CUT_NOTICE_S seconds (a client that reads nothing must not hold shutdown).
CUT_NOTICE_S = 0.5
_CUT = ServiceUnavailable(
    "rawgate is shutting down and cut this answer before it finished; send the request again",
    code="server_shutting_down",
)

Header = tuple[bytes, bytes]
Route = Callable[["Request", "ResponseSink"], Awaitable[None]]

_JSON: Header = (b"content-type", b"application/json")
_SSE_HEAD: tuple[Header, ...] = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # nginx (and proxies copying it) buffer responses unless told otherwise.
    (b"x-accel-buffering", b"no"),
)
_UPSTREAM_JSON: Header = (b"content-type", b"application/json")
_USER_AGENT: Header = (b"user-agent", f"rawgate/{__version__}".encode())
_FORM: Header = (b"content-type", b"application/x-www-form-urlencoded")
# Upstream model listings change rarely; one fetch per 10 minutes keeps /v1/models cheap.
MODELS_CACHE_S = 600.0
# A model listing that does not answer within this is skipped (the fallback list is used).
MODELS_FETCH_TIMEOUT_S = 10.0
# How often the running server stats accounts.json for changes made by `rawgate accounts`
# (one stat() call: ~2 us).
ACCOUNTS_POLL_S = 1.0
# How often per-account counters are written back (batched: never one write per request).
STATS_FLUSH_S = 10.0
# How often a worker of `serve --workers N` exchanges cooldowns with the others (cooldowns.py).
COOLDOWN_SYNC_S = 0.25
# Bound of the X-Account-Email cache (one entry per account display name; cleared when full).
ACCOUNT_HEADER_CACHE = 1024
# Upstream error bodies are short JSON; a proxy's HTML page is not. Read at most this much.
ERROR_BODY_MAX_BYTES = 64 * 1024
# Listed when no account can list models (Code Assist accounts only, or the listing failed).
FALLBACK_MODELS = (
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
    "gemini-3-pro-preview",
    "gemini-3-flash-preview",
)


class Gateway:
    """Owns the long-lived parts: account store + scheduler, token manager, upstream pool.

    Use as `async with Gateway(cfg, home=...) as gw: gw.install(app)`; the context runs the
    upstream client and the background tasks (hot reload, stats, shared cooldowns).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        home: Path,
        client: UpstreamClient | None = None,
        demo_accounts: list[Account] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        share_cooldowns: bool = False,
    ) -> None:
        self.cfg = cfg
        self.home = home
        self.store = AccountStore(home / "accounts.json")
        self.client = client or UpstreamClient(cfg.upstream, cfg.timeouts, ssl_context=ssl_context)
        self._own_client = client is None
        r = cfg.routing
        self.scheduler = Scheduler(
            r.scheduling,
            max_attempts=r.max_attempts,
            retry_budget_ratio=r.retry_budget_ratio,
            retry_budget_min=r.retry_budget_min,
            retry_budget_window_s=r.retry_budget_window_s,
        )
        up = cfg.upstream
        self.tokens = TokenManager(
            up.oauth_token_url,
            up.oauth_client_id,
            up.oauth_client_secret,
            self._post_form,
            on_refresh_token=self._on_refresh_token,
        )
        lim = cfg.limits
        self.responses = ResponseStore(
            lim.response_store_max_count,
            lim.response_store_max_age_s,
            lim.response_store_max_bytes,
        )
        self.tool_schemas = mapping.ToolSchemas(
            lim.tool_schema_cache_max_bytes, lim.tool_schema_max_work
        )
        self.board = CooldownBoard(home / "cooldowns.json") if share_cooldowns else None
        self._gemini_base = up.gemini_base_url.rstrip("/") + "/v1beta/models/"
        self._ca_base = up.code_assist_base_url.rstrip("/") + "/v1internal:"
        # X-Account-Email values by display name: percent-escaping it is ~3 us per request.
        self._account_headers: dict[str, Header] = {}
        # The clock and the id factory every reply is built with (tests pin them).
        self.clock: Clock = wall_clock
        self.ids: IdFactory = random_id
        self.reconfigure(cfg)
        self._demo = list(demo_accounts or [])
        self._accounts: dict[str, Account] = {}
        self._in_flight = 0
        self._models_cache: tuple[float, list[str]] | None = None
        self._dirty_stats: dict[str, list[Any]] = {}
        self._tg: Any = None
        self.reload_accounts()

    def reconfigure(self, cfg: Config) -> None:
        """Apply the model mapping, the routing knobs and the per-request limits of `cfg` (at
        start and on a SIGHUP reload). The next request sees them; a request in flight keeps
        the router and limits it started with. The upstream pool, the token manager and the
        response store are built once (their settings need a restart: config.RESTART_SETTINGS)."""
        r = cfg.routing
        self.cfg = cfg
        self.router = ModelRouter(
            r.default_model,
            dict(r.custom_mapping),
            pro_model=r.pro_model,
            lite_model=r.lite_model,
        )
        s = self.scheduler
        s.mode = r.scheduling
        s.max_attempts = max(1, r.max_attempts)
        s.retry_budget_ratio = r.retry_budget_ratio
        s.retry_budget_min = max(0, r.retry_budget_min)
        s.retry_budget_window_s = r.retry_budget_window_s
        self._expose_account = r.expose_account_header
        # Read by the fronts at each request (gateway/fronts/): only sticky scheduling reads the
        # conversation key, the others skip hashing it.
        self.sticky = r.scheduling == "sticky"
        self.max_depth = cfg.limits.max_json_depth
        self.inline_work = cfg.limits.tool_schema_inline_work
        self._heartbeat_s = cfg.limits.sse_heartbeat_s
        self._max_event_bytes = cfg.limits.upstream_max_event_bytes

    # ---- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Gateway:
        if self._own_client:
            await self.client.__aenter__()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._watch_accounts)
        if self.board is not None:
            self._tg.start_soon(self._sync_cooldowns)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
                await self._tg.__aexit__(None, None, None)
                self._tg = None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._flush_stats)
        finally:
            # Not under a shield scope: the client's task group scope must be the current one.
            if self._own_client:
                await self.client.__aexit__(None, None, None)

    def install(self, app: GatewayApp) -> None:
        """Register the OpenAI routes on the app's router."""
        responses = ResponsesFront(self)
        self.add_front(app, "/v1/chat/completions", ChatFront(self))
        self.add_front(app, "/v1/completions", CompletionsFront(self))
        self.add_front(app, "/v1/responses", responses)
        self.add_front(app, "/responses", responses)
        add = app.router.add
        add("GET", "/v1/models", self.models)
        add("GET", "/v1/models/", self.model, prefix=True, label="/v1/models/{id}")

    def add_front(
        self, app: GatewayApp, path: str, front: Front, *, method: str = "POST", **route: Any
    ) -> None:
        """Serve `front` (gateway/front.py) on `path`: decode, then attempts with rotation and
        retries, the stream pump and the accounting, whatever the protocol. `route`: the
        router's keywords (query_key, prefix, label, ...)."""
        app.router.add(method, path, self.handler(front), **route)

    def handler(self, front: Front) -> Route:
        """The route handler of one front."""

        async def run(req: Request, sink: ResponseSink) -> None:
            call = await front.decode(req, req.access)
            await self._proxy(req, sink, front, call)

        return self._honest(run, front)

    # ---- accounts -----------------------------------------------------------------------------

    def reload_accounts(self) -> None:
        """Load accounts.json (or the demo accounts while it holds none) into the scheduler.
        Raises AccountStoreError for a corrupt file (start-up stops; a reload keeps the old set)."""
        accounts = self.store.load()
        if not accounts and self._demo:
            accounts = list(self._demo)
        self._accounts = {a.id: a for a in accounts}
        self.scheduler.set_accounts(accounts)

    @property
    def accounts(self) -> list[Account]:
        return list(self._accounts.values())

    async def _watch_accounts(self) -> None:
        """Hot reload of accounts.json and batched stats flushes; runs until cancelled."""
        last_flush = time.monotonic()
        while True:
            await anyio.sleep(ACCOUNTS_POLL_S)
            try:
                if self.store.changed():
                    self.reload_accounts()
                    self._models_cache = None
                    log.info("accounts reloaded: %d account(s)", len(self._accounts))
                now = time.monotonic()
                if self._dirty_stats and now - last_flush >= STATS_FLUSH_S:
                    last_flush = now
                    await anyio.to_thread.run_sync(self._flush_stats)
            except Exception:  # a bad file must not kill the server: keep the last good state
                log.exception("accounts reload failed; keeping the previous accounts")

    async def _sync_cooldowns(self) -> None:
        board = self.board
        assert board is not None
        while True:
            await anyio.sleep(COOLDOWN_SYNC_S)
            try:
                # The scheduler is only touched on the loop: the thread does the file I/O.
                if self.scheduler.cooldowns_dirty:
                    mono, wall = time.monotonic(), time.time()
                    local = self.scheduler.export_cooldowns(mono)
                    self.scheduler.cooldowns_dirty = False
                    await anyio.to_thread.run_sync(board.publish, _to_wall(local, mono, wall), wall)
                wall = time.time()
                remote = await anyio.to_thread.run_sync(board.poll, wall)
                if remote:
                    mono = time.monotonic()
                    self.scheduler.import_cooldowns(_to_mono(remote, mono, time.time()), mono)
            except Exception:
                log.exception("cooldown sync failed")

    def _count(self, acc: Account, tokens_in: int, tokens_out: int, error: str | None) -> None:
        d = self._dirty_stats.get(acc.id)
        if d is None:
            d = self._dirty_stats[acc.id] = [0, 0, 0, 0, None]
        d[0] += 1
        d[1] += tokens_in
        d[2] += tokens_out
        if error is not None:
            d[3] += 1
            d[4] = error

    def _flush_stats(self) -> None:
        dirty, self._dirty_stats = self._dirty_stats, {}
        if not dirty or not self.store.path.exists():
            return

        def apply(accounts: list[Account]) -> list[Account]:
            for a in accounts:
                d = dirty.get(a.id)
                if d is not None:
                    a.add_stats(d[0], d[1], d[2], d[3], d[4])
            return accounts

        try:
            self.store.update(apply)
            self.store.changed()  # our own write is not a change to reload
        except Exception:
            log.exception("writing account counters failed")

    async def _persist(self, acc_id: str, **fields: Any) -> None:
        """Set fields of one stored account (in a thread: lock + fsync take milliseconds)."""

        def apply(accounts: list[Account]) -> list[Account]:
            for a in accounts:
                if a.id == acc_id:
                    for k, v in fields.items():
                        setattr(a, k, v)
            return accounts

        def run() -> None:
            if self.store.path.exists():
                self.store.update(apply)

        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(run)
            except Exception:
                log.exception("updating account %s in accounts.json failed", acc_id)

    async def _disable(self, acc: Account, reason: str) -> None:
        acc.enabled = False
        acc.disabled_reason = reason
        self.scheduler.set_accounts(list(self._accounts.values()))
        log.warning("account %s disabled: %s", acc.display_name(), reason)
        await self._persist(acc.id, enabled=False, disabled_reason=reason)

    def _on_refresh_token(self, acc: Account, new_token: str) -> None:
        if self._tg is not None:
            self._tg.start_soon(self._persist_refresh, acc.id, new_token)

    async def _persist_refresh(self, acc_id: str, new_token: str) -> None:
        await self._persist(acc_id, refresh_token=new_token)

    # ---- routes -------------------------------------------------------------------------------

    def _honest(self, route: Route, front: Front) -> Route:
        """`route` with its errors told as what they are: a refused upstream credential is the
        account's failure (upstream_auth_failed naming the account labels), never the client's
        401; a 400 of the mapping names the model it was mapped to. A front with its own error
        shape writes the error itself; the others leave it to the app. Costs nothing until a
        route raises."""

        async def honest(req: Request, sink: ResponseSink) -> None:
            try:
                await self._told(route, req, sink)
            except RawgateError as e:
                shaped = None if sink.started else front.error(e)
                if shaped is None:
                    raise
                status, headers, body = shaped
                await sink.respond(status, [*headers, *e.headers], body)

        return honest

    async def _told(self, route: Route, req: Request, sink: ResponseSink) -> None:
        """Run `route`, its errors made truthful (see _honest)."""
        try:
            await route(req, sink)
        except AccountsFailing as e:
            # Every account rests; when a refused credential rests them all, say so.
            raise self._resting_cause(e, time.monotonic()) from None
        except RateLimited as e:
            # rawgate's own "all cooling" 429 in one "Please try again in Ns." sentence,
            # as the upstream's (gemini.py) already is.
            wait = e.retry_after_s
            if wait is not None and wait > 0 and not isinstance(e, InsufficientQuota):
                e.message = try_again_message(e.message, wait)
            raise
        except UpstreamAuthFailed as e:
            # The last attempt's credential was refused (and every earlier one's, or the
            # request would have ended otherwise): name the accounts resting for it now.
            names = self._auth_resting(time.monotonic()) or ["the account tried"]
            e.message = _rejected_message(names, e)
            raise
        except RawgateError as e:
            mapped = req.access.mapped_model
            if mapped and not any(k == b"x-mapped-model" for k, _ in e.headers):
                e.headers.extend(self._headers(req, None))  # raised before _proxy
            raise

    async def models(self, req: Request, sink: ResponseSink) -> None:
        data = self.router.list_models(await self._upstream_models())
        await sink.respond(200, [_JSON], orjson.dumps({"object": "list", "data": data}))

    async def model(self, req: Request, sink: ResponseSink) -> None:
        wanted = unquote(req.path[len("/v1/models/") :])
        for m in self.router.list_models(await self._upstream_models()):
            if m["id"] == wanted:
                await sink.respond(200, [_JSON], orjson.dumps(m))
                return
        raise NotFound(
            f"The model '{wanted}' does not exist", param="model", code="model_not_found"
        )

    # ---- the data path ------------------------------------------------------------------------

    def resolve(self, access: AccessRecord, name: str) -> str:
        """The Gemini model for the client's model `name` (recorded for the access log)."""
        access.model = name
        access.mapped_model = mapped = self.router.resolve(name)
        return mapped

    def _headers(self, req: Request, acc: Account | None) -> list[Header]:
        h: list[Header] = []
        mapped = req.access.mapped_model
        if mapped:
            h.append((b"x-mapped-model", mapped.encode()))
        if acc is not None and self._expose_account:
            name = acc.display_name()
            value = self._account_headers.get(name)
            if value is None:
                if len(self._account_headers) >= ACCOUNT_HEADER_CACHE:
                    self._account_headers.clear()
                value = self._account_headers[name] = (b"x-account-email", _header_text(name))
            h.append(value)
        return h

    async def _proxy(
        self, req: Request, sink: ResponseSink, front: Front, call: GeminiCall
    ) -> None:
        """Attempts with rotation; the first usable answer goes to the client."""
        sched = self.scheduler
        model = call.model
        debug = log.isEnabledFor(logging.DEBUG)
        try:
            acc = sched.pick(model, time.monotonic(), key=call.conversation_key)
        except RawgateError as e:
            if debug:
                log.debug(
                    "rid=%s model=%s no account: %s (retry after %.2f s)",
                    req.request_id, safe_text(model), e.code, e.retry_after_s or 0.0,
                )  # fmt: skip
            e.headers.extend(self._headers(req, None))
            raise
        tried = {acc.id}
        attempts = sched.attempts_allowed()
        attempt = 0
        while True:
            attempt += 1
            req.access.account = acc.display_name()
            tr = _Try()
            try:
                await self._attempt(req, sink, front, call, acc, tr)
            except RawgateError as e:
                nxt: Account | None = None
                if sink.started:
                    why = "after_first_byte"
                elif not _retryable(e):
                    why = "not_retryable"
                elif attempt >= attempts:
                    why = "max_attempts"
                elif (
                    tr.sent
                    and _charges_budget(e)
                    and not sched.may_retry(self._in_flight, time.monotonic())
                ):
                    why = "retry_budget"
                else:
                    try:
                        nxt = sched.pick(
                            model, time.monotonic(), exclude=tried, key=call.conversation_key
                        )
                        why = ""
                    except RawgateError as pe:
                        # Nothing left to rotate to: the last upstream error is the truthful
                        # cause, not the scheduler's "all cooling".
                        why = f"no_account:{pe.code}"
                if debug:
                    self._log_attempt(req, attempt, attempts, acc, model, tr, e, why)
                if nxt is None:
                    if not sink.started:
                        e.headers.extend(self._headers(req, acc))
                    raise
                acc = nxt
                tried.add(acc.id)
                continue
            if debug:
                self._log_attempt(req, attempt, attempts, acc, model, tr, tr.error, "")
            return

    @staticmethod
    def _log_attempt(
        req: Request,
        attempt: int,
        attempts: int,
        acc: Account,
        model: str,
        tr: _Try,
        err: RawgateError | None,
        why: str,
    ) -> None:
        """The attempt log line (DEBUG). Labels and codes only: never a secret or a message."""
        if err is None or tr.answered:
            decision = "answer"
        elif why:
            decision = "give_up:" + why
        else:
            decision = "rotate"
        block = ""
        if tr.block is not None:
            left = max(0.0, tr.block.until - time.monotonic())
            scope = safe_text(tr.block.model) if tr.block.model else "*"
            block = f" cooldown={tr.block.reason}:{left:.2f}s:{scope}"
        log.debug(
            "rid=%s attempt %d/%d account=%s model=%s status=%s error=%s%s decision=%s",
            req.request_id, attempt, attempts, safe_text(acc.display_name()), safe_text(model),
            tr.status or "-", (err.code or err.type) if err is not None else "-",
            block, decision,
        )  # fmt: skip

    async def _attempt(
        self,
        req: Request,
        sink: ResponseSink,
        front: Front,
        call: GeminiCall,
        acc: Account,
        tr: _Try,
    ) -> None:
        """One upstream call on one account; raises a RawgateError when it failed. `tr` learns
        the upstream status and the block the failure set (for the attempt log)."""
        sched = self.scheduler
        sched.acquire(acc)
        self._in_flight += 1
        resp: UpstreamResponse | None = None
        read_all = False  # a non-stream answer was read to its end and sent
        try:
            try:
                url, headers, body = await self._upstream_request(acc, call)
                tr.sent = True
                resp = await self.client.request("POST", url, headers, body)
                tr.status = resp.status
                if resp.status == 401 and acc.kind == "oauth":
                    # An access token can die before its expiry (revoked, clock skew): get a
                    # fresh one and try this account once more before blaming it.
                    await resp.aclose()
                    resp = None
                    self.tokens.invalidate_if(acc, _bearer_of(headers))
                    url, headers, body = await self._upstream_request(acc, call)
                    resp = await self.client.request("POST", url, headers, body)
                    tr.status = resp.status
                if resp.status != 200:
                    raw = await resp.read(ERROR_BODY_MAX_BYTES)
                    raise error_from_upstream(resp.status, raw, resp.headers)
                if not call.stream:
                    reply = decode_reply(await resp.read())
            except AccountRevoked as e:
                await self._disable(acc, e.reason)
                self._count(acc, 0, 0, e.message)
                raise
            except RawgateError as e:
                tr.block = self._failed(acc, call.model, e)
                raise
            head = self._headers(req, acc)
            if call.stream:
                await self._stream(sink, front, call, resp, head, acc, tr)
                return
            try:
                answer = front.render(call, reply, self.clock, self.ids)
            except RawgateError as e:
                # An unusable answer (MALFORMED_FUNCTION_CALL ...) is the model's failure, not
                # the account's: no cooldown, but the next attempt may go elsewhere.
                self._count(acc, 0, 0, e.message)
                raise
            await sink.respond(200, [_JSON, *head], answer.body)
            tin, tout = answer.usage
            sched.report_success(acc, call.model, time.monotonic(), tin, tout)
            self._count(acc, tin, tout, None)
            if answer.stored is not None:
                self.responses.put(*answer.stored)
            read_all = True
        finally:
            self._in_flight -= 1
            sched.release(acc)
            if resp is not None:
                if read_all:
                    # Closing a fully read response is bookkeeping that never waits (the
                    # client's aclose is cancellation-safe); a shield scope costs ~6 us.
                    await resp.aclose()
                else:
                    with anyio.CancelScope(shield=True):
                        await resp.aclose()

    def _failed(self, acc: Account, model: str, err: RawgateError) -> Cooldown | None:
        """Teach the scheduler what this failure says about the account; the block it set."""
        kind = _failure_kind(err)
        block = None
        if kind is not None:
            if kind == "auth" and acc.kind == "oauth":
                self.tokens.invalidate(acc)
            block = self.scheduler.report_failure(
                acc, model, time.monotonic(), kind, err.retry_after_s
            )
        self._count(acc, 0, 0, err.message)
        return block

    def _account_name(self, acc: Account) -> str:
        """How an error message names an account: its label (email or label), or only its id
        when routing.expose_account_header is off (a shared deployment hides who served)."""
        return f"'{acc.display_name()}'" if self._expose_account else f"id {acc.id}"

    def _auth_resting(self, now: float, only: bool = False) -> list[str]:
        """Names of the enabled accounts resting because Google refused their credential (a
        failure path only: O(accounts)). `only`: [] unless every enabled account rests so."""
        names: list[str] = []
        for st in self.scheduler.snapshot(now):
            if not st["enabled"]:
                continue
            if "auth" not in st["blocked"]:
                if only:
                    return []
                continue
            acc = self._accounts.get(st["id"])
            names.append(self._account_name(acc) if acc is not None else f"id {st['id']}")
        return names

    def _resting_cause(self, err: AccountsFailing, now: float) -> RawgateError:
        """The scheduler's "every account is resting" 503, told truthfully when what rests them
        all is Google refusing their credentials: upstream_auth_failed naming them."""
        names = self._auth_resting(now, only=True)
        if not names:
            return err
        secs = max(1, math.ceil(err.retry_after_s or 0))
        return AccountsAuthResting(
            f"No upstream account is usable: Google rejected the credential of {_names(names)}, "
            f"which rawgate rests (the first is tried again in {secs} s). This is rawgate's key "
            "to Google, not your key to rawgate: fix or replace it (`rawgate accounts list` "
            "shows the last error), or add an account.",
            headers=list(err.headers),
            retry_after_s=err.retry_after_s,
        )

    async def _upstream_request(
        self, acc: Account, call: GeminiCall
    ) -> tuple[str, list[Header], bytes]:
        if acc.kind == "api_key":
            method = ":streamGenerateContent?alt=sse" if call.stream else ":generateContent"
            headers = [_UPSTREAM_JSON, _USER_AGENT, (b"x-goog-api-key", acc.api_key.encode())]
            # The model is one escaped path segment (router.resolve already allows only
            # [A-Za-z0-9._-]; quoting keeps that true should a future caller skip it).
            url = self._gemini_base + quote(call.model, safe="") + method
            return url, headers, mapping.gemini_body(call)
        token = await self.tokens.access_token(acc, time.time())
        known = acc.project
        project = await self.tokens.project_for(acc, token, self._post_json_ca)
        if not known and self._tg is not None:  # discovered just now: store it once
            self._tg.start_soon(self._persist_project, acc.id, project)
        method = "streamGenerateContent?alt=sse" if call.stream else "generateContent"
        headers = [_UPSTREAM_JSON, _USER_AGENT, (b"authorization", b"Bearer " + token.encode())]
        body = mapping.code_assist_body(call, project, uuid.uuid4().hex)
        return self._ca_base + method, headers, body

    async def _persist_project(self, acc_id: str, project: str) -> None:
        await self._persist(acc_id, project=project)

    async def _stream(
        self,
        sink: ResponseSink,
        front: Front,
        call: GeminiCall,
        resp: UpstreamResponse,
        head: list[Header],
        acc: Account,
        tr: _Try,
    ) -> None:
        """Pump upstream SSE events to the client, one write per upstream read. A failure after
        the head went out is reported to the scheduler here and recorded in `tr` (the client
        already has its answer: an error event)."""
        decoder = SSEDecoder(self._max_event_bytes)
        tx = front.stream(call, self.clock, self.ids)
        feed, finish, fail = tx.feed, tx.finish, tx.fail
        heartbeat = tx.heartbeat
        first = tx.start()
        await sink.start(200, [*_SSE_HEAD, *head])
        if first:
            await sink.send(first)
        upstream_error: RawgateError | None = None
        # (3) The heartbeat is the upstream read's own quiet timeout, not a task beside the
        # pump: no task group, task, lock or sleep timer per stream (those cost ~5 % of a
        # 100-chunk stream's CPU), and a single writer needs no lock. The wait counts from the
        # last downstream write, so upstream data that made no frame does not put it off.
        beat = self._heartbeat_s if self._heartbeat_s > 0 else None
        last = time.monotonic()  # the last downstream write
        receive = resp.receive_within
        send = sink.send
        sse = decoder.feed
        out: list[bytes] = []
        flushed = False  # the first event went out
        try:
            while True:
                if beat is None:
                    chunk = await receive(None)
                else:
                    chunk = await receive(last + beat - time.monotonic())
                    if chunk is None:  # nothing went to the client for `beat` seconds
                        await send(heartbeat)
                        last = time.monotonic()
                        continue
                if not chunk:
                    break
                ps = sse(chunk)
                if not flushed and ps:
                    # (5) The first event leaves on its own: a read holding a whole burst
                    # (100 events, ~0.45 ms to transcode) must not delay the first byte.
                    out.append(feed(decode_reply(ps[0])))
                    data = b"".join(out)
                    out.clear()
                    if data:
                        await send(data)
                        last = time.monotonic()
                        flushed = True
                    del ps[0]
                for p in ps:
                    out.append(feed(decode_reply(p)))  # noqa: PERF401 (keep partials)
                if out:
                    data = b"".join(out)
                    out.clear()
                    if data:
                        await send(data)  # one write per upstream read
                        last = time.monotonic()
            for p in decoder.close():
                out.append(feed(decode_reply(p)))  # noqa: PERF401
            out.append(finish())
        except RawgateError as e:
            # Frames already made from this read go out before the error event.
            upstream_error = e
            out.append(fail(e))
        except anyio.get_cancelled_exc_class():
            # Cut from outside: the shutdown grace ran out (or the client left). A client that
            # is still there gets an error event it can see instead of a stream that just
            # stops (on HTTP/2 the driver's RST_STREAM follows); bounded and shielded, so the
            # cancellation goes on at once after it.
            with anyio.CancelScope(shield=True), anyio.move_on_after(CUT_NOTICE_S):
                try:
                    await sink.end(b"".join(out) + fail(_CUT))
                except Exception:  # the client may be gone: nothing to tell
                    pass
            raise
        await sink.end(b"".join(out))
        now = time.monotonic()
        tin, tout = tx.usage
        if upstream_error is not None:
            kind = _failure_kind(upstream_error)
            if kind is not None:
                tr.block = self.scheduler.report_failure(
                    acc, call.model, now, kind, upstream_error.retry_after_s
                )
            self._count(acc, tin, tout, upstream_error.message)
            tr.answered = True
            tr.error = upstream_error
            return
        self.scheduler.report_success(acc, call.model, now, tin, tout)
        self._count(acc, tin, tout, None)
        stored = tx.stored
        if stored is not None:
            self.responses.put(*stored)

    # ---- small upstream helpers (OAuth, Code Assist set-up, model listing) ------------------

    async def _post_form(self, url: str, fields: dict[str, str]) -> tuple[int, bytes]:
        body = urlencode(fields).encode()
        resp = await self.client.request("POST", url, [_FORM, _USER_AGENT], body)
        async with resp:
            return resp.status, await resp.read(ERROR_BODY_MAX_BYTES)

    async def _post_json_ca(self, method: str, token: str, payload: dict[str, Any]) -> bytes:
        headers = [_UPSTREAM_JSON, _USER_AGENT, (b"authorization", b"Bearer " + token.encode())]
        resp = await self.client.request(
            "POST", self._ca_base + method, headers, orjson.dumps(payload)
        )
        async with resp:
            raw = await resp.read(ERROR_BODY_MAX_BYTES)
            if resp.status != 200:
                raise error_from_upstream(resp.status, raw, resp.headers)
            return raw

    async def _upstream_models(self) -> list[str]:
        now = time.monotonic()
        cache = self._models_cache
        if cache is not None and now - cache[0] < MODELS_CACHE_S:
            return cache[1]
        names: list[str] = []
        url = self._gemini_base.rstrip("/") + "?pageSize=1000"
        for acc in self._accounts.values():
            if acc.kind != "api_key" or not acc.enabled:
                continue
            try:
                with anyio.fail_after(MODELS_FETCH_TIMEOUT_S):
                    headers = [_USER_AGENT, (b"x-goog-api-key", acc.api_key.encode())]
                    resp = await self.client.request("GET", url, headers)
                    async with resp:
                        raw = await resp.read()
                        ok = resp.status == 200
            except (RawgateError, TimeoutError):
                continue
            if ok:
                names = _model_names(raw)
                if names:
                    break
        if not names:
            names = list(FALLBACK_MODELS)
        self._models_cache = (now, names)
        return names


class _Try:
    """What one attempt learned, for the DEBUG attempt log (never a secret)."""

    __slots__ = ("answered", "block", "error", "sent", "status")

    def __init__(self) -> None:
        # The model call went out (or tried to connect). False: the account failed before it
        # (token refresh, Code Assist set-up), so moving on re-sends nothing to the upstream.
        self.sent = False
        self.status = 0  # the upstream's HTTP status; 0: no answer (connect error, refused token)
        self.block: Cooldown | None = None  # the block the failure set on the account
        self.answered = False  # a stream went out and then failed: the client has its answer
        self.error: RawgateError | None = None  # that stream's failure


def _charges_budget(err: RawgateError) -> bool:
    """Whether retrying after `err` (from a model call that went out) spends the retry budget:
    re-sending after a 5xx, a timeout or a connection failure may pile work on a failing
    upstream. Rotating off an account the upstream rate-limited or whose credentials it refused
    costs the upstream nothing, and so does a dead refresh token (AccountRevoked, also when a
    401 made rawgate refresh mid-attempt). A call that never went out is free too (_Try.sent)."""
    if isinstance(err, AccountRevoked):
        return False
    return _failure_kind(err) not in ("rate_limited", "auth")


def _retryable(err: RawgateError) -> bool:
    """Worth another account: rate limits, auth trouble of this account, timeouts, upstream and
    server failures (errors.py's classes; never decided by status number)."""
    return isinstance(err, _RETRYABLE)


def _names(names: list[str]) -> str:
    return ("account " if len(names) == 1 else "accounts ") + ", ".join(names)


def _rejected_message(names: list[str], err: UpstreamAuthFailed) -> str:
    return (
        f"Google rejected the credential of upstream {_names(names)} ({err.reason}): "
        f"{err.upstream_message} This is rawgate's key to Google, not your key to rawgate: fix "
        "or replace it (`rawgate accounts list`)."
    )


def _failure_kind(err: RawgateError) -> FailureKind | None:
    """What `err` says about the account that got it; None: nothing (the request's fault, or
    the model's, such as a stream that ends in MALFORMED_FUNCTION_CALL)."""
    if isinstance(err, ModelFailed | UpstreamRejectedInAnswer):
        return None
    if isinstance(err, UpstreamAuthFailed | AuthenticationError | PermissionDenied):
        return "auth"
    if isinstance(err, RateLimited | UpstreamRateLimited):
        return "rate_limited"
    if isinstance(err, UpstreamConnectError | UpstreamConnectTimeout):
        return "connect"
    if isinstance(err, _SERVER_FAULTS):
        return "server"
    return None


# The failures that are the server side's (5xx by class), and the ones worth another account.
_SERVER_FAULTS = (
    UpstreamError,
    InternalError,
    ServiceUnavailable,
    MethodNotImplemented,
    HTTPVersionNotSupported,
)
_RETRYABLE = (
    *_SERVER_FAULTS,
    AuthenticationError,
    PermissionDenied,
    RequestTimeout,
    UpstreamRequestTimeout,
    RateLimited,
)


def _bearer_of(headers: list[Header]) -> str:
    for k, v in headers:
        if k == b"authorization":
            return v.removeprefix(b"Bearer ").decode("ascii", "replace")
    return ""


def _header_text(text: str) -> bytes:
    """A header value from a label: printable ASCII kept, anything else percent-escaped."""
    return "".join(
        ch if " " <= ch <= "~" else "".join(f"%{b:02X}" for b in ch.encode()) for ch in text
    ).encode("ascii")


def _model_names(raw: bytes) -> list[str]:
    try:
        doc = orjson.loads(raw)
        out: list[str] = []
        for m in doc.get("models", []):
            methods = m.get("supportedGenerationMethods")
            if methods and "generateContent" not in methods:
                continue
            out.append(str(m["name"]).removeprefix("models/"))
        return out
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return []


# cooldowns.sync_cooldowns does both halves in one call; the gateway splits it so that the
# scheduler is only touched on the event loop while the file I/O runs in a thread.
def _to_wall(entries: list[Cooldown], mono: float, wall: float) -> list[Cooldown]:
    off = wall - mono
    return [Cooldown(c.account, c.model, c.until + off, c.reason) for c in entries]


def _to_mono(entries: list[Cooldown], mono: float, wall: float) -> list[Cooldown]:
    off = wall - mono
    return [Cooldown(c.account, c.model, c.until - off, c.reason) for c in entries]
