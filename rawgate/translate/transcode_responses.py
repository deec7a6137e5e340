"""Gemini replies -> an OpenAI Responses API response, whole or as the streamed event sequence.

Invariants (stream, protocols.md E3/E4/E5):
- Every event is `event: <type>` + `data: {"type": <type>, "sequence_number": n, ...}`;
  n counts 0, 1, 2, ... without gaps; the first two are response.created and
  response.in_progress; the last is exactly one terminal event (response.completed, or
  response.failed after fail()); no [DONE].
- Items get output_index 0, 1, 2, ... in order of `output_item.added`; every added item gets its
  `output_item.done` (the only events Codex builds history from) before the terminal event,
  whose `response.output` is exactly the done items in output_index order.
- Thought parts -> a `reasoning` item, streamed as reasoning_summary_part / _text events with
  summary_index 0; text -> a `message` item with one output_text part; each functionCall -> its
  own `function_call` item (or `custom_tool_call` for a custom tool, `namespace` restored from
  `call.tools`), arguments sent whole in one delta; text after a call opens a new message.
- Thought signatures: a signed functionCall's signature rides in its call id (`mint_call_id`;
  call ids must round-trip for results to match, so every client keeps them) and, when a
  reasoning item is open in front of the call, also in that item's `encrypted_content`
  (`signatures.pack_reasoning`), the place OpenAI clients keep opaque reasoning state. A text
  part's signature has no id to ride in: it goes under the key "" into the reasoning item in
  front of the message; for Gemini 3 (which signs its last text part) an empty reasoning item
  is opened in front of a message that has none, so there is always a place for it. The
  reasoning item's `output_item.done` is sent when the items after it end, before theirs, so a
  client rebuilding history from done events keeps it in front.
- Status: STOP -> completed; MAX_TOKENS -> incomplete / max_output_tokens; safety family and a
  blocked prompt (a refusal part) -> incomplete / content_filter. The incomplete response is
  carried by response.completed unless `incomplete_event=True`: Codex treats
  response.incomplete as a retryable stream error and would re-run the same request five
  times (E5), while openai-python's stream helper needs response.completed for
  get_final_response(). MALFORMED_FUNCTION_CALL and friends, and a stream that ends with no
  finishReason and no call, make finish() raise; fail(err) then sends response.failed.
- Logprobs (only when the call asked, `call.logprobs` not None): the candidate's logprobsResult
  of each chunk rides on that chunk's first output_text delta (`logprobs`: token, logprob, bytes,
  top_logprobs) and accumulates into the output_text part (done event, item, response).
- fail(err): a 429 becomes code rate_limit_exceeded with "Please try again in Ns" in the
  message (Codex sleeps exactly that long), insufficient_quota / context_length_exceeded keep
  their codes (Codex does not retry them), a 4xx is invalid_prompt, anything else server_error.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from rawgate.errors import RawgateError, UpstreamError, UpstreamProtocolError
from rawgate.translate.call import GeminiCall
from rawgate.translate.contract import (
    Answer,
    Clock,
    IdFactory,
    Stored,
    TokenUsage,
    answer,
    call_id_rand,
    random_id,
    token_usage,
    wall_clock,
)
from rawgate.translate.gemini import (
    FunctionCall,
    Part,
    Reply,
    Usage,
    arguments_text,
    custom_input,
    finish_error,
    finish_kind,
    logprob_tokens,
    part_text,
    responses_usage,
)
from rawgate.translate.signatures import mint_call_id, pack_reasoning
from rawgate.translate.sse import HEARTBEAT
from rawgate.translate.thinking import family

__all__ = ["ResponsesStream", "responses_answer", "responses_response"]

_dumps = orjson.dumps


def _prefix(name: str) -> bytes:
    return f'event: {name}\ndata: {{"type":"{name}","sequence_number":'.encode()


# Frame heads per event type, built at import; a frame is head + seq + the event's own fields.
_CREATED = _prefix("response.created")
_IN_PROGRESS = _prefix("response.in_progress")
_COMPLETED = _prefix("response.completed")
_INCOMPLETE = _prefix("response.incomplete")
_FAILED = _prefix("response.failed")
_ITEM_ADDED = _prefix("response.output_item.added")
_ITEM_DONE = _prefix("response.output_item.done")
_PART_ADDED = _prefix("response.content_part.added")
_PART_DONE = _prefix("response.content_part.done")
_TEXT_DELTA = _prefix("response.output_text.delta")
_TEXT_DONE = _prefix("response.output_text.done")
_REFUSAL_DELTA = _prefix("response.refusal.delta")
_REFUSAL_DONE = _prefix("response.refusal.done")
_SUM_PART_ADDED = _prefix("response.reasoning_summary_part.added")
_SUM_PART_DONE = _prefix("response.reasoning_summary_part.done")
_SUM_DELTA = _prefix("response.reasoning_summary_text.delta")
_SUM_DONE = _prefix("response.reasoning_summary_text.done")
_ARGS_DELTA = _prefix("response.function_call_arguments.delta")
_ARGS_DONE = _prefix("response.function_call_arguments.done")
_INPUT_DELTA = _prefix("response.custom_tool_call_input.delta")
_INPUT_DONE = _prefix("response.custom_tool_call_input.done")
_TEXT_DELTA_END = b',"logprobs":[]}'
_TEXT_DELTA_TAIL = _TEXT_DELTA_END + b"\n\n"
_TRY_AGAIN = re.compile(r"(?i)try again in\s*\d")




def _skeleton(call: GeminiCall, response_id: str, created_at: int) -> dict[str, Any]:
    """The Response object as response.created shows it (request fields echoed)."""
    echo = call.request_echo
    text = dict(echo.get("text") or {})
    text.setdefault("format", {"type": "text"})
    ptc = echo.get("parallel_tool_calls")
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": bool(echo.get("background")),
        "error": None,
        "incomplete_details": None,
        "instructions": call.instructions,
        "max_output_tokens": echo.get("max_output_tokens"),
        "max_tool_calls": echo.get("max_tool_calls"),
        "model": call.client_model,
        "output": [],
        "parallel_tool_calls": True if ptc is None else ptc,
        "previous_response_id": call.previous_response_id,
        "prompt_cache_key": echo.get("prompt_cache_key"),
        "reasoning": echo.get("reasoning") or {"effort": None, "summary": None},
        "service_tier": echo.get("service_tier") or "default",
        "store": call.store,
        "temperature": echo.get("temperature"),
        "text": text,
        "tool_choice": echo.get("tool_choice") or "auto",
        "tools": echo.get("tools") or [],
        "top_logprobs": echo.get("top_logprobs") or 0,
        "top_p": echo.get("top_p"),
        "truncation": echo.get("truncation") or "disabled",
        "usage": None,
        "user": echo.get("user"),
        "metadata": call.metadata or {},
    }


def _message_item(
    item_id: str, status: str = "in_progress", content: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "content": content or [],
        "role": "assistant",
    }


class _Reasoning:
    __slots__ = ("id", "index", "mid", "pieces", "sigs", "summary_open")

    def __init__(self, index: int, item_id: str) -> None:
        self.index = index
        self.id = item_id
        self.pieces: list[str] = []
        self.sigs: dict[str, str] = {}
        self.summary_open = False
        # Constant middle of every summary delta of this item (built once per item).
        self.mid = b',"item_id":"%s","output_index":%d,"summary_index":0,"delta":' % (
            self.id.encode(),
            index,
        )


class _Message:
    __slots__ = ("id", "index", "lps", "mid", "pieces")

    def __init__(self, index: int, item_id: str) -> None:
        self.index = index
        self.id = item_id
        self.pieces: list[str] = []
        self.lps: list[dict[str, Any]] = []  # logprobs of the text so far (when asked)
        self.mid = b',"item_id":"%s","output_index":%d,"content_index":0,"delta":' % (
            self.id.encode(),
            index,
        )


class ResponsesStream:
    """The Responses event stream for one response (see the module invariants)."""

    __slots__ = (
        "_blocked",
        "_call",
        "_calls",
        "_completed",
        "_error",
        "_finish_message",
        "_finish_reason",
        "_ids",
        "_incomplete_event",
        "_items",
        "_lead",
        "_message",
        "_rand",
        "_reasoning",
        "_response",
        "_seq",
        "_started",
        "_terminal",
        "_usage",
        "_whole",
    )

    def __init__(
        self,
        call: GeminiCall,
        response_id: str,
        *,
        incomplete_event: bool = False,
        created_at: int | None = None,
        clock: Clock = wall_clock,
        ids: IdFactory = random_id,
    ) -> None:
        self._call = call
        self._ids = ids
        self._rand = call_id_rand(ids)
        self._incomplete_event = incomplete_event
        self._response = _skeleton(
            call, response_id, int(clock()) if created_at is None else created_at
        )
        self._seq = 0
        self._items: list[dict[str, Any] | None] = []  # by output_index; None until done
        self._reasoning: _Reasoning | None = None
        self._message: _Message | None = None
        self._calls = 0
        self._usage: Usage | None = None
        self._finish_reason: str | None = None
        self._finish_message: str | None = None
        self._blocked = False
        self._error: UpstreamError | None = None
        self._started = False
        self._terminal = False
        self._completed = False  # finish() ran without an error: the items may be stored
        self._whole = False  # a non-stream reply: no truncation check
        # Gemini 3 signs the last text part of an answer: keep a reasoning item in front of
        # every message so that signature has a carrier (see the module invariants).
        self._lead = family(call.model).startswith("3")

    # ---- public -------------------------------------------------------------------------------

    @property
    def response(self) -> dict[str, Any]:
        """The Response object: final once finish() or fail() ran."""
        return self._response

    @property
    def output_items(self) -> list[dict[str, Any]]:
        """The finished output items in output_index order (what the response store keeps)."""
        return [it for it in self._items if it is not None]

    # The StreamTranscoder contract (translate/contract.py).
    heartbeat = HEARTBEAT

    @property
    def usage(self) -> TokenUsage:
        return token_usage(self._usage)

    @property
    def stored(self) -> Stored | None:
        """What the response store keeps once the answer completed, when the client asked."""
        if not self._completed or not self._call.store:
            return None
        return Stored(self._response["id"], self._call.input_items, self.output_items)

    @property
    def error(self) -> UpstreamError | None:
        return self._error

    def start(self) -> bytes:
        """response.created + response.in_progress (send as soon as the upstream said 200)."""
        if self._started:
            return b""
        self._started = True
        body = _dumps(self._response)
        return self._frame(_CREATED, b',"response":' + body + b"}") + self._frame(
            _IN_PROGRESS, b',"response":' + body + b"}"
        )

    def feed(self, reply: Reply) -> bytes:
        if self._terminal:
            return b""
        out: list[bytes] = []
        if not self._started:
            out.append(self.start())
        if reply.usageMetadata is not None:
            self._usage = reply.usageMetadata  # a running total: the last one wins
        if self._finish_reason is not None or self._blocked:
            return b"".join(out)
        for cand in reply.candidates:
            if cand.index != 0:
                continue  # the Responses API has one answer
            if cand.content is not None and cand.content.parts:
                lp = cand.logprobsResult
                if lp is not None and self._call.logprobs is not None:
                    self._parts(cand.content.parts, out, logprob_tokens(lp, self._call.logprobs))
                else:
                    self._parts(cand.content.parts, out)
            if cand.finishReason:
                self._finish_reason = cand.finishReason
                self._finish_message = cand.finishMessage
            break
        else:
            pf = reply.promptFeedback
            if pf is not None and pf.blockReason and not self._items:
                self._block(pf.blockReason, pf.blockReasonMessage, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """Close the open items and send the terminal event. Raises an UpstreamError when the
        answer was unusable; the caller then sends fail(err)."""
        if self._terminal:
            return b""
        out: list[bytes] = []
        if not self._started:
            out.append(self.start())
        reason = self._finish_reason
        incomplete: str | None = None
        if self._error is None:
            if self._blocked:
                incomplete = "content_filter"
            elif reason is None:
                if not self._whole and not self._calls:
                    nothing = not self._items
                    self._error = UpstreamProtocolError(
                        "Gemini ended the stream without sending anything"
                        if nothing
                        else "Gemini closed the stream before the answer was finished"
                        " (no finishReason)",
                        code="upstream_truncated",
                    )
            else:
                kind = finish_kind(reason)
                if kind == "error":
                    self._error = finish_error(reason, self._finish_message)
                elif kind == "length":
                    incomplete = "max_output_tokens"
                elif kind == "content_filter":
                    incomplete = "content_filter"
        if self._error is not None:
            self._started = True
            raise self._error
        self._close_all(out)
        self._terminal = True
        self._completed = True
        resp = self._final("incomplete" if incomplete else "completed")
        if incomplete:
            resp["incomplete_details"] = {"reason": incomplete}
        head = _INCOMPLETE if incomplete and self._incomplete_event else _COMPLETED
        out.append(self._frame(head, b',"response":' + _dumps(resp) + b"}"))
        return b"".join(out)

    def fail(self, err: RawgateError) -> bytes:
        """response.failed after the stream started (see the module invariants)."""
        if self._terminal:
            return b""
        out: list[bytes] = []
        if not self._started:
            out.append(self.start())
        self._terminal = True
        resp = self._final("failed")
        resp["error"] = _response_error(err)
        out.append(self._frame(_FAILED, b',"response":' + _dumps(resp) + b"}"))
        return b"".join(out)

    # ---- events -------------------------------------------------------------------------------

    def _frame(self, head: bytes, rest: bytes) -> bytes:
        """head + sequence number + rest; `rest` starts with ',' and closes the object."""
        seq = self._seq
        self._seq = seq + 1
        return b"".join((head, b"%d" % seq, rest, b"\n\n"))

    def _event(self, head: bytes, fields: dict[str, Any]) -> bytes:
        return self._frame(head, b"," + _dumps(fields)[1:])

    def _final(self, status: str) -> dict[str, Any]:
        resp = dict(self._response)
        resp["status"] = status
        resp["output"] = self.output_items
        resp["usage"] = responses_usage(self._usage)
        self._response = resp
        return resp

    def _parts(
        self, parts: list[Part], out: list[bytes], lps: list[dict[str, Any]] | None = None
    ) -> None:
        """`lps`: this chunk's logprobs, for its first text delta."""
        m = self._message
        # The common chunk, more text for the open message: the same shortcut as transcode_chat's
        # one-part path (1.0 instead of 1.4 us per chunk there: bench.micro `chat transcoder feed
        # only`).
        if m is not None and len(parts) == 1 and lps is None:
            p = parts[0]
            t = p.text
            if t and not p.thought and p.functionCall is None and p.thoughtSignature is None:
                m.pieces.append(t)
                seq = self._seq
                self._seq = seq + 1
                # One join of constant pieces: 0.34 us per delta event, a dict + orjson.dumps
                # per event 1.01 us (bench/micro.py, `text-delta event` lines).
                out.append(b"".join((_TEXT_DELTA, b"%d" % seq, m.mid, _dumps(t), _TEXT_DELTA_TAIL)))
                return
        for p in parts:
            fc = p.functionCall
            if fc is not None:
                self._function_call(p, fc, out)
                continue
            t = p.text if p.text is not None else part_text(p)
            if t:
                if p.thought:
                    self._thought(t, out)
                else:
                    self._text(t, out, lps)
                    lps = None
            if p.thoughtSignature is not None and self._reasoning is not None:
                # A text/thought part's signature: into the reasoning item in front of it. With
                # no reasoning item in front there is no carrier (Gemini < 3): dropped, Gemini
                # does not validate text signatures.
                self._reasoning.sigs[""] = p.thoughtSignature

    def _thought(self, text: str, out: list[bytes]) -> None:
        r = self._reasoning
        if r is None or not r.summary_open or self._message is not None:
            self._close_all(out)
            r = self._open_reasoning(out, summary=True)
        r.pieces.append(text)
        out.append(self._frame(_SUM_DELTA, r.mid + _dumps(text) + b"}"))

    def _text(self, text: str, out: list[bytes], lps: list[dict[str, Any]] | None = None) -> None:
        m = self._message
        if m is None:
            r = self._reasoning
            if r is not None:
                self._close_summary(r, out)  # the item itself stays open, in front
            elif self._lead:
                self._open_reasoning(out, summary=False)
            m = self._open_message(out)
        m.pieces.append(text)
        if lps is None:
            out.append(self._frame(_TEXT_DELTA, m.mid + _dumps(text) + _TEXT_DELTA_END))
            return
        m.lps.extend(lps)
        out.append(
            self._frame(_TEXT_DELTA, m.mid + _dumps(text) + b',"logprobs":' + _dumps(lps) + b"}")
        )

    def _add(self, item: dict[str, Any], out: list[bytes]) -> int:
        index = len(self._items)
        self._items.append(None)
        out.append(self._event(_ITEM_ADDED, {"output_index": index, "item": item}))
        return index

    def _done(self, index: int, item: dict[str, Any], out: list[bytes]) -> None:
        self._items[index] = item
        out.append(self._event(_ITEM_DONE, {"output_index": index, "item": item}))

    def _open_reasoning(self, out: list[bytes], *, summary: bool) -> _Reasoning:
        r = _Reasoning(len(self._items), self._ids("rs_", 24))
        self._add({"id": r.id, "type": "reasoning", "summary": []}, out)
        if summary:
            part = {"type": "summary_text", "text": ""}
            fields = {"item_id": r.id, "output_index": r.index, "summary_index": 0, "part": part}
            out.append(self._event(_SUM_PART_ADDED, fields))
            r.summary_open = True
        self._reasoning = r
        return r

    def _close_summary(self, r: _Reasoning, out: list[bytes]) -> None:
        if not r.summary_open:
            return
        r.summary_open = False
        text = "".join(r.pieces)
        r.pieces = [text]
        base = {"item_id": r.id, "output_index": r.index, "summary_index": 0}
        out.append(self._event(_SUM_DONE, {**base, "text": text}))
        out.append(
            self._event(_SUM_PART_DONE, {**base, "part": {"type": "summary_text", "text": text}})
        )

    def _close_reasoning(self, r: _Reasoning, out: list[bytes]) -> None:
        self._close_summary(r, out)
        text = "".join(r.pieces)
        item: dict[str, Any] = {
            "id": r.id,
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": text}] if text else [],
        }
        if r.sigs:
            item["encrypted_content"] = pack_reasoning(r.sigs, None)
        self._reasoning = None
        self._done(r.index, item, out)

    def _open_message(self, out: list[bytes]) -> _Message:
        m = _Message(len(self._items), self._ids("msg_", 24))
        item = _message_item(m.id)
        self._add(item, out)
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        fields = {"item_id": m.id, "output_index": m.index, "content_index": 0, "part": part}
        out.append(self._event(_PART_ADDED, fields))
        self._message = m
        return m

    def _close_message(self, m: _Message, out: list[bytes]) -> None:
        text = "".join(m.pieces)
        base = {"item_id": m.id, "output_index": m.index, "content_index": 0}
        out.append(self._event(_TEXT_DONE, {**base, "text": text, "logprobs": m.lps}))
        part = {"type": "output_text", "annotations": [], "logprobs": m.lps, "text": text}
        out.append(self._event(_PART_DONE, {**base, "part": part}))
        item = _message_item(m.id, "completed", [part])
        self._message = None
        self._done(m.index, item, out)

    def _close_all(self, out: list[bytes]) -> None:
        # The reasoning item first: it sits in front of the message (see the invariants).
        if self._reasoning is not None:
            self._close_reasoning(self._reasoning, out)
        if self._message is not None:
            self._close_message(self._message, out)

    def _function_call(self, p: Part, fc: FunctionCall, out: list[bytes]) -> None:
        origin = self._call.tools.get(fc.name)
        name = origin.name if origin is not None else fc.name
        sig = p.thoughtSignature
        cid = mint_call_id(sig, self._rand)  # the id carries the signature in any case
        if sig and self._reasoning is not None:
            self._reasoning.sigs[cid] = sig
        self._close_all(out)
        self._calls += 1
        custom = origin is not None and origin.kind == "custom"
        item: dict[str, Any]
        if custom:
            item = {
                "id": self._ids("ctc_", 24),
                "type": "custom_tool_call",
                "call_id": cid,
                "name": name,
                "input": "",
            }
        else:
            item = {
                "id": self._ids("fc_", 24),
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": cid,
                "name": name,
            }
        if origin is not None and origin.namespace:
            item["namespace"] = origin.namespace
        index = self._add(item, out)
        base = {"item_id": item["id"], "output_index": index}
        if custom:
            value = custom_input(fc)
            out.append(self._event(_INPUT_DELTA, {**base, "delta": value}))
            out.append(self._event(_INPUT_DONE, {**base, "input": value}))
            self._done(index, {**item, "input": value}, out)
        else:
            args = arguments_text(fc)
            out.append(self._event(_ARGS_DELTA, {**base, "delta": args}))
            out.append(self._event(_ARGS_DONE, {**base, "name": name, "arguments": args}))
            self._done(index, {**item, "status": "completed", "arguments": args}, out)

    def _block(self, reason: str, detail: str | None, out: list[bytes]) -> None:
        self._blocked = True
        refusal = f"Gemini blocked the prompt (blockReason {reason})." + (
            f" {detail}" if detail else ""
        )
        m = _Message(len(self._items), self._ids("msg_", 24))
        item = _message_item(m.id)
        self._add(item, out)
        base = {"item_id": m.id, "output_index": m.index, "content_index": 0}
        out.append(self._event(_PART_ADDED, {**base, "part": {"type": "refusal", "refusal": ""}}))
        out.append(self._event(_REFUSAL_DELTA, {**base, "delta": refusal}))
        out.append(self._event(_REFUSAL_DONE, {**base, "refusal": refusal}))
        part = {"type": "refusal", "refusal": refusal}
        out.append(self._event(_PART_DONE, {**base, "part": part}))
        self._done(m.index, {**item, "status": "completed", "content": [part]}, out)


