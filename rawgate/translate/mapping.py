"""OpenAI requests (chat, legacy completions, Responses) -> one Gemini GenerateContentRequest.

Invariants:
- Pure: decoded Structs in, a `GeminiCall` record out; no I/O, never reads a local file (a
  `file://` URL or a path is a 400), never fetches a URL (http(s) images become `fileData`).
- Only what the client asked for reaches `generationConfig`: no hidden temperature, topK, token
  limit, safety setting or thinking budget.
- System text (system and developer messages, Responses `instructions` and system/developer items)
  goes to `systemInstruction` verbatim, one part per message, in order. A request with nothing but
  system text sends it as the user turn instead (Gemini requires contents; OpenAI does not).
- `contents` roles are only "user" and "model"; consecutive same-role turns are merged; empty text
  parts and empty turns are dropped.
- Every model turn with N functionCall parts is followed by one user turn with exactly N
  functionResponse parts in call order (Gemini 400s otherwise): results are grouped, reordered
  and their names resolved from the call ids; a call the client sent no result for gets an
  explicit `{"error": ...}` response rather than a broken request.
- Thought signatures come back only where Gemini put them: from the call id (chat,
  `signatures.split_call_id`) or a reasoning item's `encrypted_content` (Responses,
  `signatures.unpack_reasoning`). For Gemini 3, a model turn in the active loop (after the last
  user text) whose first functionCall has none gets SKIP_SIGNATURE; older turns are untouched.
- Tool-call arguments in history are parsed JSON objects, never schema-cleaned; arguments that are
  not a JSON object are kept visible to the model as `{"_raw": <text>}` instead of failing.
- Gemini function names are `[A-Za-z_][A-Za-z0-9_.:-]{0,63}`; any other client name is mapped
  deterministically (so history and declarations agree) and recorded in `GeminiCall.tools`.
- Hosted tools: `web_search*` -> `googleSearch` only when no function is declared (Gemini 2.x
  rejects the combination, and an agent's functions matter more); all others are dropped.
- Legacy completions take one prompt per request: Gemini has no batch call and one request maps
  to one upstream call, so a list of several prompts is a 400 naming `prompt`.
- `parallel_tool_calls` has no Gemini knob and is only echoed.
- `GeminiCall.body` is read-only once built: cleaned tool schemas are memoised and shared.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import msgspec
import orjson

from rawgate.translate.call import GeminiCall, ToolOrigin
from rawgate.errors import BadRequest
from rawgate.translate.jsonschema import SchemaError, to_gemini_parameters, to_response_schema
from rawgate.translate.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    ImageURL,
    InputItem,
    ResponsesRequest,
    ResponsesTool,
)
from rawgate.translate.signatures import SKIP_SIGNATURE, split_call_id, unpack_reasoning
from rawgate.translate.thinking import family, thinking_config

__all__ = [
    "chat_to_gemini",
    "code_assist_body",
    "completion_to_gemini",
    "gemini_body",
    "responses_to_gemini",
]

_MAX_CANDIDATES = 8  # Gemini's candidateCount ceiling
_MAX_STOP = 5  # Gemini's stopSequences ceiling
_NAME_OK = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,63}")
_NAME_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.:\-]")
_MISSING_RESULT = {"error": "No result was provided for this call."}

# Extension -> MIME for http(s) media, so the guess never depends on the host's mime.types.
_MIME_BY_EXT = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "heic": "image/heic",
    "heif": "image/heif",
    "pdf": "application/pdf",
    "txt": "text/plain",
    "md": "text/markdown",
    "html": "text/html",
    "csv": "text/csv",
    "json": "application/json",
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "aac": "audio/aac",
    "m4a": "audio/mp4",
    "mp4": "video/mp4",
    "mov": "video/quicktime",
    "webm": "video/webm",
}
_AUDIO_MIME = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "m4a": "audio/mp4",
    "pcm16": "audio/pcm",
    "webm": "audio/webm",
}


# ---- small helpers ------------------------------------------------------------------------------


def _ext_mime(name: str) -> str | None:
    dot = name.rfind(".")
    return _MIME_BY_EXT.get(name[dot + 1 :].lower()) if dot >= 0 else None


def _data_url(url: str, param: str) -> dict[str, Any]:
    head, comma, payload = url[5:].partition(",")
    if not comma:
        raise BadRequest("Malformed data URL: no ',' before the data.", param=param)
    fields = head.split(";")
    mime = fields[0].strip().lower()
    if not mime:
        raise BadRequest("The data URL has no media type (data:<type>;base64,...).", param=param)
    if "base64" in (f.strip().lower() for f in fields[1:]):
        data = payload.strip()
    else:
        data = base64.b64encode(unquote_to_bytes(payload)).decode("ascii")
    if not data:
        raise BadRequest("The data URL holds no data.", param=param)
    return {"inlineData": {"mimeType": mime, "data": data}}


def _media(url: str, param: str, mime_hint: str | None = None) -> dict[str, Any]:
    """A part for an image/file URL: data URL inline, http(s) by reference, nothing else."""
    scheme = url[:8].lower()
    if scheme.startswith("data:"):
        return _data_url(url, param)
    if scheme.startswith(("http://", "https://")):
        mime = mime_hint or _ext_mime(urlsplit(url).path)
        fd: dict[str, Any] = {"fileUri": url}
        if mime:
            fd["mimeType"] = mime
        return {"fileData": fd}
    raise BadRequest(
        "Only data: URLs and http(s) URLs are accepted; rawgate never reads local files.",
        param=param,
    )


def _file_id(file_id: str, param: str, mime: str | None) -> dict[str, Any]:
    if file_id.startswith(("files/", "https://generativelanguage.googleapis.com/")):
        fd: dict[str, Any] = {"fileUri": file_id}
        if mime:
            fd["mimeType"] = mime
        return {"fileData": fd}
    raise BadRequest(
        "rawgate has no file store: send the file inline (file_data) or a Gemini Files URI.",
        param=param,
    )


def _file_data(data: str, filename: str | None, param: str) -> dict[str, Any]:
    if data.startswith("data:"):
        return _data_url(data, param)
    mime = _ext_mime(filename or "")
    if not mime:
        raise BadRequest(
            "file_data must be a data URL, or a filename must tell its type.", param=param
        )
    return {"inlineData": {"mimeType": mime, "data": data}}


def _parts(content: str | list[ContentPart] | None, param: str) -> list[dict[str, Any]]:
    """Gemini parts for a message's content; empty text dropped, unknown part types with text
    kept as text and others ignored (new decoration types appear faster than media types)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    out: list[dict[str, Any]] = []
    for j, p in enumerate(content):
        t = p.type
        pp = f"{param}[{j}]"
        if t in ("text", "input_text", "output_text"):
            if p.text:
                out.append({"text": p.text})
        elif t == "refusal":
            if p.refusal or p.text:
                out.append({"text": p.refusal or p.text})
        elif t in ("image_url", "input_image"):
            img = p.image_url
            if isinstance(img, ImageURL):
                out.append(_media(img.url, pp + ".image_url.url"))
            elif isinstance(img, str):
                out.append(_media(img, pp + ".image_url"))
            elif p.file_id:
                out.append(_file_id(p.file_id, pp + ".file_id", None))
            else:
                raise BadRequest("An image part needs an image_url.", param=pp + ".image_url")
        elif t == "input_audio":
            if p.input_audio is None:
                raise BadRequest("input_audio part without data.", param=pp + ".input_audio")
            fmt = p.input_audio.format.lower()
            mime = _AUDIO_MIME.get(fmt)
            if mime is None:
                raise BadRequest(
                    f"Unsupported audio format '{fmt}'.", param=pp + ".input_audio.format"
                )
            out.append({"inlineData": {"mimeType": mime, "data": p.input_audio.data}})
        elif t in ("file", "input_file"):
            f = p.file
            data = f.file_data if f else p.file_data
            fid = f.file_id if f else p.file_id
            fname = f.filename if f else p.filename
            sub = pp + (".file" if f else "")
            if data:
                out.append(_file_data(data, fname, sub + ".file_data"))
            elif p.file_url:
                out.append(_media(p.file_url, pp + ".file_url", _ext_mime(fname or "")))
            elif fid:
                out.append(_file_id(fid, sub + ".file_id", _ext_mime(fname or "")))
            else:
                raise BadRequest("A file part needs file_data or file_id.", param=sub)
        elif p.text:
            out.append({"text": p.text})
    return out


