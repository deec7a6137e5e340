"""OpenAI Chat Completions and legacy Completions requests -> one Gemini call (`GeminiCall`).

The shared rules (contents, tools, generationConfig) live in conversation.py and tools.py; the
package-level invariants are in mapping.py's note. Specific to these APIs:
- Thought signatures come back from the call id (`signatures.split_call_id`).
- Legacy completions take one prompt per request: Gemini has no batch call and one request maps
  to one upstream call, so a list of several prompts is a 400 naming `prompt`.
- `parallel_tool_calls` has no Gemini knob and is only echoed.
"""

from __future__ import annotations

from typing import Any

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
    stop_sequences,
    text_of,
)
from rawgate.translate.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
)
from rawgate.translate.signatures import split_call_id
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
    "chat_to_gemini",
    "completion_to_gemini",
]

# ---- chat completions ----------------------------------------------------------------------------


def _chat_tools(req: ChatCompletionRequest, schemas: ToolSchemas, inline_work: int | None) -> Tools:
    tools = Tools(schemas, inline_work)
    for i, t in enumerate(req.tools or ()):
        p = f"tools[{i}]"
        if t.type == "function":
            if t.function is None:
                raise BadRequest("A function tool needs `function`.", param=p + ".function")
            f = t.function
            tools.add(
                f.name,
                kind="function",
                namespace=None,
                description=f.description,
                params=f.parameters,
                param=p + ".function",
            )
        elif t.type == "custom":
            if t.custom is None:
                raise BadRequest("A custom tool needs `custom`.", param=p + ".custom")
            c = t.custom
            tools.add(
                c.name,
                kind="custom",
                namespace=None,
                description=custom_description(c.description, c.format),
                params=None,
                param=p + ".custom",
            )
        # other types (hosted tools some clients send to chat) are dropped
    for i, f in enumerate(req.functions or ()):
        tools.add(
            f.name,
            kind="function",
            namespace=None,
            description=f.description,
            params=f.parameters,
            param=f"functions[{i}]",
        )
    return tools


def _chat_tool_choice(req: ChatCompletionRequest, tools: Tools) -> dict[str, Any] | None:
    tc = req.tool_choice
    if tc is None:
        fc = req.function_call
        if fc is None:
            return None
        if isinstance(fc, str):
            return tool_config("NONE" if fc == "none" else "AUTO")
        return tool_config("ANY", [named_tool(tools, fc.name, None, "function_call")])
    if isinstance(tc, str):
        return tool_config({"none": "NONE", "auto": "AUTO", "required": "ANY"}[tc])
    if tc.type == "allowed_tools" and tc.allowed_tools is not None:
        at = tc.allowed_tools
        return allowed_tools(tools, at.mode, at.tools, "tool_choice.allowed_tools")
    ref = tc.function or tc.custom
    if ref is None:
        raise BadRequest("tool_choice needs a function name.", param="tool_choice")
    return tool_config("ANY", [named_tool(tools, ref.name, None, "tool_choice")])


def _chat_message(conv: Conversation, m: ChatMessage, i: int, tools: Tools) -> None:
    param = f"messages[{i}]"
    role = m.role
    if role in ("system", "developer"):
        conv.add_system(text_of(m.content))
    elif role == "user":
        conv.add_user(content_parts(m.content, param + ".content"))
    elif role == "assistant":
        # Prior thought text is not sent back: Gemini ignores it; signatures carry the state.
        conv.add_model(content_parts(m.content, param + ".content"))
        if m.function_call is not None:
            fc = m.function_call
            conv.add_call(
                "fn:" + fc.name, tools.gemini_name(fc.name), call_args(fc.arguments), None
            )
        for j, tc in enumerate(m.tool_calls or ()):
            if tc.function is not None:
                name, args = tc.function.name, call_args(tc.function.arguments)
            elif tc.custom is not None:
                name, args = tc.custom.name, {"input": tc.custom.input}
            else:
                raise BadRequest("A tool call needs `function`.", param=f"{param}.tool_calls[{j}]")
            conv.add_call(tc.id, tools.gemini_name(name), args, split_call_id(tc.id)[1])
    elif role == "tool":
        if not m.tool_call_id:
            raise BadRequest("A tool message needs tool_call_id.", param=param + ".tool_call_id")
        conv.add_result(m.tool_call_id, content_parts(m.content, param + ".content"), param)
    else:  # deprecated role "function": answers the deprecated function_call by name
        if not m.name:
            raise BadRequest("A function message needs a name.", param=param + ".name")
        conv.add_result(
            "fn:" + m.name, content_parts(m.content, param + ".content"), param + ".name"
        )


def chat_to_gemini(
    req: ChatCompletionRequest,
    model: str,
    *,
    key: bool = True,
    schemas: ToolSchemas = DEFAULT_SCHEMAS,
    inline_work: int | None = None,
) -> GeminiCall:
    """`key=False` skips the sticky-scheduling conversation key (a hash of the first turns,
    ~1.5 us + an orjson dump per request) when the scheduler does not use it. `schemas` is the
    tool-schema memo and per-request budget (the gateway passes its own, built from config);
    `inline_work` caps the schema cleaning this call may do (else SchemasOffLoop)."""
    tools = _chat_tools(req, schemas, inline_work)
    tool_config = _chat_tool_choice(req, tools)
    conv = Conversation(tools)
    for i, m in enumerate(req.messages):
        _chat_message(conv, m, i, tools)
    contents, system = conv.finish(model)
    gen = generation_config(
        model,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        n=req.n,
        stop=stop_sequences(req.stop),
        seed=req.seed,
        presence=req.presence_penalty,
        frequency=req.frequency_penalty,
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs,
        effort=req.reasoning_effort,
        want_thoughts=req.reasoning_effort not in (None, "none"),
    )
    rf = req.response_format
    if rf is not None:
        json_output(gen, rf.type, rf.json_schema.schema if rf.json_schema else None)
    return GeminiCall(
        api="chat",
        model=model,
        client_model=req.model,
        stream=req.stream,
        body=build_body(contents, system, tools, tool_config, gen),
        tools=tools.origins,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        n=req.n or 1,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        conversation_key=conversation_key(system, contents) if key else None,
    )


# ---- legacy completions --------------------------------------------------------------------------


def completion_to_gemini(req: CompletionRequest, model: str, *, key: bool = True) -> GeminiCall:
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequest(
                "rawgate accepts one prompt per request (Gemini has no batch call); "
                "send the prompts as separate requests.",
                param="prompt",
            )
        prompt = prompt[0]
    if not prompt:
        raise BadRequest("The prompt is empty.", param="prompt")
    if req.suffix:
        raise BadRequest(
            "Gemini has no fill-in-the-middle mode: `suffix` is unsupported.", param="suffix"
        )
    if req.best_of is not None and req.best_of > (req.n or 1):
        raise BadRequest("best_of > n is not supported by Gemini.", param="best_of")
    contents = [{"role": "user", "parts": [{"text": prompt}]}]
    gen = generation_config(
        model,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        n=req.n,
        stop=stop_sequences(req.stop),
        seed=req.seed,
        presence=req.presence_penalty,
        frequency=req.frequency_penalty,
        logprobs=req.logprobs is not None,
        top_logprobs=req.logprobs,
    )
    return GeminiCall(
        api="completions",
        model=model,
        client_model=req.model,
        stream=req.stream,
        body=build_body(contents, None, Tools(), None, gen),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        n=req.n or 1,
        logprobs=req.logprobs,
        echo_prompt=prompt if req.echo else None,
        conversation_key=conversation_key(None, contents) if key else None,
    )
