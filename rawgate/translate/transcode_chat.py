"""Gemini replies -> OpenAI Chat Completions and legacy Completions, whole or streamed.

Invariants (streams, protocols.md C3/C6/D):
- Incremental: `feed(reply)` returns at once every frame that reply completes (often several
  per upstream chunk, joined into one write); nothing is held back for later chunks.
- Per choice (`index` = Gemini candidate index, n>1 interleaves): the first frame carries
  `{"role": "assistant", "content": "", "refusal": null}` and role never repeats; thought parts
  become `reasoning_content` deltas, other text `content` deltas (empty text, signature-only
  parts send nothing); a functionCall becomes one tool-call delta carrying index (0, 1, ... per
  choice, in order of appearance), id, type, name and the whole arguments text, so no id or name
  is ever repeated. Tool-call ids are minted by `signatures.mint_call_id`, carrying the part's
  thoughtSignature when it has one (only that call: never one signature on every call); names
  come back as the client declared them (`call.tools`). A signature on a text part has no Chat
  slot and is dropped (Gemini does not validate those).
- A finish chunk `delta: {}` follows the content of its chunk; finish_reason per the table below.
  With `stream_options.include_usage`, every chunk has `"usage": null` and one final chunk has
  `choices: []` and the usage of the LAST usageMetadata (a running total, never summed). Then
  `data: [DONE]`. No `event:` lines ever (openai-node would wrap or throw).
- Failures: `finish()` raises an UpstreamError when Gemini's answer is unusable (an "error"
  finish reason, or a stream that ended with no finishReason and no tool call, gemini-cli's
  NO_FINISH_REASON); `fail(err)` then writes `data: {"error": {...}}`, which both official SDKs
  raise as APIError, and no [DONE] (a consumer that ignores errors must not mistake a cut
  answer for a complete one). After fail() or finish(), feed() returns nothing.
- A blocked prompt (promptFeedback.blockReason, no candidates) is a 200 answer: a `refusal`
  delta naming the reason, then finish_reason content_filter (vector 10).
- Legacy completions chunks are whole `text_completion` objects; thought text and tool calls
  have no place there and are dropped; `echo` prepends the prompt to each choice's first text.
- Logprobs (only when the call asked, `call.logprobs` not None): a candidate's
  `logprobsResult` becomes the choice's `logprobs`: Chat `{"content": [{token, logprob, bytes,
  top_logprobs}], "refusal": null}`, legacy `{tokens, token_logprobs, top_logprobs,
  text_offset}` (offsets count from the start of the choice's text, echo included). In a stream
  each chunk's tokens ride on that chunk's first text frame; a chunk without a logprobsResult
  says `null`, as every frame of a call that did not ask.

finish_reason (Gemini -> Chat; see `gemini.finish_kind`):
  STOP / OTHER / FINISH_REASON_UNSPECIFIED / unknown -> stop, or tool_calls when the choice
  emitted a tool call; MAX_TOKENS -> length; SAFETY, RECITATION, LANGUAGE, BLOCKLIST,
  PROHIBITED_CONTENT, SPII, IMAGE_* filters -> content_filter; MALFORMED_FUNCTION_CALL,
  UNEXPECTED_TOOL_CALL, TOO_MANY_TOOL_CALLS -> an error (502 non-stream, which the SDKs retry;
  an error event in a stream); promptFeedback block -> content_filter with a refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from rawgate.errors import RawgateError, UpstreamError, UpstreamProtocolError
from rawgate.translate.call import GeminiCall
from rawgate.translate.contract import (
    Clock,
    IdFactory,
    Stored,
    TokenUsage,
    call_id_rand,
    random_id,
    token_usage,
    wall_clock,
)
from rawgate.translate.gemini import (
    Candidate,
    FunctionCall,
    LogprobsResult,
    Part,
    Reply,
    Usage,
    arguments_text,
    chat_usage,
    custom_input,
    finish_error,
    finish_kind,
    logprob_tokens,
    part_text,
)
from rawgate.translate.signatures import mint_call_id
from rawgate.translate.sse import DONE, HEARTBEAT

__all__ = ["ChatStream", "chat_response", "completion_response"]

_dumps = orjson.dumps


def _response_id(prefix: str, reply: Reply | None, ids: IdFactory) -> str:
    rid = reply.responseId if reply is not None else None
    return prefix + rid if rid else ids(prefix, 32)


def _blocked_message(reason: str, detail: str | None) -> str:
    msg = f"Gemini blocked the prompt (blockReason {reason})."
    return f"{msg} {detail}" if detail else msg


def _tool_call(
    call: GeminiCall, part: Part, fc: FunctionCall, rand: Callable[[int], str] | None
) -> dict[str, Any]:
    """A Chat tool call (without `index`) for one Gemini functionCall part."""
    origin = call.tools.get(fc.name)
    name = origin.name if origin is not None else fc.name
    cid = mint_call_id(part.thoughtSignature, rand)
    if origin is not None and origin.kind == "custom":
        return {"id": cid, "type": "custom", "custom": {"name": name, "input": custom_input(fc)}}
    return {
        "id": cid,
        "type": "function",
        "function": {"name": name, "arguments": arguments_text(fc)},
    }


def _chat_logprobs(res: LogprobsResult, top: int) -> dict[str, Any]:
    """Chat `choices[].logprobs` for Gemini's logprobsResult, `top` alternatives per token."""
    return {"content": logprob_tokens(res, top), "refusal": None}


