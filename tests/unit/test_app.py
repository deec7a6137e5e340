"""GatewayApp through the Request/ResponseSink seam (no sockets): auth matrix, path tricks,
routing hints, 405, CORS, request ids, error mapping, the in-flight cap and the access log."""

from __future__ import annotations

import hmac
import io
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import orjson
import pytest

from rawgate.config import AuthConfig, Config, ConfigError, LimitsConfig, ServerConfig
from rawgate.errors import BadRequest, RateLimited
from rawgate.http.app import GatewayApp, Router, path_param
from rawgate.logs import configure_logging
from rawgate.respond import SSE_DONE, json_response, sse_headers
from rawgate.seam import ClientDisconnected, Request, ResponseSink
from tests.helpers_app import RecordingSink, call, make_request

pytestmark = pytest.mark.anyio

GOOD = "sk-good-canary-4242"
OTHER_GOOD = "sk-second-key"
WRONG = "sk-wrong-canary-1717"


class Calls:
    """Handlers that record which protected code ran, so a bypass cannot hide behind a 404."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def ok(self, request: Request, sink: ResponseSink) -> None:
        self.seen.append((request.method, request.path))
        await json_response(sink, 200, b'{"ok":true}')

    async def model(self, request: Request, sink: ResponseSink) -> None:
        name = path_param(request, "/v1/models/")
        self.seen.append((request.method, name))
        await json_response(sink, 200, orjson.dumps({"id": name}))

    async def gemini(self, request: Request, sink: ResponseSink) -> None:
        self.seen.append((request.method, request.path))
        await json_response(sink, 200, b"{}")


def make_app(
    mode: str = "off",
    keys: tuple[str, ...] = (GOOD, OTHER_GOOD),
    *,
    lan: bool = False,
    origins: tuple[str, ...] = ("*",),
    hosts: tuple[str, ...] = (),
    max_in_flight: int = 1024,
) -> tuple[GatewayApp, Calls]:
    cfg = Config(
        server=ServerConfig(
            allow_lan_access=lan, cors_allowed_origins=list(origins), allowed_hosts=list(hosts)
        ),
        auth=AuthConfig(mode=mode, api_keys=list(keys)),  # type: ignore[arg-type]
        limits=LimitsConfig(max_in_flight=max_in_flight),
    )
    app = GatewayApp(cfg)
    calls = Calls()
    app.router.add("GET", "/v1/models", calls.ok)
    app.router.add("GET", "/v1/models/", calls.model, prefix=True)
    app.router.add("POST", "/v1/chat/completions", calls.ok)
    app.router.add("POST", "/v1/responses", calls.ok)
    app.router.add("POST", "/v1/completions", calls.ok)
    app.router.add("POST", "/v1beta/models/", calls.gemini, prefix=True, query_key=True)
    return app, calls


# ---- auth: every mode x every header form x key value x route kind -----------------------------

MODES = {  # name -> (mode, allow_lan_access, effective mode)
    "off": ("off", False, "off"),
    "strict": ("strict", False, "strict"),
    "all_except_health": ("all_except_health", False, "all_except_health"),
    "auto-local": ("auto", False, "off"),
    "auto-lan": ("auto", True, "all_except_health"),
}

KEYS: dict[str, tuple[bytes, bool]] = {  # name -> (presented bytes, is valid)
    "good": (GOOD.encode(), True),
    "second": (OTHER_GOOD.encode(), True),
    "wrong": (WRONG.encode(), False),
    "non-ascii": (GOOD.encode() + b"\xe9", False),
    "non-ascii-only": (b"\xff\xfe\x80", False),
    "empty": (b"", False),
    "prefix-of-good": (GOOD.encode()[:-1], False),
    "huge": (b"k" * 8192, False),
}

Form = Callable[[bytes], tuple[list[tuple[bytes, bytes]], str]]
FORMS: dict[str, Form] = {  # name -> how a key is presented: (headers, query)
    "bearer": lambda k: ([(b"authorization", b"Bearer " + k)], ""),
    "bearer-lower": lambda k: ([(b"authorization", b"bearer " + k)], ""),
    "bearer-upper": lambda k: ([(b"authorization", b"BEARER " + k)], ""),
    "bearer-tab": lambda k: ([(b"authorization", b"Bearer\t" + k)], ""),
    "raw-authorization": lambda k: ([(b"authorization", k)], ""),
    "x-api-key": lambda k: ([(b"x-api-key", k)], ""),
    "x-goog-api-key": lambda k: ([(b"x-goog-api-key", k)], ""),
    "query-key": lambda k: ([], "key=" + k.decode("latin-1").encode().hex()),
}

ROUTES = {  # name -> (method, path, auth level)
    "protected": ("GET", "/v1/models", "protected"),
    "prefix": ("GET", "/v1/models/gemini-2.5-flash", "protected"),
    "gemini": ("POST", "/v1beta/models/gemini-2.5-flash:generateContent", "gemini"),
    "healthz": ("GET", "/healthz", "health"),
    "health-head": ("HEAD", "/health", "health"),
    "metrics": ("GET", "/metrics", "protected"),
}


def _expected(effective: str, level: str, form: str, valid: bool) -> int:
    if effective == "off":
        return 200
    if level == "health" and effective == "all_except_health":
        return 200
    # ?key= counts only on Gemini-style routes.
    accepted = valid and (form != "query-key" or level == "gemini")
    return 200 if accepted else 401


def _hexquery(query: str) -> str:
    """FORMS builds `key=<hex>` so any byte survives; turn it into %XX escapes."""
    name, _, hexed = query.partition("=")
    raw = bytes.fromhex(hexed)
    return name + "=" + "".join(f"%{b:02X}" for b in raw)


CASES = list(itertools.product(MODES, FORMS, KEYS, ROUTES))


@pytest.mark.parametrize(("mode", "form", "key", "route"), CASES)
async def test_auth_matrix(mode: str, form: str, key: str, route: str) -> None:
    cfg_mode, lan, effective = MODES[mode]
    app, calls = make_app(cfg_mode, lan=lan)
    presented, valid = KEYS[key]
    headers, query = FORMS[form](presented)
    method, path, level = ROUTES[route]
    target = path + ("?" + _hexquery(query) if query else "")
    sink = await call(app, method, target, headers)
    want = _expected(effective, level, form, valid)
    assert sink.status == want, sink.body
    if want == 401:
        _assert_401(sink)
        assert calls.seen == []
    for secret in (GOOD.encode(), WRONG.encode(), presented):
        if len(secret) > 3:
            assert secret not in sink.body


@pytest.mark.parametrize(("mode", "route"), list(itertools.product(MODES, ROUTES)))
async def test_auth_missing_key(mode: str, route: str) -> None:
    cfg_mode, lan, effective = MODES[mode]
    app, calls = make_app(cfg_mode, lan=lan)
    method, path, level = ROUTES[route]
    sink = await call(app, method, path)
    open_ = effective == "off" or (level == "health" and effective == "all_except_health")
    if open_:
        assert sink.status == 200
    else:
        _assert_401(sink)
        assert b"Missing API key" in sink.body
        assert calls.seen == []


def _assert_401(sink: RecordingSink) -> None:
    assert sink.status == 401
    assert sink.json() == {
        "error": {
            "message": sink.json()["error"]["message"],  # type: ignore[index]
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert sink.header("www-authenticate") == b'Bearer realm="rawgate"'
    assert sink.header("x-request-id")


# ---- auth: path tricks never reach a protected handler unauthenticated -------------------------

TRICKS = [
    "/healthz/../v1/models",
    "/healthz/..%2fv1/models",
    "/healthz/%2e%2e/v1/models",
    "//v1/models",
    "/v1//models",
    "/v1%2Fmodels",
    "/v1%2fmodels",
    "/%76%31/models",
    "/./v1/models",
    "/v1/./models",
    "/v1/models/",
    "/V1/models",
    "/v1/Models",
    "/v1/models;x",
    "/v1/models%00",
    "/v1/models%20",
    "/v1/../healthz",
    "/v1/%2e%2e/healthz",
    "/healthz/",
    "/healthz/.",
    "/HEALTHZ",
    "/Health",
    "/healthz%2f..%2fv1%2fmodels",
    "/healthz;/v1/models",
    "/metrics/",
    "/nonexistent",
]


@pytest.mark.parametrize(("mode", "target"), list(itertools.product(MODES, TRICKS)))
async def test_path_tricks(mode: str, target: str) -> None:
    cfg_mode, lan, effective = MODES[mode]
    app, calls = make_app(cfg_mode, lan=lan)
    for method in ("GET", "POST", "HEAD"):
        sink = await call(app, method, target)
        assert calls.seen == [], (method, target)
        # Unknown to the router: never 200; with auth on, a 401 that reveals nothing more.
        assert sink.status == (404 if effective == "off" else 401), (method, target, sink.body)
        # With the key the client is told the path is unknown (or the method is wrong).
        sink = await call(app, method, target, [("authorization", f"Bearer {GOOD}")])
        assert sink.status in (404, 405), (method, target)
        assert calls.seen == []


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "target", ["/healthz?x=/v1/models", "/healthz#/v1/models", "/healthz?key=x&a=/v1/models"]
)
async def test_query_and_fragment_stay_on_health(mode: str, target: str) -> None:
    cfg_mode, lan, effective = MODES[mode]
    app, calls = make_app(cfg_mode, lan=lan)
    sink = await call(app, "GET", target)
    assert sink.status == (401 if effective == "strict" else 200)
    if sink.status == 200:
        assert orjson.loads(sink.body)["status"] == "ok"
    assert calls.seen == []


async def test_options_star_and_unknown_method() -> None:
    app, calls = make_app("strict")
    for method, target in [("OPTIONS", "*"), ("CONNECT", "/v1/models"), ("TRACE", "/healthz")]:
        assert (await call(app, method, target)).status == 401
    good = [("authorization", f"Bearer {GOOD}")]
    assert (await call(app, "OPTIONS", "*", good)).status == 404
    sink = await call(app, "DELETE", "/v1/models", good)
    assert sink.status == 405
    assert calls.seen == []


# ---- auth: header details ----------------------------------------------------------------------

G = f"Bearer {GOOD}"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("authorization", f"Bearer  {GOOD}")], 200),  # extra blanks before the key
        ([("authorization", f"Bearer {GOOD} ")], 200),  # trailing blank
        ([("authorization", f"Bearer {GOOD} extra")], 401),
        ([("authorization", f"Bearer {GOOD}, Bearer {WRONG}")], 401),
        ([("authorization", f"Bearer{GOOD}")], 401),  # no separator: taken as a raw key
        ([("authorization", f"Basic {GOOD}")], 401),
        ([("authorization", G), ("authorization", G)], 401),  # duplicates: ambiguous
        ([("authorization", G), ("authorization", f"Bearer {WRONG}")], 401),
        ([("authorization", f"Bearer {WRONG}"), ("authorization", G)], 401),
        ([("x-api-key", GOOD), ("x-api-key", WRONG)], 401),
        ([("authorization", f"Bearer {WRONG}"), ("x-api-key", GOOD)], 401),  # first form wins
        ([("authorization", G), ("x-api-key", WRONG)], 200),
        ([("x-api-key", WRONG), ("x-goog-api-key", GOOD)], 401),
        ([("x-api-key", GOOD), ("x-goog-api-key", WRONG)], 200),
        ([("AUTHORIZATION", G)], 200),  # drivers lower-case names; make_request does too
        ([("x-http-method-override", "GET"), ("x-original-url", "/healthz")], 401),
        ([("x-forwarded-for", "127.0.0.1")], 401),
    ],
)
async def test_auth_header_rules(headers: list[tuple[str, str]], status: int) -> None:
    app, _ = make_app("strict")
    sink = await call(app, "GET", "/v1/models", headers)
    assert sink.status == status, sink.body


async def test_query_key_rules() -> None:
    app, calls = make_app("strict")
    gem = "/v1beta/models/m:generateContent"
    assert (await call(app, "POST", f"{gem}?key={GOOD}")).status == 200
    assert (await call(app, "POST", f"{gem}?alt=sse&key={GOOD}")).status == 200
    assert (await call(app, "POST", f"{gem}?key={GOOD}&key={GOOD}")).status == 401
    assert (await call(app, "POST", f"{gem}?key={WRONG}")).status == 401
    assert (await call(app, "POST", f"{gem}?xkey={GOOD}")).status == 401
    # A header, when present, is the credential: ?key= does not rescue a wrong header.
    bad = [("x-goog-api-key", WRONG)]
    assert (await call(app, "POST", f"{gem}?key={GOOD}", bad)).status == 401
    # Not a Gemini-style route: ?key= is ignored.
    assert (await call(app, "GET", f"/v1/models?key={GOOD}")).status == 401
    assert len(calls.seen) == 2


async def test_non_ascii_configured_key_matches_its_utf8_bytes() -> None:
    app, _ = make_app("strict", keys=("sk-é",))
    ok = await call(app, "GET", "/v1/models", [(b"authorization", "Bearer sk-é".encode())])
    assert ok.status == 200
    bad = await call(app, "GET", "/v1/models", [(b"authorization", b"Bearer sk-\xe9")])
    assert bad.status == 401


def _spy_compare_digest(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record the lengths of every hmac.compare_digest call (to prove no early exit)."""
    seen: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return seen


