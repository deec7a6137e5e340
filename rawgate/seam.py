"""The protocol-neutral seam between the HTTP drivers (h1_server, h2_server) and applications.

Invariants:
- Handlers see a `Request` and a `ResponseSink`; they never know whether HTTP/1.1 or HTTP/2
  carries them. The gateway app, the emulator and the test servers all use this same seam.
- The driver collects the whole request body (bounded by `limits.max_body_bytes`) before the
  handler runs: OpenAI requests are small JSON documents and the handler needs all of it.
- Header names are lower-case bytes, in arrival order; values are bytes as received.
- `ResponseSink.send()` returns only once the driver can take more (socket buffer or HTTP/2 flow
  control window): that is the backpressure a streaming handler relies on. A sink never buffers
  without bound.
- If the client goes away (EOF, RST_STREAM, write failure), the driver cancels the handler's task
  scope; `sink.send()` on a dead peer raises `ClientDisconnected`.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = [
    "AccessRecord",
    "App",
    "ClientDisconnected",
    "Header",
    "Request",
    "ResponseSink",
    "is_disconnect",
]

# One header as it crosses the seam and the wire: (lower-case name, value), both bytes.
Header = tuple[bytes, bytes]


class ClientDisconnected(Exception):
    """The downstream peer went away; nothing more can be sent to it."""


def is_disconnect(exc: BaseException) -> bool:
    """`exc` (or a task group's ExceptionGroup) only says the client went away: not worth a log."""
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(ClientDisconnected)
        return matched is not None and rest is None
    return isinstance(exc, ClientDisconnected)


class AccessRecord:
    """What a handler learned about one request, for the access log and the request log: the
    model asked for, the upstream model it maps to, the account that served, the client key,
    the attempts, tokens and the error code. Labels, numbers and codes only, never a secret or
    a body. The app creates one per request (`Request.access`) and reads it back when it writes
    the access line and hands the finished request to its observer (the request log)."""

    __slots__ = ("account", "attempts", "error_code", "key", "key_name", "mapped_model", "model",
                 "protocol", "stream", "tokens")  # fmt: skip

    def __init__(self) -> None:
        self.model = ""
        self.mapped_model = ""
        self.account = ""
        # The client key record the app authenticated (state/keys.py KeyRecord), None for an
        # auth.api_keys key or no key; `key_name` its name for the logs.
        self.key: object | None = None
        self.key_name = ""
        # Set by the gateway for a proxied request: the front's protocol ("openai",
        # "anthropic", "gemini"), "" for every other route (no request-log row).
        self.protocol = ""
        # Per upstream attempt, in order: (account label, the attempt's record, whose `status`
        # is the upstream HTTP status, 0 for none). The record is read when the request ends.
        self.attempts: list[tuple[str, Any]] | None = None
        self.stream = False
        self.tokens = NO_TOKENS  # (in, out, cached, thoughts) of the answer
        self.error_code = ""  # the code (or type) of the error answered, "" for none


NO_TOKENS: tuple[int, int, int, int] = (0, 0, 0, 0)


class Request:
    """One HTTP request, body already read."""

    __slots__ = (
        "access",  # set by the app (see __init__)
        "body",
        "client",
        "headers",
        "http_version",
        "method",
        "path",
        "query",
        "raw_target",
        "request_id",
        "scheme",
    )

    access: AccessRecord  # set by the app before any handler runs (see __init__)

    def __init__(
        self,
        method: str,
        raw_target: bytes,
        path: str,
        query: str,
        headers: list[Header],
        body: bytes = b"",
        *,
        http_version: str = "1.1",
        scheme: str = "http",
        client: tuple[str, int] | None = None,
        request_id: str = "",
    ) -> None:
        self.method = method
        self.raw_target = raw_target
        self.path = path  # decoded, normalised path used by routing AND auth
        self.query = query  # raw query string without '?'
        self.headers = headers
        self.body = body
        self.http_version = http_version  # "1.0", "1.1" or "2"
        self.scheme = scheme  # "http" or "https"
        self.client = client
        self.request_id = request_id
        # `access` (an AccessRecord) is set by the app before any handler runs: the handlers fill
        # it for the access log. Not made here, so that a request costs one, not two.

    def header(self, name: bytes) -> bytes | None:
        """First value of a header (name must be lower-case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path} HTTP/{self.http_version} id={self.request_id}>"


class ResponseSink(Protocol):
    """Where a handler writes its response. Implemented once per protocol driver."""

    @property
    def started(self) -> bool:
        """True once the response head has been handed to the driver."""
        ...

    @property
    def bytes_sent(self) -> int:
        """Body bytes accepted so far (for the access log)."""
        ...

    @property
    def status(self) -> int:
        """Status of the started response, 0 before start()."""
        ...

    async def start(self, status: int, headers: list[Header]) -> None:
        """Send the response head. `headers` must not contain hop-by-hop headers."""
        ...

    async def send(self, data: bytes) -> None:
        """Send a piece of body; waits for flow control. Raises ClientDisconnected."""
        ...

    async def end(self, data: bytes = b"") -> None:
        """Send the last piece of body (may be empty) and finish the response."""
        ...

    async def respond(self, status: int, headers: list[Header], body: bytes) -> None:
        """start + end in one go: drivers write head and body with one socket write."""
        ...


class App(Protocol):
    """An application: one coroutine per request."""

    async def __call__(self, request: Request, sink: ResponseSink) -> None: ...
