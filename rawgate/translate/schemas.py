"""msgspec Structs for the three OpenAI request bodies rawgate accepts, and their decoders.

Invariants:
- `decode_chat`, `decode_completion` and `decode_responses` return a Struct or raise
  `BadRequest`, nothing else, for any bytes: malformed JSON, invalid UTF-8, NaN/Infinity, lone
  surrogates, numbers out of range, wrong types, nesting deeper than `max_depth`, an empty or
  non-object body. `param` names the offending field in OpenAI's dotted form
  (`messages[2].content`) whenever there is one.
- Unknown fields are ignored everywhere (msgspec's default): clients add fields monthly.
- Everything that reaches a Struct is safe to re-encode with orjson: no lone surrogates (msgspec
  rejects them), no non-finite floats (rejected), no integer outside int64 (checked here, since
  orjson refuses them and would otherwise fail only after the request was routed).
- Shapes that vary by type (content parts, Responses input items, tools) are flat Structs with
  optional fields rather than tagged unions, so that a part or item type invented after this code
  was written decodes instead of failing the whole request; `mapping` decides what to do with it.
- Decoders are built once at import: building one costs far more than a decode.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from rawgate.errors import BadRequest

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "ChatTool",
    "CompletionRequest",
    "ContentPart",
    "InputItem",
    "ResponsesRequest",
    "ResponsesTool",
    "decode_chat",
    "decode_completion",
    "decode_responses",
    "too_deep",
]

# OpenAI's own ranges; Gemini's narrower ones (candidateCount <= 8, ...) are checked in mapping,
# where the message can say which Gemini limit was hit.
_Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
_TopP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
_PosInt = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
_NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
# Top logprobs per token: OpenAI's chat bound and Gemini's own (`logprobs` in [0, 20]); the legacy
# route takes Gemini's bound too (OpenAI's was 5), since rawgate can serve up to 20.
_TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]

Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class _S(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Base: keyword-only, omit defaults when re-encoded (the store saves input items), and
    gc=False because request trees hold no reference cycles, so the collector need not track
    thousands of small objects per request."""


# ---- shared pieces ------------------------------------------------------------------------------


class ImageURL(_S):
    url: str
    detail: str | None = None


class InputAudio(_S):
    data: str
    format: str


class FileRef(_S):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class StreamOptions(_S):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class JSONSchemaFormat(_S):
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_S):
    type: str
    json_schema: JSONSchemaFormat | None = None


# ---- chat completions ---------------------------------------------------------------------------


class ContentPart(_S):
    """One part of a chat `content` list or a Responses message/output list (flat union)."""

    type: str
    text: str | None = None
    refusal: str | None = None
    # chat: {"url", "detail"}; Responses input_image: a plain URL string.
    image_url: ImageURL | str | None = None
    input_audio: InputAudio | None = None
    file: FileRef | None = None
    # Responses input_image / input_file fields.
    detail: str | None = None
    file_id: str | None = None
    file_data: str | None = None
    file_url: str | None = None
    filename: str | None = None


class FunctionCallBody(_S):
    name: str
    # Always a JSON string per the API; a few clients send the object itself.
    arguments: str | dict[str, Any] = ""


class CustomCallBody(_S):
    name: str
    input: str = ""


class ToolCall(_S):
    id: str
    type: str = "function"
    function: FunctionCallBody | None = None
    custom: CustomCallBody | None = None


class ChatMessage(_S):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallBody | None = None  # deprecated single call
    reasoning_content: str | None = None
    refusal: str | None = None


class FunctionDef(_S):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class CustomDef(_S):
    name: str
    description: str | None = None
    format: dict[str, Any] | None = None


class ChatTool(_S):
    type: str = "function"
    function: FunctionDef | None = None
    custom: CustomDef | None = None


class NamedRef(_S):
    name: str


class AllowedTools(_S):
    mode: Literal["auto", "required"] = "auto"
    tools: list[dict[str, Any]] = msgspec.field(default_factory=list)


class ChatToolChoice(_S):
    type: str
    function: NamedRef | None = None
    custom: NamedRef | None = None
    allowed_tools: AllowedTools | None = None


class ChatCompletionRequest(_S):
    model: str
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: _PosInt | None = None
    max_completion_tokens: _PosInt | None = None
    temperature: _Temperature | None = None
    top_p: _TopP | None = None
    n: _PosInt | None = None
    stop: str | list[str] | None = None
    seed: _Int64 | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    logprobs: bool | None = None
    top_logprobs: _TopLogprobs | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ChatToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Effort | None = None
    functions: list[FunctionDef] | None = None  # deprecated
    function_call: Literal["none", "auto"] | NamedRef | None = None  # deprecated
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


# ---- legacy completions -------------------------------------------------------------------------


class CompletionRequest(_S):
    model: str
    # Token-id prompts (int arrays) cannot be honoured without OpenAI's tokenizer: a clear
    # "Expected `str`" 400 at `prompt[0]` is the answer.
    prompt: str | list[str]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: _PosInt | None = None
    temperature: _Temperature | None = None
    top_p: _TopP | None = None
    n: _PosInt | None = None
    best_of: _PosInt | None = None
    stop: str | list[str] | None = None
    echo: bool = False
    suffix: str | None = None
    logprobs: _TopLogprobs | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    seed: _Int64 | None = None
    user: str | None = None


