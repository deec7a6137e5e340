"""`rawgate serve`: configuration, logging, the event loop, signals and worker processes.

Invariants:
- Precedence: defaults < config file < RAWGATE_* environment < flags (config.load_config).
- A ConfigError, from the config or from building the app, prints ONE line on stderr and exits 2.
  A listening address that cannot be bound prints one line and exits 1.
- The application is built by `build_app()` and nowhere else: the one seam where the gateway
  routes and the built-in emulator plug in. It is entered before the listener opens and left
  only after the server has drained (in-flight requests still need the upstream pool).
- SIGINT / SIGTERM: graceful shutdown within timeouts.shutdown_grace_s, then exit 0. A second
  signal cancels whatever is still running at once.
- SIGHUP: the config is loaded again (file, environment of the start, flags) and applied to the
  next request and the next connection; nothing in flight is touched, no socket is closed.
  Settings in config.RESTART_SETTINGS keep their running value and a warning names them. A
  config that does not load is logged as one error line and the running one stays. With
  --workers N the supervisor names what needs a restart (once) and forwards SIGHUP to every
  worker, which reloads (or refuses) by itself.
- uvloop runs the event loop whenever it is installed.
- `--workers N` (N > 1): N worker processes, each `rawgate serve --workers 1` with its own event
  loop, all listening on one port with SO_REUSEPORT (the kernel spreads connections). The parent
  binds nothing that listens; it waits until every worker reports ready, prints the start-up line,
  restarts a worker that dies, forwards SIGTERM and exits 0 once the workers have drained. Workers
  run in their own session (a terminal's Ctrl-C reaches only the parent, which forwards it once)
  and shut down by themselves if the parent disappears. Their /metrics is one set: each
  publishes to a directory of this supervisor run under $RAWGATE_HOME/run (metrics.py).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from rawgate import __version__
from rawgate.accounts.store import AccountStore, AccountStoreError
from rawgate.cli.stack import Stack, open_stack
from rawgate.compat import set_fast_paths
from rawgate.config import (
    Config,
    ConfigError,
    auth_mode,
    load_config,
    rawgate_home,
    split_reload,
)
from rawgate.conn import ServerState
from rawgate.http.listener import BindError, bind_error, bind_hosts, open_server, server_ssl_context
from rawgate.logs import configure_logging
from rawgate.monitor.admin_key import AdminKeyError, admin_keys

if TYPE_CHECKING:
    import ssl

    from rawgate.http.listener import Server

__all__ = ["add_parser", "build_app", "run", "serve"]

log = logging.getLogger("rawgate.serve")

# A worker that dies sooner than this after its start counts as a crash loop, not a crash.
_QUICK_DEATH_S = 1.0
_MAX_QUICK_DEATHS = 5  # in a row; then the supervisor gives up (exit 1)
_RESTART_DELAY_S = 1.0  # between a quick death and the restart
_SUPERVISE_TICK_S = 0.2  # how often the parent looks at its workers
_READY_TIMEOUT_S = 30.0  # workers must be listening within this after their start
# Time the parent adds to shutdown_grace_s before it SIGKILLs a worker that did not exit.
_KILL_MARGIN_S = 5.0
_PARENT_POLL_S = 1.0  # how often a worker checks that its parent is still there

NO_ACCOUNT_WARNING = (
    "no upstream account: model requests get a 503 until one is added with"
    " `rawgate accounts add --api-key KEY` (the running server picks it up);"
    " `rawgate serve --emulate` runs without one"
)


@asynccontextmanager
async def build_app(
    cfg: Config,
    state: ServerState,
    *,
    emulate: bool,
    share_cooldowns: bool = True,
    metrics_dir: Path | None = None,
    worker_index: int = 0,
) -> AsyncIterator[Stack]:
    """THE seam: the running Stack whose `.app` every connection is served by
    (rawgate.cli.stack.open_stack: the gateway routes over the upstream pool and, with
    `emulate`, the in-process Gemini emulator; `.reconfigure()` is where SIGHUP lands).
    The gateway's own background tasks (accounts hot reload, counters, shared cooldowns) live as
    long as the block. Cooldowns always go through $RAWGATE_HOME/cooldowns.json: the workers of
    --workers N share them, `rawgate accounts list` shows them, and a restart keeps them (no 429
    storm against an upstream that asked for quiet). Raises ConfigError for settings the
    application refuses (auth on without keys ...) and AccountStoreError for an unreadable
    accounts.json.
    """
    async with open_stack(
        cfg,
        state,
        emulate=emulate,
        share_cooldowns=share_cooldowns,
        metrics_dir=metrics_dir,
        worker_index=worker_index,
    ) as stack:
        yield stack


# ---- argument parsing ---------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the gateway",
        description=(
            "Run the OpenAI-compatible gateway. Settings come from the config file, then"
            " RAWGATE_<SECTION>_<KEY> environment variables, then these flags (each overrides"
            " the one before)."
        ),
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="TOML config file (default: $RAWGATE_HOME/config.toml, RAWGATE_HOME=~/.rawgate)",
    )
    p.add_argument(
        "--host",
        metavar="H",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 and :: with allow_lan_access)",
    )
    # Values are checked by the config loader, not argparse: a wrong one is reported like any
    # other setting (one line naming the flag, exit 2).
    p.add_argument("--port", metavar="P", help="port to listen on (default 8045; 0: any)")
    p.add_argument(
        "--emulate",
        action="store_true",
        help="run the built-in Gemini emulator in-process: no account and no network needed",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        help="worker processes sharing the port with SO_REUSEPORT (default 1)",
    )
    p.add_argument(
        "--tls-cert", metavar="F", help="PEM certificate: serve HTTPS (ALPN h2, http/1.1)"
    )
    p.add_argument("--tls-key", metavar="F", help="PEM private key for --tls-cert")
    p.add_argument(
        "--log-format", metavar="FMT", help="log lines as text or json (default text)"
    )
    p.add_argument(
        "--log-level", metavar="LEVEL", help="debug, info, warning or error (default info)"
    )
    # Internal: how the supervisor starts a worker process.
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--metrics-dir", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


# Flag (argparse dest) -> the setting it overrides.
_FLAGS: dict[str, tuple[str, str]] = {
    "host": ("server", "host"),
    "port": ("server", "port"),
    "workers": ("server", "workers"),
    "tls_cert": ("server", "tls_cert"),
    "tls_key": ("server", "tls_key"),
    "log_format": ("log", "format"),
    "log_level": ("log", "level"),
}
FLAG_NAMES = {setting: "--" + dest.replace("_", "-") for dest, setting in _FLAGS.items()}


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dest, (section, key) in _FLAGS.items():
        v = getattr(args, dest)
        if v is not None:
            out.setdefault(section, {})[key] = v
    return out


def _load(args: argparse.Namespace) -> Config:
    """The effective config: file, environment, flags (a ConfigError names the source)."""
    return load_config(args.config, overrides=_overrides(args), flags=FLAG_NAMES)


def _fail(message: str, code: int) -> int:
    print(f"rawgate: {message}", file=sys.stderr, flush=True)
    return code


# ---- the command ------------------------------------------------------------------------------


def _start_failure(exc: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) when `exc` is a start-up failure we can state in one line: a
    ConfigError or AccountStoreError (2), a BindError (1). Task groups wrap what their tasks
    raise in ExceptionGroups (the emulator's and the gateway's do): look inside."""
    if isinstance(exc, ConfigError | AccountStoreError):
        return str(exc), 2
    if isinstance(exc, BindError):
        return str(exc), 1
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _start_failure(inner)
            if found is not None:
                return found
    return None


