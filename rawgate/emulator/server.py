"""The built-in Gemini emulator: the default upstream of `rawgate serve --emulate`, of the
end-to-end tests and of the benchmarks. No Google account, no network.

    async with emulator.serve(port=0) as emu:           # HTTP/1.1 + h2c (+ h2/TLS with ssl_context)
        client = genai.Client(api_key=emu.api_key, http_options=HttpOptions(base_url=emu.base_url))

Invariants:
- `EmulatorApp` is an App over rawgate's request seam (events.py), the same seam the gateway uses,
  so the emulator is served by rawgate's own listener (HTTP/1.1, h2c, h2 over TLS). All decisions
  are taken by the sans-IO `Emulator.handle()` (emulator_core.py); this module only plays the
  resulting `Reply`: delays, chunked writes, drips, and the deliberate faults.
- A deliberate fault (reset before the head, drop after chunk k, an exhausted stall) raises
  `ConnectionCut`, a `ClientDisconnected`: the drivers treat it like a dead peer, i.e. they close
  the HTTP/1.1 connection or reset the h2 stream without finishing the response, quietly.
- `engine="fast"` serves the same core through a minimal asyncio HTTP/1.1 + h2c protocol
  (emulator_fast.py, emulator_fast_h2.py) for benchmarks, where the shared drivers would be the
  bottleneck.
- Nothing here outlives the `serve()` block: listeners, connections and stream tasks close with it.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import msgspec

from rawgate.config import Config
from rawgate.emulator.core import Emulator, Reply
from rawgate.emulator.state import (
    DEMO_ACCOUNT,
    DEMO_API_KEY,
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    OAuthAccount,
    Settings,
)
from rawgate.seam import ClientDisconnected, Request, ResponseSink

__all__ = [
    "DEMO_ACCOUNT",
    "DEMO_API_KEY",
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "ConnectionCut",
    "Emulator",
    "EmulatorApp",
    "OAuthAccount",
    "RunningEmulator",
    "Settings",
    "emulator_config",
    "play",
    "serve",
]


class ConnectionCut(ClientDisconnected):
    """Raised by the emulator to drop a connection on purpose (a scripted fault)."""


class EmulatorApp:
    """The emulator as an App over the request seam."""

    def __init__(self, core: Emulator | None = None) -> None:
        self.core = core or Emulator()

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        core = self.core
        body = request.body
        if type(body) is not bytes:  # the memo keys on the body: it must be hashable
            body = bytes(body)
        reply = core.handle(request.method, request.path, request.query, request.headers, body)
        try:
            await play(reply, sink, core.settings.stall_max_s)
        except ConnectionCut:
            raise
        except ClientDisconnected:
            if reply.chunks is not None:
                core.count("streams_cancelled")
            raise
        if reply.chunks is not None:
            core.count("streams_completed")


async def play(reply: Reply, sink: ResponseSink, stall_max_s: float) -> None:
    """Write `reply` to `sink` with its timing and faults."""
    if reply.first_byte_delay_s:
        await anyio.sleep(reply.first_byte_delay_s)
    cut = reply.cut
    if cut == "reset":
        raise ConnectionCut("emulator: reset before the response head")
    if cut == "hang" or (cut == "stall" and reply.chunks is None):
        await anyio.sleep(stall_max_s)
        raise ConnectionCut("emulator: hang ended")
    headers = list(reply.headers)  # drivers may append to the list they get
    chunks = reply.chunks
    if chunks is None:
        if cut == "drop":
            await sink.start(reply.status, headers)
            raise ConnectionCut("emulator: dropped before the body")
        if reply.drip_s:
            await sink.start(reply.status, headers)
            await _drip(sink, reply.body, reply.drip_s)
            await sink.end()
            return
        await sink.respond(reply.status, headers, reply.body)
        return
    await sink.start(reply.status, headers)
    stop = reply.cut_after if cut in ("drop", "stall") else len(chunks)
    delay = reply.chunk_delay_s
    for i, chunk in enumerate(chunks[:stop]):
        if delay and i:
            await anyio.sleep(delay)
        if reply.drip_s:
            await _drip(sink, chunk, reply.drip_s)
        else:
            await sink.send(chunk)
    if cut == "drop":
        raise ConnectionCut(f"emulator: dropped after {stop} chunks")
    if cut == "stall":
        await anyio.sleep(stall_max_s)
        raise ConnectionCut("emulator: stall ended")
    await sink.end()


async def _drip(sink: ResponseSink, data: bytes, gap_s: float) -> None:
    for i in range(len(data)):
        await sink.send(data[i : i + 1])
        await anyio.sleep(gap_s)


def emulator_config(h2_max_streams: int = 100, max_in_flight: int = 4096) -> Config:
    """The listener Config the emulator runs with: rawgate defaults, no user config file.

    Google allows 100 concurrent streams per h2 connection; tests of the pool's limits raise it.
    """
    cfg = Config()
    limits = msgspec.structs.replace(cfg.limits, h2_max_concurrent_streams=h2_max_streams,
                                     max_in_flight=max_in_flight)
    return msgspec.structs.replace(cfg, limits=limits)


@dataclass(slots=True)
class RunningEmulator:
    """A serving emulator: where it listens and the demo credentials it accepts."""

    core: Emulator
    host: str
    port: int
    scheme: str

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.base_url + "/token"

    @property
    def auth_url(self) -> str:
        """The consent page of `rawgate accounts login` (Google's /o/oauth2/v2/auth)."""
        return self.base_url + "/o/oauth2/v2/auth"

    @property
    def api_key(self) -> str:
        keys = self.core.settings.api_keys
        return keys[0] if keys else ""

    @property
    def account(self) -> OAuthAccount:
        return self.core.settings.oauth_accounts[0]

    @property
    def client_id(self) -> str:
        return self.core.settings.oauth_client_id

    @property
    def client_secret(self) -> str:
        return self.core.settings.oauth_client_secret

    # Test hooks, forwarded to the core.
    def revoke(self, refresh_token: str) -> None:
        self.core.revoke(refresh_token)

    def reset_quotas(self) -> None:
        self.core.reset_quotas()

    def advance(self, seconds: float) -> None:
        self.core.advance(seconds)

    @property
    def stats(self) -> dict[str, int]:
        return self.core.stats


@asynccontextmanager
async def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    settings: Settings | None = None,
    ssl_context: ssl.SSLContext | None = None,
    engine: Literal["standard", "fast"] = "standard",
    config: Config | None = None,
    core: Emulator | None = None,
) -> AsyncIterator[RunningEmulator]:
    """Run the emulator until the block exits.

    engine="standard": rawgate's listener (HTTP/1.1, h2c, and h2 by ALPN under TLS).
    engine="fast": the benchmark-only asyncio server, HTTP/1.1 and h2c (asyncio loop required).
    """
    core = core or Emulator(settings)
    scheme = "https" if ssl_context is not None else "http"
    if engine == "fast":
        from rawgate.emulator.fast import open_fast_server

        streams = (config or emulator_config()).limits.h2_max_concurrent_streams
        async with open_fast_server(core, host, port, ssl_context, streams) as bound:
            yield RunningEmulator(core, host, bound, scheme)
        return
    from rawgate.http.listener import open_server

    app = EmulatorApp(core)
    server: Any
    async with open_server(app, config or emulator_config(), ssl_context=ssl_context, host=host,
                           port=port) as server:
        yield RunningEmulator(core, host, server.port, scheme)
