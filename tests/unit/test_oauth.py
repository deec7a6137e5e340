"""OAuth: one refresh under concurrency, ahead of expiry, error mapping, project discovery."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from rawgate.accounts.oauth import (
    REFRESH_MARGIN_S,
    AccountRevoked,
    CodeAssistSetupError,
    OAuthError,
    TokenManager,
    discover_project,
    parse_token_response,
)
from rawgate.accounts.store import Account
from rawgate.errors import UpstreamConnectError, UpstreamError

pytestmark = pytest.mark.anyio

TOKEN_URL = "https://oauth2.example.test/token"
RT = "1//0gREFRESHsecretTOKEN-abcdefghijklmnopqrstuvwxyz"
CLIENT_SECRET = "GOCSPX-clientSECRETvalue123"


def oauth_acc(rt: str = RT, **kw: Any) -> Account:
    return Account(id="o1", kind="oauth", refresh_token=rt, email="me@example.com", **kw)


class FakeTokenEndpoint:
    """Scripted token endpoint: each call pops the next (status, body) answer."""

    def __init__(self, *answers: tuple[int, dict[str, Any] | bytes]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.gate: anyio.Event | None = None

    async def __call__(self, url: str, fields: dict[str, str]) -> tuple[int, bytes]:
        self.calls.append((url, dict(fields)))
        if self.gate is not None:
            await self.gate.wait()
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return status, body if isinstance(body, bytes) else json.dumps(body).encode()


def ok(token: str = "ya29.first", expires_in: Any = 3599, **extra: Any) -> tuple[int, Any]:
    return 200, {"access_token": token, "expires_in": expires_in, "token_type": "Bearer", **extra}


def manager(ep: FakeTokenEndpoint, **kw: Any) -> TokenManager:
    return TokenManager(TOKEN_URL, "client-id.apps", CLIENT_SECRET, ep, **kw)


async def test_refresh_sends_the_form_and_caches() -> None:
    ep = FakeTokenEndpoint(ok())
    tm = manager(ep)
    acc = oauth_acc()
    assert await tm.access_token(acc, 1000.0) == "ya29.first"
    assert await tm.access_token(acc, 1001.0) == "ya29.first"
    assert ep.calls == [
        (
            TOKEN_URL,
            {
                "grant_type": "refresh_token",
                "refresh_token": RT,
                "client_id": "client-id.apps",
                "client_secret": CLIENT_SECRET,
            },
        )
    ]


async def test_expired_token_refreshed_once_under_50_concurrent_callers() -> None:
    ep = FakeTokenEndpoint(ok("ya29.old", 3600), ok("ya29.new", 3600))
    tm = manager(ep)
    acc = oauth_acc()
    assert await tm.access_token(acc, 0.0) == "ya29.old"
    ep.gate = anyio.Event()
    results: list[str] = []

    async def caller() -> None:
        results.append(await tm.access_token(acc, 4000.0))  # long expired

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(caller)
        await wait_all_tasks_blocked()
        assert len(ep.calls) == 2  # the first refresh + exactly one more, in flight
        ep.gate.set()
    assert results == ["ya29.new"] * 50
    assert len(ep.calls) == 2
    assert tm.refresh_count == 2


async def test_refresh_happens_ahead_of_expiry() -> None:
    ep = FakeTokenEndpoint(ok("ya29.a", 3600), ok("ya29.b", 3600))
    tm = manager(ep)
    acc = oauth_acc()
    await tm.access_token(acc, 0.0)
    assert await tm.access_token(acc, 3600 - REFRESH_MARGIN_S - 1) == "ya29.a"
    assert len(ep.calls) == 1
    assert await tm.access_token(acc, 3600 - REFRESH_MARGIN_S) == "ya29.b"  # still valid, due
    assert len(ep.calls) == 2


async def test_short_lived_token_is_not_due_on_arrival() -> None:
    ep = FakeTokenEndpoint(ok("ya29.a", 60), ok("ya29.b", 60))
    tm = manager(ep)
    acc = oauth_acc()
    await tm.access_token(acc, 0.0)
    assert await tm.access_token(acc, 29.0) == "ya29.a"  # refresh at half its life
    assert await tm.access_token(acc, 30.0) == "ya29.b"


async def test_invalid_grant_is_account_revoked_for_every_waiter() -> None:
    ep = FakeTokenEndpoint(
        (400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."})
    )
    ep.gate = anyio.Event()
    tm = manager(ep)
    acc = oauth_acc()
    errors: list[BaseException] = []

    async def caller() -> None:
        try:
            await tm.access_token(acc, 0.0)
        except AccountRevoked as e:
            errors.append(e)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(caller)
        await wait_all_tasks_blocked()
        ep.gate.set()
    assert len(ep.calls) == 1
    assert len(errors) == 10
    assert len({id(e) for e in errors}) == 10  # each caller has its own instance
    for e in errors:
        assert isinstance(e, AccountRevoked) and isinstance(e, UpstreamError)
        assert e.reason == "invalid_grant: Token has been expired or revoked."
        assert "me@example.com" in e.message
        assert RT not in e.message and CLIENT_SECRET not in e.message


@pytest.mark.parametrize(
    ("status", "body", "needle", "code", "http"),
    [
        (401, {"error": "invalid_client"}, "oauth_client_id", "oauth_client_rejected", 503),
        (500, b"<html>oops " + RT.encode() + b"</html>", "HTTP 500", "oauth_refresh_failed", 502),
        (400, {"error": "invalid_request", "error_description": f"bad {RT}"}, "invalid_request",
         "oauth_refresh_failed", 502),
        (200, {"token_type": "Bearer"}, "without access_token", "oauth_refresh_failed", 502),
        (200, {"access_token": "x", "expires_in": "soon"}, "bad expires_in",
         "oauth_refresh_failed", 502),
        (200, b"not json", "without access_token", "oauth_refresh_failed", 502),
    ],
)  # fmt: skip
async def test_other_failures_are_upstream_errors_without_secrets(
    status: int, body: dict[str, Any] | bytes, needle: str, code: str, http: int
) -> None:
    tm = manager(FakeTokenEndpoint((status, body)))
    with pytest.raises(OAuthError) as ei:
        await tm.access_token(oauth_acc(), 0.0)
    e = ei.value
    assert needle in e.message and e.code == code and e.status == http
    assert RT not in e.message and CLIENT_SECRET not in e.message


async def test_connection_failure_is_wrapped_and_scrubbed() -> None:
    async def post(url: str, fields: dict[str, str]) -> tuple[int, bytes]:
        raise UpstreamConnectError(f"connect failed (echo {fields['refresh_token']})")

    tm = TokenManager(TOKEN_URL, "id", CLIENT_SECRET, post)
    with pytest.raises(OAuthError, match="connect failed") as ei:
        await tm.access_token(oauth_acc(), 0.0)
    assert RT not in ei.value.message and "***" in ei.value.message


async def test_refresh_timeout() -> None:
    async def post(url: str, fields: dict[str, str]) -> tuple[int, bytes]:
        await anyio.sleep_forever()
        raise AssertionError

    tm = TokenManager(TOKEN_URL, "id", CLIENT_SECRET, post, timeout_s=0.01)
    with pytest.raises(OAuthError, match="timed out"):
        await tm.access_token(oauth_acc(), 0.0)


async def test_not_configured_makes_no_call() -> None:
    ep = FakeTokenEndpoint(ok())
    tm = TokenManager(TOKEN_URL, "", "", ep)
    with pytest.raises(OAuthError) as ei:
        await tm.access_token(oauth_acc(), 0.0)
    assert ei.value.code == "oauth_not_configured" and ei.value.status == 503
    assert ep.calls == []


async def test_cancelled_leader_hands_over_to_a_waiter() -> None:
    ep = FakeTokenEndpoint(ok("ya29.x"))
    ep.gate = anyio.Event()
    tm = manager(ep)
    acc = oauth_acc()
    got: list[str] = []

    async def waiter() -> None:
        got.append(await tm.access_token(acc, 0.0))

    async with anyio.create_task_group() as tg:
        leader_scope = anyio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await tm.access_token(acc, 0.0)

        tg.start_soon(leader)
        await wait_all_tasks_blocked()
        tg.start_soon(waiter)
        await wait_all_tasks_blocked()
        assert len(ep.calls) == 1
        leader_scope.cancel()  # the leader's client went away mid-refresh
        await wait_all_tasks_blocked()
        assert len(ep.calls) == 2  # the waiter took over
        ep.gate.set()
    assert got == ["ya29.x"]


async def test_rotated_refresh_token_is_reported() -> None:
    seen: list[tuple[str, str]] = []
    ep = FakeTokenEndpoint(ok("ya29.r", refresh_token="1//0gNEWtoken"))
    tm = manager(ep, on_refresh_token=lambda a, t: seen.append((a.id, t)))
    acc = oauth_acc()
    assert await tm.access_token(acc, 0.0) == "ya29.r"
    assert seen == [("o1", "1//0gNEWtoken")] and acc.refresh_token == "1//0gNEWtoken"
    assert await tm.access_token(acc, 1.0) == "ya29.r"  # still cached after the rotation
    assert len(ep.calls) == 1


async def test_token_is_bound_to_its_refresh_token_and_invalidate() -> None:
    ep = FakeTokenEndpoint(ok("ya29.1"), ok("ya29.2"), ok("ya29.3"))
    tm = manager(ep)
    assert await tm.access_token(oauth_acc(), 0.0) == "ya29.1"
    assert await tm.access_token(oauth_acc("1//0gOTHERtoken-xyz"), 1.0) == "ya29.2"
    acc = oauth_acc("1//0gOTHERtoken-xyz")
    tm.invalidate(acc)  # the upstream answered 401 to it
    assert tm.cached(acc, 2.0) is None
    assert await tm.access_token(acc, 2.0) == "ya29.3"


def test_parse_token_response_defaults_expiry() -> None:
    tok = parse_token_response(200, b'{"access_token": "t"}', 100.0, "x")
    assert tok.expires_at == 3700.0 and tok.refresh_at == 3700.0 - REFRESH_MARGIN_S


# ---- project discovery -------------------------------------------------------------------------


class FakeCodeAssist:
    def __init__(self, **answers: list[dict[str, Any]]) -> None:
        self.answers = {k: list(v) for k, v in answers.items()}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.gate: anyio.Event | None = None

    async def __call__(self, method: str, token: str, payload: dict[str, Any]) -> bytes:
        self.calls.append((method, token, payload))
        if self.gate is not None:
            await self.gate.wait()
        queue = self.answers[method]
        return json.dumps(queue.pop(0) if len(queue) > 1 else queue[0]).encode()


async def no_sleep(_: float) -> None:
    await anyio.lowlevel.checkpoint()


async def test_project_from_current_tier() -> None:
    ca = FakeCodeAssist(
        loadCodeAssist=[{"currentTier": {"id": "standard-tier"}, "cloudaicompanionProject": "p-1"}]
    )
    assert await discover_project(oauth_acc(), "tok", ca) == "p-1"
    method, token, payload = ca.calls[0]
    assert (method, token) == ("loadCodeAssist", "tok") and len(ca.calls) == 1
    assert payload["metadata"]["pluginType"] == "GEMINI"
    assert "cloudaicompanionProject" not in payload


async def test_current_tier_without_project() -> None:
    ca = FakeCodeAssist(loadCodeAssist=[{"currentTier": {"id": "standard-tier"}}])
    assert await discover_project(oauth_acc(project="mine"), "tok", ca) == "mine"
    assert ca.calls[0][2]["cloudaicompanionProject"] == "mine"
    assert ca.calls[0][2]["metadata"]["duetProject"] == "mine"
    with pytest.raises(CodeAssistSetupError, match="--project"):
        await discover_project(oauth_acc(), "tok", ca)


async def test_free_tier_onboarding_polls_the_operation() -> None:
    ca = FakeCodeAssist(
        loadCodeAssist=[{"allowedTiers": [{"id": "legacy-tier"}, {"id": "free-tier",
                                                                  "isDefault": True}]}],
        onboardUser=[{"name": "op/1", "done": False}, {"name": "op/1", "done": False},
                     {"done": True, "response": {"cloudaicompanionProject": {"id": "managed-7"}}}],
    )  # fmt: skip
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    assert await discover_project(oauth_acc(), "tok", ca, sleep=sleep, poll_s=5.0) == "managed-7"
    onboards = [c for c in ca.calls if c[0] == "onboardUser"]
    assert len(onboards) == 3 and slept == [5.0, 5.0]
    assert onboards[0][2]["tierId"] == "free-tier"
    assert "cloudaicompanionProject" not in onboards[0][2]  # free tier: never send a project


async def test_standard_tier_needs_a_project() -> None:
    load = {"allowedTiers": [{"id": "standard-tier", "isDefault": True,
                              "userDefinedCloudaicompanionProject": True}]}  # fmt: skip
    ca = FakeCodeAssist(loadCodeAssist=[load], onboardUser=[{"done": True}])
    with pytest.raises(CodeAssistSetupError, match="needs a Google Cloud project"):
        await discover_project(oauth_acc(), "tok", ca, sleep=no_sleep)
    assert await discover_project(oauth_acc(project="corp-1"), "tok", ca, sleep=no_sleep) == (
        "corp-1"
    )
    onboard = ca.calls[-1][2]
    assert onboard["tierId"] == "standard-tier" and onboard["cloudaicompanionProject"] == "corp-1"


async def test_ineligible_account_names_the_reason_and_link() -> None:
    ca = FakeCodeAssist(
        loadCodeAssist=[{"ineligibleTiers": [{"reasonCode": "VALIDATION_REQUIRED",
                                              "validationUrl": "https://accounts.example/verify"}]}]
    )  # fmt: skip
    with pytest.raises(CodeAssistSetupError) as ei:
        await discover_project(oauth_acc(), "tok", ca)
    assert "VALIDATION_REQUIRED" in ei.value.message
    assert "https://accounts.example/verify" in ei.value.message
    assert ei.value.status == 503


async def test_onboarding_that_never_finishes_gives_up() -> None:
    ca = FakeCodeAssist(
        loadCodeAssist=[{"allowedTiers": [{"id": "free-tier", "isDefault": True}]}],
        onboardUser=[{"done": False}],
    )
    with pytest.raises(CodeAssistSetupError, match="did not finish"):
        await discover_project(oauth_acc(), "tok", ca, sleep=no_sleep, max_polls=3)
    assert sum(1 for c in ca.calls if c[0] == "onboardUser") == 4


async def test_non_object_answer() -> None:
    async def post(method: str, token: str, payload: dict[str, Any]) -> bytes:
        return b"[1, 2]"

    with pytest.raises(CodeAssistSetupError, match="not a JSON object"):
        await discover_project(oauth_acc(), "tok", post)


async def test_project_for_discovers_once_under_concurrency() -> None:
    ca = FakeCodeAssist(
        loadCodeAssist=[{"currentTier": {"id": "free-tier"}, "cloudaicompanionProject": "p-9"}]
    )
    ca.gate = anyio.Event()
    tm = manager(FakeTokenEndpoint(ok()))
    acc = oauth_acc()
    got: list[str] = []

    async def caller() -> None:
        got.append(await tm.project_for(acc, "tok", ca))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(caller)
        await wait_all_tasks_blocked()
        ca.gate.set()
    assert got == ["p-9"] * 20 and len(ca.calls) == 1 and acc.project == "p-9"
    assert await tm.project_for(acc, "tok", ca) == "p-9" and len(ca.calls) == 1
    reloaded = oauth_acc()  # hot reload: a fresh object without the project
    assert await tm.project_for(reloaded, "tok", ca) == "p-9" and len(ca.calls) == 1


class Fleet:
    """An in-memory `shared` for TokenManager: one token per key, one fetch at a time (the
    contract of state.refresh_once, without a store)."""

    def __init__(self) -> None:
        self.tokens: dict[str, tuple[str, float]] = {}
        self.lock = anyio.Lock()
        self.keys: list[str] = []

    async def __call__(self, key: str, fetch: Any, refused: str) -> tuple[str, float]:
        self.keys.append(key)
        async with self.lock:
            hit = self.tokens.get(key)
            if hit is None or hit[0] == refused:
                hit = self.tokens[key] = await fetch()
            return hit


async def test_two_managers_on_one_fleet_refresh_once_and_share_the_refresh_point() -> None:
    ep = FakeTokenEndpoint(ok("ya29.one", 3599), ok("ya29.two", 3599))
    fleet = Fleet()
    a, b = manager(ep, shared=fleet), manager(ep, shared=fleet)
    got: list[str] = []

    async def call(tm: TokenManager) -> None:
        got.append(await tm.access_token(oauth_acc(), 1000.0))

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(call, (a, b)[i % 2])
    assert got == ["ya29.one"] * 50 and len(ep.calls) == 1
    # What the fleet shares is the refresh point, so both refresh at the same moment.
    assert list(fleet.tokens.values()) == [("ya29.one", 1000.0 + 3599 - REFRESH_MARGIN_S)]
    assert b.cached(oauth_acc(), 1000.0 + 3599 - REFRESH_MARGIN_S - 1) == "ya29.one"
    assert b.cached(oauth_acc(), 1000.0 + 3599 - REFRESH_MARGIN_S) is None
    # The key names the account and a fingerprint of its refresh token, never the secret.
    assert all(k.startswith("o1.") and RT not in k for k in fleet.keys)


async def test_a_refused_token_is_not_taken_back_from_the_fleet() -> None:
    ep = FakeTokenEndpoint(ok("ya29.one", 3599), ok("ya29.two", 3599))
    fleet = Fleet()
    a, b = manager(ep, shared=fleet), manager(ep, shared=fleet)
    acc = oauth_acc()
    assert await a.access_token(acc, 1000.0) == "ya29.one"
    assert await b.access_token(acc, 1000.0) == "ya29.one"
    # Google refuses it before its expiry: both see the 401; one refresh for the two.
    a.invalidate_if(acc, "ya29.one")
    b.invalidate_if(acc, "ya29.one")
    assert await a.access_token(acc, 1001.0) == "ya29.two"
    assert await b.access_token(acc, 1001.0) == "ya29.two"
    assert len(ep.calls) == 2
