"""The Gemini-native front (`/{v1beta,v1}/models/{model}:{verb}`, the model listing in Google's
shape) and OpenAI's `POST /v1/embeddings`, both passthrough fronts (gateway/front.py).

Invariants:
- Native: the client's body goes upstream byte for byte (translate/native.py checks only that
  it is a JSON object fit for the verb); the model in the URL is the only thing rewritten (by
  the model router), with the body's own copies of it (`requests[i].model` ...) when they
  named it (translate/native.rename_body_models). The client's credential (`x-goog-api-key`,
  `?key=`, Bearer) is checked by the app like on every route and never forwarded: the
  upstream call carries the picked account's key, or its OAuth token inside the Code Assist
  envelope (unwrapped on the way back, so the client cannot tell). countTokens and
  embeddings go to API-key accounts only.
- Native streams: the upstream is always asked for SSE; each event's JSON payload is relayed
  as it came (`data: ...\\r\\n\\r\\n`, or an element of the JSON array when the client did not
  ask `alt=sse`), never re-encoded. A stream that ends without any `finishReason` is not ended
  silently: Google's in-stream error object follows (503 UNAVAILABLE, which google-genai raises
  as an APIError and the Gemini CLI retries), and so does any failure after the 200. No
  heartbeat bytes: Google's stream parsers accept only data events.
- With sticky scheduling, a conversation (its system instruction and first turn, as sent)
  stays on one account, so its thought signatures stay valid.
- Errors on native routes are Google's `{"error": {code, message, status, details}}`
  (translate/native.google_error), the app's own refusals included (Route.error).
- Embeddings: inputs are split into batchEmbedContents calls of 100 (map_embeddings), issued
  at most `limits.embedding_parallel_chunks` at a time, each with the attempt loop's rotation
  and retries on API-key accounts, reassembled in input order; the first chunk that fails for
  good fails the request (the others are cancelled).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import orjson

from rawgate.errors import InternalError, NotFound, RawgateError, UpstreamProtocolError
from rawgate.seam import Header
from rawgate.translate import map_embeddings
from rawgate.translate.call import GeminiCall, Passthrough
from rawgate.translate.contract import NO_USAGE, answer, token_usage
from rawgate.translate.gemini import Usage
from rawgate.translate.native import (
    check_body,
    google_error,
    has_finish_reason,
    parse_native_path,
    rename_body_models,
)

if TYPE_CHECKING:
    from rawgate.gateway.core import Gateway
    from rawgate.gateway.front import ErrorReply
    from rawgate.seam import AccessRecord, Request, ResponseSink
    from rawgate.translate.contract import Answer, Stored, TokenUsage

__all__ = ["EMBEDDINGS", "EMBEDDING_ALIASES", "EmbeddingsFront", "NativeFront", "NativeStream"]

_JSON: Header = (b"content-type", b"application/json")
# Verbs Code Assist has no route for: API-key accounts only.
_KEY_ONLY = frozenset({"countTokens", "embedContent", "batchEmbedContents"})
# OpenAI's embedding model names, sent to routing.embedding_model.
EMBEDDING_ALIASES = frozenset(
    {
        "text-embedding-3-small",
        "text-embedding-3-large",
        "text-embedding-ada-002",
        "text-embedding-004",
    }
)
_SSE_HEAD: tuple[Header, ...] = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
_ARRAY_HEAD: tuple[Header, ...] = (
    _JSON,
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
_NO_FINISH = UpstreamProtocolError(
    "The model's stream ended before the model said it had finished: the answer may be "
    "incomplete. Send the request again."
)


class _Opening(msgspec.Struct):
    """What identifies a conversation for sticky scheduling, as raw bytes."""

    contents: list[msgspec.Raw] = []
    systemInstruction: msgspec.Raw = msgspec.Raw()
    system_instruction: msgspec.Raw = msgspec.Raw()


_opening = msgspec.json.Decoder(_Opening)


def conversation_key(body: bytes) -> str | None:
    """A key of the conversation's opening (system instruction and first turn, as sent): a
    client resends them unchanged every turn, so sticky scheduling keeps the conversation, and
    its thought signatures, on one account (protocols-2.md C3.4)."""
    try:
        doc = _opening.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not doc.contents:
        return None
    h = hashlib.blake2b(digest_size=12)
    h.update(bytes(doc.systemInstruction or doc.system_instruction))
    h.update(b"\x00")
    h.update(bytes(doc.contents[0]))
    return h.hexdigest()


class _UsageOnly(msgspec.Struct):
    usageMetadata: Usage | None = None


_usage_of = msgspec.json.Decoder(_UsageOnly)


def _usage(payload: bytes) -> TokenUsage:
    """Tokens of a reply, read without decoding the rest of it (nothing when it has none)."""
    if b'"usageMetadata"' not in payload:
        return NO_USAGE
    try:
        return token_usage(_usage_of.decode(payload).usageMetadata)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return NO_USAGE


def _google_shape(err: RawgateError) -> ErrorReply:
    status, body, _ = google_error(err)  # its headers are err.headers', which the caller adds
    return status, [_JSON], body


class NativeFront:
    """POST /{v1beta,v1}/models/{model}:{generateContent|streamGenerateContent|countTokens|
    embedContent|batchEmbedContents}."""

    __slots__ = ("gw",)

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def error(self, err: RawgateError) -> ErrorReply | None:
        return _google_shape(err)

    async def decode(self, req: Request, access: AccessRecord) -> GeminiCall:
        route = parse_native_path(req.path)
        if route is None:
            raise NotFound(
                f"Unknown path '{req.path}': rawgate serves /v1beta/models/{{model}}:"
                "generateContent, :streamGenerateContent, :countTokens, :embedContent and "
                ":batchEmbedContents (also under /v1)."
            )
        verb = route.method
        access.model = route.model
        model = self.gw.resolve(access, route.model)
        check_body(req.body, verb)
        body = req.body
        if model != route.model:
            body = rename_body_models(body, verb, route.model, model)
        stream = verb == "streamGenerateContent"
        array = stream and "sse" not in _query_values(req.query, "alt")
        key = None
        if self.gw.sticky and verb in ("generateContent", "streamGenerateContent"):
            key = conversation_key(req.body)
        return GeminiCall(
            api="native",
            model=model,
            client_model=route.model,
            stream=stream,
            body={},
            passthrough=Passthrough(verb, body, verb in _KEY_ONLY, array),
            conversation_key=key,
        )

    def render_raw(self, call: GeminiCall, payload: bytes) -> Answer:
        return answer(payload, _usage(payload))

    def stream_raw(self, call: GeminiCall) -> NativeStream:
        pt = call.passthrough
        return NativeStream(pt is not None and pt.array)


class NativeStream:
    """Raw upstream events in, the client's framing out (see the module note)."""

    __slots__ = ("_array", "_finished", "_last_usage", "_n", "head")

    heartbeat = b""
    stored: Stored | None = None

    def __init__(self, array: bool) -> None:
        self._array = array
        self.head = _ARRAY_HEAD if array else _SSE_HEAD
        self._n = 0  # events relayed
        self._finished = False  # some event carried a finishReason
        # The last event with usageMetadata (running totals): decoded once, when asked.
        self._last_usage = b""

    @property
    def usage(self) -> TokenUsage:
        return _usage(self._last_usage) if self._last_usage else NO_USAGE

    def start(self) -> bytes:
        return b""

    def _frame(self, payload: bytes) -> bytes:
        self._n += 1
        if self._array:
            return (b"[" if self._n == 1 else b"\n,\r\n") + payload
        return b"data: " + payload + b"\r\n\r\n"

    def feed(self, payload: bytes) -> bytes:
        if b"\n" in payload or b"\r" in payload:
            # A multi-line data event (pretty-printed JSON): outside strings a newline is only
            # whitespace, so a space keeps the JSON equal and the SSE framing intact.
            payload = payload.replace(b"\r", b" ").replace(b"\n", b" ")
        if not self._finished and has_finish_reason(payload):
            self._finished = True
        if b'"usageMetadata"' in payload:
            self._last_usage = payload
        return self._frame(payload)

    def _close(self) -> bytes:
        if not self._array:
            return b""
        return b"[]" if self._n == 0 else b"\n]"

    def finish(self) -> bytes:
        if not self._finished:
            return self.fail(_NO_FINISH)
        return self._close()

    def fail(self, err: RawgateError) -> bytes:
        _, body, _ = google_error(err)
        return self._frame(body) + self._close()


