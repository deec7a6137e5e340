"""Micro-benchmarks of the translation layer, in process, one core: `python -m bench.micro`.

What each line measures (best of --repeat runs of about --seconds each):
- decode+map chat / responses: request bytes -> msgspec Struct -> GeminiCall -> upstream body
  bytes (a 12-message chat with 3 tools; Codex's 9-item turn with 4 tools).
- sse decode: Gemini's CRLF-framed body fed in 16 KiB reads -> event payloads.
- decode_reply: one ~400-byte Gemini chunk -> Reply view.
- chat / responses stream: the full per-chunk pump the gateway runs (SSE decode -> decode_reply
  -> transcoder feed -> downstream bytes), as upstream chunks per second; for chat also with a
  naive dict-per-frame encoder, and for Responses the text-delta frame built both ways: the
  baselines the precomputed frame pieces are measured against.
- chat / responses non-stream: one Gemini body -> the OpenAI JSON.
- schema attacks (issue 12): decode + map of a 2.4 MB Responses request whose one tool is a
  70,000-link $ref chain, and of 500 distinct fan-out tools (each ~4,000 nodes once inlined),
  with a cold schema memo each time: the CPU one such request costs the event loop before its
  400 (the budget, limits.tool_schema_max_work, stops both).
- request_log_record / rates_record: what the request path pays for the request log (a row
  queued) and for the dashboard's per-minute rate ring (monitor/rates.py).
- h1_* (the inbound HTTP/1.1 driver, no sockets; the cases the perf comments in rawgate/http
  name): h1_fast_head and h1_h11_head parse the bench's 4-header POST head with rawgate's regex
  and with h11; h1_parse_post / h1_parse_get feed a whole request to the driver's parser
  (h1_server._Conn._feed: head, Content-Length body, the exchange queued) with the fast paths on
  and, as h1_parse_*_public, off; h1_head builds a response head (h1_write.response_head).
- emulator_h2_large_body / h2_client_large_body (`--only h2`): one ~6.5 MB answer (the bench's
  100-input batchEmbedContents) framed by the emulator's h2c session (fast_h2) for a peer that
  credits windows as rawgate's client does, and taken by rawgate's h2 client in 64 KiB reads
  with its Content-Length (and, as *_public, with the fast paths off). Measured (shared 2-core
  box): emulator 106 ms -> 0.95 ms per body once DATA frames became views at an offset; client
  4.5 -> 1.3 ms once Content-Length answers took the DATA fast path (public: ~11 ms).

The gateway targets >= 50,000 upstream chunks/s end to end through one worker; the transcoder
pump must leave most of that budget to the network layers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import orjson

from rawgate.errors import BadRequest
from rawgate.translate import mapping, schemas
from rawgate.translate.gemini import decode_reply
from rawgate.translate.map_messages import decode_messages, messages_to_gemini
from rawgate.translate.sigtag import SignatureTagger
from rawgate.translate.sse import SSEDecoder
from rawgate.translate.transcode_chat import ChatStream, chat_response
from rawgate.translate.transcode_messages import MessagesStream
from rawgate.translate.transcode_responses import ResponsesStream, responses_response

ROOT = Path(__file__).resolve().parent.parent
READ_BYTES = 16 * 1024  # a typical TLS record / socket read


def _chat_request() -> bytes:
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": "Does a thing.",
                "parameters": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}, "n": {"type": ["integer", "null"]}},
                    "required": ["path"],
                },
            },
        }
        for i in range(3)
    ]
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are helpful. " * 20}]
    for i in range(5):
        msgs.append({"role": "user", "content": f"Question {i}: " + "lorem ipsum " * 30})
        msgs.append({"role": "assistant", "content": "Answer " + "dolor sit " * 30})
    msgs.append({"role": "user", "content": "And finally?"})
    body = {"model": "gpt-4o", "messages": msgs, "tools": tools, "stream": True}
    return orjson.dumps(body)


def _responses_with_tools(tools: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"model": "gpt-5", "input": "hi", "tools": tools})


def ref_chain_request(n: int) -> bytes:
    """One tool whose property goes through an n-link $ref chain (n=70,000: ~2.4 MB)."""
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    params = {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}
    return _responses_with_tools([{"type": "function", "name": "chain", "parameters": params}])


def fanout_tools_request(n: int, depth: int = 11) -> bytes:
    """n tools, each 2^(depth+1)-1 nodes once its $refs are inlined (under the per-tool cap) and
    with a description of its own so that no memo helps (n=500: ~0.6 MB)."""
    defs: dict[str, Any] = {"l0": {"type": "string"}}
    for k in range(1, depth + 1):
        prev = {"$ref": f"#/$defs/l{k - 1}"}
        defs[f"l{k}"] = {"type": "object", "properties": {"a": prev, "b": prev}}
    tools = [
        {
            "type": "function",
            "name": f"t{i}",
            "parameters": {
                "type": "object",
                "description": f"tool {i}",
                "properties": {"r": {"$ref": f"#/$defs/l{depth}"}},
                "$defs": defs,
            },
        }
        for i in range(n)
    ]
    return _responses_with_tools(tools)


def _chunk(i: int, text: str, last: bool = False) -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if last:
        cand["finishReason"] = "STOP"
    return {
        "candidates": [cand],
        "usageMetadata": {
            "promptTokenCount": 1210,
            "candidatesTokenCount": 12 * (i + 1),
            "totalTokenCount": 1210 + 12 * (i + 1),
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1210}],
            "thoughtsTokenCount": 0,
        },
        "modelVersion": "gemini-2.5-flash",
        "responseId": "EdDHavuSDILGjMcPvefFoQg",
    }


def _stream(n: int) -> tuple[bytes, list[bytes]]:
    texts = [f"word{i} and some more text, é ☕ {i} " for i in range(n)]
    payloads = [
        json.dumps(_chunk(i, t, i == n - 1), ensure_ascii=False, separators=(",", ": ")).encode()
        for i, t in enumerate(texts)
    ]
    body = b"".join(b"data: " + p + b"\r\n\r\n" for p in payloads)
    return body, payloads


def _reads(body: bytes) -> list[bytes]:
    return [body[i : i + READ_BYTES] for i in range(0, len(body), READ_BYTES)]


def _bench(fn: Callable[[], int], seconds: float, repeat: int) -> float:
    """Units per second: best of `repeat` runs, each calling fn until `seconds` elapsed."""
    fn()  # warm-up
    best = 0.0
    for _ in range(repeat):
        units = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            units += fn()
            t = time.perf_counter()
            if t >= deadline:
                break
        best = max(best, units / (t - t0))
    return best


# ---- the naive baseline: one dict per frame, as a straightforward transcoder would do --------


def _naive_chat_pump(reads: list[bytes], call: Any) -> int:
    dec = SSEDecoder()
    created = int(time.time())
    n = 0
    for r in reads:
        for p in dec.feed(r):
            reply = decode_reply(p)
            for c in reply.candidates:
                text = "".join(pt.text or "" for pt in (c.content.parts if c.content else []))
                frame = {
                    "id": "chatcmpl-" + (reply.responseId or ""),
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": call.client_model,
                    "system_fingerprint": None,
                    "choices": [
                        {
                            "index": c.index,
                            "delta": {"content": text},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
                _ = b"data: " + orjson.dumps(frame) + b"\n\n"
            n += 1
    dec.close()
    return n


# The bench's 4-header POST (what an OpenAI SDK sends, trimmed) and a wrk-style GET.
H1_POST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer x\r\nContent-Length: 20\r\n\r\n" + b'{"a": "0123456789"}\n'
)
H1_GET = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: wrk\r\n\r\n"


def h1_cases(seconds: float, repeat: int) -> list[tuple[str, float, str]]:
    """The h1_* cases (see the module note)."""
    import h11

    from rawgate import compat
    from rawgate.config import Config
    from rawgate.conn import ConnInfo, ServerState
    from rawgate.http import h1_server
    from rawgate.http.h1_parse import fast_head
    from rawgate.http.h1_write import LENGTH, response_head

    out: list[tuple[str, float, str]] = []
    head = H1_POST[: H1_POST.index(b"\r\n\r\n") + 4]

    def fast() -> int:
        fast_head(head)
        return 1

    def with_h11() -> int:
        h = h11.Connection(h11.SERVER)
        h.receive_data(head)
        h.next_event()
        return 1

    out.append(("h1_fast_head", _bench(fast, seconds, repeat), "heads/s"))
    out.append(("h1_h11_head", _bench(with_h11, seconds, repeat), "heads/s"))

    async def app(request: Any, sink: Any) -> None:
        return None

    cfg, state = Config(), ServerState()

    async def parse_cases() -> None:
        # _Conn wants a running loop (its cancel scopes); the runs themselves never await.
        was = compat.fast_paths()
        try:
            for suffix, on in (("", True), ("_public", False)):
                compat.set_fast_paths(on)
                for name, req in (("h1_parse_post", H1_POST), ("h1_parse_get", H1_GET)):
                    c = h1_server._Conn(cast(Any, None), app, cfg, ConnInfo(), state)

                    def feed(c: Any = c, req: bytes = req) -> int:
                        c._feed(req)  # one request: parsed, its body taken, queued
                        c._queue.clear()
                        c._buffered = 0
                        c._requests = 0  # never limits.max_requests_per_connection
                        state.buffered_body_bytes = 0
                        return 1

                    per_s = _bench(feed, seconds, repeat)
                    if c.discard or c._cur is not None:
                        raise RuntimeError(f"{name}{suffix}: the request was not parsed whole")
                    out.append((name + suffix, per_s, "req/s"))
        finally:
            compat.set_fast_paths(was)

    asyncio.run(parse_cases())
    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"req_0123456789")]

    def one_head() -> int:
        response_head(200, headers, LENGTH % 20)
        return 1

    out.append(("h1_head", _bench(one_head, seconds, repeat), "heads/s"))
    return out


# The emulator's h2 send path and the h2 client's receive path for a large answer (the bench's
# embeddings answer: 100 x 3,072 floats, ~6.5 MB), no sockets.
H2_BODY_BYTES = 6_562_749  # a 100-input batchEmbedContents answer


def h2_cases(seconds: float, repeat: int) -> list[tuple[str, float, str]]:
    """emulator_h2_large_body: emulator/fast_h2.H2Session framing one 6.5 MB answer for a peer
    crediting windows as rawgate's client does (256 KiB stream window, 4 MiB connection window,
    WINDOW_UPDATE per 64 KiB), into a transport that drops the bytes. h2_client_large_body:
    rawgate's h2 client (h2_data.FastH2) taking that answer, with its Content-Length, in 64 KiB
    reads, with the fast paths on and, as *_public, off."""
    from h2.settings import SettingCodes
    from hyperframe.frame import HeadersFrame, SettingsFrame, WindowUpdateFrame

    from rawgate.config import UpstreamConfig
    from rawgate.emulator import fast_h2
    from rawgate.emulator.core import Emulator
    from rawgate.upstream.h2_client import new_h2

    out: list[tuple[str, float, str]] = []
    body = bytes(range(256)) * (H2_BODY_BYTES // 256)
    window, conn_window, credit = 256 * 1024, 4 * 1024 * 1024, 64 * 1024

    class Sink:
        written = 0

        def write(self, data: bytes) -> None:
            self.written += len(data)

        def is_closing(self) -> bool:
            return False

    sink = Sink()
    s = fast_h2.H2Session(Emulator(), cast(Any, None), cast(Any, sink), 100, lambda: None)
    s.feed(fast_h2.PREFACE
           + SettingsFrame(0, settings={SettingCodes.INITIAL_WINDOW_SIZE: window}).serialize()
           + WindowUpdateFrame(0, window_increment=conn_window - 65535).serialize())
    wu = (WindowUpdateFrame(1, window_increment=credit).serialize()
          + WindowUpdateFrame(0, window_increment=credit).serialize())

    def emulator_send() -> int:
        before = sink.written
        s.streams[1] = fast_h2._Stream(s.peer_initial)
        s._send(1, body, True)
        s.flush()
        while 1 in s.streams:  # the peer credits each 64 KiB it consumed
            s.feed(wu)
        s.peer_window = conn_window
        if sink.written - before < len(body):
            raise RuntimeError("emulator_h2_large_body: the body was not sent whole")
        return 1

    out.append(("emulator_h2_large_body (6.5 MB, h2c)", _bench(emulator_send, seconds, repeat),
                "bodies/s"))

    # The client's windows hold the whole answer, so no WINDOW_UPDATE is needed mid-body.
    cfg = UpstreamConfig(h2_stream_window_bytes=8 << 20, h2_connection_window_bytes=8 << 20)
    req = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]
    head = fast_h2._encode_block(((b"content-length", str(len(body)).encode()),), 200)
    wire = bytearray(SettingsFrame(0).serialize()
                     + HeadersFrame(1, data=head, flags=["END_HEADERS"]).serialize())
    for i in range(0, len(body), 16384):
        piece = body[i : i + 16384]
        wire += fast_h2._frame(0, 1 if i + 16384 >= len(body) else 0, 1, piece)
    reads = [bytes(wire[i : i + 65536]) for i in range(0, len(wire), 65536)]
    for suffix, fast in (("", True), ("_public", False)):

        def client_receive(fast: bool = fast) -> int:
            c = new_h2(cfg, 100, fast)
            c.initiate_connection()
            c.increment_flow_control_window((8 << 20) - 65535)
            c.send_headers(1, req, end_stream=True)
            c.data_to_send()
            got = 0
            for r in reads:
                for ev in c.receive_data(r):
                    got += len(getattr(ev, "data", b""))
            if got != len(body):
                raise RuntimeError(f"h2_client_large_body: {got} of {len(body)} bytes")
            return 1

        out.append((f"h2_client_large_body{suffix} (6.5 MB)",
                    _bench(client_receive, seconds, repeat), "bodies/s"))
    return out


def run(seconds: float, repeat: int, chunks: int) -> list[tuple[str, float, str]]:
    results: list[tuple[str, float, str]] = []

    def add(name: str, per_s: float, unit: str) -> None:
        results.append((name, per_s, unit))

    chat_req = _chat_request()
    codex_req = (ROOT / "tests" / "data" / "requests" / "codex_turn.json").read_bytes()

    def decode_map_chat() -> int:
        call = mapping.chat_to_gemini(schemas.decode_chat(chat_req), "gemini-2.5-flash")
        mapping.gemini_body(call)
        return 1

    def decode_map_responses() -> int:
        req = schemas.decode_responses(codex_req)
        call = mapping.responses_to_gemini(req, "gemini-3-pro-preview")
        mapping.gemini_body(call)
        return 1

    add("decode+map chat (12 msgs, 3 tools)", _bench(decode_map_chat, seconds, repeat), "req/s")
    add("decode+map responses (Codex turn)", _bench(decode_map_responses, seconds, repeat), "req/s")

    body, payloads = _stream(chunks)
    reads = _reads(body)

    def sse_decode() -> int:
        d = SSEDecoder()
        n = 0
        for r in reads:
            n += len(d.feed(r))
        return n + len(d.close())

    add(
        f"sse decode ({len(body) // chunks} B events, 16 KiB reads)",
        _bench(sse_decode, seconds, repeat),
        "events/s",
    )

    sample = payloads[len(payloads) // 2]

    def one_decode() -> int:
        for _ in range(100):
            decode_reply(sample)
        return 100

    add("decode_reply (one chunk)", _bench(one_decode, seconds, repeat), "chunks/s")

    chat_call = mapping.chat_to_gemini(
        schemas.decode_chat(
            orjson.dumps(
                {
                    "model": "gpt-4o",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            )
        ),
        "gemini-2.5-flash",
    )
    resp_call = mapping.responses_to_gemini(
        schemas.decode_responses(b'{"model":"gpt-5","input":"hi","stream":true}'),
        "gemini-2.5-flash",
    )

    def chat_pump() -> int:
        dec = SSEDecoder()
        cs = ChatStream(chat_call)
        n = 0
        for r in reads:
            for p in dec.feed(r):
                cs.feed(decode_reply(p))
                n += 1
        for p in dec.close():
            cs.feed(decode_reply(p))
        cs.finish()
        return n

    def responses_pump() -> int:
        dec = SSEDecoder()
        rs = ResponsesStream(resp_call, "resp_bench")
        rs.start()
        n = 0
        for r in reads:
            for p in dec.feed(r):
                rs.feed(decode_reply(p))
                n += 1
        rs.finish()
        return n

    replies = [decode_reply(p) for p in payloads]

    def chat_feed_only() -> int:
        cs = ChatStream(chat_call)
        for rep in replies:
            cs.feed(rep)
        return len(replies)

    sig = SignatureTagger(b"bench-signature-key-32-bytes-000")
    msg_call, msg_opts = messages_to_gemini(
        decode_messages(
            b'{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,'
            b'"messages":[{"role":"user","content":"hi"}]}'
        ),
        "gemini-2.5-flash",
        sig,
    )

    def messages_feed_only() -> int:
        ms = MessagesStream(msg_call, msg_opts, sig)
        for rep in replies:
            ms.feed(rep)
        ms.finish()
        return len(replies)

    def responses_feed_only() -> int:
        rs = ResponsesStream(resp_call, "resp_bench")
        rs.start()
        for rep in replies:
            rs.feed(rep)
        return len(replies)

    def sse_general() -> int:
        d = SSEDecoder()
        d._fast = False  # the general parser, the baseline of the CRLF fast path
        n = 0
        for r in reads:
            n += len(d.feed(r))
        return n + len(d.close())

    add("chat stream pump (sse+decode+transcode)", _bench(chat_pump, seconds, repeat), "chunks/s")
    add(
        "  naive dict-per-frame baseline",
        _bench(lambda: _naive_chat_pump(reads, chat_call), seconds, repeat),
        "chunks/s",
    )
    add(
        "responses stream pump (sse+decode+transcode)",
        _bench(responses_pump, seconds, repeat),
        "chunks/s",
    )
    # The frame-building trick alone (transcode_responses' text-delta path vs a dict per event).
    head = (
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","sequence_number":'
    )
    mid = b',"item_id":"msg_0123456789abcdef01234567","output_index":1,"content_index":0,"delta":'
    tail = b',"logprobs":[]}\n\n'
    text = "word12 and some more text, é ☕ 12 "

    def frame_join() -> int:
        for seq in range(100):
            b"".join((head, b"%d" % seq, mid, orjson.dumps(text), tail))
        return 100

    def frame_dict() -> int:
        for seq in range(100):
            ev = {
                "type": "response.output_text.delta",
                "sequence_number": seq,
                "item_id": "msg_0123456789abcdef01234567",
                "output_index": 1,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            }
            b"event: response.output_text.delta\ndata: " + orjson.dumps(ev) + b"\n\n"
        return 100

    add(
        "  text-delta event: constant pieces joined",
        _bench(frame_join, seconds, repeat),
        "frames/s",
    )
    add("  text-delta event: dict + orjson.dumps", _bench(frame_dict, seconds, repeat), "frames/s")
    add("chat transcoder feed only", _bench(chat_feed_only, seconds, repeat), "chunks/s")
    add("responses transcoder feed only", _bench(responses_feed_only, seconds, repeat), "chunks/s")
    add("messages transcoder feed only", _bench(messages_feed_only, seconds, repeat), "chunks/s")
    add("  sse decode, general parser only", _bench(sse_general, seconds, repeat), "events/s")

    tools_body = (ROOT / "tests" / "data" / "gemini" / "tools_nonstream.json").read_bytes()

    def chat_whole() -> int:
        chat_response(chat_call, decode_reply(tools_body))
        return 1

    def responses_whole() -> int:
        responses_response(resp_call, decode_reply(tools_body), "resp_bench")
        return 1

    add("chat non-stream (tool-call reply)", _bench(chat_whole, seconds, repeat), "resp/s")
    add(
        "responses non-stream (tool-call reply)", _bench(responses_whole, seconds, repeat), "resp/s"
    )

    def attack(body: bytes) -> Callable[[], int]:
        def one() -> int:
            try:  # a cold memo every time: the worst case
                req = schemas.decode_responses(body)
                mapping.responses_to_gemini(req, "gemini-2.5-flash", schemas=mapping.ToolSchemas())
            except BadRequest:
                pass
            return 1

        return one

    chain = ref_chain_request(70_000)
    add(
        f"schema attack: $ref chain ({len(chain) / 1e6:.1f} MB)",
        _bench(attack(chain), seconds, repeat),
        "req/s",
    )
    fan = fanout_tools_request(500)
    add(
        f"schema attack: 500 fan-out tools ({len(fan) / 1e6:.1f} MB)",
        _bench(attack(fan), seconds, repeat),
        "req/s",
    )

    # request_log_record: what the request path pays for the request log (a Row built and
    # queued; the SQLite writes happen on the writer thread). Goal: under 10 us per request.
    from rawgate.monitor.request_log import RequestLog, Row

    rlog = RequestLog(Path(tempfile.mkdtemp()) / "requests.db", queue_max=1 << 30)

    def request_log_record() -> int:
        rlog.record(
            Row(
                request_id="req_0123456789abcdef",
                protocol="openai",
                route="/v1/chat/completions",
                status=200,
                latency_ms=12.5,
                client_model="gpt-4o",
                mapped_model="gemini-2.5-flash",
                account="acct-a",
                attempts=[("acct-a", 200)],
                tokens_in=7,
                tokens_out=3,
            )
        )
        if rlog.queued > 100_000:
            rlog._q.clear()  # the writer is not running here: keep memory flat
        return 1

    add("request_log_record (row + queue)", _bench(request_log_record, seconds, repeat), "req/s")

    # rates_record: what the request path pays for the dashboard's per-minute ring
    # (monitor/rates.py: counters and one latency bin; 100 records per call, the clock moving a
    # minute every 60,000 calls so bucket changes are included).
    # Measured: 0.65 us per request (1.5 M/s, Python 3.11, the shared 2-core dev box; an
    # empty record() in the same loop: ~0.15 us). Goal: well under the request log's 2.4 us.
    from rawgate.monitor.rates import RateRing

    ring = RateRing()
    record = ring.record
    clock = [1_800_000_000.0]

    def rates_record() -> int:
        now = clock[0]
        for i in range(100):
            record(now, 0.0125 + i * 1e-4, 200 if i else 429, 7, 3)
        clock[0] = now + 0.1
        return 100

    add("rates_record (rate ring)", _bench(rates_record, seconds, repeat), "req/s")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (CI smoke test)")
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    ap.add_argument("--seconds", type=float, default=0.3, help="length of one run")
    ap.add_argument("--repeat", type=int, default=5, help="runs per benchmark (best is kept)")
    ap.add_argument("--chunks", type=int, default=200, help="upstream chunks per stream")
    ap.add_argument("--only", choices=("all", "translate", "h1", "h2"), default="all",
                    help="which cases: the translation layer, the HTTP/1.1 driver, the h2 large "
                         "body (emulator send, client receive), or all")
    args = ap.parse_args(argv)
    seconds, repeat = (0.05, 2) if args.quick else (args.seconds, args.repeat)
    results = run(seconds, repeat, args.chunks) if args.only in ("all", "translate") else []
    if args.only in ("all", "h1"):
        results += h1_cases(seconds, repeat)
    if args.only in ("all", "h2"):
        results += h2_cases(seconds, repeat)
    meta = {"python": platform.python_version(), "machine": platform.machine()}
    if args.json:
        for name, value, unit in results:
            print(
                json.dumps({"bench": name.strip(), "value": round(value, 1), "unit": unit, **meta})
            )
    else:
        print(f"rawgate micro-benchmarks (Python {meta['python']}, one core, best of {repeat})")
        for name, value, unit in results:
            per = 1e6 / value if value else 0.0
            print(f"  {name:<48} {value:>12,.0f} {unit:<9} ({per:7.2f} us each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
