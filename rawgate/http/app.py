"""The application edge: request ids, CORS, auth, routing, error mapping, access log, metrics.

Invariants:
- Auth and routing look at the SAME string, `request.path` (raw, not normalised: see target.py).
  Routes match exactly; auth is skipped only for an exact (method, path) match of a route
  registered `auth="public"` (always) or `auth="health"` (mode all_except_health). Anything else,
  including unknown paths, needs a valid key when auth is on, so `/healthz/../v1/models`,
  `//v1/models`, `/v1%2Fmodels`, `/V1/models`, `/healthz/` can never reach a protected handler.
- Order per request: in-flight cap (503; /healthz, /health, /metrics are exempt) -> Host check
  (403) -> Origin check (403) -> CORS preflight -> auth (401) -> route (404/405) -> Content-Type
  (415) -> handler. With auth on, an
  unauthenticated client learns nothing about which paths exist (401 for all); the 404 that
  lists routes and base_url hints goes only to authenticated clients. `admit_head` is the auth
  decision on the head alone: the drivers ask it before reading a body, so a keyless client's
  body is never read.
- Browsers (issue 12.8): any web page can make the user's browser send requests to 127.0.0.1,
  and a "simple" request (a text/plain POST) is sent without a preflight, so hiding the answer
  with CORS is not enough: it still spends quota. Hence, whatever the route:
  - Host: while rawgate listens on loopback only (or whenever server.allowed_hosts is set), the
    Host / :authority must name localhost, 127.0.0.1, [::1] (any port) or an allowed host, else
    403 host_not_allowed: a DNS-rebinding page reaches 127.0.0.1 under its own name. 403, not
    421: this is a policy refusal, and RFC 9110 invites a client to retry a 421 elsewhere.
    No Host at all (HTTP/1.0 tools) is not a browser and passes.
  - Origin: a request carrying an Origin that is neither rawgate's own (scheme://Host) nor in
    server.cors_allowed_origins is refused with 403 origin_not_allowed before auth or handler
    run; admin paths (/metrics, /admin..., /ui...) accept no Origin but their own.
  - A POST/PUT/PATCH body must be JSON: Content-Type application/json (parameters such as
    charset allowed) or none at all, else 415. No Content-Type is accepted because browsers
    always send Origin with a cross-origin POST, which the Origin rule already refused; curl -d
    without -H sends application/x-www-form-urlencoded and gets the 415 with the fix.
- Admin routes (`auth="admin"`: /admin/..., gateway/admin.py) take the admin key only
  (`[admin] api_keys`, else the RAWGATE_HOME/admin_key fallback the app is built with) from
  X-Admin-Key or Authorization, whatever auth.mode says: never exempt, never a cookie or a
  query parameter, and neither auth.api_keys nor client keys count there (nor the admin key
  elsewhere). Admin paths never carry CORS headers and refuse every preflight.
- Keys are compared in constant time on bytes: SHA-256 of the presented key against the digest
  of every configured key, no early exit; non-ASCII bytes are just bytes.
- Client keys (`rawgate keys`) come from an injected `ClientKeys` (the http layer never imports
  state): a key that is not one of auth.api_keys is looked up there (a hashed, local lookup, no
  I/O); an enabled one authenticates and lands on `request.access.key` for the gateway's limits,
  a disabled one is a 401. With auth.mode = auto on loopback (auth off), the existence of any
  client key turns auth on (as all_except_health): a limit that a keyless request could skip
  would be no limit. An explicit `off` stays off, but a client key presented there is still
  recognised (its limits apply; disabled: 401).
- Every response carries x-request-id (and CORS headers for an allowed Origin), whatever answered.
- Errors: RawgateError -> its status and OpenAI JSON; any other exception -> logged traceback and
  a 500 naming the request id. After the response started nothing can be sent: the error is
  logged and re-raised so the driver aborts the stream/connection.
- Exactly one access-log line and one metrics observation per request, in `finally`; then the
  injected observer (`on_request`: the request log) sees the finished request, never failing it.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from random import getrandbits
from typing import Any, Literal, Protocol
from urllib.parse import unquote, unquote_to_bytes

import orjson
from anyio import get_cancelled_exc_class

from rawgate import __version__
from rawgate.config import Config, ConfigError, auth_mode
from rawgate.conn import ServerState
from rawgate.errors import (
    AuthenticationError,
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PermissionDenied,
    RawgateError,
    UnsupportedMediaType,
)
from rawgate.logs import log_access
from rawgate.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics, method_label
from rawgate.respond import error_response, json_response
from rawgate.seam import (
    AccessRecord,
    ClientDisconnected,
    Header,
    Request,
    ResponseSink,
    is_disconnect,
)

__all__ = [
    "AuthLevel",
    "ClientKey",
    "ClientKeys",
    "GatewayApp",
    "Handler",
    "RequestObserver",
    "Route",
    "Router",
    "path_param",
]

log = logging.getLogger("rawgate.http.app")

Handler = Callable[[Request, ResponseSink], Awaitable[None]]
# A route's own error shape: (status, headers, body) for an error refused before or by its
# handler, or None for the OpenAI JSON error (gateway/front.py `Front.error`).
ErrorShape = Callable[[RawgateError], "tuple[int, list[Header], bytes] | None"]
AuthLevel = Literal["protected", "public", "health", "admin"]

# Label for requests that matched no route: one series, whatever paths clients invent.
UNMATCHED = "unmatched"
# Status recorded when the client vanished before the response finished (nginx's convention).
CLIENT_CLOSED = 499

_SANE_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}\Z")
_SANE_HOST = re.compile(rb"[A-Za-z0-9.\-:\[\]]{1,255}\Z")
_SANE_HEADER_LIST = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~\-, \t]{1,1024}\Z")
# Host / :authority: a name or [IPv6] and an optional port; group 1 is the host part.
_HOST_PORT = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::[0-9]{1,5})?\Z")
# An Origin as browsers send it: scheme://host[:port]; group 1 is scheme://host.
_ORIGIN = re.compile(rb"(https?://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+))(?::[0-9]{1,5})?\Z")
_LOOPBACK_NAMES = frozenset((b"localhost", b"127.0.0.1", b"[::1]"))
# Paths that never answer a foreign Origin, even one in cors_allowed_origins.
_ADMIN_PATHS = ("/metrics", "/admin", "/ui")
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
HOST_MEMO_MAX = 256  # distinct Host values whose verdict is remembered
_JSON_TYPE = b"application/json"
_BEARER = b"bearer"

_HEALTH_BODY = b'{"status":"ok","version":"' + __version__.encode() + b'"}'
_RETRY_1: Header = (b"retry-after", b"1")
_WWW_AUTH: Header = (b"www-authenticate", b'Bearer realm="rawgate"')
_WWW_AUTH_ADMIN: Header = (b"www-authenticate", b'Bearer realm="rawgate-admin"')
_VARY_ORIGIN: Header = (b"vary", b"origin")
_ACAO_ANY: Header = (b"access-control-allow-origin", b"*")
# Browsers hide response headers from scripts unless exposed; these are the ones clients read.
_EXPOSE: Header = (
    b"access-control-expose-headers",
    b"x-request-id, x-mapped-model, x-account-email, retry-after, retry-after-ms",
)
_DEFAULT_ALLOW_HEADERS = (
    b"authorization, content-type, x-api-key, x-goog-api-key, x-request-id, openai-beta,"
    b" openai-organization, openai-project, x-stainless-retry-count"
)

# Header name -> slot in the per-request scan below: one pass over the headers finds them all.
_SLOT = {
    b"x-request-id": 0,
    b"origin": 1,
    b"authorization": 2,
    b"x-api-key": 3,
    b"x-goog-api-key": 4,
    b"access-control-request-method": 5,
    b"access-control-request-headers": 6,
    b"host": 7,
    b":authority": 8,
    b"content-type": 9,
    b"x-admin-key": 10,
}
_N_SLOTS = 11
# Paths whose requests never count against limits.max_in_flight.
_UNCAPPED = frozenset({"/healthz", "/health", "/metrics"})
_DUPLICATE = b"\x00dup"  # a repeated credential header: ambiguous, never accepted


class ClientKey(Protocol):
    """What the app reads of a client key record (state/keys.py KeyRecord)."""

    @property
    def name(self) -> str: ...

    @property
    def enabled(self) -> bool: ...


class ClientKeys(Protocol):
    """The client keys the app accepts besides auth.api_keys (cli/stack.py adapts the state)."""

    def lookup(self, presented: bytes) -> ClientKey | None:
        """The record of a presented key (enabled or not), None if unknown. No I/O."""
        ...

    def any(self) -> bool:
        """True while at least one client key exists (turns auth.mode = auto on)."""
        ...


# The finished request: (request, route label, status, seconds, seconds to the first response
# byte or None, body bytes sent). Called once per request after the access log; must not raise.
RequestObserver = Callable[[Request, str, int, float, "float | None", int], None]


def new_request_id() -> str:
    """16 hex chars. Not a secret: Mersenne Twister is enough and costs no syscall."""
    return f"{getrandbits(64):016x}"


def path_param(request: Request, prefix: str) -> str:
    """The percent-decoded rest of `request.path` after a prefix route's `prefix`."""
    raw = request.path[len(prefix) :]
    try:
        value = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("path parameter is not valid UTF-8 after percent-decoding") from None
    if not value:
        raise NotFound(f"missing name after {prefix}")
    return value