# ---- Responses ----------------------------------------------------------------------------------


class SummaryPart(_S):
    type: str = "summary_text"
    text: str = ""


class InputItem(_S):
    """One Responses input item, every type in one flat Struct (see the module invariants)."""

    type: str | None = None  # absent on EasyInputMessage: then `role` makes it a message
    id: str | None = None
    status: str | None = None
    role: str | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    namespace: str | None = None
    arguments: str | dict[str, Any] | None = None
    input: str | None = None  # custom_tool_call
    output: str | list[ContentPart] | None = None
    summary: list[SummaryPart] | None = None
    encrypted_content: str | None = None


class ResponsesTool(_S):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    format: dict[str, Any] | None = None  # custom tools: {"type": "grammar"|"text", ...}
    tools: list[ResponsesTool] | None = None  # namespace children


class ResponsesToolChoice(_S):
    type: str
    name: str | None = None
    mode: str | None = None
    tools: list[dict[str, Any]] | None = None


class Reasoning(_S):
    effort: Effort | None = None
    summary: str | None = None
    generate_summary: str | None = None


class TextFormat(_S):
    type: str = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class TextConfig(_S):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_S):
    model: str
    input: str | list[InputItem] = msgspec.field(default_factory=list)
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    max_output_tokens: _PosInt | None = None
    max_tool_calls: _PosInt | None = None
    temperature: _Temperature | None = None
    top_p: _TopP | None = None
    top_logprobs: _TopLogprobs | None = None
    truncation: str | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    user: str | None = None
    background: bool | None = None


# ---- decoding -----------------------------------------------------------------------------------

_CHAT = msgspec.json.Decoder(ChatCompletionRequest)
_COMPLETION = msgspec.json.Decoder(CompletionRequest)
_RESPONSES = msgspec.json.Decoder(ResponsesRequest)
_ANY = msgspec.json.Decoder()

# Depth check tables. Everything but quotes and brackets is deleted in one C pass; escaped
# backslashes and escaped quotes are removed first so the remaining quotes delimit strings.
_NON_STRUCTURAL = bytes(b for b in range(256) if b not in b'"[]{}')
_NON_ESCAPE = bytes(b for b in range(256) if b not in b'"[]{}\\/bfnrtu')
_OPEN_CLOSE = bytes.maketrans(b"[{]}", b"(())")
# Integers outside int64 have 19+ digits. Mapping every digit to "0" and looking for a run is a
# C pass; a `[0-9]{19,}` regex search is about ten times slower (it restarts at every byte).
_DIGITS_TO_ZERO = bytes.maketrans(b"0123456789", b"0000000000")
_LONG_RUN = b"0" * 19
_NOT_BRACKET_OR_DIGIT = bytes(b for b in range(256) if b not in b"[{0123456789")
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]', re.DOTALL)
_BYTE_AT = re.compile(r"\(byte (\d+)\)")
# A high surrogate escape not followed by a low one, or a low one not preceded by a high one.
# Used on the error path only, to name the field (msgspec reports some as "truncated").
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
_MISSING = re.compile(r"^Object missing required field `([^`]*)`")
_INT64 = (-(2**63), 2**63 - 1)


def too_deep(body: bytes, max_depth: int) -> bool:
    """True if arrays/objects of `body` nest deeper than max_depth (for decoders of other
    protocols, such as map_messages, that check limits.max_json_depth the same way)."""
    return _too_deep(body, max_depth)


def _too_deep(body: bytes, max_depth: int) -> bool:
    """True if arrays/objects nest deeper than max_depth. Cheap first, exact when needed."""
    # Fewer brackets than the limit cannot nest past it: the common small request stops here.
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    # Strings may hold brackets: reduce the body to quotes and brackets, drop the quoted runs,
    # then peel innermost pairs: each bytes.replace pass (C speed) lowers the depth of every
    # branch by exactly one.
    # First keep quotes, brackets, backslashes and every escape target (`/bfnrtu`), so each
    # backslash stays next to what it escapes while the skeleton shrinks ~6x; only then remove
    # escaped backslashes and quotes (bytes.replace is the slow step, so it runs on less).
    skeleton = body.translate(None, _NON_ESCAPE)
    if b"\\" in skeleton:
        skeleton = skeleton.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Quotes now alternate open/close: the even split segments are the text outside strings
    # (split+join is ~3x faster than a regex substitution here).
    outside = b"".join(skeleton.translate(None, _NON_STRUCTURAL).split(b'"')[::2])
    brackets = outside.translate(_OPEN_CLOSE)
    for _ in range(max_depth):
        if not brackets:
            return False
        brackets = brackets.replace(b"()", b"")
    # Leftover pairs mean deeper nesting; leftover without a pair is unbalanced JSON, which the
    # decoder reports as malformed with a better message.
    return b"()" in brackets


