"""Sans-IO core of the Gemini emulator's replies: prompt directives -> a reply plan (records).

Invariants:
- Pure: a validated GenerateContentRequest (dict) and a few options in, a `Plan` out; no clock, no
  I/O, no randomness except the responseId the caller passes in. The same request always yields
  the same bytes (tests compare them).
- Directives (emulator_directives.py) are `[[emu:NAME key=value ...]]` in prompt text, read from the
  systemInstruction and from the LAST user turn only, so a tool loop does not re-trigger a
  directive of an earlier turn. They are removed from the text that is echoed. A malformed
  directive is a `ScriptError` (the emulator answers 400 naming it), never a silent default.
- The default reply echoes the last user text, split into `chunks` pieces (or `chunk_chars`
  characters each); every stream chunk carries the running usageMetadata (latest value, never a
  delta) and the last one the finishReason, as the real API does (protocols.md A4/A5).
- Token counts are deterministic: ceil(chars / 4) per text, 258 per inline/file part (Gemini's
  per-image figure). Nobody should assert real tokenizer numbers against the emulator.
- The wire bytes are emulator_wire.py's job.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson

from rawgate.emulator.directives import Directive, ScriptError, int_arg, ms_arg, parse_directives
from rawgate.emulator.sample import sample
from rawgate.emulator.wire import QUIRKS, google_error

__all__ = [
    "SIGNATURE_PREFIX",
    "Options",
    "Plan",
    "build_plan",
    "count_tokens",
    "make_signature",
    "prompt_tokens",
]

# Google's per-image token figure (258); used for every non-text media part.
MEDIA_PART_TOKENS = 258
# Output larger than this from `reply chars=` is refused: the emulator must stay cheap to run.
MAX_REPLY_CHARS = 8 * 1024 * 1024
MAX_CHUNKS = 10_000

_FINISH_REASONS = frozenset({
    "STOP", "MAX_TOKENS", "SAFETY", "RECITATION", "LANGUAGE", "OTHER", "BLOCKLIST",
    "PROHIBITED_CONTENT", "SPII", "MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL",
    "TOO_MANY_TOOL_CALLS",
})
_BLOCK_REASONS = frozenset({"SAFETY", "OTHER", "BLOCKLIST", "PROHIBITED_CONTENT", "IMAGE_SAFETY"})
_BLOCKED_RATING = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH",
                    "blocked": True}]


@dataclass(slots=True, frozen=True)
class Options:
    """Per-run stream shape (CLI flags / settings); directives override it per request."""

    chunks: int = 3
    chunk_chars: int = 0  # > 0: fixed-size text chunks instead of `chunks` pieces
    chunk_delay_s: float = 0.0
    first_byte_delay_s: float = 0.0


@dataclass(slots=True)
class Plan:
    events: list[dict[str, Any]]  # stream chunks, in order
    unary: dict[str, Any]  # the non-stream response
    error: Directive | None = None  # an `error` directive: answer with it instead
    stream_error: tuple[int, dict[str, Any]] | None = None  # after k events, this error body
    cut: str = ""  # "", "reset", "hang", "drop", "stall"
    cut_after: int = 0
    chunk_delay_s: float = 0.0
    first_byte_delay_s: float = 0.0
    drip_s: float = 0.0
    directives: list[Directive] = field(default_factory=list)
    prompt: str = ""  # the last user turn's text, directives included (keys `times=` counters)
    quirks: tuple[str, ...] = ()  # SSE framing oddities (QUIRKS), applied by encode_sse


# ---- tokens -------------------------------------------------------------------------------------


def count_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _part_tokens(p: Any) -> int:
    if not isinstance(p, dict):
        return 0
    t = p.get("text")
    if isinstance(t, str):
        return count_tokens(t)
    fc = p.get("functionCall") or p.get("function_call")
    if fc is not None:
        return count_tokens(orjson.dumps(fc).decode())
    fr = p.get("functionResponse") or p.get("function_response")
    if fr is not None:
        return count_tokens(orjson.dumps(fr).decode())
    return MEDIA_PART_TOKENS


def prompt_tokens(body: dict[str, Any]) -> int:
    """The emulator's promptTokenCount for a GenerateContentRequest (contents, system, tools)."""
    n = 0
    for c in body.get("contents") or ():
        if isinstance(c, dict):
            for p in c.get("parts") or ():
                n += _part_tokens(p)
    sys = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(sys, dict):
        for p in sys.get("parts") or ():
            n += _part_tokens(p)
    tools = body.get("tools")
    if tools:
        n += count_tokens(orjson.dumps(tools).decode())
    return max(n, 1)


