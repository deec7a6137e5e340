"""Anthropic Messages requests -> one Gemini GenerateContentRequest (protocols-2.md A-B, E1-E3).

Invariants:
- Pure: request bytes in, a `GeminiCall` plus `MessagesOptions` out; no I/O, never fetches a URL
  (image/document URLs go by reference as `fileData`), never reads a file.
- Lenient where Claude Code and the SDKs send more than Gemini knows (`cache_control`,
  `context_management`, `service_tier`, `container`, unknown top-level fields, unknown betas):
  ignored, never a 400. Strict where a silent drop would change the answer: server tools other
  than web search, a web search mixed with client tools, a malformed block are a 400 naming
  the field.
- Conversation rules are mapping.py's (`Conversation`): roles user/model, merged turns, N calls
  answered by N functionResponses in call order. A `role: "system"` message (or a
  `mid_conv_system` block) is user text at the same position (E1); when it falls between a
  tool_use and its tool_result it waits until the results are in, so the call/result pairing
  holds.
- `tool_result` carries only `tool_use_id`: the Gemini function name comes from the matching
  tool_use block earlier in the same request (always present: clients echo the history), the
  thought signature from the tool_use id or the thinking block before it, both opened by
  sigtag.py for the model being called. Anything rawgate did not mint for that model is not
  sent; Gemini 3 then gets SKIP_SIGNATURE on the first call of each turn of the active loop.
- The `x-anthropic-billing-header:` block of `system` (Claude Code's attribution, different per
  release) never reaches Gemini.
- `max_tokens` is clamped to the model's output limit (Claude Code sends 128000); only what the
  client set reaches generationConfig.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import orjson

from rawgate.errors import BadRequest
from rawgate.translate.call import GeminiCall
from rawgate.translate.conversation import MAX_STOP, Conversation, build_body, media
from rawgate.translate.jsonschema import SchemaError, to_response_schema
from rawgate.translate.schemas import too_deep
from rawgate.translate.sigtag import SignatureTagger
from rawgate.translate.thinking import family, thinking_config
from rawgate.translate.tools import DEFAULT_SCHEMAS, Tools, ToolSchemas, tool_config
from rawgate.translate.transcode_messages import MessagesOptions

__all__ = ["MessagesRequest", "decode_messages", "messages_to_gemini", "output_limit"]

_BILLING = "x-anthropic-billing-header:"


class Message(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]] = ""


class MessagesRequest(msgspec.Struct):
    """The fields rawgate reads; everything else is ignored (see the module note)."""

    model: str
    messages: list[Message]
    max_tokens: int | None = None  # required by Anthropic for /messages, absent in count_tokens
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


_decoder = msgspec.json.Decoder(MessagesRequest)


def decode_messages(
    body: bytes, *, count_tokens: bool = False, max_depth: int = 64
) -> MessagesRequest:
    """Decode and check the request; a 400 in words a client can act on. `max_depth`:
    limits.max_json_depth, as on the OpenAI routes."""
    if not body or body.isspace():
        raise BadRequest("The request body is empty; a JSON object is required.")
    if too_deep(body, max_depth):
        raise BadRequest(f"The JSON body nests deeper than {max_depth} levels.")
    try:
        req = _decoder.decode(body)
    except msgspec.ValidationError as e:
        raise BadRequest(f"Invalid request: {e}.", param=_path_of(str(e))) from None
    except msgspec.DecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if not count_tokens:
        if req.max_tokens is None:
            raise BadRequest("max_tokens: Field required", param="max_tokens")
        if req.max_tokens < 1:
            raise BadRequest("max_tokens: must be at least 1", param="max_tokens")
    if not req.messages:
        raise BadRequest("messages: at least one message is required", param="messages")
    return req


def _path_of(msg: str) -> str | None:
    # msgspec: "Expected `str`, got `int` - at `$.messages[0].role`"
    i = msg.rfind("`$.")
    return msg[i + 3 : -1] if i >= 0 and msg.endswith("`") else None


# Output token ceilings (Gemini's models.get outputTokenLimit): 2.0 and Gemma stop at 8192, the
# 2.5 and 3.x models at 65536.
def output_limit(model: str) -> int:
    m = model.rsplit("/", 1)[-1].lower()
    if m.startswith(("gemini-2.0", "gemini-1.", "gemma")):
        return 8192
    return 65536


# ---- content -------------------------------------------------------------------------------------


def text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
    return ""


def _source_part(src: object, param: str, title: str | None) -> list[dict[str, Any]]:
    if not isinstance(src, dict):
        raise BadRequest("A media block needs a source.", param=param)
    kind = src.get("type")
    if kind == "base64":
        mime, data = src.get("media_type"), src.get("data")
        if not isinstance(mime, str) or not isinstance(data, str) or not data:
            raise BadRequest("A base64 source needs media_type and data.", param=param)
        return [{"inlineData": {"mimeType": mime, "data": data}}]
    if kind == "url":
        url = src.get("url")
        if not isinstance(url, str):
            raise BadRequest("A url source needs a url.", param=param + ".url")
        return [media(url, param + ".url")]
    if kind == "text":
        data = src.get("data")
        text = data if isinstance(data, str) else ""
        return [{"text": f"{title}\n\n{text}" if title else text}] if text else []
    if kind == "content":
        inner = src.get("content")
        if isinstance(inner, str):
            return [{"text": inner}] if inner else []
        return _blocks(inner if isinstance(inner, list) else [], param + ".content")
    raise BadRequest(f"Unknown source type '{kind}'.", param=param + ".type")


def _blocks(blocks: list[Any], param: str) -> list[dict[str, Any]]:
    """Gemini parts for user-side content blocks (no tool_result here)."""
    out: list[dict[str, Any]] = []
    for j, b in enumerate(blocks):
        pp = f"{param}[{j}]"
        if not isinstance(b, dict):
            raise BadRequest("A content block must be an object.", param=pp)
        t = b.get("type")
        if t == "text":
            text = b.get("text")
            if isinstance(text, str) and text:
                out.append({"text": text})
        elif t in ("image", "document"):
            title = b.get("title") if isinstance(b.get("title"), str) else None
            out.extend(_source_part(b.get("source"), pp + ".source", title))
        elif t == "search_result":
            body = text_of(b.get("content"))
            head = " ".join(str(b[k]) for k in ("title", "source") if isinstance(b.get(k), str))
            if body or head:
                out.append({"text": f"{head}\n{body}".strip()})
        elif t == "tool_reference":
            name = b.get("tool_name")
            if isinstance(name, str):
                out.append({"text": f"Tool {name} is now available."})
        elif t == "mid_conv_system":
            text = text_of(b.get("content"))
            if text:
                out.append({"text": text})
        elif t in ("thinking", "redacted_thinking", "tool_use", "tool_result"):
            raise BadRequest(f"A '{t}' block cannot appear here.", param=pp + ".type")
        # other decorations (citations, containers ...) carry nothing for Gemini
    return out


class _Assistant:
    """Replays one assistant message into the conversation, with its signatures."""

    def __init__(self, conv: Conversation, tools: Tools, sig: SignatureTagger, model: str):
        self.conv, self.tools, self.sig, self.model = conv, tools, sig, model

    def add(self, content: str | list[dict[str, Any]], param: str) -> None:
        conv = self.conv
        if isinstance(content, str):
            conv.add_model([{"text": content}] if content else [])
            return
        pending: str | None = None  # a thinking block's signature, for the next part
        for j, b in enumerate(content):
            pp = f"{param}[{j}]"
            if not isinstance(b, dict):
                raise BadRequest("A content block must be an object.", param=pp)
            t = b.get("type")
            if t == "thinking":
                got = self.sig.open(self.model, b.get("signature"))
                if got is not None:
                    pending = got
            elif t == "text":
                text = b.get("text")
                if isinstance(text, str) and (text or pending):
                    part: dict[str, Any] = {"text": text}
                    if pending:
                        part["thoughtSignature"], pending = pending, None
                    conv.add_model([part])
            elif t == "tool_use":
                tid, name, args = b.get("id"), b.get("name"), b.get("input")
                if not isinstance(tid, str) or not isinstance(name, str):
                    raise BadRequest("A tool_use block needs an id and a name.", param=pp)
                sig = self.sig.open_tool_id(self.model, tid) or pending
                pending = None
                gname = self.tools.gemini_name(name)
                conv.add_call(tid, gname, args if isinstance(args, dict) else {}, sig)
            elif t in ("redacted_thinking", "server_tool_use", "web_search_tool_result"):
                continue  # opaque to Gemini (another provider's, or a server tool's record)
            else:
                conv.add_model(_blocks([b], param)[:])
        if pending:  # a signed thinking block with nothing after it in the turn
            conv.add_model([{"text": "", "thoughtSignature": pending}])


def _user(
    conv: Conversation, content: str | list[dict[str, Any]], param: str, waiting: list[str]
) -> None:
    if isinstance(content, str):
        parts = [{"text": content}] if content else []
    else:
        parts = []
        rest: list[dict[str, Any]] = []
        for j, b in enumerate(content):
            if isinstance(b, dict) and b.get("type") == "tool_result":
                _tool_result(conv, b, f"{param}[{j}]")
            else:
                rest.append(b)
        parts = _blocks(rest, param)
    if waiting:  # system text that arrived between a tool_use and its result
        parts = [{"text": t} for t in waiting] + parts
        waiting.clear()
    conv.add_user(parts)


def _tool_result(conv: Conversation, b: dict[str, Any], param: str) -> None:
    tid = b.get("tool_use_id")
    if not isinstance(tid, str):
        raise BadRequest("A tool_result needs a tool_use_id.", param=param + ".tool_use_id")
    content = b.get("content")
    if isinstance(content, str):
        parts: list[dict[str, Any]] = [{"text": content}] if content else []
    elif isinstance(content, list):
        parts = _blocks(content, param + ".content")
    else:
        parts = []
    conv.add_result(tid, parts, param + ".tool_use_id")
    # Anthropic's text blocks are separate paragraphs: joined by newlines (vector 4), and an
    # is_error result is Gemini's `error` response.
    text = "\n".join(p["text"] for p in parts if "text" in p)
    key = "error" if b.get("is_error") is True else "output"
    conv.results[tid][0]["functionResponse"]["response"] = {key: text}


# ---- tools, thinking, generationConfig -------------------------------------------------------


def _tools(
    req: MessagesRequest, schemas: ToolSchemas, inline_work: int | None
) -> tuple[Tools, bool]:
    """(tools, web search asked) for the request's tools; the schemas are charged to the
    request's budget as on the OpenAI routes (mapping.ToolSchemas)."""
    tools = Tools(schemas, inline_work)
    search = False
    for i, t in enumerate(req.tools or ()):
        p = f"tools[{i}]"
        kind = t.get("type")
        if isinstance(kind, str) and kind.startswith("web_search_"):
            search = True
            continue
        if kind not in (None, "custom"):
            raise BadRequest(
                f"The server tool '{kind}' has no Gemini equivalent; rawgate cannot run it.",
                param=p + ".type",
            )
        name = t.get("name")
        schema = t.get("input_schema")
        if not isinstance(name, str):
            raise BadRequest("A tool needs a name.", param=p + ".name")
        desc = t.get("description")
        tools.add(
            name,
            kind="function",
            namespace=None,
            description=desc if isinstance(desc, str) else None,
            params=schema if isinstance(schema, dict) and schema.get("properties") else None,
            param=p,
        )
    if search:
        if tools.decls:
            raise BadRequest(
                "Gemini cannot combine its web search with client tools in one request; send "
                "the web_search tool alone (as Claude Code does) or drop it.",
                param="tools",
            )
        tools.search = True
    return tools, search


