"""OAuth access tokens and Code Assist project discovery for `oauth` accounts.

Invariants:
- Access tokens live in memory only (see accounts.py for why), keyed by account id and bound
  to a fingerprint of the refresh token they came from: re-adding an account with another
  refresh token never reuses a token of the old one.
- A token is refreshed REFRESH_MARGIN_S before it expires (google-auth-library's eager
  threshold), or at half its lifetime for short-lived tokens, so no request goes out with a
  token about to die. `now` is injected (wall-clock seconds).
- Exactly one refresh (and one project discovery) in flight per account: concurrent callers
  wait for it and share its result or its error (each gets its own copy of the exception). If
  the caller doing the refresh is cancelled (its client went away), a waiter takes over.
- Across processes (`shared`, injected by the gateway with `[state] backend = "redis"`): the
  one refresh of this process goes through `shared(key, fetch)`, which either returns the
  token another instance stored or runs `fetch` under the fleet's lock and stores its result.
  What is shared is (token, refresh point): the token is offered until the moment its
  refresher would itself refresh it, so every instance adopts the same refresh point and the
  fleet refreshes once per account per expiry. `key` binds the token to the account id and a
  fingerprint of its refresh token (never the secret itself). A token the upstream refused
  (invalidate) is never adopted again from the shared store: its successor is refreshed.
- Errors: `invalid_grant` -> AccountRevoked (the gateway disables the account and keeps
  `reason`); a rejected OAuth client -> a 503 naming the config keys; anything else (status,
  timeout, malformed answer, connection failure) -> OAuthError, an UpstreamError. No message
  ever contains the refresh token, the client secret or an access token.
- The HTTP call is injected (`post_form`, `post_json`): this module decides, the gateway's
  upstream client does the I/O.
- The installed-app login (`rawgate accounts login`, driven by cli_login.py) is pure here:
  a PKCE S256 pair and a `state` per attempt, the authorization URL, reading the redirect
  (or what the user pasted back), and deciding on the code exchange. A redirect whose `state`
  differs from ours is refused (a forged redirect); a bare pasted code carries no state, the
  user typed it themselves.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio
import msgspec

from rawgate.accounts.store import Account
from rawgate.errors import RawgateError, UpstreamError

__all__ = [
    "LOGIN_SCOPES",
    "AccountRevoked",
    "CodeAssistSetupError",
    "LoginGrant",
    "LoginRequest",
    "OAuthError",
    "OAuthLoginFailed",
    "OAuthLoginTimeout",
    "OAuthUnavailable",
    "TokenManager",
    "code_from_redirect",
    "discover_project",
    "email_from_id_token",
    "parse_code_response",
    "parse_token_response",
]

# Refresh this long before expiry (google-auth-library's eagerRefreshThresholdMillis: 5 min).
REFRESH_MARGIN_S = 300.0
# One refresh round trip to the token endpoint, connection included.
REFRESH_TIMEOUT_S = 30.0
# Google answers expires_in=3599; when a token endpoint omits it, assume an hour.
DEFAULT_EXPIRES_IN_S = 3600.0
# Onboarding is a long-running operation: gemini-cli re-posts onboardUser every 5 s until done.
ONBOARD_POLL_S = 5.0
ONBOARD_MAX_POLLS = 24  # 2 minutes, then give up (gemini-cli would poll forever)
# Upstream error text quoted in our messages is cut to this many characters.
QUOTE_MAX_CHARS = 200

PostForm = Callable[[str, dict[str, str]], Awaitable[tuple[int, bytes]]]
PostJson = Callable[[str, str, dict[str, Any]], Awaitable[bytes]]
# (key, fetch -> (token, refresh point), a token not to accept or "") -> (token, refresh
# point): see the module note.
SharedRefresh = Callable[
    [str, Callable[[], Awaitable[tuple[str, float]]], str], Awaitable[tuple[str, float]]
]
T = TypeVar("T")


class OAuthError(UpstreamError):
    """A token refresh failed for a reason that does not condemn the account."""

    default_code = "oauth_refresh_failed"


class OAuthUnavailable(OAuthError):
    """503: OAuth cannot work as configured (no refresh token, no or a rejected client)."""

    status = 503


class OAuthLoginFailed(OAuthError):
    """400: a sign-in (`rawgate accounts login`) did not give a usable grant."""

    status = 400
    default_code = "oauth_login_failed"


class OAuthLoginTimeout(OAuthLoginFailed):
    status = 408
    default_code = "oauth_login_timeout"


class AccountRevoked(UpstreamError):
    """The token endpoint answered invalid_grant: the refresh token is dead (revoked, expired,
    password changed). `reason` is what the gateway stores as disabled_reason."""

    status = 503
    default_code = "account_revoked"

    def __init__(self, message: str, *, reason: str = "invalid_grant", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.reason = reason


class CodeAssistSetupError(UpstreamError):
    """The account cannot be used with Code Assist yet (no project, not eligible, ...)."""

    status = 503
    default_code = "code_assist_setup"


def _fingerprint(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()[:16]


def _quote(text: object, secrets: tuple[str, ...] = ()) -> str:
    s = " ".join(str(text).split())[:QUOTE_MAX_CHARS]
    for secret in secrets:
        if secret:
            s = s.replace(secret, "***")
    return s


@dataclass(slots=True)
class Token:
    value: str
    refresh_at: float  # wall-clock seconds: from here on, refresh before use
    expires_at: float
    fingerprint: bytes  # of the refresh token it came from
    new_refresh_token: str = ""  # the endpoint rotated the refresh token


def _json_object(body: bytes) -> dict[str, Any]:
    """A token endpoint's JSON object, or {} for anything else (an HTML page, a proxy's text)."""
    try:
        doc = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def parse_token_response(
    status: int, body: bytes, now: float, who: str, secrets: tuple[str, ...] = ()
) -> Token:
    """Decide on a token endpoint answer (pure). `who` names the account in messages."""
    doc = _json_object(body)
    if status != 200:
        error = doc.get("error")
        desc = doc.get("error_description")
        code = error if isinstance(error, str) else ""
        detail = _quote(desc, secrets) if isinstance(desc, str) and desc else ""
        if code == "invalid_grant":
            reason = f"invalid_grant: {detail}" if detail else "invalid_grant"
            raise AccountRevoked(
                f"the refresh token of account {who} was refused ({reason}); "
                "add the account again with a new token",
                reason=reason,
            )
        if code in ("invalid_client", "unauthorized_client"):
            raise OAuthUnavailable(
                f"the OAuth client was rejected ({code}) while refreshing account {who}; check "
                "upstream.oauth_client_id and upstream.oauth_client_secret",
                code="oauth_client_rejected",
            )
        what = f" {_quote(code, secrets)}" if code else ""
        raise OAuthError(
            f"token refresh for account {who} failed: HTTP {status}{what}"
            + (f" ({detail})" if detail else "")
        )
    value = doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise OAuthError(f"token refresh for account {who}: answer without access_token")
    raw_exp = doc.get("expires_in", DEFAULT_EXPIRES_IN_S)
    try:
        lifetime = float(raw_exp)
    except (TypeError, ValueError):
        raise OAuthError(f"token refresh for account {who}: bad expires_in") from None
    if not lifetime > 0:
        raise OAuthError(f"token refresh for account {who}: expires_in {lifetime} <= 0")
    # Refresh at margin before expiry, but never later than half the lifetime: a 60 s token
    # must not be "due" the moment it arrives.
    early = min(REFRESH_MARGIN_S, lifetime / 2)
    rotated = doc.get("refresh_token")
    return Token(
        value=value,
        refresh_at=now + lifetime - early,
        expires_at=now + lifetime,
        fingerprint=b"",
        new_refresh_token=rotated if isinstance(rotated, str) else "",
    )


@dataclass(slots=True)
class _Flight(Generic[T]):
    done: anyio.Event = field(default_factory=anyio.Event)
    ok: bool = False
    value: T | None = None
    error: RawgateError | None = None


def _copy_error(e: RawgateError) -> RawgateError:
    # Each waiter raises its own instance: callers append headers to errors they raise.
    c = copy.copy(e)
    c.headers = list(e.headers)
    return c


class _SingleFlight(Generic[T]):
    """At most one `fn()` per key at a time; concurrent callers share its outcome."""

    def __init__(self) -> None:
        self._running: dict[str, _Flight[T]] = {}

    def busy(self, key: str) -> bool:
        return key in self._running

    async def run(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        while (flight := self._running.get(key)) is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise _copy_error(flight.error)
            if flight.ok:
                return flight.value  # type: ignore[return-value]
            # The caller doing the work was cancelled or crashed: take over.
        mine: _Flight[T] = _Flight()
        self._running[key] = mine
        try:
            value = await fn()
            mine.value, mine.ok = value, True
            return value
        except RawgateError as e:
            mine.error = e
            raise
        finally:
            if self._running.get(key) is mine:
                del self._running[key]
            mine.done.set()


class TokenManager:
    """Access tokens for oauth accounts: cached, refreshed ahead of expiry, one refresh each."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        post_form: PostForm,
        *,
        timeout_s: float = REFRESH_TIMEOUT_S,
        on_refresh_token: Callable[[Account, str], None] | None = None,
        shared: SharedRefresh | None = None,
    ) -> None:
        self.token_url = token_url
        self._shared = shared
        self._client_id = client_id
        self._client_secret = client_secret
        self._post_form = post_form
        self.timeout_s = timeout_s
        # Called when the endpoint hands out a new refresh token (the gateway persists it).
        self._on_refresh_token = on_refresh_token
        self._tokens: dict[str, Token] = {}
        # account id -> the last token the upstream refused (not to be taken back from `shared`)
        self._refused: dict[str, str] = {}
        self._refreshes: _SingleFlight[Token] = _SingleFlight()
        self._projects: _SingleFlight[str] = _SingleFlight()
        # Discovered project ids by account id: a hot reload's fresh Account objects (whose
        # file the gateway may not have updated yet) do not trigger a second discovery.
        self._project_ids: dict[str, str] = {}
        self.refresh_count = 0  # refresh round trips started (for metrics and tests)

    def cached(self, acc: Account, now: float) -> str | None:
        """The cached token when it is still good to use at `now`, else None."""
        tok = self._tokens.get(acc.id)
        if tok is None or tok.fingerprint != _fingerprint(acc.refresh_token):
            return None
        return tok.value if now < tok.refresh_at else None

    def invalidate(self, acc: Account) -> None:
        """Forget the token (the upstream answered 401 to it): the next call refreshes."""
        tok = self._tokens.pop(acc.id, None)
        if tok is not None:
            self._refused[acc.id] = tok.value

    def invalidate_if(self, acc: Account, token: str) -> None:
        """Forget the token only if it is still `token`: of many requests that saw a 401 with
        the same dead token, the first forces a refresh and the rest use its result."""
        tok = self._tokens.get(acc.id)
        if tok is not None and tok.value == token:
            del self._tokens[acc.id]
            self._refused[acc.id] = token

    async def access_token(self, acc: Account, now: float) -> str:
        """A usable access token for `acc` (refreshing it first if due)."""
        value = self.cached(acc, now)
        if value is not None:
            return value
        while True:
            tok = await self._refreshes.run(acc.id, lambda: self._refresh(acc, now))
            if tok.fingerprint == _fingerprint(acc.refresh_token):
                return tok.value
            # A refresh for an older refresh token of this id finished: do ours.

    async def _refresh(self, acc: Account, now: float) -> Token:
        value = self.cached(acc, now)  # a refresh that finished just before we started
        if value is not None:
            return self._tokens[acc.id]
        who = acc.display_name()
        if acc.kind != "oauth" or not acc.refresh_token:
            raise OAuthUnavailable(f"account {who} has no refresh token")
        if not self._client_id or not self._client_secret:
            raise OAuthUnavailable(
                f"account {who} is an OAuth account but upstream.oauth_client_id / "
                "upstream.oauth_client_secret are not set in config.toml",
                code="oauth_not_configured",
            )
        if self._shared is None:
            return await self._fetch(acc, now)
        fp = _fingerprint(acc.refresh_token)
        fetched: list[Token] = []

        async def fetch() -> tuple[str, float]:
            tok = await self._fetch(acc, now)
            fetched.append(tok)
            return tok.value, tok.refresh_at

        refused = self._refused.get(acc.id, "")
        value, until = await self._shared(f"{acc.id}.{fp.hex()}", fetch, refused)
        if fetched:
            return fetched[0]
        # Another instance's token: used (and refreshed) at the refresh point it was given.
        tok = Token(value=value, refresh_at=until, expires_at=until, fingerprint=fp)
        self._tokens[acc.id] = tok
        return tok

    async def _fetch(self, acc: Account, now: float) -> Token:
        """One round trip to the token endpoint (the refresh itself)."""
        who = acc.display_name()
        refresh_token = acc.refresh_token
        secrets = (refresh_token, self._client_secret)
        fields = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": self._client_id,
            "client_secret": self._client_secret,
        }
        self.refresh_count += 1
        try:
            with anyio.fail_after(self.timeout_s):
                status, body = await self._post_form(self.token_url, fields)
        except TimeoutError:
            raise OAuthError(
                f"token refresh for account {who} timed out after {self.timeout_s:g} s"
            ) from None
        except RawgateError as e:
            raise OAuthError(
                f"token refresh for account {who} failed: {_quote(e.message, secrets)}"
            ) from None
        tok = parse_token_response(status, body, now, who, secrets)
        if tok.new_refresh_token and tok.new_refresh_token != refresh_token:
            acc.refresh_token = tok.new_refresh_token
            if self._on_refresh_token is not None:
                self._on_refresh_token(acc, tok.new_refresh_token)
        tok.fingerprint = _fingerprint(acc.refresh_token)
        self._tokens[acc.id] = tok
        return tok

    async def project_for(self, acc: Account, token: str, post_json: PostJson) -> str:
        """`acc.project`, discovering it (once, single-flight) when empty; sets acc.project."""
        if acc.project:
            return acc.project
        project = self._project_ids.get(acc.id)
        if project is None:
            project = await self._projects.run(
                acc.id, lambda: discover_project(acc, token, post_json)
            )
            self._project_ids[acc.id] = project
        acc.project = project
        return project