class Route:
    __slots__ = (
        "auth", "handler", "id_header", "label", "method", "path", "prefix", "query_key", "shape",
    )

    def __init__(
        self,
        method: str,
        path: str,
        handler: Handler,
        auth: AuthLevel,
        prefix: bool,
        query_key: bool,
        label: str,
        shape: ErrorShape | None = None,
        id_header: bytes | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.handler = handler
        self.auth = auth
        self.prefix = prefix
        self.query_key = query_key  # Gemini-style route: `?key=` is accepted as a credential
        self.label = label  # metrics label and 404 listing: the pattern, never a raw path
        self.shape = shape  # the protocol's error shape (auth, limits, 415 ...), or None
        self.id_header = id_header  # the request id again under this protocol's header name


class Router:
    """Exact (method, path) routes plus explicit prefix routes such as `/v1/models/{id}`."""

    def __init__(self) -> None:
        self._exact: dict[tuple[str, str], Route] = {}
        self._methods: dict[str, list[str]] = {}  # path -> methods, for 405 Allow
        self._prefixes: list[Route] = []

    def add(
        self,
        method: str,
        path: str,
        handler: Handler,
        *,
        auth: AuthLevel = "protected",
        prefix: bool = False,
        query_key: bool = False,
        label: str | None = None,
        shape: ErrorShape | None = None,
        id_header: bytes | None = None,
    ) -> None:
        """Register a handler. GET routes answer HEAD too (the driver drops the body).
        shape: how this route's protocol writes an error the app refuses the request with
        (a 401, 415, 503 ...); None: the OpenAI JSON error. id_header: a header name under
        which every answer of the route repeats x-request-id (Anthropic's `request-id`).

        prefix=True: `path` must end in "/" and matches any longer path; the handler reads the
        rest with `path_param(request, path)`. query_key=True: `?key=` counts as a credential.
        """
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")
        if auth not in ("protected", "public", "health", "admin"):
            raise ValueError(f"auth must be protected, public, health or admin, not {auth!r}")
        method = method.upper()
        if prefix:
            if not path.endswith("/"):
                raise ValueError(f"prefix route must end with '/': {path!r}")
            if any(r.method == method and r.path == path for r in self._prefixes):
                raise ValueError(f"duplicate route {method} {path}*")
            route = Route(
                method, path, handler, auth, True, query_key, label or path + "{id}", shape,
                id_header,
            )
            self._prefixes.append(route)
            # Longest prefix first, so /v1beta/models/x/ beats /v1beta/models/.
            self._prefixes.sort(key=lambda r: -len(r.path))
            return
        if (method, path) in self._exact:
            raise ValueError(f"duplicate route {method} {path}")
        self._exact[method, path] = Route(
            method, path, handler, auth, False, query_key, label or path, shape, id_header
        )
        self._methods.setdefault(path, []).append(method)

    def match(self, method: str, path: str) -> Route | None:
        route = self._exact.get((method, path))
        if route is not None:
            return route
        if method == "HEAD":
            route = self._exact.get(("GET", path))
            if route is not None:
                return route
        for r in self._prefixes:
            if (
                (r.method == method or (method == "HEAD" and r.method == "GET"))
                and len(path) > len(r.path)
                and path.startswith(r.path)
            ):
                return r
        return None

    def allowed(self, path: str) -> list[str]:
        """Methods that `path` answers to (empty if the path is unknown)."""
        methods = set(self._methods.get(path, ()))
        for r in self._prefixes:
            if len(path) > len(r.path) and path.startswith(r.path):
                methods.add(r.method)
        if "GET" in methods:
            methods.add("HEAD")
        return sorted(methods)

    def listing(self) -> list[tuple[str, str]]:
        """(method, pattern) of every route, sorted by pattern."""
        routes = [*self._exact.values(), *self._prefixes]
        return sorted(((r.method, r.label) for r in routes), key=lambda mr: (mr[1], mr[0]))

    def all_methods(self) -> list[str]:
        methods = {m for m, _ in self._exact} | {r.method for r in self._prefixes}
        if "GET" in methods:
            methods.add("HEAD")
        return sorted(methods | {"OPTIONS"})


class _Sink:
    """Wraps the driver's sink to add x-request-id and CORS headers to whatever answers."""

    __slots__ = ("_extra", "_inner", "_timed", "first_byte")

    def __init__(self, inner: ResponseSink, extra: list[Header], timed: bool = False) -> None:
        self._inner = inner
        self._extra = extra
        # perf_counter() when the head went out (time to first byte), only for an observer:
        # the clock read is ~1,100 instructions (valgrind), half a percent of a request.
        self._timed = timed
        self.first_byte = 0.0

    @property
    def started(self) -> bool:
        return self._inner.started

    @property
    def bytes_sent(self) -> int:
        return self._inner.bytes_sent

    @property
    def status(self) -> int:
        return self._inner.status

    async def start(self, status: int, headers: list[Header]) -> None:
        if self._timed:
            self.first_byte = time.perf_counter()
        await self._inner.start(status, headers + self._extra)

    async def send(self, data: bytes) -> None:
        await self._inner.send(data)

    async def end(self, data: bytes = b"") -> None:
        await self._inner.end(data)

    async def respond(self, status: int, headers: list[Header], body: bytes) -> None:
        if self._timed:
            self.first_byte = time.perf_counter()
        await self._inner.respond(status, headers + self._extra, body)


class GatewayApp:
    """The App the HTTP drivers call. Built-in routes: /healthz, /health, /metrics."""

    def __init__(
        self,
        cfg: Config,
        state: ServerState | None = None,
        *,
        client_keys: ClientKeys | None = None,
        admin_keys: list[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.client_keys = client_keys
        # The admin keys used while [admin] api_keys is empty (the RAWGATE_HOME/admin_key file).
        self.admin_fallback = list(admin_keys or ())
        self.on_request: RequestObserver | None = None
        # Extra fields of the /healthz body (the shared state's "state": "ok" | "degraded").
        self.health_extra: Callable[[], dict[str, Any]] | None = None
        self.router = Router()
        self.metrics = Metrics(state)
        self.in_flight = 0
        self.metrics.set_in_flight_source(lambda: self.in_flight)
        self.configure(cfg)
        self.router.add("GET", "/healthz", self._health, auth="health")
        self.router.add("GET", "/health", self._health, auth="health")
        self.router.add("GET", "/metrics", self._metrics)

    def configure(self, cfg: Config) -> None:
        """Apply auth, CORS, the in-flight cap and the access-log switch of `cfg` (at start and
        on a SIGHUP reload: the next request sees them, requests in flight are untouched).
        Raises ConfigError for auth on without keys, before anything changed."""
        mode = auth_mode(cfg)
        if mode != "off":
            if not cfg.auth.api_keys and not (self.client_keys and self.client_keys.any()):
                raise ConfigError(
                    f"auth.mode = {mode!r} needs at least one key in auth.api_keys"
                    " (or RAWGATE_AUTH_API_KEYS) or a client key (rawgate keys add NAME);"
                    " refusing to start with an open door"
                )
            if any(not k.strip() for k in cfg.auth.api_keys):
                raise ConfigError("auth.api_keys contains an empty key")
        self.cfg = cfg
        self.auth_mode = mode
        # auto that resolved to off: client keys, once any exist, turn auth on (module note).
        self._auto_off = mode == "off" and cfg.auth.mode == "auto"
        self._max_in_flight = cfg.limits.max_in_flight
        self._access_log = cfg.log.access_log
        # Digests of the keys: equal-length values for compare_digest whatever the key lengths.
        self._key_digests = [hashlib.sha256(k.encode()).digest() for k in cfg.auth.api_keys]
        admin = cfg.admin.api_keys or self.admin_fallback
        self._admin_digests = [hashlib.sha256(k.encode()).digest() for k in admin if k]
        origins = cfg.server.cors_allowed_origins
        self._cors_any = "*" in origins
        self._cors_origins = frozenset(
            o.encode().lower() for o in origins if o != "*" and not o.endswith(":*")
        )
        # "scheme://host:*" entries: scheme://host with any port (or none).
        self._cors_any_port = frozenset(
            o[:-2].encode().lower() for o in origins if o.endswith(":*")
        )
        hosts = cfg.server.allowed_hosts
        self._host_check = "*" not in hosts and (bool(hosts) or _loopback_only(cfg))
        self._hosts = _LOOPBACK_NAMES | {h.encode().lower() for h in hosts}
        self._host_memo: dict[bytes, bool] = {}
        self._cors_max_age = str(cfg.server.cors_max_age_s).encode()
        self._fallback_host = f"{cfg.server.host or '127.0.0.1'}:{cfg.server.port}"

    # ---- the request cycle ----------------------------------------------------------------

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        t0 = time.perf_counter()
        access = request.access = AccessRecord()  # handlers fill it; the access log reads it
        slots: list[bytes | None] = [None] * _N_SLOTS
        for name, value in request.headers:
            i = _SLOT.get(name)
            if i is not None:
                slots[i] = value if slots[i] is None else _DUPLICATE
        rid_raw = slots[0]
        if rid_raw is not None and _SANE_ID.match(rid_raw):
            rid = rid_raw.decode("ascii")
        else:
            rid = new_request_id()
        request.request_id = rid
        extra: list[Header] = [(b"x-request-id", rid.encode("ascii"))]
        origin = slots[1]
        host = slots[7] if slots[7] is not None else slots[8]
        foreign = origin is not None and not self._same_origin(request, origin, host)
        # Admin paths never carry CORS headers, not even for their own origin (a same-origin
        # page needs none), and never answer a preflight.
        cors_ok = (
            origin is not None
            and not _admin_path(request.path)
            and (not foreign or self._cors_allows(origin))
        )
        if cors_ok:
            assert origin is not None
            if self._cors_any:
                extra.append(_ACAO_ANY)
            else:
                extra.append((b"access-control-allow-origin", origin))
                extra.append(_VARY_ORIGIN)
            extra.append(_EXPOSE)
        out = _Sink(sink, extra, self.on_request is not None)
        route: Route | None = None
        status = 0
        # Health and metrics are what an operator reads under load: never refused, never counted.
        counted = request.path not in _UNCAPPED
        over = counted and self.in_flight >= self._max_in_flight
        self.in_flight += counted
        try:
            try:
                if over:
                    raise Overloaded(
                        "rawgate is handling too many requests; retry shortly", headers=[_RETRY_1]
                    )
                # Matched first (pure, no I/O) so that every refusal below is shaped for the
                # route it was aimed at.
                route = self.router.match(request.method, request.path)
                if route is not None and route.id_header is not None:
                    extra.append((route.id_header, extra[0][1]))
                if self._host_check and host is not None and not self._host_allowed(host):
                    raise PermissionDenied(
                        "Host header not allowed: rawgate listens on loopback and answers only"
                        " requests addressed to localhost, 127.0.0.1 or [::1] (a web page can"
                        " reach 127.0.0.1 under its own DNS name). Add the name you use to"
                        " [server] allowed_hosts.",
                        code="host_not_allowed",
                    )
                if foreign and not cors_ok:
                    raise _foreign_origin(request.path)
                if request.method == "OPTIONS" and origin is not None and slots[5] is not None:
                    if _admin_path(request.path):
                        raise _foreign_origin(request.path)
                    await self._preflight(out, cors_ok, slots[6])
                    return
                mode = self.auth_mode  # inline self._mode(): one call less per request
                keys = self.client_keys
                if self._auto_off and keys is not None and keys.any():
                    mode = "all_except_health"
                rec: ClientKey | None = None
                if route is not None and route.auth == "admin":
                    self._admin_auth(slots)  # whatever the mode; client keys never count
                elif mode != "off":
                    if not self._exempt(route, mode):
                        rec = self._authenticate(request.query, route, slots)
                elif keys is not None and keys.any():
                    rec = self._identify(request.query, route, slots)
                if rec is not None:
                    access.key = rec
                    access.key_name = rec.name
                if route is None:
                    raise self._no_route(request)
                ct = slots[9]
                if ct is not None and ct != _JSON_TYPE and request.method in _BODY_METHODS:
                    _check_json(ct)
                await route.handler(request, out)
                if not out.started:
                    raise RuntimeError(f"handler for {route.label} returned without responding")
            except ClientDisconnected:
                status = CLIENT_CLOSED
                raise
            except get_cancelled_exc_class():
                # The driver cancels the handler when the client went away (or the shutdown
                # grace ran out): the response did not complete, whatever its head said.
                status = CLIENT_CLOSED
                raise
            except Exception as exc:
                if is_disconnect(exc):
                    status = CLIENT_CLOSED
                    raise
                err = _as_rawgate_error(exc)
                if out.started:
                    log.error(
                        "%s %s failed after the response started (request id %s)",
                        request.method,
                        request.path,
                        rid,
                        exc_info=err is None or err.status >= 500,
                    )
                    raise
                if err is None:
                    log.error(
                        "unhandled error in %s %s (request id %s)",
                        request.method,
                        request.path,
                        rid,
                        exc_info=exc,
                    )
                    err = InternalError(
                        f"The server had an error while processing your request (request id"
                        f" {rid}). Retry, or report the request id if the error persists."
                    )
                access.error_code = err.code or err.type
                try:
                    shaped = route.shape(err) if route is not None and route.shape else None
                    if shaped is None:
                        await error_response(out, err)
                    else:
                        code, headers, body = shaped
                        await out.respond(code, [*headers, *err.headers], body)
                except ClientDisconnected:
                    status = CLIENT_CLOSED
        finally:
            self.in_flight -= counted
            if status == 0:
                status = out.status or CLIENT_CLOSED
            duration = time.perf_counter() - t0
            label = route.label if route is not None else UNMATCHED
            self.metrics.observe(label, method_label(request.method), status, duration)
            if self._access_log:
                log_access(
                    request.method,
                    request.path,
                    status,
                    "h2" if request.http_version == "2" else "h1",
                    duration,
                    out.bytes_sent,
                    access.model,
                    access.mapped_model,
                    access.account,
                    rid,
                )
            if self.on_request is not None:
                first = out.first_byte
                try:
                    self.on_request(
                        request,
                        label,
                        status,
                        duration,
                        None if first == 0.0 else first - t0,
                        out.bytes_sent,
                    )
                except Exception:  # the observer must never fail a request
                    log.exception("request observer failed (request id %s)", rid)

    def admit_head(self, method: str, path: str, query: str, headers: list[Header]) -> bool:
        """Whether a request's body may be read, decided on its head alone (the drivers ask
        before they read a body byte or open an h2 window). False only when __call__ would
        refuse the request whatever its body (a foreign Host or Origin 403, a non-JSON body
        415, a 401): the driver then calls the app with an empty body and the same head, and
        the usual refusal (request id, CORS, access log, metrics) goes out with no body read."""
        slots: list[bytes | None] = [None] * _N_SLOTS
        for name, value in headers:
            i = _SLOT.get(name)
            if i is not None:
                slots[i] = value if slots[i] is None else _DUPLICATE
        host = slots[7] if slots[7] is not None else slots[8]
        if self._host_check and host is not None and not self._host_allowed(host):
            return False
        origin = slots[1]
        if origin is not None and not self._maybe_same_origin(origin, host):
            if not self._cors_allows(origin) or _admin_path(path):
                return False
        ct = slots[9]
        if ct is not None and ct != _JSON_TYPE and method in _BODY_METHODS:
            try:
                _check_json(ct)
            except UnsupportedMediaType:
                return False
        if path.startswith("/admin"):
            admin = self.router.match(method, path)
            if admin is not None and admin.auth == "admin":
                try:
                    self._admin_auth(slots)
                except AuthenticationError:
                    return False
                return True
        mode = self._mode()
        if mode == "off":
            return True
        route = self.router.match(method, path)
        if self._exempt(route, mode):
            return True
        if method == "OPTIONS" and slots[1] is not None and slots[5] is not None:
            return True  # a CORS preflight is answered before auth
        try:
            self._authenticate(query, route, slots)
        except AuthenticationError:
            return False
        return True

    # ---- auth ------------------------------------------------------------------------------

    def effective_auth_mode(self) -> str:
        """The auth mode in force now (the start-up line names it)."""
        return self._mode()

    def _mode(self) -> str:
        """The auth mode of this request: auto on loopback is off until a client key exists."""
        if self._auto_off and self.client_keys is not None and self.client_keys.any():
            return "all_except_health"
        return self.auth_mode

    def _admin_auth(self, slots: list[bytes | None]) -> None:
        """401 unless an admin key came in X-Admin-Key or Authorization. Never a cookie (a
        browser attaches cookies to forged cross-site requests), never a query parameter (URLs
        end up in logs and browser histories)."""
        value = slots[10]
        if value is None:
            auth = slots[2]
            presented = None if auth is None else auth if auth is _DUPLICATE else _bearer(auth)
        else:
            presented = value if value is _DUPLICATE else value.strip(b" \t")
        if presented is None:
            raise AuthenticationError(
                "This admin route needs the admin key in a header: 'Authorization: Bearer <key>'"
                " or 'X-Admin-Key: <key>' ([admin] api_keys, or the key in"
                " RAWGATE_HOME/admin_key that rawgate serve prints with the /ui URL).",
                code="admin_key_required",
                headers=[_WWW_AUTH_ADMIN],
            )
        digest = hashlib.sha256(presented).digest()
        ok = False
        for d in self._admin_digests:  # no early exit: time does not depend on which matched
            ok |= hmac.compare_digest(digest, d)
        if not ok or not presented or presented is _DUPLICATE:
            raise AuthenticationError(
                "Incorrect admin key (client keys and auth.api_keys are not admin keys).",
                code="admin_key_invalid",
                headers=[_WWW_AUTH_ADMIN],
            )

    def _exempt(self, route: Route | None, mode: str) -> bool:
        if route is None:
            return False
        if route.auth == "public":
            return True
        return route.auth == "health" and mode == "all_except_health"

    def _presented(
        self, query: str, route: Route | None, slots: list[bytes | None]
    ) -> bytes | None:
        presented: bytes | None = None
        for i in (2, 3, 4):  # Authorization, then x-api-key, then x-goog-api-key
            value = slots[i]
            if value is not None:
                if value is _DUPLICATE:
                    presented = value
                elif i == 2:
                    presented = _bearer(value)
                else:
                    presented = value.strip(b" \t")
                break
        if presented is None and route is not None and route.query_key:
            presented = _query_key(query)
        return presented

    def _authenticate(
        self, query: str, route: Route | None, slots: list[bytes | None]
    ) -> ClientKey | None:
        """401 unless a valid key was presented; the client key record, None for an
        auth.api_keys key."""
        presented = self._presented(query, route, slots)
        if presented is None:
            if route is not None and route.query_key and route.shape is not None:  # Gemini
                how = (
                    "Send it as 'x-goog-api-key: <key>' or '?key=<key>' (google-genai and the"
                    " Gemini CLI do this with their API key setting)."
                )
            else:
                how = (
                    "Send it as 'Authorization: Bearer <key>' (the OpenAI SDKs do this when"
                    " api_key is set)."
                )
            raise AuthenticationError("Missing API key. " + how, headers=[_WWW_AUTH])
        if presented is _DUPLICATE:
            raise _incorrect_key()
        if self._key_matches(presented):
            return None
        rec = self.client_keys.lookup(presented) if self.client_keys is not None else None
        if rec is None:
            raise _incorrect_key()
        if not rec.enabled:
            raise _disabled_key(rec)
        return rec

    def _identify(
        self, query: str, route: Route | None, slots: list[bytes | None]
    ) -> ClientKey | None:
        """With auth off: the client key presented, if any (its limits apply); a disabled one
        is still refused (401). Any other credential is ignored, as auth is off."""
        presented = self._presented(query, route, slots)
        if presented is None or presented is _DUPLICATE or self.client_keys is None:
            return None
        rec = self.client_keys.lookup(presented)
        if rec is not None and not rec.enabled:
            raise _disabled_key(rec)
        return rec

    def _key_matches(self, presented: bytes) -> bool:
        digest = hashlib.sha256(presented).digest()
        ok = False
        for d in self._key_digests:  # no early exit: time does not depend on which key matched
            ok |= hmac.compare_digest(digest, d)
        return ok and bool(presented)

    # ---- CORS ------------------------------------------------------------------------------

    def _cors_allows(self, origin: bytes) -> bool:
        if self._cors_any:
            return True
        o = origin.lower()
        if o in self._cors_origins:
            return True
        if not self._cors_any_port:
            return False
        m = _ORIGIN.match(o)
        return m is not None and m.group(1) in self._cors_any_port

    def _same_origin(self, request: Request, origin: bytes, host: bytes | None) -> bool:
        """Whether `origin` is rawgate itself (its own pages, such as /ui, calling it)."""
        if host is None or _ORIGIN.match(origin) is None:  # echoed in ACAO: only a clean one
            return False
        scheme = request.scheme.encode()
        o = origin.lower()
        n = len(scheme)
        return o[:n] == scheme and o[n : n + 3] == b"://" and o[n + 3 :] == host.lower()

    def _maybe_same_origin(self, origin: bytes, host: bytes | None) -> bool:
        """`_same_origin` for either scheme: the head decision does not know the connection's
        (the full check in __call__ does); an origin that is neither is foreign on both."""
        if host is None or _ORIGIN.match(origin) is None:
            return False
        o = origin.lower()
        h = host.lower()
        return o in (b"http://" + h, b"https://" + h)

    def _host_allowed(self, host: bytes) -> bool:
        # Memoised: a client sends the same Host every time (one dict lookup instead of a regex
        # and two lower()s); bounded, as the values come from clients.
        ok = self._host_memo.get(host)
        if ok is None:
            if len(self._host_memo) >= HOST_MEMO_MAX:
                self._host_memo.clear()
            ok = self._host_memo[host] = self._host_allowed_uncached(host)
        return ok

    def _host_allowed_uncached(self, host: bytes) -> bool:
        m = _HOST_PORT.match(host)
        if m is None:
            return False
        h = host.lower()
        if h in self._hosts:  # an allowed_hosts entry with its port, or the bare name
            return True
        name = m.group(1).lower()
        return name in self._hosts or name.rstrip(b".") in self._hosts

    async def _preflight(self, sink: _Sink, allowed: bool, req_headers: bytes | None) -> None:
        if not allowed:
            raise PermissionDenied("this Origin is not allowed (server.cors_allowed_origins)")
        if req_headers is not None and _SANE_HEADER_LIST.match(req_headers):
            allow_headers = req_headers
        else:
            allow_headers = _DEFAULT_ALLOW_HEADERS
        headers: list[Header] = [
            (b"access-control-allow-methods", ", ".join(self.router.all_methods()).encode()),
            (b"access-control-allow-headers", allow_headers),
            (b"access-control-max-age", self._cors_max_age),
        ]
        await sink.respond(204, headers, b"")

    # ---- 404 / 405 -------------------------------------------------------------------------

    def _no_route(self, request: Request) -> RawgateError:
        allowed = self.router.allowed(request.path)
        if allowed:
            return MethodNotAllowed(
                f"Method {request.method} is not allowed on {request.path};"
                f" allowed: {', '.join(allowed)}.",
                headers=[(b"allow", ", ".join(allowed).encode())],
            )
        listing = ", ".join(f"{m} {p}" for m, p in self.router.listing())
        hint = self._hint(request)
        msg = f"Unknown path '{request.path}'."
        if hint:
            msg += " " + hint
        return NotFound(f"{msg} Valid routes: {listing}.")

    def _hint(self, request: Request) -> str:
        path = request.path
        stripped = path.rstrip("/")
        if stripped != path and stripped and self.router.allowed(stripped):
            return f"Did you mean '{stripped}' (no trailing slash)?"
        lowered = path.lower()
        if lowered != path and self.router.allowed(lowered):
            return f"Paths are case-sensitive: did you mean '{lowered}'?"
        # A Gemini client (google-genai, Gemini CLI) appends "/v1beta/models/..." to an origin:
        # one with a path (".../v1") stacks them.
        at = path.find("/v1beta/models/")
        if at > 0:
            origin = f"{request.scheme}://{self._host(request)}"
            return (
                f"It looks like your Gemini base URL ends in '{path[:at]}'; set it to {origin}"
                " (GOOGLE_GEMINI_BASE_URL, or base_url in google-genai's HttpOptions: the client"
                " appends '/v1beta/models/...' itself)."
            )
        # What an OpenAI SDK appends to base_url ("/chat/completions", "/models/"): if the path
        # ends in one of those but does not start with exactly "/v1", base_url is wrong.
        tails = sorted(
            {p[3:].split("{", 1)[0] for _, p in self.router.listing() if p.startswith("/v1/")},
            key=len,
            reverse=True,
        )
        for tail in tails:
            if tail.endswith("/"):  # prefix route: something must follow the tail
                idx = path.find(tail)
                if idx < 0 or len(path) <= idx + len(tail):
                    continue
            elif path.endswith(tail):
                idx = len(path) - len(tail)
            else:
                continue
            used = path[:idx]
            if used == "/v1":
                continue
            if tail.startswith("/messages") and used.endswith("/v1"):
                # An Anthropic client: it appends "/v1/messages" to its base URL itself.
                return (
                    f"It looks like your Anthropic base URL ends in '{used[:-3]}'; set it"
                    f" (ANTHROPIC_BASE_URL) to {request.scheme}://{self._host(request)}"
                    " (Anthropic clients append '/v1/messages' themselves)."
                )
            shown = f"base_url ends in '{used}'" if used else "base_url lacks '/v1'"
            base_url = f"{request.scheme}://{self._host(request)}/v1"
            return (
                f"It looks like your {shown}; set base_url to {base_url}"
                f" (the client appends '{tail}' itself)."
            )
        # A typo of a fixed route ("/v1/chat/completion", "/v1/response"): name the route.
        # Only on this 404 path, so the cost (a few us for ~10 routes) never touches a request.
        fixed = sorted({p for _, p in self.router.listing() if "{" not in p})
        close = difflib.get_close_matches(path, fixed, n=1, cutoff=0.85)
        if close:
            return f"Did you mean '{close[0]}'?"
        return ""

    def _host(self, request: Request) -> str:
        host = request.header(b"host") or request.header(b":authority")
        if host is not None and _SANE_HOST.match(host):
            return host.decode("ascii")
        return self._fallback_host

    # ---- built-in routes -------------------------------------------------------------------

    async def _health(self, request: Request, sink: ResponseSink) -> None:
        if self.health_extra is None:
            await json_response(sink, 200, _HEALTH_BODY)
            return
        doc = {"status": "ok", "version": __version__, **self.health_extra()}
        await json_response(sink, 200, orjson.dumps(doc))

    async def _metrics(self, request: Request, sink: ResponseSink) -> None:
        body = await self.metrics.exposition()
        await sink.respond(200, [(b"content-type", METRICS_CONTENT_TYPE)], body)


def _incorrect_key() -> AuthenticationError:
    return AuthenticationError(
        "Incorrect API key provided. Use one of the keys in rawgate's auth.api_keys or a client"
        " key made with `rawgate keys add`.",
        headers=[_WWW_AUTH],
    )


def _disabled_key(rec: ClientKey) -> AuthenticationError:
    return AuthenticationError(
        f"The client key '{rec.name}' is disabled (rawgate keys enable {rec.name}).",
        code="key_disabled",
        headers=[_WWW_AUTH],
    )


def _bearer(value: bytes) -> bytes:
    """The credential in an Authorization value: after `Bearer ` (any case), else the raw value.

    Raw values are accepted because some clients send the bare key (the seed did too). Leading
    and trailing blanks are ignored; anything else (a second token, a comma list) stays part of
    the credential and so simply fails to match.
    """
    v = value.strip(b" \t")
    if v[:6].lower() == _BEARER and v[6:7] in (b" ", b"\t"):
        return v[7:].lstrip(b" \t")
    return v


def _query_key(query: str) -> bytes | None:
    found: bytes | None = None
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        if name == "key" and eq:
            if found is not None:
                return _DUPLICATE
            found = unquote_to_bytes(value)
    return found



def _admin_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in _ADMIN_PATHS)


def _foreign_origin(path: str) -> PermissionDenied:
    """The 403 for a foreign Origin: admin paths always, elsewhere unless configured."""
    if _admin_path(path):
        return PermissionDenied(
            f"{path} does not answer cross-origin requests (a web page must not read rawgate's"
            " metrics or admin API).",
            code="origin_not_allowed",
        )
    return PermissionDenied(
        "This Origin is not allowed to use rawgate: a web page may call it only if its origin"
        " is in [server] cors_allowed_origins.",
        code="origin_not_allowed",
    )


def _check_json(content_type: bytes) -> None:
    """415 unless the media type is application/json (parameters such as charset ignored)."""
    media = content_type.split(b";", 1)[0].strip(b" \t").lower()
    if media != _JSON_TYPE:
        shown = media[:60].decode("ascii", "replace")
        raise UnsupportedMediaType(
            f"Content-Type '{shown}' is not supported: send the body as JSON with"
            " 'Content-Type: application/json' (curl: -H 'Content-Type: application/json')."
        )


def _loopback_only(cfg: Config) -> bool:
    """Whether rawgate listens on loopback addresses only (what server.host says)."""
    h = cfg.server.host
    if not h:
        return not cfg.server.allow_lan_access
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to, do not guess


def _as_rawgate_error(exc: BaseException) -> RawgateError | None:
    """The RawgateError `exc` stands for, unwrapping task-group ExceptionGroups of them."""
    if isinstance(exc, RawgateError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(RawgateError)
        if matched is not None and rest is None:
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            assert isinstance(leaf, RawgateError)
            return leaf
    return None