def _tool_choice(req: MessagesRequest, tools: Tools) -> tuple[dict[str, Any] | None, bool]:
    """(toolConfig, disable_parallel_tool_use)."""
    tc = req.tool_choice
    if not tc:
        return None, False
    single = tc.get("disable_parallel_tool_use") is True
    kind = tc.get("type")
    if kind == "auto":
        return tool_config("AUTO"), single
    if kind == "any":
        return tool_config("ANY"), single
    if kind == "none":
        return tool_config("NONE"), single
    if kind == "tool":
        name = tc.get("name")
        gname = tools.by_client.get((None, name)) if isinstance(name, str) else None
        if gname is None:
            raise BadRequest(
                f"tool_choice names '{name}', which is not among the tools.",
                param="tool_choice.name",
            )
        return tool_config("ANY", [gname]), single
    raise BadRequest(f"Unknown tool_choice type '{kind}'.", param="tool_choice.type")


_EFFORTS = ("low", "medium", "high", "xhigh", "max")


def _level_for_budget(budget: int) -> str:
    # Gemini 3 takes a level, not a budget: the nearest one (protocols-2.md E1).
    if budget <= 2048:
        return "low"
    if budget <= 16384:
        return "medium"
    return "high"


def _thinking(
    req: MessagesRequest, model: str, max_out: int
) -> tuple[dict[str, Any] | None, MessagesOptions]:
    th = req.thinking or {}
    kind = th.get("type")
    stops = tuple(req.stop_sequences or ())
    if kind not in ("enabled", "adaptive"):
        off = thinking_config(model, "none", False) if kind == "disabled" else None
        return off, MessagesOptions(stop_sequences=stops)
    show = th.get("display") != "omitted"
    fam = family(model)
    effort = (req.output_config or {}).get("effort")
    tc: dict[str, Any] | None
    if kind == "enabled":
        budget = th.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1:
            raise BadRequest(
                "thinking.budget_tokens must be a positive integer.", param="thinking.budget_tokens"
            )
        if fam.startswith("2.5"):
            low = 128 if fam == "2.5-pro" else 0
            tc = {
                "thinkingBudget": max(
                    low, min(budget, 32768 if fam == "2.5-pro" else 24576, max_out - 1)
                )
            }
            if show:
                tc["includeThoughts"] = True
        else:
            tc = thinking_config(model, _level_for_budget(budget), show)
    elif isinstance(effort, str) and effort in _EFFORTS:
        tc = thinking_config(model, effort, show)
    elif fam.startswith("2.5"):
        tc = {"thinkingBudget": -1}  # adaptive: the model decides (dynamic thinking)
        if show:
            tc["includeThoughts"] = True
    else:
        tc = thinking_config(model, None, show)
    return tc, MessagesOptions(thinking_blocks=True, show_thinking=show, stop_sequences=stops)


