"""bench.procs: the processes of a bench run (servers and load generators) and what they cost.

Invariants:
- Every process the harness starts is registered here and runs in its own session (process
  group); `stop_all()` runs at exit, on SIGINT/SIGTERM and after an exception, and signals each
  group (TERM, then KILL after `STOP_GRACE_S`), so a run never leaves a server behind.
- Only processes started here are ever signalled, by their own process group id.
- CPU time and RSS are read from /proc for the whole process tree (LiteLLM and Node start
  helpers), so a server's cost is never under-counted because work moved to a child.
- Pinning (`cpu=`) uses `taskset -c` (inherited by every child and thread) and falls back to
  os.sched_setaffinity on the started process.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# How long a server gets to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 3.0
# RSS sampling period: 20 Hz sees the peak of a 5 s run within a few percent.
SAMPLE_PERIOD_S = 0.05
# Readiness polling period.
READY_POLL_S = 0.05
# A server that keeps closing accepted connections without a byte for this long is broken.
DROP_GIVE_UP_S = 2.0
# A load generator may take this long after its own time bound before it is killed.
LOADGEN_GRACE_S = 30.0

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


class ProcError(RuntimeError):
    """A process could not be started or did not become ready (message says why)."""


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(x) for x in f.read().split())
            except (OSError, ValueError):
                pass
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime (+ reaped children's) of pid's whole tree, in seconds; 0 once gone."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces: fields start after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / _TICK


def rss_bytes(pid: int) -> int:
    """Resident set size of pid's whole tree, in bytes."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            pass
    return total


def vm_hwm_bytes(pid: int) -> int:
    """Peak RSS (VmHWM) of the process itself, in bytes; 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pin_argv(argv: Sequence[str], cpu: int | None) -> list[str]:
    if cpu is None or shutil.which("taskset") is None:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


def http_probe(host: str, port: int, path: str, timeout: float = 1.0) -> int:
    """Status code of `GET path`; 0 when nothing listens or answers in time, -1 when the
    server accepted the connection and closed it without a byte (a broken server)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            data = s.recv(64)
    except ConnectionResetError:
        return -1
    except OSError:
        return 0
    if not data:
        return -1
    parts = data.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return 0


