"""Google-like validation of a GenerateContentRequest, so rawgate's translation is checked by it.

Invariants:
- Pure: a decoded JSON object in, nothing out, or `Invalid` carrying every violation found (the
  real API also reports several at once). Messages copy Google's wording where it is known
  (protocols.md A3/A6/A7, quoted issues); field paths use snake_case with map entries as
  `properties[i].value`, as Google's proto-JSON errors do.
- Field names are accepted in lowerCamelCase and snake_case (the backend is proto3-JSON).
- Function parameter schemas (`parameters`, `responseSchema`) accept only the keys of Gemini's
  `Schema` type. `additionalProperties`, `$ref` and `$defs` are rejected: the current type lists
  them but older API builds rejected them, and rawgate promises output every build accepts.
  `parametersJsonSchema` / `responseJsonSchema` take any JSON Schema object.
- Conversation rules: roles user/model only, no empty contents or parts, one data field per part,
  a functionCall turn only after a user or functionResponse turn, the user turn after a
  functionCall turn carries exactly as many functionResponse parts, and on models that require
  them (Gemini 3) the first functionCall of every model turn in the active loop (after the last
  user text) carries a thoughtSignature (the documented skip value is accepted).
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from typing import Any

from rawgate.emulator.models import ModelSpec

__all__ = ["SKIP_SIGNATURE", "Invalid", "validate_request"]

SKIP_SIGNATURE = "skip_thought_signature_validator"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,63}\Z")
# Violations reported per request; more is noise (Google also truncates long lists).
MAX_VIOLATIONS = 20


class Invalid(Exception):
    """400 INVALID_ARGUMENT: `violations` are (field path, description) pairs."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = violations
        super().__init__("\n".join(d for _, d in violations))

    @property
    def message(self) -> str:
        return str(self)


@functools.cache
def _snake(name: str) -> str:
    # Cached: the regex costs ~5 us and the same few dozen names come up on every request.
    return re.sub(r"([A-Z])", r"_\1", name).lower()


def _fields(*camel: str) -> dict[str, str]:
    """Accepted spelling -> canonical camelCase name."""
    out: dict[str, str] = {}
    for c in camel:
        out[c] = c
        out[_snake(c)] = c
    return out


_REQUEST = _fields("contents", "systemInstruction", "tools", "toolConfig", "safetySettings",
                   "generationConfig", "cachedContent", "model")
_CODE_ASSIST_EXTRA = _fields("labels", "session_id", "sessionId")
_CONTENT = _fields("role", "parts")
_DATA = ("text", "inlineData", "fileData", "functionCall", "functionResponse", "executableCode",
         "codeExecutionResult")
_PART = _fields(*_DATA, "thought", "thoughtSignature", "videoMetadata", "partMetadata",
                "mediaResolution")
_BLOB = _fields("mimeType", "data")
_FILE = _fields("mimeType", "fileUri")
_CALL = _fields("id", "name", "args")
_RESULT = _fields("id", "name", "response", "willContinue", "scheduling", "parts")
_TOOL = _fields("functionDeclarations", "googleSearch", "googleSearchRetrieval", "codeExecution",
                "urlContext", "fileSearch", "googleMaps", "computerUse")
_DECL = _fields("name", "description", "parameters", "parametersJsonSchema", "response",
                "responseJsonSchema", "behavior")
_TOOL_CONFIG = _fields("functionCallingConfig", "retrievalConfig")
_FC_CONFIG = _fields("mode", "allowedFunctionNames")
_SAFETY = _fields("category", "threshold", "method")
_GEN = _fields("stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema",
               "responseModalities", "candidateCount", "maxOutputTokens", "temperature", "topP",
               "topK", "seed", "presencePenalty", "frequencyPenalty", "responseLogprobs",
               "logprobs", "enableEnhancedCivicAnswers", "speechConfig", "thinkingConfig",
               "imageConfig", "mediaResolution")
