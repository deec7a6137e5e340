"""The dashboard (GET /ui) in a real headless browser: Debian's Chromium (/usr/bin/chromium, or
RAWGATE_CHROMIUM) driven by playwright's Python driver (never `playwright install`: no browser is
downloaded), against a real `rawgate serve --emulate` subprocess on 127.0.0.1 with three API-key
accounts (A, B, C) and the admin key it generates and prints.

What a user sees is asserted in the page (data-testid attributes of rawgate/monitor/ui/index.html),
what the gateway does in the responses (X-Account-Email, status). Waiting is playwright's `expect`
(polls the DOM until true or a generous deadline): no assertion on wall time.

RAWGATE_SCREENSHOT=1 also saves the populated dashboard at 1280x900 to tests/e2e/dashboard.png
(the README's picture).
"""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai import OpenAI

from tests.helpers_redis import REDIS_BIN, RedisServer

CHROMIUM = os.environ.get("RAWGATE_CHROMIUM", "/usr/bin/chromium")
if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does), so no browser test",
        allow_module_level=True,
    )
try:
    from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extra pins it
    pytest.skip("playwright is not installed (pip install -e '.[test]')", allow_module_level=True)

# A browser and one or two gateway processes per test: more than the suite's 60 s default on a
# loaded machine (each step waits on the page, none on the clock).
pytestmark = pytest.mark.timeout(180)

