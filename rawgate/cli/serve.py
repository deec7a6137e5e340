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
- uvloop runs the event loop whenever it is installed.
- `--workers N` (N > 1): N worker processes, each `rawgate serve --workers 1` with its own event
  loop, all listening on one port with SO_REUSEPORT (the kernel spreads connections). The parent
  binds nothing that listens; it waits until every worker reports ready, prints the start-up line,
  restarts a worker that dies, forwards SIGTERM and exits 0 once the workers have drained. Workers
  run in their own session (a terminal's Ctrl-C reaches only the parent, which forwards it once)
  and shut down by themselves if the parent disappears.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from rawgate import __version__
from rawgate.accounts.store import AccountStoreError
from rawgate.config import Config, ConfigError, auth_mode, load_config
from rawgate.conn import ServerState
from rawgate.http.listener import BindError, bind_hosts, open_server, server_ssl_context
from rawgate.logs import configure_logging
from rawgate.cli.stack import open_stack

if TYPE_CHECKING:
    import ssl

    from rawgate.seam import App
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


@asynccontextmanager
async def build_app(
    cfg: Config, state: ServerState, *, emulate: bool, share_cooldowns: bool = True
) -> AsyncIterator[App]:
    """THE seam: the running App every connection is served by (rawgate.cli.stack.open_stack: the
    gateway routes over the upstream pool and, with `emulate`, the in-process Gemini emulator).
    The gateway's own background tasks (accounts hot reload, counters, shared cooldowns) live as
    long as the block. Cooldowns always go through $RAWGATE_HOME/cooldowns.json: the workers of
    --workers N share them, `rawgate accounts list` shows them, and a restart keeps them (no 429
    storm against an upstream that asked for quiet). Raises ConfigError for settings the
    application refuses (auth on without keys ...) and AccountStoreError for an unreadable
    accounts.json.
    """
    async with open_stack(cfg, state, emulate=emulate, share_cooldowns=share_cooldowns) as stack:
        yield stack.app


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
    p.add_argument("--port", metavar="P", type=int, help="port to listen on (default 8045; 0: any)")
    p.add_argument(
        "--emulate",
        action="store_true",
        help="run the built-in Gemini emulator in-process: no account and no network needed",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        type=int,
        help="worker processes sharing the port with SO_REUSEPORT (default 1)",
    )
    p.add_argument(
        "--tls-cert", metavar="F", help="PEM certificate: serve HTTPS (ALPN h2, http/1.1)"
    )
    p.add_argument("--tls-key", metavar="F", help="PEM private key for --tls-cert")
    p.add_argument(
        "--log-format", choices=("text", "json"), help="log lines as text or JSON (default text)"
    )
    p.add_argument(
        "--log-level",
        metavar="LEVEL",
        choices=("debug", "info", "warning", "error"),
        help="debug, info, warning or error (default info)",
    )
    # Internal: how the supervisor starts a worker process.
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    server: dict[str, Any] = {}
    log_: dict[str, Any] = {}
    for flag, key in (("host", "host"), ("port", "port"), ("workers", "workers")):
        v = getattr(args, flag)
        if v is not None:
            server[key] = v
    if args.tls_cert is not None:
        server["tls_cert"] = args.tls_cert
    if args.tls_key is not None:
        server["tls_key"] = args.tls_key
    if args.log_format is not None:
        log_["format"] = args.log_format
    if args.log_level is not None:
        log_["level"] = args.log_level
    out: dict[str, dict[str, Any]] = {}
    if server:
        out["server"] = server
    if log_:
        out["log"] = log_
    return out


def _fail(message: str, code: int) -> int:
    print(f"rawgate: {message}", file=sys.stderr, flush=True)
    return code


# ---- the command ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, overrides=_overrides(args))
        configure_logging(cfg.log.format, cfg.log.level)
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
        )
    except (ConfigError, AccountStoreError) as e:
        return _fail(str(e), 2)
    except BindError as e:
        return _fail(str(e), 1)
    except Exception:  # a crashed background task: logged, and a non-zero exit for supervisors
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


