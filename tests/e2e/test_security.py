"""Issue 12 items 6-8, each as the attack it is, on real loopback sockets (HTTP/1.1 and h2c).

6. The model name must never steer the upstream URL (`:countTokens`, `?key=`, `../`): the
   emulator's record of what it received (`emu.core.recent`) is the proof.
7. CR/LF in the model name is a 400 on both protocols, never a 500 or a dead h2 stream; the
   drivers refuse CR/LF/NUL in any response header before a byte is sent.
8. A web page cannot use the gateway: a foreign Origin is a 403 (the text/plain "simple"
   request included), a non-loopback Host is a 403 while bound to loopback (DNS rebinding),
   POST bodies must be JSON (415), /metrics never answers cross-origin.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from rawgate.config import Config, ConfigError, ServerConfig, build_config
from rawgate.conn import ServerState
from rawgate.http.app import GatewayApp
from rawgate.http.listener import open_server
from rawgate.model_router import InvalidModel, ModelRouter
from rawgate.respond import json_response
from rawgate.seam import Request, ResponseSink
from tests.helpers_app import call
from tests.helpers_gateway import Running, gateway_stack
from tests.helpers_h1 import Response, exchange
from tests.helpers_h2 import h2_client

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
JSON_CT = "application/json"
INJECTIONS = [
    "gemini-2.5-flash:countTokens?",  # another method of the same model
    "gemini-2.5-flash:generateContent?key=X&",  # query parameters of the attacker's choosing
    "../../v1internal:loadCodeAssist?",  # a walk out of /v1beta/models/
    "gemini-2.5-flash/../../v1beta/files",
    "gemini-2.5-flash%3AcountTokens",
    "gemini-2.5-flash#frag",
]


def chat_body(model: str, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def h1_request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    host: str | None = None,
    content_type: str | None = JSON_CT,
    headers: tuple[str, ...] = (),
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
    if content_type is not None and body:
        lines.append(f"Content-Type: {content_type}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def h1(port: int, *args: Any, **kw: Any) -> Response:
    async with await anyio.connect_tcp("127.0.0.1", port) as s:
        (r,) = await exchange(s, h1_request(port, *args, **kw))
    return r


def error_of(r: Any) -> dict[str, Any]:
    doc = json.loads(r.body)
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    err: dict[str, Any] = doc["error"]
    return err


@asynccontextmanager
async def stack(tmp_path: Path, **server: Any) -> AsyncIterator[Running]:
    config = {"server": server} if server else None
    async with gateway_stack(tmp_path, config=config) as run:
        run.emulator.core.recent.clear()
        yield run


def upstream_calls(run: Running) -> list[tuple[str, str, str]]:
    return [(m, p, q) for m, p, q, _, _ in run.emulator.core.recent]


# ---- 6: the model name never steers the upstream URL --------------------------------------------


async def test_model_url_injections_never_reach_the_upstream(tmp_path: Path) -> None:
    async with stack(tmp_path) as run:
        port = run.server.port
        for route in (CHAT, "/v1/completions", "/v1/responses"):
            for name in INJECTIONS:
                if route == CHAT:
                    body = chat_body(name)
                elif route == "/v1/completions":
                    body = json.dumps({"model": name, "prompt": "hi"}).encode()
                else:
                    body = json.dumps({"model": name, "input": "hi"}).encode()
                r = await h1(port, "POST", route, body)
                assert r.status == 400, (route, name, r.body)
                err = error_of(r)
                assert err["param"] == "model" and err["code"] == "invalid_model"
                assert err["type"] == "invalid_request_error"
                assert r.header(b"x-mapped-model") is None
        assert upstream_calls(run) == []  # before: /v1beta/models/gemini-2.5-flash:countTokens ...
        # The same client, a real name: exactly one call, on the escaped path, no query.
        r = await h1(port, "POST", CHAT, chat_body("gemini-2.5-flash"))
        assert r.status == 200
        assert upstream_calls(run) == [
            ("POST", "/v1beta/models/gemini-2.5-flash:generateContent", "")
        ]


async def test_mapped_and_aliased_names_reach_their_gemini_path(tmp_path: Path) -> None:
    # A client name may hold "/" or "@" when a mapping turns it into a Gemini id.
    async with gateway_stack(
        tmp_path, config={"routing": {"custom_mapping": {"org/team-model@v1": "gemini-2.5-pro"}}}
    ) as run:
        run.emulator.core.recent.clear()
        port = run.server.port
        for name, path in (
            ("org/team-model@v1", "/v1beta/models/gemini-2.5-pro:streamGenerateContent"),
            ("gpt-4o", "/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
            ("models/gemini-2.5-flash", "/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
        ):
            run.emulator.core.recent.clear()
            r = await h1(port, "POST", CHAT, chat_body(name, stream=True))
            assert r.status == 200, r.body
            assert upstream_calls(run) == [("POST", path, "alt=sse")]


@pytest.mark.parametrize(
    "target", ["gemini:countTokens", "../v1internal", "a?key=1", "a/b", "a%2Fb", "-x", ".."]
)
def test_mapping_targets_must_be_gemini_ids(target: str) -> None:
    with pytest.raises(ConfigError, match="Gemini model id"):
        ModelRouter("gemini-2.5-flash", {"gpt-x": target})
    for tier in ("default_model", "pro_model", "lite_model"):
        kw = {"default_model": "gemini-2.5-flash", tier: target}
        with pytest.raises(ConfigError, match="Gemini model id"):
            ModelRouter(kw.pop("default_model"), {}, **kw)
        # ... and a start-up line from the config, before any server is built.
        env = {f"RAWGATE_ROUTING_{tier.upper()}": target}
        want = f"^RAWGATE_ROUTING_{tier.upper()}: routing: the {tier[:-6]} model"
        with pytest.raises(ConfigError, match=want):
            build_config({}, env, {}, source="env")
    with pytest.raises(ConfigError, match=r"^cfg: routing\.custom_mapping: value of 'gpt-x'"):
        build_config({"routing": {"custom_mapping": {"gpt-x": target}}}, {}, {}, source="cfg")


@pytest.mark.parametrize(
    "name",
    [
        *INJECTIONS,
        "",
        " ",
        "a b",
        "gemini\r\nx: 1",
        "gemini\n",
        "g\x00",
        "g\x7f",
        "x" * 257,
        "gemini\u2028x",
        "caf\u00e9",
    ],
)
def test_router_refuses_what_is_not_a_model_name(name: str) -> None:
    r = ModelRouter("gemini-2.5-flash", {"caf\u00e9-*": "gemini-2.5-pro"})
    if name == "caf\u00e9":  # printable non-ASCII is a fine client name when it maps
        with pytest.raises(InvalidModel):
            ModelRouter("gemini-2.5-flash").resolve(name)
        assert r.resolve("caf\u00e9-1") == "gemini-2.5-pro"
        return
    with pytest.raises(InvalidModel) as info:
        r.resolve(name)
    assert info.value.status == 400 and info.value.param == "model"
    assert name not in r._memo  # refused names never fill the memo


# ---- 7: CR/LF never reaches a header ------------------------------------------------------------


async def test_crlf_model_is_a_400_on_h1_and_h2(tmp_path: Path) -> None:
    evil = "gemini-2.5-flash\r\nx-evil: 1"
    async with stack(tmp_path) as run:
        port = run.server.port
        for stream in (False, True):
            r = await h1(port, "POST", CHAT, chat_body(evil, stream))
            assert r.status == 400  # before: 500 (h1) from the x-mapped-model header
            assert error_of(r)["param"] == "model"
            assert r.header(b"x-evil") is None and r.header(b"x-mapped-model") is None
        async with h2_client("127.0.0.1", port) as c:
            for stream in (False, True):
                resp = await c.request(
                    "POST", CHAT, [(b"content-type", b"application/json")], chat_body(evil, stream)
                )
                # before: the stream died, the client's h2 raised PROTOCOL_ERROR on \r\n
                assert resp.status == 400
                assert json.loads(resp.body)["error"]["param"] == "model"
                assert resp.header(b"x-mapped-model") is None
            ok = await c.request(
                "POST", CHAT, [(b"content-type", b"application/json")], chat_body("gpt-4o")
            )
            assert ok.status == 200 and ok.header(b"x-mapped-model") == b"gemini-2.5-flash"
            assert c.goaway is None and c.error is None
        assert upstream_calls(run) == [
            ("POST", "/v1beta/models/gemini-2.5-flash:generateContent", "")
        ]


async def test_request_id_echo_only_when_sane_on_h1_and_h2(tmp_path: Path) -> None:
    async with stack(tmp_path) as run:
        port = run.server.port
        r = await h1(port, "GET", "/healthz", headers=("X-Request-Id: a b<c>",))
        rid = r.header(b"x-request-id")
        assert rid is not None and len(rid) == 16 and rid.isalnum()
        async with h2_client("127.0.0.1", port) as c:
            resp = await c.request("GET", "/healthz", [(b"x-request-id", b'a b"c')])
            assert resp.header(b"x-request-id") != b'a b"c'
            resp = await c.request("GET", "/healthz", [(b"x-request-id", b"trace-1")])
            assert resp.header(b"x-request-id") == b"trace-1"


@asynccontextmanager
async def bad_header_server() -> AsyncIterator[int]:
    """A GatewayApp whose handler tries to emit a header value holding CR/LF or NUL."""
    cfg = Config()
    state = ServerState()
    app = GatewayApp(cfg, state)

    async def bad(request: Request, sink: ResponseSink) -> None:
        value = b"a\r\nset-cookie: x=1" if request.query == "crlf" else b"a\x00b"
        if request.query == "stream":
            await sink.start(200, [(b"x-bad", b"a\nb")])
            return
        await json_response(sink, 200, b"{}", [(b"x-bad", value)])

    app.router.add("GET", "/bad", bad)
    async with open_server(app, cfg, host="127.0.0.1", port=0, state=state) as server:
        yield server.port


async def test_drivers_refuse_crlf_nul_in_response_headers() -> None:
    async with bad_header_server() as port:
        for q in ("crlf", "nul", "stream"):
            r = await h1(port, "GET", "/bad?" + q)
            assert r.status == 500, r  # the app's clean 500, never a split header
            assert r.header(b"set-cookie") is None and r.header(b"x-bad") is None
        async with h2_client("127.0.0.1", port) as c:
            for q in ("crlf", "nul", "stream"):
                resp = await c.request("GET", "/bad?" + q)  # a reset would raise here
                assert resp.status == 500
                assert resp.header(b"x-bad") is None
            assert (await c.request("GET", "/healthz")).status == 200
            assert c.goaway is None and c.error is None


# ---- 8: web pages ----------------------------------------------------------------------------


async def test_evil_page_text_plain_post_is_refused_on_h1_and_h2(tmp_path: Path) -> None:
    """`fetch("http://127.0.0.1:8045/v1/chat/completions", {method: "POST", body})` from
    https://evil.example: a simple request (text/plain, no preflight) that the browser sends."""
    async with stack(tmp_path) as run:
        port = run.server.port
        origin = "Origin: https://evil.example"
        for ct in ("text/plain;charset=UTF-8", JSON_CT, None):
            r = await h1(
                port, "POST", CHAT, chat_body("gpt-4o"), content_type=ct, headers=(origin,)
            )
            assert r.status == 403, r  # before: 200 with access-control-allow-origin: *
            assert error_of(r)["code"] == "origin_not_allowed"
            assert r.header(b"access-control-allow-origin") is None
        async with h2_client("127.0.0.1", port) as c:
            resp = await c.request(
                "POST",
                CHAT,
                [(b"content-type", b"text/plain"), (b"origin", b"https://evil.example")],
                chat_body("gpt-4o"),
            )
            assert resp.status == 403
            assert resp.header(b"access-control-allow-origin") is None
        # Preflights and GETs from the page are refused the same way; `null` is foreign too.
        r = await h1(port, "OPTIONS", CHAT, headers=(origin, "Access-Control-Request-Method: POST"))
        assert r.status == 403 and r.header(b"access-control-allow-origin") is None
        r = await h1(port, "GET", "/v1/models", headers=("Origin: null",))
        assert r.status == 403
        assert upstream_calls(run) == []  # no quota spent


