"""Model router: the model name a client sent (OpenAI or Anthropic) -> the Gemini model to call.

Resolution order (first hit wins); names compare case-insensitively, a leading "models/" is
stripped first:
1. an exact key of `routing.custom_mapping`;
2. a `*` pattern key of `routing.custom_mapping` (`*` matches any run of characters, the rest
   is literal). The most specific pattern wins: the most literal (non-`*`) characters, then the
   fewest `*`, then the pattern that sorts first as a string. So for "gpt-4o-mini",
   "gpt-*-mini" (9 literal characters) beats "gpt-4o-*" (7), and "*-mini" vs "gpt-*" (5 vs 4)
   goes to "*-mini"; equal patterns by that measure, such as "a*c" and "ab*", tie-break to
   "a*c" (string order), the same on every run (the seed used hash-map order);
3. a built-in alias for common OpenAI names (table BUILTIN_ALIASES below, same specificity rule
   among its patterns), pointing at one of three targets, all set in [routing]:
   `default_model`, `pro_model` (strong reasoning / coding names) or `lite_model` (-nano);
4. a Gemini shorthand: the short names people type for preview-only models (SHORTHANDS, e.g.
   gemini-3-flash -> gemini-3-flash-preview, the name the seed's tutorial uses);
5. the name itself.

Built-in alias table, by target:
- default_model: gpt-4o and gpt-4o-*, chatgpt-4o-latest, gpt-4o-mini*, gpt-4, gpt-4-*
  (gpt-4-turbo, dated ids), gpt-4.1, gpt-4.1-*, gpt-4.1-mini*, gpt-3.5-turbo*, gpt-5-mini*,
  o1-mini*, o3-mini*, o4-mini*, codex-mini*;
- pro_model: gpt-5, gpt-5-*, gpt-5.1*/gpt-5.2* (codex variants included), o1, o1-*, o3, o3-*,
  gpt-4.5*;
- lite_model: gpt-4.1-nano*, gpt-5-nano*.
- Anthropic names (any version or date): claude-*opus* -> pro_model, claude-*sonnet* ->
  default_model, claude-*haiku* -> lite_model, so Claude Code's main and small models need no
  config.
Custom mapping always wins over the table, so any line of it can be overridden in config.

Invariants: patterns are validated at construction (ConfigError naming the key); `resolve` is
pure and O(number of patterns), memoised for repeated names (a bounded dict: names come from
clients). `list_models` returns OpenAI model objects without duplicates, in a stable order.

Model names are client input that ends up in an upstream URL path (`/v1beta/models/{model}:
generateContent`, with the pool's credentials attached) and in the X-Mapped-Model header, so
`resolve` is also the gate: the client's name must be 1..256 printable characters without
whitespace, and what it resolves to must be a Gemini model id (GEMINI_MODEL: a letter or digit,
then letters, digits, ".", "-", "_"; at most 128). Anything else (":countTokens", "?key=",
"../", CR/LF) is InvalidModel, a 400 naming param "model", before any account is touched.
Every target a mapping or [routing] can produce is checked the same way at start-up.
"""

from __future__ import annotations

import re
from typing import Any

from rawgate.config import ConfigError
from rawgate.errors import BadRequest

__all__ = ["BUILTIN_ALIASES", "GEMINI_MODEL", "MODELS_CREATED", "InvalidModel", "ModelRouter"]

DEFAULT_PRO_MODEL = "gemini-2.5-pro"
DEFAULT_LITE_MODEL = "gemini-2.5-flash-lite"
# `created` of every listed model: Gemini gives no dates and OpenAI requires an int; a fixed
# value (2024-01-01) keeps the listing byte-stable.
MODELS_CREATED = 1_704_067_200
# Names are client input: bound the memo of resolved names (cleared when full).
RESOLVE_CACHE_MAX = 4096
# A name or pattern longer than this is not a model name.
MAX_NAME_CHARS = 256
# What Google accepts as a model id in `models/{id}` (gemini-2.5-flash, gemini-3-pro-preview,
# gemini-2.5-flash-preview-05-20, embedding-001, ...): one path segment, no ":" "?" "/" "%".
GEMINI_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}\Z")

