"""Assembling the application: the gateway core, its OpenAI routes and, with --emulate, the
in-process Gemini emulator it then talks to.

Invariants:
- `open_stack()` is the one place that builds what `rawgate serve` serves; tests use it too, so
  what they exercise is what users run.
- Order of life: the emulator (if any) starts first, then the upstream client and the gateway's
  background tasks, and only then may the listener accept. Leaving the block stops them in the
  reverse order, so requests that are draining still have an upstream.
- With `emulate`, every upstream URL (Developer API, Code Assist, OAuth token endpoint) points at
  the emulator, and the OAuth client id/secret default to the emulator's demo client. The
  emulator accepts its demo key and every API key in accounts.json, also one added while it runs
  (it asks the gateway's current accounts about a key it does not know); while accounts.json
  holds no account, the gateway uses a built-in demo account on the emulator: the zero-set-up
  path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from rawgate.accounts.store import Account, AccountStore
from rawgate.http.app import GatewayApp
from rawgate.config import Config, rawgate_home
from rawgate.gateway.core import Gateway

if TYPE_CHECKING:
    import ssl

    from rawgate.conn import ServerState
    from rawgate.emulator.server import RunningEmulator, Settings

__all__ = ["DEMO_ACCOUNT_ID", "Stack", "open_stack"]

DEMO_ACCOUNT_ID = "emulator-demo"


@dataclass(slots=True)
class Stack:
    app: GatewayApp
    gateway: Gateway
    cfg: Config  # the effective config (upstream URLs point at the emulator with --emulate)
    emulator: RunningEmulator | None = None


def _demo_account(api_key: str) -> Account:
    return Account(
        id=DEMO_ACCOUNT_ID, kind="api_key", label="emulator-demo", api_key=api_key, created=0
    )


def _point_at(cfg: Config, emu: RunningEmulator) -> Config:
    up = cfg.upstream
    upstream = msgspec.structs.replace(
        up,
        gemini_base_url=emu.base_url,
        code_assist_base_url=emu.base_url,
        oauth_token_url=emu.token_url,
        oauth_auth_url=emu.auth_url,
        oauth_client_id=up.oauth_client_id or emu.client_id,
        oauth_client_secret=up.oauth_client_secret or emu.client_secret,
    )
    return msgspec.structs.replace(cfg, upstream=upstream)


@asynccontextmanager
async def open_stack(
    cfg: Config,
    state: ServerState | None = None,
    *,
    emulate: bool = False,
    home: Path | None = None,
    emulator_settings: Settings | None = None,
    upstream_ssl_context: ssl.SSLContext | None = None,
    share_cooldowns: bool = False,
) -> AsyncIterator[Stack]:
    """The running application; see the module invariants."""
    home = home if home is not None else rawgate_home()
    async with AsyncExitStack() as stack:
        emu: RunningEmulator | None = None
        demo: list[Account] = []
        if emulate:
            from rawgate.emulator import server as emulator

            settings = emulator_settings or emulator.Settings()
            stored = AccountStore(home / "accounts.json").load()
            keys = tuple(a.api_key for a in stored if a.kind == "api_key" and a.api_key)
            if keys:
                settings = dataclasses.replace(
                    settings, api_keys=tuple(dict.fromkeys((*settings.api_keys, *keys)))
                )
            emu = await stack.enter_async_context(
                emulator.serve(host="127.0.0.1", port=0, settings=settings)
            )
            cfg = _point_at(cfg, emu)
            if emu.api_key:
                demo = [_demo_account(emu.api_key)]
        app = GatewayApp(cfg, state)
        gateway = Gateway(
            cfg,
            home=home,
            demo_accounts=demo,
            ssl_context=upstream_ssl_context,
            share_cooldowns=share_cooldowns,
        )
        await stack.enter_async_context(gateway)
        if emu is not None:
            emu.core.creds.key_source = lambda key: any(
                a.kind == "api_key" and a.api_key == key for a in gateway.accounts
            )
        gateway.install(app)
        yield Stack(app, gateway, cfg, emu)