async def test_compare_digest_once_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    app, _ = make_app("strict", keys=("k1", "k2", "k3"))
    seen = _spy_compare_digest(monkeypatch)
    for key, status in [("k1", 200), ("k3", 200), ("nope", 401), ("k" * 5000, 401)]:
        seen.clear()
        sink = await call(app, "GET", "/v1/models", [("x-api-key", key)])
        assert sink.status == status
        # Every configured key compared, always on equal-length digests: no early exit.
        assert seen == [(32, 32)] * 3


@pytest.mark.parametrize(
    ("mode", "lan", "keys", "fails"),
    [
        ("strict", False, (), True),
        ("all_except_health", False, (), True),
        ("auto", True, (), True),
        ("strict", False, ("",), True),
        ("strict", False, ("  ",), True),
        ("auto", False, (), False),
        ("off", True, (), False),
        ("strict", False, ("k",), False),
    ],
)
def test_auth_on_without_keys_is_a_startup_error(
    mode: str, lan: bool, keys: tuple[str, ...], fails: bool
) -> None:
    if fails:
        with pytest.raises(ConfigError, match="api_keys"):
            make_app(mode, keys, lan=lan)
    else:
        make_app(mode, keys, lan=lan)


# ---- routing -----------------------------------------------------------------------------------