def _text_of(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text or p.refusal or "" for p in content if p.text or p.refusal)


def _args(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        val = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"_raw": raw}
    return val if isinstance(val, dict) else {"_raw": raw}


def _safe_name(name: str) -> str:
    """A Gemini-legal function name; identity for names that already are."""
    if _NAME_OK.fullmatch(name):
        return name
    s = _NAME_BAD_CHARS.sub("_", name) or "_"
    if not (s[0].isascii() and (s[0].isalpha() or s[0] == "_")):
        s = "_" + s
    if len(s) > 64 or s != name:
        digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
        s = s[:55] + "_" + digest
    return s


@functools.lru_cache(maxsize=512)
def _cleaned(raw: bytes) -> dict[str, Any] | None:
    """Schema cleaning memoised by the schema's bytes: agents (Codex, Claude Code) resend the
    same tens of tool schemas every turn, and cleaning them was ~40% of the mapping time. The
    result is shared between calls, so nothing downstream may mutate a request body."""
    return to_gemini_parameters(orjson.loads(raw))


def _flat_name(name: str, namespace: str | None) -> str:
    if not namespace or name.startswith(namespace + "__"):
        return name
    return f"{namespace}__{name}"


# ---- tools ---------------------------------------------------------------------------------------


class _Tools:
    """Function declarations plus the reverse map the transcoders need."""

    __slots__ = ("by_client", "decls", "origins", "search")

    def __init__(self) -> None:
        self.decls: list[dict[str, Any]] = []
        self.origins: dict[str, ToolOrigin] = {}
        self.by_client: dict[tuple[str | None, str], str] = {}
        self.search = False

    def add(
        self,
        name: str,
        *,
        kind: str,
        namespace: str | None,
        description: str | None,
        params: dict[str, Any] | None,
        param: str,
    ) -> None:
        if not name:
            raise BadRequest("A tool needs a name.", param=param + ".name")
        key = (namespace, name)
        if key in self.by_client:
            raise BadRequest(f"Duplicate tool name '{name}'.", param=param + ".name")
        gname = _safe_name(_flat_name(name, namespace))
        if gname in self.origins:  # two client names sanitised alike: make the second unique
            gname = (
                gname[:55] + "_" + hashlib.blake2b(repr(key).encode(), digest_size=4).hexdigest()
            )
        decl: dict[str, Any] = {"name": gname}
        if description:
            decl["description"] = description
        if kind == "custom":
            decl["parameters"] = {
                "type": "object",
                "properties": {"input": {"type": "string", "description": "The raw tool input."}},
                "required": ["input"],
            }
        else:
            try:
                cleaned = _cleaned(orjson.dumps(params)) if params else None
            except SchemaError as e:
                raise BadRequest(f"Tool '{name}': {e}.", param=param + ".parameters") from None
            if cleaned is not None:
                decl["parameters"] = cleaned
        self.decls.append(decl)
        self.by_client[key] = gname
        self.origins[gname] = ToolOrigin(
            kind="custom" if kind == "custom" else "function", name=name, namespace=namespace
        )

    def gemini_name(self, name: str, namespace: str | None = None) -> str:
        got = self.by_client.get((namespace, name))
        return got if got is not None else _safe_name(_flat_name(name, namespace))

    def body(self) -> list[dict[str, Any]] | None:
        if self.decls:
            return [{"functionDeclarations": self.decls}]
        if self.search:
            return [{"googleSearch": {}}]
        return None


