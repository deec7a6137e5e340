"""bench.scenarios: what the harness measures, as data, and the exact request each target gets.

Invariants:
- A scenario is a list of cases (one load level each); every case runs against every target
  that supports it, interleaved per repeat (direct, rawgate, peers, direct, rawgate, ...), so a
  slow drift of the shared machine hits all targets alike.
- The direct path gets the Gemini request that rawgate would send for the same workload (same
  prompt, same tools, same chunk count), so "added latency" and "CPU per request" compare like
  with like.
- Every request carries its upstream directive (chunk count, chunk size, delay) inside the
  prompt text, so the same directive reaches the upstream through any gateway unchanged.
- Prompts are generated from a fixed seed: the same run always sends the same bytes.
- Each check is derived from the workload: a gateway that answered with less text than the
  upstream produced, or a stream without its terminator, is an error, never a fast result.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from typing import Any, Literal

MODEL = "gemini-2.5-flash"
EMBEDDING_MODEL = "gemini-embedding-001"
# What /v1/embeddings is asked for (rawgate maps it to EMBEDDING_MODEL).
OPENAI_EMBEDDING_MODEL = "text-embedding-3-small"
# gemini-embedding-001's full vector; every dimension takes at least one byte on the wire.
EMBEDDING_DIMS = 3072
SEED = 42
# Size of a "small" prompt (the directive plus a few words).
SMALL_PROMPT_BYTES = 64
# The slow-stream cases: 20 chunks 250 ms apart = a 5 s stream, like a model thinking aloud.
SLOW_CHUNKS = 20
SLOW_DELAY_MS = 250.0


@dataclass(frozen=True)
class Workload:
    """What one request asks for."""

    # native: Gemini's own generateContent routes (rawgate's passthrough front); embeddings:
    # OpenAI /v1/embeddings (direct: the batchEmbedContents call rawgate makes for it).
    api: Literal["chat", "responses", "messages", "native", "embeddings"] = "chat"
    stream: bool = False
    prompt_bytes: int = SMALL_PROMPT_BYTES
    tools: bool = False
    chunks: int = 3  # upstream text chunks (1 part each)
    chunk_bytes: int = 16  # bytes of text per chunk
    delay_ms: float = 0.0  # upstream pause between chunks
    inputs: int = 100  # embeddings: texts per request (one upstream batch of 100)

    @property
    def text_bytes(self) -> int:
        return self.chunks * self.chunk_bytes


@dataclass(frozen=True)
class Load:
    """How the load generator drives it."""

    proto: Literal["h1", "h2"] = "h1"
    mode: Literal["closed", "open"] = "closed"
    concurrency: int = 16
    connections: int = 1  # h2 only
    rate: float = 0.0  # open loop only
    duration_s: float = 5.0
    warmup_s: float = 1.0
    max_requests: int = 0
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Case:
    label: str
    workload: Workload
    load: Load
    x: float = 0.0  # the case's value on a plot's x axis (concurrency, open streams)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    cases: tuple[Case, ...]
    # Which kinds of target run it: "direct" (loadgen -> upstream), "gateway" (rawgate or the
    # stand-in), "peers".
    kinds: tuple[str, ...] = ("direct", "gateway", "peers")


def _chat(**kw: Any) -> Workload:
    return Workload(api="chat", **kw)


_STREAM100: dict[str, Any] = {"stream": True, "chunks": 100, "chunk_bytes": 16}
_SLOW: dict[str, Any] = {
    "stream": True, "chunks": SLOW_CHUNKS, "chunk_bytes": 16, "delay_ms": SLOW_DELAY_MS,
}


def _slow_case(n: int) -> Case:
    # One 5 s stream per connection, all at once; bounded by count, with room to finish.
    load = Load(concurrency=n, max_requests=n, duration_s=15.0, warmup_s=0.0, timeout_s=20.0)
    return Case(f"streams={n}", _chat(**_SLOW), load, x=n)


def all_scenarios() -> dict[str, Scenario]:
    s = [
        Scenario(
            "chat",
            "non-stream chat, small prompt, HTTP/1.1 keep-alive, 16 connections",
            (Case("c=16", _chat(), Load()),),
        ),
        Scenario(
            "chat-20k",
            "non-stream chat with a 20 KB prompt, 16 connections",
            (Case("c=16", _chat(prompt_bytes=20_000), Load()),),
        ),
        Scenario(
            "chat-tools",
            "non-stream chat with two function tools, 16 connections",
            (Case("c=16", _chat(tools=True), Load()),),
        ),
        Scenario(
            "stream-chat",
            "streaming chat, 100 upstream chunks of 16 B: TTFB at c=1, chunks/s at c=16",
            (
                Case("c=1", _chat(**_STREAM100), Load(concurrency=1), x=1),
                Case("c=16", _chat(**_STREAM100), Load(), x=16),
                # A 1 us gap makes the emulator write every event on its own, as Gemini does
                # (one h2 DATA frame per event); without it a burst merges into a few 16 KiB
                # frames and the per-frame path of the upstream client is not measured.
                Case("c=16 framed", _chat(**_STREAM100, delay_ms=0.001), Load(), x=16),
            ),
        ),
        Scenario(
            "responses",
            "non-stream Responses API, small prompt, 16 connections",
            (Case("c=16", Workload(api="responses"), Load()),),
        ),
        Scenario(
            "stream-responses",
            "streaming Responses API, 100 upstream chunks of 16 B, 16 connections",
            (Case("c=16", Workload(api="responses", **_STREAM100), Load()),),
        ),
        Scenario(
            "messages",
            "non-stream Anthropic Messages (/v1/messages), small prompt, 16 connections",
            (Case("c=16", Workload(api="messages"), Load()),),
        ),
        Scenario(
            "stream-messages",
            "streaming Anthropic Messages, 100 upstream chunks of 16 B, 16 connections",
            (Case("c=16", Workload(api="messages", **_STREAM100), Load()),),
        ),
        Scenario(
            "native",
            "Gemini-native generateContent through rawgate's passthrough front vs direct (and "
            "LiteLLM's /gemini pass-through): non-stream, and streaming 100 chunks of 16 B, 16 "
            "connections",
            (
                Case("c=16", Workload(api="native"), Load()),
                Case("stream c=16", Workload(api="native", **_STREAM100), Load()),
            ),
        ),
        Scenario(
            "embeddings",
            "/v1/embeddings with 100 inputs (one batchEmbedContents upstream, base64 answer) vs "
            "that batch sent direct, 4 connections (emulator upstream only)",
            (Case("batch=100 c=4", Workload(api="embeddings"), Load(concurrency=4)),),
        ),
        Scenario(
            "h1-h2",
            "non-stream chat at 64 in flight: 64 HTTP/1.1 connections vs 64 h2c streams on 4",
            (
                Case("h1 c=64", _chat(), Load(concurrency=64)),
                Case("h2 c=64/4", _chat(), Load(proto="h2", concurrency=64, connections=4)),
                Case("h2 stream c=64/4", _chat(**_STREAM100),
                     Load(proto="h2", concurrency=64, connections=4)),
            ),
        ),
        Scenario(
            "concurrency",
            "non-stream chat at concurrency 1, 16, 64, 256 (HTTP/1.1 keep-alive)",
            tuple(Case(f"c={c}", _chat(), Load(concurrency=c), x=c) for c in (1, 16, 64, 256)),
        ),
        Scenario(
            "latency",
            "non-stream chat, open loop at a fixed rate (latency from the scheduled send time)",
            tuple(
                Case(f"{r}/s", _chat(), Load(mode="open", rate=r, concurrency=256), x=r)
                for r in (100, 400)
            ),
        ),
        Scenario(
            "slow-streams",
            f"concurrent slow streams ({SLOW_CHUNKS} chunks x {SLOW_DELAY_MS:g} ms): "
            "memory and errors",
            tuple(_slow_case(n) for n in (250, 500, 1000)),
        ),
    ]
    return {x.name: x for x in s}


def quick_scenarios() -> dict[str, Scenario]:
    """`--quick`: tiny, for CI: seconds, never a number that can fail."""
    tiny = Load(concurrency=4, duration_s=1.0, warmup_s=0.3)
    return {
        "chat": Scenario("chat", "non-stream chat (quick)", (Case("c=4", _chat(), tiny),)),
        "stream-chat": Scenario(
            "stream-chat",
            "streaming chat, 100 chunks (quick)",
            (Case("c=4", _chat(**_STREAM100), tiny),),
        ),
    }


# --- the request each target gets --------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """The Gemini upstream and how a prompt steers it."""

    kind: Literal["standin", "emulator"]
    port: int
    api_key: str = "bench-key"

    def directive(self, w: Workload) -> str:
        if self.kind == "standin":
            return f"[[bench chunks={w.chunks} bytes={w.chunk_bytes} delay_ms={w.delay_ms:g}]]"
        return emulator_directive(w)


def emulator_directive(w: Workload) -> str:
    """rawgate's emulator directives (rawgate/emulator_directives.py, README): a reply of
    exactly chunks x chunk_bytes characters, split into `chunks` pieces, `delay` ms apart."""
    parts = [f"[[emu:reply chars={w.text_bytes}]]", f"[[emu:chunks n={w.chunks}]]"]
    if w.delay_ms:
        parts.append(f"[[emu:delay ms={w.delay_ms:g}]]")
    return " ".join(parts)


@dataclass(frozen=True)
class TargetInfo:
    """How to talk to one target (the process side lives in __main__ / peers)."""

    name: str
    dialect: Literal["gemini", "openai"]
    port: int
    headers: tuple[tuple[str, str], ...] = ()
    model: str = MODEL
    apis: frozenset[str] = frozenset({"chat", "responses"})
    protos: frozenset[str] = frozenset({"h1"})
    # Check fields this target is known to fail, with the reason shown in the report.
    relaxed: dict[str, str] = field(default_factory=dict)
    # Markers a stream from this target must contain in place of a relaxed check.
    stream_contains: tuple[str, ...] = ()
    # Native (generateContent) requests: where the target serves Gemini's own paths (LiteLLM's
    # pass-through is under /gemini) and the headers they need (its client key).
    native_prefix: str = ""
    native_headers: tuple[tuple[str, str], ...] = ()

    def supports(self, case: Case) -> bool:
        return case.workload.api in self.apis and case.load.proto in self.protos


def prompt(up: Upstream, w: Workload) -> str:
    """The directive plus seeded filler words up to `w.prompt_bytes`."""
    head = up.directive(w) + " "
    need = w.prompt_bytes - len(head)
    if need <= 0:
        return head.rstrip()
    rng = random.Random(SEED)
    words = ("gateway", "stream", "token", "model", "latency", "request", "answer", "chunk")
    out: list[str] = []
    n = 0
    while n < need:
        word = rng.choice(words)
        out.append(word)
        n += len(word) + 1
    return (head + " ".join(out))[: w.prompt_bytes]


_TOOL_SPECS = (
    (
        "get_weather",
        "Current weather for a city.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    ),
    (
        "search_docs",
        "Search the product documentation.",
        {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 20},
            },
            "required": ["query"],
        },
    ),
)


def openai_tools(api: str) -> list[dict[str, Any]]:
    if api == "responses":
        return [
            {"type": "function", "name": n, "description": d, "parameters": p}
            for n, d, p in _TOOL_SPECS
        ]
    return [
        {"type": "function", "function": {"name": n, "description": d, "parameters": p}}
        for n, d, p in _TOOL_SPECS
    ]


def anthropic_tools() -> list[dict[str, Any]]:
    return [{"name": n, "description": d, "input_schema": p} for n, d, p in _TOOL_SPECS]


def gemini_tools() -> list[dict[str, Any]]:
    return [
        {"functionDeclarations": [{"name": n, "description": d, "parameters": p}
                                  for n, d, p in _TOOL_SPECS]}
    ]


@dataclass(frozen=True)
class HttpRequest:
    path: str
    headers: tuple[tuple[str, str], ...]
    body: str
    check: dict[str, Any]


def build_request(t: TargetInfo, up: Upstream, w: Workload) -> HttpRequest:
    """The request and its check for workload `w` sent to target `t`."""
    headers: list[tuple[str, str]] = [("content-type", "application/json")]
    if w.api == "embeddings":
        return _embeddings_request(t, up, w, headers)
    text = prompt(up, w)
    if t.dialect == "gemini" or w.api == "native":
        op = ":streamGenerateContent?alt=sse" if w.stream else ":generateContent"
        gbody: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
        if w.tools:
            gbody["tools"] = gemini_tools()
        if t.dialect == "gemini":  # rawgate answers with its own pool's key
            headers.append(("x-goog-api-key", up.api_key))
        headers.extend(t.native_headers)
        path = f"{t.native_prefix}/v1beta/models/{t.model}{op}"
        check: dict[str, Any] = {"min_bytes": w.text_bytes}
        if w.stream:
            check |= {"contains": ['"finishReason"'], "min_events": w.chunks}
        else:
            check |= {"contains": ['"candidates"']}
        return HttpRequest(path, (*headers, *t.headers), _dumps(gbody), check)
    body: dict[str, Any] = {"model": t.model}
    if w.api == "messages":
        body |= {"max_tokens": 4096, "messages": [{"role": "user", "content": text}]}
        if w.stream:
            body["stream"] = True
        if w.tools:
            body["tools"] = anthropic_tools()
        check = {"min_bytes": w.text_bytes}
        if w.stream:
            # One text_delta event per upstream chunk, each frame named on an `event:` line,
            # then the closing event. The tail leaves out the `{"type":` spacing: rawgate
            # writes compact JSON, LiteLLM writes `{"type": "message_stop"}`.
            check |= {
                "contains": ["event: content_block_delta", "event: message_stop"],
                "tail": '"message_stop"}',
                "min_events": w.chunks,
            }
        else:
            check |= {"contains": ['"type":"text"', '"stop_reason":"end_turn"']}
        headers.append(("anthropic-version", "2023-06-01"))
        return HttpRequest("/v1/messages", (*headers, *t.headers), _dumps(body), check)
    if w.api == "chat":
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": text}]
    else:
        path = "/v1/responses"
        body["input"] = text
    if w.stream:
        body["stream"] = True
    if w.tools:
        body["tools"] = openai_tools(w.api)
    check = {"min_bytes": w.text_bytes}
    if w.api == "chat" and w.stream:
        check |= {"tail": "data: [DONE]", "min_events": w.chunks}
    elif w.api == "chat":
        check |= {"contains": ['"choices"']}
    elif w.stream:
        check |= {"contains": ["response.completed"], "min_events": w.chunks}
    else:
        check |= {"contains": ['"output"']}
    for name in t.relaxed:
        check.pop(name, None)
    if w.stream and t.stream_contains:
        check["contains"] = [*check.get("contains", []), *t.stream_contains]
    return HttpRequest(path, (*headers, *t.headers), _dumps(body), check)


def embedding_texts(n: int) -> list[str]:
    """`n` distinct short texts, the same every run."""
    rng = random.Random(SEED)
    words = ("gateway", "vector", "search", "index", "query", "document", "cosine", "recall")
    return [f"{i} " + " ".join(rng.choice(words) for _ in range(8)) for i in range(n)]


def _embeddings_request(
    t: TargetInfo, up: Upstream, w: Workload, headers: list[tuple[str, str]]
) -> HttpRequest:
    texts = embedding_texts(w.inputs)
    check: dict[str, Any] = {"min_bytes": w.inputs * EMBEDDING_DIMS}
    if t.dialect == "gemini":
        name = "models/" + EMBEDDING_MODEL
        body: dict[str, Any] = {
            "requests": [{"model": name, "content": {"parts": [{"text": x}]}} for x in texts]
        }
        headers.append(("x-goog-api-key", up.api_key))
        path = f"/v1beta/models/{EMBEDDING_MODEL}:batchEmbedContents"
        check["contains"] = ['"embeddings"']
    else:
        # base64: what both openai SDKs ask for when the caller does not choose.
        body = {"model": OPENAI_EMBEDDING_MODEL, "input": texts, "encoding_format": "base64"}
        path = "/v1/embeddings"
        check["contains"] = ['"embedding"']
    return HttpRequest(path, (*headers, *t.headers), _dumps(body), check)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def loadgen_spec(t: TargetInfo, up: Upstream, case: Case, loop: str = "auto") -> dict[str, Any]:
    """The JSON spec for bench.loadgen for one case against one target."""
    req = build_request(t, up, case.workload)
    ld = case.load
    return {
        "host": "127.0.0.1",
        "port": t.port,
        "path": req.path,
        "method": "POST",
        "headers": [list(h) for h in req.headers],
        "body": req.body,
        "proto": ld.proto,
        "mode": ld.mode,
        "concurrency": ld.concurrency,
        "connections": ld.connections,
        "rate": ld.rate,
        "duration_s": ld.duration_s,
        "warmup_s": ld.warmup_s,
        "max_requests": ld.max_requests,
        "timeout_s": ld.timeout_s,
        "check": req.check,
        "loop": loop,
    }


def scale(s: Scenario, duration_s: float | None, warmup_s: float | None) -> Scenario:
    """The scenario with its (non count-bounded) cases' durations replaced."""
    cases = []
    for c in s.cases:
        ld = c.load
        if ld.max_requests == 0:
            if duration_s is not None:
                ld = replace(ld, duration_s=duration_s)
            if warmup_s is not None:
                ld = replace(ld, warmup_s=warmup_s)
        cases.append(replace(c, load=ld))
    return replace(s, cases=tuple(cases))
