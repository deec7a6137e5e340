"""OpenAI Responses requests (with their stored history) -> one Gemini call (`GeminiCall`).

The shared rules (contents, tools, generationConfig) live in conversation.py and tools.py; the
package-level invariants are in mapping.py's note. Specific to this API:
- Thought signatures come back from a reasoning item's `encrypted_content`
  (`signatures.unpack_reasoning`).
- Hosted tools: `web_search*` -> `googleSearch` only when no function is declared (Gemini 2.x
  rejects the combination, and an agent's functions matter more); all others are dropped.
"""

from __future__ import annotations

from typing import Any

import msgspec

from rawgate.errors import BadRequest
from rawgate.translate.call import GeminiCall
from rawgate.translate.conversation import (
    Conversation,
    build_body,
    call_args,
    content_parts,
    conversation_key,
    generation_config,
    json_output,
    text_of,
)
from rawgate.translate.schemas import (
    InputItem,
    ResponsesRequest,
    ResponsesTool,
)
from rawgate.translate.signatures import split_call_id, unpack_reasoning
from rawgate.translate.tools import (
    DEFAULT_SCHEMAS,
    Tools,
    ToolSchemas,
    allowed_tools,
    custom_description,
    named_tool,
    tool_config,
)

__all__ = [
    "responses_to_gemini",
]

# ---- Responses -----------------------------------------------------------------------------------

_SEARCH_TOOLS = frozenset({"web_search", "web_search_preview", "web_search_2025_08_26"})
_RESULT_TYPES = frozenset({"function_call_output", "custom_tool_call_output"})


def _responses_tools(
    tools_in: list[ResponsesTool] | None, schemas: ToolSchemas, inline_work: int | None
) -> Tools:
    tools = Tools(schemas, inline_work)
    wants_search = False

    def add(t: ResponsesTool, param: str, namespace: str | None) -> None:
        nonlocal wants_search
        if t.type == "function":
            tools.add(
                t.name or "",
                kind="function",
                namespace=namespace,
                description=t.description,
                params=t.parameters,
                param=param,
            )
        elif t.type == "custom":
            tools.add(
                t.name or "",
                kind="custom",
                namespace=namespace,
                description=custom_description(t.description, t.format),
                params=None,
                param=param,
            )
        elif t.type == "namespace":
            for j, child in enumerate(t.tools or ()):
                add(child, f"{param}.tools[{j}]", t.name or namespace)
        elif t.type in _SEARCH_TOOLS:
            wants_search = True
        # every other hosted tool (local_shell, image_generation, file_search, ...) is dropped

    for i, t in enumerate(tools_in or ()):
        add(t, f"tools[{i}]", None)
    tools.search = wants_search and not tools.decls
    return tools


def _responses_tool_choice(req: ResponsesRequest, tools: Tools) -> dict[str, Any] | None:
    tc = req.tool_choice
    if tc is None:
        return None
    if isinstance(tc, str):
        return tool_config({"none": "NONE", "auto": "AUTO", "required": "ANY"}[tc])
    if tc.type in ("function", "custom"):
        if not tc.name:
            raise BadRequest("tool_choice needs a name.", param="tool_choice.name")
        return tool_config("ANY", [named_tool(tools, tc.name, None, "tool_choice.name")])
    if tc.type == "allowed_tools":
        return allowed_tools(tools, tc.mode, tc.tools or [], "tool_choice.tools")
    return tool_config("AUTO")  # a hosted tool's choice: let the model decide


def _history_items(history: list[dict[str, Any]]) -> list[InputItem]:
    try:
        return msgspec.convert(history, list[InputItem])
    except msgspec.ValidationError as e:
        # The store holds what rawgate saved itself; a bad entry is not the client's input.
        raise BadRequest(f"Stored conversation is unreadable: {e}.", param="previous_response_id")


