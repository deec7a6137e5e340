"""The RAG frameworks' embedding clients against rawgate's `/v1/embeddings` (real listener on
loopback -> the emulator): LangChain's `OpenAIEmbeddings` (langchain-openai, pinned in the test
extra) and llama-index's `OpenAIEmbedding` call pattern. Vectors are compared with what the
emulator answers when called directly for the same text, so order and reassembly are proven.

llama-index-embeddings-openai is not in the test extra: it pulls llama-index-core with numpy,
nltk, SQLAlchemy, networkx and pillow (+214 MB, 43 packages, for one HTTP call), so its exact
call pattern is replayed with the openai SDK it uses (sync client, `input` with newlines made
spaces, batches of `embed_batch_size`, vectors read by position); the real client runs here too
when it is installed.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import openai
import pytest
import tiktoken
from langchain_openai import OpenAIEmbeddings

from rawgate.emulator.embed import vector
from tests.helpers_gateway import Running, gateway_stack

pytestmark = pytest.mark.anyio
EMB = "gemini-embedding-001"


def _f32(v: list[float]) -> list[float]:
    """What the openai SDK decodes from rawgate's base64 (little-endian float32)."""
    return list(struct.unpack(f"<{len(v)}f", struct.pack(f"<{len(v)}f", *v)))


def _unit(v: list[float]) -> list[float]:
    n = math.hypot(*v)
    return [x / n for x in v]


async def _direct(run: Running, texts: list[str]) -> list[list[float]]:
    """The emulator's own vectors for `texts`, asked straight (batchEmbedContents of 100)."""
    out: list[list[float]] = []
    async with httpx.AsyncClient() as http:
        for i in range(0, len(texts), 100):
            r = await http.post(
                f"{run.emulator.base_url}/v1beta/models/{EMB}:batchEmbedContents",
                headers={"x-goog-api-key": run.emulator.api_key},
                json={
                    "requests": [
                        {"model": f"models/{EMB}", "content": {"parts": [{"text": t}]}}
                        for t in texts[i : i + 100]
                    ]
                },
            )
            assert r.status_code == 200
            out.extend(e["values"] for e in r.json()["embeddings"])
    return out


def _batch_sizes(run: Running) -> list[int]:
    import orjson

    return sorted(
        len(orjson.loads(body)["requests"])
        for _m, path, _q, _h, body in run.emulator.core.recent
        if path.endswith(":batchEmbedContents")
    )


def _langchain(run: Running, **kw: Any) -> OpenAIEmbeddings:
    return OpenAIEmbeddings(
        base_url=run.base_url,
        api_key="sk-test",  # type: ignore[arg-type]
        model="text-embedding-3-small",
        max_retries=0,
        **kw,
    )


async def test_langchain_embed_documents_250_and_embed_query(tmp_path: Path) -> None:
    texts = [f"passage {i}: rawgate pools Gemini accounts" for i in range(250)]
    async with gateway_stack(tmp_path) as run:
        lc = _langchain(run, check_embedding_ctx_length=False)
        got = await anyio.to_thread.run_sync(lc.embed_documents, texts)
        # One OpenAI request of 250 (LangChain's chunk_size is 1000), three upstream batches.
        assert _batch_sizes(run) == [50, 100, 100]
        direct = await _direct(run, texts)
        assert len(got) == 250 and all(len(v) == 3072 for v in got)
        assert got == [_f32(v) for v in direct]  # in input order, bit for bit at float32
        q = await anyio.to_thread.run_sync(lc.embed_query, "what does rawgate do?")
        assert q == _f32(vector(EMB, "what does rawgate do?", None))
        # `dimensions` reaches Gemini as outputDimensionality; rawgate normalises the prefix.
        small = _langchain(run, check_embedding_ctx_length=False, dimensions=256)
        few = await anyio.to_thread.run_sync(small.embed_documents, texts[:3])
        assert [len(v) for v in few] == [256] * 3
        for v, d in zip(few, direct[:3], strict=True):
            assert v == pytest.approx(_unit(d[:256]), abs=1e-6)


