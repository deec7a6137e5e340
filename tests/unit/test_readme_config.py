"""The README's config.toml tables match config.py: one table per section, every setting listed
with its real default, no row for a setting that does not exist. A setting added without its
row, or a default changed without the README, fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from rawgate.config import Config

README = Path(__file__).resolve().parents[2] / "README.md"
SECTIONS = [f.name for f in msgspec.structs.fields(Config())]


def table(text: str, section: str) -> dict[str, str]:
    """key -> default cell of the table under the line "`[section]`"."""
    head = r"^`\[" + re.escape(section) + r"\]`\n\n"
    m = re.search(head + r"\| key \|.*\n\|---.*\n((?:\|.*\n)+)", text, re.M)
    assert m, f"README has no `[{section}]` table"
    rows = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1].strip("`")
    return rows


def shown(value: Any) -> set[str]:
    """How the README may write a default: TOML-ish, with a unit note after the number."""
    if isinstance(value, bool):
        return {str(value).lower()}
    if isinstance(value, str):
        return {f'"{value}"'}
    if isinstance(value, (tuple, list)):
        return {"[" + ", ".join(f'"{v}"' for v in value) + "]"}
    if isinstance(value, dict):
        return {"{}"} if not value else {str(value)}
    return {str(value)}


@pytest.mark.parametrize("section", SECTIONS)
def test_config_table_matches_config_py(section: str) -> None:
    rows = table(README.read_text(encoding="utf-8"), section)
    obj = getattr(Config(), section)
    real = {f.name: getattr(obj, f.name) for f in msgspec.structs.fields(obj)}
    assert sorted(set(real) - set(rows)) == [], f"[{section}] settings missing in README"
    assert sorted(set(rows) - set(real)) == [], f"[{section}] README rows with no setting"
    wrong = {
        k: (rows[k], real[k])
        for k in real
        if rows[k].split(" (")[0] not in shown(real[k])
    }
    assert not wrong, f"[{section}] README default vs config.py: {wrong}"
