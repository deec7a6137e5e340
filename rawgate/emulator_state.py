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
- Tables that grow with traffic (access tokens, quota windows) are capped at MAX_TABLE_ENTRIES,
  oldest first out. Secrets never go into messages.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson

from rawgate.emulator_wire import google_error

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

Header = tuple[bytes, bytes]

DEMO_API_KEY = "AIzaSyEmulatorDemoKey-rawgate-000000000"
DEMO_CLIENT_ID = "rawgate-emulator.apps.googleusercontent.com"
DEMO_CLIENT_SECRET = "emulator-demo-secret"
# Tables that grow with traffic stop here; past it the oldest entries go first.
MAX_TABLE_ENTRIES = 10_000
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
        self.accounts = {a.refresh_token: a for a in settings.oauth_accounts}
        self.onboarded = {a.email for a in settings.oauth_accounts if a.onboarded}
        self.revoked: set[str] = set()
        self.access: dict[str, tuple[str, float]] = {}  # token -> (refresh token, expiry)
        self.windows: dict[str, list[float]] = {}  # label -> [window start, count]

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

    # ---- the OAuth token endpoint ----

    def token(self, headers: list[Header], body: bytes) -> tuple[int, dict[str, Any]]:
        """POST /token (grant_type=refresh_token) -> (status, JSON body), Google's shapes."""
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
        if grant != "refresh_token":
            return 400, _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant}")
        s = self.settings
        if (form.get("client_id") != s.oauth_client_id
                or form.get("client_secret") != s.oauth_client_secret):
            return 401, _oauth_error("invalid_client", "The OAuth client was not found.")
        refresh = form.get("refresh_token")
        if not refresh:
            return 400, _oauth_error("invalid_request",
                                     "Missing required parameter: refresh_token")
        if refresh not in self.accounts or refresh in self.revoked:
            return 400, _oauth_error("invalid_grant", "Token has been expired or revoked.")
        now = self.now()
        if len(self.access) >= MAX_TABLE_ENTRIES:
            self.access = {t: e for t, e in self.access.items() if e[1] > now}
            while len(self.access) >= MAX_TABLE_ENTRIES:
                self.access.pop(next(iter(self.access)))
        token = "ya29.emu-" + secrets.token_urlsafe(24)
        self.access[token] = (refresh, now + s.access_token_lifetime_s)
        return 200, {"access_token": token, "expires_in": int(s.access_token_lifetime_s),
                     "scope": _SCOPE, "token_type": "Bearer"}


def _oauth_error(error: str, description: str) -> dict[str, Any]:
    return {"error": error, "error_description": description}
