"""The attempt loop: one request's upstream calls, with rotation across accounts, retries
within the retry budget, the stream pump, and the classification of failures.

Invariants:
- Retries happen only before the first byte went to the client, at most
  `scheduler.attempts_allowed()` (routing.max_attempts bounded by the enabled accounts); never
  after the client has gone (the driver cancels the handler). Only re-sends after a model call
  that went out and met a 5xx, a timeout or a connection failure spend the scheduler's retry
  budget: rotating off a 429, a refused credential, or an account that failed before its call
  left (token refresh refused or failing, Code Assist set-up) costs the upstream nothing. 4xx
  answers other than 401/403/429 are the request's fault and return at once. The client always
  learns the real cause: the error of the last attempt, never a 429 for a 5xx.
- Failures are classified by their class (errors.py), never by a status number.
- At DEBUG, one line per attempt: request id, attempt number, account label, model, upstream
  status, error code, the block it set and the decision (answer, rotate, give_up + why). Never a
  key, token or upstream message (Google's can quote the request URL).
- Non-stream requests use the upstream's non-stream call; stream requests send the response head
  as soon as the upstream answered 200, then one downstream write per upstream read (every frame
  that read completed), with the transcoder's heartbeat while the upstream is silent.
- The loop knows no client protocol: the front (gateway/front.py) renders replies and makes the
  stream transcoder; usage and the items to store come back as neutral records. A passthrough
  call (`call.passthrough`) is sent as the client's bytes (in the Code Assist envelope on an
  OAuth account) and its raw reply goes back to the front; calls Code Assist cannot serve
  (countTokens, embeddings) are only put on API-key accounts.
- The scheduler's bookkeeping (acquire/release) is balanced on every path, cancellation included;
  the upstream response is closed (shielded) on every path, which resets an abandoned h2 stream.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, cast
from urllib.parse import quote

import anyio
import orjson

from rawgate import __version__
from rawgate.accounts.oauth import AccountRevoked
from rawgate.accounts.scheduler import Cooldown, FailureKind
from rawgate.errors import (
    AuthenticationError,
    BadRequest,
    HTTPVersionNotSupported,
    InternalError,
    MethodNotImplemented,
    ModelFailed,
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
)
from rawgate.logs import safe_text
from rawgate.seam import Header
from rawgate.translate import mapping
from rawgate.translate.gemini import Reply, decode_reply, error_from_upstream
from rawgate.translate.native import unwrap_code_assist, wrap_code_assist
from rawgate.translate.sse import SSEDecoder

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from rawgate.accounts.oauth import TokenManager
    from rawgate.accounts.scheduler import Scheduler
    from rawgate.accounts.store import Account
    from rawgate.gateway.account_sync import AccountSync
    from rawgate.gateway.front import AnyFront, Front, PassthroughFront
    from rawgate.seam import Request, ResponseSink
    from rawgate.state.response_store import ResponseStore
    from rawgate.state.store import State
    from rawgate.translate.call import GeminiCall
    from rawgate.translate.contract import (
        Clock,
        IdFactory,
        RawTranscoder,
        Stored,
        StreamTranscoder,
    )
    from rawgate.upstream.client import UpstreamClient, UpstreamResponse

__all__ = ["AttemptLoop", "Try", "charges_budget", "failure_kind", "retryable"]

log = logging.getLogger("rawgate.gateway.core")


# A stream cut by the server's shutdown (its grace ran out) ends with this error event; writing
# it may take at most CUT_NOTICE_S seconds (a client that reads nothing must not hold shutdown).
CUT_NOTICE_S = 0.5
_CUT = ServiceUnavailable(
    "rawgate is shutting down and cut this answer before it finished; send the request again",
    code="server_shutting_down",
)
_JSON: Header = (b"content-type", b"application/json")
_SSE_HEAD: tuple[Header, ...] = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # nginx (and proxies copying it) buffer responses unless told otherwise.
    (b"x-accel-buffering", b"no"),
)
_UPSTREAM_JSON: Header = (b"content-type", b"application/json")
USER_AGENT: Header = (b"user-agent", f"rawgate/{__version__}".encode())
_USER_AGENT = USER_AGENT
# Bound of the X-Account-Email cache (one entry per account display name; cleared when full).
ACCOUNT_HEADER_CACHE = 1024
# Bound of the escaped upstream URL cache (one entry per Gemini model; cleared when full).
MODEL_URL_CACHE = 256
# Upstream error bodies are short JSON; a proxy's HTML page is not. Read at most this much.
ERROR_BODY_MAX_BYTES = 64 * 1024


class AttemptLoop:
    """The data path of the Gateway (which sets these attributes; see gateway/core.py)."""

    scheduler: Scheduler
    client: UpstreamClient
    tokens: TokenManager
    responses: ResponseStore
    sync: AccountSync
    clock: Clock
    ids: IdFactory
    _in_flight: int
    _heartbeat_s: float
    _max_event_bytes: int
    _expose_account: bool
    _account_headers: dict[str, Header]
    _gemini_base: str
    _model_urls: dict[str, str]
    _ca_base: str
    # With a shared state store (Redis): stored Responses go there (another instance continues
    # the conversation) and every block this process learns is handed to `on_block` (the
    # gateway publishes it). None: this process's response store, nothing to share.
    shared_responses: State | None = None
    on_block: Callable[[Cooldown], None] | None = None

    async def keep(self, stored: Stored) -> None:
        """Store a reply's items for previous_response_id, before the client can name them."""
        shared = self.shared_responses
        if shared is None:
            self.responses.put(*stored)
        else:
            await shared.put_response(*stored)

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
        self, req: Request, sink: ResponseSink, front: AnyFront, call: GeminiCall
    ) -> None:
        """Attempts with rotation; the first usable answer goes to the client."""
        sched = self.scheduler
        model = call.model
        debug = log.isEnabledFor(logging.DEBUG)
        pt = call.passthrough
        tried: set[str] = set() if pt is None or not pt.api_key_only else self._oauth_ids()
        try:
            acc = sched.pick(model, time.monotonic(), exclude=tried, key=call.conversation_key)
        except RawgateError as e:
            if debug:
                log.debug(
                    "rid=%s model=%s no account: %s (retry after %.2f s)",
                    req.request_id, safe_text(model), e.code, e.retry_after_s or 0.0,
                )  # fmt: skip
            e.headers.extend(self._headers(req, None))
            raise
        tried.add(acc.id)
        attempts = sched.attempts_allowed()
        attempt = 0
        access = req.access
        access.stream = call.stream
        tries = access.attempts = []  # (label, Try) per attempt, for the request log
        while True:
            attempt += 1
            access.account = label = acc.display_name()
            tr = Try()
            tries.append((label, tr))
            try:
                await self._attempt(req, sink, front, call, acc, tr)
            except RawgateError as e:
                nxt: Account | None = None
                if sink.started:
                    why = "after_first_byte"
                elif not retryable(e):
                    why = "not_retryable"
                elif attempt >= attempts:
                    why = "max_attempts"
                elif (
                    tr.sent
                    and charges_budget(e)
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

    def _oauth_ids(self) -> set[str]:
        """The Code Assist accounts, which a call with no Code Assist route must skip; a 400
        when they are all the pool has (failure path and API-key-only calls: O(accounts))."""
        accounts = self.sync.accounts.values()
        ids = {a.id for a in accounts if a.kind != "api_key"}
        if not any(a.kind == "api_key" and a.enabled for a in accounts):
            raise BadRequest(
                "This call (countTokens or embeddings) needs an API-key account: Code Assist "
                "(OAuth) accounts have no such route. Add a Gemini API key with `rawgate "
                "accounts add --api-key KEY`.",
                code="no_api_key_account",
            )
        return ids

    @staticmethod
    def _log_attempt(
        req: Request,
        attempt: int,
        attempts: int,
        acc: Account,
        model: str,
        tr: Try,
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
        front: AnyFront,
        call: GeminiCall,
        acc: Account,
        tr: Try,
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
                    if call.passthrough is None:
                        reply = decode_reply(await resp.read())
                    else:
                        raw = await resp.read()
                        if acc.kind != "api_key":
                            raw = unwrap_code_assist(raw)
            except AccountRevoked as e:
                await self.sync.disable(acc, e.reason)
                self.sync.count(acc, 0, 0, e.message)
                raise
            except RawgateError as e:
                tr.block = self._failed(acc, call.model, e)
                raise
            head = self._headers(req, acc)
            if call.stream:
                await self._stream(req, sink, front, call, resp, head, acc, tr)
                return
            try:
                if call.passthrough is None:
                    answer = cast("Front", front).render(call, reply, self.clock, self.ids)
                else:
                    answer = cast("PassthroughFront", front).render_raw(call, raw)
            except RawgateError as e:
                # An unusable answer (MALFORMED_FUNCTION_CALL ...) is the model's failure, not
                # the account's: no cooldown, but the next attempt may go elsewhere.
                self.sync.count(acc, 0, 0, e.message)
                raise
            if answer.stored is not None:
                await self.keep(answer.stored)
            await sink.respond(200, [_JSON, *head], answer.body)
            tin, tout = answer.usage
            um = reply.usageMetadata if call.passthrough is None else None
            req.access.tokens = (
                tin, tout, um.cachedContentTokenCount, um.thoughtsTokenCount
            ) if um is not None else (tin, tout, 0, 0)  # fmt: skip
            sched.report_success(acc, call.model, time.monotonic(), tin, tout)
            self.sync.count(acc, tin, tout, None)
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
        kind = failure_kind(err)
        block = None
        if kind is not None:
            if kind == "auth" and acc.kind == "oauth":
                self.tokens.invalidate(acc)
            block = self.scheduler.report_failure(
                acc, model, time.monotonic(), kind, err.retry_after_s
            )
            if block is not None and self.on_block is not None:
                self.on_block(block)
        self.sync.count(acc, 0, 0, err.message)
        return block

    async def _upstream_request(
        self, acc: Account, call: GeminiCall
    ) -> tuple[str, list[Header], bytes]:
        pt = call.passthrough
        if acc.kind == "api_key":
            if pt is not None:
                method = ":" + pt.verb + ("?alt=sse" if call.stream else "")
            else:
                method = ":streamGenerateContent?alt=sse" if call.stream else ":generateContent"
            headers = [_UPSTREAM_JSON, _USER_AGENT, (b"x-goog-api-key", acc.api_key.encode())]
            # The model is one escaped path segment (router.resolve already allows only
            # [A-Za-z0-9._-]; quoting keeps that true should a future caller skip it). The
            # escaped base per model is kept: quote() is ~1 us a request.
            base = self._model_urls.get(call.model)
            if base is None:
                if len(self._model_urls) >= MODEL_URL_CACHE:
                    self._model_urls.clear()
                base = self._model_urls[call.model] = (
                    self._gemini_base + quote(call.model, safe="")
                )
            url = base + method
            return url, headers, mapping.gemini_body(call) if pt is None else pt.body
        token = await self.tokens.access_token(acc, time.time())
        known = acc.project
        project = await self.tokens.project_for(acc, token, self._post_json_ca)
        if not known:  # discovered just now: store it once
            self.sync.later(acc.id, project=project)
        method = "streamGenerateContent?alt=sse" if call.stream else "generateContent"
        headers = [_UPSTREAM_JSON, _USER_AGENT, (b"authorization", b"Bearer " + token.encode())]
        if pt is not None:
            # The client's bytes inside the envelope, never re-encoded (translate/native.py).
            body = wrap_code_assist(pt.body, call.model, project, uuid.uuid4().hex)
        else:
            body = mapping.code_assist_body(call, project, uuid.uuid4().hex)
        return self._ca_base + method, headers, body

    async def _stream(
        self,
        req: Request,
        sink: ResponseSink,
        front: AnyFront,
        call: GeminiCall,
        resp: UpstreamResponse,
        head: list[Header],
        acc: Account,
        tr: Try,
    ) -> None:
        """Pump upstream SSE events to the client, one write per upstream read. A failure after
        the head went out is reported to the scheduler here and recorded in `tr` (the client
        already has its answer: an error event)."""
        decoder = SSEDecoder(self._max_event_bytes)
        tx: StreamTranscoder | RawTranscoder
        decode: Callable[[bytes], Any]
        if call.passthrough is None:
            tx = cast("Front", front).stream(call, self.clock, self.ids)
            decode = decode_reply
            content = _SSE_HEAD
        else:
            # Raw event payloads to the front; a Code Assist event loses its envelope first.
            tx = raw = cast("PassthroughFront", front).stream_raw(call)
            decode = _same if acc.kind == "api_key" else unwrap_code_assist
            content = raw.head
        feed: Callable[[Any], bytes] = tx.feed
        finish, fail = tx.finish, tx.fail
        heartbeat = tx.heartbeat
        first = tx.start()
        await sink.start(200, [*content, *head])
        if first:
            await sink.send(first)
        upstream_error: RawgateError | None = None
        # The heartbeat is the upstream read's own quiet timeout, not a task beside the pump: no
        # task group, task, lock or sleep timer per stream (those cost ~5 % of a 100-chunk
        # stream's CPU: bench `stream-chat` c=16, ledger in bench/README.md), and a single
        # writer needs no lock. The wait counts from the
        # last downstream write, so upstream data that made no frame does not put it off.
        beat = self._heartbeat_s if self._heartbeat_s > 0 and heartbeat else None
        last = time.monotonic()  # the last downstream write
        receive = resp.receive_within
        send = sink.send
        sse = decoder.feed
        out: list[bytes] = []
        flushed = False  # the first event went out
        # The last event (a Reply, or raw bytes on a passthrough): its usageMetadata is the
        # running total.
        reply: Any = None
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
                    # The first event leaves on its own: a read holding a whole burst (100
                    # events, ~0.45 ms to transcode) must not delay the first byte (bench
                    # `stream-chat` c=1 TTFB, ledger in bench/README.md).
                    reply = decode(ps[0])
                    out.append(feed(reply))
                    data = b"".join(out)
                    out.clear()
                    if data:
                        await send(data)
                        last = time.monotonic()
                        flushed = True
                    del ps[0]
                for p in ps:
                    reply = decode(p)
                    out.append(feed(reply))
                if out:
                    data = b"".join(out)
                    out.clear()
                    if data:
                        await send(data)  # one write per upstream read
                        last = time.monotonic()
            for p in decoder.close():
                reply = decode(p)
                out.append(feed(reply))
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
        stored = tx.stored
        if upstream_error is None and stored is not None:
            await self.keep(stored)  # before the last event: the client may name it at once
        await sink.end(b"".join(out))
        now = time.monotonic()
        tin, tout = tx.usage
        um = reply.usageMetadata if isinstance(reply, Reply) else None
        req.access.tokens = (
            tin, tout, um.cachedContentTokenCount, um.thoughtsTokenCount
        ) if um is not None else (tin, tout, 0, 0)  # fmt: skip
        if upstream_error is not None:
            kind = failure_kind(upstream_error)
            if kind is not None:
                tr.block = self.scheduler.report_failure(
                    acc, call.model, now, kind, upstream_error.retry_after_s
                )
                if tr.block is not None and self.on_block is not None:
                    self.on_block(tr.block)
            self.sync.count(acc, tin, tout, upstream_error.message)
            tr.answered = True
            tr.error = upstream_error
            req.access.error_code = upstream_error.code or upstream_error.type
            return
        self.scheduler.report_success(acc, call.model, now, tin, tout)
        self.sync.count(acc, tin, tout, None)

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


class Try:
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


def charges_budget(err: RawgateError) -> bool:
    """Whether retrying after `err` (from a model call that went out) spends the retry budget:
    re-sending after a 5xx, a timeout or a connection failure may pile work on a failing
    upstream. Rotating off an account the upstream rate-limited or whose credentials it refused
    costs the upstream nothing, and so does a dead refresh token (AccountRevoked, also when a
    401 made rawgate refresh mid-attempt). A call that never went out is free too (Try.sent)."""
    if isinstance(err, AccountRevoked):
        return False
    return failure_kind(err) not in ("rate_limited", "auth")


def retryable(err: RawgateError) -> bool:
    """Worth another account: rate limits, auth trouble of this account, timeouts, upstream and
    server failures (errors.py's classes; never decided by status number)."""
    return isinstance(err, _RETRYABLE)


def failure_kind(err: RawgateError) -> FailureKind | None:
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


def _same(payload: bytes) -> bytes:
    return payload


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
