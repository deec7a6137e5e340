"""The package tree's dependency rules, checked on every import in rawgate/ (also the ones inside
functions): a forbidden import fails here, naming the file, the line and the rule.

    base (the top-level modules: errors, config, logs, metrics, compat, seam, ...)
      < translate | accounts | upstream | http      (siblings: never import each other)
      < state | monitor                             (shared state; the request log)
      < gateway | emulator                          (siblings: never import each other)
      < cli                                         (and rawgate/__main__.py)

translate is pure: it never imports anyio, asyncio, socket, ssl or any other I/O module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RAWGATE = Path(__file__).resolve().parents[2] / "rawgate"

LAYER = {
    "base": 0,
    "translate": 1,
    "accounts": 1,
    "upstream": 1,
    "http": 1,
    "state": 2,
    "monitor": 2,
    "gateway": 3,
    "emulator": 3,
    "cli": 4,
}
IO_MODULES = {"anyio", "asyncio", "socket", "ssl", "selectors", "subprocess", "uvloop", "sniffio"}


def package_of(module: str) -> str:
    """`rawgate.http.listener` -> "http"; top-level modules are "base" (`__main__` is the cli)."""
    parts = module.split(".")
    if parts[0] != "rawgate":
        raise ValueError(module)
    if len(parts) == 1:
        return "base"
    if parts[1] == "__main__":
        return "cli"
    sub = RAWGATE / parts[1]
    return parts[1] if sub.is_dir() else "base"


def module_name(path: Path) -> str:
    rel = path.relative_to(RAWGATE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, nested ones included."""
    out: list[tuple[int, str]] = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "rawgate":  # from rawgate import x: x may be a subpackage
                for a in node.names:
                    target = f"rawgate.{a.name}"
                    sub = RAWGATE / a.name
                    out.append(
                        (
                            node.lineno,
                            target
                            if sub.exists() or sub.with_suffix(".py").exists()
                            else "rawgate",
                        )
                    )
            else:
                out.append((node.lineno, node.module))
    return out


def violations(path: Path, imports: list[tuple[int, str]]) -> list[str]:
    me = package_of(module_name(path))
    bad = []
    for line, target in imports:
        where = f"rawgate/{path.relative_to(RAWGATE).as_posix()}:{line}"
        top = target.split(".")[0]
        if me == "translate" and top in IO_MODULES:
            bad.append(f"{where}: translate is pure and may not import {target}")
            continue
        if top != "rawgate":
            continue
        other = package_of(target)
        if other == me:
            continue
        if LAYER[other] > LAYER[me] or (LAYER[other] == LAYER[me]):
            rule = (
                f"{me} and {other} are siblings and never import each other"
                if LAYER[other] == LAYER[me]
                else f"{me} (layer {LAYER[me]}) may not import {other} (layer {LAYER[other]})"
            )
            bad.append(f"{where}: imports {target}: {rule}")
    return bad


def all_files() -> list[Path]:
    return sorted(RAWGATE.rglob("*.py"))


def test_every_package_has_a_layer() -> None:
    subs = {p.name for p in RAWGATE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subs <= set(LAYER), f"new subpackage(s) without a layer: {subs - set(LAYER)}"


def test_the_package_tree_follows_its_dependency_rules() -> None:
    found = [v for p in all_files() for v in violations(p, imports_of(p))]
    assert not found, "forbidden imports:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("file", "target", "why"),
    [
        ("translate/mapping.py", "anyio", "translate is pure"),
        ("translate/mapping.py", "rawgate.upstream.pool", "siblings"),
        ("config.py", "rawgate.http.app", "base (layer 0) may not import http"),
        ("http/app.py", "rawgate.gateway.core", "http (layer 1) may not import gateway"),
        ("gateway/core.py", "rawgate.emulator.server", "siblings"),
        ("emulator/server.py", "rawgate.cli.stack", "emulator (layer 3) may not import cli"),
        ("state/store.py", "rawgate.gateway.core", "state (layer 2) may not import gateway"),
    ],
)
def test_a_forbidden_import_fails(file: str, target: str, why: str) -> None:
    got = violations(RAWGATE / file, [(1, target)])
    assert len(got) == 1 and why in got[0], got


def test_allowed_imports_pass() -> None:
    assert not violations(RAWGATE / "gateway/core.py", [(1, "rawgate.http.app")])
    assert not violations(RAWGATE / "cli/stack.py", [(1, "rawgate.emulator.server")])
    assert not violations(RAWGATE / "translate/mapping.py", [(1, "rawgate.errors")])
    assert not violations(RAWGATE / "http/h2_server.py", [(1, "rawgate.http.h1_server")])