_THINKING = _fields("includeThoughts", "thinkingBudget", "thinkingLevel")
_SCHEMA = _fields("type", "format", "title", "description", "nullable", "enum", "items",
                  "maxItems", "minItems", "properties", "required", "propertyOrdering",
                  "minProperties", "maxProperties", "minLength", "maxLength", "pattern",
                  "minimum", "maximum", "default", "example", "anyOf")
_TYPES = frozenset({"TYPE_UNSPECIFIED", "STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY",
                    "OBJECT", "NULL"})
_FORMATS = {"STRING": frozenset({"enum", "date-time"}),
            "NUMBER": frozenset({"float", "double"}),
            "INTEGER": frozenset({"int32", "int64"})}
_MODES = frozenset({"MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED"})
_MIME = frozenset({"text/plain", "application/json", "application/xml", "application/yaml",
                   "text/x.enum"})
_CATEGORIES = frozenset({"HARM_CATEGORY_UNSPECIFIED", "HARM_CATEGORY_HARASSMENT",
                         "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_SEXUALLY_EXPLICIT",
                         "HARM_CATEGORY_DANGEROUS_CONTENT", "HARM_CATEGORY_CIVIC_INTEGRITY"})
_THRESHOLDS = frozenset({"HARM_BLOCK_THRESHOLD_UNSPECIFIED", "BLOCK_LOW_AND_ABOVE",
                         "BLOCK_MEDIUM_AND_ABOVE", "BLOCK_ONLY_HIGH", "BLOCK_NONE", "OFF"})
_LEVELS = frozenset({"MINIMAL", "LOW", "MEDIUM", "HIGH"})


def _get(obj: dict[str, Any], camel: str) -> Any:
    v = obj.get(camel)
    return obj.get(_snake(camel)) if v is None else v


