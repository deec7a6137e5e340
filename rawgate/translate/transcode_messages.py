"""Gemini replies -> Anthropic Messages, whole or streamed (protocols-2.md A6-A9, E2-E6).

Invariants (streams):
- Every frame is `event: <type>` + one `data:` line + a blank line, the event name equal to
  `data.type` (both Anthropic SDKs drop data-only frames). No `[DONE]`.
- `message_start` comes first, built from the first reply, with a complete Message
  (`content: []`, `stop_reason: null`, usage with the prompt's tokens and `output_tokens: 1`).
- Blocks are strictly sequential, indexes 0, 1, 2 ... with no gaps: `content_block_start` ->
  deltas -> `content_block_stop`; at most one block is open. Thought text is a `thinking` block
  (`thinking_delta`s, none when the client asked `display: "omitted"`), closed by the
  signature that Gemini puts on a thought or empty-text part (`signature_delta`, set last, a
  tagged wrapper: sigtag.py). Text is a `text` block (empty text never opens one). A
  functionCall is a `tool_use` block that starts with `input: {}` and carries the whole
  arguments as one `input_json_delta` (Claude Code runs a tool with an empty input when the
  input sits in the start event); its id carries the call's signature (sigtag.py), its name is
  the client's (call.tools).
- The end is `message_delta` (stop_reason, stop_sequence, usage with output_tokens always) then
  `message_stop`, or, when the answer is unusable, an `event: error` and nothing after it. A
  stream that ends with no finishReason and no tool call is unusable (gemini-cli's rule), and
  so is one that sent nothing at all: `finish()` raises, the caller sends `fail(err)`.
- After finish() or fail(), feed() returns nothing. Usage is the LAST usageMetadata (a running
  total), reported as Anthropic counts it: input excludes cached tokens (E5).

`MessagesStream` is a contract.StreamTranscoder: `usage` is the neutral TokenUsage (the Anthropic
usage dict is `anthropic_usage`), `stored` is always None, `heartbeat` is a `ping` event.

stop_reason (Gemini -> Anthropic, E4): any tool_use block -> tool_use; MAX_TOKENS -> max_tokens;
safety-like reasons and a blocked prompt -> refusal; MALFORMED_FUNCTION_CALL and the other
"error" reasons -> an error (502, or an error event); everything else -> end_turn, or
stop_sequence when the text ends with one of the requested sequences.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from rawgate.errors import RawgateError, UpstreamError, UpstreamProtocolError
from rawgate.translate.call import GeminiCall
from rawgate.translate.contract import NO_USAGE, Stored, TokenUsage, token_usage
from rawgate.translate.gemini import (
    Candidate,
    FunctionCall,
    Part,
    Reply,
    Usage,
    arguments_text,
    finish_error,
    finish_kind,
    part_text,
)
from rawgate.translate.signatures import random_alnum
from rawgate.translate.sigtag import SignatureTagger

__all__ = [
    "PING",
    "MessagesOptions",
    "MessagesStream",
    "anthropic_error",
    "anthropic_message",
    "error_event",
    "messages_response",
    "messages_usage",
]

_dumps = orjson.dumps

PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


@dataclass(slots=True, frozen=True)
class MessagesOptions:
    """What the Anthropic request asked for that shapes the reply (mapping fills it)."""

    thinking_blocks: bool = False  # the client asked for thinking (enabled or adaptive)
    show_thinking: bool = True  # display "summarized"; False for "omitted"
    stop_sequences: tuple[str, ...] = ()
    single_tool: bool = False  # disable_parallel_tool_use: keep the first call only


def messages_usage(u: Usage | None) -> dict[str, Any]:
    """Anthropic usage from Gemini's usageMetadata: input excludes cached tokens, output counts
    the thoughts too (E5)."""
    if u is None:
        u = Usage()
    cached = u.cachedContentTokenCount
    return {
        "input_tokens": max(0, u.promptTokenCount + u.toolUsePromptTokenCount - cached),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": u.candidatesTokenCount + u.thoughtsTokenCount,
    }


def _stop_reason(
    reason: str | None, tools: bool, text_tail: str, opts: MessagesOptions
) -> tuple[str, str | None]:
    if tools:
        return "tool_use", None
    kind = finish_kind(reason) if reason else "stop"
    if kind == "length":
        return "max_tokens", None
    if kind == "content_filter":
        return "refusal", None
    for seq in opts.stop_sequences:
        if seq and text_tail.endswith(seq):
            return "stop_sequence", seq
    return "end_turn", None


def _blocked_text(reason: str, detail: str | None) -> str:
    msg = f"Gemini blocked the prompt (blockReason {reason})."
    return f"{msg} {detail}" if detail else msg


# ---- errors --------------------------------------------------------------------------------------

# HTTP status -> (status sent, Anthropic error type), A9/E6. 503 is what rawgate answers when the
# upstream is overloaded or every account rests: Claude Code and the SDKs know it as 529.
_ERR = {
    400: (400, "invalid_request_error"),
    401: (401, "authentication_error"),
    402: (402, "billing_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    408: (408, "timeout_error"),
    413: (413, "request_too_large"),
    429: (429, "rate_limit_error"),
    500: (500, "api_error"),
    502: (502, "api_error"),
    503: (529, "overloaded_error"),
    504: (504, "timeout_error"),
}
# Codes no retry can fix: tell the SDKs and Claude Code not to spend minutes retrying.
_NO_RETRY_CODES = frozenset(
    {
        "insufficient_quota",
        "invalid_api_key",
        "upstream_auth_failed",
        "context_length_exceeded",
        "invalid_model",
    }
)
# Gemini's context overflow (protocols-2.md vector 9) and the words Claude Code's compaction
# logic parses (A9).
_CONTEXT = re.compile(
    r"input token count \((\d+)\) exceeds the maximum number of tokens allowed \((\d+)\)"
)


def anthropic_message(err: RawgateError) -> str:
    """The error message an Anthropic client reads: Gemini's context overflow in Anthropic's
    `prompt is too long: N tokens > M maximum`, anything else as it is."""
    if err.code == "context_length_exceeded":
        m = _CONTEXT.search(err.message)
        if m is not None:
            return f"prompt is too long: {m.group(1)} tokens > {m.group(2)} maximum"
    return err.message


def anthropic_error(err: RawgateError) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """(status, body, headers to add to err.headers) for an error on an Anthropic route:
    `x-should-retry: false` when no retry can fix it, else the retry hints the SDKs read
    (`retry-after`, `retry-after-ms`) unless err.headers has them."""
    default = "api_error" if err.status >= 500 else "invalid_request_error"
    status, etype = _ERR.get(err.status, (err.status, default))
    body = _dumps({"type": "error", "error": {"type": etype, "message": anthropic_message(err)}})
    have = {h[0].lower() for h in err.headers}
    headers: list[tuple[bytes, bytes]] = []
    final = err.code in _NO_RETRY_CODES or err.status == 401
    if final:
        headers.append((b"x-should-retry", b"false"))
    elif err.retry_after_s is not None and err.retry_after_s > 0:
        secs = err.retry_after_s
        if b"retry-after" not in have:
            headers.append((b"retry-after", str(max(1, math.ceil(secs))).encode()))
        if b"retry-after-ms" not in have:
            headers.append((b"retry-after-ms", str(math.ceil(secs * 1000)).encode()))
    return status, body, headers


def error_event(err: RawgateError) -> bytes:
    """The `event: error` frame for a failure after the 200 (A7 rule 9)."""
    _, etype = _ERR.get(err.status, (err.status, "api_error"))
    data = _dumps({"type": "error", "error": {"type": etype, "message": anthropic_message(err)}})
    return b"event: error\ndata: " + data + b"\n\n"


# ---- blocks shared by both forms -----------------------------------------------------------------


class _Blocks:
    """Turns Gemini parts into Anthropic content blocks, as block events (stream) or as block
    objects (non-stream). One open block at a time; see the module invariants."""

    __slots__ = (
        "_call",
        "_ids",
        "_opts",
        "_sig",
        "_stream",
        "_tail",
        "_text_head",
        "blocks",
        "index",
        "open",
        "out",
        "text_tail",
        "tools",
    )

    def __init__(
        self,
        call: GeminiCall,
        opts: MessagesOptions,
        sig: SignatureTagger,
        ids: Callable[[int], str],
        stream: bool,
    ) -> None:
        self._call = call
        self._opts = opts
        self._sig = sig
        self._ids = ids
        self._stream = stream
        self.blocks: list[dict[str, Any]] = []  # non-stream: the finished blocks
        self.index = -1  # index of the last block started
        self.open: str | None = None  # "thinking" | "text" | None
        self.out: list[bytes] = []  # stream: frames not yet returned
        self.text_tail = ""  # the end of the text so far (stop_sequence detection)
        self._tail = bool(opts.stop_sequences)  # only then is text_tail kept
        self._text_head = b""  # stream: the open text block's delta frame up to the text
        self.tools = 0

    # one frame per event; the event name equals data.type
    def _emit(self, etype: bytes, data: bytes) -> None:
        self.out.append(b"event: " + etype + b"\ndata: " + data + b"\n\n")

    def _start(self, kind: str, block: dict[str, Any]) -> None:
        self.index += 1
        if self._stream:
            self._emit(
                b"content_block_start",
                b'{"type":"content_block_start","index":'
                + str(self.index).encode()
                + b',"content_block":'
                + _dumps(block)
                + b"}",
            )
        else:
            self.blocks.append(block)
        self.open = kind

    def _delta(self, delta: dict[str, Any]) -> None:
        self._emit(
            b"content_block_delta",
            b'{"type":"content_block_delta","index":'
            + str(self.index).encode()
            + b',"delta":'
            + _dumps(delta)
            + b"}",
        )

    def close(self) -> None:
        if self.open is None:
            return
        if self._stream:
            self._emit(
                b"content_block_stop",
                b'{"type":"content_block_stop","index":' + str(self.index).encode() + b"}",
            )
        self.open = None

    def _thinking(self, text: str) -> None:
        if self.open != "thinking":
            self.close()
            self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        if text and self._opts.show_thinking:
            if self._stream:
                self._delta({"type": "thinking_delta", "thinking": text})
            else:
                self.blocks[-1]["thinking"] += text

    def _signature(self, signature: str) -> None:
        """A signature on a thought or text part: it closes the thinking block it belongs to
        (opening an empty one if the thoughts were not shown or not asked for)."""
        if self.open != "thinking":
            if not self._opts.thinking_blocks:
                return  # no slot for it; Gemini does not validate text-part signatures
            self._thinking("")
        wrapped = self._sig.wrap(self._call.model, signature)
        if self._stream:
            self._delta({"type": "signature_delta", "signature": wrapped})
        else:
            self.blocks[-1]["signature"] = wrapped
        self.close()

    def _text(self, text: str) -> None:
        if self.open != "text":
            self.close()
            self._start("text", {"type": "text", "text": ""})
            self._text_head = (
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                + str(self.index).encode()
                + b',"delta":{"type":"text_delta","text":'
            )
        if self._stream:
            # The frame in one concatenation from the block's cached head: text deltas are
            # most of a stream (bench.micro "messages transcoder feed only": 1.75-2.35 ->
            # 0.56-0.71 us a chunk, chat's is 0.52-0.75 in the same runs).
            self.out.append(self._text_head + _dumps(text) + b"}}\n\n")
        else:
            self.blocks[-1]["text"] += text
        if self._tail:
            self.text_tail = (self.text_tail + text)[-256:]

    def _tool(self, part: Part, fc: FunctionCall) -> None:
        if self._opts.single_tool and self.tools:
            return  # disable_parallel_tool_use: Gemini has no knob, keep the first call only
        self.close()
        origin = self._call.tools.get(fc.name)
        name = origin.name if origin is not None else fc.name
        sig = part.thoughtSignature
        rand = self._ids(12 if sig else 24)
        tool_id = self._sig.tool_id(self._call.model, sig, rand)
        args = arguments_text(fc)
        if self._stream:
            self._start("tool", {"type": "tool_use", "id": tool_id, "name": name, "input": {}})
            self._delta({"type": "input_json_delta", "partial_json": args})
        else:
            try:
                value = orjson.loads(args)
            except orjson.JSONDecodeError:
                value = {}
            if not isinstance(value, dict):
                value = {"value": value}
            self._start("tool", {"type": "tool_use", "id": tool_id, "name": name, "input": value})
        self.tools += 1
        self.close()

    def parts(self, parts: list[Part]) -> None:
        for p in parts:
            fc = p.functionCall
            if fc is not None:
                self._tool(p, fc)
                continue
            if p.thought:
                self._thinking(p.text or "")
                if p.thoughtSignature:
                    self._signature(p.thoughtSignature)
                continue
            t = p.text if p.text is not None else part_text(p)
            if p.thoughtSignature:
                self._signature(p.thoughtSignature)  # before the text it sat on
            if t:
                self._text(t)


def _check_candidate(cand: Candidate) -> None:
    reason = cand.finishReason
    if reason and finish_kind(reason) == "error":
        raise finish_error(reason, cand.finishMessage)


def _message_head(call: GeminiCall, msg_id: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": call.client_model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }


def _msg_id(reply: Reply | None, ids: Callable[[int], str]) -> str:
    rid = reply.responseId if reply is not None else None
    return "msg_" + (rid if rid else ids(24))


# ---- non-stream ----------------------------------------------------------------------------------


def messages_response(
    call: GeminiCall,
    reply: Reply,
    opts: MessagesOptions,
    sig: SignatureTagger,
    ids: Callable[[int], str] = random_alnum,
) -> bytes:
    """The Message JSON for a whole Gemini reply; raises an UpstreamError when Gemini's answer
    is unusable (an error finish reason)."""
    b = _Blocks(call, opts, sig, ids, stream=False)
    cand = reply.candidates[0] if reply.candidates else None
    if cand is None:
        pf = reply.promptFeedback
        if pf is None or not pf.blockReason:
            raise UpstreamProtocolError("Gemini answered with no candidate", code="upstream_empty")
        stop, seq = "refusal", None
        b.blocks.append(
            {"type": "text", "text": _blocked_text(pf.blockReason, pf.blockReasonMessage)}
        )
    else:
        _check_candidate(cand)
        if cand.content is not None:
            b.parts(cand.content.parts)
        stop, seq = _stop_reason(cand.finishReason, b.tools > 0, b.text_tail, opts)
    msg = _message_head(call, _msg_id(reply, ids), messages_usage(reply.usageMetadata))
    msg["content"] = b.blocks
    msg["stop_reason"] = stop
    msg["stop_sequence"] = seq
    return _dumps(msg)


# ---- stream --------------------------------------------------------------------------------------


class MessagesStream:
    """Anthropic Messages stream transcoder for one response (see the module invariants)."""

    __slots__ = (
        "_blocks",
        "_call",
        "_error",
        "_failed",
        "_finished",
        "_ids",
        "_opts",
        "_reason",
        "_started",
        "_usage",
    )

    def __init__(
        self,
        call: GeminiCall,
        opts: MessagesOptions,
        sig: SignatureTagger,
        ids: Callable[[int], str] = random_alnum,
    ) -> None:
        self._call = call
        self._opts = opts
        self._ids = ids
        self._blocks = _Blocks(call, opts, sig, ids, stream=True)
        self._started = False
        self._usage: Usage | None = None
        self._reason: str | None = None  # the finishReason seen, or "" once blocked
        self._error: UpstreamError | None = None
        self._finished = False
        self._failed = False

    @property
    def usage(self) -> TokenUsage:
        """The neutral tokens of the last usageMetadata seen (contract.StreamTranscoder)."""
        return token_usage(self._usage) if self._usage is not None else NO_USAGE

    @property
    def anthropic_usage(self) -> dict[str, Any] | None:
        """Anthropic usage of the last usageMetadata seen, or None."""
        return messages_usage(self._usage) if self._usage is not None else None

    @property
    def stored(self) -> Stored | None:
        return None  # Anthropic clients resend the whole history: nothing to keep

    @property
    def error(self) -> UpstreamError | None:
        return self._error

    @property
    def heartbeat(self) -> bytes:
        """A keep-alive while Gemini thinks (SDKs skip pings)."""
        return PING

    def start(self) -> bytes:
        """Nothing before the first reply: message_start carries its id and prompt tokens."""
        return b""

    def feed(self, reply: Reply) -> bytes:
        if self._finished or self._failed or self._error is not None:
            return b""
        b = self._blocks
        if reply.usageMetadata is not None:
            self._usage = reply.usageMetadata
        if not self._started:
            self._start(reply)
        if self._reason is not None:
            return self._take()
        cands = reply.candidates
        if not cands:
            pf = reply.promptFeedback
            if pf is not None and pf.blockReason:
                b.close()
                b._text(_blocked_text(pf.blockReason, pf.blockReasonMessage))
                b.close()
                self._reason = ""  # blocked: refusal
            return self._take()
        cand = cands[0]  # Anthropic has one choice; candidateCount is never set by mapping
        if cand.content is not None and cand.content.parts:
            b.parts(cand.content.parts)
        if cand.finishReason:
            if finish_kind(cand.finishReason) == "error":
                self._error = finish_error(cand.finishReason, cand.finishMessage)
            self._reason = cand.finishReason
        return self._take()

    def finish(self) -> bytes:
        """The end of the upstream body: the closing events. Raises an UpstreamError when the
        answer is unusable; the caller then sends fail(err)."""
        if self._finished or self._failed:
            return b""
        self._finished = True
        b = self._blocks
        if self._error is None:
            if not self._started:
                self._error = UpstreamProtocolError(
                    "Gemini ended the stream without sending anything", code="upstream_truncated"
                )
            elif self._reason is None and not b.tools:
                self._error = UpstreamProtocolError(
                    "Gemini closed the stream before the answer was finished (no finishReason)",
                    code="upstream_truncated",
                )
        if self._error is not None:
            raise self._error
        b.close()
        if self._reason == "":
            stop, seq = "refusal", None
        else:
            stop, seq = _stop_reason(self._reason, b.tools > 0, b.text_tail, self._opts)
        usage = messages_usage(self._usage)
        b._emit(
            b"message_delta",
            _dumps(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": seq},
                    "usage": usage,
                }
            ),
        )
        b.out.append(_STOP)
        return self._take()

    def fail(self, err: RawgateError) -> bytes:
        """An `event: error` after the stream started; nothing follows it."""
        if self._failed or (self._finished and self._error is None):
            return b""
        self._failed = True
        head = b""
        if not self._started:  # the SDKs need a message_start before anything
            self._start(None)
            head = self._take()
        return head + error_event(err)

    def _start(self, reply: Reply | None) -> None:
        self._started = True
        usage = messages_usage(self._usage)
        usage["output_tokens"] = 1  # as Anthropic's own first event (the SDK fixtures)
        msg = _message_head(self._call, _msg_id(reply, self._ids), usage)
        self._blocks._emit(b"message_start", _dumps({"type": "message_start", "message": msg}))

    def _take(self) -> bytes:
        out = self._blocks.out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data