# ---- Code Assist project discovery (protocols.md B3, gemini-cli setup.ts) ----------------------


def _metadata(project: str) -> dict[str, str]:
    md = {"ideType": "IDE_UNSPECIFIED", "platform": "PLATFORM_UNSPECIFIED", "pluginType": "GEMINI"}
    if project:
        md["duetProject"] = project
    return md


def _obj(raw: bytes, method: str) -> dict[str, Any]:
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        doc = None
    if not isinstance(doc, dict):
        raise CodeAssistSetupError(f"Code Assist {method}: answer is not a JSON object")
    return doc


def _project_id(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return ""


async def discover_project(
    acc: Account,
    token: str,
    post_json: PostJson,
    *,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    poll_s: float = ONBOARD_POLL_S,
    max_polls: int = ONBOARD_MAX_POLLS,
) -> str:
    """The Code Assist project of `acc`: loadCodeAssist, then onboardUser if it has no tier.

    `post_json(method, token, payload) -> body bytes` raises a RawgateError on non-200.
    """
    who = acc.display_name()
    need_project = (
        f"account {who} needs a Google Cloud project for Code Assist: re-add it with "
        "`rawgate accounts add-oauth --refresh-token ... --project ID`"
    )
    req: dict[str, Any] = {"metadata": _metadata(acc.project)}
    if acc.project:
        req["cloudaicompanionProject"] = acc.project
    load = _obj(await post_json("loadCodeAssist", token, req), "loadCodeAssist")
    if load.get("currentTier"):
        project = _project_id(load.get("cloudaicompanionProject")) or acc.project
        if not project:
            raise CodeAssistSetupError(need_project)
        return project
    allowed = [t for t in load.get("allowedTiers") or [] if isinstance(t, dict)]
    if not allowed:
        reasons = []
        for t in load.get("ineligibleTiers") or []:
            if isinstance(t, dict):
                r = _quote(t.get("reasonCode") or t.get("reasonMessage") or "unknown")
                if isinstance(t.get("validationUrl"), str):
                    r += f" (verify the account at {_quote(t['validationUrl'])})"
                reasons.append(r)
        raise CodeAssistSetupError(
            f"account {who} is not eligible for Code Assist: "
            + ("; ".join(reasons) if reasons else "no tier offered")
        )
    tier = next((t for t in allowed if t.get("isDefault")), allowed[0])
    tier_id = tier.get("id") if isinstance(tier.get("id"), str) else "legacy-tier"
    if tier_id == "free-tier":
        # "Setting a project in the onboardUser request [for free tier] causes a Precondition
        # Failed error" (gemini-cli): the managed project comes back in the answer.
        onboard: dict[str, Any] = {"tierId": tier_id, "metadata": _metadata("")}
    else:
        if not acc.project and tier.get("userDefinedCloudaicompanionProject"):
            raise CodeAssistSetupError(need_project)
        onboard = {"tierId": tier_id, "metadata": _metadata(acc.project)}
        if acc.project:
            onboard["cloudaicompanionProject"] = acc.project
    for attempt in range(max_polls + 1):
        lro = _obj(await post_json("onboardUser", token, onboard), "onboardUser")
        if lro.get("done"):
            response = lro.get("response")
            project = (
                _project_id(response.get("cloudaicompanionProject"))
                if isinstance(response, dict)
                else ""
            ) or acc.project
            if not project:
                raise CodeAssistSetupError(need_project)
            return project
        if attempt < max_polls:
            await sleep(poll_s)
    raise CodeAssistSetupError(
        f"Code Assist onboarding of account {who} did not finish within "
        f"{max_polls * poll_s:g} s; try again later"
    )


# ---- installed-app login (RFC 8252 loopback redirect, RFC 7636 PKCE; protocols.md B4) ---------

# gemini-cli's scopes: Code Assist needs cloud-platform; the email names the account.
LOGIN_SCOPES = (
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/userinfo.email",
    "https://www.googleapis.com/auth/userinfo.profile",
)


@dataclass(slots=True, frozen=True)
class LoginRequest:
    """One login attempt: its secrets and the URL the user opens."""

    url: str
    redirect_uri: str
    state: str
    verifier: str  # PKCE code_verifier: sent only to the token endpoint

    @classmethod
    def new(
        cls, auth_url: str, client_id: str, redirect_uri: str, login_hint: str = ""
    ) -> LoginRequest:
        # 64 random bytes -> 86 characters of [A-Za-z0-9_-]: inside RFC 7636's 43..128.
        verifier = secrets.token_urlsafe(64)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        state = secrets.token_urlsafe(32)
        params = {
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "response_type": "code",
            "scope": " ".join(LOGIN_SCOPES),
            "access_type": "offline",  # a refresh token, not only an access token
            "prompt": "consent",  # Google sends a refresh token again on a repeated login
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
            "state": state,
        }
        if login_hint:
            params["login_hint"] = login_hint
        sep = "&" if "?" in auth_url else "?"
        return cls(auth_url + sep + urlencode(params), redirect_uri, state, verifier)

    def token_fields(self, code: str, client_id: str, client_secret: str) -> dict[str, str]:
        """The form of the authorization_code exchange."""
        return {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": self.verifier,
            "client_id": client_id,
            "client_secret": client_secret,
            "redirect_uri": self.redirect_uri,
        }


def code_from_redirect(text: str, state: str) -> str:
    """The authorization code in a redirect: a full URL, its query string, or a bare code.

    Raises OAuthError when the redirect carries an error, or a `state` other than ours.
    """
    text = text.strip()
    if not text:
        raise OAuthLoginFailed("nothing was pasted", code="oauth_login_failed")
    query = urlsplit(text).query if "://" in text else text.lstrip("?")
    if "=" not in query:
        return text  # a bare code, as typed by the user
    params = dict(parse_qsl(query, keep_blank_values=True))
    if params.get("state") != state:
        raise OAuthLoginFailed(
            "the redirect's state does not match this login (an old or forged redirect); "
            "start `rawgate accounts login` again",
            code="oauth_state_mismatch",
        )
    if params.get("error"):
        detail = params.get("error_description") or params["error"]
        raise OAuthLoginFailed(
            f"Google refused the sign-in: {_quote(detail)}", code="oauth_login_failed"
        )
    code = params.get("code", "")
    if not code:
        raise OAuthLoginFailed("the redirect carries no code", code="oauth_login_failed")
    return code


def email_from_id_token(id_token: object) -> str:
    """The unverified `email` claim of a JWT: a label for display only, never trusted."""
    if not isinstance(id_token, str) or id_token.count(".") != 2:
        return ""
    payload = id_token.split(".")[1]
    try:
        claims = msgspec.json.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, msgspec.DecodeError):
        return ""
    email = claims.get("email") if isinstance(claims, dict) else None
    return email if isinstance(email, str) else ""