def _legacy_logprobs(res: LogprobsResult, top: int, offset: int) -> tuple[dict[str, Any], int]:
    """Legacy `choices[].logprobs` and the text offset after its last token."""
    tops = res.topCandidates
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []
    for i, c in enumerate(res.chosenCandidates):
        tokens.append(c.token)
        token_logprobs.append(c.logProbability)
        alts = tops[i].candidates[:top] if top and i < len(tops) else ()
        top_logprobs.append({a.token: a.logProbability for a in alts})
        text_offset.append(offset)
        offset += len(c.token)
    lp = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
    return lp, offset


def _chat_finish(reason: str | None, tools: bool) -> str:
    kind = finish_kind(reason) if reason else "stop"
    if tools and kind == "stop":
        return "tool_calls"
    return kind


# ---- non-stream ----------------------------------------------------------------------------------


def _collect(
    call: GeminiCall, cand: Candidate, with_tools: bool, ids: IdFactory = random_id
) -> tuple[str, str, list[dict[str, Any]]]:
    texts: list[str] = []
    thoughts: list[str] = []
    tools: list[dict[str, Any]] = []
    if cand.content is not None:
        for p in cand.content.parts:
            fc = p.functionCall
            if fc is not None:
                if with_tools:
                    tools.append(_tool_call(call, p, fc, call_id_rand(ids)))
                continue
            t = p.text if p.text is not None else part_text(p)
            if t:
                (thoughts if p.thought else texts).append(t)
    return "".join(texts), "".join(thoughts), tools


def _check(reply: Reply) -> None:
    for cand in reply.candidates:
        if cand.finishReason and finish_kind(cand.finishReason) == "error":
            raise finish_error(cand.finishReason, cand.finishMessage)
    if not reply.candidates and not (reply.promptFeedback and reply.promptFeedback.blockReason):
        raise UpstreamProtocolError("Gemini answered with no candidate and no block reason")


def _usage(reply: Reply) -> dict[str, Any]:
    return chat_usage(reply.usageMetadata or Usage())


def chat_response(
    call: GeminiCall, reply: Reply, clock: Clock = wall_clock, ids: IdFactory = random_id
) -> bytes:
    """The `chat.completion` JSON for a non-stream Gemini reply. Raises UpstreamError for an
    answer that failed upstream (see the finish_reason table)."""
    _check(reply)
    choices: list[dict[str, Any]] = []
    pf = reply.promptFeedback
    if not reply.candidates and pf is not None and pf.blockReason:
        refusal = _blocked_message(pf.blockReason, pf.blockReasonMessage)
        for i in range(call.n):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "refusal": refusal,
                "annotations": [],
            }
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "content_filter",
                }
            )
    for cand in sorted(reply.candidates, key=lambda c: c.index):
        text, thoughts, tools = _collect(call, cand, True, ids)
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": text if text or not tools else None,
            "refusal": None,
            "annotations": [],
        }
        if thoughts:
            msg["reasoning_content"] = thoughts
        if tools:
            msg["tool_calls"] = tools
        lp = cand.logprobsResult
        choices.append(
            {
                "index": cand.index,
                "message": msg,
                "logprobs": (
                    _chat_logprobs(lp, call.logprobs)
                    if call.logprobs is not None and lp is not None
                    else None
                ),
                "finish_reason": _chat_finish(cand.finishReason, bool(tools)),
            }
        )
    return _dumps(
        {
            "id": _response_id("chatcmpl-", reply, ids),
            "object": "chat.completion",
            "created": int(clock()),
            "model": call.client_model,
            "system_fingerprint": None,
            "service_tier": None,
            "choices": choices,
            "usage": _usage(reply),
        }
    )


