"""What every front protocol's reply side hands back to the gateway: sans-IO, protocol-neutral.

Invariants:
- A stream transcoder turns Gemini `Reply` chunks into the client's wire bytes and nothing else:
  `start()` (bytes to send as soon as the upstream said 200), `feed(reply)` per chunk,
  `finish()` at the upstream's end, or `fail(err)` for an error the client must see in its own
  protocol's shape. After finish() or fail() nothing more is fed.
- What the gateway needs back is neutral: `usage` (a `TokenUsage`, never a protocol's usage
  dict), `stored` (the conversation items to keep for a follow-up request, or None) and
  `heartbeat` (the bytes that keep a quiet stream alive in this protocol).
- A complete (non-stream) reply is an `Answer` carrying the same three facts, so the gateway
  never re-parses the JSON it just built.
- Time and ids come from the injected `Clock` and `IdFactory` (defaults: the wall clock and
  random hex), so a transcoder under test is deterministic.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from rawgate.errors import RawgateError
    from rawgate.translate.gemini import Reply, Usage

__all__ = [
    "NO_USAGE",
    "Answer",
    "Clock",
    "IdFactory",
    "RawTranscoder",
    "Stored",
    "StreamTranscoder",
    "TokenUsage",
    "answer",
    "call_id_rand",
    "random_id",
    "token_usage",
    "wall_clock",
]

# Seconds since the epoch (the `created` fields of the replies).
Clock = Callable[[], float]
# (prefix, hex digits) -> an id such as "chatcmpl-" + 32 hex digits.
IdFactory = Callable[[str, int], str]

wall_clock: Clock = time.time


def random_id(prefix: str, digits: int) -> str:
    """The default id factory: `prefix` + `digits` random hex digits."""
    return prefix + secrets.token_hex((digits + 1) // 2)[:digits]


def call_id_rand(ids: IdFactory) -> Callable[[int], str] | None:
    """The random source for tool-call ids (signatures.mint_call_id) that goes with `ids`: None
    (the default, letters and digits) for the default factory, else ids("", n)."""
    if ids is random_id:
        return None
    return lambda n: ids("", n)


class TokenUsage(NamedTuple):
    """Tokens one answer cost, as the account counters and the scheduler count them."""

    input: int = 0  # prompt + tool-use prompt tokens
    output: int = 0  # candidate + thought tokens


NO_USAGE = TokenUsage()
_new_tuple = tuple.__new__


def token_usage(u: Usage | None) -> TokenUsage:
    """The neutral record of Gemini's (running-total) usageMetadata."""
    if u is None:
        return NO_USAGE
    prompt = u.promptTokenCount + u.toolUsePromptTokenCount
    # tuple.__new__ skips the NamedTuple's Python-level __new__ (~250 -> ~150 ns, once per
    # answer on the hot path).
    return _new_tuple(TokenUsage, (prompt, u.candidatesTokenCount + u.thoughtsTokenCount))


class Stored(NamedTuple):
    """Items a reply leaves for a follow-up request (Responses' previous_response_id)."""

    response_id: str
    input_items: list[dict[str, Any]]
    output_items: list[dict[str, Any]]


class Answer(NamedTuple):
    """A complete reply: the body to send, what it cost, and what to keep (or None)."""

    body: bytes
    usage: TokenUsage
    stored: Stored | None = None


def answer(body: bytes, usage: TokenUsage, stored: Stored | None = None) -> Answer:
    """Answer(body, usage, stored), built without the NamedTuple's Python-level __new__ (the
    render step of every non-stream request makes one)."""
    return _new_tuple(Answer, (body, usage, stored))


class StreamTranscoder(Protocol):
    """Gemini SSE replies in, one front protocol's stream bytes out (see the module note)."""

    @property
    def heartbeat(self) -> bytes:
        """Bytes that keep a quiet stream open without changing what the client reads."""
        ...

    @property
    def usage(self) -> TokenUsage:
        """Tokens of the last usageMetadata seen (NO_USAGE before any)."""
        ...

    @property
    def stored(self) -> Stored | None:
        """Once finish() ran: the items to keep, or None (nothing to keep, or not asked)."""
        ...

    def start(self) -> bytes: ...

    def feed(self, reply: Reply) -> bytes: ...

    def finish(self) -> bytes: ...

    def fail(self, err: RawgateError) -> bytes: ...


class RawTranscoder(Protocol):
    """A passthrough stream (the Gemini-native front): each upstream event's raw JSON payload in
    (already unwrapped from a Code Assist envelope), the client's framing out. Same life cycle
    as StreamTranscoder; `heartbeat` may be empty (then the stream gets none); `head` is the
    response head's content headers (the framing decides the content type)."""

    @property
    def head(self) -> tuple[tuple[bytes, bytes], ...]: ...

    @property
    def heartbeat(self) -> bytes: ...

    @property
    def usage(self) -> TokenUsage: ...

    @property
    def stored(self) -> Stored | None: ...

    def start(self) -> bytes: ...

    def feed(self, payload: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    def fail(self, err: RawgateError) -> bytes: ...
