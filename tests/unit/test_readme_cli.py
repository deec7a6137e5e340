"""Every `rawgate <command> [action] --flag` the READMEs show in code (fenced blocks and inline
code spans) exists in the real argparse parser: the command, the action of `accounts` / `keys`,
and each long flag (on the command or on one of the actions named). A renamed or removed flag
fails here instead of misleading a reader."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from rawgate.__main__ import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = {"README.md": ROOT / "README.md", "bench/README.md": ROOT / "bench" / "README.md"}

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_SPAN = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # inline code, at most one line break
# A command starts a line or span, or follows `&&`, `;`, `|`, `(`, `-m`, an env assignment or
# a venv's bin/ (not "ruff check rawgate tests").
_MENTION = re.compile(
    r"(?:^\s*|(?:&&|;|\||\(|-m|\S=\S*)\s+|bin/)rawgate[ \t]+([a-z][\w-]*)([^\n]*)"
)
_WORD = re.compile(r"[a-z][a-z-]*\Z")


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _flags(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings if s.startswith("--")}


def code_lines(markdown: str) -> list[str]:
    """Shell-ish lines of code: fenced blocks (comments cut, continuation lines joined) and
    inline spans (a span broken over two lines joined)."""
    out: list[str] = []
    for block in _FENCE.findall(markdown):
        joined: list[str] = []
        for raw in block.splitlines():
            line = raw.split(" #", 1)[0].rstrip()
            if joined and (joined[-1].endswith("\\") or re.match(r"\s+[\[-]", raw)):
                joined[-1] = joined[-1].rstrip("\\") + " " + line.strip()
            else:
                joined.append(line)
        out.extend(joined)
    rest = _FENCE.sub("", markdown)
    out.extend(span.replace("\n", " ") for span in _SPAN.findall(rest))
    return out


def mentions(markdown: str) -> list[tuple[str, list[str], list[str]]]:
    """(command, actions, long flags) of each `rawgate COMMAND ...` in code."""
    found = []
    for line in code_lines(markdown):
        for m in _MENTION.finditer(line):
            tokens = [t.strip("[]|,") for t in re.split(r"[\s|\[\]]+", m.group(2))]
            words = m.group(2).replace("[", " ").replace("]", " ").split()
            actions = []
            expect_action = True
            for w in words:
                if expect_action and _WORD.match(w):
                    actions.append(w)
                expect_action = w == "|"
            flags = [t.split("=", 1)[0] for t in tokens if re.match(r"--[a-z]", t)]
            found.append((m.group(1), actions, flags))
    return found


def test_extraction() -> None:
    md = (
        "run `rawgate keys disable NAME | enable NAME` or\n"
        "```sh\nrawgate accounts login [--no-browser] [--email ADDR]  # a comment --nope\n"
        "rawgate emulate [--host H]\n                [--port 8046]\n```\n"
    )
    got = mentions(md)
    assert ("keys", ["disable", "enable"], []) in got
    assert ("accounts", ["login"], ["--no-browser", "--email"]) in got
    assert ("emulate", [], ["--host", "--port"]) in got


@pytest.mark.parametrize("name", sorted(DOCS))
def test_readme_commands_exist(name: str) -> None:
    top = build_parser()
    commands = _subparsers(top)
    found = mentions(DOCS[name].read_text(encoding="utf-8"))
    assert found, f"{name}: no `rawgate COMMAND` found: the extraction is wrong"
    wrong = []
    for cmd, actions, flags in found:
        sub = commands.get(cmd)
        if sub is None:
            wrong.append(f"rawgate {cmd}: no such command (have {sorted(commands)})")
            continue
        known_actions = _subparsers(sub)
        allowed = _flags(sub)
        for act in actions if known_actions else []:
            if act not in known_actions:
                wrong.append(f"rawgate {cmd} {act}: no such action (have {sorted(known_actions)})")
            else:
                allowed |= _flags(known_actions[act])
        wrong.extend(
            f"rawgate {cmd} {' '.join(actions)} {flag}: no such flag"
            for flag in flags
            if flag not in allowed
        )
    assert not wrong, f"{name}:\n" + "\n".join(sorted(set(wrong)))
