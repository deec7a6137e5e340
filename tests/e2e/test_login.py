"""`rawgate accounts login` end to end: a real subprocess, the emulator's consent page and token
endpoint, a test-side "browser" (urllib) that opens the printed URL, then a chat request through
the gateway on the new account. Plus the pure pieces (PKCE, state, redirect parsing) and the
emulator's authorization_code checks."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import orjson
import pytest

from rawgate.accounts.oauth import LoginRequest, OAuthError, code_from_redirect, parse_code_response
from rawgate.accounts.store import AccountStore
from rawgate.cli.login import has_display
from rawgate.emulator import server as emulator
from rawgate.emulator.server import Emulator, RunningEmulator
from tests.helpers_gateway import gateway_stack

pytestmark = pytest.mark.anyio

LOGIN_WAIT_S = 60.0


def _env(home: Path, emu: RunningEmulator, display: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAWGATE_") and k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update({
        "RAWGATE_HOME": str(home),
        "RAWGATE_UPSTREAM_OAUTH_AUTH_URL": emu.auth_url,
        "RAWGATE_UPSTREAM_OAUTH_TOKEN_URL": emu.token_url,
        "RAWGATE_UPSTREAM_CODE_ASSIST_BASE_URL": emu.base_url,
        "RAWGATE_UPSTREAM_OAUTH_CLIENT_ID": emu.client_id,
        "RAWGATE_UPSTREAM_OAUTH_CLIENT_SECRET": emu.client_secret,
        "BROWSER": "true",  # webbrowser.open runs `true URL`: succeeds, opens nothing
    })
    if display:
        env["DISPLAY"] = ":0"
    return env


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:
        return None


def _open(url: str, follow: bool) -> tuple[int, str, str]:
    """The "browser": GET `url`, following redirects or not -> (status, URL/Location, body)."""
    opener = (urllib.request.build_opener() if follow
              else urllib.request.build_opener(_NoRedirect()))
    try:
        with opener.open(url, timeout=30) as r:
            return r.status, r.geturl(), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("location") or "", e.read().decode()


async def _read_until(stream: Any, pattern: str, buf: list[bytes]) -> re.Match[str]:
    with anyio.fail_after(LOGIN_WAIT_S):
        while True:
            m = re.search(pattern, b"".join(buf).decode())
            if m:
                return m
            buf.append(await stream.receive())


async def _chat_as(base_url: str) -> tuple[int, str, dict[str, Any]]:
    body = orjson.dumps({"model": "gemini-2.5-flash",
                         "messages": [{"role": "user", "content": "hello"}]})

    def post() -> tuple[int, str, dict[str, Any]]:
        req = urllib.request.Request(base_url + "/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("x-account-email", ""), orjson.loads(r.read())

    return await anyio.to_thread.run_sync(post)


@pytest.mark.parametrize("mode", ["loopback", "paste", "paste-no-display"])
async def test_login_subprocess_then_chat_uses_the_account(tmp_path: Path, mode: str) -> None:
    async with gateway_stack(tmp_path) as run:
        emu = run.emulator
        argv = [sys.executable, "-m", "rawgate", "accounts", "login", "--label", "signed-in"]
        if mode == "paste":
            argv.append("--no-browser")
        # "paste-no-display": no flag, no DISPLAY: paste mode by itself.
        async with await anyio.open_process(argv, env=_env(tmp_path, emu, mode == "loopback"),
                                            stdin=-1, stdout=-1, stderr=-1) as proc:
            assert proc.stdout is not None and proc.stdin is not None
            out: list[bytes] = []
            url = (await _read_until(proc.stdout, r"\n  (http://\S+)\n", out)).group(1)
            q = parse_qs(urlsplit(url).query)
            assert url.startswith(emu.auth_url + "?")
            assert q["code_challenge_method"] == ["S256"] and len(q["code_challenge"][0]) == 43
            assert q["access_type"] == ["offline"] and q["response_type"] == ["code"]
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", q["redirect_uri"][0])
            assert len(q["state"][0]) >= 32
            if mode == "loopback":
                await _read_until(proc.stdout, r"Waiting for the browser", out)
                # A redirect with another state (a forged one) is refused; the wait goes on.
                forged = q["redirect_uri"][0] + "?code=4/0forged&state=not-ours"
                status, _, page = await anyio.to_thread.run_sync(_open, forged, True)
                assert status == 400 and "Refused" in page
                # The browser follows Google's redirect to the loopback port of the subprocess.
                status, final, page = await anyio.to_thread.run_sync(_open, url, True)
                assert status == 200 and final.startswith(q["redirect_uri"][0]), (status, final)
                assert "Signed in" in page
            else:
                await _read_until(proc.stdout, r"paste", out)
                # The browser is elsewhere: it shows the redirect's address (and the code).
                status, location, page = await anyio.to_thread.run_sync(_open, url, False)
                assert status == 302 and "code=" in location, (status, location)
                code = parse_qs(urlsplit(location).query)["code"][0]
                assert code in page  # the consent page shows the code for copying
                # A redirect of another sign-in is refused, the wait goes on; then ours.
                forged = location.replace("state=", "state=x")
                await proc.stdin.send(forged.encode() + b"\n")
                await _read_until(proc.stdout, r"does not match", out)
                await proc.stdin.send(location.encode() + b"\n")
            with anyio.fail_after(LOGIN_WAIT_S):
                rc = await proc.wait()
            rest = b"".join([b"".join(out), *[c async for c in proc.stdout]]).decode()
            err = b"".join([c async for c in proc.stderr]).decode() if proc.stderr else ""
            assert rc == 0, (rest, err)
        # Secrets never printed.
        accounts = AccountStore(tmp_path / "accounts.json").load()
        assert len(accounts) == 1
        acc = accounts[0]
        assert acc.kind == "oauth" and acc.label == "signed-in"
        assert acc.email == "user1@rawgate.invalid" and acc.project == "emu-login-project-1"
        assert acc.refresh_token.startswith("1//emu-") and acc.refresh_token not in rest + err
        assert emu.stats.get("authorize") == 1
        # The new account serves a chat request through the gateway (no restart).
        run.gateway.reload_accounts()
        status, who, doc = await _chat_as(run.base_url)
        assert status == 200 and who == "user1@rawgate.invalid"
        assert doc["choices"][0]["message"]["content"]


async def test_login_gives_up_after_timeout(tmp_path: Path) -> None:
    async with emulator.serve() as emu:
        r = await anyio.run_process([sys.executable, "-m", "rawgate", "accounts", "login",
                                     "--no-browser", "--timeout", "0.5"], input=b"",
                                    env=_env(tmp_path, emu, False), check=False)
    assert r.returncode == 1 and b"no sign-in within 0.5 s" in r.stderr
    assert not (tmp_path / "accounts.json").exists()


def test_has_display() -> None:
    assert has_display({}, "darwin") and has_display({}, "win32")
    assert not has_display({}, "linux") and not has_display({"DISPLAY": ""}, "linux")
    assert has_display({"DISPLAY": ":0"}, "linux")
    assert has_display({"WAYLAND_DISPLAY": "w"}, "linux")


async def test_login_without_client_fails_clearly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAWGATE_")}
    env["RAWGATE_HOME"] = str(tmp_path)
    r = await anyio.run_process([sys.executable, "-m", "rawgate", "accounts", "login",
                                 "--no-browser"], env=env, check=False)
    assert r.returncode == 1
    assert b"upstream.oauth_client_id" in r.stderr and b"ships no OAuth client" in r.stderr
    assert not (tmp_path / "accounts.json").exists()


# ---- the pure pieces --------------------------------------------------------------------------


def test_login_request_pkce_and_state() -> None:
    a = LoginRequest.new("https://accounts.example/auth", "cid", "http://127.0.0.1:5/", "me@x")
    b = LoginRequest.new("https://accounts.example/auth", "cid", "http://127.0.0.1:5/")
    q = parse_qs(urlsplit(a.url).query)
    digest = hashlib.sha256(a.verifier.encode()).digest()
    assert q["code_challenge"] == [base64.urlsafe_b64encode(digest).rstrip(b"=").decode()]
    assert 43 <= len(a.verifier) <= 128 and a.verifier not in a.url
    assert q["state"] == [a.state] and a.state != b.state and a.verifier != b.verifier
    assert q["login_hint"] == ["me@x"] and "login_hint" not in b.url
    assert "cloud-platform" in q["scope"][0]
    f = a.token_fields("C", "cid", "sec")
    assert f == {"grant_type": "authorization_code", "code": "C", "code_verifier": a.verifier,
                 "client_id": "cid", "client_secret": "sec", "redirect_uri": "http://127.0.0.1:5/"}


def test_code_from_redirect() -> None:
    assert code_from_redirect("http://127.0.0.1:9/?state=S&code=4%2F0abc&scope=x", "S") == "4/0abc"
    assert code_from_redirect("?code=c1&state=S", "S") == "c1"
    assert code_from_redirect("  4/0bare-code \n", "S") == "4/0bare-code"
    with pytest.raises(OAuthError) as e:
        code_from_redirect("http://127.0.0.1:9/?state=T&code=c", "S")
    assert e.value.code == "oauth_state_mismatch"
    with pytest.raises(OAuthError) as e:
        code_from_redirect("http://127.0.0.1:9/?code=c", "S")  # a redirect without our state
    assert e.value.code == "oauth_state_mismatch"
    with pytest.raises(OAuthError, match="access_denied"):
        code_from_redirect("http://127.0.0.1:9/?state=S&error=access_denied", "S")
    with pytest.raises(OAuthError):
        code_from_redirect("   ", "S")


def test_parse_code_response_errors_keep_secrets_out() -> None:
    body = orjson.dumps({"error": "invalid_grant", "error_description": "bad code SECRETCODE"})
    with pytest.raises(OAuthError) as e:
        parse_code_response(400, body, 0.0, ("SECRETCODE",))
    assert "invalid_grant" in e.value.message and "SECRETCODE" not in e.value.message
    with pytest.raises(OAuthError, match="oauth_client_id"):
        parse_code_response(401, b'{"error":"invalid_client"}', 0.0)
    with pytest.raises(OAuthError, match="no refresh token"):
        parse_code_response(200, b'{"access_token":"a","expires_in":10}', 0.0)


# ---- the emulator's consent page and authorization_code grant ---------------------------------


def _consent(emu: Emulator, **over: str) -> tuple[LoginRequest, Any]:
    req = LoginRequest.new("http://emu/o/oauth2/v2/auth", emu.settings.oauth_client_id,
                           "http://127.0.0.1:4711/cb")
    query = urlsplit(req.url).query
    if over:
        params = {k: v[0] for k, v in parse_qs(query).items()} | over
        query = urlencode(params)
    return req, emu.handle("GET", "/o/oauth2/v2/auth", query, [], b"")


def _exchange(emu: Emulator, fields: dict[str, str]) -> tuple[int, dict[str, Any]]:
    r = emu.handle("POST", "/token", "",
                   [(b"content-type", b"application/x-www-form-urlencoded")],
                   urlencode(fields).encode())
    return r.status, orjson.loads(r.body)


def _code(reply: Any) -> str:
    loc = dict(reply.headers)[b"location"].decode()
    return parse_qs(urlsplit(loc).query)["code"][0]


def test_emulator_code_grant_checks_verifier_client_redirect_and_single_use() -> None:
    emu = Emulator()
    s = emu.settings
    req, reply = _consent(emu)
    assert reply.status == 302
    loc = dict(reply.headers)[b"location"].decode()
    assert loc.startswith("http://127.0.0.1:4711/cb?") and f"state={req.state}" in loc
    code = _code(reply)
    good = req.token_fields(code, s.oauth_client_id, s.oauth_client_secret)
    assert _exchange(emu, {**good, "code_verifier": "x" * 50})[1]["error"] == "invalid_grant"
    assert _exchange(emu, {**good, "code_verifier": ""})[1]["error"] == "invalid_request"
    assert _exchange(emu, {**good, "redirect_uri": "http://127.0.0.1:1/"})[1]["error"] == (
        "redirect_uri_mismatch")
    st, doc = _exchange(emu, {**good, "client_secret": "wrong"})
    assert st == 401 and doc["error"] == "invalid_client"
    st, doc = _exchange(emu, good)
    assert st == 200 and doc["refresh_token"].startswith("1//") and doc["access_token"]
    assert parse_code_response(st, orjson.dumps(doc), 0.0).email == "user1@rawgate.invalid"
    assert _exchange(emu, good)[1]["error"] == "invalid_grant"  # single use
    # The refresh token works with the refresh grant.
    st, doc2 = _exchange(emu, {"grant_type": "refresh_token", "refresh_token": doc["refresh_token"],
                               "client_id": s.oauth_client_id,
                               "client_secret": s.oauth_client_secret})
    assert st == 200 and doc2["access_token"]


def test_emulator_consent_page_refuses_bad_client_and_non_loopback_redirect() -> None:
    emu = Emulator()
    _, r = _consent(emu, client_id="someone-else")
    assert r.status == 401 and b"location" not in dict(r.headers)
    _, r = _consent(emu, redirect_uri="https://evil.example/cb")
    assert r.status == 400 and b"location" not in dict(r.headers)
    _, r = _consent(emu, code_challenge="")
    assert r.status == 302 and b"error=invalid_request" in dict(r.headers)[b"location"]
    # login_hint names an existing account: its email and project.
    _, r = _consent(emu, login_hint="demo@rawgate.invalid")
    assert r.status == 302 and b"demo@rawgate.invalid" in r.body
