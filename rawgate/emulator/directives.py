"""Prompt directives of the Gemini emulator: `[[emu:NAME key=value ...]]` -> `Directive` records.

Invariants:
- Pure text in, records out. A value is JSON when it starts with `{`, `[` or `"` (brackets are
  balanced outside strings, so `]]` inside JSON does not end the directive), else a bare word up
  to whitespace or `]]`: `true`/`false`, an int, a float, or the word itself.
- Unknown directives, unknown arguments and unterminated directives are `ScriptError`s naming the
  problem: a typo in a test's prompt must fail loudly, not be echoed as text.
- Every directive and argument is documented in the README's emulator section; DIRECTIVES is the
  one table both the parser and that section follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["DIRECTIVES", "Directive", "ScriptError", "int_arg", "ms_arg", "parse_directives"]

_OPEN = "[[emu:"

# name -> allowed argument names. The README section documents each one.
DIRECTIVES: dict[str, frozenset[str]] = {
    "reply": frozenset({"text", "chars"}),
    "echo_request": frozenset(),
    "thought": frozenset({"text", "signature"}),
    "tool_call": frozenset({"name", "args", "signature", "id"}),
    "finish": frozenset({"reason", "message"}),
    "block": frozenset({"reason"}),
    "error": frozenset({"status", "message", "retry_delay", "reason", "limit", "html", "times",
                        "for"}),
    "stream_error": frozenset({"after", "status", "message"}),
    "drop": frozenset({"after"}),
    "reset": frozenset(),
    "hang": frozenset(),
    "stall": frozenset({"after"}),
    "delay": frozenset({"ms"}),
    "first_byte": frozenset({"ms"}),
    "drip": frozenset({"ms"}),
    "chunks": frozenset({"n"}),
    "chunk_chars": frozenset({"n"}),
    "quirk": frozenset({"kind"}),
}


class ScriptError(ValueError):
    """A malformed or unknown directive; the message names it."""


@dataclass(slots=True, frozen=True)
class Directive:
    name: str
    args: dict[str, Any]
    raw: str  # the directive's source text, the key of `times=` counters


# ---- directives ---------------------------------------------------------------------------------


def parse_directives(text: str) -> tuple[list[Directive], str]:
    """Directives in `text`, and `text` with them removed (then stripped)."""
    if _OPEN not in text:
        return [], text
    out: list[Directive] = []
    kept: list[str] = []
    pos = 0
    while (start := text.find(_OPEN, pos)) >= 0:
        kept.append(text[pos:start])
        d, pos = _parse_one(text, start)
        out.append(d)
    kept.append(text[pos:])
    return out, "".join(kept).strip()


def _parse_one(text: str, start: int) -> tuple[Directive, int]:
    i = start + len(_OPEN)
    j = i
    while j < len(text) and (text[j].isalnum() or text[j] == "_"):
        j += 1
    name = text[i:j]
    if name not in DIRECTIVES:
        raise ScriptError(f"unknown emulator directive {name!r}; known: {', '.join(DIRECTIVES)}")
    args: dict[str, Any] = {}
    i = j
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if text.startswith("]]", i):
            i += 2
            break
        if i >= len(text):
            raise ScriptError(f"emulator directive {name!r} is not closed with ]]")
        eq = text.find("=", i)
        key = text[i:eq] if eq > 0 else ""
        if not key.isidentifier():
            near = text[i : i + 20]
            raise ScriptError(f"emulator directive {name!r}: expected key=value at {near!r}")
        if key not in DIRECTIVES[name]:
            allowed = ", ".join(sorted(DIRECTIVES[name])) or "none"
            raise ScriptError(f"emulator directive {name!r}: unknown argument {key!r} ({allowed})")
        args[key], i = _parse_value(text, eq + 1, name)
    return Directive(name, args, text[start:i]), i


def _parse_value(text: str, i: int, name: str) -> tuple[Any, int]:
    if i < len(text) and text[i] in "{[\"":
        end = _json_end(text, i)
        if end < 0:
            raise ScriptError(f"emulator directive {name!r}: unterminated JSON value")
        try:
            return orjson.loads(text[i:end]), end
        except orjson.JSONDecodeError as e:
            raise ScriptError(f"emulator directive {name!r}: bad JSON value: {e}") from None
    j = i
    while j < len(text) and not text[j].isspace() and not text.startswith("]]", j):
        j += 1
    word = text[i:j]
    if word in ("true", "false"):
        return word == "true", j
    try:
        return (float(word) if "." in word else int(word)), j
    except ValueError:
        return word, j


def _json_end(text: str, i: int) -> int:
    """Index just past the JSON value starting at text[i] (brackets balanced outside strings)."""
    depth = 0
    in_str = False
    k = i
    while k < len(text):
        c = text[k]
        if in_str:
            if c == "\\":
                k += 1
            elif c == '"':
                in_str = False
                if depth == 0:
                    return k + 1
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return k + 1
        k += 1
    return -1


def int_arg(d: Directive, key: str, default: int, lo: int = 0, hi: int = 1 << 31) -> int:
    v = d.args.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ScriptError(f"emulator directive {d.name!r}: {key} must be an integer {lo}..{hi}")
    return v


def ms_arg(d: Directive) -> float:
    v = d.args.get("ms", 0)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 600_000:
        raise ScriptError(f"emulator directive {d.name!r}: ms must be a number 0..600000")
    return float(v) / 1000.0