# (pattern, target) with target in {"default", "pro", "lite"}.
BUILTIN_ALIASES: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "default"),
    ("gpt-4o-*", "default"),
    ("chatgpt-4o-latest", "default"),
    ("gpt-4o-mini*", "default"),
    ("gpt-4", "default"),
    ("gpt-4-*", "default"),
    ("gpt-4.1", "default"),
    ("gpt-4.1-*", "default"),
    ("gpt-4.1-mini*", "default"),
    ("gpt-4.1-nano*", "lite"),
    ("gpt-4.5*", "pro"),
    ("gpt-3.5-turbo*", "default"),
    ("gpt-5", "pro"),
    ("gpt-5-*", "pro"),
    ("gpt-5.1*", "pro"),
    ("gpt-5.2*", "pro"),
    ("gpt-5-mini*", "default"),
    ("gpt-5-nano*", "lite"),
    ("o1", "pro"),
    ("o1-*", "pro"),
    ("o1-mini*", "default"),
    ("o3", "pro"),
    ("o3-*", "pro"),
    ("o3-mini*", "default"),
    ("o4-mini*", "default"),
    ("codex-mini*", "default"),
    # Anthropic names (Claude Code's main and small models, the Anthropic SDKs' examples): the
    # tier by family, whatever the version or date in the name.
    ("claude-*opus*", "pro"),
    ("claude-*sonnet*", "default"),
    ("claude-*haiku*", "lite"),
)
# Gemini model names without their "-preview" suffix: the seed and its tutorial accept them, and
# Google answers 404 to them. Exact names only; custom mapping and aliases come first.
SHORTHANDS: dict[str, str] = {
    "gemini-3-flash": "gemini-3-flash-preview",
    "gemini-3-pro": "gemini-3-pro-preview",
    "gemini-3-pro-image": "gemini-3-pro-image-preview",
}
# Concrete alias names listed by GET /v1/models (patterns cannot be listed).
LISTED_ALIASES: tuple[str, ...] = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-4-turbo",
    "gpt-3.5-turbo",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-5-codex",
    "o1",
    "o3",
    "o3-mini",
    "o4-mini",
    "codex-mini-latest",
    "claude-opus-5-5",
    "claude-sonnet-5-5",
    "claude-haiku-5-5",
)


class InvalidModel(BadRequest):
    """A model name that is not one (see the module docstring): 400, param "model"."""

    default_code = "invalid_model"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


def _client_name_ok(name: str) -> bool:
    # isprintable() is False for control characters (CR, LF, NUL, DEL, C1) and for Unicode
    # separators other than the ASCII space, which the whitespace test excludes.
    return (
        0 < len(name) <= MAX_NAME_CHARS
        and name.isprintable()
        and not any(c.isspace() for c in name)
    )


class _Pattern:
    __slots__ = ("parts", "rank", "target", "text")

    def __init__(self, text: str, target: str) -> None:
        self.text = text
        self.target = target
        self.parts = text.split("*")
        literal = len(text) - text.count("*")
        # Sorting key: most literal characters, fewest wildcards, then the string itself.
        self.rank = (-literal, text.count("*"), text)

    def match(self, name: str) -> bool:
        parts = self.parts
        if len(parts) == 1:
            return name == parts[0]
        first, last = parts[0], parts[-1]
        if len(name) < len(first) + len(last) or not name.startswith(first):
            return False
        if not name.endswith(last):
            return False
        pos, end = len(first), len(name) - len(last)
        for mid in parts[1:-1]:  # each middle literal, leftmost-first (optimal for `*` globs)
            i = name.find(mid, pos, end)
            if i < 0:
                return False
            pos = i + len(mid)
        return True


def _check_name(what: str, text: object) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"routing.custom_mapping: {what} must be a non-empty string")
    if len(text) > MAX_NAME_CHARS or any(c.isspace() or ord(c) < 32 for c in text):
        raise ConfigError(
            f"routing.custom_mapping: {what} {text[:60]!r} must be at most {MAX_NAME_CHARS} "
            "characters without spaces or control characters"
        )
    return text


def _norm(name: str) -> str:
    return name.removeprefix("models/").casefold()


