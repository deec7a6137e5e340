"""POST /v1/embeddings end to end: the official openai SDK -> rawgate -> the emulator's
batchEmbedContents. Vectors are checked against the emulator's deterministic ones, so order,
truncation, normalisation and both encodings are proven, not just shapes."""

from __future__ import annotations

import math
from pathlib import Path

import openai
import orjson
import pytest

from rawgate.accounts.store import AccountStore
from rawgate.emulator.embed import vector
from rawgate.emulator.server import DEMO_ACCOUNT
from tests.helpers_gateway import Running, gateway_stack

pytestmark = pytest.mark.anyio
EMB = "gemini-embedding-001"
TWO_KEYS = [("key-aaaaaaaaaaaaaaaaaaaaaaaa", "A"), ("key-bbbbbbbbbbbbbbbbbbbbbbbb", "B")]


def _client(run: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=run.base_url, api_key="sk-test", max_retries=0)


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(math.fsum(x * x for x in v))
    return [x / n for x in v]


def _batch_bodies(run: Running) -> list[dict[str, object]]:
    return [
        orjson.loads(body)
        for _m, path, _q, _h, body in run.emulator.core.recent
        if path.endswith(":batchEmbedContents")
    ]


async def test_single_float_and_default_base64(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run) as c:
        f = await c.embeddings.create(
            model="text-embedding-3-small", input="hello", encoding_format="float"
        )
        assert f.model == "text-embedding-3-small" and len(f.data) == 1
        got = f.data[0].embedding
        assert got == pytest.approx(vector(EMB, "hello", None), abs=1e-9)
        assert f.usage.prompt_tokens > 0
        # The SDK asks for base64 by default and decodes the float32 bytes itself.
        b = await c.embeddings.with_raw_response.create(model="text-embedding-004", input="hello")
        assert b.headers["x-mapped-model"] == EMB
        assert b'"embedding":"' in b.content  # really base64 on the wire
        dec = b.parse().data[0].embedding
        assert dec == pytest.approx(got, abs=1e-6)  # float32 precision


async def test_150_inputs_two_upstream_calls_in_order_with_dimensions(tmp_path: Path) -> None:
    texts = [f"document number {i}" for i in range(150)]
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, _client(run) as c:
        r = await c.embeddings.create(model="text-embedding-3-large", input=texts, dimensions=768)
        assert [d.index for d in r.data] == list(range(150))
        for t, d in zip(texts, r.data, strict=True):
            assert len(d.embedding) == 768
            # the emulator's Matryoshka prefix, L2-normalised by rawgate (OpenAI's are unit)
            assert d.embedding == pytest.approx(_unit(vector(EMB, t, None)[:768]), abs=1e-6)
        bodies = _batch_bodies(run)
        sizes = sorted(len(b["requests"]) for b in bodies)  # type: ignore[arg-type]
        assert sizes == [50, 100]
        items = [it for b in bodies for it in b["requests"]]  # type: ignore[attr-defined]
        assert all(it["outputDimensionality"] == 768 for it in items)
        assert all(it["model"] == "models/" + EMB for it in items)


async def test_a_429_chunk_rotates_and_bad_input_is_a_400(tmp_path: Path) -> None:
    key_a = TWO_KEYS[0][0]
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, _client(run) as c:
        cool = f"[[emu:error status=429 limit=5 retry_delay=2s for={key_a}]] x"
        for _ in range(2):
            r = await c.embeddings.with_raw_response.create(
                model="text-embedding-3-small", input=[cool], encoding_format="float"
            )
            assert r.headers["x-account-email"] == "B"
            assert len(r.parse().data[0].embedding) == 3072
        with pytest.raises(openai.BadRequestError) as ei:
            await c.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3]])
        assert "Token-id" in str(ei.value)
        with pytest.raises(openai.BadRequestError):
            await c.embeddings.create(model="text-embedding-3-small", input="x", dimensions=0)


async def test_a_code_assist_only_pool_says_an_api_key_is_needed(tmp_path: Path) -> None:
    AccountStore(tmp_path / "accounts.json").add_oauth(
        DEMO_ACCOUNT.refresh_token, email=DEMO_ACCOUNT.email
    )
    async with gateway_stack(tmp_path) as run, _client(run) as c:
        with pytest.raises(openai.BadRequestError) as ei:
            await c.embeddings.create(model="text-embedding-3-small", input="x")
        assert "API-key account" in str(ei.value)


async def test_a_failing_chunk_fails_the_request_with_its_own_error(tmp_path: Path) -> None:
    texts = [f"t{i}" for i in range(150)]
    texts[120] = "[[emu:error status=400 message=chunk-two-refused]] x"
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, _client(run) as c:
        with pytest.raises(openai.BadRequestError) as ei:
            await c.embeddings.create(model="text-embedding-3-small", input=texts)
        assert "chunk-two-refused" in str(ei.value)
        assert ei.value.response.headers["x-mapped-model"] == EMB


async def test_every_account_cooling_is_a_429_saying_when(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, _client(run) as c:
        cool = "[[emu:error status=429 retry_delay=20s limit=10]] x"
        with pytest.raises(openai.RateLimitError) as ei:
            await c.embeddings.create(model="text-embedding-3-small", input=[cool])
        assert "Please try again in" in str(ei.value)
        assert int(ei.value.response.headers["retry-after"]) >= 1
