"""The emulator's model catalog: what each emulated Gemini model accepts, and its REST object.

Invariants:
- This table is the emulator's own truth, written from Google's model docs (protocols.md A1/A3/A7
  and the thinking tables of ai.google.dev), NOT derived from rawgate's thinking.py: the emulator
  exists to check rawgate's translation, so it must not share rawgate's assumptions.
- Thinking: "budget" models (2.5) take thinkingBudget in [lo, hi] (0 = off where allowed);
  "level" models (3.x) take thinkingLevel from `levels` (thinkingBudget is tolerated for
  compatibility, as Google does); models without thinking reject any thinkingConfig.
- Gemini 3 models require a thought signature on the first functionCall of each model turn in the
  active loop (`signatures_required`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CATALOG", "ModelSpec", "extra_model", "model_object"]


@dataclass(slots=True, frozen=True)
class ModelSpec:
    name: str  # bare id, e.g. "gemini-2.5-flash"
    display: str
    thinking: str | None = None  # "budget", "level" or None
    budget: tuple[int, int] = (0, 0)  # allowed thinkingBudget range (besides -1 = dynamic)
    can_disable: bool = True  # thinkingBudget 0 accepted
    levels: frozenset[str] = frozenset()
    signatures_required: bool = False
    system_instruction: bool = True
    tools: bool = True
    search_with_functions: bool = False  # googleSearch alongside functionDeclarations
    input_limit: int = 1_048_576
    output_limit: int = 65_536
    embedding: bool = False  # an embedding model: embedContent / batchEmbedContents only

    @property
    def thinks_by_default(self) -> bool:
        return self.thinking is not None


_L3_FLASH = frozenset({"MINIMAL", "LOW", "MEDIUM", "HIGH"})

CATALOG: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("gemini-2.5-flash", "Gemini 2.5 Flash", "budget", (1, 24576)),
        ModelSpec("gemini-2.5-flash-lite", "Gemini 2.5 Flash-Lite", "budget", (512, 24576)),
        ModelSpec("gemini-2.5-pro", "Gemini 2.5 Pro", "budget", (128, 32768), can_disable=False),
        ModelSpec("gemini-2.0-flash", "Gemini 2.0 Flash", output_limit=8192),
        ModelSpec("gemini-2.0-flash-lite", "Gemini 2.0 Flash-Lite", output_limit=8192),
        ModelSpec("gemini-3-pro-preview", "Gemini 3 Pro Preview", "level", (128, 32768),
                  can_disable=False, levels=frozenset({"LOW", "HIGH"}),
                  signatures_required=True, search_with_functions=True),
        ModelSpec("gemini-3-flash-preview", "Gemini 3 Flash Preview", "level", (0, 24576),
                  levels=_L3_FLASH, signatures_required=True, search_with_functions=True),
        ModelSpec("gemini-3.1-pro-preview", "Gemini 3.1 Pro Preview", "level", (128, 32768),
                  can_disable=False, levels=frozenset({"LOW", "MEDIUM", "HIGH"}),
                  signatures_required=True, search_with_functions=True),
        ModelSpec("gemma-3-27b-it", "Gemma 3 27B", system_instruction=False, tools=False,
                  input_limit=131_072, output_limit=8192),
        ModelSpec("gemini-embedding-001", "Gemini Embedding 001", tools=False,
                  input_limit=2048, output_limit=1, embedding=True),
    )
}


def extra_model(name: str) -> ModelSpec:
    """A model named in the emulator's settings but not in the catalog: a plain 2.5-like one."""
    return ModelSpec(name, name, "budget", (1, 24576))


def model_object(spec: ModelSpec) -> dict[str, Any]:
    """The REST `Model` resource (the keys python-genai's `_Model_from_mldev` reads)."""
    obj: dict[str, Any] = {
        "name": f"models/{spec.name}",
        "version": "001",
        "displayName": spec.display,
        "description": f"Emulated {spec.display} (rawgate emulator)",
        "inputTokenLimit": spec.input_limit,
        "outputTokenLimit": spec.output_limit,
        "supportedGenerationMethods": (
            ["embedContent", "batchEmbedContents", "countTokens"]
            if spec.embedding
            else ["generateContent", "countTokens"]
        ),
        "temperature": 1.0,
        "maxTemperature": 2.0,
        "topP": 0.95,
        "topK": 64,
    }
    if spec.thinking is not None:
        obj["thinking"] = True
    return obj