SIGNATURE_PREFIX = b"emu-sig:"


def make_signature(model: str, tag: str) -> str:
    """A deterministic thought signature the emulator recognises as its own (base64)."""
    return base64.b64encode(SIGNATURE_PREFIX + f"{model}:{tag}".encode()).decode()


# ---- the plan -----------------------------------------------------------------------------------


def _texts(content: Any) -> list[str]:
    if not isinstance(content, dict):
        return []
    return [p["text"] for p in content.get("parts") or () if isinstance(p, dict)
            and isinstance(p.get("text"), str) and not p.get("thought")]


def _describe(content: dict[str, Any]) -> str:
    """The echo for a last user turn without text: what it carried."""
    names: list[str] = []
    for p in content.get("parts") or ():
        fr = p.get("functionResponse") or p.get("function_response")
        if isinstance(fr, dict):
            names.append(f"functionResponse({fr.get('name', '')})")
        elif "inlineData" in p or "inline_data" in p:
            blob = p.get("inlineData") or p.get("inline_data") or {}
            names.append(f"inlineData({blob.get('mimeType') or blob.get('mime_type')})")
        elif "fileData" in p or "file_data" in p:
            names.append("fileData")
    return "received " + ", ".join(names) if names else "received an empty turn"


def build_plan(
    body: dict[str, Any],
    model: str,
    opts: Options,
    response_id: str,
    *,
    thinking: bool = False,
) -> Plan:
    """The reply to a validated request. `thinking`: the model thinks (2.5 / 3.x with a budget)."""
    contents = body.get("contents") or []
    sys_texts = _texts(body.get("systemInstruction") or body.get("system_instruction"))
    last = next((c for c in reversed(contents) if isinstance(c, dict)
                 and c.get("role", "user") == "user"), {})
    user_texts = _texts(last)
    directives: list[Directive] = []
    for t in sys_texts:
        directives.extend(parse_directives(t)[0])
    echo_parts: list[str] = []
    for t in user_texts:
        found, rest = parse_directives(t)
        directives.extend(found)
        if rest:
            echo_parts.append(rest)
    echo = "\n".join(echo_parts) if echo_parts else _describe(last)

    plan = Plan(events=[], unary={}, directives=directives, prompt="\n".join(user_texts),
                chunk_delay_s=opts.chunk_delay_s, first_byte_delay_s=opts.first_byte_delay_s)
    gen = body.get("generationConfig") or body.get("generation_config") or {}
    chunks, chunk_chars = opts.chunks, opts.chunk_chars
    text: str | None = echo
    given = False  # an explicit `reply text=`: returned as given, even in JSON mode
    thought: str | None = None
    thought_sig: str | None = None
    calls: list[dict[str, Any]] = []
    finish = "STOP"
    finish_msg: str | None = None
    block: str | None = None
    for d in directives:
        a = d.args
        n = d.name
        if n == "reply":
            if "chars" in a:
                size = int_arg(d, "chars", 0, 0, MAX_REPLY_CHARS)
                text = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:size]
            else:
                text, given = str(a.get("text", "")), True
        elif n == "echo_request":
            text = orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()
        elif n == "thought":
            thought = str(a.get("text", "Thinking about the request."))
            sig = a.get("signature")
            thought_sig = None if sig in (None, "none") else str(sig)
        elif n == "tool_call":
            calls.append(_tool_call(d, model, len(calls), thinking))
        elif n == "finish":
            finish = str(a.get("reason", "STOP")).upper()
            if finish not in _FINISH_REASONS:
                raise ScriptError(f"finish: reason must be one of {sorted(_FINISH_REASONS)}")
            finish_msg = a.get("message")
        elif n == "block":
            block = str(a.get("reason", "SAFETY")).upper()
            if block not in _BLOCK_REASONS:
                raise ScriptError(f"block: reason must be one of {sorted(_BLOCK_REASONS)}")
        elif n == "error":
            plan.error = d
        elif n == "stream_error":
            code = int_arg(d, "status", 503, 400, 599)
            after = int_arg(d, "after", 1, 0, MAX_CHUNKS)
            plan.stream_error = (after, google_error(code, a.get("message")))
        elif n in ("drop", "stall"):
            plan.cut, plan.cut_after = n, int_arg(d, "after", 1, 0, MAX_CHUNKS)
        elif n in ("reset", "hang"):
            plan.cut = n
        elif n == "delay":
            plan.chunk_delay_s = ms_arg(d)
        elif n == "first_byte":
            plan.first_byte_delay_s = ms_arg(d)
        elif n == "drip":
            plan.drip_s = ms_arg(d)
        elif n == "chunks":
            chunks, chunk_chars = int_arg(d, "n", 3, 1, MAX_CHUNKS), 0
        elif n == "chunk_chars":
            chunk_chars = int_arg(d, "n", 16, 1, MAX_REPLY_CHARS)
        elif n == "quirk":
            kind = str(a.get("kind", ""))
            if kind not in QUIRKS:
                raise ScriptError(f"quirk: kind must be one of {', '.join(QUIRKS)}")
            plan.quirks += (kind,)
    if calls and not any(d.name == "reply" for d in directives):
        text = None  # a tool-call turn carries no text unless asked for

    if text is not None:
        text, finish = _apply_generation_config(text, gen, finish, calls, given)
        if finish == "MAX_TOKENS":
            calls = []
    tc = gen.get("thinkingConfig") or gen.get("thinking_config") or {}
    # python-genai sends `include_thoughts` (snake) inside `thinkingConfig` (camel): read both.
    if (tc.get("includeThoughts") or tc.get("include_thoughts")) and thought is None and thinking:
        thought = "**Echoing**\n\nThe user wants their words repeated back."
    if thought is not None and thinking is False:
        thinking = True  # an explicit thought directive makes any model "think"
    thoughts_tokens = count_tokens(thought) if thought is not None else (8 if thinking else 0)
    _fill(plan, body, model, response_id, text, thought, thought_sig, calls, finish, finish_msg,
          block, thoughts_tokens, max(1, chunks), chunk_chars, gen)
    if "no_finish" in plan.quirks and plan.events:
        last = dict(plan.events[-1])
        last["candidates"] = [{k: v for k, v in c.items() if k != "finishReason"}
                              for c in last.get("candidates", ())]
        plan.events[-1] = last
    return plan