class ModelRouter:
    def __init__(
        self,
        default_model: str,
        custom_mapping: dict[str, str] | None = None,
        *,
        pro_model: str = DEFAULT_PRO_MODEL,
        lite_model: str = DEFAULT_LITE_MODEL,
    ) -> None:
        targets = {"default": default_model, "pro": pro_model, "lite": lite_model}
        for tier, model in targets.items():
            if not GEMINI_MODEL.match(model.removeprefix("models/")):
                raise ConfigError(
                    f"routing: the {tier} model {model!r} must be a Gemini model id"
                    " (letters, digits, '.', '-', '_')"
                )
        self.default_model = default_model.removeprefix("models/")
        self._exact: dict[str, str] = {}
        patterns: list[_Pattern] = []
        self._keys: list[str] = []  # custom keys as written, for the listing
        for key, value in (custom_mapping or {}).items():
            _check_name("key", key)
            _check_name(f"value of {key!r}", value)
            if "*" in value:
                raise ConfigError(
                    f"routing.custom_mapping: value of {key!r} is {value!r}; a target is one "
                    "model name, `*` is only allowed in keys"
                )
            if "**" in key:
                raise ConfigError(
                    f"routing.custom_mapping: key {key!r}: use a single `*` (it already "
                    "matches any run of characters)"
                )
            nkey, target = _norm(key), value.removeprefix("models/")
            if not GEMINI_MODEL.match(target):
                raise ConfigError(
                    f"routing.custom_mapping: value of {key!r} is {value!r}; a target must be a"
                    " Gemini model id (letters, digits, '.', '-', '_'), as it goes into the"
                    " upstream URL"
                )
            if not nkey:
                raise ConfigError(f"routing.custom_mapping: key {key!r} names no model")
            if "*" in nkey:
                patterns.append(_Pattern(nkey, target))
            else:
                if nkey in self._exact and self._exact[nkey] != target:
                    raise ConfigError(
                        f"routing.custom_mapping: {key!r} is mapped twice (names compare "
                        "case-insensitively)"
                    )
                self._exact[nkey] = target
                self._keys.append(key.removeprefix("models/"))
        self._patterns = sorted(patterns, key=lambda p: p.rank)
        self._aliases = sorted(
            (_Pattern(p, targets[t].removeprefix("models/")) for p, t in BUILTIN_ALIASES),
            key=lambda p: p.rank,
        )
        self._alias_exact = {p.text: p.target for p in self._aliases if "*" not in p.text}
        self._memo: dict[str, str] = {}

    def resolve(self, name: str) -> str:
        """The Gemini model to call for the client's `name` (see the module docstring).

        Raises InvalidModel for a name that is not a model name or resolves to no Gemini id;
        only valid names are memoised, so a hit needs no check.
        """
        hit = self._memo.get(name)
        if hit is not None:
            return hit
        if not _client_name_ok(name):
            raise InvalidModel(
                f"Invalid model name {name[:80]!r}: expected 1 to {MAX_NAME_CHARS} printable"
                " characters without spaces, such as 'gemini-2.5-flash' or 'gpt-4o'."
            )
        out = self._resolve(name)
        if not GEMINI_MODEL.match(out):
            raise InvalidModel(
                f"Invalid model name {name[:80]!r}: a Gemini model id has only letters,"
                " digits, '.', '-' and '_' (e.g. 'gemini-2.5-flash'); no ':', '/', '?' or"
                " '%'. Map other names in [routing.custom_mapping]."
            )
        if len(self._memo) >= RESOLVE_CACHE_MAX:
            self._memo.clear()
        self._memo[name] = out
        return out

    def source(self, name: str) -> str:
        """Where `name` is resolved: "mapping", "pattern", "alias", "shorthand" or "passthrough"."""
        n = _norm(name)
        if n in self._exact:
            return "mapping"
        if any(p.match(n) for p in self._patterns):
            return "pattern"
        if n in self._alias_exact or any(p.match(n) for p in self._aliases):
            return "alias"
        if n in SHORTHANDS:
            return "shorthand"
        return "passthrough"

    def _resolve(self, name: str) -> str:
        bare = name.removeprefix("models/")
        n = bare.casefold()
        exact = self._exact.get(n)
        if exact is not None:
            return exact
        for p in self._patterns:
            if p.match(n):
                return p.target
        alias = self._alias_exact.get(n)
        if alias is not None:
            return alias
        for p in self._aliases:
            if p.match(n):
                return p.target
        return SHORTHANDS.get(n, bare)

    def list_models(self, upstream_names: list[str]) -> list[dict[str, Any]]:
        """GET /v1/models `data`: upstream models, then custom keys, then the listed aliases.

        Each id appears once, at its first position (ids compare case-insensitively).
        `owned_by` says where it comes from: "google" (the upstream's listing),
        "rawgate-mapping" (a custom key; also an upstream or alias id that a custom key
        redirects) or "rawgate-alias" (a built-in alias). Wildcard keys are not listed: they
        are not model ids.
        """
        out: list[dict[str, Any]] = []
        seen: set[str] = set()

        def add(name: str, owner: str) -> None:
            low = name.casefold()
            if name and low not in seen:
                seen.add(low)
                out.append({"id": name, "object": "model", "created": MODELS_CREATED,
                            "owned_by": owner})  # fmt: skip

        for name in upstream_names:
            bare = name.removeprefix("models/")
            add(bare, "rawgate-mapping" if bare.casefold() in self._exact else "google")
        for key in self._keys:
            add(key, "rawgate-mapping")
        for alias in LISTED_ALIASES:
            mapped = self.source(alias) in ("mapping", "pattern")
            add(alias, "rawgate-mapping" if mapped else "rawgate-alias")
        return out