def _startup_line(cfg: Config, urls: list[str], workers: int) -> str:
    proto = "HTTP/1.1 + HTTP/2 (TLS, ALPN)" if cfg.server.tls_cert else "HTTP/1.1 + h2c"
    return (
        f"rawgate {__version__} listening on {' '.join(urls)} ({proto}; workers={workers};"
        f" auth {auth_mode(cfg)})"
    )


async def serve(
    cfg: Config,
    *,
    emulate: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
    announce: bool = True,
    ready_fd: int | None = None,
    parent: int | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM (or the parent process is gone); returns the exit code."""
    stop = anyio.Event()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        state = ServerState()
        async with (
            build_app(cfg, state, emulate=emulate, share_cooldowns=True) as app,
            open_server(
                app, cfg, ssl_context=ssl_context, reuse_port=reuse_port, state=state
            ) as server,
        ):
            # What start-up built (modules, config, routes, the emulator) lives as long as the
            # process: frozen out of the collector, a full collection no longer walks it. On
            # the bench box one then stalls every request in flight for ~0.4 ms, not ~1.3 ms.
            gc.collect()
            gc.freeze()
            if announce:
                print(_startup_line(cfg, server.urls, 1), flush=True)
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_on_signals, signals, stop, server)
                if parent is not None:
                    tg.start_soon(_watch_parent, parent, stop)
                await stop.wait()
                grace = cfg.timeouts.shutdown_grace_s
                log.info("shutting down: in-flight requests get up to %g s", grace)
                await server.shutdown(grace)
                tg.cancel_scope.cancel()
    log.info("stopped")
    return 0


async def _on_signals(signals: Any, stop: anyio.Event, server: Server) -> None:
    async for signum in signals:
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


def _worker_argv(args: argparse.Namespace, port: int, index: int, ready_fd: int) -> list[str]:
    argv = [sys.executable, "-m", "rawgate", "serve", "--workers", "1", "--port", str(port)]
    for flag in ("config", "host", "tls_cert", "tls_key", "log_format", "log_level"):
        v = getattr(args, flag)
        if v is not None:
            argv += ["--" + flag.replace("_", "-"), str(v)]
    if args.emulate:
        argv.append("--emulate")
    return [*argv, "--worker-index", str(index), "--ready-fd", str(ready_fd)]


def _reserve_port(cfg: Config) -> tuple[int, socket.socket | None]:
    """The port the workers share; for port 0, a free one held (bound, not listening) here."""
    if cfg.server.port:
        return cfg.server.port, None
    host = bind_hosts(cfg)[0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return int(sock.getsockname()[1]), sock


def _supervise(args: argparse.Namespace, cfg: Config) -> int:
    n = cfg.server.workers
    signals_seen: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        signals_seen.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        port, holder = _reserve_port(cfg)
    except OSError as e:
        return _fail(f"cannot reserve a port on {bind_hosts(cfg)[0]}: {e.strerror or e}", 1)
    read_fd, write_fd = os.pipe()
    workers = [_Worker(i) for i in range(n)]

    def spawn(w: _Worker) -> None:
        w.proc = subprocess.Popen(
            _worker_argv(args, port, w.index, write_fd),
            pass_fds=(write_fd,),
            start_new_session=True,
        )
        w.started = time.monotonic()

    code = 0
    try:
        for w in workers:
            spawn(w)
        code = _wait_ready(read_fd, workers, n, signals_seen)
        if code == 0 and not signals_seen:
            scheme = "https" if cfg.server.tls_cert else "http"
            urls = [f"{scheme}://{f'[{h}]' if ':' in h else h}:{port}" for h in bind_hosts(cfg)]
            print(_startup_line(cfg, urls, n), flush=True)
        while code == 0 and not signals_seen:
            time.sleep(_SUPERVISE_TICK_S)
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
