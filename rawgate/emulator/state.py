"""Settings and the mutable state of one emulated Google: API keys, OAuth tokens, quotas.

Invariants:
- Sans-IO: methods take headers/bodies and return values or raise `Rejected(status, body)`; the
  caller (emulator_core.py) decides the framing (plain or array-wrapped).
- Time is `now()` = the injected clock plus `offset_s`, which tests move with `advance()`: token
  expiry and quota windows are tested without sleeping.
- Access tokens are random, expire after `access_token_lifetime_s`, and die with their refresh
  token when it is revoked (Google does the same).
- Quotas are fixed windows per credential label (the API key itself, or the OAuth account's
  email): `quota_requests` calls per `quota_window_s`, per-label overrides in `key_quotas`
  (0 = no quota at all, the "limit: 0" case). The 429 carries the remaining window as RetryInfo.
- The consent page (`authorize`, Google's /o/oauth2/v2/auth) approves at once: it mints a
  single-use code bound to the client, the redirect_uri and the PKCE challenge, for the account
  named by `login_hint` or, without one, a new account (fresh refresh token and project, not yet
  onboarded, so login exercises onboardUser). The token endpoint's authorization_code grant
  checks all three, as Google does, and answers with a refresh token that then works.
- Tables that grow with traffic (access tokens, quota windows, codes) are capped at
  MAX_TABLE_ENTRIES, oldest first out. Secrets never go into messages.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson

from rawgate.emulator.wire import google_error
from rawgate.seam import Header

__all__ = [
    "DEMO_ACCOUNT",
    "DEMO_API_KEY",
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "MAX_TABLE_ENTRIES",
    "Credentials",
    "Header",
    "OAuthAccount",
    "Rejected",
    "Settings",
    "duration",
]


DEMO_API_KEY = "AIzaSyEmulatorDemoKey-rawgate-000000000"
DEMO_CLIENT_ID = "rawgate-emulator.apps.googleusercontent.com"
DEMO_CLIENT_SECRET = "emulator-demo-secret"
# Tables that grow with traffic stop here; past it the oldest entries go first.
MAX_TABLE_ENTRIES = 10_000
# Google's authorization codes are short-lived; the emulator keeps them 10 minutes.
AUTH_CODE_LIFETIME_S = 600.0
_SCOPE = ("https://www.googleapis.com/auth/cloud-platform "
          "https://www.googleapis.com/auth/userinfo.email "
          "https://www.googleapis.com/auth/userinfo.profile")


@dataclass(slots=True, frozen=True)
class OAuthAccount:
    email: str
    refresh_token: str
    project: str
    onboarded: bool = True  # False: loadCodeAssist has no currentTier until onboardUser


DEMO_ACCOUNT = OAuthAccount("demo@rawgate.invalid", "1//emulator-demo-refresh-token",
                            "emu-demo-project")


@dataclass(slots=True, frozen=True)
class Settings:
    """Everything a run of the emulator can be told (the CLI flags map onto these)."""

    api_keys: tuple[str, ...] = (DEMO_API_KEY,)
    oauth_client_id: str = DEMO_CLIENT_ID
    oauth_client_secret: str = DEMO_CLIENT_SECRET
    oauth_accounts: tuple[OAuthAccount, ...] = (DEMO_ACCOUNT,)
    access_token_lifetime_s: float = 3599.0  # Google's usual expires_in
    quota_requests: int | None = None  # generate calls per credential per window; None = no cap
    quota_window_s: float = 60.0  # Google's per-minute windows
    key_quotas: dict[str, int] = field(default_factory=dict)  # per api key / account email
    chunks: int = 3  # text chunks per streamed reply
    chunk_chars: int = 0  # > 0: fixed-size chunks instead
    chunk_delay_s: float = 0.0  # between stream chunks
    first_byte_delay_s: float = 0.0  # before the response head
    stall_max_s: float = 300.0  # a `stall`/`hang` ends (connection dropped) after this
    validate: bool = True  # Google-like request validation
    require_auth: bool = True
    extra_models: tuple[str, ...] = ()


class Rejected(Exception):
    """The request is refused with this status and google.rpc.Status (or OAuth) body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def duration(seconds: float) -> str:
    """A proto Duration string as Google writes it: "7s", "41.306518s"."""
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"


