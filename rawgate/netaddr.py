"""Addresses from settings: `host[:port]` authorities and the `http://[user:pass@]host:port`
proxy URL. A base module (no I/O): config validates with it, the upstream backends connect with
it.

Invariants: a Proxy's repr never shows its credentials; a malformed value is a ValueError.
"""

from __future__ import annotations

import base64

__all__ = ["Proxy", "parse_proxy", "split_host_port"]


class Proxy:
    """An outbound HTTP proxy reached with CONNECT. repr never shows credentials."""

    __slots__ = ("auth", "host", "port")

    def __init__(self, host: str, port: int, auth: bytes | None) -> None:
        self.host = host
        self.port = port
        self.auth = auth  # the Proxy-Authorization value, or None

    def __repr__(self) -> str:
        return f"Proxy({self.host}:{self.port}{', auth' if self.auth else ''})"


def parse_proxy(url: str) -> Proxy | None:
    """`http://[user:pass@]host:port` -> Proxy; "" -> None. Raises ValueError otherwise."""
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "http":
        raise ValueError("upstream.proxy must look like http://host:port")
    rest = rest.split("/", 1)[0]
    auth = None
    if "@" in rest:
        cred, rest = rest.rsplit("@", 1)
        from urllib.parse import unquote

        user, _, password = cred.partition(":")
        token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        auth = f"Basic {token}".encode()
    host, port = split_host_port(rest, 8080)
    return Proxy(host, port, auth)


def split_host_port(authority: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` -> (host without brackets, port)."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"bad IPv6 address in {authority!r}")
        host, rest = authority[1:end], authority[end + 1 :]
        port = int(rest[1:]) if rest.startswith(":") and rest[1:] else default_port
        return host, port
    host, sep, port_s = authority.rpartition(":")
    if not sep:
        return authority, default_port
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"bad port in {authority!r}")
    return host, int(port_s)
