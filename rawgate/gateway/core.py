"""The gateway: front protocols (gateway/front.py) wired to the account scheduler and the upstream
pool. The OpenAI routes are fronts (gateway/fronts/openai.py); nothing here knows their shapes.

Where the parts live:
- this module: the Gateway (lifecycle, the routes, configuration reloads) and the truthful
  rewording of errors (a refused upstream credential is the account's failure, never the
  client's 401);
- attempts.py: the attempt loop (rotation, retries, retry budget, the stream pump) and the
  classification of failures;
- account_sync.py: accounts hot reload, batched counters, stored account changes, shared
  cooldowns;
- models.py: the cached model listing behind /v1/models.

Invariants:
- One request = front.decode -> resolve model -> (pick account -> upstream call) x attempts ->
  front.render / front.stream. Every step but the upstream call is sans-IO and lives in its own
  module; the gateway only orchestrates and does the I/O.
- Every proxied response, errors included, carries X-Mapped-Model once the model is known (a
  body that does not decode has none) and X-Account-Email once an account was picked (none for
  a 400 of the mapping, or a 503 with no usable account; never when
  routing.expose_account_header is off); the app layer adds x-request-id.
- The access log reads the request's access record (seam.AccessRecord): the front fills the
  models, the attempt loop the account, the attempts and the tokens; the request log
  (monitor/request_log.py, fed by cli/stack.py) reads the same record.
- Client keys (with a shared state, state/store.py): the app authenticated the key; here, once
  the model is resolved, `check_key` admits and counts the request (one round trip) or refuses
  it in the route's own error shape (429 + Retry-After over rpm/tpm/daily tokens, 403 for a
  model outside the key's patterns, 401 disabled meanwhile); after an answer, `record_usage`
  adds its tokens to the key, the account and the model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlencode

import anyio
import orjson

from rawgate.accounts.cooldowns import CooldownBoard
from rawgate.accounts.oauth import OAuthError, TokenManager
from rawgate.accounts.scheduler import AccountsFailing, Cooldown, Scheduler
from rawgate.accounts.store import Account, AccountStore
from rawgate.errors import (
    AccountsAuthResting,
    AuthenticationError,
    InsufficientQuota,
    NotFound,
    PermissionDenied,
    RateLimited,
    RawgateError,
    UpstreamAuthFailed,
    try_again_message,
)
from rawgate.gateway.account_sync import AccountSync
from rawgate.gateway.attempts import ERROR_BODY_MAX_BYTES, USER_AGENT, AttemptLoop
from rawgate.gateway.fronts import gemini as native
from rawgate.gateway.fronts.anthropic import MessagesFront
from rawgate.gateway.fronts.openai import ChatFront, CompletionsFront, ResponsesFront
from rawgate.gateway.models import ModelListing
from rawgate.model_router import ModelRouter
from rawgate.seam import Header
from rawgate.state.keys import KeyRecord
from rawgate.state.response_store import ResponseStore
from rawgate.state.store import RefreshBusy, refresh_once
from rawgate.translate import mapping
from rawgate.translate.contract import random_id, wall_clock
from rawgate.upstream.client import UpstreamClient

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

    from rawgate.config import Config
    from rawgate.gateway.front import AnyFront
    from rawgate.http.app import GatewayApp
    from rawgate.seam import AccessRecord, Request, ResponseSink
    from rawgate.state.limiter import Decision
    from rawgate.state.store import Cooldown as StateCooldown, State
    from rawgate.translate.contract import Clock, IdFactory

__all__ = ["Gateway"]

log = logging.getLogger("rawgate.gateway.core")

Route = Callable[["Request", "ResponseSink"], Awaitable[None]]

_JSON: Header = (b"content-type", b"application/json")
# The blocks instances share (scheduler reasons): what the upstream said about an account.
_SHARED_BLOCKS = frozenset(("rate_limited", "auth"))
_FORM: Header = (b"content-type", b"application/x-www-form-urlencoded")


class Gateway(AttemptLoop):
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
        state: State | None = None,
    ) -> None:
        self.cfg = cfg
        self.home = home
        self.state = state
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
        self.board = CooldownBoard(home / "cooldowns.json") if share_cooldowns else None
        demo = list(demo_accounts or [])
        changed = self._accounts_changed
        # With Redis the accounts list and the OAuth access tokens are the fleet's (the local
        # backend keeps accounts.json and each process's own tokens).
        fleet = state if state is not None and state.backend == "redis" else None
        self.sync = AccountSync(self.store, self.scheduler, self.board, demo, changed, fleet)
        up = cfg.upstream
        self.tokens = TokenManager(
            up.oauth_token_url,
            up.oauth_client_id,
            up.oauth_client_secret,
            self._post_form,
            on_refresh_token=self.sync.on_refresh_token,
            shared=self._fleet_refresh if fleet is not None else None,
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
        self._gemini_base = up.gemini_base_url.rstrip("/") + "/v1beta/models/"
        self._model_urls: dict[str, str] = {}  # model -> escaped upstream base (attempts.py)
        self._ca_base = up.code_assist_base_url.rstrip("/") + "/v1internal:"
        # X-Account-Email values by display name: percent-escaping it is ~3 us per request.
        self._account_headers: dict[str, Header] = {}
        # The clock and the id factory every reply is built with (tests pin them).
        self.clock: Clock = wall_clock
        self.ids: IdFactory = random_id
        self.reconfigure(cfg)
        self._in_flight = 0
        self.listing = ModelListing(
            self.client, self._gemini_base, lambda: self.sync.accounts.values(), USER_AGENT
        )
        self._tg: Any = None
        if fleet is None:
            self.reload_accounts()
        else:  # read from Redis in __aenter__, before the listener accepts
            self.sync.install([])
        if state is not None and state.backend == "redis":
            # Shared across instances: stored Responses and the blocks each one learns (a 429,
            # a refused credential). The local backend keeps this process's bounded store and
            # the cooldowns.json board of `serve --workers N`.
            self.shared_responses = state
            self.on_block = self._publish_block
            state.on_cooldown(self._learn_block)

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
        self.sync.tg = self._tg
        if self.sync.shared is not None:
            await self.sync.start()
            self._tg.start_soon(self.sync.watch_shared)
        self._tg.start_soon(self.sync.watch)
        if self.board is not None:
            self._tg.start_soon(self.sync.sync_cooldowns)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
                await self._tg.__aexit__(None, None, None)
                self._tg = self.sync.tg = None
            with anyio.CancelScope(shield=True):
                await self.sync.flush_async()
        finally:
            # Not under a shield scope: the client's task group scope must be the current one.
            if self._own_client:
                await self.client.__aexit__(None, None, None)

    def install(self, app: GatewayApp) -> None:
        """Register the OpenAI, Anthropic and Gemini-native routes on the app's router."""
        responses = ResponsesFront(self)
        self.add_front(app, "/v1/chat/completions", ChatFront(self))
        self.add_front(app, "/v1/completions", CompletionsFront(self))
        self.add_front(app, "/v1/responses", responses)
        self.add_front(app, "/responses", responses)
        messages = MessagesFront(self)  # reads or makes RAWGATE_HOME/signature_key
        self.add_front(app, "/v1/messages", messages, id_header=b"request-id")
        # /v1/models in OpenAI's shape, in Anthropic's when asked with anthropic-version, in
        # Google's for google-genai (its default api_version is v1: `?key=` counts).
        messages.install(app, self.models, self.model)
        add = app.router.add
        add("POST", "/v1/embeddings", self._honest(native.EMBEDDINGS, serve=self.embeddings))
        gemini = native.NativeFront(self)
        for version in ("/v1beta", "/v1"):
            label = version + "/models/{model}:{method}"
            self.add_front(app, version + "/models/", gemini, prefix=True, query_key=True,
                           label=label)  # fmt: skip
        shape = gemini.error
        add("GET", "/v1beta/models", self.google_models, query_key=True, shape=shape)
        add("GET", "/v1beta/models/", self.google_model, prefix=True, query_key=True,
            label="/v1beta/models/{model}", shape=shape)  # fmt: skip

    def add_front(
        self, app: GatewayApp, path: str, front: AnyFront, *, method: str = "POST", **route: Any
    ) -> None:
        """Serve `front` (gateway/front.py) on `path`: decode, then attempts with rotation and
        retries, the stream pump and the accounting, whatever the protocol. `route`: the
        router's keywords (query_key, prefix, label, ...)."""
        route.setdefault("shape", front.error)  # the app's refusals (401, 503 ...) too
        app.router.add(method, path, self.handler(front, protocol_of(path)), **route)

    def handler(self, front: AnyFront, protocol: str = "openai") -> Route:
        """The route handler of one front (see _honest); `protocol` names it in the request
        log."""
        return self._honest(front, protocol)

    # ---- accounts (account_sync.py) ----------------------------------------------------------

    def reload_accounts(self) -> None:
        """Load accounts.json (or the demo accounts while it holds none) into the scheduler.
        Raises AccountStoreError for a corrupt file (start-up stops; a reload keeps the old set)."""
        self.sync.reload()

    def _accounts_changed(self) -> None:
        self.listing.invalidate()

    @property
    def accounts(self) -> list[Account]:
        return list(self.sync.accounts.values())


    # ---- routes -------------------------------------------------------------------------------

    def _honest(
        self, front: AnyFront, protocol: str = "openai", serve: Route | None = None
    ) -> Route:
        """Decode with `front`, then the attempt loop, with the errors told as what they are: a
        refused upstream credential is the account's failure (upstream_auth_failed naming the
        account labels), never the client's 401; a 400 of the mapping names the model it was
        mapped to. A front with its own error shape writes the error itself; the others leave
        it to the app. One coroutine frame per request: the two try blocks share it. `serve`:
        a route that runs several calls itself (/v1/embeddings) instead of decode + one call."""

        async def honest(req: Request, sink: ResponseSink) -> None:
            access = req.access
            access.protocol = protocol
            try:
                try:
                    if serve is None:
                        call = await front.decode(req, access)
                        if access.key is not None and self.state is not None:
                            await self._admit(req)
                        await self._proxy(req, sink, front, call)
                    else:
                        await serve(req, sink)
                    if self.state is not None and access.account:
                        await self._record_usage(access)
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
                    # The last attempt's credential was refused (and every earlier one's, or
                    # the request would have ended otherwise): name the accounts resting now.
                    names = self._auth_resting(time.monotonic()) or ["the account tried"]
                    e.message = _rejected_message(names, e)
                    raise
                except RawgateError as e:
                    mapped = req.access.mapped_model
                    if mapped and not any(k == b"x-mapped-model" for k, _ in e.headers):
                        e.headers.extend(self._headers(req, None))  # raised before _proxy
                    raise
            except RawgateError as e:
                access.error_code = e.code or e.type
                shaped = None if sink.started else front.error(e)
                if shaped is None:
                    raise
                status, headers, body = shaped
                await sink.respond(status, [*headers, *e.headers], body)

        return honest

    async def models(self, req: Request, sink: ResponseSink) -> None:
        if native.wants_google_listing(req):
            await self.google_models(req, sink)
            return
        data = self.router.list_models(await self.listing.names())
        await sink.respond(200, [_JSON], orjson.dumps({"object": "list", "data": data}))

    async def model(self, req: Request, sink: ResponseSink) -> None:
        if native.wants_google_listing(req):
            await self.google_model(req, sink)
            return
        wanted = unquote(req.path[len("/v1/models/") :])
        for m in self.router.list_models(await self.listing.names()):
            if m["id"] == wanted:
                await sink.respond(200, [_JSON], orjson.dumps(m))
                return
        raise NotFound(
            f"The model '{wanted}' does not exist", param="model", code="model_not_found"
        )

    async def google_models(self, req: Request, sink: ResponseSink) -> None:
        """GET /{v1beta,v1}/models in Google's shape: the upstream's generative models and the
        embedding model (one page; pageToken is ignored)."""
        await sink.respond(200, [_JSON], native.encode_listing(await self._google_names()))

    async def google_model(self, req: Request, sink: ResponseSink) -> None:
        prefix = "/v1beta/models/" if req.path.startswith("/v1beta/") else "/v1/models/"
        wanted = unquote(req.path[len(prefix) :]).removeprefix("models/")
        if wanted in await self._google_names():
            await sink.respond(200, [_JSON], orjson.dumps(native.google_model(wanted)))
            return
        err = NotFound(f"models/{wanted} is not found for API version {prefix[1:-8]}.")
        status, headers, body = native.NativeFront(self).error(err) or (404, [], b"")
        await sink.respond(status, headers, body)

    async def _google_names(self) -> list[str]:
        names = list(await self.listing.names())
        emb = self.cfg.routing.embedding_model
        if emb not in names:
            names.append(emb)
        return names

    async def embeddings(self, req: Request, sink: ResponseSink) -> None:
        """POST /v1/embeddings (gateway/fronts/gemini.py)."""
        await native.embeddings(self, req, sink)

    # ---- shared state (Redis) -------------------------------------------------------------------

    async def stored_history(self, response_id: str) -> list[dict[str, Any]] | None:
        """The conversation up to a stored Response (previous_response_id), None if unknown."""
        if self.shared_responses is not None:
            return await self.shared_responses.get_response(response_id)
        return self.responses.get(response_id)

    def _publish_block(self, block: Cooldown) -> None:
        """A block learned here goes to the store (and so to every instance): the upstream's
        rate limits and refused credentials only; a breaker or a rest is this process's own
        health estimate. In the background: the request goes on rotating meanwhile."""
        if block.reason not in _SHARED_BLOCKS or self._tg is None or self.state is None:
            return
        secs = block.until - time.monotonic()
        if secs > 0:
            self._tg.start_soon(self.state.set_cooldown, block.account, block.model, secs,
                                block.reason)  # fmt: skip

    def _learn_block(self, c: StateCooldown) -> None:
        """A block learned anywhere (pub/sub), into the scheduler's clock."""
        if not c.until:  # a clear by hand: the scheduler's own blocks end by themselves
            return
        mono = time.monotonic()
        until = c.until - time.time() + mono
        self.scheduler.import_cooldowns([Cooldown(c.account, c.model, until, c.reason)], mono)

    # ---- the data path ------------------------------------------------------------------------

    async def _record_usage(self, access: AccessRecord) -> None:
        """The answer's tokens to the key's windows and the hourly usage. Locally no I/O:
        awaited. With Redis buffered (`[state] usage_flush_ms`): awaited too, no I/O; unbatched
        (0) a round trip: in the gateway's task group, so neither the connection's next request
        waits for it nor a client that leaves cancels it."""
        assert self.state is not None
        tin, tout = access.tokens[0], access.tokens[1]
        args = (access.key_name or None, access.account, access.mapped_model, tin, tout)
        if (self.shared_responses is not None and self._tg is not None
                and self.cfg.state.usage_flush_ms == 0):  # fmt: skip
            self._tg.start_soon(self.state.record_usage, *args)
        else:
            await self.state.record_usage(*args)

    async def _admit(self, req: Request) -> None:
        """The client key's limits for this request (one round trip: check and count), or the
        refusal as an error the front shapes: 429 with Retry-After, 403 for the model, 401."""
        assert self.state is not None
        access = req.access
        rec = access.key
        assert isinstance(rec, KeyRecord)
        model = access.mapped_model
        d = await self.state.check_key(rec, model)
        if d.allowed:
            return
        err = key_refusal(rec.name, model, d)
        err.headers.extend(self._headers(req, None))  # X-Mapped-Model
        raise err

    def resolve(self, access: AccessRecord, name: str) -> str:
        """The Gemini model for the client's model `name` (recorded for the access log)."""
        access.model = name
        access.mapped_model = mapped = self.router.resolve(name)
        return mapped


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
            acc = self.sync.accounts.get(st["id"])
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


    # ---- OAuth ----------------------------------------------------------------------------------

    async def _fleet_refresh(
        self, key: str, fetch: Callable[[], Awaitable[tuple[str, float]]], refused: str
    ) -> tuple[str, float]:
        """TokenManager's `shared` on Redis: one refresh per account for the whole fleet
        (state/store.py refresh_once: the shared token, else a lock with an expiry)."""
        assert self.state is not None
        st = self.cfg.state
        try:
            return await refresh_once(
                self.state, key, fetch, lock_ttl_s=st.oauth_refresh_lock_s,
                wait_s=st.oauth_refresh_wait_s, reject=refused,
            )  # fmt: skip
        except RefreshBusy:
            acc = self.sync.accounts.get(key.rpartition(".")[0])  # "id.fingerprint"
            who = self._account_name(acc) if acc is not None else "an account"
            raise OAuthError(
                f"the access token of {who} is being refreshed by another rawgate instance and "
                f"did not arrive within {st.oauth_refresh_wait_s:g} s ([state] "
                "oauth_refresh_wait_s); its refresh lock lapses after "
                f"{st.oauth_refresh_lock_s:g} s"
            ) from None

    async def _post_form(self, url: str, fields: dict[str, str]) -> tuple[int, bytes]:
        body = urlencode(fields).encode()
        resp = await self.client.request("POST", url, [_FORM, USER_AGENT], body)
        async with resp:
            return resp.status, await resp.read(ERROR_BODY_MAX_BYTES)