def run(args: argparse.Namespace) -> int:
    # Until the event loop takes SIGHUP over, a reload request must not kill a starting server
    # (SIGHUP's default action); one that arrives this early is dropped.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        cfg = _load(args)
        configure_logging(cfg.log.format, cfg.log.level)
        set_fast_paths(cfg.server.fast_paths)  # workers inherit it (fork), and read their own
        ssl_context = server_ssl_context(cfg)
    except ConfigError as e:
        return _fail(str(e), 2)
    if cfg.server.workers > 1 and args.worker_index is None:
        if not hasattr(socket, "SO_REUSEPORT"):
            return _fail(f"server.workers = {cfg.server.workers}: needs SO_REUSEPORT", 2)
        return _supervise(args, cfg)
    worker = args.worker_index is not None
    try:
        return _run_loop(
            serve,
            cfg,
            emulate=args.emulate,
            ssl_context=ssl_context,
            reuse_port=worker,
            announce=not worker,
            ready_fd=args.ready_fd,
            parent=os.getppid() if worker else None,
            reload=lambda: _load(args),
            worker_index=args.worker_index,
            metrics_dir=args.metrics_dir,
        )
    except Exception as e:
        found = _start_failure(e)
        if found is not None:
            return _fail(*found)
        # A crashed background task: logged, and a non-zero exit for supervisors.
        log.exception("rawgate serve failed")
        return 1


