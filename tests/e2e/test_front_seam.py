"""The front-protocol seam (gateway/front.py): a toy protocol registered on one route gets the
gateway's whole data path (rotation, retries, the stream pump, accounting, its own error shape)
without a line of gateway code, over a real socket against the emulator.

The toy protocol: the request body is `model\\ntext` (a `stream` query asks for a stream); the
reply is `id=<id> created=<t>\\n<text>\\nin=<tokens> out=<tokens>\\n`; a stream is one
`t:<text>\\n` line per upstream chunk then `end in=<n> out=<n>\\n`; a heartbeat is `.\\n`; an
error is `toy-error <status> <code>` as text/plain.
"""

from __future__ import annotations

from pathlib import Path

import httpx2 as httpx
import pytest

from rawgate.errors import BadRequest, RawgateError
from rawgate.gateway.front import ErrorReply
from rawgate.http.app import GatewayApp
from rawgate.seam import AccessRecord, Request
from rawgate.translate.call import GeminiCall
from rawgate.translate.contract import (
    NO_USAGE,
    Answer,
    Clock,
    IdFactory,
    Stored,
    StreamTranscoder,
    TokenUsage,
    token_usage,
)
from rawgate.translate.gemini import Reply
from tests.helpers_gateway import Running, gateway_stack

pytestmark = pytest.mark.anyio

TWO_KEYS = [("key-aaaaaaaaaaaaaaaaaaaaaaaa", "A"), ("key-bbbbbbbbbbbbbbbbbbbbbbbb", "B")]
KEY_A = TWO_KEYS[0][0]


def _text(reply: Reply) -> str:
    return "".join(
        p.text or ""
        for c in reply.candidates
        if c.content is not None
        for p in c.content.parts
        if not p.thought
    )


class ToyStream:
    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.usage: TokenUsage = NO_USAGE
        self.stored: Stored | None = None
        self.heartbeat = b".\n"

    def start(self) -> bytes:
        return f"id={self.rid}\n".encode()

    def feed(self, reply: Reply) -> bytes:
        if reply.usageMetadata is not None:
            self.usage = token_usage(reply.usageMetadata)
        text = _text(reply)
        return f"t:{text}\n".encode() if text else b""

    def finish(self) -> bytes:
        return f"end in={self.usage.input} out={self.usage.output}\n".encode()

    def fail(self, err: RawgateError) -> bytes:
        return f"failed {err.status} {err.code}\n".encode()


class ToyFront:
    async def decode(self, req: Request, access: AccessRecord) -> GeminiCall:
        model, sep, text = req.body.decode().partition("\n")
        if not sep or not text:
            raise BadRequest("toy wants 'model\\ntext'", code="toy_shape")
        access.model, access.mapped_model = model, model
        return GeminiCall(
            api="chat",
            model=model,
            client_model=model,
            stream="stream" in req.query,
            body={"contents": [{"role": "user", "parts": [{"text": text}]}]},
        )

    def render(self, call: GeminiCall, reply: Reply, clock: Clock, ids: IdFactory) -> Answer:
        u = token_usage(reply.usageMetadata)
        head = f"id={ids('toy-', 8)} created={int(clock())}"
        return Answer(f"{head}\n{_text(reply)}\nin={u.input} out={u.output}\n".encode(), u)

    def stream(self, call: GeminiCall, clock: Clock, ids: IdFactory) -> StreamTranscoder:
        return ToyStream(ids("toy-", 8))

    def error(self, err: RawgateError) -> ErrorReply | None:
        body = f"toy-error {err.status} {err.code or err.type}".encode()
        return err.status, [(b"content-type", b"text/plain")], body


def _install(run: Running) -> None:
    gw = run.gateway
    app = run.server.app
    assert isinstance(app, GatewayApp)
    gw.add_front(app, "/toy", ToyFront())
    gw.clock = lambda: 1_700_000_000.0  # deterministic replies: the injected clock and ids
    gw.ids = lambda prefix, digits: prefix + "7" * digits


async def test_a_toy_front_gets_rotation_and_its_own_reply_shape(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run:
        _install(run)
        async with httpx.AsyncClient(base_url=run.origin) as c:
            cool_a = f"[[emu:error status=429 retry_delay=30s limit=10 for={KEY_A}]]"
            for _ in range(2):  # whichever account round robin starts with, A answers 429
                r = await c.post("/toy", content=f"gemini-2.5-flash\n{cool_a} hi".encode())
                assert r.status_code == 200, r.text
                assert r.headers["x-account-email"] == "B"
                assert r.headers["x-mapped-model"] == "gemini-2.5-flash"
                head, text, usage = r.text.splitlines()
                assert head == "id=toy-77777777 created=1700000000"
                assert "hi" in text and usage.startswith("in=")
            assert run.emulator.stats.get("quota_429", 0) >= 1
            # Accounting went through the neutral usage record: B's counters saw the tokens.
            stats = run.gateway.sync.dirty
            b_id = next(a.id for a in run.gateway.accounts if a.label == "B")
            assert stats[b_id][0] == 2 and stats[b_id][1] > 0 and stats[b_id][2] > 0


async def test_a_toy_front_streams_through_the_pump(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run:
        _install(run)
        async with httpx.AsyncClient(base_url=run.origin) as c:
            body = b"gemini-2.5-flash\n[[emu:chunks n=3]] one two three four five six"
            r = await c.post("/toy?stream", content=body)
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.text.splitlines()
            assert lines[0] == "id=toy-77777777"
            deltas = [ln[2:] for ln in lines if ln.startswith("t:")]
            assert len(deltas) >= 2 and "five six" in "".join(deltas)
            assert lines[-1].startswith("end in=") and not lines[-1].endswith("out=0")


async def test_a_toy_front_shapes_its_errors_and_stream_failures(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run:
        _install(run)
        async with httpx.AsyncClient(base_url=run.origin) as c:
            r = await c.post("/toy", content=b"no newline")
            assert r.status_code == 400 and r.text == "toy-error 400 toy_shape"
            assert r.headers["content-type"] == "text/plain"
            # Every account rate-limited: the gateway's truthful 429 in the toy's shape,
            # with the headers the gateway adds (Retry-After, X-Mapped-Model) kept.
            r = await c.post(
                "/toy",
                content=b"gemini-2.5-flash\n[[emu:error status=429 retry_delay=20s limit=10]] x",
            )
            assert r.status_code == 429 and r.text.startswith("toy-error 429 ")
            assert 19 <= float(r.headers["retry-after"]) <= 21
            assert r.headers["x-mapped-model"] == "gemini-2.5-flash"
            # A failure after the head went out reaches the client through the transcoder.
            r = await c.post(
                "/toy?stream",
                content=b"gemini-2.5-pro\n[[emu:chunks n=4]] [[emu:stream_error after=2]] a b c d",
            )
            assert r.status_code == 200
            assert r.text.splitlines()[-1].startswith("failed 5")