def _domain(code_assist: bool) -> str:
    return "cloudcode-pa.googleapis.com" if code_assist else "generativelanguage.googleapis.com"


class Credentials:
    """Who may call: API keys, OAuth refresh/access tokens, Code Assist onboarding, quotas."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self.offset_s = 0.0
        self.api_keys = set(settings.api_keys)
        # Asked about a key not (yet) in api_keys; a yes is remembered. `serve --emulate` points
        # it at the gateway's accounts, so keys added while it runs are accepted at once.
        self.key_source: Callable[[str], bool] | None = None
        self.accounts = {a.refresh_token: a for a in settings.oauth_accounts}
        self.onboarded = {a.email for a in settings.oauth_accounts if a.onboarded}
        self.revoked: set[str] = set()
        self.access: dict[str, tuple[str, float]] = {}  # token -> (refresh token, expiry)
        self.windows: dict[str, list[float]] = {}  # label -> [window start, count]
        self.codes: dict[str, _Code] = {}  # authorization code -> what it was issued for
        self.logins = 0  # accounts minted by the consent page

    def now(self) -> float:
        return self._clock() + self.offset_s

    # ---- checks ----

    def developer(self, headers: list[Header], query_key: str | None) -> str:
        """The credential label of a Developer API call (API key, or Bearer token's account)."""
        key: bytes | str | None = next((v for k, v in headers if k == b"x-goog-api-key"), None)
        if key is None:
            key = query_key
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if key is not None:
            if key in self.api_keys or not self.settings.require_auth:
                return key
            if self.key_source is not None and self.key_source(key):
                self.api_keys.add(key)
                return key
            msg = "API key not valid. Please pass a valid API key."
            raise Rejected(400, google_error(400, msg, [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": _domain(False)}},
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
                 "message": msg}]))
        if any(k == b"authorization" for k, _ in headers):
            return self.bearer(headers, False).email
        if not self.settings.require_auth:
            return "anonymous"
        raise Rejected(403, google_error(403, "Method doesn't allow unregistered callers (callers "
                                              "without established identity). Please use API Key "
                                              "or other form of API consumer identity to call "
                                              "this API."))

    def bearer(self, headers: list[Header], code_assist: bool) -> OAuthAccount:
        auth = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, token = auth.decode("latin-1").partition(" ")
        reason = "CREDENTIALS_MISSING"
        if scheme.lower() == "bearer" and token.strip():
            entry = self.access.get(token.strip())
            reason = "ACCESS_TOKEN_TYPE_UNSUPPORTED"
            if entry is not None:
                refresh, expiry = entry
                if refresh in self.revoked or self.now() >= expiry:
                    reason = "ACCESS_TOKEN_EXPIRED"
                else:
                    return self.accounts[refresh]
        raise Rejected(401, google_error(401, None, [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
             "domain": "googleapis.com", "metadata": {"service": _domain(code_assist)}}]))

    # ---- quotas ----

    def take_quota(self, label: str) -> float | None:
        """None if `label` may make this call (and count it), else seconds until its reset."""
        s = self.settings
        limit = s.key_quotas.get(label, s.quota_requests)
        if limit is None:
            return None
        now = self.now()
        w = self.windows.get(label)
        if w is None or now >= w[0] + s.quota_window_s:
            if w is None and len(self.windows) >= MAX_TABLE_ENTRIES:
                self.windows.pop(next(iter(self.windows)))
            w = self.windows[label] = [now, 0]
        if w[1] >= limit:
            return max(0.001, w[0] + s.quota_window_s - now)
        w[1] += 1
        return None

    def quota_error(self, retry: float | None, model: str, label: str, code_assist: bool,
                    limit: Any = None, message: Any = None) -> dict[str, Any]:
        """A 429 RESOURCE_EXHAUSTED body shaped like the API's (protocols.md A6 / B5)."""
        if limit is None:
            limit = self.settings.key_quotas.get(label, self.settings.quota_requests) or 0
        details: list[dict[str, Any]] = []
        if code_assist:
            text = ("You have exhausted your capacity on this model."
                    + (f" Your quota will reset after {duration(retry)}." if retry else ""))
            details.append({"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "RATE_LIMIT_EXCEEDED", "domain": _domain(True),
                            "metadata": {"model": model}})
        else:
            metric = "generativelanguage.googleapis.com/generate_content_free_tier_requests"
            text = ("You exceeded your current quota, please check your plan and billing "
                    "details. For more information on this error, head to: "
                    "https://ai.google.dev/gemini-api/docs/rate-limits.\n* Quota exceeded for "
                    f"metric: {metric}, limit: {limit}, model: {model}"
                    + (f"\nPlease retry in {duration(retry)}." if retry else ""))
            details.append({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                {"quotaMetric": metric,
                 "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                 "quotaDimensions": {"location": "global", "model": model},
                 "quotaValue": str(limit)}]})
            details.append({"@type": "type.googleapis.com/google.rpc.Help", "links": [
                {"description": "Learn more about Gemini API quotas",
                 "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]})
        if retry is not None:
            details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                            "retryDelay": duration(retry)})
        return google_error(429, str(message) if message else text, details)

    # ---- Code Assist onboarding ----

    def load_code_assist(self, account: OAuthAccount) -> dict[str, Any]:
        free = {"id": "free-tier", "name": "Gemini Code Assist for individuals",
                "description": "Emulated free tier", "userDefinedCloudaicompanionProject": False}
        std = {"id": "standard-tier", "name": "Gemini Code Assist",
               "description": "Emulated standard tier",
               "userDefinedCloudaicompanionProject": True}
        out: dict[str, Any] = {"allowedTiers": [{**free, "isDefault": True}, std]}
        if account.email in self.onboarded:
            out["currentTier"] = free
            out["cloudaicompanionProject"] = account.project
        return out

    def onboard(self, account: OAuthAccount, env: dict[str, Any]) -> dict[str, Any]:
        if env.get("tierId", "free-tier") == "free-tier" and env.get("cloudaicompanionProject"):
            # gemini-cli's setup.ts: a project on a free-tier onboard is a precondition failure.
            raise Rejected(400, {"error": {"code": 400, "message": "Precondition check failed.",
                                           "status": "FAILED_PRECONDITION"}})
        self.onboarded.add(account.email)
        return {"name": f"operations/onboard-{account.project}", "done": True, "response": {
            "@type": "type.googleapis.com/google.internal.cloud.code.v1internal."
                     "OnboardUserResponse",
            "cloudaicompanionProject": {"id": account.project, "name": account.project}}}

    # ---- the consent page (installed-app flow) ----

    def authorize(self, q: dict[str, str]) -> tuple[int, str, str]:
        """GET /o/oauth2/v2/auth -> (status, Location or "", HTML text). Approves at once.

        Like Google: a bad client or redirect_uri is an error page (no redirect, the caller
        cannot be trusted with one); other faults redirect back with `error=`.
        """
        s = self.settings
        if q.get("client_id") != s.oauth_client_id:
            return 401, "", "Error 401: invalid_client. The OAuth client was not found."
        redirect = q.get("redirect_uri", "")
        parts = urlsplit(redirect)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            return 400, "", ("Error 400: invalid_request. redirect_uri must be a loopback "
                             "address for an installed app: " + redirect[:200])
        state = q.get("state")
        back: dict[str, str] = {"state": state} if state is not None else {}
        if q.get("response_type") != "code":
            return self._back(redirect, {**back, "error": "unsupported_response_type"})
        challenge = q.get("code_challenge", "")
        method = q.get("code_challenge_method", "plain")
        if not challenge or method not in ("S256", "plain"):
            return self._back(redirect, {**back, "error": "invalid_request",
                                         "error_description": "code_challenge is required "
                                                              "(S256 or plain)"})
        if "cloud-platform" not in q.get("scope", ""):
            return self._back(redirect, {**back, "error": "invalid_scope"})
        account = self._login_account(q.get("login_hint", ""))
        now = self.now()
        if len(self.codes) >= MAX_TABLE_ENTRIES:
            self.codes = {c: e for c, e in self.codes.items() if e.expiry > now}
            while len(self.codes) >= MAX_TABLE_ENTRIES:
                self.codes.pop(next(iter(self.codes)))
        code = "4/0emu-" + secrets.token_urlsafe(24)
        self.codes[code] = _Code(q["client_id"], redirect, challenge, method, account,
                                 now + AUTH_CODE_LIFETIME_S)
        return self._back(redirect, {"code": code, "scope": _SCOPE, **back},
                          f"Signed in as {account.email}. Your code: {code}")

    def _back(self, redirect: str, params: dict[str, str],
              text: str = "Redirecting back to the application.") -> tuple[int, str, str]:
        sep = "&" if "?" in redirect else "?"
        return 302, redirect + sep + urlencode(params), text

    def _login_account(self, hint: str) -> OAuthAccount:
        """The account signing in (refresh_token empty: one is issued per code exchange)."""
        for a in self.accounts.values():
            if a.email == hint:
                return OAuthAccount(a.email, "", a.project, a.onboarded)
        self.logins += 1
        n = self.logins
        return OAuthAccount(hint or f"user{n}@rawgate.invalid", "", f"emu-login-project-{n}",
                            onboarded=False)

    def _code_grant(self, form: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        entry = self.codes.get(str(form.get("code", "")))
        if entry is None or entry.expiry <= self.now():
            return 400, _oauth_error("invalid_grant", "Malformed auth code.")
        if form.get("redirect_uri") != entry.redirect_uri:
            return 400, _oauth_error("redirect_uri_mismatch", "Bad Request")
        verifier = str(form.get("code_verifier", ""))
        if not verifier:
            return 400, _oauth_error("invalid_request", "Missing code verifier.")
        if entry.method == "S256":
            digest = hashlib.sha256(verifier.encode()).digest()
            computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        else:
            computed = verifier
        if not secrets.compare_digest(computed, entry.challenge):
            return 400, _oauth_error("invalid_grant", "Invalid code verifier.")
        del self.codes[form["code"]]  # single use
        # A new refresh token per consent, as Google issues (older ones keep working).
        refresh = "1//emu-" + secrets.token_urlsafe(24)
        a = entry.account
        self.accounts[refresh] = OAuthAccount(a.email, refresh, a.project, a.onboarded)
        status, out = self._access(refresh)
        claims = {"iss": "https://accounts.google.com", "aud": entry.client_id,
                  "email": a.email, "email_verified": True}
        seg = [base64.urlsafe_b64encode(orjson.dumps(x)).rstrip(b"=").decode()
               for x in ({"alg": "none", "typ": "JWT"}, claims)]
        return status, {**out, "refresh_token": refresh, "id_token": ".".join((*seg, "emu"))}

    # ---- the OAuth token endpoint ----

    def token(self, headers: list[Header], body: bytes) -> tuple[int, dict[str, Any]]:
        """POST /token (refresh_token and authorization_code grants) -> (status, JSON body)."""
        ctype = next((v for k, v in headers if k == b"content-type"), b"")
        form: dict[str, Any] = {}
        try:
            if ctype.startswith(b"application/json"):
                decoded = orjson.loads(body)
                form = decoded if isinstance(decoded, dict) else {}
            else:
                form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        except (orjson.JSONDecodeError, UnicodeDecodeError):
            pass
        grant = form.get("grant_type")
        if grant not in ("refresh_token", "authorization_code"):
            return 400, _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant}")
        s = self.settings
        if (form.get("client_id") != s.oauth_client_id
                or form.get("client_secret") != s.oauth_client_secret):
            return 401, _oauth_error("invalid_client", "The OAuth client was not found.")
        if grant == "authorization_code":
            return self._code_grant(form)
        refresh = form.get("refresh_token")
        if not refresh:
            return 400, _oauth_error("invalid_request",
                                     "Missing required parameter: refresh_token")
        if refresh not in self.accounts or refresh in self.revoked:
            return 400, _oauth_error("invalid_grant", "Token has been expired or revoked.")
        return self._access(refresh)

    def _access(self, refresh: str) -> tuple[int, dict[str, Any]]:
        s = self.settings
        now = self.now()
        if len(self.access) >= MAX_TABLE_ENTRIES:
            self.access = {t: e for t, e in self.access.items() if e[1] > now}
            while len(self.access) >= MAX_TABLE_ENTRIES:
                self.access.pop(next(iter(self.access)))
        token = "ya29.emu-" + secrets.token_urlsafe(24)
        self.access[token] = (refresh, now + s.access_token_lifetime_s)
        return 200, {"access_token": token, "expires_in": int(s.access_token_lifetime_s),
                     "scope": _SCOPE, "token_type": "Bearer"}


@dataclass(slots=True, frozen=True)
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    method: str
    account: OAuthAccount  # refresh_token "" until the exchange issues one
    expiry: float


def _oauth_error(error: str, description: str) -> dict[str, Any]:
    return {"error": error, "error_description": description}