WAIT_S = 20.0
EXPECT_MS = 15_000  # playwright's polling deadline for one DOM expectation
SCREENSHOT = Path(__file__).with_name("dashboard.png")
ACCOUNTS = {
    "A": "key-aaaaaaaaaaaaaaaaaaaaaaaa",
    "B": "key-bbbbbbbbbbbbbbbbbbbbbbbb",
    "C": "key-cccccccccccccccccccccccc",
}


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAWGATE_")}
    env["RAWGATE_HOME"] = str(home)
    env.update(extra)
    return env


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    port: int
    log: Path  # stderr: banner lines, the dashboard URL, the access log
    dashboard_url: str  # http://127.0.0.1:PORT/ui#key=...

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_key(self) -> str:
        return self.dashboard_url.split("#key=", 1)[1]

    def stderr(self) -> str:
        return self.log.read_text()

    def client(self, key: str = "sk-anything") -> OpenAI:
        return OpenAI(base_url=f"{self.origin}/v1", api_key=key, max_retries=0, timeout=WAIT_S)

    def chat(self, text: str = "hi", *, key: str = "sk-anything") -> tuple[int, str]:
        """One non-stream chat through the openai SDK: (status, X-Account-Email)."""
        raw = self.client(key).chat.completions.with_raw_response.create(
            model="gemini-2.5-flash", messages=[{"role": "user", "content": text}]
        )
        raw.parse()
        return raw.status_code, raw.headers.get("x-account-email", "")

    def status_of_chat(self, text: str = "hi") -> int:
        """The status of one chat over http.client (also for errors the SDK would raise on)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        try:
            body = orjson.dumps(
                {"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": text}]}
            )
            c.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            r = c.getresponse()
            r.read()
            return r.status
        finally:
            c.close()


def _wait_for(pred: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _add_accounts(home: Path, **env: str) -> None:
    """Accounts A, B, C with the CLI: in home/accounts.json, or in Redis with its settings."""
    home.mkdir(exist_ok=True)
    for label, key in ACCOUNTS.items():
        subprocess.run(
            [sys.executable, "-m", "rawgate", "accounts", "add", "--api-key", key,
             "--label", label],
            env=_env(home, **env), check=True, capture_output=True, timeout=WAIT_S,
        )  # fmt: skip


@contextmanager
def _serve(home: Path, **env: str) -> Iterator[Gateway]:
    """`rawgate serve --emulate` on a free port with the accounts in `home`."""
    log = home / "stderr.log"
    with log.open("w") as err:
        p = subprocess.Popen(
            [sys.executable, "-m", "rawgate", "serve", "--emulate", "--host", "127.0.0.1",
             "--port", "0"],
            env=_env(home, **env), stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        assert m, (line, log.read_text())
        port = int(m.group(1))
        url_re = re.compile(r"rawgate: dashboard: (http://127\.0\.0\.1:\d+/ui#key=\S+)")
        _wait_for(lambda: url_re.search(log.read_text()), "no dashboard URL on stderr")
        found = url_re.search(log.read_text())
        assert found is not None
        url = found.group(1)
        assert url.startswith(f"http://127.0.0.1:{port}/ui#key=")
        key_file = home / "admin_key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.read_text().strip() == url.split("#key=", 1)[1]
        yield Gateway(p, port, log, url)
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                p.kill()
        p.communicate(timeout=WAIT_S)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    _add_accounts(tmp_path)
    with _serve(tmp_path) as gw:
        yield gw


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    b = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
    try:
        yield b
    finally:
        b.close()


@dataclass
class Seen:
    """Every request the page made, and every script error it raised."""

    admin: list[tuple[str, str, dict[str, str]]]  # (method, url, headers)
    errors: list[str]


@pytest.fixture
def page(browser: Browser) -> Iterator[tuple[Page, Seen]]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    seen = Seen([], [])
    pg.on("pageerror", lambda e: seen.errors.append(str(e)))

    def on_request(req: Any) -> None:
        if "/admin/" in req.url:
            seen.admin.append((req.method, req.url, req.headers))

    pg.on("request", on_request)
    try:
        yield pg, seen
    finally:
        ctx.close()


def _open(pg: Page, gw: Gateway) -> None:
    pg.goto(gw.dashboard_url)
    expect(pg.get_by_test_id("dashboard")).to_be_visible(timeout=EXPECT_MS)


def _state(pg: Page, label: str) -> Any:
    return pg.get_by_test_id(f"account-state-{label}")


# ---- the page with the key: accounts, live updates, a cooldown, attempts ---------------------


def test_dashboard_shows_the_gateway_live(gateway: Gateway, page: tuple[Page, Seen]) -> None:
    pg, seen = page
    gw = gateway
    _open(pg, gw)
    # The key left the address bar at once and lives in this tab's sessionStorage only.
    assert "#key" not in pg.url and gw.admin_key not in pg.url
    assert pg.evaluate("sessionStorage.getItem('rawgate.admin_key')") == gw.admin_key
    assert pg.evaluate("document.cookie") == ""
    # Header: this instance, the emulator, the local store (not fleet-wide).
    expect(pg.get_by_test_id("instance-version")).not_to_have_text("\u2013")  # the placeholder dash
    expect(pg.get_by_test_id("instance-id")).to_contain_text(":")
    expect(pg.get_by_test_id("instance-backend")).to_have_text("local")
    expect(pg.get_by_test_id("instance-state")).to_have_text("state ok")
    expect(pg.get_by_test_id("emulator-badge")).to_be_visible()
    expect(pg.get_by_test_id("fleet-note")).to_be_hidden()
    expect(pg.get_by_test_id("log-status")).to_contain_text("0 dropped")
    for label in ACCOUNTS:
        expect(pg.get_by_test_id(f"account-row-{label}")).to_be_visible()
        expect(_state(pg, label)).to_have_attribute("data-state", "up")
        expect(pg.get_by_test_id(f"account-toggle-{label}")).to_have_text("Disable")
    expect(pg.get_by_test_id("requests-table")).to_contain_text("no request matches")

    # Requests made with the openai SDK show up without a reload.
    served = [gw.chat(f"hello {i}")[1] for i in range(6)]
    assert sorted(served) == ["A", "A", "B", "B", "C", "C"]  # round robin
    for label in ACCOUNTS:
        expect(pg.get_by_test_id(f"account-requests-{label}")).to_have_text("2", timeout=EXPECT_MS)
    expect(pg.get_by_test_id("request-row")).to_have_count(6, timeout=EXPECT_MS)
    expect(pg.get_by_test_id("rates-chart")).to_have_attribute("data-total", "6")
    expect(pg.locator("[data-testid=rates-chart] polyline, [data-testid=rates-chart] circle")
           .first).to_be_attached()  # fmt: skip
    expect(pg.locator("[data-testid=usage-model-row][data-name='gemini-2.5-flash']")
           ).to_be_visible(timeout=EXPECT_MS)  # fmt: skip
    expect(pg.locator("[data-testid=usage-account] tbody tr")).to_have_count(3)

    # An emulator 429 with RetryInfo on account A: the request rotates (200 from another
    # account), A shows cooling with the reason and a countdown that runs down in the page.
    cool_a = f"[[emu:error status=429 retry_delay=45s limit=10 for={ACCOUNTS['A']}]] hi"
    answers = [gw.chat(cool_a) for _ in range(3)]  # round robin meets A once in three
    assert all(status == 200 and acc in ("B", "C") for status, acc in answers), answers
    expect(_state(pg, "A")).to_have_attribute("data-state", "cooling", timeout=EXPECT_MS)
    expect(_state(pg, "A")).to_contain_text("cooling")
    expect(_state(pg, "A")).to_contain_text("429")
    countdown = pg.get_by_test_id("account-countdown-A").first
    expect(countdown).to_have_text(re.compile(r"^\d+s$"))
    first = int(countdown.inner_text()[:-1])
    assert 0 < first <= 45
    expect(countdown).not_to_have_text(f"{first}s", timeout=EXPECT_MS)  # it counts down
    assert int(countdown.inner_text()[:-1]) < first
    expect(_state(pg, "B")).to_have_attribute("data-state", "up")

    # The rotated request opens to its attempts: A answered 429, then another account 200.
    expect(pg.get_by_test_id("request-row")).to_have_count(9, timeout=EXPECT_MS)
    rotated = pg.locator("[data-testid=request-row]").filter(
        has=pg.locator("[data-testid=request-attempt-count]", has_text=re.compile(r"^2$"))
    )
    expect(rotated).to_have_count(1, timeout=EXPECT_MS)
    rotated.get_by_test_id("request-expand").click()
    attempts = pg.locator("[data-testid=request-detail]:visible [data-testid=request-attempts] li")
    expect(attempts).to_have_count(2)
    expect(attempts.nth(0)).to_contain_text("A")
    expect(attempts.nth(0)).to_contain_text("429")
    expect(attempts.nth(1)).to_contain_text("200")
    # The expanded row stays open across the next refreshes.
    gw.chat("one more")
    expect(pg.get_by_test_id("request-row")).to_have_count(10, timeout=EXPECT_MS)
    expect(attempts).to_have_count(2)

    # Filters: only the account-A rows, then only errors (none: every request ended 200).
    pg.get_by_test_id("filter-account").fill("A")
    pg.get_by_test_id("filter-apply").click()
    expect(pg.get_by_test_id("request-account")).not_to_have_count(10, timeout=EXPECT_MS)
    for cell in pg.get_by_test_id("request-account").all():
        assert cell.inner_text() == "A"
    pg.get_by_test_id("filter-clear").click()
    pg.get_by_test_id("filter-status").select_option("5xx")
    expect(pg.get_by_test_id("requests-table")).to_contain_text("no request matches",
                                                               timeout=EXPECT_MS)  # fmt: skip
    pg.get_by_test_id("filter-status").select_option("")
    expect(pg.get_by_test_id("request-row")).to_have_count(10, timeout=EXPECT_MS)

    # Usage for 7 days includes today's; the running config carries no secret.
    pg.get_by_test_id("usage-7d").click()
    expect(pg.get_by_test_id("usage-7d")).to_have_attribute("aria-pressed", "true")
    expect(pg.locator("[data-testid=usage-model-row][data-name='gemini-2.5-flash']")
           ).to_be_visible(timeout=EXPECT_MS)  # fmt: skip
    expect(pg.get_by_test_id("config")).to_contain_text("[server]", timeout=EXPECT_MS)
    config_text = pg.get_by_test_id("config").inner_text()
    assert gw.admin_key not in config_text
    assert not any(k in config_text for k in ACCOUNTS.values())

    if os.environ.get("RAWGATE_SCREENSHOT") == "1":
        pg.get_by_test_id("usage-today").click()
        expect(pg.get_by_test_id("usage-sub")).to_contain_text("today", timeout=EXPECT_MS)
        rotated.get_by_test_id("request-expand").click()  # the filters closed it
        pg.set_viewport_size({"width": 1280, "height": 900})
        pg.evaluate("window.scrollTo(0, 0)")
        pg.screenshot(path=str(SCREENSHOT))

    # No field shows as a JavaScript artefact.
    for testid in ("accounts-table", "requests-table", "usage-model", "last-minute"):
        text = pg.get_by_test_id(testid).inner_text()
        assert not re.search(r"\b(null|undefined|NaN|\[object)", text), (testid, text)

    # Every admin call carried the key in the Authorization header, never in a URL or a cookie.
    assert seen.admin
    for method, url, headers in seen.admin:
        assert headers.get("authorization") == f"Bearer {gw.admin_key}", (method, url)
        assert gw.admin_key not in url and "cookie" not in headers
    assert seen.errors == []


def test_polling_pauses_while_the_tab_is_hidden(gateway: Gateway, page: tuple[Page, Seen]) -> None:
    pg, seen = page
    _open(pg, gateway)
    expect(pg.get_by_test_id("live-status")).to_contain_text("live")

    def overviews() -> int:
        return sum(1 for _, url, _ in seen.admin if url.endswith("/admin/overview"))

    set_hidden = """(hidden) => {
        Object.defineProperty(document, "hidden", {value: hidden, configurable: true});
        document.dispatchEvent(new Event("visibilitychange"));
    }"""
    pg.evaluate(set_hidden, True)
    expect(pg.get_by_test_id("live-status")).to_have_text("paused (tab hidden)")
    paused_at = overviews()
    pg.wait_for_timeout(3 * 2000)  # three poll periods
    assert overviews() <= paused_at + 1  # at most the one already on its way
    gateway.chat()
    pg.evaluate(set_hidden, False)  # back: polls at once, and the request shows
    expect(pg.get_by_test_id("live-status")).to_contain_text("live", timeout=EXPECT_MS)
    expect(pg.get_by_test_id("request-row")).to_have_count(1, timeout=EXPECT_MS)
    assert overviews() > paused_at
    assert seen.errors == []


# ---- actions: disable / enable an account -----------------------------------------------------


def _toggle(pg: Page, label: str, want: str) -> None:
    pg.get_by_test_id(f"account-toggle-{label}").click()
    expect(_state(pg, label)).to_have_attribute("data-state", want, timeout=EXPECT_MS)


def test_disable_from_the_page_takes_effect_on_the_next_request(
    gateway: Gateway, page: tuple[Page, Seen]
) -> None:
    pg, seen = page
    gw = gateway
    _open(pg, gw)
    assert sorted(gw.chat()[1] for _ in range(3)) == ["A", "B", "C"]
    _toggle(pg, "A", "disabled")
    expect(pg.get_by_test_id("account-toggle-A")).to_have_text("Enable")
    expect(_state(pg, "A")).to_contain_text("disabled")
    # The next requests go elsewhere: A never answers while disabled.
    assert {gw.chat()[1] for _ in range(4)} == {"B", "C"}
    _toggle(pg, "B", "disabled")
    assert [gw.chat()[1] for _ in range(3)] == ["C", "C", "C"]
    # The last one disabled: no account left, 503.
    _toggle(pg, "C", "disabled")
    assert gw.status_of_chat() == 503
    # Enabled again from the page: it serves the very next request.
    _toggle(pg, "C", "up")
    assert gw.chat() == (200, "C")
    _toggle(pg, "A", "up")
    assert {gw.chat()[1] for _ in range(4)} == {"A", "C"}
    # A reason set elsewhere (here the API itself) that looks like HTML shows as text.
    markup = '<img src=x onerror="window.__owned=1"><b>bold</b>'
    c = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=WAIT_S)
    try:
        c.request(
            "POST",
            "/admin/accounts/C/disable",
            orjson.dumps({"reason": markup}),
            {"authorization": f"Bearer {gw.admin_key}", "content-type": "application/json"},
        )
        r = c.getresponse()
        r.read()
        assert r.status == 200
    finally:
        c.close()
    expect(_state(pg, "C")).to_contain_text(markup, timeout=EXPECT_MS)
    assert pg.locator("[data-testid=accounts-table] img").count() == 0
    assert pg.locator("[data-testid=accounts-table] .reason b").count() == 0
    assert pg.evaluate("window.__owned") is None
    assert seen.errors == []


# ---- without the key: the form and no data ------------------------------------------------------


def test_without_the_key_the_page_asks_for_it_and_shows_no_data(
    gateway: Gateway, page: tuple[Page, Seen]
) -> None:
    pg, seen = page
    gw = gateway
    gw.chat()  # there is data to leak
    pg.goto(f"{gw.origin}/ui")
    expect(pg.get_by_test_id("key-form")).to_be_visible(timeout=EXPECT_MS)
    expect(pg.get_by_test_id("dashboard")).to_be_hidden()
    assert seen.admin == []  # no key, no admin call
    assert pg.locator("[data-testid^=account-row-]").count() == 0
    # A wrong key: refused by the server (401), the form says so, still no data.
    pg.get_by_test_id("key-input").fill("not-the-admin-key")
    pg.get_by_test_id("key-submit").click()
    expect(pg.get_by_test_id("key-message")).to_contain_text("not accepted", timeout=EXPECT_MS)
    expect(pg.get_by_test_id("dashboard")).to_be_hidden()
    assert pg.locator("[data-testid^=account-row-]").count() == 0
    assert pg.evaluate("sessionStorage.getItem('rawgate.admin_key')") is None
    # The right key opens it.
    pg.get_by_test_id("key-input").fill(gw.admin_key)
    pg.get_by_test_id("key-submit").click()
    expect(pg.get_by_test_id("account-row-A")).to_be_visible(timeout=EXPECT_MS)
    # Forget: back to the form, the data gone from the page.
    pg.get_by_test_id("forget-key").click()
    expect(pg.get_by_test_id("key-form")).to_be_visible()
    expect(pg.get_by_test_id("dashboard")).to_be_hidden()
    assert pg.locator("[data-testid^=account-row-]").count() == 0
    assert seen.errors == []


# ---- another origin ------------------------------------------------------------------------------


class _Foreign(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>elsewhere</title><p>another origin</p>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_foreign_origin_cannot_read_the_admin_api(
    gateway: Gateway, page: tuple[Page, Seen]
) -> None:
    pg, _ = page
    gw = gateway
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        pg.goto(f"http://127.0.0.1:{srv.server_address[1]}/")
        # Even a page that holds the key cannot read the API from another origin.
        outcome = pg.evaluate(
            """async ([url, key]) => {
                 try {
                   const r = await fetch(url, {headers: {Authorization: "Bearer " + key}});
                   return "read " + r.status;
                 } catch (e) { return "refused"; }
               }""",
            [f"{gw.origin}/admin/overview", gw.admin_key],
        )
        assert outcome == "refused"
        simple = pg.evaluate(
            """async (url) => {
                 try { const r = await fetch(url); return "read " + r.status; }
                 catch (e) { return "refused"; }
               }""",
            f"{gw.origin}/admin/overview",
        )
        assert simple == "refused"
    finally:
        srv.shutdown()
        srv.server_close()
    # The server itself said 403 to those (and to the same with the key over plain HTTP).
    foreign = f"http://127.0.0.1:{srv.server_address[1]}"
    c = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=WAIT_S)
    try:
        auth = {"origin": foreign, "authorization": f"Bearer {gw.admin_key}"}
        c.request("GET", "/admin/overview", headers=auth)
        r = c.getresponse()
        body = r.read()
        assert r.status == 403 and b"origin_not_allowed" in body
        assert r.getheader("access-control-allow-origin") is None
        c.request("GET", "/ui", headers={"origin": foreign})
        r = c.getresponse()
        r.read()
        assert r.status == 403
        # Same origin: the page itself, with its headers.
        c.request("GET", "/ui", headers={"origin": gw.origin})
        r = c.getresponse()
        page_bytes = r.read()
        assert r.status == 200 and b'data-testid="accounts-table"' in page_bytes
        assert "connect-src 'self'" in (r.getheader("content-security-policy") or "")
        assert r.getheader("x-frame-options") == "DENY"
    finally:
        c.close()


# ---- client keys from the page -------------------------------------------------------------------


def test_client_keys_added_and_removed_from_the_page(
    gateway: Gateway, page: tuple[Page, Seen]
) -> None:
    pg, seen = page
    gw = gateway
    _open(pg, gw)
    assert gw.chat()[0] == 200  # no client key yet: auth.mode auto lets clients in
    pg.get_by_test_id("key-add-name").fill("ci")
    pg.get_by_test_id("key-add-rpm").fill("60")
    pg.get_by_test_id("key-add-models").fill("gemini-*")
    pg.get_by_test_id("key-add-submit").click()
    shown = pg.get_by_test_id("new-key")
    expect(shown).not_to_be_empty(timeout=EXPECT_MS)
    new_key = shown.inner_text().strip()
    row = pg.get_by_test_id("key-row-ci")
    expect(row).to_contain_text("60 rpm", timeout=EXPECT_MS)
    expect(row).to_contain_text("gemini-*")
    assert new_key not in row.inner_text()  # the list shows it masked
    # The key works at once; now a client without one is refused.
    assert gw.chat(key=new_key)[0] == 200
    assert gw.status_of_chat() == 401
    pg.get_by_test_id("new-key-dismiss").click()
    expect(pg.get_by_test_id("new-key-box")).to_be_hidden()
    assert new_key not in pg.locator("body").inner_text()
    # Remove asks first; Cancel keeps it, confirming removes it.
    pg.get_by_test_id("key-remove-ci").click()
    pg.get_by_test_id("key-remove-cancel-ci").click()
    expect(pg.get_by_test_id("key-remove-ci")).to_be_visible()
    pg.get_by_test_id("key-remove-ci").click()
    pg.get_by_test_id("key-remove-confirm-ci").click()
    expect(pg.get_by_test_id("key-row-ci")).to_have_count(0, timeout=EXPECT_MS)
    assert seen.errors == []


# ---- several instances on Redis: fleet-wide accounts and usage, this instance's requests -------


@pytest.mark.skipif(
    REDIS_BIN is None, reason="redis-server not installed (apt-get install redis-server)"
)
def test_on_redis_the_page_shows_the_fleet(tmp_path: Path, page: tuple[Page, Seen]) -> None:
    pg, seen = page
    redis = RedisServer().start()
    try:
        env = {
            "RAWGATE_STATE_BACKEND": "redis",
            "RAWGATE_STATE_REDIS_URL": redis.url,
            "RAWGATE_STATE_KEY_PREFIX": f"ui{os.getpid()}:",
        }
        # The fleet's accounts live in Redis (`rawgate accounts add` acts on the configured
        # backend); both instances serve that one list.
        _add_accounts(tmp_path / "one", **env)
        (tmp_path / "two").mkdir()
        assert not (tmp_path / "one" / "accounts.json").exists()
        with (
            _serve(tmp_path / "one", **env) as one,
            _serve(tmp_path / "two", **env) as two,
        ):
            _open(pg, one)
            expect(pg.get_by_test_id("instance-backend")).to_have_text("redis")
            expect(pg.get_by_test_id("fleet-note")).to_be_visible()
            expect(pg.get_by_test_id("fleet-note")).to_contain_text(
                "fleet-wide accounts and usage from the shared store; requests from this instance"
            )
            # Requests served by the other instance: in the fleet's usage, not in this
            # instance's request log.
            assert {two.chat()[0] for _ in range(3)} == {200}
            expect(
                pg.locator("[data-testid=usage-model-row][data-name='gemini-2.5-flash'] td").nth(1)
            ).to_have_text("3", timeout=EXPECT_MS)
            expect(pg.get_by_test_id("usage-sub")).to_contain_text("fleet-wide")
            expect(pg.get_by_test_id("requests-table")).to_contain_text("no request matches")
            # A cooldown met on the other instance shows here (the shared store's).
            cool_a = f"[[emu:error status=429 retry_delay=45s limit=10 for={ACCOUNTS['A']}]] hi"
            assert all(two.chat(cool_a)[0] == 200 for _ in range(3))
            expect(_state(pg, "A")).to_have_attribute("data-state", "cooling", timeout=EXPECT_MS)
            expect(pg.get_by_test_id("account-countdown-A").first).to_have_text(
                re.compile(r"^\d+s$")
            )
            # The store stops answering: this instance says it is degraded, and goes on.
            redis.stop()
            expect(pg.get_by_test_id("instance-state")).to_have_text(
                "state degraded", timeout=EXPECT_MS
            )
    finally:
        redis.stop()
    assert seen.errors == []
