"""The error tree: every failure a client can see, with its HTTP status and OpenAI error type.

Invariants:
- Each class carries `status`, `type` and a default `code` as class attributes, so the edge that
  turns an exception into a response never guesses.
- Foreign exceptions (msgspec, OSError, h11/h2, anyio) are translated into this tree at exactly two
  boundaries: the upstream backend (socket errors -> UpstreamError family) and the application edge
  (anything left -> InternalError, a logged 500).
- `to_json()` always yields the OpenAI shape `{"error": {"message", "type", "param", "code"}}`.
- Messages never contain secrets: callers pass labels, never keys or tokens.
- `try_again_message` gives a retryable 429 its one "when to come back" sentence, "Please try
  again in Ns." (the phrase Codex reads, protocols.md E5), replacing any other "retry in / try
  again after ..." sentence; the OpenAI routes apply it to every 429 they answer.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import orjson

__all__ = [
    "AccountsAuthResting",
    "AuthenticationError",
    "BadGateway",
    "BadRequest",
    "Conflict",
    "HTTPVersionNotSupported",
    "HeadersTooLarge",
    "InsufficientQuota",
    "InternalError",
    "MethodNotAllowed",
    "MethodNotImplemented",
    "ModelFailed",
    "NoAccountAvailable",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "RawgateError",
    "RequestTimeout",
    "ServiceUnavailable",
    "URITooLong",
    "UnsupportedMediaType",
    "UpstreamAuthFailed",
    "UpstreamClosed",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamError",
    "UpstreamHeadersTimeout",
    "UpstreamPoolTimeout",
    "UpstreamProtocolError",
    "UpstreamQuotaExhausted",
    "UpstreamRateLimited",
    "UpstreamReadTimeout",
    "UpstreamRejected",
    "UpstreamRejectedInAnswer",
    "UpstreamRequestTimeout",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UpstreamWriteTimeout",
    "try_again_message",
]


class RawgateError(Exception):
    """Base of every error rawgate answers with. Subclasses set the class attributes."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        status: int | None = None,
        type: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        # Extra response headers (Retry-After, Allow, WWW-Authenticate, ...).
        self.headers: list[tuple[bytes, bytes]] = headers or []
        # Instance overrides: only for a status rawgate passes through from elsewhere (the
        # upstream's 4xx: UpstreamRejected). Everything else names its status by its class, and
        # the gateway classifies failures by class, never by number.
        if status is not None:
            self.status = status  # type: ignore[misc]
        if type is not None:
            self.type = type  # type: ignore[misc]
        # The upstream's own retry hint (RetryInfo, Retry-After) in seconds, or None: the
        # scheduler cools the account for this long; the headers above tell the client.
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, {self.message!r})"


# ---- the client's fault (4xx) -------------------------------------------------------------------