def _run_loop(fn: Callable[..., Awaitable[int]], *args: Any, **kwargs: Any) -> int:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        options: dict[str, Any] = {}
    else:
        options = {"use_uvloop": True}

    async def main() -> int:
        return await fn(*args, **kwargs)

    return anyio.run(main, backend="asyncio", backend_options=options)


def _startup_line(
    cfg: Config, urls: list[str], workers: int, emulate: bool, auth: str | None = None
) -> str:
    """`auth`: the mode in force (the app's: client keys turn auto on); None: from `cfg`."""
    proto = "HTTP/1.1 + HTTP/2 (TLS, ALPN)" if cfg.server.tls_cert else "HTTP/1.1 + h2c"
    upstream = "; upstream: the built-in emulator (--emulate), not Google" if emulate else ""
    if auth is None:
        auth = auth_mode(cfg)
        if auth == "off" and cfg.auth.mode == "auto":
            auth = "off until a client key exists"
    return (
        f"rawgate {__version__} listening on {' '.join(urls)} ({proto}; workers={workers};"
        f" auth {auth}{upstream})"
    )


def _dashboard_line(url: str, key: str | None) -> str:
    """The /ui URL, once per start on stderr (not a log line). With a generated admin key the
    key rides in the URL fragment, which a browser never sends to a server; configured keys
    are never printed."""
    scheme, _, rest = url.partition("://")
    host, _, port = rest.rpartition(":")
    if host in ("0.0.0.0", "[::]"):  # listening on every address: this machine's loopback
        host = "127.0.0.1"
    base = f"{scheme}://{host}:{port}/ui"
    if key is None:
        return f"rawgate: dashboard: {base} (admin key: [admin] api_keys)"
    return f"rawgate: dashboard: {base}#key={key}"


async def serve(
    cfg: Config,
    *,
    emulate: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
    announce: bool = True,
    ready_fd: int | None = None,
    parent: int | None = None,
    reload: Callable[[], Config] | None = None,
    worker_index: int | None = None,
    metrics_dir: str | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM (or the parent process is gone); returns the exit code.
    `reload` loads the config again on SIGHUP (None: SIGHUP is ignored)."""
    stop = anyio.Event()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        state = ServerState()
        async with (
            build_app(
                cfg,
                state,
                emulate=emulate,
                share_cooldowns=True,
                metrics_dir=Path(metrics_dir) if metrics_dir else None,
                worker_index=worker_index or 0,
            ) as stack,
            open_server(
                stack.app, cfg, ssl_context=ssl_context, reuse_port=reuse_port, state=state
            ) as server,
        ):
            # What start-up built (modules, config, routes, the emulator) lives as long as the
            # process: frozen out of the collector, a full collection no longer walks it. On
            # the bench box one then stalls every request in flight for ~0.4 ms, not ~1.3 ms.
            gc.collect()
            gc.freeze()
            if announce:
                auth = stack.app.effective_auth_mode()
                print(_startup_line(cfg, server.urls, 1, emulate, auth), flush=True)
                print(_dashboard_line(server.urls[0], stack.admin_key), file=sys.stderr,
                      flush=True)  # fmt: skip
            if not worker_index and stack.no_accounts:  # once, not once per worker
                log.warning(NO_ACCOUNT_WARNING)
            reloader = _Reloader(cfg, stack, server, reload, worker_index)
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_on_signals, signals, stop, server, reloader)
                if parent is not None:
                    tg.start_soon(_watch_parent, parent, stop)
                await stop.wait()
                grace = cfg.timeouts.shutdown_grace_s
                log.info("shutting down: in-flight requests get up to %g s", grace)
                await server.shutdown(grace)
                tg.cancel_scope.cancel()
    log.info("stopped")
    return 0


class _Reloader:
    """SIGHUP in one serving process: see the module invariants."""

    def __init__(
        self,
        started: Config,
        stack: Stack,
        server: Server,
        load: Callable[[], Config] | None,
        worker_index: int | None,
    ) -> None:
        self.started = started  # as loaded at start: what "needs a restart" compares with
        self.stack = stack
        self.server = server
        self.load = load
        # A worker's supervisor already checked the config and named what needs a restart.
        self.worker_index = worker_index
        self.outcomes = {"ok": 0, "failed": 0}
        self.last_ok = True
        # What an alert on a bad reload reads (Prometheus' own config_last_reload_successful).
        metrics = stack.app.metrics
        metrics.add_collector(
            "rawgate_config_reloads_total",
            "counter",
            "SIGHUP config reloads by outcome.",
            lambda: [({"outcome": k}, float(v)) for k, v in self.outcomes.items()],
        )
        metrics.add_collector(
            "rawgate_config_last_reload_successful",
            "gauge",
            "1 unless the last SIGHUP reload was refused (the running config stayed).",
            lambda: [({}, 1.0 if self.last_ok else 0.0)],
            "min",
        )

    async def __call__(self) -> None:
        if self.load is None:
            return
        who = "" if self.worker_index is None else f"worker {self.worker_index}: "
        try:
            new = await anyio.to_thread.run_sync(self.load)  # reads a file: off the loop
            applied, _ = split_reload(self.stack.cfg, new)
            self.stack.reconfigure(applied)
        except ConfigError as e:
            log.error("%sSIGHUP: config not reloaded, the running one stays: %s", who, e)
            self.outcomes["failed"] += 1
            self.last_ok = False
            return
        self.outcomes["ok"] += 1
        self.last_ok = True
        # New connections take the new limits and timeouts; open ones keep theirs.
        self.server.cfg = self.stack.cfg
        log.info("%sconfig reloaded", who)  # before a new log.level may hide it
        configure_logging(applied.log.format, applied.log.level)
        if self.worker_index is None:
            pending = split_reload(self.started, new)[1]
            if pending:
                log.warning(_restart_warning(pending))


def _restart_warning(pending: list[str]) -> str:
    names = ", ".join(pending)
    return f"SIGHUP: {names} changed: needs a restart (still running with the old value)"


async def _on_signals(
    signals: Any, stop: anyio.Event, server: Server, reloader: _Reloader
) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            if not stop.is_set():
                log.info("SIGHUP received: reloading the config")
                await reloader()
            continue
        if not stop.is_set():
            log.info("%s received", signal.Signals(signum).name)
            stop.set()
        else:
            log.warning("second signal: cancelling what is still running")
            await server.shutdown(0)


async def _watch_parent(parent: int, stop: anyio.Event) -> None:
    # No event exists for "my parent died" (prctl's PDEATHSIG is Linux-only and kills): poll.
    while os.getppid() == parent:  # noqa: ASYNC110
        await anyio.sleep(_PARENT_POLL_S)
    log.warning("the supervising process is gone; shutting down")
    stop.set()


# ---- the supervisor ---------------------------------------------------------------------------


class _Worker:
    __slots__ = ("index", "proc", "quick_deaths", "started")

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.quick_deaths = 0


def _worker_argv(
    args: argparse.Namespace, port: int, index: int, ready_fd: int, metrics_dir: Path
) -> list[str]:
    argv = [sys.executable, "-m", "rawgate", "serve", "--workers", "1", "--port", str(port)]
    for flag in ("config", "host", "tls_cert", "tls_key", "log_format", "log_level"):
        v = getattr(args, flag)
        if v is not None:
            argv += ["--" + flag.replace("_", "-"), str(v)]
    if args.emulate:
        argv.append("--emulate")
    return [
        *argv,
        "--worker-index",
        str(index),
        "--ready-fd",
        str(ready_fd),
        "--metrics-dir",
        str(metrics_dir),
    ]


def _reserve_port(cfg: Config) -> tuple[int, socket.socket | None]:
    """The port the workers share; for port 0, a free one held (bound, not listening) here.
    Raises BindError when a fixed port is taken: SO_REUSEPORT alone would let the workers join
    another process's listener (a second rawgate) and share its traffic without a word."""
    host = bind_hosts(cfg)[0]
    if cfg.server.port:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, cfg.server.port))
            except OSError as e:
                raise bind_error(host, cfg.server.port, e) from None
        return cfg.server.port, None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return int(sock.getsockname()[1]), sock


def _metrics_dir() -> Path:
    """A fresh directory for this supervisor run's worker metrics; directories of runs whose
    supervisor is gone (killed with -9) are swept first."""
    run_dir = rawgate_home() / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    for d in run_dir.glob("metrics-*"):
        try:
            os.kill(int(d.name.removeprefix("metrics-")), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue
    d = run_dir / f"metrics-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(mode=0o700)
    return d


def _supervised_reload(args: argparse.Namespace, started: Config, workers: list[_Worker]) -> None:
    """SIGHUP to the supervisor: name once what needs a restart, and let every worker reload.
    A config that does not load is forwarded too: each worker logs the refusal and counts it in
    rawgate_config_last_reload_successful, which is what an alert reads."""
    try:
        new = _load(args)
    except ConfigError:
        new = None
    if new is not None:
        configure_logging(new.log.format, new.log.level)
        pending = split_reload(started, new)[1]
        if pending:
            log.warning(_restart_warning(pending))
    for w in workers:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.send_signal(signal.SIGHUP)


def _supervise(args: argparse.Namespace, cfg: Config) -> int:
    n = cfg.server.workers
    signals_seen: list[int] = []
    hups: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        (hups if signum == signal.SIGHUP else signals_seen).append(signum)

    try:  # once here, not once per worker: a corrupt accounts.json is one line
        AccountStore(rawgate_home() / "accounts.json").load()
    except AccountStoreError as e:
        return _fail(str(e), 2)
    try:  # made once here, before any worker starts, so that every worker reads the same key
        shown = admin_keys(cfg.admin.api_keys, rawgate_home())[1]
    except AdminKeyError as e:
        return _fail(str(e), 2)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        port, holder = _reserve_port(cfg)
    except BindError as e:
        return _fail(str(e), 1)
    except OSError as e:
        return _fail(f"cannot reserve a port on {bind_hosts(cfg)[0]}: {e.strerror or e}", 1)
    try:
        metrics_dir = _metrics_dir()
    except OSError as e:
        return _fail(f"{rawgate_home() / 'run'}: cannot create: {e.strerror or e}", 1)
    read_fd, write_fd = os.pipe()
    workers = [_Worker(i) for i in range(n)]

    def spawn(w: _Worker) -> None:
        # A worker is born ignoring SIGHUP (an ignored signal stays ignored across exec): a
        # reload forwarded while it still imports must not kill it. Its event loop takes SIGHUP
        # over once it serves, and it reads the then-current config at start anyway.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            w.proc = subprocess.Popen(
                _worker_argv(args, port, w.index, write_fd, metrics_dir),
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        finally:
            signal.signal(signal.SIGHUP, on_signal)
        w.started = time.monotonic()

    code = 0
    try:
        for w in workers:
            spawn(w)
        code = _wait_ready(read_fd, workers, n, signals_seen)
        if code == 0 and not signals_seen:
            scheme = "https" if cfg.server.tls_cert else "http"
            urls = [f"{scheme}://{f'[{h}]' if ':' in h else h}:{port}" for h in bind_hosts(cfg)]
            print(_startup_line(cfg, urls, n, args.emulate), flush=True)
            print(_dashboard_line(urls[0], shown), file=sys.stderr, flush=True)
        while code == 0 and not signals_seen:
            time.sleep(_SUPERVISE_TICK_S)
            if hups and not signals_seen:
                hups.clear()
                _supervised_reload(args, cfg, workers)
            for w in workers:
                assert w.proc is not None
                rc = w.proc.poll()
                if rc is None or signals_seen:
                    continue
                if rc == 2:  # the worker refused the configuration: restarting cannot help
                    code = 2
                    break
                quick = time.monotonic() - w.started < _QUICK_DEATH_S
                w.quick_deaths = w.quick_deaths + 1 if quick else 0
                if w.quick_deaths >= _MAX_QUICK_DEATHS:
                    log.error("worker %d keeps dying (exit %s); giving up", w.index, rc)
                    code = 1
                    break
                log.warning("worker %d exited with %s; restarting it", w.index, rc)
                if quick:
                    time.sleep(_RESTART_DELAY_S)
                spawn(w)
    finally:
        _stop_workers(workers, cfg, signals_seen)
        os.close(read_fd)
        os.close(write_fd)
        if holder is not None:
            holder.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)
    return code


def _wait_ready(read_fd: int, workers: list[_Worker], n: int, signals_seen: list[int]) -> int:
    """Block until n workers said "ready"; a worker that exits first makes it fail."""
    os.set_blocking(read_fd, False)
    ready = 0
    buf = b""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while ready < n:
        if signals_seen:
            return 0
        try:
            buf += os.read(read_fd, 4096)
        except BlockingIOError:
            pass
        ready = buf.count(b"ready\n")
        for w in workers:
            assert w.proc is not None
            rc = w.proc.poll()
            if rc is not None:
                return 2 if rc == 2 else 1
        if time.monotonic() > deadline:
            log.error("workers did not start within %g s", _READY_TIMEOUT_S)
            return 1
        time.sleep(0.05)
    return 0


def _stop_workers(workers: list[_Worker], cfg: Config, signals_seen: list[int]) -> None:
    procs = [w.proc for w in workers if w.proc is not None and w.proc.poll() is None]
    for p in procs:
        p.send_signal(signal.SIGTERM)
    forwarded = len(signals_seen)
    deadline = time.monotonic() + cfg.timeouts.shutdown_grace_s + _KILL_MARGIN_S
    for p in procs:
        while p.poll() is None:
            if len(signals_seen) > forwarded:  # a second signal: the workers cancel at once
                forwarded = len(signals_seen)
                for q in procs:
                    if q.poll() is None:
                        q.send_signal(signal.SIGTERM)
            if time.monotonic() > deadline:
                log.error("worker pid %d did not stop; killing it", p.pid)
                p.kill()
                p.wait()
                break
            time.sleep(0.05)