def _query_values(query: str, name: str) -> list[str]:
    out = []
    for part in query.split("&"):
        k, eq, v = part.partition("=")
        if k == name and eq:
            out.append(v)
    return out


# ---- the model listing in Google's shape -------------------------------------------------------


def google_model(name: str) -> dict[str, Any]:
    """A Model object as GET /v1beta/models lists it (what google-genai's Model reads)."""
    embedding = "embedding" in name
    methods = (
        ["embedContent", "batchEmbedContents", "countTokens"]
        if embedding
        else ["generateContent", "streamGenerateContent", "countTokens"]
    )
    return {
        "name": "models/" + name,
        "displayName": name,
        "supportedGenerationMethods": methods,
    }


def wants_google_listing(req: Request) -> bool:
    """GET /v1/models is both OpenAI's and google-genai's listing: Google's clients are told
    apart by their headers (x-goog-api-key, x-goog-api-client) or a `?key=`."""
    if req.header(b"x-goog-api-key") is not None or req.header(b"x-goog-api-client") is not None:
        return True
    return bool(_query_values(req.query, "key"))


# ---- OpenAI embeddings ---------------------------------------------------------------------------


class EmbeddingsFront:
    """The passthrough front of one batchEmbedContents chunk (the route is `embeddings`)."""

    __slots__ = ()

    async def decode(self, req: Request, access: AccessRecord) -> GeminiCall:
        # Never called: `embeddings` builds each chunk's call itself (one request, many calls).
        raise InternalError("the embeddings front decodes no request")

    def render_raw(self, call: GeminiCall, payload: bytes) -> Answer:
        return answer(payload, _usage(payload))

    def stream_raw(self, call: GeminiCall) -> NativeStream:
        # Never called: batchEmbedContents has no streaming form.
        raise InternalError("embeddings never stream")

    def error(self, err: RawgateError) -> ErrorReply | None:
        return None


