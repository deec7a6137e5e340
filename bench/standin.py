"""bench.standin: the harness's SELF-TEST target. Never the source of a reported rawgate number.

A tiny anyio + h11 (and h2c prior-knowledge) server that answers the shapes the harness needs
before the real gateway and emulator exist, so the load generator, the checkers, the process
control and the peers can be developed and verified:

- Gemini faces: `POST /v1beta/models/{m}:generateContent`, `:streamGenerateContent?alt=sse`
  (frames `data: {...}` + CRLF CRLF) and `:streamGenerateContent` without `alt` (a JSON array,
  as Portkey asks for it), `GET /v1beta/models`.
- OpenAI faces (posing as "a gateway that costs nothing"): `POST /v1/chat/completions` (JSON, or
  SSE ending in `data: [DONE]`) and `POST /v1/responses` (JSON, or SSE ending in
  `response.completed`).
- `GET /healthz`.

Replies are steered by a directive anywhere in the request body:
`[[bench chunks=N bytes=B delay_ms=D]]`: N text chunks of B bytes, D ms apart (default 3, 16, 0).
Replies are pre-encoded once per (route, directive) and cached, so the stand-in costs little.
With `--trivial` it is instead a raw asyncio Protocol that answers every request with one fixed
200 (about 10x faster than the h11 path): the target for measuring the load generator's ceiling.

Run: `python -m bench.standin --port P [--trivial]`; it prints `ready <port>` when listening.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import h11
import orjson

DIRECTIVE = re.compile(rb"\[\[bench chunks=(\d+) bytes=(\d+) delay_ms=([0-9.]+)\]\]")
DEFAULT = (3, 16, 0.0)
# A request body larger than this is refused (the biggest bench prompt is 20 KB).
MAX_BODY = 4 << 20
MODEL = "gemini-2.5-flash"
_TEXT = b"abcdefghijklmnopqrstuvwxyz0123456789"


def directive(body: bytes) -> tuple[int, int, float]:
    m = DIRECTIVE.search(body)
    if m is None:
        return DEFAULT
    return int(m.group(1)), int(m.group(2)), float(m.group(3))


def _text(nbytes: int, i: int) -> str:
    base = _TEXT[i % len(_TEXT) :] + _TEXT[: i % len(_TEXT)]
    return (base * (nbytes // len(base) + 1))[:nbytes].decode()


# --- reply builders: (content-type, [frames]) ; one frame = one write -------------------------


def gemini_chunk(text: str, i: int, last: bool) -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if last:
        cand["finishReason"] = "STOP"
    return {
        "candidates": [cand],
        "usageMetadata": {
            "promptTokenCount": 8,
            "candidatesTokenCount": i + 1,
            "totalTokenCount": 9 + i,
        },
        "modelVersion": MODEL,
        "responseId": "standin",
    }


def gemini_reply(kind: str, n: int, size: int) -> tuple[bytes, list[bytes]]:
    if kind == "generate":
        text = "".join(_text(size, i) for i in range(n))
        return b"application/json", [orjson.dumps(gemini_chunk(text, n - 1, True))]
    chunks = [gemini_chunk(_text(size, i), i, i == n - 1) for i in range(n)]
    if kind == "sse":
        return b"text/event-stream", [b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in chunks]
    # JSON-array stream framed as Google frames it: "[" elem, "\n,\r\n" elem ..., "\n]".
    # Portkey splits on CRLF and strips exactly "\n]" from the last element.
    frames = [(b"[" if i == 0 else b"\n,\r\n") + orjson.dumps(c) for i, c in enumerate(chunks)]
    frames[-1] += b"\n]"
    return b"application/json", frames


def chat_reply(stream: bool, n: int, size: int) -> tuple[bytes, list[bytes]]:
    base = {"id": "chatcmpl-standin", "created": 1, "model": MODEL}
    if not stream:
        text = "".join(_text(size, i) for i in range(n))
        msg = {"role": "assistant", "content": text}
        body = {
            **base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n},
        }
        return b"application/json", [orjson.dumps(body)]
    frames = []
    for i in range(n):
        delta: dict[str, Any] = {"content": _text(size, i)}
        if i == 0:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "finish_reason": "stop" if i == n - 1 else None}
        ev = {**base, "object": "chat.completion.chunk", "choices": [choice]}
        frames.append(b"data: " + orjson.dumps(ev) + b"\n\n")
    frames[-1] += b"data: [DONE]\n\n"
    return b"text/event-stream", frames


def responses_reply(stream: bool, n: int, size: int) -> tuple[bytes, list[bytes]]:
    text = "".join(_text(size, i) for i in range(n))
    item = {
        "id": "msg_standin",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    done = {"id": "resp_standin", "object": "response", "status": "completed", "output": [item]}
    if not stream:
        return b"application/json", [orjson.dumps(done)]

    def ev(kind: str, payload: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload})

    frames = [ev("response.created", {"response": {**done, "status": "in_progress"}}) + b"\n\n"]
    for i in range(n):
        delta = {"item_id": "msg_standin", "delta": _text(size, i), "output_index": 0}
        frames.append(ev("response.output_text.delta", delta) + b"\n\n")
    frames[-1] += ev("response.completed", {"response": done}) + b"\n\n"
    return b"text/event-stream", frames


_cache: dict[tuple[str, bool, int, int], tuple[bytes, list[bytes]]] = {}


def reply_for(method: str, target: str, body: bytes) -> tuple[int, bytes, list[bytes], float]:
    """(status, content type, frames, delay between frames in s) for one request."""
    path, _, query = target.partition("?")
    if method == "GET":
        if path in ("/healthz", "/health"):
            return 200, b"application/json", [b'{"status":"ok"}'], 0.0
        if path.startswith("/v1beta/models"):
            listing = b'{"models":[{"name":"models/' + MODEL.encode() + b'"}]}'
            return 200, b"application/json", [listing], 0.0
        return 404, b"application/json", [b'{"error":"not found"}'], 0.0
    n, size, delay_ms = directive(body)
    n = max(1, n)
    if path.startswith("/v1beta/models/") and ":" in path:
        op = path.rsplit(":", 1)[1]
        if op == "generateContent":
            kind = "generate"
        elif op == "streamGenerateContent":
            kind = "sse" if "alt=sse" in query else "array"
        else:
            return 404, b"application/json", [b'{"error":"unknown method"}'], 0.0
        key = (kind, False, n, size)
        if key not in _cache:
            _cache[key] = gemini_reply(kind, n, size)
    elif path in ("/v1/chat/completions", "/v1/responses"):
        stream = b'"stream":true' in body.replace(b" ", b"")
        key = (path, stream, n, size)
        if key not in _cache:
            build = chat_reply if path == "/v1/chat/completions" else responses_reply
            _cache[key] = build(stream, n, size)
    else:
        return 404, b"application/json", [b'{"error":"not found"}'], 0.0
    ctype, frames = _cache[key]
    return 200, ctype, frames, delay_ms / 1000.0


# --- HTTP/1.1 + h2c server ---------------------------------------------------------------------


async def serve_h1(stream: anyio.abc.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    first = True
    body: list[bytes] = []
    req: h11.Request | None = None
    try:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                try:
                    data = await stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                if first and data.startswith(b"PRI * HTTP/2.0"):
                    await serve_h2(stream, data)
                    return
                first = False
                conn.receive_data(data)
                continue
            if isinstance(ev, h11.Request):
                req, body = ev, []
            elif isinstance(ev, h11.Data):
                body.append(ev.data)
                if sum(map(len, body)) > MAX_BODY:
                    return
            elif isinstance(ev, h11.EndOfMessage) and req is not None:
                raw = b"".join(body)
                status, ctype, frames, delay = reply_for(
                    req.method.decode(), req.target.decode(), raw
                )
                await _respond_h1(stream, conn, status, ctype, frames, delay)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
            elif isinstance(ev, h11.ConnectionClosed):
                return
    except (h11.RemoteProtocolError, anyio.BrokenResourceError, ConnectionError):
        return
    finally:
        await stream.aclose()


# h2load counts a response whose status line has an empty reason phrase as failed.
_REASON = {200: b"OK", 404: b"Not Found"}


async def _respond_h1(
    stream: anyio.abc.SocketStream,
    conn: h11.Connection,
    status: int,
    ctype: bytes,
    frames: list[bytes],
    delay: float,
) -> None:
    headers = [(b"content-type", ctype)]
    if len(frames) == 1 or delay == 0:
        payload = b"".join(frames)
        headers.append((b"content-length", str(len(payload)).encode()))
        # One write for head and body: no Nagle x delayed-ACK stall on the reader's side.
        await stream.send(
            conn.send(h11.Response(status_code=status, headers=headers, reason=_REASON[status]))
            + conn.send(h11.Data(data=payload))
            + conn.send(h11.EndOfMessage())
        )
        return
    head = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASON[status]))
    for i, frame in enumerate(frames):
        out = conn.send(h11.Data(data=frame))
        if i == 0:
            out = head + out
        await stream.send(out)
        await anyio.sleep(delay)
    await stream.send(conn.send(h11.EndOfMessage()))


async def serve_h2(stream: anyio.abc.SocketStream, initial: bytes) -> None:
    import h2.config
    import h2.connection
    import h2.events

    c = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    c.initiate_connection()
    lock = anyio.Lock()
    pending: dict[int, tuple[list[tuple[bytes, bytes]], list[bytes]]] = {}

    async def flush() -> None:
        async with lock:
            data = c.data_to_send()
            if data:
                await stream.send(data)

    async def answer(sid: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        h = dict(headers)
        status, ctype, frames, delay = reply_for(
            h[b":method"].decode(), h[b":path"].decode(), body
        )
        c.send_headers(sid, [(b":status", str(status).encode()), (b"content-type", ctype)])
        for i, frame in enumerate(frames):
            c.send_data(sid, frame, end_stream=i == len(frames) - 1)
            if delay:
                await flush()
                await anyio.sleep(delay)
        await flush()

    async with anyio.create_task_group() as tg:
        data = initial
        try:
            while True:
                for e in c.receive_data(data):
                    if isinstance(e, h2.events.RequestReceived):
                        pending[e.stream_id] = (list(e.headers), [])
                    elif isinstance(e, h2.events.DataReceived):
                        c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                        if e.stream_id in pending:
                            pending[e.stream_id][1].append(e.data)
                    elif isinstance(e, h2.events.StreamEnded) and e.stream_id in pending:
                        hdrs, parts = pending.pop(e.stream_id)
                        tg.start_soon(answer, e.stream_id, hdrs, b"".join(parts))
                    elif isinstance(e, h2.events.ConnectionTerminated):
                        tg.cancel_scope.cancel()
                        return
                await flush()
                data = await stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
            tg.cancel_scope.cancel()
        except Exception:  # any protocol error from a client: drop this connection only
            tg.cancel_scope.cancel()


# --- trivial mode: the fastest answer Python can give, for the load generator's ceiling ---------

_TRIVIAL = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n"
    b'{"choices":[1]}\n'
)


class TrivialProtocol(asyncio.Protocol):
    """Answers each complete request (head + Content-Length body) with one fixed 200."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = 0
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower() + b"\r\n"
            i = head.find(b"content-length:")
            n = int(head[i + 15 : head.find(b"\r\n", i)]) if i >= 0 else 0
            if len(buf) < end + 4 + n:
                break
            buf = buf[end + 4 + n :]
            out += 1
        self.buf = buf
        if out and self.transport is not None:
            self.transport.write(_TRIVIAL * out)


def _run_trivial(host: str, port: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(TrivialProtocol, host, port, backlog=4096)
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    _loop_run(main)


def _loop_run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.standin", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--trivial", action="store_true", help="fixed 200 for every request")
    args = p.parse_args(argv)
    if args.trivial:
        _run_trivial(args.host, args.port)
        return 0

    async def serve() -> None:
        listener = await anyio.create_tcp_listener(
            local_host=args.host, local_port=args.port, backlog=4096
        )
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        print(f"ready {port}", flush=True)
        await listener.serve(serve_h1)

    try:
        anyio.run(serve, backend="asyncio", backend_options={"use_uvloop": _has_uvloop()})
    except KeyboardInterrupt:
        pass
    return 0


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