async def test_post_body_must_be_json(tmp_path: Path) -> None:
    async with stack(tmp_path) as run:
        port = run.server.port
        for ct in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; b=x",
            "application/jsonx",
            "text/json",
            "",
        ):
            r = await h1(port, "POST", CHAT, chat_body("gpt-4o"), content_type=ct)
            assert r.status == 415, (ct, r)
            err = error_of(r)
            assert err["code"] == "unsupported_media_type"
            assert "Content-Type: application/json" in err["message"]
        assert upstream_calls(run) == []
        # JSON with parameters or in another case, and no Content-Type at all (not a browser:
        # a cross-origin browser POST always carries Origin), are accepted.
        for ok_ct in ("application/json; charset=utf-8", "Application/JSON", None):
            r = await h1(port, "POST", CHAT, chat_body("gpt-4o"), content_type=ok_ct)
            assert r.status == 200, (ok_ct, r)
        async with h2_client("127.0.0.1", port) as c:
            resp = await c.request(
                "POST", CHAT, [(b"content-type", b"text/plain")], chat_body("gpt-4o")
            )
            assert resp.status == 415


async def test_dns_rebinding_host_is_refused_while_on_loopback(tmp_path: Path) -> None:
    async with stack(tmp_path) as run:
        port = run.server.port
        for host in (
            f"evil.example:{port}",
            "evil.example",
            f"127.0.0.1.evil.example:{port}",
            f"192.168.1.5:{port}",
            f"localhost.evil:{port}",
            "a b",
        ):
            # The page at http://evil.example:PORT, its name re-pointed at 127.0.0.1: to the
            # browser this is same-origin, so only the Host tells.
            r = await h1(
                port,
                "POST",
                CHAT,
                chat_body("gpt-4o"),
                host=host,
                headers=(f"Origin: http://{host}",),
            )
            assert r.status == 403, (host, r)  # before: 200
            assert error_of(r)["code"] == "host_not_allowed"
            r = await h1(port, "GET", "/v1/models", host=host)
            assert r.status == 403
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            "localhost",
            f"[::1]:{port}",
            f"LOCALHOST:{port}",
            f"localhost.:{port}",
        ):
            r = await h1(port, "POST", CHAT, chat_body("gpt-4o"), host=host)
            assert r.status == 200, (host, r)
        async with h2_client("127.0.0.1", port, authority=f"evil.example:{port}") as c:
            resp = await c.request("GET", "/v1/models")
            assert resp.status == 403
        assert len(upstream_calls(run)) == 6  # the six allowed requests only