def _byte_encoding() -> tiktoken.Encoding:
    # A stand-in for cl100k_base (whose BPE file tiktoken downloads, which an offline machine
    # cannot): any encoding makes LangChain send token ids, which is what is under test.
    return tiktoken.Encoding(
        "bytes",
        pat_str=r"[\s\S]",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={},
    )


async def test_langchain_default_sends_token_ids_and_the_400_names_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the default check_embedding_ctx_length=True, LangChain tiktoken-encodes each text and
    # sends token-id arrays; Gemini embeds text only, so rawgate answers 400 and says how to
    # make LangChain send text. (Offline, LangChain fails before any request: tiktoken cannot
    # download its BPE file.)
    enc = _byte_encoding()
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda _name: enc)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda _name: enc)
    async with gateway_stack(tmp_path) as run:
        lc = _langchain(run)
        with pytest.raises(openai.BadRequestError) as ei:
            await anyio.to_thread.run_sync(lc.embed_documents, ["a", "b"])
        assert ei.value.status_code == 400
        assert "check_embedding_ctx_length=False" in str(ei.value)
        body = ei.value.body
        assert isinstance(body, dict) and body.get("param") == "input"
        assert _batch_sizes(run) == []  # nothing went upstream


def _llama_index_pattern(
    base_url: str, texts: list[str], batch: int, **kw: Any
) -> list[list[float]]:
    """llama-index-embeddings-openai 0.7.0's `get_text_embedding_batch`, step for step: the
    sync OpenAI client, batches of `embed_batch_size`, newlines replaced by spaces, the model
    as `model`, extra kwargs (`dimensions`), vectors taken by position from `.data`."""
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=60.0)
    out: list[list[float]] = []
    try:
        for i in range(0, len(texts), batch):
            chunk = [t.replace("\n", " ") for t in texts[i : i + batch]]
            data = client.embeddings.create(
                input=chunk, model="text-embedding-3-small", **kw
            ).data
            out.extend(d.embedding for d in data)
    finally:
        client.close()
    return out


TEXTS_100 = [f"node {i}\nchunk of a document about pools" for i in range(100)]


async def test_llama_index_call_pattern_batch_of_100(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run:
        for batch in (100, 16):  # the default embed_batch_size, and a small one
            got = await anyio.to_thread.run_sync(
                _llama_index_pattern, run.base_url, TEXTS_100, batch
            )
            direct = await _direct(run, [t.replace("\n", " ") for t in TEXTS_100])
            assert got == [_f32(v) for v in direct]
        dims = await anyio.to_thread.run_sync(
            lambda: _llama_index_pattern(run.base_url, TEXTS_100[:5], 100, dimensions=512)
        )
        assert [len(v) for v in dims] == [512] * 5
        assert all(math.isclose(math.hypot(*v), 1.0, abs_tol=1e-5) for v in dims)


async def test_llama_index_itself_when_installed(tmp_path: Path) -> None:
    li = pytest.importorskip("llama_index.embeddings.openai")
    async with gateway_stack(tmp_path) as run:
        emb = li.OpenAIEmbedding(
            api_base=run.base_url,
            api_key="sk-test",
            model_name="text-embedding-3-small",
            embed_batch_size=25,
            max_retries=0,
        )
        got = await anyio.to_thread.run_sync(emb.get_text_embedding_batch, TEXTS_100)
        assert _batch_sizes(run) == [25, 25, 25, 25]
        direct = await _direct(run, [t.replace("\n", " ") for t in TEXTS_100])
        assert got == [_f32(v) for v in direct]
        q = await anyio.to_thread.run_sync(emb.get_query_embedding, "a query")
        assert q == _f32(vector(EMB, "a query", None))
        # The answers must match _llama_index_pattern's, which CI runs without llama-index.
        again = await anyio.to_thread.run_sync(
            _llama_index_pattern, run.base_url, TEXTS_100, 25
        )
        assert again == got
