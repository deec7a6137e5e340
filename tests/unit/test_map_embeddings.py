"""OpenAI embeddings <-> Gemini batchEmbedContents (rawgate/map_embeddings.py), in bytes:
chunking at Google's limit with order kept (vector 14), base64 as the openai SDKs decode it, unit
vectors, and the 400s."""

from __future__ import annotations

import array
import base64
import math
from typing import Any

import orjson
import pytest

from rawgate.errors import BadRequest, UpstreamProtocolError
from rawgate.translate.map_embeddings import (
    BATCH_LIMIT,
    batch_bodies,
    decode_embeddings,
    embeddings_response,
    vectors_of,
)


def _req(**kw: Any) -> bytes:
    return orjson.dumps({"model": "text-embedding-3-small", **kw})


def test_vector14_150_inputs_two_batches_in_order_base64_unit_vectors() -> None:
    texts = [f"doc {i}" for i in range(150)]
    req, inputs = decode_embeddings(_req(input=texts, dimensions=768, encoding_format="base64"))
    bodies = [orjson.loads(b) for b in batch_bodies(req, inputs, "gemini-embedding-001")]
    assert [len(b["requests"]) for b in bodies] == [BATCH_LIMIT, 50]
    first = bodies[0]["requests"][0]
    assert first == {
        "model": "models/gemini-embedding-001",
        "content": {"parts": [{"text": "doc 0"}]},
        "outputDimensionality": 768,
    }
    assert bodies[1]["requests"][49]["content"]["parts"][0]["text"] == "doc 149"
    # vectors whose first value encodes the input position, not unit length (reduced dims)
    vecs = [[float(i + 1)] + [1.0] * 767 for i in range(150)]
    out = orjson.loads(embeddings_response("text-embedding-3-small", vecs, inputs, "base64", None))
    assert [d["index"] for d in out["data"]] == list(range(150))
    for i, d in enumerate(out["data"]):
        floats = array.array("f", base64.b64decode(d["embedding"]))  # as openai-python decodes
        assert len(floats) == 768
        assert math.isclose(math.sqrt(sum(x * x for x in floats)), 1.0, rel_tol=1e-3)
        assert floats[0] > floats[1] or i == 0  # the position survives normalisation
    assert out["usage"]["prompt_tokens"] == sum(-(-len(t) // 4) for t in texts)


def test_float_format_and_unit_vectors_left_alone() -> None:
    req, inputs = decode_embeddings(_req(input="hello"))
    v = [0.6, 0.8]
    out = orjson.loads(embeddings_response("m", [v], inputs, req.encoding_format, 3))
    assert out["data"][0]["embedding"] == [0.6, 0.8]
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [1, 2, 3]}, "input"),
        ({"input": [[1, 2], [3]]}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": []}, "input"),
        ({"input": ["a"] * 2049}, "input"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "dimensions": 4096}, "dimensions"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_inputs_are_400s_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as ei:
        decode_embeddings(_req(**body))
    assert ei.value.param == param


def test_upstream_reply_checked() -> None:
    vecs, tokens = vectors_of(
        b'{"embeddings":[{"values":[1.0]}],"usageMetadata":{"promptTokenCount":4}}', 1
    )
    assert vecs == [[1.0]] and tokens == 4
    with pytest.raises(UpstreamProtocolError):
        vectors_of(b'{"embeddings":[]}', 1)
    with pytest.raises(UpstreamProtocolError):
        vectors_of(b"<html>", 1)