async def test_allowed_hosts_and_lan_binding(tmp_path: Path) -> None:
    async with stack(tmp_path, allowed_hosts=["rawgate.lan", "box:9999"]) as run:
        port = run.server.port
        assert (await h1(port, "GET", "/v1/models", host=f"rawgate.lan:{port}")).status == 200
        assert (await h1(port, "GET", "/v1/models", host="box:9999")).status == 200
        assert (await h1(port, "GET", "/v1/models", host="box:9998")).status == 403
        assert (await h1(port, "GET", "/v1/models", host="localhost")).status == 200
    # Listening on all interfaces (auth on by default there), no Host check unless configured.
    lan = GatewayApp(
        build_config({"server": {"allow_lan_access": True}, "auth": {"api_keys": ["sk-1"]}}, {}, {})
    )
    assert (await call(lan, "GET", "/healthz", [("host", "192.168.1.5:8045")])).status == 200
    off = GatewayApp(Config(server=ServerConfig(allowed_hosts=["*"])))
    assert (await call(off, "GET", "/healthz", [("host", "anything.example")])).status == 200
    named = GatewayApp(Config(server=ServerConfig(host="0.0.0.0", allowed_hosts=["gw"])))
    assert (await call(named, "GET", "/healthz", [("host", "evil.example")])).status == 403
    assert (await call(named, "GET", "/healthz", [("host", "gw:8045")])).status == 200