def _tool_call(d: Directive, model: str, index: int, thinking: bool) -> dict[str, Any]:
    name = d.args.get("name")
    if not isinstance(name, str) or not name:
        raise ScriptError("tool_call: name=NAME is required")
    args = d.args.get("args", {})
    if not isinstance(args, dict):
        raise ScriptError("tool_call: args must be a JSON object")
    fc: dict[str, Any] = {"name": name, "args": args}
    if "id" in d.args:
        fc["id"] = str(d.args["id"])
    part: dict[str, Any] = {"functionCall": fc}
    sig = d.args.get("signature", "auto")
    if sig == "auto":
        # Thinking models sign the first call of a turn only (protocols.md A7).
        if index == 0 and thinking:
            part["thoughtSignature"] = make_signature(model, name)
    elif sig != "none":
        part["thoughtSignature"] = str(sig)
    return part


def _apply_generation_config(
    text: str, gen: dict[str, Any], finish: str, calls: list[dict[str, Any]], given: bool = False
) -> tuple[str, str]:
    mime = gen.get("responseMimeType") or gen.get("response_mime_type")
    if given:
        pass  # the test wrote the exact text (valid JSON or deliberately not)
    elif mime == "application/json":
        schema = (gen.get("responseJsonSchema") or gen.get("response_json_schema")
                  or gen.get("responseSchema") or gen.get("response_schema"))
        value = sample(schema, text) if isinstance(schema, dict) else {"echo": text}
        text = orjson.dumps(value).decode()
    elif mime == "text/x.enum":
        schema = gen.get("responseSchema") or gen.get("response_schema") or {}
        enum = schema.get("enum") if isinstance(schema, dict) else None
        text = str(enum[0]) if enum else text
    stops = gen.get("stopSequences") or gen.get("stop_sequences") or ()
    cut = min((i for s in stops if isinstance(s, str) and s and (i := text.find(s)) >= 0),
              default=-1)
    if cut >= 0:
        text = text[:cut]
    limit = gen.get("maxOutputTokens") or gen.get("max_output_tokens")
    if isinstance(limit, int) and limit > 0 and count_tokens(text) > limit:
        text = text[: limit * 4]
        finish = "MAX_TOKENS"
    return text, finish


