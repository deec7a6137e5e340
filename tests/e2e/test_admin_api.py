"""The admin API (/admin/..., /ui: gateway/admin.py, http/app.py) on the real stack of
`rawgate serve --emulate` behind a loopback listener: the admin key and its header-only rules,
the Origin rules, the overview changing as requests flow (a cooldown after an emulator 429
directive included), accounts disabled and enabled for the next request, client keys made and
removed, usage, the request log and the config without secrets; bad input gets the admin error
shape, never a 500.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest

from rawgate.accounts.store import AccountStore
from tests.helpers_gateway import gateway_stack
from tests.helpers_h1 import Response, exchange

pytestmark = pytest.mark.anyio

TWO_KEYS = [("key-aaaaaaaaaaaaaaaaaaaaaaaa", "A"), ("key-bbbbbbbbbbbbbbbbbbbbbbbb", "B")]
KEY_A = TWO_KEYS[0][0]
CHAT = "/v1/chat/completions"
WAIT_S = 10.0


def _body(text: str = "hi", model: str = "gemini-2.5-flash") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def _key(home: Path) -> str:
    return (home / "admin_key").read_text().strip()


def _h(home: Path) -> dict[str, str]:
    return {"x-admin-key": _key(home)}


def _admin_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"type", "code", "message"}, err
    if code is not None:
        assert err["code"] == code, err
    return dict(err)


def _no_cors(headers: Any) -> None:
    names = [(k.decode() if isinstance(k, bytes) else k).lower() for k in headers]
    assert not [n for n in names if n.startswith("access-control-")], names


async def _raw(port: int, method: str, path: str, *headers: str, body: bytes = b"") -> Response:
    """One HTTP/1.1 exchange with exactly these headers (no client adds any)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    async with await anyio.connect_tcp("127.0.0.1", port) as s:
        (r,) = await exchange(s, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return r


async def _wait_rows(c: httpx.AsyncClient, home: Path, n: int, **params: Any) -> list[Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        r = await c.get("/admin/requests", params=params, headers=_h(home))
        assert r.status_code == 200, r.text
        rows = r.json()["rows"]
        if len(rows) >= n:
            return list(rows)
        assert time.monotonic() < deadline, f"fewer than {n} rows in {WAIT_S} s"
        await anyio.sleep(0.05)


def _account(doc: dict[str, Any], label: str) -> dict[str, Any]:
    (acc,) = [a for a in doc["accounts"] if a["label"] == label]
    return dict(acc)


# ---- the admin key --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["off", "auto", "strict"])
async def test_the_admin_key_comes_in_a_header_only_whatever_auth_mode(
    tmp_path: Path, mode: str
) -> None:
    client_key = "sk-client-key-0123456789abcdef"
    config = {"auth": {"mode": mode, "api_keys": [client_key]}}
    async with gateway_stack(tmp_path, config=config) as run:
        key = _key(tmp_path)
        assert len(key) == 43 and (tmp_path / "admin_key").stat().st_mode & 0o777 == 0o600
        async with httpx.AsyncClient(base_url=run.origin) as c:
            for path in ("/admin/overview", "/admin/keys", "/admin/nope"):
                err = _admin_error(await c.get(path), 401, "admin_key_required")
                assert err["type"] == "admin_auth"
            _admin_error(await c.get("/admin/overview", headers={"x-admin-key": "nope"}),
                         401, "admin_key_invalid")  # fmt: skip
            _admin_error(await c.get("/admin/overview", headers={"x-admin-key": key + "x"}),
                         401, "admin_key_invalid")  # fmt: skip
            # Client keys (auth.api_keys) are not admin keys.
            bearer = {"authorization": f"Bearer {client_key}"}
            _admin_error(await c.get("/admin/overview", headers=bearer), 401, "admin_key_invalid")
            # Never a cookie, never a query parameter.
            r = await c.get("/admin/overview", headers={"cookie": f"admin_key={key}; key={key}"})
            _admin_error(r, 401, "admin_key_required")
            r = await c.get("/admin/overview", params={"key": key})
            _admin_error(r, 401, "admin_key_required")
            # Both headers work.
            for h in ({"x-admin-key": key}, {"authorization": f"Bearer {key}"}):
                r = await c.post("/admin/accounts/emulator-demo/enable", headers=h)
                assert r.status_code == 200, r.text
                assert (await c.get("/admin/overview", headers=h)).status_code == 200
            # And the admin key is no client key: with auth on, the model routes refuse it.
            if mode == "strict":
                r = await c.post(CHAT, json=_body(), headers={"authorization": f"Bearer {key}"})
                assert r.status_code == 401
                r = await c.post(CHAT, json=_body(), headers=bearer)
                assert r.status_code == 200
            # /ui holds no data: no key needed, whatever the mode.
            r = await c.get("/ui")
            assert r.status_code == 200 and "<title>rawgate</title>" in r.text
            assert r.headers["content-type"] == "text/html; charset=utf-8"
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            assert r.headers["x-frame-options"] == "DENY"
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
            assert r.headers["cache-control"] == "no-store"
            assert (await c.get("/ui/")).status_code == 200
            # The key never shows up in an answer.
            r = await c.get("/admin/overview", headers={"x-admin-key": key})
            assert key not in r.text


async def test_configured_admin_keys_replace_the_generated_one(tmp_path: Path) -> None:
    config = {"admin": {"api_keys": ["adm-first-0123456789", "adm-second-0123456789"]}}
    async with gateway_stack(tmp_path, config=config) as run:
        assert not (tmp_path / "admin_key").exists()
        async with httpx.AsyncClient(base_url=run.origin) as c:
            for k in config["admin"]["api_keys"]:
                r = await c.get("/admin/overview", headers={"authorization": f"Bearer {k}"})
                assert r.status_code == 200
            r = await c.get("/admin/overview", headers={"x-admin-key": "adm-third-0123456789"})
            _admin_error(r, 401, "admin_key_invalid")


async def test_foreign_origins_preflights_and_cors_headers_are_refused(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run:
        port = run.server.port
        key = f"X-Admin-Key: {_key(tmp_path)}"
        own = f"Origin: http://127.0.0.1:{port}"
        for path in ("/admin/overview", "/ui", "/admin/nope"):
            # http://localhost:3000 is in the default cors_allowed_origins: still refused here.
            for origin in ("https://evil.example", "http://localhost:3000", "null"):
                r = await _raw(port, "GET", path, key, f"Origin: {origin}")
                assert r.status == 403, (path, origin, r.status)
                assert json.loads(r.body)["error"]["code"] == "origin_not_allowed"
                _no_cors(dict(r.headers))
            r = await _raw(port, "OPTIONS", path, own, "Access-Control-Request-Method: POST")
            assert r.status == 403, (path, r.status)
            _no_cors(dict(r.headers))
            r = await _raw(port, "OPTIONS", path, "Origin: https://evil.example",
                           "Access-Control-Request-Method: GET")  # fmt: skip
            assert r.status == 403
            _no_cors(dict(r.headers))
        # Its own origin (the page calling the API) is served, without CORS headers.
        r = await _raw(port, "GET", "/admin/overview", key, own)
        assert r.status == 200
        _no_cors(dict(r.headers))
        r = await _raw(port, "GET", "/ui", own)
        assert r.status == 200
        _no_cors(dict(r.headers))
        # A write from a foreign page never reaches the handler.
        r = await _raw(port, "POST", "/admin/accounts/emulator-demo/disable", key,
                       "Origin: https://evil.example")  # fmt: skip
        assert r.status == 403
        assert run.gateway.accounts[0].enabled


# ---- the overview ---------------------------------------------------------------------------


async def test_overview_shows_accounts_and_changes_after_requests(tmp_path: Path) -> None:
    async with (
        gateway_stack(tmp_path, api_keys=TWO_KEYS) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        r = await c.get("/admin/overview", headers=_h(tmp_path))
        assert r.status_code == 200
        doc = r.json()
        inst = doc["instance"]
        assert inst["state_backend"] == "local" and inst["fleet"] is False
        assert inst["emulated"] is True and inst["state"] == "ok"
        assert inst["request_log"]["enabled"] is True
        assert [a["label"] for a in doc["accounts"]] == ["A", "B"]
        for a in doc["accounts"]:
            assert a["state"] == "up" and a["enabled"] and a["requests"] == 0
            assert a["cooldowns"] == [] and a["kind"] == "api_key"
        rates = doc["rates"]
        assert rates["bucket_s"] == 60 and len(rates["series"]) == 60
        assert sum(b["requests"] for b in rates["series"]) == 0
        # Secrets of the accounts never appear.
        assert KEY_A not in r.text and TWO_KEYS[1][0] not in r.text
        for _ in range(4):
            assert (await c.post(CHAT, json=_body())).status_code == 200
        assert (await c.post(CHAT, json={"model": 3})).status_code == 400
        doc = (await c.get("/admin/overview", headers=_h(tmp_path))).json()
        assert [a["requests"] for a in doc["accounts"]] == [2, 2]
        assert all(a["tokens_out"] > 0 for a in doc["accounts"])
        series = doc["rates"]["series"]
        assert sum(b["requests"] for b in series) == 5
        assert sum(b["errors"] for b in series) == 1
        assert sum(b["tokens_out"] for b in series) > 0
        last = doc["rates"]["last_minute"]
        assert last["requests"] >= 5 and last["p50_ms"] is not None
        assert last["p50_ms"] <= last["p95_ms"] <= last["p99_ms"]
        assert 0 < last["error_rate"] < 1
        # Admin requests themselves are not counted.
        again = (await c.get("/admin/overview", headers=_h(tmp_path))).json()
        assert sum(b["requests"] for b in again["rates"]["series"]) == 5


async def test_a_cooldown_after_an_emulator_429_shows_with_remaining_s_and_reason(
    tmp_path: Path,
) -> None:
    async with (
        gateway_stack(tmp_path, api_keys=TWO_KEYS) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        cool_a = f"[[emu:error status=429 retry_delay=30s limit=10 for={KEY_A}]] hi"
        for _ in range(2):  # one of the two meets A first (round robin)
            assert (await c.post(CHAT, json=_body(cool_a))).status_code == 200
        doc = (await c.get("/admin/overview", headers=_h(tmp_path))).json()
        a, b = _account(doc, "A"), _account(doc, "B")
        assert a["state"] == "cooling" and b["state"] == "up"
        (cd,) = a["cooldowns"]
        assert cd["model"] == "gemini-2.5-flash"
        assert 20 < cd["remaining_s"] <= 30
        assert abs(cd["until"] - (doc["now"] + cd["remaining_s"])) < 0.01
        assert "429" in cd["reason"]
        assert a["errors"] == 1 and a["last_error"]
        # The request log through the API: the rotated request with both attempts.
        rows = await _wait_rows(c, tmp_path, 2)
        rotated = [r for r in rows if len(r["attempts"]) == 2]
        assert [r["attempts"] for r in rotated] == [
            [{"account": "A", "status": 429}, {"account": "B", "status": 200}]
        ]
        assert rows[0]["ts"] >= rows[1]["ts"]  # newest first
        only_b = await _wait_rows(c, tmp_path, 1, account="B")
        assert {r["account"] for r in only_b} == {"B"}
        b_id = AccountStore(tmp_path / "accounts.json").load()[1].id
        by_id = await _wait_rows(c, tmp_path, 1, account=b_id)  # the id names it too
        assert by_id == only_b


# ---- accounts -------------------------------------------------------------------------------


async def test_disable_takes_effect_on_the_next_request_and_enable_brings_it_back(
    tmp_path: Path,
) -> None:
    async with (
        gateway_stack(tmp_path, api_keys=TWO_KEYS) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        h = {**_h(tmp_path), "content-type": "application/json"}
        r = await c.post("/admin/accounts/A/disable", headers=h,
                         content=b'{"reason": "quota\\nsaved for later"}')  # fmt: skip
        assert r.status_code == 200, r.text
        acc = r.json()
        assert acc["label"] == "A" and acc["enabled"] is False and acc["state"] == "disabled"
        assert acc["disabled_reason"] == "quota saved for later"
        for _ in range(4):  # the very next requests: all on B
            r = await c.post(CHAT, json=_body())
            assert r.status_code == 200 and r.headers["x-account-email"] == "B"
        stored = {a.label: a for a in AccountStore(tmp_path / "accounts.json").load()}
        assert stored["A"].enabled is False
        assert stored["A"].disabled_reason == "quota saved for later"
        assert stored["B"].enabled is True
        # None left: 503 naming the cause.
        r = await c.post("/admin/accounts/B/disable", headers=_h(tmp_path))
        assert r.status_code == 200 and r.json()["disabled_reason"] == "disabled from the dashboard"
        r = await c.post(CHAT, json=_body())
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_account_available"
        # Enable A (by its id this time): served by A at once.
        a_id = stored["A"].id
        r = await c.post(f"/admin/accounts/{a_id}/enable", headers=_h(tmp_path))
        assert r.status_code == 200 and r.json()["state"] == "up"
        r = await c.post(CHAT, json=_body())
        assert r.status_code == 200 and r.headers["x-account-email"] == "A"
        assert AccountStore(tmp_path / "accounts.json").load()[0].enabled is True
        # An unknown label: 404 in the admin shape.
        _admin_error(await c.post("/admin/accounts/nobody/disable", headers=_h(tmp_path)),
                     404, "account_not_found")  # fmt: skip
        # The overview agrees.
        doc = (await c.get("/admin/overview", headers=_h(tmp_path))).json()
        assert _account(doc, "A")["state"] == "up"
        assert _account(doc, "B")["state"] == "disabled"


# ---- client keys ----------------------------------------------------------------------------


async def test_keys_add_list_disable_remove_through_the_api(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.origin) as c:
        h = _h(tmp_path)
        assert (await c.get("/admin/keys", headers=h)).json() == {"keys": []}
        r = await c.post("/admin/keys", headers=h, json={
            "name": "ci", "rpm": 60, "tpm": None, "daily_tokens": None, "models": ["gemini-*"],
        })  # fmt: skip
        assert r.status_code == 201, r.text
        made = r.json()
        plain = made.pop("key")
        assert plain.startswith("rk-")
        assert made["name"] == "ci" and made["rpm"] == 60 and made["tpm"] is None
        assert made["models"] == ["gemini-*"] and made["enabled"] is True
        assert made["masked"].startswith(plain[:7]) and made["masked"].endswith(plain[-4:])
        listed = await c.get("/admin/keys", headers=h)
        assert listed.json() == {"keys": [made]} and plain not in listed.text
        # The new key works; auth turned on (auto on loopback), so no key is now a 401.
        auth = {"authorization": f"Bearer {plain}"}
        assert (await c.post(CHAT, json=_body(), headers=auth)).status_code == 200
        assert (await c.post(CHAT, json=_body())).status_code == 401
        # A client key is no admin key.
        _admin_error(await c.get("/admin/keys", headers=auth), 401, "admin_key_invalid")
        _admin_error(await c.post("/admin/keys", headers=h, json={"name": "ci"}), 409,
                     "key_exists")  # fmt: skip
        r = await c.post("/admin/keys/ci/disable", headers=h)
        assert r.status_code == 200 and r.json()["enabled"] is False
        r = await c.post(CHAT, json=_body(), headers=auth)
        assert r.status_code == 401 and r.json()["error"]["code"] == "key_disabled"
        r = await c.post("/admin/keys/ci/enable", headers=h)
        assert r.status_code == 200 and r.json()["enabled"] is True
        assert (await c.post(CHAT, json=_body(), headers=auth)).status_code == 200
        # Another key keeps auth on (with none left, auth.mode = auto on loopback is off again).
        assert (await c.post("/admin/keys", headers=h, json={"name": "other"})).status_code == 201
        r = await c.delete("/admin/keys/ci", headers=h)
        assert r.status_code == 200 and r.json()["name"] == "ci"
        r = await c.post(CHAT, json=_body(), headers=auth)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert [k["name"] for k in (await c.get("/admin/keys", headers=h)).json()["keys"]] == [
            "other"
        ]
        _admin_error(await c.delete("/admin/keys/ci", headers=h), 404, "key_not_found")
        _admin_error(await c.post("/admin/keys/ci/enable", headers=h), 404, "key_not_found")
        for bad in ({"name": "has space"}, {"name": "x", "rpm": -1}, {"name": "x", "rpm": "9"},
                    {"name": "x", "models": "gemini-*"}, {"name": "x", "extra": 1}, {},
                    {"name": "x", "tpm": True}):  # fmt: skip
            _admin_error(await c.post("/admin/keys", headers=h, json=bad), 400)


async def test_usage_by_model_account_and_key(tmp_path: Path) -> None:
    async with (
        gateway_stack(tmp_path, api_keys=TWO_KEYS) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        h = _h(tmp_path)
        plain = (await c.post("/admin/keys", headers=h, json={"name": "team"})).json()["key"]
        auth = {"authorization": f"Bearer {plain}"}
        for model in ("gemini-2.5-flash", "gemini-2.5-flash", "gemini-2.5-pro"):
            r = await c.post(CHAT, json=_body("count me", model), headers=auth)
            assert r.status_code == 200
        for by, names in (("model", {"gemini-2.5-flash", "gemini-2.5-pro"}),
                          ("account", {"A", "B"}), ("key", {"team"})):  # fmt: skip
            for rng in ("today", "7d"):
                r = await c.get("/admin/usage", params={"range": rng, "by": by}, headers=h)
                assert r.status_code == 200, r.text
                doc = r.json()
                assert doc["range"] == rng and doc["by"] == by and doc["fleet"] is False
                rows = doc["rows"]
                assert {x["name"] for x in rows} == names
                assert sum(x["requests"] for x in rows) == 3
                tokens = [x["tokens_in"] + x["tokens_out"] for x in rows]
                assert tokens == sorted(tokens, reverse=True) and all(tokens)
        flash = (await c.get("/admin/usage", headers=h)).json()["rows"][0]  # today, by model
        assert flash["name"] == "gemini-2.5-flash" and flash["requests"] == 2
        _admin_error(await c.get("/admin/usage?range=year", headers=h), 400)
        _admin_error(await c.get("/admin/usage?by=planet", headers=h), 400)
        _admin_error(await c.get("/admin/usage?rnage=today", headers=h), 400)


async def test_requests_filters_and_pages(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.origin) as c:
        h = _h(tmp_path)
        plain = (await c.post("/admin/keys", headers=h, json={"name": "k1"})).json()["key"]
        auth = {"authorization": f"Bearer {plain}"}
        for i in range(5):
            r = await c.post(CHAT, json=_body(f"n{i}"), headers=auth)
            assert r.status_code == 200
        r = await c.post(CHAT, json=_body("[[emu:error status=429 retry_delay=20s]] x",
                                          "gemini-2.5-pro"), headers=auth)  # fmt: skip
        assert r.status_code == 429
        rows = await _wait_rows(c, tmp_path, 6)
        assert len(rows) == 6 and rows[0]["status"] == 429
        assert [r["ts"] for r in rows] == sorted((r["ts"] for r in rows), reverse=True)
        assert rows[0]["attempts"] == [{"account": "emulator-demo", "status": 429}]
        assert rows[1]["key_name"] == "k1" and rows[1]["mapped_model"] == "gemini-2.5-flash"
        q = await c.get("/admin/requests", params={"status": "4xx"}, headers=h)
        assert [r["status"] for r in q.json()["rows"]] == [429]
        params = {"status": "429", "model": "gemini-2.5-pro", "key": "k1", "since": "1h"}
        q = await c.get("/admin/requests", params=params, headers=h)
        assert len(q.json()["rows"]) == 1
        q = await c.get("/admin/requests", params={"key": "other"}, headers=h)
        assert q.json()["rows"] == []
        page1 = (await c.get("/admin/requests", params={"limit": 4}, headers=h)).json()["rows"]
        before = page1[-1]["ts"]
        page2 = (await c.get("/admin/requests", params={"limit": 4, "before": before},
                             headers=h)).json()["rows"]  # fmt: skip
        assert [r["id"] for r in page1 + page2] == [r["id"] for r in rows]
        assert q.json()["instance"] == (await c.get("/admin/overview", headers=h)).json()[
            "instance"]["id"]
        for bad in ({"limit": 0}, {"limit": 501}, {"limit": "x"}, {"status": "6xx"},
                    {"since": "yesterday"}, {"before": "nan"}, {"colour": "red"}):  # fmt: skip
            _admin_error(await c.get("/admin/requests", params=bad, headers=h), 400)


async def test_config_summary_holds_no_secrets(tmp_path: Path) -> None:
    secrets = {
        "client": "sk-client-secret-0123456789",
        "admin": "adm-secret-0123456789abcdef",
        "oauth": "oauth-client-secret-0123456789",
        "proxy": "proxy-password-0123456789",
    }
    config = {
        "auth": {"mode": "strict", "api_keys": [secrets["client"]]},
        "admin": {"api_keys": [secrets["admin"]]},
        "upstream": {"oauth_client_secret": secrets["oauth"]},
        "routing": {"custom_mapping": {"my-model": "gemini-2.5-pro"}},
    }
    async with gateway_stack(tmp_path, config=config) as run:
        async with httpx.AsyncClient(base_url=run.origin) as c:
            r = await c.get("/admin/config", headers={"x-admin-key": secrets["admin"]})
            assert r.status_code == 200
            doc = r.json()
        for s in secrets.values():
            assert s not in r.text
        assert doc["auth"] == {"mode": "strict", "effective_mode": "strict", "keys": 1}
        assert doc["admin"]["keys"] == 1 and doc["admin"]["source"] == "config"
        assert doc["server"]["host"] == "127.0.0.1" and doc["state"]["backend"] == "local"
        assert doc["models"]["my-model"] == "gemini-2.5-pro"
        assert doc["models"]["gpt-4o"] == "gemini-2.5-flash"
        assert doc["limits"]["max_body_bytes"] > 0 and doc["upstream"]["proxy"] is False


def test_the_redis_url_is_shown_without_its_password() -> None:
    from rawgate.gateway.admin import _mask_url

    assert _mask_url("redis://:hunter2@db:6379/0") == "redis://***@db:6379/0"
    assert _mask_url("rediss://user:hunter2@db:6380/1") == "rediss://***@db:6380/1"
    assert _mask_url("redis://db:6379/0") == "redis://db:6379/0"
    assert "hunter2" not in _mask_url("unix://:hunter2@/run/redis.sock")


# ---- bad input ------------------------------------------------------------------------------


async def test_bad_input_gets_the_admin_error_shape_never_a_500(tmp_path: Path) -> None:
    async with (
        gateway_stack(tmp_path, api_keys=TWO_KEYS) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        h = _h(tmp_path)
        j = {**h, "content-type": "application/json"}
        _admin_error(await c.post("/admin/keys", headers=j, content=b"{not json"), 400,
                     "invalid_json")  # fmt: skip
        _admin_error(await c.post("/admin/keys", headers=j, content=b"[1, 2]"), 400,
                     "invalid_json")  # fmt: skip
        for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            r = await c.post("/admin/keys", headers={**h, "content-type": ct}, content=b"{}")
            _admin_error(r, 415)
        # A body with no Content-Type at all is refused too on a write.
        raw = await _raw(run.server.port, "POST", "/admin/accounts/A/disable",
                         f"X-Admin-Key: {_key(tmp_path)}", body=b'{"reason": "x"}')  # fmt: skip
        assert raw.status == 415
        assert run.gateway.accounts[0].enabled
        _admin_error(await c.post("/admin/accounts/A/disable", headers=j,
                                  content=b'{"reason": 5}'), 400)  # fmt: skip
        _admin_error(await c.get("/admin/nope", headers=h), 404, "not_found")
        _admin_error(await c.get("/admin", headers=h), 404)
        _admin_error(await c.post("/admin/overview", headers=h), 405)
        _admin_error(await c.get("/admin/accounts/A/disable", headers=h), 405)
        _admin_error(await c.put("/admin/keys", headers=h), 405)
        _admin_error(await c.post("/admin/accounts/%ff/disable", headers=h), 400)
        _admin_error(await c.post("/admin/accounts/%2e%2e/disable", headers=h), 404)
        # A sweep of odd requests: never a 500, always the admin shape.
        paths = ["/admin/", "/admin//", "/admin/accounts", "/admin/accounts/A",
                 "/admin/accounts/A/explode", "/admin/keys/", "/admin/keys//disable",
                 "/admin/keys/a/b/c", "/admin/requests?limit=1e9", "/admin/usage?range=",
                 "/admin/requests?since=99999999d", "/admin/requests?before=1e400",
                 "/admin/usage?%ff=1", "/admin/overview?x=1"]  # fmt: skip
        bodies = [b"", b"{}", b"null", b'"s"', b"{" * 100, b'{"reason": "' + b"r" * 70_000 + b'"}']
        for path in paths:
            for method in ("GET", "POST", "DELETE", "PATCH"):
                for body in bodies[:1] if method == "GET" else bodies:
                    r = await c.request(method, path, headers=j, content=body)
                    assert 400 <= r.status_code < 500 or r.status_code == 200, (method, path)
                    if r.status_code != 200:
                        _admin_error(r, r.status_code)


async def test_running_on_redis_says_fleet_and_reads_the_shared_usage(
    tmp_path: Path, redis_server: Any
) -> None:
    from rawgate.config import build_config
    from rawgate.state.store import open_state

    config = {"state": {"backend": "redis", "redis_url": redis_server.url,
                        "key_prefix": f"adm{time.monotonic_ns()}:"}}  # fmt: skip
    # The same accounts in accounts.json (what serve reads) and in Redis (`rawgate accounts`).
    store = AccountStore(tmp_path / "accounts.json")
    for key, label in TWO_KEYS:
        store.add_api_key(key, label=label)
    async with open_state(build_config(config, {}, {}), tmp_path, background=False) as st:
        assert await st.import_accounts(store.load()) == (2, 0)
    async with (
        gateway_stack(tmp_path, config=config) as run,
        httpx.AsyncClient(base_url=run.origin) as c,
    ):
        h = _h(tmp_path)
        plain = (await c.post("/admin/keys", headers=h, json={"name": "fleet"})).json()["key"]
        r = await c.post(CHAT, json=_body(), headers={"authorization": f"Bearer {plain}"})
        assert r.status_code == 200
        # A disable lands in both stores.
        r = await c.post("/admin/accounts/A/disable", headers=h)
        assert r.status_code == 200 and r.json()["state"] == "disabled"
        assert run.gateway.store.load()[0].enabled is False
        async with open_state(build_config(config, {}, {}), tmp_path, background=False) as st:
            shared = {a.label: a for a in await st.load_accounts()}
        assert shared["A"].enabled is False and shared["B"].enabled is True
        assert shared["A"].disabled_reason == "disabled from the dashboard"
        doc = (await c.get("/admin/overview", headers=h)).json()
        assert doc["instance"]["fleet"] is True and doc["instance"]["state_backend"] == "redis"
        deadline = time.monotonic() + WAIT_S
        while True:  # usage is recorded in the background on Redis
            usage = (await c.get("/admin/usage?by=key", headers=h)).json()
            if usage["rows"]:
                break
            assert time.monotonic() < deadline
            await anyio.sleep(0.05)
        assert usage["fleet"] is True and usage["rows"][0]["name"] == "fleet"
        cfg = (await c.get("/admin/config", headers=h)).json()
        assert cfg["state"]["redis_url"] == redis_server.url


async def test_redis_down_admin_writes_are_503_and_the_overview_says_degraded(
    tmp_path: Path,
) -> None:
    from tests.helpers_redis import RedisServer

    srv = RedisServer().start()
    try:
        config = {"state": {"backend": "redis", "redis_url": srv.url, "redis_timeout_ms": 200}}
        async with (
            gateway_stack(tmp_path, config=config) as run,
            httpx.AsyncClient(base_url=run.origin, timeout=10) as c,
        ):
            h = _h(tmp_path)
            made = await c.post("/admin/keys", headers=h, json={"name": "a"})
            assert made.status_code == 201
            auth = {"authorization": f"Bearer {made.json()['key']}"}
            srv.kill()
            r = await c.post("/admin/keys", headers=h, json={"name": "b"})
            _admin_error(r, 503, "state_unavailable")
            assert srv.url not in r.text
            _admin_error(await c.get("/admin/keys", headers=h), 503, "state_unavailable")
            _admin_error(await c.get("/admin/usage", headers=h), 503, "state_unavailable")
            # The gateway still serves, and the overview says how.
            assert (await c.post(CHAT, json=_body(), headers=auth)).status_code == 200
            doc = (await c.get("/admin/overview", headers=h)).json()
            assert doc["instance"]["state"] == "degraded" and doc["instance"]["fleet"] is True
    finally:
        srv.kill()


async def test_an_open_breaker_shows_as_breaker_open_with_its_end(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.origin) as c:
        for _ in range(3):  # one account: three 5xx in a row open its breaker
            r = await c.post(CHAT, json=_body("[[emu:error status=500]] x"))
            assert r.status_code >= 500
        doc = (await c.get("/admin/overview", headers=_h(tmp_path))).json()
        acc = _account(doc, "emulator-demo")
        assert acc["state"] == "breaker_open" and acc["errors"] == 3
        first = acc["cooldowns"][0]
        assert first["model"] == "" and "breaker" in first["reason"]
        assert 0 < first["remaining_s"] <= 5
        assert acc["last_error"]
