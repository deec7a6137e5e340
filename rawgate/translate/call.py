"""The record that the request mapping hands to the rest of the data path.

`mapping.py` builds a `GeminiCall` from a decoded OpenAI request; the gateway sends `body` to the
upstream; the transcoders read the `tools` table to turn Gemini function calls back into what the
client declared (a Chat tool call, a Responses `function_call` or `custom_tool_call`, a namespaced
tool), and the other fields to shape the reply. It holds no I/O and no secrets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(slots=True, frozen=True)
class ToolOrigin:
    """How a Gemini function name maps back to the tool the client declared."""

    kind: Literal["function", "custom"] = "function"
    name: str = ""  # the tool's name as the client knows it
    namespace: str | None = None  # Responses `namespace` tools are flattened for Gemini


@dataclass(slots=True, frozen=True)
class Passthrough:
    """A call whose body the client wrote in Gemini's own shape (the native front, embeddings):
    the attempt loop sends `body` as it is to `:{verb}` and hands the raw reply bytes back to
    the front (gateway/front.py PassthroughFront) instead of decoding them."""

    verb: str  # generateContent, streamGenerateContent, countTokens, embedContent, ...
    body: bytes  # the request body, byte for byte
    api_key_only: bool = False  # no Code Assist route (countTokens, embeddings)
    array: bool = False  # a stream the client reads as Google's JSON array (no alt=sse)


@dataclass(slots=True)
class GeminiCall:
    api: Literal["chat", "completions", "responses", "messages", "native", "embeddings"]
    model: str  # the Gemini model to call (router output, no "models/" prefix)
    client_model: str  # the model name the client asked for (echoed in replies)
    stream: bool
    body: dict[str, Any]  # a GenerateContentRequest JSON object (Developer API shape)
    tools: dict[str, ToolOrigin] = field(default_factory=dict)  # keyed by Gemini function name
    include_usage: bool = False  # chat stream_options.include_usage
    n: int = 1  # candidates requested
    # Chat `logprobs: true` / legacy `logprobs: N`: the top alternatives wanted per token (0 =
    # only the chosen token); None = no logprobs asked, the reply says `"logprobs": null`.
    logprobs: int | None = None
    # Legacy completions: `echo` prepends the prompt to the text.
    echo_prompt: str | None = None
    # Responses API: what the reply must echo back and what the store needs.
    instructions: str | None = None
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    input_items: list[dict[str, Any]] = field(default_factory=list)  # normalised, for the store
    request_echo: dict[str, Any] = field(default_factory=dict)  # fields the Response echoes
    # Conversation key for sticky scheduling (hash of the first turns), if any.
    conversation_key: str | None = None
    # What the request asked that shapes the reply in a front's own terms and that the neutral
    # fields above do not carry (Anthropic: map_messages' MessagesOptions); decode sets it, the
    # same front's render/stream read it. None for the OpenAI fronts.
    reply_options: object | None = None
    # Set by passthrough fronts: `body` above is then unused (empty).
    passthrough: Passthrough | None = None