def messages_to_gemini(
    req: MessagesRequest,
    model: str,
    sig: SignatureTagger,
    *,
    key: bool = True,
    schemas: ToolSchemas = DEFAULT_SCHEMAS,
    inline_work: int | None = None,
) -> tuple[GeminiCall, MessagesOptions]:
    """The Gemini call for an Anthropic request; `model` is the router's answer. `schemas` and
    `inline_work` as for mapping.chat_to_gemini (SchemasOffLoop when over `inline_work`)."""
    tools, _search = _tools(req, schemas, inline_work)
    tool_config, single = _tool_choice(req, tools)
    conv = Conversation(tools)
    if isinstance(req.system, str):
        if req.system and not req.system.startswith(_BILLING):
            conv.add_system(req.system)
    elif req.system:
        for b in req.system:
            text = b.get("text") if isinstance(b, dict) else None
            if isinstance(text, str) and text and not text.startswith(_BILLING):
                conv.add_system(text)
    replay = _Assistant(conv, tools, sig, model)
    waiting: list[str] = []
    for i, m in enumerate(req.messages):
        p = f"messages[{i}].content"
        if m.role == "user":
            _user(conv, m.content, p, waiting)
        elif m.role == "assistant":
            replay.add(m.content, p)
        elif m.role == "system":
            text = text_of(m.content)
            if text:
                if conv.calls:  # between a tool_use and its tool_result: after the results
                    waiting.append(text)
                else:
                    conv.add_user([{"text": text}])
        else:
            raise BadRequest(
                f"Unknown role '{m.role}': use user, assistant or system.",
                param=f"messages[{i}].role",
            )
    if waiting:
        conv.add_user([{"text": t} for t in waiting])
    contents, system = conv.finish(model)

    limit = output_limit(model)
    gen: dict[str, Any] = {}
    if req.max_tokens is not None:
        gen["maxOutputTokens"] = min(req.max_tokens, limit)
    if req.temperature is not None:
        gen["temperature"] = req.temperature
    if req.top_p is not None:
        gen["topP"] = req.top_p
    if req.top_k is not None:
        gen["topK"] = req.top_k
    stops = [s for s in req.stop_sequences or () if s]
    if len(stops) > MAX_STOP:
        raise BadRequest(
            f"Gemini accepts at most {MAX_STOP} stop sequences.", param="stop_sequences"
        )
    if stops:
        gen["stopSequences"] = stops
    fmt = (req.output_config or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        gen["responseMimeType"] = "application/json"
        schema = fmt.get("schema")
        if isinstance(schema, dict):
            try:
                gen["responseJsonSchema"] = to_response_schema(schema)
            except SchemaError as e:
                raise BadRequest(
                    f"output_config.format.schema: {e}.", param="output_config.format.schema"
                ) from None
    tc, opts = _thinking(req, model, gen.get("maxOutputTokens", limit))
    if tc is not None:
        gen["thinkingConfig"] = tc
    if single:
        opts = MessagesOptions(opts.thinking_blocks, opts.show_thinking, opts.stop_sequences, True)

    body = build_body(contents, system, tools, tool_config, gen)
    user_id = (req.metadata or {}).get("user_id")
    conv_key = None
    if key:
        seed = (
            user_id if isinstance(user_id, str) and user_id else orjson.dumps([system, contents[0]])
        )
        conv_key = hashlib.blake2b(
            seed.encode() if isinstance(seed, str) else seed, digest_size=12
        ).hexdigest()
    call = GeminiCall(
        api="messages",
        model=model,
        client_model=req.model,
        stream=req.stream,
        body=body,
        tools=dict(tools.origins),
        conversation_key=conv_key,
    )
    return call, opts