async def test_loopback_origins_are_allowed_by_default(tmp_path: Path) -> None:
    async with stack(tmp_path) as run:
        port = run.server.port
        for origin in (
            "http://localhost:5173",
            "http://127.0.0.1:3000",
            "http://[::1]:8080",
            "https://localhost",
            f"http://127.0.0.1:{port}",
        ):
            r = await h1(
                port,
                "OPTIONS",
                CHAT,
                headers=(
                    f"Origin: {origin}",
                    "Access-Control-Request-Method: POST",
                    "Access-Control-Request-Headers: content-type, authorization",
                ),
            )
            assert r.status == 204, (origin, r)
            assert r.header(b"access-control-allow-origin") == origin.encode()
            assert r.header(b"vary") == b"origin"
            r = await h1(port, "POST", CHAT, chat_body("gpt-4o"), headers=(f"Origin: {origin}",))
            assert r.status == 200
            assert r.header(b"access-control-allow-origin") == origin.encode()
        for foreign in (
            "http://localhost.evil.example",
            "http://localhost:80x",
            "http://127.0.0.2:3000",
            "file://",
            "http://localhost:5173/path",
        ):
            r = await h1(port, "GET", "/v1/models", headers=(f"Origin: {foreign}",))
            assert r.status == 403, (foreign, r)