def _responses_items(conv: Conversation, items: list[InputItem], tools: Tools, base: str) -> None:
    # Call signatures are keyed by call id, so collect them first: a client may order reasoning
    # items after the calls they sign. A text signature ("") is positional: the next text.
    sigs: dict[str, str] = {}
    for it in items:
        if it.type == "reasoning" and it.encrypted_content:
            sigs.update(unpack_reasoning(it.encrypted_content))
    text_sig: str | None = None
    for i, it in enumerate(items):
        param = f"{base}[{i}]"
        typ = it.type or ("message" if it.role else "")
        if typ == "message":
            role = it.role or "user"
            if role in ("system", "developer"):
                conv.add_system(text_of(it.content))
            elif role == "assistant":
                parts = content_parts(it.content, param + ".content")
                if text_sig and parts and "text" in parts[0]:
                    parts[0]["thoughtSignature"] = text_sig
                    text_sig = None
                conv.add_model(parts)
            else:
                conv.add_user(content_parts(it.content, param + ".content"))
        elif typ == "reasoning":
            if it.encrypted_content:
                text_sig = unpack_reasoning(it.encrypted_content).get("") or text_sig
        elif typ in ("function_call", "custom_tool_call"):
            if not it.call_id:
                raise BadRequest("The call needs a call_id.", param=param + ".call_id")
            if not it.name:
                raise BadRequest("The call needs a name.", param=param + ".name")
            if typ == "custom_tool_call":
                args: dict[str, Any] = {"input": it.input or ""}
            else:
                args = call_args(it.arguments)
            sig = sigs.get(it.call_id) or split_call_id(it.call_id)[1]
            conv.add_call(it.call_id, tools.gemini_name(it.name, it.namespace), args, sig)
        elif typ in _RESULT_TYPES:
            if not it.call_id:
                raise BadRequest("The output needs a call_id.", param=param + ".call_id")
            conv.add_result(
                it.call_id, content_parts(it.output, param + ".output"), param + ".call_id"
            )
        # other item types (hosted-tool calls, item references) have no Gemini counterpart


def _normalise_input(req: ResponsesRequest) -> list[dict[str, Any]]:
    if isinstance(req.input, str):
        if not req.input:
            return []
        text = {"type": "input_text", "text": req.input}
        return [{"type": "message", "role": "user", "content": [text]}]
    out: list[dict[str, Any]] = msgspec.to_builtins(req.input)
    for d in out:
        if "type" not in d:
            d["type"] = "message"
    return out


def _request_echo(req: ResponsesRequest) -> dict[str, Any]:
    echo: dict[str, Any] = {
        "tools": msgspec.to_builtins(req.tools) if req.tools else [],
        "tool_choice": msgspec.to_builtins(req.tool_choice) if req.tool_choice else "auto",
        "parallel_tool_calls": req.parallel_tool_calls,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls,
        "reasoning": msgspec.to_builtins(req.reasoning) if req.reasoning else None,
        "text": msgspec.to_builtins(req.text) if req.text else None,
        "truncation": req.truncation,
        "top_logprobs": req.top_logprobs,
        "service_tier": req.service_tier,
        "user": req.user,
        "prompt_cache_key": req.prompt_cache_key,
        "background": req.background,
        "include": list(req.include or ()),
    }
    return echo


def responses_to_gemini(
    req: ResponsesRequest,
    model: str,
    history: list[dict[str, Any]] | None = None,
    *,
    key: bool = True,
    schemas: ToolSchemas = DEFAULT_SCHEMAS,
    inline_work: int | None = None,
) -> GeminiCall:
    """`schemas` and `inline_work` as for `chat_to_gemini`."""
    tools = _responses_tools(req.tools, schemas, inline_work)
    tool_config = _responses_tool_choice(req, tools)
    conv = Conversation(tools)
    if req.instructions:
        conv.add_system(req.instructions)
    if history:
        _responses_items(conv, _history_items(history), tools, "previous_response_id")
    if isinstance(req.input, str):
        conv.add_user([{"text": req.input}] if req.input else [])
    else:
        _responses_items(conv, req.input, tools, "input")
    try:
        contents, system = conv.finish(model)
    except BadRequest as e:
        raise BadRequest("The request has no input to send.", param="input") from e
    # OpenAI returns output_text logprobs for include "message.output_text.logprobs"; a
    # top_logprobs > 0 asks for them too (rather than being ignored).
    want_logprobs = bool(req.top_logprobs) or "message.output_text.logprobs" in (req.include or ())
    r = req.reasoning
    effort = r.effort if r else None
    summary = (r.summary or r.generate_summary) if r else None
    gen = generation_config(
        model,
        max_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        logprobs=want_logprobs,
        top_logprobs=req.top_logprobs,
        effort=effort,
        want_thoughts=(effort not in (None, "none")) or summary not in (None, "none"),
    )
    fmt = req.text.format if req.text else None
    if fmt is not None:
        json_output(gen, fmt.type, fmt.schema)
    input_items = [*(history or ()), *_normalise_input(req)]
    return GeminiCall(
        api="responses",
        model=model,
        client_model=req.model,
        stream=req.stream,
        body=build_body(contents, system, tools, tool_config, gen),
        tools=tools.origins,
        instructions=req.instructions,
        store=req.store is not False,
        previous_response_id=req.previous_response_id,
        metadata=req.metadata,
        input_items=input_items,
        request_echo=_request_echo(req),
        logprobs=(req.top_logprobs or 0) if want_logprobs else None,
        conversation_key=conversation_key(system, contents) if key else None,
    )
