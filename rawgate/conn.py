"""Per-server and per-connection state shared by the listener and the HTTP drivers.

Invariants:
- One `ServerState` per listening server; drivers read `draining` to stop keep-alive (HTTP/1.1
  answers with `Connection: close`, HTTP/2 sends GOAWAY) and update the connection counters that
  /metrics reports.
- `buffered_body_bytes` is the process's request-body budget in use: a driver adds what it buffers
  and subtracts it when the handler takes the body or the exchange/stream/connection ends.
- `ConnInfo` is immutable per connection and is copied into every Request the driver builds.
"""

from __future__ import annotations

import anyio


class ConnInfo:
    __slots__ = ("alpn", "client", "scheme")

    def __init__(
        self,
        client: tuple[str, int] | None = None,
        scheme: str = "http",
        alpn: str | None = None,
    ) -> None:
        self.client = client
        self.scheme = scheme  # "http" or "https"
        self.alpn = alpn  # negotiated ALPN protocol under TLS, else None

    def __repr__(self) -> str:
        return f"<ConnInfo {self.scheme} client={self.client} alpn={self.alpn}>"


class ServerState:
    """Shared by every connection of one server. Mutated only from the event loop thread."""

    __slots__ = (
        "buffered_body_bytes",
        "draining",
        "in_flight",
        "open_connections",
        "total_connections",
    )

    def __init__(self) -> None:
        self.draining = anyio.Event()  # set when graceful shutdown starts
        self.open_connections: dict[str, int] = {"h1": 0, "h2": 0}
        self.total_connections = 0
        self.in_flight = 0  # requests being handled (maintained by the drivers)
        # Request body bytes the drivers hold for handlers that have not taken them yet, all
        # connections together; bounded by limits.max_buffered_body_bytes.
        self.buffered_body_bytes = 0

    def __repr__(self) -> str:
        return (
            f"<ServerState draining={self.draining.is_set()} open={self.open_connections}"
            f" in_flight={self.in_flight}>"
        )
