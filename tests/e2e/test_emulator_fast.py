"""The fast engine's hand-rolled HTTP/2: HPACK decoding, h2c and TLS h2, flow control, faults,
and the h1 protocol under uvloop."""

from __future__ import annotations

import ssl
from typing import Any

import anyio
import orjson
import pytest
import trustme
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import DataFrame, SettingsFrame
from hypothesis import given, settings, strategies as st

from rawgate.emulator import server as emulator
from rawgate.emulator.fast_h2 import _Decoder, _encode_block
from rawgate.emulator.server import DEMO_API_KEY, Settings
from tests.helpers_h2 import FrameFactory, FrameReader, h2_client

KEY_HDR = (b"x-goog-api-key", DEMO_API_KEY.encode())
_token = st.binary(min_size=1, max_size=12).map(lambda b: b.hex().encode())


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.tuples(_token, st.binary(max_size=40)), max_size=8), max_size=6),
       st.sampled_from([0, 64, 256, 4096]), st.booleans())
def test_hpack_decoder_matches_the_reference_encoder(blocks: list[list[tuple[bytes, bytes]]],
                                                     table: int, huffman: bool) -> None:
    enc = Encoder()
    dec = _Decoder()
    enc.header_table_size = table  # emits a dynamic table size update in the next block
    for headers in blocks:
        data = enc.encode([(b":path", b"/x"), *headers], huffman=huffman)
        assert dec.decode(data) == [(b":path", b"/x"), *headers]
    assert dec.size <= max(table, 0) or not dec.table


def test_response_block_decodes() -> None:
    headers = ((b"content-type", b"text/event-stream"), (b"x-custom", b"v"))
    for status in (200, 404, 503):
        assert _Decoder().decode(_encode_block(headers, status)) == [
            (b":status", str(status).encode()), *headers]


def body(text: str) -> bytes:
    return orjson.dumps({"contents": [{"role": "user", "parts": [{"text": text}]}]})


SSE = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"


def sse_text(raw: bytes) -> str:
    frames = raw.split(b"\r\n\r\n")[:-1]
    return "".join(orjson.loads(f[6:])["candidates"][0]["content"]["parts"][0]["text"]
                   for f in frames)


@pytest.mark.anyio
async def test_fast_h2c_concurrent_streams_and_a_reset() -> None:
    async with emulator.serve(engine="fast") as emu, h2_client("127.0.0.1", emu.port) as h2:
        sids = [await h2.open_stream("POST", SSE, [KEY_HDR], body(f"stream {i}"))
                for i in range(30)]
        for i, sid in enumerate(sids):
            r = await h2.response(sid)
            assert r.status == 200 and r.header(b"content-type") == b"text/event-stream"
            assert sse_text(r.body) == f"stream {i}"
        sid = await h2.open_stream("POST", SSE, [KEY_HDR], body("a b c [[emu:drop after=1]]"))
        with pytest.raises(ConnectionResetError):
            await h2.response(sid)
        r = await h2.request("POST", GEN, [KEY_HDR], body("[[emu:error status=429]]"))
        assert r.status == 429 and b"RESOURCE_EXHAUSTED" in r.body
        r = await h2.request("GET", "/nowhere", [KEY_HDR])
        assert r.status == 404
        r = await h2.request("GET", "/healthz")
        assert r.status == 200 and r.body == b"rawgate Gemini emulator\n"
        assert emu.stats["streams_completed"] == 30


@pytest.mark.anyio
async def test_fast_h2_respects_the_peers_flow_control_window() -> None:
    window = 1000
    async with emulator.serve(engine="fast") as emu, h2_client(
        "127.0.0.1", emu.port, auto_ack=False,
        settings={SettingCodes.INITIAL_WINDOW_SIZE: window},
    ) as h2:
        sid = await h2.open_stream("POST", GEN, [KEY_HDR], body("[[emu:reply chars=5000]]"))
        await h2.wait_for(lambda: len(h2.received(sid)) >= window)
        assert len(h2.received(sid)) == window  # more would be a flow-control error in h2
        while not h2.streams[sid].ended:
            await h2.ack(sid)
            await h2.wait_for(lambda: h2.streams[sid].unacked > 0 or h2.streams[sid].ended)
        text = orjson.loads(h2.received(sid))["candidates"][0]["content"]["parts"][0]["text"]
        assert len(text) == 5000


@pytest.mark.anyio
async def test_fast_h2_timed_stream_and_stall() -> None:
    async with emulator.serve(engine="fast", settings=Settings(stall_max_s=0.05)) as emu, \
            h2_client("127.0.0.1", emu.port) as h2:
        r = await h2.request("POST", SSE, [KEY_HDR],
                             body("abcdef [[emu:delay ms=2]] [[emu:first_byte ms=2]]"))
        assert r.status == 200 and sse_text(r.body) == "abcdef"
        sid = await h2.open_stream("POST", SSE, [KEY_HDR], body("abc [[emu:stall after=1]]"))
        with pytest.raises(ConnectionResetError):
            await h2.response(sid)
        assert h2.received(sid).count(b"data: ") == 1
        sid = await h2.open_stream("POST", GEN, [KEY_HDR], body("[[emu:reset]]"))
        with pytest.raises(ConnectionResetError):
            await h2.response(sid)
        r = await h2.request("POST", SSE, [KEY_HDR], body("ab [[emu:chunks n=1]] "
                                                          "[[emu:drip ms=0.01]]"))
        assert sse_text(r.body) == "ab"


