"""OpenAI requests (chat, legacy completions, Responses) -> one Gemini GenerateContentRequest.

The package's mapping entry points, gathered from the modules that hold them: conversation.py
(contents, media, generationConfig, the request body) and tools.py (declarations, schema memo)
shared by every front; map_chat.py (Chat + legacy Completions) and map_responses.py (Responses)
one per OpenAI API; map_messages.py (Anthropic) beside them. The invariants below hold for all.

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
- A request's tool schemas share one work budget (`ToolSchemas.max_work`, charged for memo hits
  as for misses, so a refusal never depends on the memo): over it, a 400 naming the tool. With
  `inline_work`, cleaning past it raises SchemasOffLoop instead, for the caller to map the
  request again off the event loop.
"""

from __future__ import annotations

from rawgate.translate.conversation import code_assist_body, gemini_body
from rawgate.translate.map_chat import chat_to_gemini, completion_to_gemini
from rawgate.translate.map_responses import responses_to_gemini
from rawgate.translate.tools import DEFAULT_SCHEMA_CACHE_BYTES, SchemasOffLoop, ToolSchemas

__all__ = [
    "DEFAULT_SCHEMA_CACHE_BYTES",
    "SchemasOffLoop",
    "ToolSchemas",
    "chat_to_gemini",
    "code_assist_body",
    "completion_to_gemini",
    "gemini_body",
    "responses_to_gemini",
]