async def test_prefix_route_and_path_param() -> None:
    app, calls = make_app()
    assert (await call(app, "GET", "/v1/models/gemini-2.5-flash")).json() == {
        "id": "gemini-2.5-flash"
    }
    assert (await call(app, "GET", "/v1/models/models%2Fgemini-pro")).json() == {
        "id": "models/gemini-pro"
    }
    assert (await call(app, "HEAD", "/v1/models/x")).status == 200
    sink = await call(app, "GET", "/v1/models/%ff%fe")
    assert sink.status == 400
    assert calls.seen == [("GET", "gemini-2.5-flash"), ("GET", "models/gemini-pro"), ("HEAD", "x")]


async def test_404_lists_routes() -> None:
    app, _ = make_app()
    sink = await call(app, "GET", "/nope")
    assert sink.status == 404
    err = sink.json()["error"]  # type: ignore[index]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "not_found"
    for route in ("POST /v1/chat/completions", "GET /v1/models", "GET /healthz", "GET /metrics"):
        assert route in err["message"]
    assert "GET /v1/models/{id}" in err["message"]
    assert "base_url" not in err["message"]


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("/v1/chat/completions/responses", "base_url ends in '/v1/chat/completions'"),
        ("/v1/chat/completions/chat/completions", "base_url ends in '/v1/chat/completions'"),
        ("/v1/v1/models", "base_url ends in '/v1/v1'"),
        ("/v1/v1/chat/completions", "base_url ends in '/v1/v1'"),
        ("/chat/completions", "base_url lacks '/v1'"),
        ("/completions", "base_url lacks '/v1'"),
        ("/models", "base_url lacks '/v1'"),
        ("/models/gemini-2.5-pro", "base_url lacks '/v1'"),
        ("/openai/chat/completions", "base_url ends in '/openai'"),
        ("/v1/models/", "Did you mean '/v1/models' (no trailing slash)?"),
        ("/v1/chat/completions/", "Did you mean '/v1/chat/completions'"),
        ("/V1/Chat/Completions", "case-sensitive: did you mean '/v1/chat/completions'"),
        ("/v1/chat/completion", "Did you mean '/v1/chat/completions'?"),
        ("/v1/response", "Did you mean '/v1/responses'?"),
        ("/v1/model", "Did you mean '/v1/models'?"),
    ],
)
async def test_404_base_url_hints(target: str, fragment: str) -> None:
    app, _ = make_app(hosts=("gw.local",))
    sink = await call(app, "POST", target, [("host", "gw.local:9000")])
    assert sink.status == 404
    msg = sink.json()["error"]["message"]  # type: ignore[index]
    assert fragment in msg
    if "base_url" in fragment:
        assert "set base_url to http://gw.local:9000/v1" in msg


