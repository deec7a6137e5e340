"""The emulator over real loopback: the official google-genai SDK, h2c, TLS h2, the fast engine.

Proof that the emulator speaks real Gemini: the SDK's own parsers and error types are used.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
import pytest
import trustme
from google import genai
from google.genai import errors, types

from rawgate.emulator import server as emulator
from rawgate.emulator.server import DEMO_API_KEY, RunningEmulator, Settings
from tests.helpers_h2 import h2_client

pytestmark = pytest.mark.anyio

ENGINES = ["standard", "fast"]
KEY_HDR = (b"x-goog-api-key", DEMO_API_KEY.encode())


@pytest.fixture(params=ENGINES)
async def emu(request: pytest.FixtureRequest) -> AsyncIterator[RunningEmulator]:
    async with emulator.serve(engine=request.param, settings=Settings(stall_max_s=5)) as e:
        yield e


def sdk(emu: RunningEmulator, key: str | None = None) -> genai.client.AsyncClient:
    client = genai.Client(api_key=key or emu.api_key,
                          http_options=types.HttpOptions(base_url=emu.base_url))
    return client.aio


async def test_sdk_generate_stream_count_and_list(emu: RunningEmulator) -> None:
    async with sdk(emu) as c:
        r = await c.models.generate_content(model="gemini-2.5-flash", contents="Hello SDK")
        assert r.text == "Hello SDK"
        assert r.usage_metadata is not None and r.usage_metadata.total_token_count
        assert r.candidates and r.candidates[0].finish_reason == types.FinishReason.STOP
        texts = [ch.text async for ch in await c.models.generate_content_stream(
            model="gemini-2.5-flash", contents="stream me please")]
        assert len(texts) == 3 and "".join(t or "" for t in texts) == "stream me please"
        ct = await c.models.count_tokens(model="gemini-2.5-flash", contents="12345678")
        assert ct.total_tokens == 2
        names = [m.name async for m in await c.models.list(config={"page_size": 3})]
        assert "models/gemini-2.5-flash" in names and len(names) == len(set(names))
        m = await c.models.get(model="gemini-2.5-pro")
        assert m.name == "models/gemini-2.5-pro" and m.input_token_limit


async def test_sdk_tool_calls_and_thoughts(emu: RunningEmulator) -> None:
    async with sdk(emu) as c:
        r = await c.models.generate_content(
            model="gemini-2.5-flash",
            contents='[[emu:tool_call name=get_weather args={"city":"Paris"}]]',
            config=types.GenerateContentConfig(thinking_config=types.ThinkingConfig(
                include_thoughts=True)))
        assert r.function_calls and r.function_calls[0].name == "get_weather"
        assert r.function_calls[0].args == {"city": "Paris"}
        parts = r.candidates[0].content.parts  # type: ignore[index, union-attr]
        assert parts is not None and parts[0].thought is True
        assert any(p.thought_signature for p in parts if p.function_call)


@pytest.mark.parametrize(("prompt", "kind", "code"), [
    ("[[emu:error status=429]]", errors.ClientError, 429),
    ("[[emu:error status=400]]", errors.ClientError, 400),
    ("[[emu:error status=500]]", errors.ServerError, 500),
    ("[[emu:error status=503]]", errors.ServerError, 503),
])
async def test_sdk_sees_its_own_error_types(emu: RunningEmulator, prompt: str, kind: type,
                                            code: int) -> None:
    async with sdk(emu) as c:
        with pytest.raises(kind) as info:
            await c.models.generate_content(model="gemini-2.5-flash", contents=prompt)
        assert info.value.code == code  # type: ignore[attr-defined]
        with pytest.raises(kind):
            async for _ in await c.models.generate_content_stream(model="gemini-2.5-flash",
                                                                  contents=prompt):
                pass


async def test_sdk_wrong_key_and_unknown_model(emu: RunningEmulator) -> None:
    async with sdk(emu, key="AIzaWrongKey") as c:
        with pytest.raises(errors.ClientError) as info:
            await c.models.generate_content(model="gemini-2.5-flash", contents="x")
        assert info.value.code == 400 and info.value.status == "INVALID_ARGUMENT"
    async with sdk(emu) as c:
        with pytest.raises(errors.ClientError) as info:
            await c.models.generate_content(model="gemini-9-ultra", contents="x")
        assert info.value.code == 404


async def test_sdk_raises_an_error_that_arrives_mid_stream(emu: RunningEmulator) -> None:
    got: list[str] = []
    async with sdk(emu) as c:
        with pytest.raises(errors.APIError) as info:
            async for ch in await c.models.generate_content_stream(
                    model="gemini-2.5-flash", contents="aaa bbb ccc [[emu:stream_error after=2]]"):
                got.append(ch.text or "")  # noqa: PERF401 - keeps what came before the error
    assert len(got) == 2 and info.value.code == 503


async def test_sdk_sees_a_dropped_stream_as_an_error(emu: RunningEmulator) -> None:
    got: list[str] = []
    async with sdk(emu) as c:
        with pytest.raises(Exception):  # noqa: B017 - the transport's own error type
            async for ch in await c.models.generate_content_stream(
                    model="gemini-2.5-flash", contents="aaa bbb ccc [[emu:drop after=1]]"):
                got.append(ch.text or "")  # noqa: PERF401 - keeps what came before the error
    assert len(got) <= 1


# ---- HTTP/2 (standard engine only) --------------------------------------------------------------


def gen_request(text: str, model: str = "gemini-2.5-flash",
                verb: str = "streamGenerateContent?alt=sse") -> tuple[str, bytes]:
    body = orjson.dumps({"contents": [{"role": "user", "parts": [{"text": text}]}]})
    return f"/v1beta/models/{model}:{verb}", body


async def test_h2c_concurrent_streams() -> None:
    async with emulator.serve() as emu, h2_client("127.0.0.1", emu.port) as h2:
        sids = []
        for i in range(20):
            path, body = gen_request(f"stream {i}")
            sids.append(await h2.open_stream("POST", path, [KEY_HDR], body))
        for i, sid in enumerate(sids):
            r = await h2.response(sid)
            assert r.status == 200 and r.header(b"content-type") == b"text/event-stream"
            frames = r.body.split(b"\r\n\r\n")[:-1]
            text = "".join(orjson.loads(f[6:])["candidates"][0]["content"]["parts"][0]["text"]
                           for f in frames)
            assert text == f"stream {i}"
        assert emu.stats["streams_completed"] == 20


async def test_h2c_drop_resets_only_that_stream() -> None:
    async with emulator.serve() as emu, h2_client("127.0.0.1", emu.port) as h2:
        path, body = gen_request("a b c d [[emu:drop after=1]]")
        sid = await h2.open_stream("POST", path, [KEY_HDR], body)
        with pytest.raises(ConnectionResetError):
            await h2.response(sid)
        assert h2.received(sid).startswith(b"data: ")
        path, body = gen_request("still alive", verb="generateContent")
        r = await h2.request("POST", path, [KEY_HDR], body)
        assert r.status == 200


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_h2_and_h1_by_alpn(ca: trustme.CA) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    server_ctx.set_alpn_protocols(["h2", "http/1.1"])
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with emulator.serve(ssl_context=server_ctx) as emu:
        assert emu.base_url.startswith("https://127.0.0.1:")
        async with h2_client("127.0.0.1", emu.port, ssl_context=client_ctx) as h2:
            path, body = gen_request("over tls", verb="generateContent")
            r = await h2.request("POST", path, [KEY_HDR], body)
            assert r.status == 200 and b"over tls" in r.body
        h1_ctx = ssl.create_default_context()
        ca.configure_trust(h1_ctx)
        h1_ctx.set_alpn_protocols(["http/1.1"])
        stream = await anyio.connect_tcp("127.0.0.1", emu.port, ssl_context=h1_ctx,
                                         tls_standard_compatible=False)
        async with stream:
            await stream.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            data = await read_all(stream)
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"rawgate Gemini emulator\n")


# ---- raw HTTP/1.1 (both engines) ----------------------------------------------------------------


async def read_all(stream: Any, limit: int = 1 << 20) -> bytes:
    out = b""
    with anyio.fail_after(10):
        while len(out) < limit:
            try:
                out += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                break
    return out


def raw_post(path: str, body: bytes, close: bool = False) -> bytes:
    return (b"POST %s HTTP/1.1\r\nhost: x\r\nx-goog-api-key: %s\r\ncontent-length: %d\r\n%s\r\n"
            % (path.encode(), DEMO_API_KEY.encode(), len(body),
               b"connection: close\r\n" if close else b"")) + body


async def test_h1_keepalive_and_pipelining(emu: RunningEmulator) -> None:
    path, body = gen_request("pipelined", verb="generateContent")
    async with await anyio.connect_tcp("127.0.0.1", emu.port) as s:
        await s.send(raw_post(path, body) + raw_post(path, body) + raw_post(path, body, True))
        data = await read_all(s)
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 3 and data.count(b'"text":"pipelined"') == 3


async def test_h1_stream_is_chunked_and_drop_leaves_it_unfinished(emu: RunningEmulator) -> None:
    path, body = gen_request("a b c")
    async with await anyio.connect_tcp("127.0.0.1", emu.port) as s:
        await s.send(raw_post(path, body, True))
        data = await read_all(s)
    assert b"transfer-encoding: chunked" in data.lower() and data.endswith(b"0\r\n\r\n")
    path, body = gen_request("a b c [[emu:drop after=1]]")
    async with await anyio.connect_tcp("127.0.0.1", emu.port) as s:
        await s.send(raw_post(path, body))
        data = await read_all(s)
    assert data.count(b"data: ") == 1 and not data.endswith(b"0\r\n\r\n")


async def test_h1_reset_before_head(emu: RunningEmulator) -> None:
    path, body = gen_request("[[emu:reset]]", verb="generateContent")
    async with await anyio.connect_tcp("127.0.0.1", emu.port) as s:
        await s.send(raw_post(path, body))
        assert await read_all(s) == b""


async def test_fast_engine_refuses_bad_framing() -> None:
    async with emulator.serve(engine="fast") as emu:
        for request, status in [
            (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", b"411"),
            (b"GET / HTTP/1.1\r\nx: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
            (b"GARBAGE\r\n\r\n", b"400"),
            (b"POST / HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\n", b"413"),
        ]:
            async with await anyio.connect_tcp("127.0.0.1", emu.port) as s:
                await s.send(request)
                data = await read_all(s)
            assert data.startswith(b"HTTP/1.1 " + status), (request[:30], data[:40])


async def test_fast_engine_slow_chunks_and_head() -> None:
    async with emulator.serve(engine="fast") as emu:
        path, body = gen_request("ab [[emu:delay ms=5]] [[emu:first_byte ms=5]] [[emu:drip "
                                 "ms=0.01]]")
        async with await anyio.connect_tcp("127.0.0.1", emu.port) as s:
            await s.send(raw_post(path, body, True))
            data = await read_all(s)
        assert data.count(b"\r\n1\r\n") > 10 and data.endswith(b"0\r\n\r\n")
        async with await anyio.connect_tcp("127.0.0.1", emu.port) as s:
            await s.send(b"HEAD / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            data = await read_all(s)
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\n")
        assert emu.stats["streams_completed"] == 1


async def test_fast_engine_stall_is_cut_when_the_block_exits() -> None:
    async with emulator.serve(engine="fast") as emu:
        path, body = gen_request("a b [[emu:stall after=1]]")
        s = await anyio.connect_tcp("127.0.0.1", emu.port)
        await s.send(raw_post(path, body))
        with anyio.fail_after(5):
            data = await s.receive()
            while b"data: " not in data:
                data += await s.receive()
    assert await read_all(s) == b""  # the server closed the stalled stream on exit
    await s.aclose()