class Proc:
    """One server process of a run."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        ready_path: str = "/",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        cpu: int | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.ready_path = ready_path
        self.env = env
        self.cwd = cwd
        self.cpu = cpu
        self.log_path = (log_dir or Path("/tmp")) / f"bench-{name}-{port}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.popen = subprocess.Popen(
                pin_argv(self.argv, self.cpu),
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            raise ProcError(f"{self.name}: cannot start {self.argv[0]}: {e}") from e
        finally:
            log.close()
        _register(self)
        if self.cpu is not None and shutil.which("taskset") is None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.popen.pid, {self.cpu})
        return self

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float) -> None:
        """Until `GET ready_path` gets any HTTP answer; ProcError if it exits or times out."""
        assert self.popen is not None
        deadline = time.monotonic() + timeout
        dropped = 0
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                tail = self.log_tail()
                last = tail.splitlines()[-1].strip() if tail else ""
                raise ProcError(
                    f"{self.name} exited with {self.popen.returncode} before it was ready: "
                    f"{last}\n{tail}"
                )
            status = http_probe("127.0.0.1", self.port, self.ready_path, timeout=0.5)
            if status > 0:
                return
            if status < 0:
                dropped += 1
                if dropped * READY_POLL_S >= DROP_GIVE_UP_S:
                    raise ProcError(f"{self.name} accepts connections on port {self.port} but "
                                    "closes them without answering:\n" + self.log_tail())
            else:
                dropped = 0
            time.sleep(READY_POLL_S)
        raise ProcError(f"{self.name} not ready on port {self.port} after {timeout} s:\n"
                        + self.log_tail())

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid) if self.alive() else 0.0

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid) if self.alive() else 0

    def stop(self) -> None:
        p = self.popen
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(STOP_GRACE_S)
        # Helpers that left the group behind (rare) still die with the session's group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)


# --- the registry: everything started is stopped ------------------------------------------------

_live: list[Any] = []  # Proc or Popen
_lock = threading.Lock()
_handlers_installed = False


def _register(p: Any) -> None:
    global _handlers_installed
    with _lock:
        _live.append(p)
        if not _handlers_installed:
            _handlers_installed = True
            atexit.register(stop_all)
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: Any) -> None:
    # Turn TERM/HUP into the same path as Ctrl-C: unwinding runs the finally blocks.
    raise KeyboardInterrupt(f"signal {signum}")


def stop_all() -> None:
    with _lock:
        items = list(reversed(_live))
        _live.clear()
    for p in items:
        if isinstance(p, Proc):
            p.stop()
        elif p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(STOP_GRACE_S)


# --- RSS sampling over a measured window --------------------------------------------------------


class Sampler:
    """A thread that samples the RSS of some processes; `window()` peaks between marks."""

    def __init__(self, procs: Sequence[Proc]) -> None:
        self.procs = list(procs)
        self.peak: dict[str, int] = {p.name: 0 for p in self.procs}
        self.active = False
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, name="bench-rss", daemon=True)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(2.0)

    def begin(self) -> None:
        self.peak = {p.name: p.rss_bytes() for p in self.procs}
        self.active = True

    def end(self) -> dict[str, int]:
        self._sample()
        self.active = False
        return dict(self.peak)

    def _sample(self) -> None:
        for p in self.procs:
            r = p.rss_bytes()
            if r > self.peak.get(p.name, 0):
                self.peak[p.name] = r

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_PERIOD_S):
            if self.active:
                self._sample()


# --- the load generator as a process ------------------------------------------------------------


def run_loadgen(
    spec: dict[str, Any],
    *,
    cpu: int | None = None,
    on_start: Callable[[], None] | None = None,
    on_end: Callable[[], None] | None = None,
    python: str = sys.executable,
) -> dict[str, Any]:
    """Run `python -m bench.loadgen -` with `spec`, calling on_start/on_end at the measured
    window's marks; returns its JSON result. ProcError when it fails or prints no result."""
    bound = float(spec.get("warmup_s", 0)) + float(spec.get("duration_s", 5))
    bound += float(spec.get("timeout_s", 30)) + LOADGEN_GRACE_S
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.Popen(
        pin_argv([python, "-m", "bench.loadgen", "-"], cpu),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=root,
        env=env,
        start_new_session=True,
    )
    _register(p)
    if cpu is not None and shutil.which("taskset") is None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(p.pid, {cpu})
    stderr_lines: list[str] = []

    def read_stderr() -> None:
        assert p.stderr is not None
        for raw in p.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("@bench start") and on_start is not None:
                on_start()
            elif line.startswith("@bench end") and on_end is not None:
                on_end()
            elif not line.startswith("@bench"):
                stderr_lines.append(line)

    t = threading.Thread(target=read_stderr, name="bench-loadgen-stderr", daemon=True)
    t.start()
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(json.dumps(spec).encode())
    p.stdin.close()
    timer = threading.Timer(bound, lambda: _kill_group(p))
    timer.start()
    try:
        out = p.stdout.read()
        p.wait()
    except BaseException:  # Ctrl-C / SIGTERM: the load generator goes first, at once
        _kill_group(p)
        raise
    finally:
        timer.cancel()
        t.join(5.0)
        with _lock:
            if p in _live:
                _live.remove(p)
    if p.returncode != 0 or not out.strip():
        tail = "\n".join(stderr_lines[-15:])
        raise ProcError(f"loadgen exited with {p.returncode} and no result:\n{tail}")
    result: dict[str, Any] = json.loads(out)
    return result


def _kill_group(p: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