@pytest.mark.parametrize("target", ["/v1/embeddings", "/v1/audio/speech", "/v1/chat"])
async def test_404_guesses_no_route_for_a_path_unlike_any(target: str) -> None:
    app, _ = make_app(hosts=("gw.local:9000",))
    sink = await call(app, "POST", target, [("host", "gw.local:9000")])
    assert sink.status == 404
    msg = sink.json()["error"]["message"]  # type: ignore[index]
    assert "Did you mean" not in msg and "base_url" not in msg
    assert msg.startswith(f"Unknown path '{target}'. Valid routes: ")


async def test_hint_host_falls_back_when_host_header_is_odd() -> None:
    app, _ = make_app(hosts=("*",))  # the Host check off: the hint must still not echo it
    sink = await call(app, "POST", "/chat/completions", [("host", "evil\"host'<x>")])
    msg = sink.json()["error"]["message"]  # type: ignore[index]
    assert "http://127.0.0.1:8045/v1" in msg
    assert "evil" not in msg


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        ("POST", "/healthz", b"GET, HEAD"),
        ("DELETE", "/metrics", b"GET, HEAD"),
        ("GET", "/v1/chat/completions", b"POST"),
        ("PUT", "/v1/models/some-model", b"GET, HEAD"),
        ("GET", "/v1beta/models/m:generateContent", b"POST"),
    ],
)
async def test_405_with_allow(method: str, target: str, allow: bytes) -> None:
    app, calls = make_app()
    sink = await call(app, method, target)
    assert sink.status == 405
    assert sink.header("allow") == allow
    assert sink.json()["error"]["code"] == "method_not_allowed"  # type: ignore[index]
    assert calls.seen == []


async def test_head_answers_where_get_does() -> None:
    app, _ = make_app()
    sink = await call(app, "HEAD", "/healthz")
    assert sink.status == 200
    assert sink.header("content-type") == b"application/json"


