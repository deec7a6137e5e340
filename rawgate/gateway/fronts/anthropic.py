"""The Anthropic Messages front: `POST /v1/messages` (what Claude Code and the Anthropic SDKs
call) on the front seam, plus the routes those clients touch around it.

Invariants:
- `MessagesFront` is a `Front` (gateway/front.py): request bytes -> `GeminiCall` through
  map_messages (its `MessagesOptions` ride in `call.reply_options`), replies through
  transcode_messages. Errors always take Anthropic's shape (`{"type":"error","error":{...}}`)
  with the status and headers the SDKs and Claude Code act on (transcode_messages.
  anthropic_error): 503 -> 529 overloaded_error, `retry-after` / `retry-after-ms` from the
  upstream's delay, `x-should-retry: false` when no retry can help.
- Thought signatures leave rawgate only tagged with the installation's signature key
  (sigtag.py): 32 random bytes in RAWGATE_HOME/signature_key (0600), made once, atomically (two
  processes sharing a home agree on one key), and read at start.
- `count_tokens` is a local estimate, never an upstream call (Claude Code fires 25 at once for
  one `/context`): ceil(characters / 4) over the system text, the messages (text, tool inputs,
  tool results, thinking) and the tool definitions, plus 258 per image or document, the
  emulator's and Gemini's per-media count. It answers at least 1.
- `GET /v1/models` (and `/v1/models/{id}`) answers in Anthropic's list shape when the request
  carries `anthropic-version` (every Anthropic client sends it), in OpenAI's otherwise.
- Answers on /v1/messages and count_tokens repeat x-request-id as `request-id` (the SDKs'
  `_request_id`).
- `HEAD`/`GET /` answer 200 and `POST /api/event_logging/...` answers 200 `{}` (Claude Code's
  probe and older builds' telemetry), so a client pointed at rawgate never retries a 404.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import anyio
import orjson

from rawgate.errors import BadRequest, NotFound, RawgateError
from rawgate.model_router import MODELS_CREATED
from rawgate.seam import Header
from rawgate.translate import mapping
from rawgate.translate.contract import answer, token_usage
from rawgate.translate.map_messages import (
    MessagesRequest,
    decode_messages,
    messages_to_gemini,
    output_limit,
)
from rawgate.translate.sigtag import SignatureTagger
from rawgate.translate.transcode_messages import (
    MessagesOptions,
    MessagesStream,
    anthropic_error,
    messages_response,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from rawgate.gateway.core import Gateway
    from rawgate.gateway.front import ErrorReply
    from rawgate.http.app import GatewayApp
    from rawgate.seam import AccessRecord, Request, ResponseSink
    from rawgate.translate.call import GeminiCall
    from rawgate.translate.contract import Answer, Clock, IdFactory, StreamTranscoder
    from rawgate.translate.gemini import Reply

    Handler = Callable[[Request, ResponseSink], Awaitable[None]]

__all__ = ["MessagesFront", "estimate_tokens", "load_signature_key"]

log = logging.getLogger("rawgate.gateway.anthropic")

_JSON: Header = (b"content-type", b"application/json")
SIGNATURE_KEY_FILE = "signature_key"
SIGNATURE_KEY_BYTES = 32
# Tokens counted per image or document block (Gemini's and the emulator's per-media count).
MEDIA_TOKENS = 258
# GET /v1/models page size (Anthropic: default 20, 1..1000).
MODELS_PAGE_DEFAULT = 20
MODELS_PAGE_MAX = 1000
_CREATED_AT = datetime.fromtimestamp(MODELS_CREATED, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_signature_key(home: Path) -> bytes:
    """The installation's signature key (see the module note): read, or made on first start.
    A file too short to be a key (hand-edited, truncated) is replaced."""
    path = home / SIGNATURE_KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) >= 16:
            return key
        log.warning("%s holds no usable key; making a new one", path)
        path.unlink()
    except FileNotFoundError:
        pass
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{SIGNATURE_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(SIGNATURE_KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process made one first: use theirs
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


# ---- count_tokens ------------------------------------------------------------------------------


def _block_chars(block: object) -> tuple[int, int]:
    """(characters, media blocks) of one content block, tool results recursively."""
    if isinstance(block, str):
        return len(block), 0
    if not isinstance(block, dict):
        return 0, 0
    kind = block.get("type")
    if kind in ("image", "document"):
        src = block.get("source")
        if isinstance(src, dict) and src.get("type") == "text" and isinstance(src.get("data"), str):
            return len(src["data"]), 0
        return 0, 1
    chars = media = 0
    for key in ("text", "thinking", "name"):
        v = block.get(key)
        if isinstance(v, str):
            chars += len(v)
    if "input" in block:
        chars += len(orjson.dumps(block["input"]))
    content = block.get("content")
    if isinstance(content, str):
        chars += len(content)
    elif isinstance(content, list):
        for inner in content:
            c, m = _block_chars(inner)
            chars += c
            media += m
    return chars, media


def estimate_tokens(req: MessagesRequest) -> int:
    """The local input-token estimate of count_tokens (see the module note)."""
    chars = media = 0
    system = req.system
    if isinstance(system, str):
        chars += len(system)
    elif system:
        for b in system:
            c, m = _block_chars(b)
            chars += c
            media += m
    for msg in req.messages:
        if isinstance(msg.content, str):
            chars += len(msg.content)
            continue
        for b in msg.content:
            c, m = _block_chars(b)
            chars += c
            media += m
    for tool in req.tools or ():
        chars += len(orjson.dumps(tool))
    return max(1, math.ceil(chars / 4) + MEDIA_TOKENS * media)


# ---- the front ---------------------------------------------------------------------------------


class MessagesFront:
    """POST /v1/messages (see the module note)."""

    __slots__ = ("gw", "sig")

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.sig = SignatureTagger(load_signature_key(gw.home))

    def error(self, err: RawgateError) -> ErrorReply | None:
        status, body, headers = anthropic_error(err)
        return status, [_JSON, *headers], body

    async def decode(self, req: Request, access: AccessRecord) -> GeminiCall:
        gw = self.gw
        body = decode_messages(req.body, max_depth=gw.max_depth)
        model = gw.resolve(access, body.model)
        kw: dict[str, Any] = {"key": gw.sticky, "schemas": gw.tool_schemas}
        try:
            call, opts = messages_to_gemini(body, model, self.sig, inline_work=gw.inline_work, **kw)
        except mapping.SchemasOffLoop:
            # Over limits.tool_schema_inline_work: again in a worker thread (as the OpenAI
            # fronts do), so one request's schemas cannot hold the other requests up.
            fn = functools.partial(messages_to_gemini, body, model, self.sig, **kw)
            call, opts = await anyio.to_thread.run_sync(fn)
        call.reply_options = opts
        return call

    def render(self, call: GeminiCall, reply: Reply, clock: Clock, ids: IdFactory) -> Answer:
        body = messages_response(call, reply, _opts(call), self.sig, _alnum(ids))
        return answer(body, token_usage(reply.usageMetadata))

    def stream(self, call: GeminiCall, clock: Clock, ids: IdFactory) -> StreamTranscoder:
        return MessagesStream(call, _opts(call), self.sig, _alnum(ids))

    # ---- the routes around /v1/messages ----------------------------------------------------

    def install(self, app: GatewayApp, openai_models: Handler, openai_model: Handler) -> None:
        """/v1/messages itself is registered by Gateway.add_front; these are the rest. The
        OpenAI model handlers answer requests without `anthropic-version`."""
        add = app.router.add
        add("POST", "/v1/messages/count_tokens", self._shaped(self.count_tokens), shape=self.error,
            id_header=b"request-id")  # fmt: skip
        add("GET", "/v1/models", self._models_route(self.models, openai_models), query_key=True)
        add(
            "GET",
            "/v1/models/",
            self._models_route(self.model, openai_model),
            prefix=True,
            label="/v1/models/{id}",
            query_key=True,
        )
        # Protected like any route: Claude Code sends its key with these too.
        add("GET", "/", self.root)
        add("POST", "/api/event_logging/", self.event_logging, prefix=True,
            label="/api/event_logging/{path}")  # fmt: skip

    def _shaped(self, handler: Handler) -> Handler:
        """`handler` with its errors in Anthropic's shape."""

        async def shaped(req: Request, sink: ResponseSink) -> None:
            try:
                await handler(req, sink)
            except RawgateError as e:
                if sink.started:
                    raise
                status, headers, body = self.error(e) or (e.status, [], e.to_json())
                await sink.respond(status, [*headers, *e.headers], body)

        return shaped

    def _models_route(self, anthropic: Handler, openai: Handler) -> Handler:
        shaped = self._shaped(anthropic)

        async def models(req: Request, sink: ResponseSink) -> None:
            if req.header(b"anthropic-version") is None:
                await openai(req, sink)
            else:
                await shaped(req, sink)

        return models

    async def count_tokens(self, req: Request, sink: ResponseSink) -> None:
        gw = self.gw
        body = decode_messages(req.body, count_tokens=True, max_depth=gw.max_depth)
        mapped = gw.resolve(req.access, body.model)
        n = estimate_tokens(body)
        await sink.respond(
            200, [_JSON, (b"x-mapped-model", mapped.encode())], b'{"input_tokens":%d}' % n
        )

    async def _listing(self) -> list[dict[str, Any]]:
        gw = self.gw
        out = []
        listed = gw.router.list_models(await gw.listing.names())
        # Anthropic clients first see the names they know (stable sort: the order stays).
        listed.sort(key=lambda m: not m["id"].startswith("claude-"))
        for m in listed:
            mid = m["id"]
            item: dict[str, Any] = {
                "type": "model",
                "id": mid,
                "display_name": mid,
                "created_at": _CREATED_AT,
            }
            try:
                item["max_tokens"] = output_limit(gw.router.resolve(mid))
            except RawgateError:
                pass
            out.append(item)
        return out

    async def models(self, req: Request, sink: ResponseSink) -> None:
        q = parse_qs(req.query)
        limit = MODELS_PAGE_DEFAULT
        raw = q.get("limit")
        if raw:
            try:
                limit = int(raw[0])
            except ValueError:
                limit = 0
            if not 1 <= limit <= MODELS_PAGE_MAX:
                raise BadRequest(
                    f"limit: must be an integer from 1 to {MODELS_PAGE_MAX}", param="limit"
                )
        data = await self._listing()
        ids = [m["id"] for m in data]
        after, before = q.get("after_id"), q.get("before_id")
        if after:
            start = ids.index(after[0]) + 1 if after[0] in ids else len(ids)
            page = data[start : start + limit]
            has_more = start + limit < len(data)
        elif before:
            end = ids.index(before[0]) if before[0] in ids else 0
            page = data[max(0, end - limit) : end]
            has_more = end - limit > 0
        else:
            page = data[:limit]
            has_more = limit < len(data)
        doc = {
            "data": page,
            "has_more": has_more,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        }
        await sink.respond(200, [_JSON], orjson.dumps(doc))

    async def model(self, req: Request, sink: ResponseSink) -> None:
        wanted = unquote(req.path[len("/v1/models/") :])
        for m in await self._listing():
            if m["id"] == wanted:
                await sink.respond(200, [_JSON], orjson.dumps(m))
                return
        raise NotFound(f"model: {wanted}", param="model", code="model_not_found")

    async def root(self, req: Request, sink: ResponseSink) -> None:
        await sink.respond(200, [_JSON], b'{"status":"ok","service":"rawgate"}')

    async def event_logging(self, req: Request, sink: ResponseSink) -> None:
        await sink.respond(200, [_JSON], b"{}")  # telemetry goes nowhere


def _opts(call: GeminiCall) -> MessagesOptions:
    opts = call.reply_options
    return opts if isinstance(opts, MessagesOptions) else MessagesOptions()


def _alnum(ids: IdFactory) -> Callable[[int], str]:
    """The transcoder's id source (k characters) from the gateway's id factory."""
    return functools.partial(ids, "")