def _custom_description(desc: str | None, fmt: dict[str, Any] | None) -> str | None:
    """A freeform tool's grammar is the model's only guide to a valid `input`; Gemini cannot
    enforce it, so it travels in the description."""
    if not fmt or fmt.get("type") != "grammar" or not isinstance(fmt.get("definition"), str):
        return desc
    syntax = fmt.get("syntax") or "grammar"
    note = f"The `input` argument must follow this {syntax} grammar:\n{fmt['definition']}"
    return f"{desc}\n\n{note}" if desc else note


def _tool_config(mode: str, names: list[str] | None = None) -> dict[str, Any]:
    fcc: dict[str, Any] = {"mode": mode}
    if names:
        fcc["allowedFunctionNames"] = names
    return {"functionCallingConfig": fcc}


def _named(tools: _Tools, name: str, namespace: str | None, param: str) -> str:
    gname = tools.by_client.get((namespace, name))
    if gname is None:
        raise BadRequest(f"tool_choice names '{name}', which is not among the tools.", param=param)
    return gname


def _allowed(
    tools: _Tools, mode: str | None, refs: list[dict[str, Any]], param: str
) -> dict[str, Any]:
    names = []
    for r in refs:
        inner = r.get("function") or r.get("custom") or r
        n = inner.get("name") if isinstance(inner, dict) else None
        if isinstance(n, str):
            names.append(_named(tools, n, r.get("namespace"), param))
    if mode == "required":
        return _tool_config("ANY", names)
    # "auto" over a subset: only those functions are declared, so the model may pick no other.
    keep = set(names)
    tools.decls = [d for d in tools.decls if d["name"] in keep]
    return _tool_config("AUTO")


