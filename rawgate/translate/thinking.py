"""OpenAI reasoning effort -> Gemini `thinkingConfig`, one documented table per model family.

Invariants:
- No effort asked, no `thinkingConfig` sent: the model's own default applies (no hidden default).
- Gemini 2.5 takes a token budget, Gemini 3.x a level; never both (Gemini answers 400).
- Models that cannot think (1.x, 2.0, Gemma, unknown families) get no `thinkingConfig`: sending
  one would be a 400 for a knob the client merely hinted at.
- `includeThoughts` is true exactly when the client asked for reasoning (an effort other than
  "none", or a Responses reasoning summary): that is how it gets thought text back.

Tables (Gemini's own OpenAI layer uses low/medium/high = 1024/8192/24576 for 2.5):

| effort  | 2.5 Flash / Flash-Lite | 2.5 Pro | 3.x Flash | 3 Pro    | 3.1+ Pro |
|---------|------------------------|---------|-----------|----------|----------|
| none    | 0 (off)                | 128 (*) | MINIMAL   | LOW (*)  | LOW (*)  |
| minimal | 512                    | 512     | MINIMAL   | LOW (*)  | LOW (*)  |
| low     | 1024                   | 1024    | LOW       | LOW      | LOW      |
| medium  | 8192                   | 8192    | MEDIUM    | HIGH (*) | MEDIUM   |
| high    | 24576                  | 24576   | HIGH      | HIGH     | HIGH     |
| xhigh   | 24576 (max)            | 32768   | HIGH      | HIGH     | HIGH     |
| max     | 24576 (max)            | 32768   | HIGH      | HIGH     | HIGH     |

(*) the nearest value the model accepts: 2.5 Pro cannot switch thinking off (minimum 128), and
Gemini 3 Pro knows only LOW and HIGH, so MEDIUM rounds up to its default HIGH.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["Family", "family", "thinking_config"]

Family = Literal["2.5-flash", "2.5-pro", "3-flash", "3-pro", "3.1-pro", "none"]

_BUDGET_FLASH = {
    "none": 0,
    "minimal": 512,
    "low": 1024,
    "medium": 8192,
    "high": 24576,
    "xhigh": 24576,
    "max": 24576,
}
_BUDGET_PRO = {**_BUDGET_FLASH, "none": 128, "xhigh": 32768, "max": 32768}
_LEVEL_FLASH = {
    "none": "MINIMAL",
    "minimal": "MINIMAL",
    "low": "LOW",
    "medium": "MEDIUM",
    "high": "HIGH",
    "xhigh": "HIGH",
    "max": "HIGH",
}
_LEVEL_31_PRO = {**_LEVEL_FLASH, "none": "LOW", "minimal": "LOW"}
_LEVEL_3_PRO = {**_LEVEL_31_PRO, "medium": "HIGH"}

_TABLES: dict[str, tuple[str, dict[str, Any]]] = {
    "2.5-flash": ("thinkingBudget", _BUDGET_FLASH),
    "2.5-pro": ("thinkingBudget", _BUDGET_PRO),
    "3-flash": ("thinkingLevel", _LEVEL_FLASH),
    "3-pro": ("thinkingLevel", _LEVEL_3_PRO),
    "3.1-pro": ("thinkingLevel", _LEVEL_31_PRO),
}


def family(model: str) -> Family:
    """The thinking family of a Gemini model id (with or without a `models/` prefix)."""
    m = model.rsplit("/", 1)[-1].lower()
    if not m.startswith("gemini-"):
        return "none"
    version = m[len("gemini-") :].split("-", 1)[0]
    pro = "-pro" in m
    if version == "2.5":
        return "2.5-pro" if pro else "2.5-flash"
    if version == "3" or version.startswith("3.0"):
        return "3-pro" if pro else "3-flash"
    try:
        major = float(version)
    except ValueError:
        return "none"
    if major >= 3:
        return "3.1-pro" if pro else "3-flash"
    return "none"


def thinking_config(model: str, effort: str | None, want_thoughts: bool) -> dict[str, Any] | None:
    """The thinkingConfig for `model`, or None to leave the model's default alone."""
    fam = family(model)
    if fam == "none" or (effort is None and not want_thoughts):
        return None
    out: dict[str, Any] = {}
    if effort is not None:
        key, table = _TABLES[fam]
        out[key] = table[effort]
    if want_thoughts and effort != "none":
        out["includeThoughts"] = True
    return out or None