def _split(text: str, chunks: int, chunk_chars: int) -> list[str]:
    if not text:
        return [""]
    if chunk_chars > 0:
        return [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    n = min(chunks, len(text))
    size, extra = divmod(len(text), n)
    out: list[str] = []
    pos = 0
    for i in range(n):
        end = pos + size + (1 if i < extra else 0)
        out.append(text[pos:end])
        pos = end
    return out


def _fill(
    plan: Plan, body: dict[str, Any], model: str, rid: str, text: str | None,
    thought: str | None, thought_sig: str | None, calls: list[dict[str, Any]], finish: str,
    finish_msg: Any, block: str | None, thoughts_tokens: int, chunks: int, chunk_chars: int,
    gen: dict[str, Any],
) -> None:
    ptok = prompt_tokens(body)
    n_cand = gen.get("candidateCount") or gen.get("candidate_count") or 1
    tail = {"modelVersion": model, "responseId": rid}
    base_usage: dict[str, Any] = {"promptTokenCount": ptok}

    def usage(cand_tokens: int) -> dict[str, Any]:
        u = dict(base_usage)
        if cand_tokens:
            u["candidatesTokenCount"] = cand_tokens * n_cand
        total = ptok + cand_tokens * n_cand + thoughts_tokens
        u["totalTokenCount"] = total
        u["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": ptok}]
        if thoughts_tokens:
            u["thoughtsTokenCount"] = thoughts_tokens
        return u

    if block is not None:  # prompt blocked: one chunk, no candidates (protocols.md A4)
        resp = {"promptFeedback": {"blockReason": block, "safetyRatings": _BLOCKED_RATING},
                "usageMetadata": {"promptTokenCount": ptok, "totalTokenCount": ptok}, **tail}
        plan.events.append(resp)
        plan.unary = resp
        return
    if finish == "MALFORMED_FUNCTION_CALL":  # no content at all (CAP-G "k5")
        bad = {"finishReason": finish, "index": 0, "finishMessage": str(
            finish_msg or 'Malformed function call: print(default_api.get_weather(city="Par')}
        resp = {"candidates": _many(bad, n_cand),
                "usageMetadata": {"promptTokenCount": ptok, "totalTokenCount": ptok}, **tail}
        plan.events.append(resp)
        plan.unary = resp
        return

    # Stream: thought chunk, text chunks, one chunk of calls; the finish rides on the last.
    steps: list[tuple[list[dict[str, Any]], int]] = []  # (parts, running candidate tokens)
    if thought is not None:
        steps.append(([{"text": thought, "thought": True}], 0))
    running = 0
    pieces = _split(text, chunks, chunk_chars) if text is not None else []
    done_chars = 0
    for piece in pieces:
        done_chars += len(piece)
        running = (done_chars + 3) // 4  # tokens of the text so far: ends equal to the unary's
        steps.append(([{"text": piece}], running))
    if thought_sig is not None and pieces:
        steps[-1][0][-1]["thoughtSignature"] = thought_sig
    if calls:
        running += sum(_part_tokens(c) for c in calls)
        steps.append((calls, running))
    if not steps:
        steps.append(([{"text": ""}], 0))
    safety = finish == "SAFETY"
    for i, (step_parts, tok) in enumerate(steps):
        cand: dict[str, Any] = {"content": {"parts": step_parts, "role": "model"}, "index": 0}
        if i == len(steps) - 1 and not safety:
            cand["finishReason"] = finish
            if finish_msg:
                cand["finishMessage"] = str(finish_msg)
        plan.events.append({"candidates": _many(cand, n_cand), "usageMetadata": usage(tok),
                            **tail})
    if safety:  # output blocked mid-way: a last chunk with no content (GENAI FinishReason doc)
        cand = {"finishReason": "SAFETY", "index": 0, "safetyRatings": _BLOCKED_RATING}
        plan.events.append({"candidates": _many(cand, n_cand), "usageMetadata": usage(running),
                            **tail})

    # Unary: the same parts merged (one thought part, one text part, the calls).
    parts: list[dict[str, Any]] = []
    if thought is not None:
        parts.append({"text": thought, "thought": True})
    if text is not None:
        tp: dict[str, Any] = {"text": text}
        if thought_sig is not None:
            tp["thoughtSignature"] = thought_sig
        parts.append(tp)
    parts.extend(calls)
    if safety:
        ucand: dict[str, Any] = {"finishReason": "SAFETY", "index": 0,
                                 "safetyRatings": _BLOCKED_RATING}
    else:
        ucand = {"content": {"parts": parts or [{"text": ""}], "role": "model"},
                 "finishReason": finish, "index": 0}
        if finish_msg:
            ucand["finishMessage"] = str(finish_msg)
    plan.unary = {"candidates": _many(ucand, n_cand), "usageMetadata": usage(running), **tail}


def _many(cand: dict[str, Any], n: int) -> list[dict[str, Any]]:
    if n <= 1:
        return [cand]
    return [cand] + [{**cand, "index": i} for i in range(1, n)]