EMBEDDINGS = _EMBED_FRONT = EmbeddingsFront()


class _Capture:
    """A ResponseSink that keeps the one response a chunk's attempt loop writes."""

    __slots__ = ("body", "headers", "started", "status")

    def __init__(self) -> None:
        self.started = False
        self.status = 0
        self.body = b""
        self.headers: list[Header] = []

    @property
    def bytes_sent(self) -> int:
        return len(self.body)

    async def respond(self, status: int, headers: list[Header], body: bytes) -> None:
        self.started = True
        self.status, self.headers, self.body = status, headers, body

    async def start(self, status: int, headers: list[Header]) -> None:
        raise AssertionError("an embeddings chunk never streams")

    async def send(self, data: bytes) -> None:
        raise AssertionError("an embeddings chunk never streams")

    async def end(self, data: bytes = b"") -> None:
        raise AssertionError("an embeddings chunk never streams")


def embedding_model(gw: Gateway, name: str) -> str:
    """The Gemini embedding model for the client's `name`."""
    if name in EMBEDDING_ALIASES:
        return gw.cfg.routing.embedding_model
    return gw.router.resolve(name)


async def embeddings(gw: Gateway, req: Request, sink: ResponseSink) -> None:
    """POST /v1/embeddings (see the module note)."""
    body, inputs = map_embeddings.decode_embeddings(req.body)
    access = req.access
    access.model = body.model
    access.mapped_model = model = embedding_model(gw, body.model)
    chunks = map_embeddings.batch_bodies(body, inputs, model)
    replies: list[_Capture | None] = [None] * len(chunks)
    failure: list[RawgateError] = []
    limiter = anyio.CapacityLimiter(gw.cfg.limits.embedding_parallel_chunks)

    async def one(k: int) -> _Capture:
        call = GeminiCall(
            api="embeddings",
            model=model,
            client_model=body.model,
            stream=False,
            body={},
            passthrough=Passthrough("batchEmbedContents", chunks[k], True),
        )
        cap = _Capture()
        await gw._proxy(req, cap, _EMBED_FRONT, call)
        return cap

    async def bounded(k: int, tg: anyio.abc.TaskGroup) -> None:
        async with limiter:
            try:
                replies[k] = await one(k)
            except RawgateError as e:
                if not failure:
                    failure.append(e)  # the first failure is the request's; stop the others
                tg.cancel_scope.cancel()

    if len(chunks) == 1:
        replies[0] = await one(0)  # no task group for the common case
    else:
        async with anyio.create_task_group() as tg:
            for k in range(len(chunks)):
                tg.start_soon(bounded, k, tg)
    if failure:
        raise failure[0]
    vectors: list[list[float]] = []
    tokens: int | None = 0
    head: list[Header] = []
    for k, cap in enumerate(replies):
        assert cap is not None
        n = min(map_embeddings.BATCH_LIMIT, len(inputs) - k * map_embeddings.BATCH_LIMIT)
        vecs, t = map_embeddings.vectors_of(cap.body, n)
        vectors.extend(vecs)
        tokens = None if t is None or tokens is None else tokens + t
        if not head:
            head = [h for h in cap.headers if h[0] != b"content-type"]
    out = map_embeddings.embeddings_response(
        body.model, vectors, inputs, body.encoding_format, tokens
    )
    await sink.respond(200, [_JSON, *head], out)


def encode_listing(names: list[str]) -> bytes:
    return orjson.dumps({"models": [google_model(n) for n in names]})