@pytest.mark.anyio
async def test_fast_engine_tls_h2_and_h1() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    server_ctx.set_alpn_protocols(["h2", "http/1.1"])
    async with emulator.serve(engine="fast", ssl_context=server_ctx) as emu:
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        async with h2_client("127.0.0.1", emu.port, ssl_context=client_ctx) as h2:
            r = await h2.request("POST", GEN, [KEY_HDR], body("secure"))
            assert r.status == 200 and b'"text":"secure"' in r.body
        h1_ctx = ssl.create_default_context()
        ca.configure_trust(h1_ctx)
        h1_ctx.set_alpn_protocols(["http/1.1"])
        async with await anyio.connect_tcp("127.0.0.1", emu.port, ssl_context=h1_ctx,
                                           tls_standard_compatible=False) as s:
            await s.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            data = b""
            with anyio.fail_after(5):
                try:
                    while True:
                        data += await s.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
        assert data.startswith(b"HTTP/1.1 200 OK")


def test_fast_engine_under_uvloop() -> None:
    pytest.importorskip("uvloop")

    async def main() -> Any:
        async with emulator.serve(engine="fast") as emu:
            async with await anyio.connect_tcp("127.0.0.1", emu.port) as s:
                payload = body("uv")
                await s.send(b"POST %s HTTP/1.1\r\nhost: x\r\nx-goog-api-key: %s\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (GEN.encode(), DEMO_API_KEY.encode(), len(payload), payload))
                data = b""
                with anyio.fail_after(5):
                    try:
                        while True:
                            data += await s.receive()
                    except anyio.EndOfStream:
                        pass
            async with h2_client("127.0.0.1", emu.port) as h2:
                r = await h2.request("POST", GEN, [KEY_HDR], body("uv2"))
            return data, r.body

    h1, h2 = anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    assert h1.startswith(b"HTTP/1.1 200 OK") and b'"text":"uv"' in h1
    assert b'"text":"uv2"' in h2


EMBED = "/v1beta/models/gemini-embedding-001:batchEmbedContents"


def embed_body(n: int) -> bytes:
    name = "models/gemini-embedding-001"
    return orjson.dumps({"requests": [{"model": name, "content": {"parts": [{"text": f"t {i}"}]}}
                                      for i in range(n)]})


@pytest.mark.anyio
async def test_fast_h2c_multi_mb_answer_in_full_frames_with_bounded_window_updates() -> None:
    """A 100-vector batchEmbedContents answer (~6.5 MB) over h2c, the client crediting windows
    as rawgate's upstream client does (256 KiB stream window, 4 MiB connection window, credit
    per 64 KiB consumed): byte-for-byte the HTTP/1.1 answer, in full 16 KiB DATA frames (only
    the last may be short: no window-sized slivers), never over a window, and one WINDOW_UPDATE
    per 64 KiB (counts, not time)."""
    stream_window, conn_window, credit_at = 256 * 1024, 4 * 1024 * 1024, 64 * 1024
    req = embed_body(100)
    async with emulator.serve(engine="fast") as emu:
        async with await anyio.connect_tcp("127.0.0.1", emu.port) as s:
            await s.send(b"POST " + EMBED.encode() + b" HTTP/1.1\r\nhost: x\r\nx-goog-api-key: "
                         + DEMO_API_KEY.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(req)
                         + req)
            raw = b""
            while b"\r\n\r\n" not in raw:
                raw += await s.receive()
            head, h1_body = raw.split(b"\r\n\r\n", 1)
            size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(h1_body) < size:
                h1_body += await s.receive()
        assert size > 6_000_000 and len(h1_body) == size

        ff, reader = FrameFactory(), FrameReader()
        async with await anyio.connect_tcp("127.0.0.1", emu.port) as s:
            await s.send(ff.preface({SettingCodes.INITIAL_WINDOW_SIZE: stream_window})
                         + ff.window_update(0, conn_window - 65535)
                         + ff.headers(1, ff.request_headers("POST", EMBED, [KEY_HDR]),
                                      end_stream=False)
                         + ff.data(1, req, end_stream=True))
            received = stream_left = unacked = updates = 0
            conn_left = conn_window
            ended = False
            while not ended:
                for f in reader.feed(await s.receive()):
                    if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                        await s.send(ff.settings(ack=True))
                    if not isinstance(f, DataFrame):
                        continue
                    n = len(f.data)
                    received += n
                    unacked += n
                    stream_left = stream_window - (received - updates * credit_at)
                    conn_left -= n
                    assert stream_left >= 0 and conn_left >= 0  # never over a window
                    ended = "END_STREAM" in f.flags
                    if unacked >= credit_at and not ended:
                        unacked -= credit_at
                        updates += 1
                        conn_left += credit_at
                        await s.send(ff.window_update(1, credit_at)
                                     + ff.window_update(0, credit_at))
        assert reader.status(1) == 200
        assert reader.body(1) == h1_body
        data = [f for f in reader.of_type(DataFrame) if f.stream_id == 1]
        assert all(len(f.data) == 16384 for f in data[:-1])
        assert len(data) == -(-size // 16384)
        assert updates == size // credit_at
        assert len(orjson.loads(h1_body)["embeddings"]) == 100
