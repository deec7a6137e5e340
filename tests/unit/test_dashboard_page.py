"""The dashboard page file itself (rawgate/monitor/ui/index.html), read as bytes: one self-contained
document (no external resource of any kind, which the CSP served with it would block anyway), data
written as text only, the key never in a cookie or a URL, the element ids the browser test and
users' scripts rely on, and a script that parses (node --check, when node is there).
The page's behaviour is tested in a real browser: tests/e2e/test_dashboard_browser.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import rawgate

PAGE = Path(rawgate.__file__).parent / "monitor" / "ui" / "index.html"
MAX_BYTES = 96 * 1024  # read once at start and sent whole per GET /ui


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script += data


def _parse() -> _Tags:
    p = _Tags()
    p.feed(PAGE.read_text(encoding="utf-8"))
    return p


def test_one_self_contained_file() -> None:
    raw = PAGE.read_bytes()
    assert 0 < len(raw) <= MAX_BYTES
    raw.decode("utf-8")  # strict
    p = _parse()
    names = [t for t, _ in p.tags]
    assert names.count("script") == 1 and names.count("style") == 1
    for tag, attrs in p.tags:
        assert "src" not in attrs, tag  # no script, image or frame from anywhere
        assert tag != "link" and tag != "iframe" and tag != "base", tag
        href = attrs.get("href")
        assert href is None or href.startswith("#"), (tag, href)
    # The only URL in the file is the SVG namespace (an identifier, never fetched).
    urls = set(re.findall(rb"[a-z]+://[^\s\"'<>)]+", raw))
    assert urls <= {b"http://www.w3.org/2000/svg"}, urls
    assert b"@import" not in raw and b"url(" not in raw


def test_data_reaches_the_dom_as_text_only() -> None:
    script = _parse().script
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "srcdoc"):  # fmt: skip
        assert sink not in script, sink
    # The key: from the fragment into sessionStorage and the Authorization header; the address
    # bar is cleaned; never a cookie, localStorage or a query parameter.
    assert "document.cookie" not in script and "localStorage" not in script
    assert 'credentials: "omit"' in script
    assert '"Authorization": "Bearer " + key' in script
    assert "history.replaceState" in script and "sessionStorage.setItem" in script
    assert not re.search(r"[?&]key=", script)
    # Only this server's admin API is fetched.
    assert script.count("fetch(") == 1  # in api(), the one way out
    paths = re.findall(r"api\(\"[A-Z]+\", [`\"]([^`\"]+)", script)
    paths += re.findall(r"const path = `([^`]+)", script)
    assert len(paths) > 5
    for path in paths:
        assert path.startswith(("/admin/", "${path}")), path


def test_the_ids_tests_rely_on() -> None:
    raw = PAGE.read_text(encoding="utf-8")
    for testid in ("dashboard", "key-form", "key-input", "key-message", "instance-id",
                   "instance-version", "instance-uptime", "instance-backend", "instance-state",
                   "emulator-badge", "fleet-note", "log-status", "accounts-table", "rates-chart",
                   "latency-chart", "usage-today", "usage-7d", "usage-model", "usage-account",
                   "usage-key", "requests-table", "filter-status", "filter-model", "filter-key",
                   "filter-account", "keys-table", "key-add-form", "new-key",
                   "config"):  # fmt: skip
        assert f'data-testid="{testid}"' in raw, testid
    for pattern in ("account-row-${label}", "account-state-${label}", "account-toggle-${label}",
                    "account-countdown-${label}", "key-row-${name}"):  # fmt: skip
        assert f"`{pattern}`" in raw, pattern
    # Element ids are unique.
    ids = [a["id"] for _, a in _parse().tags if a.get("id")]
    assert len(ids) == len(set(ids))


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_script_parses(tmp_path: Path) -> None:
    js = tmp_path / "page.js"
    js.write_text(_parse().script, encoding="utf-8")
    r = subprocess.run(["node", "--check", str(js)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