def completion_response(
    call: GeminiCall, reply: Reply, *, clock: Clock = wall_clock, ids: IdFactory = random_id
) -> bytes:
    """The legacy `text_completion` JSON for a non-stream Gemini reply."""
    _check(reply)
    echo = call.echo_prompt or ""
    choices: list[dict[str, Any]] = []
    if not reply.candidates:  # blocked prompt
        choices = [
            {"text": echo, "index": i, "logprobs": None, "finish_reason": "content_filter"}
            for i in range(call.n)
        ]
    for cand in sorted(reply.candidates, key=lambda c: c.index):
        text, _, _ = _collect(call, cand, False)
        fr = _chat_finish(cand.finishReason, False)
        lp = cand.logprobsResult
        logprobs = (
            _legacy_logprobs(lp, call.logprobs, len(echo))[0]
            if call.logprobs is not None and lp is not None
            else None
        )
        choices.append(
            {"text": echo + text, "index": cand.index, "logprobs": logprobs, "finish_reason": fr}
        )
    return _dumps(
        {
            "id": _response_id("cmpl-", reply, ids),
            "object": "text_completion",
            "created": int(clock()),
            "model": call.client_model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": _usage(reply),
        }
    )


# ---- streams -------------------------------------------------------------------------------------


class _Choice:
    """One choice's frame prefixes, built once (rebuilding them per frame costs 1.03 us, joining
    prebuilt ones 0.31 us), and its state. A text frame is `pre_content + json(text) + close`
    in both Chat and legacy Completions."""

    __slots__ = (
        "close",
        "finish",
        "index",
        "lp",
        "offset",
        "pre",
        "pre_content",
        "pre_reason",
        "tools",
    )

    def __init__(self, index: int, pre: bytes, pre_content: bytes, close: bytes) -> None:
        self.index = index
        self.pre = pre
        self.pre_content = pre_content
        self.pre_reason = pre + b'{"reasoning_content":'
        self.close = close
        self.tools = 0
        self.finish: str | None = None
        # The close of the next text frame when this chunk carries logprobs (used once), and
        # the legacy text_offset reached so far.
        self.lp: bytes | None = None
        self.offset = 0