def _response_error(err: RawgateError) -> dict[str, Any]:
    """`response.error` for a failure; the code picks Codex's retry policy (E5)."""
    message = err.message
    if err.code in ("insufficient_quota", "context_length_exceeded"):
        code = err.code
    elif err.status == 429:
        code = "rate_limit_exceeded"
        if err.retry_after_s is not None and not _TRY_AGAIN.search(message):
            secs = f"{err.retry_after_s:.3f}".rstrip("0").rstrip(".")
            message = f"{message} Please try again in {secs}s."
    elif 400 <= err.status < 500:
        code = "invalid_prompt"
    else:
        code = "server_error"
    return {"code": code, "message": message}


def responses_response(call: GeminiCall, reply: Reply, response_id: str) -> bytes:
    """The Response JSON for a non-stream Gemini reply. Raises UpstreamError for an answer that
    failed upstream (an "error" finish reason)."""
    return _dumps(_whole(call, reply, response_id, wall_clock, random_id).response)


def responses_answer(
    call: GeminiCall,
    reply: Reply,
    response_id: str,
    *,
    clock: Clock = wall_clock,
    ids: IdFactory = random_id,
) -> Answer:
    """responses_response with what it cost and the items to store (no JSON re-parse)."""
    rs = _whole(call, reply, response_id, clock, ids)
    return answer(_dumps(rs.response), rs.usage, rs.stored)


def _whole(
    call: GeminiCall, reply: Reply, response_id: str, clock: Clock, ids: IdFactory
) -> ResponsesStream:
    rs = ResponsesStream(call, response_id, clock=clock, ids=ids)
    rs._whole = True
    # A text signature needs a reasoning item in front of its message; in one reply we can
    # look ahead instead of opening one for every message.
    rs._lead = any(
        p.thoughtSignature and not p.thought and p.functionCall is None
        for c in reply.candidates
        if c.index == 0 and c.content is not None
        for p in c.content.parts
    )
    rs._started = True  # no response.created / in_progress frames: nobody would read them
    rs.feed(reply)
    rs.finish()
    return rs