class BadRequest(RawgateError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(RawgateError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(RawgateError):
    status = 403
    type = "permission_error"


class NotFound(RawgateError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class Conflict(RawgateError):
    """409: the name is taken (the admin API's key add)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class MethodNotAllowed(RawgateError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeout(RawgateError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLarge(RawgateError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"

    @classmethod
    def body_over(cls, limit: int) -> PayloadTooLarge:
        """The one message both HTTP drivers give for a body over `limits.max_body_bytes`."""
        return cls(f"request body larger than {limit} bytes")


class UnsupportedMediaType(RawgateError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class URITooLong(RawgateError):
    status = 414
    type = "invalid_request_error"
    default_code = "uri_too_long"


class HeadersTooLarge(RawgateError):
    status = 431
    type = "invalid_request_error"
    default_code = "headers_too_large"


# A sentence telling when to retry ("Please retry in 56.185908122s.", "Retry after 20 s."): a
# 429 message keeps one, rawgate's own.
_RETRY_SENTENCE = re.compile(
    r"(?i)\s*(?:please\s+)?(?:retry|try\s+again)\s+(?:in|after)\s+\d+(?:\.\d+)?\s*"
    r"(?:ms|s|sec|seconds?)\b\.?"
)


def try_again_message(message: str, seconds: float) -> str:
    """`message` with exactly one "Please try again in Ns." sentence, at its end."""
    message = _RETRY_SENTENCE.sub("", message).rstrip()
    stop = "" if not message or message.endswith((".", "!", "?")) else "."
    wait = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"{message}{stop} Please try again in {wait}s.".lstrip()


class RateLimited(RawgateError):
    """429: every account is cooling, or the upstream said so. Carries Retry-After."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class InsufficientQuota(RateLimited):
    """429 insufficient_quota: the upstream's quota is spent for longer than a retry is worth
    (a per-day quota, `limit: 0`, billing: Gemini's 402 too). The SDKs do not retry it."""

    type = "insufficient_quota"
    default_code = "insufficient_quota"


class UpstreamRequestTimeout(BadRequest):
    """The upstream answered 408: the client's request, but worth another try."""

    status = 408


class UpstreamRejected(BadRequest):
    """The upstream refused the request with a 4xx rawgate has no class for: the client's
    fault, told with the upstream's own status (the one error whose status is per instance)."""

    def __init__(self, message: str, *, status: int, **kw: Any) -> None:
        super().__init__(message, status=status, **kw)



# ---- rawgate's or the upstream's fault (5xx) ----------------------------------------------------


class InternalError(RawgateError):
    status = 500
    type = "server_error"
    default_code = "internal_error"


class MethodNotImplemented(RawgateError):
    """501: a request feature the HTTP layer does not implement (e.g. an unknown transfer
    coding)."""

    status = 501
    type = "invalid_request_error"
    default_code = "not_implemented"


class HTTPVersionNotSupported(RawgateError):
    status = 505
    type = "invalid_request_error"
    default_code = "http_version_not_supported"


class ServiceUnavailable(RawgateError):
    status = 503
    type = "server_error"
    default_code = "service_unavailable"


class NoAccountAvailable(ServiceUnavailable):
    default_code = "no_account_available"


class Overloaded(ServiceUnavailable):
    default_code = "server_is_overloaded"

    @classmethod
    def body_budget(cls) -> Overloaded:
        """The one answer both HTTP drivers give when limits.max_buffered_body_bytes is full."""
        return cls(
            "rawgate holds too many request bodies at once (limits.max_buffered_body_bytes);"
            " retry shortly",
            headers=[(b"retry-after", b"1")],
        )


class UpstreamError(RawgateError):
    """The upstream failed in a way that is not the request's fault."""

    status = 502
    type = "server_error"
    default_code = "upstream_error"


class UpstreamAuthFailed(UpstreamError):
    """Google rejected an account's own credential (API_KEY_INVALID, 401, 403 PERMISSION_DENIED).

    Never the client's 401: the client's key to rawgate is fine, rawgate's key to Google is not.
    A 502 when the upstream rejected the credential(s) tried, a 503 when every account is resting
    after such a rejection; the gateway names the account label(s), never the key. `reason` is
    Google's ErrorInfo reason (API_KEY_INVALID, SERVICE_DISABLED, ...) or the RPC status.
    """

    default_code = "upstream_auth_failed"

    def __init__(self, message: str, *, reason: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.reason = reason
        self.upstream_message = message  # Google's words, before the gateway names the account


class AccountsAuthResting(UpstreamAuthFailed):
    """503 upstream_auth_failed: every account rests because Google refused its credential."""

    status = 503


class UpstreamUnavailable(UpstreamError):
    """The upstream said 503 (overloaded, UNAVAILABLE): worth another account or a retry."""

    status = 503
    default_code = "upstream_unavailable"


class UpstreamRateLimited(UpstreamError):
    """A rate limit found inside a 200 answer (an error object mid-stream): the upstream
    failing mid-answer, told as the 429 it is."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class UpstreamQuotaExhausted(UpstreamRateLimited):
    """InsufficientQuota found inside a 200 answer."""

    type = "insufficient_quota"
    default_code = "insufficient_quota"


class UpstreamRejectedInAnswer(UpstreamError):
    """A 4xx error object inside a 200 answer: the upstream failed mid-answer (another account
    may do better), but it says nothing against this account. Keeps the 4xx status it carried."""

    type = "invalid_request_error"

    def __init__(self, message: str, *, status: int, **kw: Any) -> None:
        super().__init__(message, status=status, **kw)


class ModelFailed(UpstreamError):
    """Gemini answered, but with an unusable turn (MALFORMED_FUNCTION_CALL, ...).

    A 502 the SDKs retry, and the gateway may try another account; it is the model's failure, not
    the account's, so it never puts the account in a cooldown (stream or not).
    """

    default_code = "model_failed"


class UpstreamConnectError(UpstreamError):
    default_code = "upstream_connect_error"


class UpstreamProtocolError(UpstreamError):
    default_code = "upstream_protocol_error"


class UpstreamClosed(UpstreamError):
    """The upstream closed or reset the connection (or the h2 stream) during an exchange."""

    default_code = "upstream_connection_closed"


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    """TCP connect + TLS handshake (+ proxy CONNECT) did not finish within upstream_connect_s."""

    default_code = "upstream_connect_timeout"


class UpstreamHeadersTimeout(UpstreamTimeout):
    """The request was sent but no response head arrived within upstream_headers_s."""

    default_code = "upstream_headers_timeout"


class UpstreamReadTimeout(UpstreamTimeout):
    """An idle gap between two body chunks longer than upstream_read_idle_s (not a total limit)."""

    default_code = "upstream_read_timeout"


class UpstreamWriteTimeout(UpstreamTimeout):
    """Sending the request body made no progress within upstream_write_s."""

    default_code = "upstream_write_timeout"


class UpstreamPoolTimeout(UpstreamTimeout):
    """No pooled connection became free within the pool wait timeout."""

    status = 503
    default_code = "upstream_pool_timeout"


BadGateway = UpstreamError
