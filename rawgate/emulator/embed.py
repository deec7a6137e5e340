"""The emulator's embeddings: `embedContent` and `batchEmbedContents` (protocols-2.md D2).

Invariants:
- Deterministic: the vector of a text is a function of (model, text, taskType) only, so tests
  can check order and reassembly; a different text or task gives a different vector.
- Shaped like gemini-embedding-001: 3072 values; only the full 3072-d output is unit length;
  `outputDimensionality` N returns the first N values (Matryoshka truncation) NOT renormalised,
  as Google documents (the caller normalises smaller outputs).
- Google's validation, Google's words: at most BATCH_LIMIT requests in a batch, every request's
  `model` equal to the URL's, content with at least one non-empty text part,
  `outputDimensionality` in 1..3072, `taskType` from Google's enum, `title` only with
  RETRIEVAL_DOCUMENT. A violation is `Invalid(field, description)`.
- `[[emu:error ...]]` directives in a text work as in generate requests (the caller reads them
  from `directive_text`), so rotation and errors can be tested on embeddings too.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

__all__ = ["BATCH_LIMIT", "DIMS", "EmbedInvalid", "embed_batch", "embed_one", "vector"]

BATCH_LIMIT = 100
DIMS = 3072
TASK_TYPES = frozenset(
    {
        "TASK_TYPE_UNSPECIFIED",
        "RETRIEVAL_QUERY",
        "RETRIEVAL_DOCUMENT",
        "SEMANTIC_SIMILARITY",
        "CLASSIFICATION",
        "CLUSTERING",
        "QUESTION_ANSWERING",
        "FACT_VERIFICATION",
        "CODE_RETRIEVAL_QUERY",
    }
)


class EmbedInvalid(ValueError):
    def __init__(self, field: str, description: str) -> None:
        super().__init__(description)
        self.field = field
        self.description = description


def vector(model: str, text: str, task: str | None) -> list[float]:
    """The full, unit-length 3072-d vector of `text` (see the module note)."""
    seed = hashlib.sha256(f"{model}\x00{task or ''}\x00{text}".encode()).digest()
    raw: list[float] = []
    counter = 0
    while len(raw) < DIMS:
        block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
        # 8 values per 32-byte block, each in [-1, 1)
        raw.extend((v / 2147483648.0) for v in struct.unpack(">8i", block))
    raw = raw[:DIMS]
    norm = math.sqrt(math.fsum(x * x for x in raw))
    return [x / norm for x in raw]


def _get(obj: dict[str, Any], camel: str, snake: str) -> Any:
    return obj[camel] if camel in obj else obj.get(snake)


def _text_of(content: Any, field: str) -> str:
    if not isinstance(content, dict):
        raise EmbedInvalid(field, f"* {field}: content is required")
    parts = content.get("parts")
    if not isinstance(parts, list) or not parts:
        raise EmbedInvalid(f"{field}.parts", f"* {field}.parts: contents.parts must not be empty")
    texts = [p.get("text") for p in parts if isinstance(p, dict)]
    if not all(isinstance(t, str) for t in texts) or not "".join(t for t in texts if t):
        raise EmbedInvalid(f"{field}.parts", f"* {field}.parts: text must not be empty")
    return "".join(t for t in texts if isinstance(t, str))


def embed_one(req: Any, model: str, field: str = "") -> tuple[list[float], str]:
    """(values, text) for one EmbedContentRequest; raises EmbedInvalid."""
    prefix = f"{field}." if field else ""
    if not isinstance(req, dict):
        raise EmbedInvalid(field or "request", "Invalid JSON payload received.")
    text = _text_of(req.get("content"), f"{prefix}content")
    task = _get(req, "taskType", "task_type")
    if task is not None and task not in TASK_TYPES:
        raise EmbedInvalid(
            f"{prefix}task_type",
            f'Invalid value at \'{prefix}task_type\' (type.googleapis.com/google.ai.'
            f'generativelanguage.v1beta.TaskType), "{task}"',
        )
    if req.get("title") is not None and task != "RETRIEVAL_DOCUMENT":
        raise EmbedInvalid(
            f"{prefix}title",
            "Title is only applicable when TaskType is RETRIEVAL_DOCUMENT.",
        )
    dims = _get(req, "outputDimensionality", "output_dimensionality")
    full = vector(model, text, task)
    if dims is None:
        return full, text
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= DIMS:
        raise EmbedInvalid(
            f"{prefix}output_dimensionality",
            f"* {prefix}output_dimensionality: must be between 1 and {DIMS}, got {dims}",
        )
    return full[:dims], text


def embed_batch(body: Any, model: str) -> tuple[list[list[float]], list[str]]:
    """(vectors, texts) for a BatchEmbedContentsRequest, in request order; raises EmbedInvalid."""
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise EmbedInvalid("requests", "* BatchEmbedContentsRequest.requests: requests is required")
    reqs = body["requests"]
    if not reqs:
        raise EmbedInvalid("requests", "* BatchEmbedContentsRequest.requests: requests is required")
    if len(reqs) > BATCH_LIMIT:
        raise EmbedInvalid(
            "requests",
            f"* BatchEmbedContentsRequest.requests: at most {BATCH_LIMIT} requests can be in "
            "one batch",
        )
    out: list[list[float]] = []
    texts: list[str] = []
    for i, r in enumerate(reqs):
        field = f"requests[{i}]"
        m = r.get("model") if isinstance(r, dict) else None
        if m is not None and str(m).removeprefix("models/") != model:
            raise EmbedInvalid(
                f"{field}.model",
                f"Model {m!r} in {field} does not match the model in the URL (models/{model}).",
            )
        values, text = embed_one(r, model, field)
        out.append(values)
        texts.append(text)
    return out, texts