async def test_metrics_never_answers_cross_origin(tmp_path: Path) -> None:
    async with stack(tmp_path) as run:
        port = run.server.port
        for origin in ("https://evil.example", "http://localhost:3000"):  # allowed or not
            r = await h1(port, "GET", "/metrics", headers=(f"Origin: {origin}",))
            assert r.status == 403, (origin, r)  # before: 200 with access-control-allow-origin: *
            assert r.header(b"access-control-allow-origin") is None
            r = await h1(
                port,
                "OPTIONS",
                "/metrics",
                headers=(f"Origin: {origin}", "Access-Control-Request-Method: GET"),
            )
            assert r.status == 403
        for path in ("/admin/keys", "/ui", "/ui/app.js"):
            r = await h1(port, "GET", path, headers=("Origin: http://localhost:3000",))
            assert r.status == 403, path
        # rawgate's own pages (same origin) and non-browser clients (no Origin) are served.
        r = await h1(port, "GET", "/metrics", headers=(f"Origin: http://127.0.0.1:{port}",))
        assert r.status == 200
        assert (await h1(port, "GET", "/metrics")).status == 200


async def test_a_configured_browser_app_can_call_it(tmp_path: Path) -> None:
    """The README's recipe: cors_allowed_origins names the app; it then works end to end."""
    async with stack(tmp_path, cors_allowed_origins=["https://app.example"]) as run:
        port = run.server.port
        app_origin = "Origin: https://app.example"
        r = await h1(
            port,
            "OPTIONS",
            CHAT,
            headers=(
                app_origin,
                "Access-Control-Request-Method: POST",
                "Access-Control-Request-Headers: authorization, content-type",
            ),
        )
        assert r.status == 204
        assert r.header(b"access-control-allow-origin") == b"https://app.example"
        r = await h1(port, "POST", CHAT, chat_body("gpt-4o"), headers=(app_origin,))
        assert r.status == 200
        assert r.header(b"access-control-allow-origin") == b"https://app.example"
        assert b"x-mapped-model" in (r.header(b"access-control-expose-headers") or b"")
        # The list replaces the default: loopback dev origins are no longer allowed.
        r = await h1(
            port, "POST", CHAT, chat_body("gpt-4o"), headers=("Origin: http://localhost:5173",)
        )
        assert r.status == 403


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cors_allowed_origins", ["https://app.example/path"]),
        ("cors_allowed_origins", ["app.example"]),
        ("cors_allowed_origins", ["https://app.example:*x"]),
        ("allowed_hosts", ["http://gw.lan"]),
        ("allowed_hosts", ["gw.lan/x"]),
    ],
)
def test_bad_origin_and_host_settings_are_start_up_errors(key: str, value: list[str]) -> None:
    with pytest.raises(ConfigError, match=f"server.{key}"):
        build_config({"server": {key: value}}, {}, {})


def test_origin_and_host_settings_from_env() -> None:
    cfg = build_config(
        {},
        {
            "RAWGATE_SERVER_CORS_ALLOWED_ORIGINS": "https://a.example, *",
            "RAWGATE_SERVER_ALLOWED_HOSTS": "gw.lan,gw.lan:9000",
        },
        {},
    )
    assert cfg.server.cors_allowed_origins == ["https://a.example", "*"]
    assert cfg.server.allowed_hosts == ["gw.lan", "gw.lan:9000"]