@dataclass(slots=True, frozen=True)
class LoginGrant:
    access_token: str
    refresh_token: str
    email: str  # from the id_token, "" when there is none


def parse_code_response(
    status: int, body: bytes, now: float, secrets: tuple[str, ...] = ()
) -> LoginGrant:
    """Decide on the token endpoint's answer to an authorization_code exchange (pure)."""
    doc = _json_object(body)
    if status != 200:
        error = doc.get("error")
        desc = doc.get("error_description")
        code = _quote(error, secrets) if isinstance(error, str) else f"HTTP {status}"
        detail = f" ({_quote(desc, secrets)})" if isinstance(desc, str) and desc else ""
        hint = ""
        if error in ("invalid_client", "unauthorized_client"):
            hint = "; check upstream.oauth_client_id and upstream.oauth_client_secret"
        raise OAuthLoginFailed(
            f"the token endpoint refused the sign-in code: {code}{detail}{hint}",
            code="oauth_login_failed",
        )
    tok = parse_token_response(status, body, now, "being added", secrets)
    if not tok.new_refresh_token:
        raise OAuthError(
            "the token endpoint sent no refresh token (was access_type=offline dropped?)",
            code="oauth_login_failed",
        )
    return LoginGrant(tok.value, tok.new_refresh_token, email_from_id_token(doc.get("id_token")))
