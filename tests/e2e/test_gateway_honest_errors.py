"""Honest errors end to end (openai SDK -> rawgate -> emulator): an upstream credential that Google
rejects is the account's failure (502/503 upstream_auth_failed naming the label), never the
client's 401; a 429 carries exactly one "try again" sentence."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from rawgate.accounts.store import AccountStore
from rawgate.emulator.server import DEMO_ACCOUNT
from tests.helpers_gateway import gateway_stack

pytestmark = pytest.mark.anyio

GOOD = ("key-good-aaaaaaaaaaaaaaaaaaaa", "good")
# Not in accounts.json when the emulator starts, so the emulator does not know it: Google's
# 400 API_KEY_INVALID, exactly what a mistyped or deleted key gets.
BAD_KEY = "AIzaSyWRONG-wrong-wrong-wrong-wrong-00000"


def _client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="sk-client-key", max_retries=0)


async def _chat(c: openai.AsyncOpenAI, text: str) -> tuple[str, str]:
    r = await c.chat.completions.with_raw_response.create(
        model="gemini-2.5-flash", messages=[{"role": "user", "content": text}]
    )
    return r.headers["x-account-email"], r.parse().choices[0].message.content or ""


def _unknown_to_google(run: object) -> None:
    """`serve --emulate` lets its emulator accept every key of accounts.json, also one added
    while it runs; these tests need a key Google does not know, so it stops asking."""
    creds = run.emulator.core.creds  # type: ignore[attr-defined]
    if hasattr(creds, "key_source"):
        creds.key_source = None


def _add_bad(home: Path, run: object) -> None:
    AccountStore(home / "accounts.json").add_api_key(BAD_KEY, label="typo-key")
    run.gateway.reload_accounts()  # type: ignore[attr-defined]
    _unknown_to_google(run)


def _blocked(gateway: object, name: str) -> dict[str, float]:
    snap = gateway.scheduler.snapshot(time.monotonic())  # type: ignore[attr-defined]
    return next(s["blocked"] for s in snap if s["name"] == name)


async def test_rejected_key_is_502_upstream_auth_failed_naming_the_label(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        _add_bad(tmp_path, run)  # the only account now: the demo one is not used
        with pytest.raises(openai.InternalServerError) as ei:
            await _chat(c, "hello")
        e = ei.value
        assert e.status_code == 502
        body = e.body
        assert isinstance(body, dict)
        assert body["code"] == "upstream_auth_failed" and body["type"] == "server_error"
        assert "'typo-key'" in body["message"] and "API_KEY_INVALID" in body["message"]
        assert "API key not valid" in body["message"]  # Google's words
        assert BAD_KEY not in e.response.text and BAD_KEY[:12] not in e.response.text
        assert e.response.headers["x-account-email"] == "typo-key"
        assert run.emulator.stats.get("status_400") == 1
        # The account rests (as before) ...
        assert "auth" in _blocked(run.gateway, "typo-key")
        # ... so the next request does not reach Google: 503, same code, naming it, Retry-After.
        with pytest.raises(openai.InternalServerError) as ei2:
            await _chat(c, "again")
        e2 = ei2.value
        assert e2.status_code == 503
        body2 = e2.body
        assert isinstance(body2, dict) and body2["code"] == "upstream_auth_failed"
        assert "'typo-key'" in body2["message"]
        assert int(e2.response.headers["retry-after"]) >= 1
        assert BAD_KEY not in e2.response.text
        assert run.emulator.stats.get("status_400") == 1


async def test_rejected_key_rotates_to_a_good_account(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=[GOOD]) as run, _client(run.base_url) as c:
        _add_bad(tmp_path, run)
        # Round robin starts on one of the two: within two requests the bad key is tried once,
        # and every request is answered by the good account.
        for i in range(3):
            who, text = await _chat(c, f"hi {i}")
            assert who == "good" and f"hi {i}" in text
        assert run.emulator.stats.get("status_400") == 1
        assert "auth" in _blocked(run.gateway, "typo-key")
        assert "auth" not in _blocked(run.gateway, "good")


async def test_every_key_rejected_names_every_label(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        store = AccountStore(tmp_path / "accounts.json")
        store.add_api_key(BAD_KEY, label="first")
        store.add_api_key(BAD_KEY.replace("0", "1"), label="second")
        run.gateway.reload_accounts()
        _unknown_to_google(run)
        with pytest.raises(openai.InternalServerError) as ei:
            await _chat(c, "hello")
        body = ei.value.body
        assert ei.value.status_code == 502
        assert isinstance(body, dict) and body["code"] == "upstream_auth_failed"
        assert "accounts 'first', 'second'" in body["message"] or (
            "accounts 'second', 'first'" in body["message"]
        )


async def test_hidden_account_header_names_the_account_by_id(tmp_path: Path) -> None:
    cfg = {"routing": {"expose_account_header": False}}
    async with gateway_stack(tmp_path, config=cfg) as run, _client(run.base_url) as c:
        acc = AccountStore(tmp_path / "accounts.json").add_api_key(BAD_KEY, label="secret-team")
        run.gateway.reload_accounts()
        _unknown_to_google(run)
        with pytest.raises(openai.InternalServerError) as ei:
            await _chat(c, "hello")
        body = ei.value.body
        assert isinstance(body, dict) and body["code"] == "upstream_auth_failed"
        assert "secret-team" not in ei.value.response.text
        assert f"id {acc.id}" in body["message"]


async def test_429_message_has_one_try_again_sentence(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        with pytest.raises(openai.RateLimitError) as ei:
            await _chat(c, "[[emu:error status=429 retry_delay=20s limit=10]] x")
        body = ei.value.body
        assert isinstance(body, dict)
        msg = body["message"]
        # Google's body says "Please retry in 20s." and carries RetryInfo 20s: one sentence.
        assert len(re.findall(r"(?i)(?:retry|try again) (?:in|after)", msg)) == 1, msg
        assert msg.endswith("Please try again in 20s."), msg
        assert run.emulator.stats.get("quota_429") == 1
        # The account now cools: rawgate answers the next request itself, also in one sentence.
        with pytest.raises(openai.RateLimitError) as ei2:
            await _chat(c, "no directive")
        body2 = ei2.value.body
        assert isinstance(body2, dict)
        msg2 = body2["message"]
        assert len(re.findall(r"(?i)(?:retry|try again) (?:in|after)", msg2)) == 1, msg2
        assert re.search(r"Please try again in \d+(\.\d+)?s\.$", msg2), msg2
        assert run.emulator.stats.get("quota_429") == 1


async def test_which_errors_carry_which_headers(tmp_path: Path) -> None:
    """What the README promises: X-Mapped-Model once the model is known, X-Account-Email once an
    account was picked, x-request-id always."""
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.base_url) as h:
        msgs = [{"role": "user", "content": "x"}]

        async def heads(body: dict[str, object]) -> tuple[int, set[str]]:
            r = await h.post("/chat/completions", json={"model": "gpt-4o", **body})
            return r.status_code, {k for k in r.headers if k.startswith("x-")}

        both = {"x-mapped-model", "x-account-email", "x-request-id"}
        assert await heads({"messages": msgs}) == (200, both)
        bad = [{"role": "user", "content": "[[emu:error status=400]] x"}]
        assert await heads({"messages": bad}) == (400, both)  # Google's 400: an account asked
        # Rejected before any account was picked: the model is named, no account is.
        assert await heads({"messages": msgs, "top_logprobs": 2}) == (
            400,
            {"x-mapped-model", "x-request-id"},
        )
        # A body that does not decode names nothing but the request.
        assert await heads({"messages": 5}) == (400, {"x-request-id"})
        # No usable account: 503 naming the model only.
        for a in run.gateway.accounts:
            a.enabled = False
        run.gateway.scheduler.set_accounts(run.gateway.accounts)
        assert await heads({"messages": msgs}) == (503, {"x-mapped-model", "x-request-id"})


@pytest.mark.parametrize(
    ("directive", "reason"),
    [
        ("[[emu:error status=403 reason=SERVICE_DISABLED]]", "SERVICE_DISABLED"),
        ("[[emu:error status=403]]", "PERMISSION_DENIED"),
        ("[[emu:error status=401]]", "UNAUTHENTICATED"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_401_and_403_from_google_are_the_accounts_not_the_clients(
    tmp_path: Path, directive: str, reason: str, stream: bool
) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        with pytest.raises(openai.InternalServerError) as ei:
            await c.chat.completions.create(
                model="gemini-2.5-flash",
                messages=[{"role": "user", "content": f"{directive} hi"}],
                stream=stream,
            )
        body = ei.value.body
        assert ei.value.status_code == 502
        assert isinstance(body, dict) and body["code"] == "upstream_auth_failed"
        assert f"account 'emulator-demo' ({reason})" in body["message"]
        assert "auth" in _blocked(run.gateway, "emulator-demo")


async def test_code_assist_403_names_the_oauth_account(tmp_path: Path) -> None:
    AccountStore(tmp_path / "accounts.json").add_oauth(
        DEMO_ACCOUNT.refresh_token, email=DEMO_ACCOUNT.email
    )
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        with pytest.raises(openai.InternalServerError) as ei:
            await _chat(c, "[[emu:error status=403 reason=VALIDATION_REQUIRED]] hi")
        body = ei.value.body
        assert isinstance(body, dict) and body["code"] == "upstream_auth_failed"
        assert f"account '{DEMO_ACCOUNT.email}' (VALIDATION_REQUIRED)" in body["message"]
        assert DEMO_ACCOUNT.refresh_token not in ei.value.response.text
        assert "ya29." not in ei.value.response.text
        assert "auth" in _blocked(run.gateway, DEMO_ACCOUNT.email)