# ---- the conversation builder --------------------------------------------------------------------


class _Conversation:
    """Accumulates Gemini contents, enforcing the invariants of the module docstring."""

    __slots__ = ("calls", "contents", "known", "results", "system", "tools")

    def __init__(self, tools: _Tools) -> None:
        self.tools = tools
        self.system: list[dict[str, Any]] = []
        self.contents: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []  # (call id, gemini name) of the open model turn
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.known: dict[str, str] = {}  # every call id seen -> gemini name

    def _append(self, role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if self.contents and self.contents[-1]["role"] == role:
            self.contents[-1]["parts"].extend(parts)
        else:
            self.contents.append({"role": role, "parts": parts})

    def _flush(self) -> None:
        """Close the open model turn's calls with one user turn of functionResponses."""
        if not self.calls:
            return
        parts: list[dict[str, Any]] = []
        extra: list[dict[str, Any]] = []
        for cid, gname in self.calls:
            got = self.results.pop(cid, None)
            if got is None:
                parts.append({"functionResponse": {"name": gname, "response": _MISSING_RESULT}})
            else:
                parts.append(got[0])
                extra.extend(got[1:])
        self.calls = []
        self.results = {}
        self._append("user", parts + extra)

    def add_system(self, text: str) -> None:
        if text:
            self.system.append({"text": text})

    def add_user(self, parts: list[dict[str, Any]]) -> None:
        if parts:
            self._flush()
            self._append("user", parts)

    def add_model(self, parts: list[dict[str, Any]]) -> None:
        if parts:
            if self.results:  # the open turn's calls are answered: this starts a new turn
                self._flush()
            self._append("model", parts)

    def add_call(self, call_id: str, gname: str, args: dict[str, Any], sig: str | None) -> None:
        if self.results:
            self._flush()
        part: dict[str, Any] = {"functionCall": {"name": gname, "args": args}}
        if sig:
            part["thoughtSignature"] = sig
        self._append("model", [part])
        self.calls.append((call_id, gname))
        self.known[call_id] = gname

    def add_result(self, call_id: str, parts: list[dict[str, Any]], param: str) -> None:
        gname = next((g for c, g in self.calls if c == call_id), None)
        if gname is None:
            why = (
                "answers a tool call of an earlier turn, not of the assistant turn before it"
                if call_id in self.known
                else "does not match any tool call of the preceding assistant message"
            )
            raise BadRequest(f"Tool result for '{call_id}' {why}.", param=param)
        text = "".join(p["text"] for p in parts if "text" in p)
        media = [p for p in parts if "text" not in p]
        resp = {"functionResponse": {"name": gname, "response": {"output": text}}}
        self.results[call_id] = [resp, *media]

    def finish(self, model: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        if self.results:
            self._flush()
        contents = self.contents
        system = self.system
        if not contents and system:
            contents = [{"role": "user", "parts": system}]
            system = []
        if not contents:
            raise BadRequest("The request has no message to send.", param="messages")
        if family(model).startswith("3"):
            _skip_signatures(contents)
        return contents, ({"parts": system} if system else None)


def _skip_signatures(contents: list[dict[str, Any]]) -> None:
    """Gemini 3: the first functionCall of each model turn in the active loop must be signed."""
    start = 0
    for i, c in enumerate(contents):
        if c["role"] == "user" and any("text" in p for p in c["parts"]):
            start = i + 1
    for c in contents[start:]:
        if c["role"] != "model":
            continue
        for p in c["parts"]:
            if "functionCall" in p:
                p.setdefault("thoughtSignature", SKIP_SIGNATURE)
                break


def _conversation_key(system: dict[str, Any] | None, contents: list[dict[str, Any]]) -> str:
    first = next((c for c in contents if c["role"] == "user"), contents[0])
    h = hashlib.blake2b(orjson.dumps([system, first]), digest_size=12)
    return h.hexdigest()


# ---- generationConfig ----------------------------------------------------------------------------


def _stop(stop: str | list[str] | None, param: str = "stop") -> list[str] | None:
    if stop is None:
        return None
    seqs = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
    if len(seqs) > _MAX_STOP:
        raise BadRequest(f"Gemini accepts at most {_MAX_STOP} stop sequences.", param=param)
    return seqs or None


def _json_output(gen: dict[str, Any], kind: str, schema: dict[str, Any] | None) -> None:
    if kind == "json_object":
        gen["responseMimeType"] = "application/json"
    elif kind == "json_schema":
        gen["responseMimeType"] = "application/json"
        if schema:
            gen["responseJsonSchema"] = to_response_schema(schema)


def _generation(
    model: str,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    n: int | None = None,
    stop: list[str] | None = None,
    seed: int | None = None,
    presence: float | None = None,
    frequency: float | None = None,
    logprobs: bool | None = None,
    top_logprobs: int | None = None,
    effort: str | None = None,
    want_thoughts: bool = False,
) -> dict[str, Any]:
    gen: dict[str, Any] = {}
    if max_tokens is not None:
        gen["maxOutputTokens"] = max_tokens
    if temperature is not None:
        gen["temperature"] = temperature
    if top_p is not None:
        gen["topP"] = top_p
    if n is not None:
        if n > _MAX_CANDIDATES:
            raise BadRequest(f"Gemini returns at most {_MAX_CANDIDATES} choices.", param="n")
        gen["candidateCount"] = n
    if stop:
        gen["stopSequences"] = stop
    if seed is not None:
        # Gemini's seed is int32; OpenAI's is int64. Folding keeps "same seed, same sample".
        gen["seed"] = seed if -(2**31) <= seed < 2**31 else seed & 0x7FFFFFFF
    if presence is not None:
        gen["presencePenalty"] = presence
    if frequency is not None:
        gen["frequencyPenalty"] = frequency
    if logprobs:
        gen["responseLogprobs"] = True
        if top_logprobs:
            gen["logprobs"] = top_logprobs
    tc = thinking_config(model, effort, want_thoughts)
    if tc is not None:
        gen["thinkingConfig"] = tc
    return gen


def _body(
    contents: list[dict[str, Any]],
    system: dict[str, Any] | None,
    tools: _Tools,
    tool_config: dict[str, Any] | None,
    gen: dict[str, Any],
) -> dict[str, Any]:
    body: dict[str, Any] = {"contents": contents}
    if system is not None:
        body["systemInstruction"] = system
    decl = tools.body()
    if decl is not None:
        body["tools"] = decl
        if tool_config is not None and tools.decls:
            body["toolConfig"] = tool_config
    if gen:
        body["generationConfig"] = gen
    return body


# ---- chat completions ----------------------------------------------------------------------------


def _chat_tools(req: ChatCompletionRequest) -> _Tools:
    tools = _Tools()
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
                description=_custom_description(c.description, c.format),
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


def _chat_tool_choice(req: ChatCompletionRequest, tools: _Tools) -> dict[str, Any] | None:
    tc = req.tool_choice
    if tc is None:
        fc = req.function_call
        if fc is None:
            return None
        if isinstance(fc, str):
            return _tool_config("NONE" if fc == "none" else "AUTO")
        return _tool_config("ANY", [_named(tools, fc.name, None, "function_call")])
    if isinstance(tc, str):
        return _tool_config({"none": "NONE", "auto": "AUTO", "required": "ANY"}[tc])
    if tc.type == "allowed_tools" and tc.allowed_tools is not None:
        at = tc.allowed_tools
        return _allowed(tools, at.mode, at.tools, "tool_choice.allowed_tools")
    ref = tc.function or tc.custom
    if ref is None:
        raise BadRequest("tool_choice needs a function name.", param="tool_choice")
    return _tool_config("ANY", [_named(tools, ref.name, None, "tool_choice")])


def _chat_message(conv: _Conversation, m: ChatMessage, i: int, tools: _Tools) -> None:
    param = f"messages[{i}]"
    role = m.role
    if role in ("system", "developer"):
        conv.add_system(_text_of(m.content))
    elif role == "user":
        conv.add_user(_parts(m.content, param + ".content"))
    elif role == "assistant":
        # Prior thought text is not sent back: Gemini ignores it; signatures carry the state.
        conv.add_model(_parts(m.content, param + ".content"))
        if m.function_call is not None:
            fc = m.function_call
            conv.add_call("fn:" + fc.name, tools.gemini_name(fc.name), _args(fc.arguments), None)
        for j, tc in enumerate(m.tool_calls or ()):
            if tc.function is not None:
                name, args = tc.function.name, _args(tc.function.arguments)
            elif tc.custom is not None:
                name, args = tc.custom.name, {"input": tc.custom.input}
            else:
                raise BadRequest("A tool call needs `function`.", param=f"{param}.tool_calls[{j}]")
            conv.add_call(tc.id, tools.gemini_name(name), args, split_call_id(tc.id)[1])
    elif role == "tool":
        if not m.tool_call_id:
            raise BadRequest("A tool message needs tool_call_id.", param=param + ".tool_call_id")
        conv.add_result(m.tool_call_id, _parts(m.content, param + ".content"), param)
    else:  # deprecated role "function": answers the deprecated function_call by name
        if not m.name:
            raise BadRequest("A function message needs a name.", param=param + ".name")
        conv.add_result("fn:" + m.name, _parts(m.content, param + ".content"), param + ".name")


def chat_to_gemini(req: ChatCompletionRequest, model: str, *, key: bool = True) -> GeminiCall:
    """`key=False` skips the sticky-scheduling conversation key (a hash of the first turns,
    ~1.5 us + an orjson dump per request) when the scheduler does not use it."""
    tools = _chat_tools(req)
    tool_config = _chat_tool_choice(req, tools)
    conv = _Conversation(tools)
    for i, m in enumerate(req.messages):
        _chat_message(conv, m, i, tools)
    contents, system = conv.finish(model)
    gen = _generation(
        model,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        n=req.n,
        stop=_stop(req.stop),
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
        _json_output(gen, rf.type, rf.json_schema.schema if rf.json_schema else None)
    return GeminiCall(
        api="chat",
        model=model,
        client_model=req.model,
        stream=req.stream,
        body=_body(contents, system, tools, tool_config, gen),
        tools=tools.origins,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        n=req.n or 1,
        conversation_key=_conversation_key(system, contents) if key else None,
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
    gen = _generation(
        model,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        n=req.n,
        stop=_stop(req.stop),
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
        body=_body(contents, None, _Tools(), None, gen),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        n=req.n or 1,
        echo_prompt=prompt if req.echo else None,
        conversation_key=_conversation_key(None, contents) if key else None,
    )


# ---- Responses -----------------------------------------------------------------------------------

_SEARCH_TOOLS = frozenset({"web_search", "web_search_preview", "web_search_2025_08_26"})
_RESULT_TYPES = frozenset({"function_call_output", "custom_tool_call_output"})


def _responses_tools(tools_in: list[ResponsesTool] | None) -> _Tools:
    tools = _Tools()
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
                description=_custom_description(t.description, t.format),
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


def _responses_tool_choice(req: ResponsesRequest, tools: _Tools) -> dict[str, Any] | None:
    tc = req.tool_choice
    if tc is None:
        return None
    if isinstance(tc, str):
        return _tool_config({"none": "NONE", "auto": "AUTO", "required": "ANY"}[tc])
    if tc.type in ("function", "custom"):
        if not tc.name:
            raise BadRequest("tool_choice needs a name.", param="tool_choice.name")
        return _tool_config("ANY", [_named(tools, tc.name, None, "tool_choice.name")])
    if tc.type == "allowed_tools":
        return _allowed(tools, tc.mode, tc.tools or [], "tool_choice.tools")
    return _tool_config("AUTO")  # a hosted tool's choice: let the model decide


def _history_items(history: list[dict[str, Any]]) -> list[InputItem]:
    try:
        return msgspec.convert(history, list[InputItem])
    except msgspec.ValidationError as e:
        # The store holds what rawgate saved itself; a bad entry is not the client's input.
        raise BadRequest(f"Stored conversation is unreadable: {e}.", param="previous_response_id")


def _responses_items(conv: _Conversation, items: list[InputItem], tools: _Tools, base: str) -> None:
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
                conv.add_system(_text_of(it.content))
            elif role == "assistant":
                parts = _parts(it.content, param + ".content")
                if text_sig and parts and "text" in parts[0]:
                    parts[0]["thoughtSignature"] = text_sig
                    text_sig = None
                conv.add_model(parts)
            else:
                conv.add_user(_parts(it.content, param + ".content"))
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
                args = _args(it.arguments)
            sig = sigs.get(it.call_id) or split_call_id(it.call_id)[1]
            conv.add_call(it.call_id, tools.gemini_name(it.name, it.namespace), args, sig)
        elif typ in _RESULT_TYPES:
            if not it.call_id:
                raise BadRequest("The output needs a call_id.", param=param + ".call_id")
            conv.add_result(it.call_id, _parts(it.output, param + ".output"), param + ".call_id")
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
) -> GeminiCall:
    tools = _responses_tools(req.tools)
    tool_config = _responses_tool_choice(req, tools)
    conv = _Conversation(tools)
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
    r = req.reasoning
    effort = r.effort if r else None
    summary = (r.summary or r.generate_summary) if r else None
    gen = _generation(
        model,
        max_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        logprobs=bool(req.top_logprobs),
        top_logprobs=req.top_logprobs,
        effort=effort,
        want_thoughts=(effort not in (None, "none")) or summary not in (None, "none"),
    )
    fmt = req.text.format if req.text else None
    if fmt is not None:
        _json_output(gen, fmt.type, fmt.schema)
    input_items = [*(history or ()), *_normalise_input(req)]
    return GeminiCall(
        api="responses",
        model=model,
        client_model=req.model,
        stream=req.stream,
        body=_body(contents, system, tools, tool_config, gen),
        tools=tools.origins,
        instructions=req.instructions,
        store=req.store is not False,
        previous_response_id=req.previous_response_id,
        metadata=req.metadata,
        input_items=input_items,
        request_echo=_request_echo(req),
        conversation_key=_conversation_key(system, contents) if key else None,
    )


# ---- encoding ------------------------------------------------------------------------------------


def gemini_body(call: GeminiCall) -> bytes:
    """The Developer API request body."""
    return orjson.dumps(call.body)


def code_assist_body(call: GeminiCall, project: str, user_prompt_id: str | None = None) -> bytes:
    """The Code Assist envelope (`{model, project, user_prompt_id?, request}`)."""
    env: dict[str, Any] = {"model": call.model, "project": project}
    if user_prompt_id:
        env["user_prompt_id"] = user_prompt_id
    env["request"] = call.body
    return orjson.dumps(env)