def test_router_rejects_bad_registrations() -> None:
    r = Router()

    async def h(request: Request, sink: ResponseSink) -> None:
        raise AssertionError

    r.add("GET", "/a", h)
    with pytest.raises(ValueError, match="duplicate"):
        r.add("get", "/a", h)
    with pytest.raises(ValueError, match="start with"):
        r.add("GET", "a", h)
    with pytest.raises(ValueError, match="end with"):
        r.add("GET", "/p", h, prefix=True)
    with pytest.raises(ValueError, match="auth"):
        r.add("GET", "/b", h, auth="open")  # type: ignore[arg-type]
    r.add("GET", "/p/", h, prefix=True)
    assert r.match("GET", "/p/") is None  # a prefix route needs something after the prefix
    assert r.match("GET", "/p/x") is not None
    assert r.match("HEAD", "/a") is not None
    assert r.allowed("/a") == ["GET", "HEAD"]


async def test_health_body() -> None:
    from rawgate import __version__

    app, _ = make_app()
    sink = await call(app, "GET", "/health")
    assert sink.json() == {"status": "ok", "version": __version__}


# ---- CORS --------------------------------------------------------------------------------------

PREFLIGHT = [
    ("origin", "https://app.example"),
    ("access-control-request-method", "POST"),
    ("access-control-request-headers", "authorization, content-type, x-stainless-os"),
]


@pytest.mark.parametrize("mode", ["off", "strict"])
async def test_preflight_any_origin(mode: str) -> None:
    app, calls = make_app(mode)
    sink = await call(app, "OPTIONS", "/v1/chat/completions", PREFLIGHT)
    assert sink.status == 204  # preflights carry no credentials: answered before auth
    assert sink.body == b""
    assert sink.header("access-control-allow-origin") == b"*"
    methods = sink.header("access-control-allow-methods") or b""
    assert b"POST" in methods and b"GET" in methods
    assert sink.header("access-control-allow-headers") == (
        b"authorization, content-type, x-stainless-os"
    )
    assert sink.header("access-control-max-age") == b"600"
    assert sink.header("access-control-allow-credentials") is None
    assert sink.header("x-request-id")
    assert calls.seen == []


async def test_preflight_with_odd_requested_headers_gets_default_list() -> None:
    app, _ = make_app()
    hdrs = [*PREFLIGHT[:2], ("access-control-request-headers", "x\r\ny: z")]
    sink = await call(app, "OPTIONS", "/v1/models", hdrs)
    assert b"authorization" in (sink.header("access-control-allow-headers") or b"")
    assert b"\n" not in (sink.header("access-control-allow-headers") or b"")


async def test_cors_restricted_origins() -> None:
    app, _ = make_app(origins=("https://ok.example", "http://localhost:3000"))
    ok = [("origin", "http://localhost:3000"), ("access-control-request-method", "POST")]
    sink = await call(app, "OPTIONS", "/v1/chat/completions", ok)
    assert sink.status == 204
    assert sink.header("access-control-allow-origin") == b"http://localhost:3000"
    assert sink.header("vary") == b"origin"
    bad = [("origin", "https://evil.example"), ("access-control-request-method", "POST")]
    sink = await call(app, "OPTIONS", "/v1/chat/completions", bad)
    assert sink.status == 403
    assert sink.header("access-control-allow-origin") is None
    # Actual requests: allowed origin gets the headers, others do not.
    sink = await call(app, "GET", "/healthz", [("origin", "https://ok.example")])
    assert sink.header("access-control-allow-origin") == b"https://ok.example"
    sink = await call(app, "GET", "/healthz", [("origin", "https://evil.example")])
    assert sink.status == 403  # a foreign Origin is refused, not merely left without CORS
    assert sink.header("access-control-allow-origin") is None


async def test_cors_headers_on_responses_and_errors() -> None:
    app, _ = make_app("strict")
    origin = [("origin", "https://app.example")]
    for sink in (
        await call(app, "GET", "/v1/models", origin),  # 401
        await call(app, "GET", "/v1/models", [*origin, ("x-api-key", GOOD)]),  # 200
    ):
        assert sink.header("access-control-allow-origin") == b"*"
        assert b"x-request-id" in (sink.header("access-control-expose-headers") or b"")
    sink = await call(app, "GET", "/v1/models", [("x-api-key", GOOD)])
    assert sink.header("access-control-allow-origin") is None


async def test_options_without_preflight_headers_is_not_a_preflight() -> None:
    app, _ = make_app()
    sink = await call(app, "OPTIONS", "/v1/models", [("origin", "https://a.example")])
    assert sink.status == 405
    app, _ = make_app("strict")
    assert (await call(app, "OPTIONS", "/v1/models")).status == 401


