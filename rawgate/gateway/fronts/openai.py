"""The OpenAI fronts: Chat Completions, legacy Completions and Responses on the front seam.

Invariants:
- Each is a `Front` (gateway/front.py): request bytes -> `GeminiCall` through translate's
  schemas + mapping, replies through transcode_chat / transcode_responses. Their errors keep the
  app's OpenAI shape (`error` returns None), so every wire answer is what it was before the seam.
- They read the gateway's live settings (model router, JSON depth, sticky key, schema work) at
  each request, so a SIGHUP reload applies to the next request as before.
- Responses keeps finished items in the gateway's response store through the `stored` field of
  its answers; it reads the store only to resolve `previous_response_id`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from rawgate.errors import BadRequest, ServiceUnavailable
from rawgate.translate import mapping, schemas
from rawgate.translate.contract import answer, token_usage
from rawgate.translate.transcode_chat import ChatStream, chat_response, completion_response
from rawgate.translate.transcode_responses import ResponsesStream, responses_answer

if TYPE_CHECKING:
    from rawgate.errors import RawgateError
    from rawgate.gateway.core import Gateway
    from rawgate.gateway.front import ErrorReply
    from rawgate.seam import AccessRecord, Request
    from rawgate.translate.call import GeminiCall
    from rawgate.translate.contract import Answer, Clock, IdFactory, StreamTranscoder
    from rawgate.translate.gemini import Reply

__all__ = ["ChatFront", "CompletionsFront", "ResponsesFront"]


class _OpenAIFront:
    """What the three share: the gateway's services and the OpenAI error shape."""

    __slots__ = ("gw",)

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def error(self, err: RawgateError) -> ErrorReply | None:
        return None  # the app's OpenAI JSON error

    async def _map(self, fn: Callable[..., GeminiCall], *args: Any, **kw: Any) -> GeminiCall:
        """Map on the loop while the request's new tool schemas cost at most
        limits.tool_schema_inline_work units; past that, again in a worker thread, which hands
        the GIL back every few ms: one request's schemas cannot hold the other requests up."""
        gw = self.gw
        kw["schemas"] = gw.tool_schemas
        try:
            return fn(*args, inline_work=gw.inline_work, **kw)
        except mapping.SchemasOffLoop:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kw))


class ChatFront(_OpenAIFront):
    """POST /v1/chat/completions."""

    __slots__ = ()

    async def decode(self, req: Request, access: AccessRecord) -> GeminiCall:
        gw = self.gw
        body = schemas.decode_chat(req.body, max_depth=gw.max_depth)
        model = gw.resolve(access, body.model)
        return await self._map(mapping.chat_to_gemini, body, model, key=gw.sticky)

    def render(self, call: GeminiCall, reply: Reply, clock: Clock, ids: IdFactory) -> Answer:
        return answer(chat_response(call, reply, clock, ids), token_usage(reply.usageMetadata))

    def stream(self, call: GeminiCall, clock: Clock, ids: IdFactory) -> StreamTranscoder:
        return ChatStream(call, clock=clock, ids=ids)


class CompletionsFront(_OpenAIFront):
    """POST /v1/completions (legacy)."""

    __slots__ = ()

    async def decode(self, req: Request, access: AccessRecord) -> GeminiCall:
        gw = self.gw
        body = schemas.decode_completion(req.body, max_depth=gw.max_depth)
        return mapping.completion_to_gemini(body, gw.resolve(access, body.model), key=gw.sticky)

    def render(self, call: GeminiCall, reply: Reply, clock: Clock, ids: IdFactory) -> Answer:
        return answer(
            completion_response(call, reply, clock=clock, ids=ids),
            token_usage(reply.usageMetadata),
        )

    def stream(self, call: GeminiCall, clock: Clock, ids: IdFactory) -> StreamTranscoder:
        return ChatStream(call, completions=True, clock=clock, ids=ids)


class ResponsesFront(_OpenAIFront):
    """POST /v1/responses (and /responses)."""

    __slots__ = ()

    async def decode(self, req: Request, access: AccessRecord) -> GeminiCall:
        gw = self.gw
        body = schemas.decode_responses(req.body, max_depth=gw.max_depth)
        model = gw.resolve(access, body.model)
        history = None
        if body.previous_response_id:
            history = await gw.stored_history(body.previous_response_id)
            if history is None and gw.shared_responses is not None and gw.shared_responses.degraded:
                # Not "not found": the shared store that may hold it does not answer. A 503
                # with Retry-After, which the SDKs retry, instead of a 400 that ends the chat.
                wait = max(1, int(gw.shared_responses.health.delay_s + 0.999))
                raise ServiceUnavailable(
                    f"Previous response with id '{body.previous_response_id}' cannot be read"
                    " while the shared state store is unreachable; retry shortly.",
                    param="previous_response_id",
                    code="state_unavailable",
                    headers=[(b"retry-after", str(wait).encode())],
                )
            if history is None:
                raise BadRequest(
                    f"Previous response with id '{body.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
        return await self._map(mapping.responses_to_gemini, body, model, history, key=gw.sticky)

    def render(self, call: GeminiCall, reply: Reply, clock: Clock, ids: IdFactory) -> Answer:
        return responses_answer(call, reply, ids("resp_", 32), clock=clock, ids=ids)

    def stream(self, call: GeminiCall, clock: Clock, ids: IdFactory) -> StreamTranscoder:
        return ResponsesStream(call, ids("resp_", 32), clock=clock, ids=ids)
