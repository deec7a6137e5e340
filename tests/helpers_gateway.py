"""The whole product on loopback for end-to-end tests: emulator + gateway + listener.

`gateway_stack(home, ...)` runs `rawgate.cli.stack.open_stack(emulate=True)` (the code path of
`rawgate serve --emulate`) behind a real listener on 127.0.0.1:0 and yields a `Running` with the
OpenAI base_url to point SDKs at, the emulator (its test hooks) and the gateway (its scheduler).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawgate.accounts.store import AccountStore
from rawgate.cli.stack import open_stack
from rawgate.config import Config, build_config
from rawgate.conn import ServerState
from rawgate.emulator.server import RunningEmulator, Settings
from rawgate.gateway.core import Gateway
from rawgate.http.listener import Server, open_server

__all__ = ["Running", "gateway_stack", "serve_process"]


@dataclass
class Running:
    server: Server
    emulator: RunningEmulator
    gateway: Gateway
    cfg: Config

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"


@asynccontextmanager
async def gateway_stack(
    home: Path,
    *,
    settings: Settings | None = None,
    api_keys: list[tuple[str, str]] | None = None,
    config: dict[str, Any] | None = None,
) -> AsyncIterator[Running]:
    """`api_keys`: (key, label) accounts written to accounts.json first (else the demo account)."""
    if api_keys:
        store = AccountStore(home / "accounts.json")
        for key, label in api_keys:
            store.add_api_key(key, label=label)
    cfg = build_config(config or {}, {}, {})
    state = ServerState()
    async with open_stack(cfg, state, emulate=True, home=home, emulator_settings=settings) as st:
        assert st.emulator is not None
        async with open_server(st.app, st.cfg, host="127.0.0.1", port=0, state=state) as server:
            yield Running(server, st.emulator, st.gateway, st.cfg)


@contextmanager
def serve_process(
    home: Path, *args: str, emulate: bool = True, env: dict[str, str] | None = None
) -> Iterator[str]:
    """A real `rawgate serve --emulate --port 0 ARGS` process; yields its http:// origin.
    Stopped with SIGTERM on exit, which must end it with status 0 (graceful shutdown).
    `emulate=False`: no built-in emulator (the accounts of `home`, upstream from `env`)."""
    env = {**os.environ, "RAWGATE_HOME": str(home), **(env or {})}
    emu = ["--emulate"] if emulate else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "rawgate", "serve", *emu, "--port", "0", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://\S+)", line)
        assert m, f"no start-up line: {line!r}"
        yield m.group(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
