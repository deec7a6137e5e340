"""Model router: precedence, wildcard specificity and ties, validation, /v1/models listing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from rawgate.config import ConfigError
from rawgate.model_router import LISTED_ALIASES, MODELS_CREATED, ModelRouter, _Pattern

D = "gemini-2.5-flash"


def test_precedence_exact_then_pattern_then_alias_then_name() -> None:
    r = ModelRouter(D, {"gpt-4o": "exact-target", "gpt-4*": "pattern-target"})
    assert r.resolve("gpt-4o") == "exact-target"
    assert r.resolve("gpt-4o-mini") == "pattern-target"  # pattern beats the built-in alias
    assert r.resolve("gpt-3.5-turbo") == D  # alias
    assert r.resolve("gemini-2.5-pro") == "gemini-2.5-pro"  # the name itself
    assert r.resolve("models/gemini-2.5-pro") == "gemini-2.5-pro"
    assert r.resolve("models/gpt-4o") == "exact-target"
    assert r.source("gpt-4o") == "mapping"
    assert r.source("gpt-4o-mini") == "pattern"
    assert r.source("o3") == "alias"
    assert r.source("my-model") == "passthrough"


def test_builtin_alias_table() -> None:
    r = ModelRouter(D, pro_model="PRO", lite_model="LITE")
    expect = {
        "gpt-4o": D,
        "gpt-4o-2024-08-06": D,
        "chatgpt-4o-latest": D,
        "gpt-4o-mini": D,
        "gpt-4": D,
        "gpt-4-turbo": D,
        "gpt-4.1": D,
        "gpt-4.1-mini": D,
        "gpt-4.1-nano": "LITE",
        "gpt-3.5-turbo-16k": D,
        "gpt-5": "PRO",
        "gpt-5-codex": "PRO",
        "gpt-5.1-codex-max": "PRO",
        "gpt-5-mini": D,
        "gpt-5-nano": "LITE",
        "o1": "PRO",
        "o1-preview": "PRO",
        "o1-mini": D,
        "o3": "PRO",
        "o3-pro": "PRO",
        "o3-mini": D,
        "o4-mini": D,
        "codex-mini-latest": D,
        "GPT-4o": D,  # names compare case-insensitively
        # Anthropic names by family, any version or date (Claude Code's main and small models)
        "claude-opus-5-5": "PRO",
        "claude-3-opus-20240229": "PRO",
        "claude-sonnet-4-5-20250929": D,
        "claude-3-7-sonnet-latest": D,
        "claude-haiku-5-5": "LITE",
        "claude-3-5-haiku-20241022": "LITE",
    }
    got = {name: r.resolve(name) for name in expect}
    assert got == expect
    assert r.resolve("claude-instant-1") == "claude-instant-1"  # no family: passed through


def test_custom_mapping_overrides_the_claude_aliases() -> None:
    r = ModelRouter("D", {"claude-*sonnet*": "gemini-3-pro-preview", "claude-haiku-5-5": "X"})
    assert r.resolve("claude-sonnet-5-5") == "gemini-3-pro-preview"
    assert r.resolve("claude-haiku-5-5") == "X"
    assert r.resolve("claude-3-5-haiku-latest") == "gemini-2.5-flash-lite"  # the alias still


def test_default_model_follows_config() -> None:
    assert ModelRouter("gemini-3-flash-preview").resolve("gpt-4o") == "gemini-3-flash-preview"


@pytest.mark.parametrize(
    ("mapping", "name", "expected"),
    [
        # most literal characters wins
        ({"gpt-*-mini": "A", "gpt-4o-*": "B"}, "gpt-4o-mini", "A"),
        ({"*-mini": "A", "gpt-*": "B"}, "gpt-mini", "A"),
        ({"claude-*": "A", "claude-3-5-*": "B"}, "claude-3-5-sonnet", "B"),
        # same literal length: fewer wildcards wins
        ({"ab*cd*": "TWO", "abc*d": "ONE"}, "abcd", "ONE"),
        # full tie: string order decides ("a*c" < "ab*")
        ({"ab*": "AB", "a*c": "AC"}, "abc", "AC"),
        ({"a*c": "AC", "ab*": "AB"}, "abc", "AC"),
        # a bare "*" is the catch-all, below every other pattern
        ({"*": "ALL", "x*": "X"}, "xyz", "X"),
        ({"*": "ALL"}, "anything", "ALL"),
    ],
)
def test_wildcard_specificity_and_deterministic_ties(
    mapping: dict[str, str], name: str, expected: str
) -> None:
    assert ModelRouter(D, mapping).resolve(name) == expected


def test_pattern_matching_anchors() -> None:
    r = ModelRouter(D, {"gpt-*-mini": "M", "*-preview": "P", "a*b*c": "ABC"})
    assert r.resolve("gpt-4o-mini") == "M"
    assert r.resolve("gpt-mini") == "gpt-mini"  # "gpt-" + "-mini" need 9 characters
    assert r.resolve("xgpt-4o-mini") == "xgpt-4o-mini"
    assert r.resolve("gemini-3-pro-preview") == "P"
    assert r.resolve("preview") == "preview"
    assert r.resolve("abc") == "ABC"
    assert r.resolve("a-b-c") == "ABC"
    assert r.resolve("acb") == "acb"


def _glob_regex(pattern: str) -> str:
    import re

    return "".join(".*" if c == "*" else re.escape(c) for c in pattern)


@settings(max_examples=300, deadline=None)
@given(
    pattern=st.text(alphabet="ab*", min_size=1, max_size=7),
    name=st.text(alphabet="ab", max_size=8),
)
def test_pattern_match_agrees_with_regex(pattern: str, name: str) -> None:
    import re

    assert _Pattern(pattern, "t").match(name) == bool(re.fullmatch(_glob_regex(pattern), name))


@pytest.mark.parametrize(
    ("mapping", "needle"),
    [
        ({"": "x"}, "non-empty"),
        ({"gpt": ""}, "non-empty"),
        ({"gpt 4": "x"}, "without spaces"),
        ({"gpt": "gemini *"}, "without spaces"),
        ({"gpt-*": "gemini-*"}, "only allowed in keys"),
        ({"gpt-**": "x"}, "single"),
        ({"GPT-4o": "a", "gpt-4o": "b"}, "mapped twice"),
        ({"models/": "x"}, "names no model"),
        ({"x" * 300: "y"}, "at most 256"),
    ],
)
def test_bad_mapping_is_a_config_error(mapping: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ModelRouter(D, mapping)


def test_bad_default_model() -> None:
    with pytest.raises(ConfigError):
        ModelRouter("gemini-*")
    with pytest.raises(ConfigError):
        ModelRouter("")


def test_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import rawgate.model_router as router_mod

    monkeypatch.setattr(router_mod, "RESOLVE_CACHE_MAX", 16)
    r = ModelRouter(D)
    for i in range(100):
        assert r.resolve(f"name-{i}") == f"name-{i}"
    assert len(r._memo) <= 16


def test_list_models_sources_order_and_no_duplicates() -> None:
    r = ModelRouter(
        D, {"my-fast": "gemini-2.5-flash", "gemini-2.5-pro": "gemini-3-pro", "claude-*": "x"}
    )
    data = r.list_models(["models/gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash"])
    ids = [m["id"] for m in data]
    assert len(ids) == len(set(ids))
    assert ids[:3] == ["gemini-2.5-pro", "gemini-2.5-flash", "my-fast"]
    owners = {m["id"]: m["owned_by"] for m in data}
    assert owners["gemini-2.5-flash"] == "google"
    assert owners["gemini-2.5-pro"] == "rawgate-mapping"  # redirected by a custom key
    assert owners["my-fast"] == "rawgate-mapping"
    assert owners["gpt-4o"] == "rawgate-alias"
    assert "claude-*" not in owners  # patterns are not model ids
    assert set(LISTED_ALIASES) <= set(ids)
    for m in data:
        assert m["object"] == "model" and m["created"] == MODELS_CREATED
        assert set(m) == {"id", "object", "created", "owned_by"}
    assert r.list_models(["gemini-2.5-flash"]) == r.list_models(["gemini-2.5-flash"])


def test_listed_alias_redirected_by_a_pattern_says_mapping() -> None:
    r = ModelRouter(D, {"gpt-*": "gemini-2.5-pro"})
    owners = {m["id"]: m["owned_by"] for m in r.list_models([])}
    assert owners["gpt-4o"] == "rawgate-mapping"
    assert owners["o3"] == "rawgate-alias"


def test_gemini_shorthands_reach_the_preview_models() -> None:
    r = ModelRouter("gemini-2.5-flash")
    assert r.resolve("gemini-3-flash") == "gemini-3-flash-preview"
    assert r.resolve("models/Gemini-3-Pro") == "gemini-3-pro-preview"
    assert r.source("gemini-3-flash") == "shorthand"
    # Custom mapping still wins over a shorthand.
    assert ModelRouter("x", {"gemini-3-flash": "gemini-2.5-pro"}).resolve("gemini-3-flash") == (
        "gemini-2.5-pro"
    )