# ---- request ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        (b"abc-123", True),
        (b"req_A.b-c:9", True),
        (b"trace:01.02-x", True),
        (b"x" * 128, True),
        (b"x" * 129, False),
        (b"", False),
        (b"has space", False),
        (b"<script>", False),
        (b"caf\xc3\xa9", False),
        (b"\xff", False),
        (b"a\tb", False),
    ],
)
async def test_request_id_echo_or_generate(sent: bytes, echoed: bool) -> None:
    app, _ = make_app()
    seen: list[str] = []

    async def handler(request: Request, sink: ResponseSink) -> None:
        seen.append(request.request_id)
        await json_response(sink, 200, b"{}")

    app.router.add("GET", "/rid", handler)
    sink = await call(app, "GET", "/rid", [(b"x-request-id", sent)])
    rid = sink.header("x-request-id")
    assert rid is not None
    assert len(sink.header_all("x-request-id")) == 1
    assert seen == [rid.decode()]
    if echoed:
        assert rid == sent
    else:
        assert rid != sent
        assert len(rid) == 16 and all(c in b"0123456789abcdef" for c in rid)


async def test_generated_ids_differ_and_duplicates_are_not_echoed() -> None:
    app, _ = make_app()
    ids = {(await call(app, "GET", "/healthz")).header("x-request-id") for _ in range(50)}
    assert len(ids) == 50
    two = [("x-request-id", "a1"), ("x-request-id", "b2")]
    rid = (await call(app, "GET", "/healthz", two)).header("x-request-id")
    assert rid not in (b"a1", b"b2")


# ---- error mapping -----------------------------------------------------------------------------


async def test_unexpected_exception_is_500_with_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = make_app()

    async def boom(request: Request, sink: ResponseSink) -> None:
        raise ValueError("kaboom-internal-detail")

    app.router.add("POST", "/boom", boom)
    with caplog.at_level(logging.ERROR, logger="rawgate.http.app"):
        sink = await call(app, "POST", "/boom", [("x-request-id", "rid-500")])
    assert sink.status == 500
    err = sink.json()["error"]  # type: ignore[index]
    assert err["type"] == "server_error" and err["code"] == "internal_error"
    assert "rid-500" in err["message"]
    assert "kaboom" not in err["message"]  # internals stay in the log
    assert sink.header("x-request-id") == b"rid-500"
    recs = [r for r in caplog.records if r.name == "rawgate.http.app"]
    assert len(recs) == 1 and "rid-500" in recs[0].getMessage()
    assert recs[0].exc_info is not None and recs[0].exc_info[0] is ValueError
    assert "kaboom-internal-detail" in caplog.text  # the traceback is in the log


