"""OpenAI `POST /v1/embeddings` <-> Gemini `batchEmbedContents` (protocols-2.md D).

Invariants:
- Pure: request bytes in, upstream batch bodies out; upstream reply bytes in, the OpenAI answer
  out. No I/O.
- One code path: every input, single or listed, goes through `batchEmbedContents`, in chunks of
  at most `BATCH_LIMIT` (Google's per-call limit, 100); the answer's `data[i].index` is the
  input position whatever the chunking, and chunk k's vectors fill positions k*100 ...
- `encoding_format` is honoured exactly: float lists, or standard padded base64 of the
  little-endian float32 bytes (what both openai SDKs ask for by default and decode; Node reads
  a float list sent for a base64 request as an empty vector).
- Vectors are unit length, as OpenAI's are: gemini-embedding-001 normalises only its full
  3072-d output, so a reduced `dimensions` is L2-normalised here; a vector that is already
  normalised is left bit-for-bit alone (no renormalisation drift).
- Token-id inputs, empty strings, more than `MAX_INPUTS` items and dimensions out of range are
  400s naming `input` / `dimensions`, in OpenAI's words.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import msgspec
import orjson

from rawgate.errors import BadRequest, UpstreamProtocolError

__all__ = [
    "BATCH_LIMIT",
    "EmbeddingsRequest",
    "batch_bodies",
    "decode_embeddings",
    "embeddings_response",
    "vectors_of",
]

BATCH_LIMIT = 100  # batchEmbedContents: "at most 100 requests can be in one batch"
MAX_INPUTS = 2048  # OpenAI's own per-request limit
MAX_DIMENSIONS = 3072  # gemini-embedding-001's full output


class EmbeddingsRequest(msgspec.Struct):
    model: str
    input: str | list[str | int | list[int]]  # token ids are refused below
    dimensions: int | None = None
    encoding_format: str = "float"
    user: str | None = None
    task_type: str | None = None  # extension (extra_body): Gemini's taskType


_decoder = msgspec.json.Decoder(EmbeddingsRequest)


def decode_embeddings(body: bytes) -> tuple[EmbeddingsRequest, list[str]]:
    """The request and its inputs as a list of strings; a 400 for anything Gemini cannot embed."""
    try:
        req = _decoder.decode(body)
    except msgspec.ValidationError as e:
        text = str(e)
        param = "input" if "input" in text else None
        raise BadRequest(f"Invalid request: {text}.", param=param) from None
    except msgspec.DecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    raw = req.input
    if isinstance(raw, str):
        inputs = [raw]
    elif raw and not all(isinstance(x, str) for x in raw):
        raise BadRequest(
            "Token-id inputs are not supported: Gemini embeds text. Send the input as strings "
            "(LangChain's OpenAIEmbeddings sends token ids unless it is given "
            "check_embedding_ctx_length=False).",
            param="input",
        )
    else:
        inputs = [x for x in raw if isinstance(x, str)]
    if not inputs:
        raise BadRequest("'input' must be a non-empty string or list of strings.", param="input")
    if len(inputs) > MAX_INPUTS:
        raise BadRequest(
            f"'input' has {len(inputs)} items; at most {MAX_INPUTS} are allowed per request.",
            param="input",
        )
    for i, s in enumerate(inputs):
        if not s:
            raise BadRequest(
                f"'input[{i}]' is empty; every input must be non-empty.", param="input"
            )
    if req.encoding_format not in ("float", "base64"):
        raise BadRequest(
            f"'{req.encoding_format}' is not a valid encoding_format: use 'float' or 'base64'.",
            param="encoding_format",
        )
    if req.dimensions is not None and not 1 <= req.dimensions <= MAX_DIMENSIONS:
        raise BadRequest(
            f"'dimensions' must be between 1 and {MAX_DIMENSIONS}.", param="dimensions"
        )
    return req, inputs


def batch_bodies(req: EmbeddingsRequest, inputs: list[str], model: str) -> list[bytes]:
    """One `batchEmbedContents` body per chunk of at most BATCH_LIMIT inputs, in order."""
    out = []
    name = "models/" + model
    for start in range(0, len(inputs), BATCH_LIMIT):
        items = []
        for text in inputs[start : start + BATCH_LIMIT]:
            item: dict[str, Any] = {"model": name, "content": {"parts": [{"text": text}]}}
            if req.task_type:
                item["taskType"] = req.task_type
            if req.dimensions is not None:
                item["outputDimensionality"] = req.dimensions
            items.append(item)
        out.append(orjson.dumps({"requests": items}))
    return out


def vectors_of(reply: bytes, expected: int) -> tuple[list[list[float]], int | None]:
    """(vectors, prompt tokens if Google said) of one batchEmbedContents reply."""
    try:
        doc = orjson.loads(reply)
        vecs = [e["values"] for e in doc["embeddings"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise UpstreamProtocolError(
            "upstream sent an embeddings reply rawgate cannot read"
        ) from None
    if len(vecs) != expected or not all(isinstance(v, list) for v in vecs):
        raise UpstreamProtocolError(
            f"upstream returned {len(vecs)} embeddings for {expected} inputs"
        )
    usage = doc.get("usageMetadata") if isinstance(doc, dict) else None
    tokens = usage.get("promptTokenCount") if isinstance(usage, dict) else None
    return vecs, tokens if isinstance(tokens, int) else None


def _unit(v: list[float]) -> list[float]:
    norm = math.hypot(*v)  # C, correctly rounded enough; ~10x the generator + fsum
    if norm == 0.0 or abs(norm - 1.0) < 1e-6:
        return v  # already unit length (or all zeros): leave it bit-for-bit
    return [x / norm for x in v]


def _b64(v: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii")


def embeddings_response(
    client_model: str,
    vectors: list[list[float]],
    inputs: list[str],
    encoding_format: str,
    prompt_tokens: int | None,
) -> bytes:
    """The OpenAI answer for the vectors of `inputs`, in input order."""
    data = []
    for i, v in enumerate(vectors):
        u = _unit(v)
        emb: list[float] | str = _b64(u) if encoding_format == "base64" else u
        data.append({"object": "embedding", "index": i, "embedding": emb})
    if prompt_tokens is None:  # Google did not say: the same chars/4 estimate as the emulator
        prompt_tokens = sum(-(-len(s) // 4) for s in inputs)
    return orjson.dumps(
        {
            "object": "list",
            "model": client_model,
            "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )
