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
- /metrics carries the scheduler's families (per account: up, in flight, cooling models,
  requests, errors, tokens; retries) next to the app's. With `metrics_dir` (a worker of
  `serve --workers N`) they are published there and a scrape sums all workers (metrics.py).
- The shared state (`[state] backend`: local files or Redis, state/store.py) opens before the
  gateway and closes after it: client keys (`rawgate keys`) authenticate in the app and are
  limited by the gateway; /healthz says `"state": "ok" | "degraded"`; its series join /metrics.
- The request log (`[log] request_log`, RAWGATE_HOME/requests.db, monitor/request_log.py) gets
  one row per proxied request from the request's access record, queued without I/O; the writer
  thread stops (writing what is queued) after the server has stopped serving.
- The admin API (/admin/..., /ui: gateway/admin.py) takes `[admin] api_keys`, else the key of
  RAWGATE_HOME/admin_key (made here if missing); every proxied request also goes into the
  per-minute rate ring it shows (monitor/rates.py), request log on or off.
- `Stack.reconfigure()` is the SIGHUP path: the app and the gateway take the new settings for
  the next request; what was built once (upstream pool, emulator) stays.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec

from rawgate.accounts.store import Account, AccountStore
from rawgate.config import Config, ConfigError, rawgate_home
from rawgate.gateway.admin import Admin
from rawgate.gateway.core import Gateway
from rawgate.http.app import GatewayApp
from rawgate.metrics import Merge, WorkerExchange
from rawgate.monitor.admin_key import AdminKeyError, admin_keys
from rawgate.monitor.rates import RateRing
from rawgate.monitor.request_log import RequestLog, Row
from rawgate.state.keys import KEY_PREFIX, KeyRecord
from rawgate.state.store import State, open_state

if TYPE_CHECKING:
    import ssl

    from rawgate.conn import ServerState
    from rawgate.emulator.server import RunningEmulator, Settings
    from rawgate.seam import Request

__all__ = ["DEMO_ACCOUNT_ID", "Stack", "open_stack"]

DEMO_ACCOUNT_ID = "emulator-demo"
# How `serve --workers N` combines the scheduler's gauges (workers may disagree for a moment:
# each learns a cooldown first, then shares it): an account is up only if every worker can use
# it, and cools as many models as the worker that knows most. Counters always sum.
_GAUGE_MERGE: dict[str, Merge] = {
    "rawgate_account_up": "min",
    "rawgate_account_cooling_models": "max",
    "rawgate_state_degraded": "max",
}
_KEY_PREFIX = KEY_PREFIX.encode()

log = logging.getLogger("rawgate.cli.stack")


@dataclass(slots=True)
class Stack:
    app: GatewayApp
    gateway: Gateway
    cfg: Config  # the effective config (upstream URLs point at the emulator with --emulate)
    emulator: RunningEmulator | None = None
    shared: State | None = None  # the shared state ([state] backend)
    request_log: RequestLog | None = None
    admin: Admin | None = None
    # The generated admin key (RAWGATE_HOME/admin_key) while [admin] api_keys is empty: what
    # `serve` prints in the /ui URL; None when the keys are configured.
    admin_key: str | None = None

    @property
    def no_accounts(self) -> bool:
        """True when requests can only get a 503: no account, no emulator demo account."""
        return not self.gateway.accounts

    def reconfigure(self, cfg: Config) -> None:
        """Apply a reloaded config (RESTART_SETTINGS already kept from the running one; with
        --emulate the upstream URLs stay pointed at the emulator). Raises ConfigError before
        anything changed when the app refuses it."""
        cfg = msgspec.structs.replace(cfg, upstream=self.cfg.upstream)
        self.app.configure(cfg)
        self.gateway.reconfigure(cfg)
        self.cfg = cfg


class StateKeys:
    """The app's ClientKeys (http/app.py) over the shared state's key mirror (no I/O)."""

    __slots__ = ("state",)

    def __init__(self, state: State) -> None:
        self.state = state

    def lookup(self, presented: bytes) -> KeyRecord | None:
        # Only `rk-...` can be a client key: any other credential skips the HMAC.
        if not presented.startswith(_KEY_PREFIX):
            return None
        try:
            plain = presented.decode("ascii")
        except UnicodeDecodeError:
            return None
        return self.state.lookup_key(plain)

    def any(self) -> bool:
        return self.state.has_keys()


def request_log_row(
    req: Request, route: str, status: int, duration_s: float, ttfb_s: float | None,
    bytes_out: int,
) -> Row | None:  # fmt: skip
    """The request-log row of a finished request, None for a route that proxies nothing.
    Built from the access record only: names, numbers and codes, never a body or a key."""
    a = req.access
    if not a.protocol:
        return None
    tin, tout, cached, thoughts = a.tokens
    return Row(
        request_id=req.request_id,
        protocol=a.protocol,
        route=route,
        status=status,
        latency_ms=round(duration_s * 1000.0, 3),
        ts=time.time() - duration_s,
        key_name=a.key_name or None,
        client_model=a.model or None,
        mapped_model=a.mapped_model or None,
        account=a.account or None,
        attempts=[(label, t.status) for label, t in a.attempts or ()],
        error_code=a.error_code or None,
        ttfb_ms=None if ttfb_s is None else round(ttfb_s * 1000.0, 3),
        stream=a.stream,
        tokens_in=tin,
        tokens_out=tout,
        tokens_cached=cached,
        tokens_thoughts=thoughts,
        bytes_in=len(req.body),
        bytes_out=bytes_out,
    )


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
    metrics_dir: Path | None = None,
    worker_index: int = 0,
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
        # A worker of `serve --workers N` (metrics_dir set) shares its limits with the others.
        shared = await stack.enter_async_context(
            open_state(cfg, home, processes=2 if metrics_dir is not None else 1)
        )
        try:
            admin_list, shown = admin_keys(cfg.admin.api_keys, home)
        except AdminKeyError as e:
            raise ConfigError(str(e)) from None
        app = GatewayApp(cfg, state, client_keys=StateKeys(shared), admin_keys=admin_list)
        app.health_extra = lambda: {"state": shared.status()["state"]}
        for name, kind, help_, fn in shared.metrics_collectors():
            app.metrics.add_collector(name, kind, help_, fn, _GAUGE_MERGE.get(name, "sum"))
        rlog: RequestLog | None = None
        if cfg.log.request_log:
            lc = cfg.log
            rlog = RequestLog(
                home / "requests.db", days=lc.request_log_days, queue_max=lc.request_log_queue
            )
            try:
                await anyio.to_thread.run_sync(rlog.start)
            except (OSError, sqlite3.Error) as e:
                # The monitor never takes the server down: serve without it, and say so.
                log.warning("request log off: %s cannot be opened (%s)", home / "requests.db", e)
                rlog = None
            else:
                stack.push_async_callback(_close_log, rlog)
        rates = RateRing()
        _observe(app, rlog, rates)
        gateway = Gateway(
            cfg,
            home=home,
            demo_accounts=demo,
            ssl_context=upstream_ssl_context,
            share_cooldowns=share_cooldowns,
            state=shared,
        )
        await stack.enter_async_context(gateway)
        if emu is not None:
            emu.core.creds.key_source = lambda key: any(
                a.kind == "api_key" and a.api_key == key for a in gateway.accounts
            )
        gateway.install(app)
        admin = Admin(gateway, app, rates=rates, rlog=rlog, home=home, emulated=emu is not None)
        admin.install(app)
        for name, kind, help_, fn in gateway.scheduler.metrics_collectors(time.monotonic):
            app.metrics.add_collector(name, kind, help_, fn, _GAUGE_MERGE.get(name, "sum"))
        if metrics_dir is not None:
            exchange = app.metrics.exchange = WorkerExchange(app.metrics, metrics_dir, worker_index)
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            tg.start_soon(exchange.run)
        yield Stack(app, gateway, cfg, emu, shared, rlog, admin, shown)


async def _close_log(rlog: RequestLog) -> None:
    """Write what is queued and stop the writer, off the loop (shielded: runs at shutdown)."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(rlog.close)


def _observe(app: GatewayApp, rlog: RequestLog | None, rates: RateRing) -> None:
    """Feed the rate ring and the request log from the app's observer hook (proxied requests
    only), and count the log's drops in /metrics."""
    ring = rates.record

    def observe(
        req: Request, route: str, status: int, duration_s: float, ttfb_s: float | None,
        bytes_out: int,
    ) -> None:  # fmt: skip
        a = req.access
        if not a.protocol:
            return
        tokens = a.tokens
        ring(time.time(), duration_s, status, tokens[0], tokens[1])
        if rlog is not None:
            row = request_log_row(req, route, status, duration_s, ttfb_s, bytes_out)
            if row is not None:
                rlog.record(row)

    app.on_request = observe
    if rlog is None:
        return
    app.metrics.add_collector(
        "rawgate_request_log_dropped_total",
        "counter",
        "Request-log rows dropped (the writer's queue was full, or a batch failed to write).",
        lambda: [({}, float(rlog.dropped))],
    )