async def test_rawgate_error_keeps_status_and_headers() -> None:
    app, _ = make_app()

    async def limited(request: Request, sink: ResponseSink) -> None:
        raise RateLimited("slow down", headers=[(b"retry-after", b"7")])

    async def grouped(request: Request, sink: ResponseSink) -> None:
        async with anyio.create_task_group() as tg:

            async def fail() -> None:
                raise BadRequest("bad field", param="messages")

            tg.start_soon(fail)

    app.router.add("GET", "/limited", limited)
    app.router.add("GET", "/grouped", grouped)
    sink = await call(app, "GET", "/limited")
    assert sink.status == 429
    assert sink.header("retry-after") == b"7"
    assert sink.header("cache-control") == b"no-store"
    assert sink.json()["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    sink = await call(app, "GET", "/grouped")
    assert sink.status == 400
    assert sink.json()["error"]["param"] == "messages"  # type: ignore[index]


async def test_error_after_start_is_logged_and_reraised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = make_app()

    async def half(request: Request, sink: ResponseSink) -> None:
        await sink.start(200, sse_headers())
        await sink.send(b"data: {}\n\n")
        raise ValueError("mid-stream")

    app.router.add("GET", "/half", half)
    sink = RecordingSink()
    with caplog.at_level(logging.INFO), pytest.raises(ValueError, match="mid-stream"):
        await app(make_request("GET", "/half"), sink)
    assert sink.status == 200 and not sink.ended
    assert sink.header("content-type") == b"text/event-stream; charset=utf-8"
    assert any("after the response started" in r.getMessage() for r in caplog.records)
    access = [r for r in caplog.records if r.name == "rawgate.access"]
    assert len(access) == 1 and " 200 " in access[0].getMessage()


async def test_handler_without_response_is_500() -> None:
    app, _ = make_app()

    async def silent(request: Request, sink: ResponseSink) -> None:
        return None

    app.router.add("GET", "/silent", silent)
    assert (await call(app, "GET", "/silent")).status == 500


async def test_client_disconnect_propagates_and_is_logged_as_499(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = make_app()

    async def stream(request: Request, sink: ResponseSink) -> None:
        await sink.start(200, sse_headers())
        for _ in range(10):
            await sink.send(b"data: {}\n\n")
        await sink.end(SSE_DONE)

    app.router.add("GET", "/stream", stream)
    sink = RecordingSink(disconnect_after=2)
    with caplog.at_level(logging.INFO), pytest.raises(ClientDisconnected):
        await app(make_request("GET", "/stream"), sink)
    access = [r for r in caplog.records if r.name == "rawgate.access"]
    assert len(access) == 1 and " 499 " in access[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---- in-flight cap -----------------------------------------------------------------------------


async def test_over_max_in_flight_is_503_at_once() -> None:
    app, _ = make_app(max_in_flight=2)
    release = anyio.Event()
    both_in = anyio.Event()
    entered = 0

    async def slow(request: Request, sink: ResponseSink) -> None:
        nonlocal entered
        entered += 1
        if entered == 2:
            both_in.set()
        await release.wait()
        await json_response(sink, 200, b"{}")

    app.router.add("GET", "/slow", slow)
    results: list[RecordingSink] = []

    async def one() -> None:
        results.append(await call(app, "GET", "/slow"))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
            await both_in.wait()
            assert app.in_flight == 2
            for _ in range(3):
                sink = await call(app, "GET", "/v1/models")
                assert sink.status == 503
                assert sink.header("retry-after") == b"1"
                assert sink.json()["error"]["code"] == "server_is_overloaded"  # type: ignore[index]
                assert sink.header("x-request-id")
            # What an operator reads under load is never refused, nor counted (issue 12).
            for path in ("/healthz", "/health", "/metrics"):
                assert (await call(app, "GET", path)).status == 200
            assert app.in_flight == 2
            release.set()
    assert [r.status for r in results] == [200, 200]
    assert app.in_flight == 0
    assert (await call(app, "GET", "/healthz")).status == 200


async def test_in_flight_released_on_cancel() -> None:
    app, _ = make_app(max_in_flight=1)

    async def forever(request: Request, sink: ResponseSink) -> None:
        await anyio.sleep_forever()

    app.router.add("GET", "/forever", forever)
    with anyio.move_on_after(0.05):
        await call(app, "GET", "/forever")
    assert app.in_flight == 0
    assert (await call(app, "GET", "/healthz")).status == 200


# ---- access log --------------------------------------------------------------------------------


async def test_access_log_line(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = make_app("strict")

    async def chat(request: Request, sink: ResponseSink) -> None:
        request.access.model = "gpt-4o"
        request.access.mapped_model = "gemini-2.5-flash"
        request.access.account = "work\nFAKE LINE"  # must not split the line
        await json_response(sink, 200, b'{"x":1}')

    app.router.add("POST", "/v1beta/chat", chat, query_key=True)
    target = f"/v1beta/chat?key={GOOD}&alt=sse"
    with caplog.at_level(logging.INFO, logger="rawgate.access"):
        await app(
            make_request("POST", target, [("x-request-id", "rid-1")], b"{}", http_version="2"),
            RecordingSink(),
        )
        await call(app, "GET", "/v1/models", [("authorization", f"Bearer {WRONG}")])
    lines = [r.getMessage() for r in caplog.records if r.name == "rawgate.access"]
    assert len(lines) == 2
    first = lines[0]
    for part in (
        "POST /v1beta/chat 200 h2",
        "7B",
        "model=gpt-4o",
        "mapped=gemini-2.5-flash",
        "account=work\\nFAKE\\x20LINE",
        "rid=rid-1",
    ):
        assert part in first, first
    assert "\n" not in first and "ms " in first
    assert lines[1].startswith("GET /v1/models 401 h1 ")
    assert "model=- mapped=- account=-" in lines[1]
    assert GOOD not in caplog.text and WRONG not in caplog.text and "key=" not in caplog.text


@pytest.fixture
def restore_rawgate_logger() -> Iterator[None]:
    lg = logging.getLogger("rawgate")
    saved = (list(lg.handlers), lg.level, lg.propagate)
    yield
    for h in list(lg.handlers):
        if h not in saved[0]:
            lg.removeHandler(h)
            h.close()
    lg.setLevel(saved[1])
    lg.propagate = saved[2]


@pytest.mark.usefixtures("restore_rawgate_logger")
async def test_json_log_format() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    configure_logging("json", "info", stream=buf)  # idempotent: still one handler
    app, _ = make_app("strict")

    async def boom(request: Request, sink: ResponseSink) -> None:
        raise KeyError("internal")

    app.router.add("GET", "/boom", boom)
    await call(app, "GET", "/healthz", [("x-request-id", "j-1"), ("x-api-key", GOOD)])
    await call(app, "GET", "/boom", [("x-request-id", "j-2"), ("x-api-key", GOOD)])
    lines = [orjson.loads(x) for x in buf.getvalue().splitlines()]
    access = [x for x in lines if x["logger"] == "rawgate.access"]
    assert [a["request_id"] for a in access] == ["j-1", "j-2"]
    a = access[0]
    assert a["msg"] == "access" and a["level"] == "info"
    assert (a["method"], a["path"], a["status"], a["protocol"]) == ("GET", "/healthz", 200, "h1")
    assert a["bytes_out"] == len(b'{"status":"ok","version":"') + 2 + len(
        __import__("rawgate").__version__
    )
    assert isinstance(a["duration_ms"], float) and a["ts"].endswith("Z")
    errors = [x for x in lines if x["level"] == "error"]
    assert len(errors) == 1 and "KeyError" in errors[0]["exc"] and "j-2" in errors[0]["msg"]
    assert GOOD not in buf.getvalue()


@pytest.mark.usefixtures("restore_rawgate_logger")
def test_text_log_format_and_levels() -> None:
    buf = io.StringIO()
    configure_logging("text", "warning", stream=buf)
    logging.getLogger("rawgate.x").info("hidden")
    logging.getLogger("rawgate.x").warning("shown %d", 3)
    assert "hidden" not in buf.getvalue()
    assert "WARNING rawgate.x shown 3" in buf.getvalue()
    with pytest.raises(ValueError):
        configure_logging("xml", "info")
    with pytest.raises(ValueError):
        configure_logging("text", "loud")


async def test_access_log_can_be_switched_off(caplog: pytest.LogCaptureFixture) -> None:
    from rawgate.config import LogConfig

    app = GatewayApp(Config(log=LogConfig(access_log=False)))
    with caplog.at_level(logging.INFO):
        assert (await call(app, "GET", "/healthz")).status == 200
    assert not [r for r in caplog.records if r.name == "rawgate.access"]


async def test_disconnect_inside_task_group_is_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = make_app()

    async def fan_out(request: Request, sink: ResponseSink) -> None:
        await sink.start(200, sse_headers())
        async with anyio.create_task_group() as tg:

            async def pump() -> None:
                for _ in range(5):
                    await sink.send(b"data: {}\n\n")

            tg.start_soon(pump)

    app.router.add("GET", "/fan", fan_out)
    with caplog.at_level(logging.INFO), pytest.raises(BaseExceptionGroup):
        await app(make_request("GET", "/fan"), RecordingSink(disconnect_after=1))
    access = [r.getMessage() for r in caplog.records if r.name == "rawgate.access"]
    assert len(access) == 1 and " 499 " in access[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---- admin routes (auth="admin": gateway/admin.py registers them) -------------------------------


def _admin_app(fallback: list[str], configured: tuple[str, ...] = ()) -> GatewayApp:
    from rawgate.config import AdminConfig

    cfg = Config(admin=AdminConfig(api_keys=list(configured)))
    app = GatewayApp(cfg, admin_keys=fallback)

    async def ok(req: Request, sink: ResponseSink) -> None:
        await json_response(sink, 200, b"{}")

    app.router.add("GET", "/admin/x", ok, auth="admin")
    return app


async def test_admin_keys_compare_every_key_and_follow_a_reload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rawgate.config import AdminConfig

    app = _admin_app(["file-key"], ("a1", "a2"))
    seen = _spy_compare_digest(monkeypatch)
    for key, status in [("a1", 200), ("a2", 200), ("file-key", 401), ("x" * 5000, 401)]:
        seen.clear()
        sink = await call(app, "GET", "/admin/x", [("x-admin-key", key)])
        assert sink.status == status, key
        assert seen == [(32, 32)] * 2  # every configured key, equal-length digests
    # A SIGHUP that drops [admin] api_keys falls back to the admin_key file's key.
    app.configure(Config(admin=AdminConfig(api_keys=[])))
    assert (await call(app, "GET", "/admin/x", [("x-admin-key", "file-key")])).status == 200
    assert (await call(app, "GET", "/admin/x", [("x-admin-key", "a1")])).status == 401


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ([("x-admin-key", "k")], True),
        ([("authorization", "Bearer k")], True),
        ([("authorization", "k")], True),
        ([("x-admin-key", " k ")], True),
        ([], False),
        ([("x-admin-key", "k"), ("x-admin-key", "k")], False),  # ambiguous: never accepted
        ([("authorization", "Bearer k"), ("authorization", "Bearer k")], False),
        ([("x-admin-key", "")], False),
        ([("x-api-key", "k")], False),
        ([("x-goog-api-key", "k")], False),
        ([("cookie", "x-admin-key=k")], False),
    ],
)
async def test_admin_key_headers(headers: list[tuple[str, str]], ok: bool) -> None:
    app = _admin_app(["k"])
    sink = await call(app, "GET", "/admin/x", headers)
    assert sink.status == (200 if ok else 401)
    raw = [(k.encode(), v.encode()) for k, v in headers]
    assert app.admit_head("GET", "/admin/x", "", raw) == ok
    assert (await call(app, "GET", "/admin/x?key=k")).status == 401
