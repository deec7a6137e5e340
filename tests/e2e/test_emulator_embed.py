"""The emulator's embeddings (rawgate/emulator/embed.py) through the official google-genai SDK on
loopback: single and batch, truncation, Google's validation (batch limit, dimension bounds,
task types), deterministic vectors, error directives and quotas as on generate calls."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
from google import genai
from google.genai import errors, types

from rawgate.emulator import server as emulator
from rawgate.emulator.embed import BATCH_LIMIT, DIMS, EmbedInvalid, embed_batch, vector
from rawgate.emulator.server import RunningEmulator, Settings

pytestmark = pytest.mark.anyio
MODEL = "gemini-embedding-001"


@pytest.fixture
async def emu() -> AsyncIterator[RunningEmulator]:
    async with emulator.serve(settings=Settings(quota_requests=3)) as e:
        yield e


@pytest.fixture
async def client(emu: RunningEmulator) -> AsyncIterator[genai.client.AsyncClient]:
    c = genai.Client(api_key=emu.api_key, http_options=types.HttpOptions(base_url=emu.base_url))
    yield c.aio
    await c.aio.aclose()  # its connections, or they leak into the next test's warnings


def _norm(v: list[float]) -> float:
    return math.sqrt(math.fsum(x * x for x in v))


async def test_sdk_embeds_single_and_batch_in_order(client: genai.client.AsyncClient) -> None:
    got = await client.models.embed_content(model=MODEL, contents="hello")
    assert got.embeddings is not None and len(got.embeddings) == 1
    full = got.embeddings[0].values
    assert full is not None and len(full) == DIMS and math.isclose(_norm(full), 1.0, rel_tol=1e-6)
    texts = [f"doc {i}" for i in range(5)]
    got = await client.models.embed_content(
        model=MODEL,
        contents=texts,
        config=types.EmbedContentConfig(output_dimensionality=768, task_type="RETRIEVAL_DOCUMENT"),
    )
    assert got.embeddings is not None
    vals = [e.values for e in got.embeddings]
    assert all(v is not None and len(v) == 768 for v in vals)
    # in request order, each the prefix of that text's full vector (not renormalised)
    for t, v in zip(texts, vals, strict=True):
        assert v == vector(MODEL, t, "RETRIEVAL_DOCUMENT")[:768]
    assert _norm(vals[0] or []) < 0.99


async def test_google_validation(client: genai.client.AsyncClient) -> None:
    with pytest.raises(errors.ClientError) as ei:
        await client.models.embed_content(
            model=MODEL, contents="x", config=types.EmbedContentConfig(output_dimensionality=4096)
        )
    assert ei.value.code == 400 and "output_dimensionality" in str(ei.value)
    with pytest.raises(errors.ClientError) as ei:
        await client.models.embed_content(model=MODEL, contents=["x"] * (BATCH_LIMIT + 1))
    assert ei.value.code == 400 and "at most 100 requests" in str(ei.value)
    with pytest.raises(errors.ClientError) as ei:  # a generative model does not embed
        await client.models.embed_content(model="gemini-2.5-flash", contents="x")
    assert ei.value.code == 404


async def test_error_directive_and_quota(client: genai.client.AsyncClient) -> None:
    with pytest.raises(errors.ClientError) as ei:
        await client.models.embed_content(
            model=MODEL, contents="[[emu:error status=429 limit=10 retry_delay=2s]] q"
        )
    assert ei.value.code == 429
    for _ in range(3):  # the quota (3 calls) is shared with generate calls
        await client.models.embed_content(model=MODEL, contents="q")
    with pytest.raises(errors.ClientError) as ei:
        await client.models.embed_content(model=MODEL, contents="q")
    assert ei.value.code == 429


def test_batch_checks_in_bytes() -> None:
    with pytest.raises(EmbedInvalid, match="does not match"):
        embed_batch(
            {"requests": [{"model": "models/other", "content": {"parts": [{"text": "a"}]}}]}, MODEL
        )
    with pytest.raises(EmbedInvalid, match="Title is only applicable"):
        embed_batch({"requests": [{"content": {"parts": [{"text": "a"}]}, "title": "T"}]}, MODEL)
    with pytest.raises(EmbedInvalid, match="task_type"):
        embed_batch({"requests": [{"content": {"parts": [{"text": "a"}]}, "taskType": "X"}]}, MODEL)
    with pytest.raises(EmbedInvalid, match="text must not be empty"):
        embed_batch({"requests": [{"content": {"parts": [{"text": ""}]}}]}, MODEL)
    assert vector(MODEL, "a", None) != vector(MODEL, "a", "RETRIEVAL_QUERY")