class _Checker:
    __slots__ = ("api", "code_assist", "out", "spec")

    def __init__(self, spec: ModelSpec, api: str, code_assist: bool) -> None:
        self.spec = spec
        self.api = api
        self.code_assist = code_assist
        self.out: list[tuple[str, str]] = []

    # -- reporting --

    def bad(self, path: str, text: str) -> None:
        if len(self.out) < MAX_VIOLATIONS:
            self.out.append((path, f"* GenerateContentRequest.{path}: {text}" if path else text))

    def raw(self, path: str, text: str) -> None:
        if len(self.out) < MAX_VIOLATIONS:
            self.out.append((path, text))

    def wrong_type(self, path: str, proto: str, value: Any) -> None:
        shown = value if isinstance(value, str) else type(value).__name__
        self.raw(path, f"Invalid value at '{path}' "
                       f"(type.googleapis.com/google.ai.generativelanguage.{self.api}.{proto}), "
                       f'"{shown}"')

    def obj(self, value: Any, path: str, proto: str, known: dict[str, str]) -> dict[str, Any]:
        """`value` as an object with only known keys; reports and returns {} otherwise."""
        if not isinstance(value, dict):
            self.wrong_type(path, proto, value)
            return {}
        for k in value:
            if k not in known:
                where = f" at '{path}'" if path else ""
                self.raw(path, f'Invalid JSON payload received. Unknown name "{k}"{where}: '
                               "Cannot find field.")
        return value

    def items(self, value: Any, path: str, proto: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.wrong_type(path, proto, value)
            return []
        return value

    # -- the request --

    def request(self, body: Any) -> None:
        known = {**_REQUEST, **_CODE_ASSIST_EXTRA} if self.code_assist else _REQUEST
        body = self.obj(body, "", "GenerateContentRequest", known)
        if not body:
            self.bad("contents", "contents is not specified")
            return
        raw_contents = _get(body, "contents")
        contents = self.items(raw_contents, "contents", "Content")
        if not contents and not raw_contents:
            self.bad("contents", "contents is not specified")
        for i, c in enumerate(contents):
            self.content(c, f"contents[{i}]")
        sys_inst = _get(body, "systemInstruction")
        if sys_inst is not None:
            if not self.spec.system_instruction:
                self.raw("system_instruction",
                         f"Developer instruction is not enabled for models/{self.spec.name}")
            else:
                self.content(sys_inst, "system_instruction", system=True)
        tools = self.items(_get(body, "tools"), "tools", "Tool")
        if tools and not self.spec.tools:
            self.raw("tools", f"Function calling is not enabled for models/{self.spec.name}")
        names: set[str] = set()
        for i, t in enumerate(tools):
            self.tool(t, f"tools[{i}]", names)
        if not self.spec.search_with_functions and names and any(
            isinstance(t, dict) and (_get(t, "googleSearch") is not None
                                     or _get(t, "googleSearchRetrieval") is not None)
            for t in tools
        ):
            self.raw("tools", "Tool use with function calling is unsupported")
        tc = _get(body, "toolConfig")
        if tc is not None:
            self.tool_config(tc)
        for i, s in enumerate(self.items(_get(body, "safetySettings"), "safety_settings",
                                         "SafetySetting")):
            p = f"safety_settings[{i}]"
            s = self.obj(s, p, "SafetySetting", _SAFETY)
            if _get(s, "category") not in _CATEGORIES:
                self.wrong_type(f"{p}.category", "HarmCategory", _get(s, "category"))
            if _get(s, "threshold") not in _THRESHOLDS:
                self.wrong_type(f"{p}.threshold", "SafetySetting.HarmBlockThreshold",
                                _get(s, "threshold"))
        gen = _get(body, "generationConfig")
        if gen is not None:
            self.generation(gen)
        if contents and not self.out:
            self.conversation(contents)

    def content(self, c: Any, path: str, *, system: bool = False) -> None:
        c = self.obj(c, path, "Content", _CONTENT)
        if not c:
            return
        role = c.get("role")
        if not system and role is not None and role not in ("user", "model"):
            self.raw(f"{path}.role", "Please use a valid role: user, model.")
        parts = self.items(c.get("parts"), f"{path}.parts", "Part")
        if not parts:
            self.bad(f"{path}.parts", "contents.parts must not be empty.")
        for j, p in enumerate(parts):
            self.part(p, f"{path}.parts[{j}]")

    def part(self, raw: Any, path: str) -> None:
        p = self.obj(raw, path, "Part", _PART)
        if not isinstance(raw, dict):
            return
        present = [d for d in _DATA if d in p or _snake(d) in p]
        if not present:
            self.bad(f"{path}.data", "required oneof field 'data' must have one initialized field")
        elif len(present) > 1:
            self.raw(path, f"Invalid value at '{path}.{_snake(present[1])}' (oneof), oneof field "
                           f"'data' is already set. Cannot set '{present[1]}'")
        t = p.get("text")
        if t is not None and not isinstance(t, str):
            self.wrong_type(f"{path}.text", "TYPE_STRING", t)
        sig = _get(p, "thoughtSignature")
        if sig is not None and not _is_base64(sig):
            self.raw(f"{path}.thought_signature",
                     f"Invalid value at '{path}.thought_signature' (TYPE_BYTES), Base64 decoding "
                     f'failed for "{str(sig)[:40]}"')
        blob = _get(p, "inlineData")
        if blob is not None:
            b = self.obj(blob, f"{path}.inline_data", "Blob", _BLOB)
            if b and not _get(b, "mimeType"):
                self.bad(f"{path}.inline_data.mime_type", "mime_type must be set")
            if b and not _is_base64(b.get("data", "")):
                self.raw(f"{path}.inline_data.data",
                         f"Invalid value at '{path}.inline_data.data' (TYPE_BYTES), Base64 "
                         "decoding failed")
        fd = _get(p, "fileData")
        if fd is not None:
            f = self.obj(fd, f"{path}.file_data", "FileData", _FILE)
            if f and not _get(f, "fileUri"):
                self.bad(f"{path}.file_data.file_uri", "file_uri must be set")
        fc = _get(p, "functionCall")
        if fc is not None:
            f = self.obj(fc, f"{path}.function_call", "FunctionCall", _CALL)
            if f and not f.get("name"):
                self.bad(f"{path}.function_call.name", "Name cannot be empty.")
            if f and f.get("args") is not None and not isinstance(f["args"], dict):
                self.wrong_type(f"{path}.function_call.args", "Struct", f["args"])
        fr = _get(p, "functionResponse")
        if fr is not None:
            f = self.obj(fr, f"{path}.function_response", "FunctionResponse", _RESULT)
            if f and not f.get("name"):
                self.bad(f"{path}.function_response.name", "Name cannot be empty.")
            if f and not isinstance(f.get("response"), dict):
                self.wrong_type(f"{path}.function_response.response", "Struct", f.get("response"))

    def tool(self, t: Any, path: str, names: set[str]) -> None:
        t = self.obj(t, path, "Tool", _TOOL)
        decls = self.items(_get(t, "functionDeclarations"), f"{path}.function_declarations",
                           "FunctionDeclaration")
        for i, d in enumerate(decls):
            p = f"{path}.function_declarations[{i}]"
            d = self.obj(d, p, "FunctionDeclaration", _DECL)
            if not d:
                continue
            name = d.get("name")
            if not isinstance(name, str) or not _NAME_RE.match(name):
                self.bad(f"{p}.name", "Invalid function name. Must start with a letter or an "
                         "underscore. Must be alphameric (a-z, A-Z, 0-9), underscores (_), dots "
                         "(.), colons (:), or dashes (-), with a maximum length of 64.")
            elif name in names:
                self.raw(f"{p}.name", f"Duplicate function declaration found: {name}")
            else:
                names.add(name)
            params = _get(d, "parameters")
            if params is not None and _get(d, "parametersJsonSchema") is not None:
                self.bad(p, "parameters and parameters_json_schema are mutually exclusive")
            if params is not None:
                self.schema(params, f"{p}.parameters")
            pjs = _get(d, "parametersJsonSchema")
            if pjs is not None and not isinstance(pjs, dict | bool):
                self.wrong_type(f"{p}.parameters_json_schema", "Value", pjs)

    def schema(self, s: Any, path: str, depth: int = 0) -> None:
        if depth > 64:
            self.bad(path, "schema is nested too deeply")
            return
        s = self.obj(s, path, "Schema", _SCHEMA)
        if not s:
            return
        t = s.get("type")
        upper = ""
        if isinstance(t, list):
            self.raw(f"{path}.type", f"Invalid JSON payload received. Proto field is not "
                                     f"repeating, cannot start list. at '{path}.type'")
        elif t is not None:
            upper = str(t).upper()
            if not isinstance(t, str) or upper not in _TYPES:
                self.wrong_type(f"{path}.type", "Type", t)
        fmt = s.get("format")
        if fmt is not None and upper in _FORMATS and fmt not in _FORMATS[upper]:
            allowed = " and ".join(f"'{f}'" for f in sorted(_FORMATS[upper]))
            self.bad(f"{path}.format", f"only {allowed} are supported for {upper} type")
        enum = s.get("enum")
        if enum is not None:
            for i, v in enumerate(self.items(enum, f"{path}.enum", "TYPE_STRING")):
                if not isinstance(v, str):
                    self.raw(f"{path}.enum[{i}]",
                             f"Invalid value at '{path}.enum[{i}]' (TYPE_STRING), {v}")
        props = s.get("properties")
        if props is not None:
            if not isinstance(props, dict):
                self.wrong_type(f"{path}.properties", "Schema", props)
                props = {}
            for i, (_k, v) in enumerate(props.items()):
                self.schema(v, f"{path}.properties[{i}].value", depth + 1)
        if upper == "OBJECT" and props is not None and not props:
            self.bad(f"{path}.properties", "should be non-empty for OBJECT type")
        req = s.get("required")
        if req is not None:
            defined = props if isinstance(props, dict) else {}
            for i, r in enumerate(self.items(req, f"{path}.required", "TYPE_STRING")):
                if r not in defined:
                    self.bad(f"{path}.required[{i}]", "property is not defined")
        items = s.get("items")
        if items is not None:
            self.schema(items, f"{path}.items", depth + 1)
        for key in ("anyOf", "any_of"):
            for i, alt in enumerate(self.items(s.get(key), f"{path}.any_of", "Schema")):
                self.schema(alt, f"{path}.any_of[{i}]", depth + 1)

    def tool_config(self, tc: Any) -> None:
        tc = self.obj(tc, "tool_config", "ToolConfig", _TOOL_CONFIG)
        fcc = _get(tc, "functionCallingConfig")
        if fcc is None:
            return
        p = "tool_config.function_calling_config"
        fcc = self.obj(fcc, p, "FunctionCallingConfig", _FC_CONFIG)
        mode = fcc.get("mode", "AUTO")
        if mode not in _MODES:
            self.wrong_type(f"{p}.mode", "FunctionCallingConfig.Mode", mode)
        if _get(fcc, "allowedFunctionNames") and mode not in ("ANY", "VALIDATED"):
            self.bad(f"{p}.allowed_function_names",
                     "allowed_function_names may only be set when mode is ANY or VALIDATED.")

    def generation(self, gen: Any) -> None:
        p = "generation_config"
        gen = self.obj(gen, p, "GenerationConfig", _GEN)
        if not gen:
            return
        cc = _get(gen, "candidateCount")
        if cc is not None and (not isinstance(cc, int) or not 1 <= cc <= 8):
            self.bad(f"{p}.candidate_count", "must be in the range [1, 8].")
        mot = _get(gen, "maxOutputTokens")
        if mot is not None and (not isinstance(mot, int) or mot < 1):
            self.bad(f"{p}.max_output_tokens", "must be a positive integer.")
        temp = _get(gen, "temperature")
        if temp is not None and (not isinstance(temp, int | float) or not 0 <= temp <= 2):
            self.bad(f"{p}.temperature", "must be in the range [0.0, 2.0].")
        top_p = _get(gen, "topP")
        if top_p is not None and (not isinstance(top_p, int | float) or not 0 <= top_p <= 1):
            self.bad(f"{p}.top_p", "must be in the range [0.0, 1.0].")
        mime = _get(gen, "responseMimeType")
        if mime is not None and mime not in _MIME:
            self.bad(f"{p}.response_mime_type", "allowed mimetypes are `text/plain`, "
                     "`application/json`, `application/xml`, `application/yaml` and "
                     "`text/x.enum`.")
        rjs = _get(gen, "responseJsonSchema")
        rs = _get(gen, "responseSchema")
        if rjs is not None and rs is not None:
            self.bad(f"{p}.response_schema", "response_schema and response_json_schema are "
                     "mutually exclusive.")
        if (rjs is not None or rs is not None) and mime not in ("application/json",
                                                               "text/x.enum"):
            self.bad(f"{p}.response_mime_type", "response_mime_type must be application/json "
                     "or text/x.enum when a response schema is set.")
        if rs is not None:
            self.schema(rs, f"{p}.response_schema")
        stops = _get(gen, "stopSequences")
        if stops is not None and (not isinstance(stops, list) or len(stops) > 5):
            self.bad(f"{p}.stop_sequences", "at most 5 stop sequences are allowed.")
        tc = _get(gen, "thinkingConfig")
        if tc is not None:
            self.thinking(self.obj(tc, f"{p}.thinking_config", "ThinkingConfig", _THINKING))

    def thinking(self, tc: dict[str, Any]) -> None:
        p = "generation_config.thinking_config"
        spec = self.spec
        budget = _get(tc, "thinkingBudget")
        level = _get(tc, "thinkingLevel")
        if not tc:
            return
        if spec.thinking is None:
            if budget not in (None, 0) or level is not None or _get(tc, "includeThoughts"):
                self.raw(p, f"Thinking is not enabled for models/{spec.name}")
            return
        if budget is not None and level is not None:
            self.bad(p, "thinking_budget and thinking_level cannot be set at the same time.")
            return
        if level is not None:
            if spec.thinking != "level":
                self.raw(p, "Thinking level is not supported for this model.")
            elif str(level).upper() not in spec.levels:
                self.raw(p, f"Thinking level {level} is not supported for this model. Please "
                            "retry with other thinking level")
        if budget is not None:
            lo, hi = spec.budget
            if not isinstance(budget, int) or isinstance(budget, bool):
                self.wrong_type(f"{p}.thinking_budget", "TYPE_INT32", budget)
            elif budget == 0 and not spec.can_disable:
                self.raw(p, "Budget 0 is invalid. This model only works in thinking mode.")
            elif budget not in (-1, 0) and not lo <= budget <= hi:
                self.raw(p, f"The thinking budget {budget} is invalid. Please choose a value "
                            f"between {lo} and {hi}.")

    # -- conversation rules (only once every field is well-formed) --

    def conversation(self, contents: list[dict[str, Any]]) -> None:
        calls_before = -1  # functionCall parts in the previous model turn, -1 = not such a turn
        prev_role = ""
        prev_was_response = False
        last_user_text = -1
        for i, c in enumerate(contents):
            parts = c.get("parts") or []
            if c.get("role", "user") == "user" and any(
                isinstance(p, dict) and "text" in p for p in parts
            ) and not any(_get(p, "functionResponse") is not None for p in parts):
                last_user_text = i
        for i, c in enumerate(contents):
            role = c.get("role", "user")
            parts = c["parts"]
            n_calls = sum(1 for p in parts if _get(p, "functionCall") is not None)
            n_resp = sum(1 for p in parts if _get(p, "functionResponse") is not None)
            if role == "model" and n_calls:
                if prev_role != "user" and not prev_was_response:
                    self.raw(f"contents[{i}]", "Please ensure that function call turn comes "
                             "immediately after a user turn or after a function response turn.")
                if self.spec.signatures_required and i > last_user_text:
                    self.signature(parts, i)
            if role == "user":
                if n_resp and calls_before <= 0:
                    self.raw(f"contents[{i}]", "Please ensure that function response turn comes "
                             "immediately after a function call turn.")
                elif calls_before > 0 and n_resp != calls_before:
                    self.raw(f"contents[{i}]", "Please ensure that the number of function "
                             "response parts is equal to the number of function call parts of "
                             "the function call turn.")
            calls_before = n_calls if role == "model" else -1
            prev_role = role
            prev_was_response = n_resp > 0

    def signature(self, parts: list[dict[str, Any]], index: int) -> None:
        first = next(p for p in parts if _get(p, "functionCall") is not None)
        if _get(first, "thoughtSignature"):
            return
        name = _get(first, "functionCall").get("name", "")
        self.raw(f"contents[{index}]", "Function call is missing a thought_signature in "
                 "functionCall parts. This is required for tools to work correctly, and missing "
                 "thought_signature may lead to degraded model performance. Additional data, "
                 f"function call `default_api:{name}` , position {index + 1}. Please refer to "
                 "https://ai.google.dev/gemini-api/docs/thought-signatures for more details.")


def _is_base64(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    if value == SKIP_SIGNATURE:
        return True
    try:
        base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4),
                         validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def validate_request(
    body: Any, spec: ModelSpec, *, api: str = "v1beta", code_assist: bool = False
) -> None:
    """Raise `Invalid` unless `body` is a GenerateContentRequest Google would accept."""
    c = _Checker(spec, api, code_assist)
    c.request(body)
    if c.out:
        raise Invalid(c.out)
