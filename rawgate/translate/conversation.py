"""The conversation half of every request mapping: contents, system text, media parts,
generationConfig and the request body, shared by all fronts (map_chat, map_responses,
map_messages).

Invariants:
- Pure: no I/O, never reads a local file (a `file://` URL or a path is a 400), never fetches a
  URL (http(s) images become `fileData`).
- Only what the client asked for reaches `generationConfig`: no hidden temperature, topK, token
  limit, safety setting or thinking budget.
- `contents` roles are only "user" and "model"; consecutive same-role turns are merged; empty text
  parts and empty turns are dropped (`Conversation`).
- Every model turn with N functionCall parts is followed by one user turn with exactly N
  functionResponse parts in call order (Gemini 400s otherwise): results are grouped, reordered
  and their names resolved from the call ids; a call the client sent no result for gets an
  explicit `{"error": ...}` response rather than a broken request.
- Tool-call arguments in history are parsed JSON objects, never schema-cleaned; arguments that are
  not a JSON object are kept visible to the model as `{"_raw": <text>}` instead of failing.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import orjson

from rawgate.errors import BadRequest
from rawgate.translate.call import GeminiCall
from rawgate.translate.jsonschema import (
    to_response_schema,
)
from rawgate.translate.schemas import (
    ContentPart,
    ImageURL,
)
from rawgate.translate.signatures import SKIP_SIGNATURE
from rawgate.translate.thinking import family, thinking_config
from rawgate.translate.tools import (
    Tools,
)

__all__ = [
    "MAX_CANDIDATES",
    "MAX_STOP",
    "Conversation",
    "build_body",
    "call_args",
    "code_assist_body",
    "content_parts",
    "conversation_key",
    "gemini_body",
    "generation_config",
    "json_output",
    "media",
    "skip_signatures",
    "stop_sequences",
    "text_of",
]

MAX_CANDIDATES = 8  # Gemini's candidateCount ceiling
MAX_STOP = 5  # Gemini's stopSequences ceiling
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


def ext_mime(name: str) -> str | None:
    dot = name.rfind(".")
    return _MIME_BY_EXT.get(name[dot + 1 :].lower()) if dot >= 0 else None


def data_url(url: str, param: str) -> dict[str, Any]:
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


def media(url: str, param: str, mime_hint: str | None = None) -> dict[str, Any]:
    """A part for an image/file URL: data URL inline, http(s) by reference, nothing else."""
    scheme = url[:8].lower()
    if scheme.startswith("data:"):
        return data_url(url, param)
    if scheme.startswith(("http://", "https://")):
        mime = mime_hint or ext_mime(urlsplit(url).path)
        fd: dict[str, Any] = {"fileUri": url}
        if mime:
            fd["mimeType"] = mime
        return {"fileData": fd}
    raise BadRequest(
        "Only data: URLs and http(s) URLs are accepted; rawgate never reads local files.",
        param=param,
    )


def file_id(file_id: str, param: str, mime: str | None) -> dict[str, Any]:
    if file_id.startswith(("files/", "https://generativelanguage.googleapis.com/")):
        fd: dict[str, Any] = {"fileUri": file_id}
        if mime:
            fd["mimeType"] = mime
        return {"fileData": fd}
    raise BadRequest(
        "rawgate has no file store: send the file inline (file_data) or a Gemini Files URI.",
        param=param,
    )


def file_data(data: str, filename: str | None, param: str) -> dict[str, Any]:
    if data.startswith("data:"):
        return data_url(data, param)
    mime = ext_mime(filename or "")
    if not mime:
        raise BadRequest(
            "file_data must be a data URL, or a filename must tell its type.", param=param
        )
    return {"inlineData": {"mimeType": mime, "data": data}}


def content_parts(content: str | list[ContentPart] | None, param: str) -> list[dict[str, Any]]:
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
                out.append(media(img.url, pp + ".image_url.url"))
            elif isinstance(img, str):
                out.append(media(img, pp + ".image_url"))
            elif p.file_id:
                out.append(file_id(p.file_id, pp + ".file_id", None))
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
                out.append(file_data(data, fname, sub + ".file_data"))
            elif p.file_url:
                out.append(media(p.file_url, pp + ".file_url", ext_mime(fname or "")))
            elif fid:
                out.append(file_id(fid, sub + ".file_id", ext_mime(fname or "")))
            else:
                raise BadRequest("A file part needs file_data or file_id.", param=sub)
        elif p.text:
            out.append({"text": p.text})
    return out


def text_of(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text or p.refusal or "" for p in content if p.text or p.refusal)


def call_args(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        val = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"_raw": raw}
    return val if isinstance(val, dict) else {"_raw": raw}


# ---- the conversation builder --------------------------------------------------------------------


class Conversation:
    """Accumulates Gemini contents, enforcing the invariants of the module docstring."""

    __slots__ = ("calls", "contents", "known", "results", "system", "tools")

    def __init__(self, tools: Tools) -> None:
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
            skip_signatures(contents)
        return contents, ({"parts": system} if system else None)


def skip_signatures(contents: list[dict[str, Any]]) -> None:
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


def conversation_key(system: dict[str, Any] | None, contents: list[dict[str, Any]]) -> str:
    first = next((c for c in contents if c["role"] == "user"), contents[0])
    h = hashlib.blake2b(orjson.dumps([system, first]), digest_size=12)
    return h.hexdigest()


# ---- generationConfig ----------------------------------------------------------------------------


def stop_sequences(stop: str | list[str] | None, param: str = "stop") -> list[str] | None:
    if stop is None:
        return None
    seqs = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
    if len(seqs) > MAX_STOP:
        raise BadRequest(f"Gemini accepts at most {MAX_STOP} stop sequences.", param=param)
    return seqs or None


def json_output(gen: dict[str, Any], kind: str, schema: dict[str, Any] | None) -> None:
    if kind == "json_object":
        gen["responseMimeType"] = "application/json"
    elif kind == "json_schema":
        gen["responseMimeType"] = "application/json"
        if schema:
            gen["responseJsonSchema"] = to_response_schema(schema)


def generation_config(
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
        if n > MAX_CANDIDATES:
            raise BadRequest(f"Gemini returns at most {MAX_CANDIDATES} choices.", param="n")
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
    elif top_logprobs:
        raise BadRequest(
            "Invalid value for 'top_logprobs': 'logprobs' must be true when 'top_logprobs' is "
            "used.",
            param="top_logprobs",
        )
    tc = thinking_config(model, effort, want_thoughts)
    if tc is not None:
        gen["thinkingConfig"] = tc
    return gen


def build_body(
    contents: list[dict[str, Any]],
    system: dict[str, Any] | None,
    tools: Tools,
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
