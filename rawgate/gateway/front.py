"""The front-protocol seam: what a client protocol (OpenAI Chat, Responses, Anthropic Messages,
Gemini native, ...) gives the gateway, and nothing more.

Invariants:
- A front is one object registered on its routes (`Gateway.add_front`). It decodes request
  bytes into the neutral `GeminiCall` (filling the request's access record: the model asked
  for and the one it maps to), renders a complete reply as an `Answer`, makes a
  `StreamTranscoder` for a stream, and may shape errors for its clients.
- The gateway's attempt loop, the scheduler, the pool and the stream pump see only this
  interface and the neutral records of translate/contract.py: adding a front touches no other
  front and no part of the data path.
- `decode` may do I/O the protocol needs (a response store lookup, schema work offloaded to a
  thread); `render` and `stream` are sans-IO and take the clock and the id factory they must
  use, so a front's replies are deterministic under test.
- A passthrough front (`PassthroughFront`: the Gemini-native routes, embeddings) decodes to a
  call carrying `call.passthrough` (the verb and the client's body bytes); the loop sends that
  body as it is and gives the front the raw reply bytes (`render_raw`, `stream_raw`), so
  nothing is decoded or re-encoded on the way. Rotation, retries and accounting are the same.
- `error` returns None to leave the shape to the app (OpenAI's JSON error body, which the app
  writes for every route it refuses before a handler runs), or (status, headers, body) for a
  protocol whose clients expect another shape. Only called before the response started: after
  that the transcoder's `fail()` tells the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from rawgate.seam import Header

if TYPE_CHECKING:
    from rawgate.errors import RawgateError
    from rawgate.seam import AccessRecord, Request
    from rawgate.translate.call import GeminiCall
    from rawgate.translate.contract import (
        Answer,
        Clock,
        IdFactory,
        RawTranscoder,
        StreamTranscoder,
    )
    from rawgate.translate.gemini import Reply

__all__ = ["AnyFront", "ErrorReply", "Front", "PassthroughFront"]

ErrorReply = tuple[int, list[Header], bytes]


class Front(Protocol):
    """One client protocol on the gateway's data path (see the module note)."""

    async def decode(self, req: Request, access: AccessRecord) -> GeminiCall:
        """Request bytes -> the upstream call; raises a RawgateError (a 4xx) for bad input.
        Sets access.model / access.mapped_model once the model is known."""
        ...

    def render(self, call: GeminiCall, reply: Reply, clock: Clock, ids: IdFactory) -> Answer:
        """A complete (non-stream) reply; raises a RawgateError for an unusable answer."""
        ...

    def stream(self, call: GeminiCall, clock: Clock, ids: IdFactory) -> StreamTranscoder:
        """A fresh transcoder for one streamed reply."""
        ...

    def error(self, err: RawgateError) -> ErrorReply | None:
        """`err` in this protocol's shape, or None for the app's (OpenAI) shape."""
        ...


class PassthroughFront(Protocol):
    """A front whose calls carry `call.passthrough`: replies come back as raw bytes."""

    async def decode(self, req: Request, access: AccessRecord) -> GeminiCall: ...

    def render_raw(self, call: GeminiCall, payload: bytes) -> Answer:
        """A complete reply from the upstream's JSON (unwrapped from Code Assist)."""
        ...

    def stream_raw(self, call: GeminiCall) -> RawTranscoder:
        """A fresh passthrough transcoder for one streamed reply."""
        ...

    def error(self, err: RawgateError) -> ErrorReply | None: ...


AnyFront = Front | PassthroughFront
