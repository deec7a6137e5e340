"""Every in-page link of the READMEs (`](#anchor)`) and every link from README.md into
bench/README.md (`](bench/README.md#anchor)`) names a heading that exists, by GitHub's slug
rule: lowercase, punctuation other than `-` and `_` dropped, each space a `-`, and a repeated
heading numbered `-1`, `-2`. Headings inside fenced code blocks are not headings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = {"README.md": ROOT / "README.md", "bench/README.md": ROOT / "bench" / "README.md"}

_LINK = re.compile(r"\]\(([^)\s#]*)#([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def slug(text: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"`|\*\*|__|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m is None:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(markdown: str) -> list[tuple[str, str]]:
    """(target file or "", anchor) of every link carrying a fragment, code blocks excluded."""
    out: list[tuple[str, str]] = []
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.extend(_LINK.findall(line))
    return out


def test_slug_rule() -> None:
    assert slug("Client keys and limits") == "client-keys-and-limits"
    assert slug("config.toml") == "configtoml"
    assert slug("Results (reference run)") == "results-reference-run"
    assert slug("The emulator alone (`python -m bench.emulator_alone`)") == (
        "the-emulator-alone-python--m-benchemulator_alone"
    )
    assert anchors("# A\n## A\n```\n# A\n```\n") == {"a", "a-1"}


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_anchor_link_resolves(name: str) -> None:
    path = DOCS[name]
    text = path.read_text(encoding="utf-8")
    known = {key: anchors(p.read_text(encoding="utf-8")) for key, p in DOCS.items()}
    broken = []
    found = links(text)
    assert found, f"{name}: no anchor link found: the pattern is wrong"
    for target, anchor in found:
        if target == "":
            doc = name
        else:
            resolved = (path.parent / target).resolve()
            doc = next((k for k, p in DOCS.items() if p.resolve() == resolved), "")
            if not doc:
                continue  # a link into a file this test does not index
        if anchor not in known[doc]:
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{name}: links to missing headings: {broken}"


def test_no_duplicate_top_level_sections() -> None:
    """A repeated `##` heading gets a numbered anchor nobody links to by name: give each its
    own title."""
    for name, path in DOCS.items():
        titles = [
            line for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("## ")
        ]
        dupes = sorted({t for t in titles if titles.count(t) > 1})
        assert not dupes, f"{name}: repeated sections {dupes}"


_FILE_LINK = re.compile(r"\]\(([^)\s#:]+)(?:#[^)\s]*)?\)")


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_relative_file_link_exists(name: str) -> None:
    """Pictures and files the READMEs link to (`](tests/e2e/dashboard.png)`, `](results/)`)
    are in the tree; web addresses are not checked."""
    path = DOCS[name]
    fenced = False
    missing: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        missing.extend(
            t for t in _FILE_LINK.findall(line) if not (path.parent / t).exists()
        )
    assert not missing, f"{name}: links to missing files: {missing}"


def test_contents_lists_every_section_in_order() -> None:
    """README's Contents: one link per `##` / `###` heading after it, in order, nested by level."""
    text = DOCS["README.md"].read_text(encoding="utf-8")
    _, _, body = text.partition("## Contents\n")
    assert body, "README.md has no '## Contents'"
    toc, _, rest = body.strip("\n").partition("\n\n")
    listed = [
        (len(m.group(1)) // 2, m.group(2))
        for m in re.finditer(r"^( *)- \[[^\]]*\]\(#([^)]+)\)$", toc, re.M)
    ]
    wanted = []
    fenced = False
    for line in rest.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^(##|###) (.*)$", line)
        if m:
            wanted.append((len(m.group(1)) - 2, slug(m.group(2))))
    assert listed == wanted