def protocol_of(path: str) -> str:
    """The client protocol a front's route speaks, for the request log."""
    if path.startswith("/v1beta") or path.startswith("/v1/models/"):
        return "gemini"
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai"


_LIMIT_NAMES = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "daily_tokens": "tokens per day",
}


def key_refusal(name: str, model: str, d: Decision) -> RawgateError:
    """A refused check_key as the error the client gets (the front shapes it)."""
    if d.reason == "model":
        return PermissionDenied(
            f"The client key '{name}' may not use the model '{model}' (its models patterns:"
            " rawgate keys list).",
            param="model",
            code="model_not_allowed",
        )
    if d.reason in ("disabled", "unknown_key"):
        return AuthenticationError(
            f"The client key '{name}' is disabled or was removed.", code="key_disabled"
        )
    wait = max(1, d.retry_after_s)
    if d.reason == "state_unavailable":
        msg = (
            "Client-key limits cannot be checked while the shared state store is unreachable"
            " ([state] limits_fail = closed)."
        )
    else:
        what = _LIMIT_NAMES.get(d.reason, d.reason)
        msg = f"The client key '{name}' is over its limit of {what}."
    return RateLimited(
        msg,
        code="key_rate_limited" if d.reason != "state_unavailable" else "state_unavailable",
        headers=[(b"retry-after", str(wait).encode())],
        retry_after_s=float(wait),
    )


def _names(names: list[str]) -> str:
    return ("account " if len(names) == 1 else "accounts ") + ", ".join(names)


def _rejected_message(names: list[str], err: UpstreamAuthFailed) -> str:
    return (
        f"Google rejected the credential of upstream {_names(names)} ({err.reason}): "
        f"{err.upstream_message} This is rawgate's key to Google, not your key to rawgate: fix "
        "or replace it (`rawgate accounts list`)."
    )


# cooldowns.sync_cooldowns does both halves in one call; the gateway splits it so that the
# scheduler is only touched on the event loop while the file I/O runs in a thread.