class ChatStream:
    """Chat (or, with completions=True, legacy Completions) stream transcoder for one response."""

    __slots__ = (
        "_blocked",
        "_call",
        "_choices",
        "_clock",
        "_close",
        "_completions",
        "_error",
        "_failed",
        "_finished",
        "_head",
        "_ids",
        "_rand",
        "_tail",
        "_usage",
        "_usage_null",
    )

    def __init__(
        self,
        call: GeminiCall,
        completions: bool = False,
        *,
        clock: Clock = wall_clock,
        ids: IdFactory = random_id,
    ) -> None:
        self._call = call
        self._clock = clock
        self._ids = ids
        self._rand = call_id_rand(ids)
        self._completions = completions
        self._choices: dict[int, _Choice] = {}
        self._head: bytes | None = None  # built from the first reply (its responseId)
        self._usage_null = b',"usage":null' if call.include_usage else b""
        # Constant frame ends: a content frame is 3 prebuilt pieces joined, one orjson call for
        # the text: 0.31 us per frame, where a dict + orjson.dumps takes 1.07 us.
        tail = b',"logprobs":null,"finish_reason":null}]' + self._usage_null + b"}\n\n"
        self._tail = tail  # after a delta object
        self._close = b"}" + tail  # after a content / reasoning_content string
        self._usage: Usage | None = None
        self._blocked = False
        self._error: UpstreamError | None = None
        self._finished = False
        self._failed = False

    # ---- public -------------------------------------------------------------------------------

    # The StreamTranscoder contract (translate/contract.py).
    heartbeat = HEARTBEAT
    stored: Stored | None = None  # Chat keeps nothing for a follow-up request

    @property
    def usage(self) -> TokenUsage:
        """Tokens of the last usageMetadata seen (for accounting)."""
        return token_usage(self._usage)

    def start(self) -> bytes:
        """Nothing: the first chunk's id (Gemini's responseId) is known only from the first
        reply, so Chat's first frame waits for it."""
        return b""

    @property
    def error(self) -> UpstreamError | None:
        """The upstream failure that finish() raised, if any."""
        return self._error

    def feed(self, reply: Reply) -> bytes:
        if self._finished or self._failed:
            return b""
        if self._head is None:
            self._begin(reply)
        if reply.usageMetadata is not None:
            self._usage = reply.usageMetadata  # a running total: the last one wins
        out: list[bytes] = []
        cands = reply.candidates
        if not cands:
            pf = reply.promptFeedback
            if pf is not None and pf.blockReason and not self._choices:
                self._block(pf.blockReason, pf.blockReasonMessage, out)
            return b"".join(out)
        for cand in cands:
            ch = self._choices.get(cand.index)
            if ch is None:
                ch = self._choice(cand.index, out)
            if ch.finish is not None:
                continue
            content = cand.content
            if content is not None and content.parts:
                lp = cand.logprobsResult
                if lp is not None and self._call.logprobs is not None:
                    ch.lp = self._logprobs_close(ch, lp)
                    self._parts(ch, content.parts, out)
                    ch.lp = None  # a chunk's tokens never ride on a later chunk's frame
                else:
                    self._parts(ch, content.parts, out)
            if cand.finishReason:
                self._end_choice(ch, cand, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of the upstream body: finish chunks still owed, usage, [DONE]. Raises an
        UpstreamError if the answer was unusable; the caller then sends fail(err)."""
        if self._finished or self._failed:
            return b""
        self._finished = True
        if self._error is None:
            if self._head is None:
                self._error = UpstreamProtocolError(
                    "Gemini ended the stream without sending anything", code="upstream_truncated"
                )
            elif not self._blocked and any(
                c.finish is None and not c.tools for c in self._choices.values()
            ):
                self._error = UpstreamProtocolError(
                    "Gemini closed the stream before the answer was finished (no finishReason)",
                    code="upstream_truncated",
                )
        if self._error is not None:
            raise self._error
        out: list[bytes] = []
        for ch in self._choices.values():
            if ch.finish is None:  # tool calls without a finishReason (Code Assist does that)
                ch.finish = "tool_calls"
                out.append(self._finish_frame(ch, b"tool_calls"))
        if self._call.include_usage:
            assert self._head is not None
            usage = chat_usage(self._usage or Usage())
            out.append(self._head + b"[]," + b'"usage":' + _dumps(usage) + b"}\n\n")
        out.append(DONE)
        return b"".join(out)

    def fail(self, err: RawgateError) -> bytes:
        """An error event after the stream started (the SDKs raise it as APIError)."""
        if self._failed or (self._finished and self._error is None):
            return b""  # already ended, cleanly or not
        self._failed = True
        return b"data: " + err.to_json() + b"\n\n"

    # ---- frames -------------------------------------------------------------------------------

    def _begin(self, reply: Reply) -> None:
        call = self._call
        if self._completions:
            prefix, obj = "cmpl-", b"text_completion"
        else:
            prefix, obj = "chatcmpl-", b"chat.completion.chunk"
        self._head = (
            b'data: {"id":'
            + _dumps(_response_id(prefix, reply, self._ids))
            + b',"object":"'
            + obj
            + b'","created":'
            + str(int(self._clock())).encode()
            + b',"model":'
            + _dumps(call.client_model)
            + b',"system_fingerprint":null,"choices":'
        )

    def _choice(self, index: int, out: list[bytes]) -> _Choice:
        assert self._head is not None
        if self._completions:
            pre = self._head + b'[{"text":'
            ch = _Choice(index, pre, pre, self._text_tail(index, b"null"))
            self._choices[index] = ch
            echo = self._call.echo_prompt
            if echo:
                ch.offset = len(echo)
                out.append(pre + _dumps(echo) + ch.close)
            return ch
        pre = self._head + b'[{"index":' + str(index).encode() + b',"delta":'
        ch = _Choice(index, pre, pre + b'{"content":', self._close)
        self._choices[index] = ch
        out.append(pre + b'{"role":"assistant","content":"","refusal":null}' + self._tail)
        return ch

    def _logprobs_close(self, ch: _Choice, res: LogprobsResult) -> bytes:
        """The close of a text frame that carries this chunk's logprobs."""
        top = self._call.logprobs or 0
        if self._completions:
            lp, ch.offset = _legacy_logprobs(res, top, ch.offset)
            return (
                b',"index":'
                + str(ch.index).encode()
                + b',"logprobs":'
                + _dumps(lp)
                + b',"finish_reason":null}]'
                + self._usage_null
                + b"}\n\n"
            )
        return (
            b'},"logprobs":'
            + _dumps(_chat_logprobs(res, top))
            + b',"finish_reason":null}]'
            + self._usage_null
            + b"}\n\n"
        )

    def _text_tail(self, index: int, finish: bytes) -> bytes:
        return (
            b',"index":'
            + str(index).encode()
            + b',"logprobs":null,"finish_reason":'
            + finish
            + b"}]"
            + self._usage_null
            + b"}\n\n"
        )

    def _parts(self, ch: _Choice, parts: list[Part], out: list[bytes]) -> None:
        completions = self._completions
        if len(parts) == 1:  # the common chunk, one text part: 1.0 us per chunk, 1.4 via the loop
            p = parts[0]
            t = p.text
            if t and p.functionCall is None and not (p.thought and completions):
                if p.thought:
                    out.append(b"".join((ch.pre_reason, _dumps(t), ch.close)))
                elif ch.lp is None:
                    out.append(b"".join((ch.pre_content, _dumps(t), ch.close)))
                else:
                    out.append(b"".join((ch.pre_content, _dumps(t), ch.lp)))
                    ch.lp = None
                return
        run: list[str] = []  # consecutive text of one kind, sent as one delta
        run_thought = False
        for p in parts:
            fc = p.functionCall
            if fc is not None:
                if completions:
                    continue  # legacy completions have no tool calls
                if run:
                    self._text_frame(ch, run, run_thought, out)
                    run = []
                tc = {"index": ch.tools, **_tool_call(self._call, p, fc, self._rand)}
                ch.tools += 1
                out.append(ch.pre + _dumps({"tool_calls": [tc]}) + self._tail)
                continue
            if p.thought and completions:
                continue  # no reasoning slot in a text_completion
            t = p.text if p.text is not None else part_text(p)
            if not t:
                continue  # empty and signature-only parts (vector 9)
            if run and p.thought != run_thought:
                self._text_frame(ch, run, run_thought, out)
                run = []
            run_thought = p.thought
            run.append(t)
        if run:
            self._text_frame(ch, run, run_thought, out)

    def _text_frame(self, ch: _Choice, run: list[str], thought: bool, out: list[bytes]) -> None:
        text = run[0] if len(run) == 1 else "".join(run)
        close = ch.close
        if ch.lp is not None and not thought:
            close, ch.lp = ch.lp, None
        out.append((ch.pre_reason if thought else ch.pre_content) + _dumps(text) + close)

    def _finish_frame(self, ch: _Choice, reason: bytes) -> bytes:
        if self._completions:
            return ch.pre + b'""' + self._text_tail(ch.index, b'"' + reason + b'"')
        return (
            ch.pre
            + b'{},"logprobs":null,"finish_reason":"'
            + reason
            + b'"}]'
            + self._usage_null
            + b"}\n\n"
        )

    def _end_choice(self, ch: _Choice, cand: Candidate, out: list[bytes]) -> None:
        reason = cand.finishReason or ""
        if finish_kind(reason) == "error":
            ch.finish = "error"
            if self._error is None:
                self._error = finish_error(reason, cand.finishMessage)
            return
        fr = _chat_finish(reason, ch.tools > 0)
        ch.finish = fr
        out.append(self._finish_frame(ch, fr.encode()))

    def _block(self, reason: str, detail: str | None, out: list[bytes]) -> None:
        self._blocked = True
        refusal = _blocked_message(reason, detail)
        for i in range(self._call.n):
            ch = self._choice(i, out)
            if not self._completions:
                out.append(ch.pre + _dumps({"refusal": refusal}) + self._tail)
            ch.finish = "content_filter"
            out.append(self._finish_frame(ch, b"content_filter"))
