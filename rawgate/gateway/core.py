"""The gateway: OpenAI routes wired to the translator, the account scheduler and the upstream pool.

Invariants:
- One request = decode -> resolve model -> (pick account -> upstream call) x attempts -> transcode.
  Every step but the upstream call is sans-IO and lives in its own module; this module only
  orchestrates and does the I/O.
- Retries happen only before the first byte went to the client, at most
  `scheduler.attempts_allowed()` (routing.max_attempts bounded by the enabled accounts) and within
  the scheduler's retry budget; never after the client has gone (the driver cancels the handler).
  4xx answers other than 401/403/429 are the request's fault and return at once. The client always
  learns the real cause: the error of the last attempt, never a 429 for a 5xx.
- Non-stream requests use the upstream's non-stream call; stream requests send the response head
  as soon as the upstream answered 200, then one downstream write per upstream read (every frame
  that read completed), with SSE comment heartbeats while the upstream is silent.
- Every proxied response, errors included, carries X-Mapped-Model (once the model is known) and
  X-Account-Email (once an account was picked, unless routing.expose_account_header is off); the
  app layer adds x-request-id.
- The scheduler's bookkeeping (acquire/release) is balanced on every path, cancellation included;
  the upstream response is closed (shielded) on every path, which resets an abandoned h2 stream.
- Blocking file I/O (accounts.json writes, the cooldown board) runs in a worker thread, never on
  the event loop; per-request counters are batched and written every STATS_FLUSH_S.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlencode

import anyio
import orjson

from rawgate import __version__
from rawgate.translate import mapping
from rawgate.translate import schemas
from rawgate.accounts.store import Account, AccountStore
from rawgate.accounts.cooldowns import CooldownBoard
from rawgate.errors import (
    AuthenticationError,
    BadRequest,
    ModelFailed,
    NotFound,
    PermissionDenied,
    RateLimited,
    RawgateError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
)
from rawgate.translate.gemini import Reply, decode_reply, error_from_upstream
from rawgate.accounts.oauth import AccountRevoked, TokenManager
from rawgate.gateway.response_store import ResponseStore
from rawgate.model_router import ModelRouter
from rawgate.accounts.scheduler import Cooldown, FailureKind, Scheduler
from rawgate.translate.sse import HEARTBEAT, SSEDecoder
from rawgate.translate.transcode_chat import ChatStream, chat_response, completion_response
from rawgate.translate.transcode_responses import ResponsesStream, responses_response
from rawgate.upstream.client import UpstreamClient, UpstreamResponse

if TYPE_CHECKING:
    import ssl

    from rawgate.http.app import GatewayApp
    from rawgate.translate.call import GeminiCall
    from rawgate.config import Config
    from rawgate.seam import Request, ResponseSink

__all__ = ["Gateway"]

log = logging.getLogger("rawgate.gateway.core")

Header = tuple[bytes, bytes]

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
            r.scheduling, max_attempts=r.max_attempts, retry_budget_ratio=r.retry_budget_ratio
        )
        self.router = ModelRouter(
            r.default_model,
            dict(r.custom_mapping),
            pro_model=r.pro_model,
            lite_model=r.lite_model,
        )
        up = cfg.upstream
        self.tokens = TokenManager(
            up.oauth_token_url,
            up.oauth_client_id,
            up.oauth_client_secret,
            self._post_form,
            on_refresh_token=self._on_refresh_token,
        )
        self.responses = ResponseStore(
            cfg.limits.response_store_max_count, cfg.limits.response_store_max_age_s
        )
        self.board = CooldownBoard(home / "cooldowns.json") if share_cooldowns else None
        self._gemini_base = up.gemini_base_url.rstrip("/") + "/v1beta/models/"
        self._ca_base = up.code_assist_base_url.rstrip("/") + "/v1internal:"
        self._expose_account = r.expose_account_header
        # Only sticky scheduling reads the conversation key: the others skip hashing it.
        self._key = r.scheduling == "sticky"
        # X-Account-Email values by display name: percent-escaping it is ~3 us per request.
        self._account_headers: dict[str, Header] = {}
        self._max_depth = cfg.limits.max_json_depth
        self._heartbeat_s = cfg.limits.sse_heartbeat_s
        self._max_event_bytes = cfg.limits.upstream_max_event_bytes
        self._demo = list(demo_accounts or [])
        self._accounts: dict[str, Account] = {}
        self._in_flight = 0
        self._models_cache: tuple[float, list[str]] | None = None
        self._dirty_stats: dict[str, list[Any]] = {}
        self._tg: Any = None
        self.reload_accounts()

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
        add = app.router.add
        add("POST", "/v1/chat/completions", self.chat)
        add("POST", "/v1/completions", self.completions)
        add("POST", "/v1/responses", self.responses_route)
        add("POST", "/responses", self.responses_route)
        add("GET", "/v1/models", self.models)
        add("GET", "/v1/models/", self.model, prefix=True, label="/v1/models/{id}")

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

    async def chat(self, req: Request, sink: ResponseSink) -> None:
        body = schemas.decode_chat(req.body, max_depth=self._max_depth)
        call = mapping.chat_to_gemini(body, self._resolve(req, body.model), key=self._key)
        await self._proxy(req, sink, call)

    async def completions(self, req: Request, sink: ResponseSink) -> None:
        body = schemas.decode_completion(req.body, max_depth=self._max_depth)
        call = mapping.completion_to_gemini(body, self._resolve(req, body.model), key=self._key)
        await self._proxy(req, sink, call)

    async def responses_route(self, req: Request, sink: ResponseSink) -> None:
        body = schemas.decode_responses(req.body, max_depth=self._max_depth)
        model = self._resolve(req, body.model)
        history = None
        if body.previous_response_id:
            history = self.responses.get(body.previous_response_id)
            if history is None:
                raise BadRequest(
                    f"Previous response with id '{body.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                    headers=self._headers(req, None),
                )
        call = mapping.responses_to_gemini(body, model, history, key=self._key)
        await self._proxy(req, sink, call)

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

    def _resolve(self, req: Request, name: str) -> str:
        req.model = name
        req.mapped_model = mapped = self.router.resolve(name)
        return mapped

    def _headers(self, req: Request, acc: Account | None) -> list[Header]:
        h: list[Header] = []
        if req.mapped_model:
            h.append((b"x-mapped-model", req.mapped_model.encode()))
        if acc is not None and self._expose_account:
            name = acc.display_name()
            value = self._account_headers.get(name)
            if value is None:
                if len(self._account_headers) >= ACCOUNT_HEADER_CACHE:
                    self._account_headers.clear()
                value = self._account_headers[name] = (b"x-account-email", _header_text(name))
            h.append(value)
        return h

    async def _proxy(self, req: Request, sink: ResponseSink, call: GeminiCall) -> None:
        """Attempts with rotation; the first usable answer goes to the client."""
        sched = self.scheduler
        tried: set[str] = set()
        last: RawgateError | None = None
        acc: Account | None = None
        attempts = sched.attempts_allowed()
        for attempt in range(attempts):
            now = time.monotonic()
            if attempt and not sched.may_retry(self._in_flight, now):
                break
            try:
                acc = sched.pick(call.model, now, exclude=tried, key=call.conversation_key)
            except RawgateError as e:
                # Nothing left to rotate to: the last upstream error is the truthful cause.
                if last is None:
                    e.headers.extend(self._headers(req, None))
                    raise
                break
            tried.add(acc.id)
            req.account = acc.display_name()
            try:
                await self._attempt(req, sink, call, acc)
                return
            except RawgateError as e:
                if sink.started:
                    raise
                last = e
                if not _retryable(e):
                    break
        assert last is not None
        last.headers.extend(self._headers(req, acc))
        raise last

    async def _attempt(
        self, req: Request, sink: ResponseSink, call: GeminiCall, acc: Account
    ) -> None:
        """One upstream call on one account; raises a RawgateError when it failed."""
        sched = self.scheduler
        sched.acquire(acc)
        self._in_flight += 1
        resp: UpstreamResponse | None = None
        read_all = False  # a non-stream answer was read to its end and sent
        try:
            try:
                url, headers, body = await self._upstream_request(acc, call)
                resp = await self.client.request("POST", url, headers, body)
                if resp.status == 401 and acc.kind == "oauth":
                    # An access token can die before its expiry (revoked, clock skew): get a
                    # fresh one and try this account once more before blaming it.
                    await resp.aclose()
                    resp = None
                    self.tokens.invalidate_if(acc, _bearer_of(headers))
                    url, headers, body = await self._upstream_request(acc, call)
                    resp = await self.client.request("POST", url, headers, body)
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
                self._failed(acc, call.model, e)
                raise
            head = self._headers(req, acc)
            if call.stream:
                await self._stream(sink, call, resp, head, acc)
                return
            try:
                out = self._render(call, reply)
            except RawgateError as e:
                # An unusable answer (MALFORMED_FUNCTION_CALL ...) is the model's failure, not
                # the account's: no cooldown, but the next attempt may go elsewhere.
                self._count(acc, 0, 0, e.message)
                raise
            await sink.respond(200, [_JSON, *head], out)
            tin, tout = _usage_counts(reply)
            sched.report_success(acc, call.model, time.monotonic(), tin, tout)
            self._count(acc, tin, tout, None)
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

    def _failed(self, acc: Account, model: str, err: RawgateError) -> None:
        """Teach the scheduler what this failure says about the account."""
        kind = _failure_kind(err)
        if kind is not None:
            if kind == "auth" and acc.kind == "oauth":
                self.tokens.invalidate(acc)
            self.scheduler.report_failure(acc, model, time.monotonic(), kind, err.retry_after_s)
        self._count(acc, 0, 0, err.message)

    async def _upstream_request(
        self, acc: Account, call: GeminiCall
    ) -> tuple[str, list[Header], bytes]:
        if acc.kind == "api_key":
            method = ":streamGenerateContent?alt=sse" if call.stream else ":generateContent"
            headers = [_UPSTREAM_JSON, _USER_AGENT, (b"x-goog-api-key", acc.api_key.encode())]
            return self._gemini_base + call.model + method, headers, mapping.gemini_body(call)
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

    def _render(self, call: GeminiCall, reply: Reply) -> bytes:
        if call.api == "chat":
            return chat_response(call, reply)
        if call.api == "completions":
            return completion_response(call, reply)
        rid = "resp_" + uuid.uuid4().hex
        out = responses_response(call, reply, rid)
        if call.store:
            items: list[dict[str, Any]] = orjson.loads(out).get("output", [])
            self.responses.put(rid, call.input_items, items)
        return out

    async def _stream(
        self,
        sink: ResponseSink,
        call: GeminiCall,
        resp: UpstreamResponse,
        head: list[Header],
        acc: Account,
    ) -> None:
        """Pump upstream SSE events to the client, one write per upstream read."""
        decoder = SSEDecoder(self._max_event_bytes)
        rs: ResponsesStream | None = None
        cs: ChatStream | None = None
        if call.api == "responses":
            rid = "resp_" + uuid.uuid4().hex
            rs = ResponsesStream(call, rid)
            feed, finish, fail = rs.feed, rs.finish, rs.fail
            first = rs.start()
        else:
            cs = ChatStream(call, completions=call.api == "completions")
            feed, finish, fail = cs.feed, cs.finish, cs.fail
            first = b""
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
                        await send(HEARTBEAT)
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
        await sink.end(b"".join(out))
        now = time.monotonic()
        usage = (rs.usage if rs is not None else cs.usage if cs is not None else None) or {}
        tin = int(usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0)
        tout = int(usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0)
        if upstream_error is not None:
            kind = _failure_kind(upstream_error)
            if kind is not None:
                self.scheduler.report_failure(
                    acc, call.model, now, kind, upstream_error.retry_after_s
                )
            self._count(acc, tin, tout, upstream_error.message)
            return
        self.scheduler.report_success(acc, call.model, now, tin, tout)
        self._count(acc, tin, tout, None)
        if rs is not None and call.store:
            self.responses.put(rs.response["id"], call.input_items, rs.output_items)

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


def _retryable(err: RawgateError) -> bool:
    """Worth another account: rate limits, auth trouble of this account, upstream failures."""
    if isinstance(err, UpstreamError):
        return True
    return err.status in (401, 403, 408, 429) or err.status >= 500


def _failure_kind(err: RawgateError) -> FailureKind | None:
    """What `err` says about the account that got it; None: nothing (the request's fault, or
    the model's, such as a stream that ends in MALFORMED_FUNCTION_CALL)."""
    if isinstance(err, ModelFailed):
        return None
    if isinstance(err, RateLimited) or err.status == 429:
        return "rate_limited"
    if isinstance(err, AuthenticationError | PermissionDenied) or err.status in (401, 403):
        return "auth"
    if err.status >= 500:
        if isinstance(err, UpstreamConnectError | UpstreamConnectTimeout):
            return "connect"
        return "server"
    return None


def _usage_counts(reply: Reply) -> tuple[int, int]:
    u = reply.usageMetadata
    if u is None:
        return 0, 0
    return (u.promptTokenCount or 0), (u.candidatesTokenCount or 0) + (u.thoughtsTokenCount or 0)


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