def _path_at(body: bytes, offset: int) -> str | None:
    """The field path enclosing byte `offset` (error path only, so a plain token walk)."""
    stack: list[list[Any]] = []  # [is_object, key or index, expecting_key]
    for m in _TOKEN.finditer(body, 0, offset):
        t = m.group()
        c = t[:1]
        if c == b"{":
            stack.append([True, None, True])
        elif c == b"[":
            stack.append([False, 0, False])
        elif c in (b"]", b"}"):
            if stack:
                stack.pop()
        elif not stack:
            continue
        elif c == b",":
            top = stack[-1]
            if top[0]:
                top[2] = True
            else:
                top[1] += 1
        elif c == b":":
            stack[-1][2] = False
        elif stack[-1][0] and stack[-1][2]:
            try:
                stack[-1][1] = _ANY.decode(t)
            except (msgspec.DecodeError, UnicodeDecodeError):
                stack[-1][1] = "?"
    return _join([entry[1] for entry in stack if entry[1] is not None]) or None


def _join(keys: list[str | int]) -> str:
    out = []
    for k in keys:
        if isinstance(k, int):
            out.append(f"[{k}]")
        else:
            out.append(("." if out else "") + str(k))
    return "".join(out)


def _find_big_int(node: Any, path: list[str | int]) -> str | None:
    """Path of the first integer outside int64 in a generically decoded tree, else None."""
    if isinstance(node, bool):
        return None
    if isinstance(node, int):
        return None if _INT64[0] <= node <= _INT64[1] else _join(path)
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_big_int(v, [*path, k])
            if found is not None:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _find_big_int(v, [*path, i])
            if found is not None:
                return found
    return None


def _validation_error(e: msgspec.ValidationError) -> BadRequest:
    text = str(e)
    msg, sep, where = text.rpartition(" - at `")
    if not sep:
        msg, where = text, "$`"
    path = where.rstrip("`")
    path = path[2:] if path.startswith("$.") else path[1:]
    # msgspec writes a dict value's position as `[...]` (the key is not kept): name the dict.
    path = path.split("[...]", 1)[0]
    missing = _MISSING.match(msg)
    if missing:
        field = missing.group(1)
        param = f"{path}.{field}" if path else field
        return BadRequest(f"Missing required parameter: '{param}'.", param=param)
    if not path:
        return BadRequest(f"Invalid request body: {msg}.", param=None)
    return BadRequest(f"Invalid value for '{path}': {msg}.", param=path)


def _decode(dec: msgspec.json.Decoder[Any], body: bytes, max_depth: int) -> Any:
    if not body or body.isspace():
        raise BadRequest("The request body is empty; a JSON object is required.")
    # One C pass keeps only brackets and digits; both pre-checks first read that small residue
    # and scan the body again only when it could fail them: 20 KB of prompt text went from
    # ~40 us of scans (two counts, a digit translate + find) to ~9 us on the bench box.
    skim = body.translate(None, _NOT_BRACKET_OR_DIGIT)
    brackets = skim.count(b"[") + skim.count(b"{")
    if brackets > max_depth and _too_deep(body, max_depth):
        raise BadRequest(f"The JSON body nests deeper than {max_depth} levels.")
    try:
        obj = dec.decode(body)
    except msgspec.ValidationError as e:
        raise _validation_error(e) from None
    except msgspec.DecodeError as e:
        m = _BYTE_AT.search(str(e))
        offset = int(m.group(1)) if m else None
        lone = _LONE_SURROGATE.search(body)
        if lone is not None:
            offset = lone.start()
            why = "it contains a lone UTF-16 surrogate escape"
        else:
            why = "it is not valid JSON (NaN and Infinity are not JSON)"
        param = _path_at(body, offset) if offset is not None else None
        raise BadRequest(f"We could not parse the JSON body of your request: {why}.", param=param)
    except UnicodeDecodeError:
        raise BadRequest("We could not parse the JSON body of your request: invalid UTF-8.")
    except RecursionError:
        raise BadRequest(f"The JSON body nests deeper than {max_depth} levels.")
    # Typed int fields are bounded by their Meta; free-form fields (schemas, arguments) are not,
    # and orjson refuses big ints. The digit scan is a C search that almost never hits.
    digits = len(skim) - brackets  # fewer than a long run's length: no long run anywhere
    if digits >= len(_LONG_RUN) and body.translate(_DIGITS_TO_ZERO).find(_LONG_RUN) >= 0:
        found = _find_big_int(_ANY.decode(body), [])
        if found is not None:
            raise BadRequest(
                f"Invalid value for '{found}': integer out of the 64-bit range.", param=found
            )
    return obj


def decode_chat(body: bytes, *, max_depth: int = 64) -> ChatCompletionRequest:
    req: ChatCompletionRequest = _decode(_CHAT, body, max_depth)
    return req


def decode_completion(body: bytes, *, max_depth: int = 64) -> CompletionRequest:
    req: CompletionRequest = _decode(_COMPLETION, body, max_depth)
    return req


def decode_responses(body: bytes, *, max_depth: int = 64) -> ResponsesRequest:
    req: ResponsesRequest = _decode(_RESPONSES, body, max_depth)
    return req
