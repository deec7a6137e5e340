"""bench.variants: rawgate set up in different ways, side by side in one run, same load.

    python -m bench.variants lb     [--duration S] [--warmup S] [--repeats N] [--only SC[:CASE]]
                                    [--count N] [--json FILE]
    python -m bench.variants reqlog [same options, no --count] [--rate R]

Mode `lb` (issue 16: several instances on one shared store): every instance is
`rawgate serve --emulate` (the Gemini emulator in the same process, so an instance's CPU
includes its emulator's), each with its own RAWGATE_HOME, all requests carrying one client key
with an rpm limit (so every request pays the limiter check, locally or on Redis). Targets:
- `one-local`: one instance on the local state backend, the load generator straight at it;
- `one-local+lb`: the same instance behind bench.lb (the balancer's own latency and CPU);
- `one-redis`: one instance on the Redis backend (Redis's cost without a second instance);
- `two-redis+lb`: two instances on one redis-server behind bench.lb, round robin per TCP
  connection (bench/lb.py says why that is honest for keep-alive clients);
- `two-redis+lb/req`: the same two behind bench.lb --per-request (HTTP/1.1 aware: round robin
  per request, each client connection holding one keep-alive connection per instance).
redis-server is started by this script on a free loopback port and stopped after; without the
binary the Redis targets are skipped, saying so. After the timed runs, the shared-state check:
a fresh key with `--rpm N` gets N + extra requests through the balancer; the run passes it only
when exactly N are answered and `extra` refused with 429 across both instances, the key's usage
in Redis says N requests, both instances served some (their /metrics), and neither saw Redis
degraded. Two instances each counting alone would admit up to 2N.

Mode `reqlog` (issue 17: what the request log costs): two `rawgate serve` instances, one with
`[log] request_log = true`, one with false, against one `rawgate emulate --engine fast` upstream
(its CPU is not counted), auth off. The per-request difference is CPU on minus CPU off,
in microseconds; rawgate's CPU includes the log's writer thread (SQLite inserts in batches).

Invariants:
- Repeats are interleaved across targets (A, B, ..., A, B, ...) so a drift of the shared machine
  hits every target alike; each number is the median over repeats, with its spread.
- CPU is read from /proc over exactly the measured window, per group: the instances summed
  (their threads' schedstat, nanoseconds; the main thread, rawgate's event loop, also on its
  own), the balancer and redis-server (bench.procs: /proc/<pid>/stat), each on its own.
- Every process started here is stopped at exit (bench.procs' registry).
- The exit status is 1 only for harness breakage (a load generator without a result, a target
  that answered nothing) or a failed shared-state check; never for a number.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import procs, report
from bench.procs import Proc, ProcError
from bench.scenarios import Case, Load, TargetInfo, Upstream, all_scenarios, loadgen_spec

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
START_S = 30.0
API_KEY = "bench-key"
# The timed runs' key: a limit (so the check runs on every request) that never refuses.
BIG_RPM = 1_000_000_000
# The shared-state check must not straddle a UTC minute (rpm windows are per minute): it waits
# for the next minute when fewer than this many seconds (plus 1 s per 200 requests) are left.
MINUTE_MARGIN_S = 5.0
# Requests refused on purpose in the shared-state check.
COUNT_EXTRA = 10
# How long usage written after the last answer may take to show up.
USAGE_SETTLE_S = 5.0
# --rate: requests in flight at most (the open loop's cap).
OPEN_IN_FLIGHT = 64

DEFAULT_CASES = {
    "lb": ["chat:c=16", "stream-chat:c=16"],
    "reqlog": ["chat:c=16", "stream-chat:c=16", "messages:c=16", "stream-messages:c=16",
               "native:c=16", "native:stream c=16"],
}  # fmt: skip


@dataclass
class Target:
    """What the load generator talks to and whose CPU is its cost."""

    name: str
    port: int
    instances: list[Proc]
    lb: Proc | None = None
    redis: Proc | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def info(self) -> TargetInfo:
        return TargetInfo(self.name, "openai", self.port, headers=self.headers,
                          apis=frozenset({"chat", "responses", "messages", "native"}))

    def cpu(self) -> dict[str, Any]:
        threads: dict[tuple[int, int], float] = {}
        for p in self.instances:
            threads |= _threads_cpu_s(p.pid)
        out: dict[str, Any] = {
            "instances": threads, "loop": sum(_main_thread_cpu_s(p.pid) for p in self.instances)}
        if self.lb is not None:
            out["lb"] = self.lb.cpu_seconds()
        if self.redis is not None:
            out["redis"] = self.redis.cpu_seconds()
        return out


def _schedstat_s(pid: int, tid: int) -> float:
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _main_thread_cpu_s(pid: int) -> float:
    """CPU seconds of the process's main thread (tid = pid: rawgate's event loop), from
    schedstat in nanoseconds. The rest of the process's CPU is its other threads: the request
    log's writer, to_thread workers."""
    return _schedstat_s(pid, pid)


def _threads_cpu_s(pid: int) -> dict[tuple[int, int], float]:
    """CPU seconds of each live thread of the process, from schedstat (nanoseconds; the 10 ms
    ticks of /proc/<pid>/stat quantize 1,500 requests' CPU to ~7 us each). See `_delta`."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (OSError, ValueError):
        return {}
    return {(pid, t): _schedstat_s(pid, t) for t in tids}


def _delta(before: Any, after: Any) -> float:
    """CPU used between two readings. Per-thread readings: the threads alive at the end, minus
    what each had at the start (0 for one started inside the window); a thread that ended
    inside the window takes its share with it (rawgate's threads that matter, the event loop
    and the log writer, live as long as the server; an idle to_thread worker that exits then
    used nothing in the window), and never makes the difference negative."""
    if isinstance(after, dict):
        return float(sum(v - before.get(k, 0.0) for k, v in after.items()))
    return float(after - before)


@dataclass
class Run:
    log_dir: Path
    json_out: Any = None
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        print(f"bench.variants: {text}", file=sys.stderr, flush=True)
        self.notes.append(text)
        self.emit({"kind": "note", "text": text})

    def emit(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if self.json_out is not None:
            self.json_out.write(json.dumps(rec) + "\n")
            self.json_out.flush()


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # Nothing of the caller's rawgate setup leaks in: every setting that matters is set here.
    for k in [k for k in env if k.startswith("RAWGATE_")]:
        del env[k]
    return env | {"RAWGATE_LOG_LEVEL": "warning"} | extra


def _cli(env: dict[str, str], *args: str) -> str:
    """`python -m rawgate ARGS` with env; its stdout (ProcError with its output on failure)."""
    p = subprocess.run([sys.executable, "-m", "rawgate", *args], env=env, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise ProcError(f"rawgate {' '.join(args[:2])} failed: {(p.stdout + p.stderr).strip()}")
    return p.stdout


# --- processes ---------------------------------------------------------------------------------


def start_redis(run: Run) -> Proc | None:
    exe = shutil.which("redis-server")
    if exe is None:
        run.note("redis-server not installed (apt-get install -y redis-server): the Redis "
                 "targets and the shared-state check are SKIPPED")
        return None
    port = procs.free_port()
    p = Proc("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no"], port=port, log_dir=run.log_dir)
    p.start()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                version = subprocess.run([exe, "--version"], capture_output=True,
                                         text=True).stdout.split()
                run.note("redis-server " + next((v.split("=", 1)[1] for v in version
                                                 if v.startswith("v=")), "?")
                         + f" on 127.0.0.1:{port}")
                return p
        if not p.alive():
            break
        time.sleep(0.05)
    p.stop()
    run.note(f"redis-server did not start: {p.log_tail(3)}; the Redis targets are SKIPPED")
    return None


def start_instance(run: Run, name: str, env: dict[str, str], emulate: bool) -> Proc:
    port = procs.free_port()
    argv = [sys.executable, "-m", "rawgate", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if emulate:
        argv.append("--emulate")
    p = Proc(name, argv, port=port, ready_path="/healthz", env=env, cwd=str(ROOT),
             log_dir=run.log_dir)
    try:
        p.start().wait_ready(START_S)
    except ProcError:
        p.stop()
        raise
    return p


def start_lb(run: Run, name: str, backends: list[Proc], per_request: bool = False) -> Proc:
    port = procs.free_port()
    argv = [sys.executable, "-m", "bench.lb", "--port", str(port)]
    if per_request:
        argv.append("--per-request")
    for b in backends:
        argv += ["--backend", f"127.0.0.1:{b.port}"]
    p = Proc(name, argv, port=port, ready_path="/healthz", env=_env({}), cwd=str(ROOT),
             log_dir=run.log_dir)
    p.start().wait_ready(START_S)
    return p


def _home(run: Run, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"home-{name}-", dir=run.log_dir))


def setup_lb(run: Run) -> dict[str, Any]:
    """The `lb` mode's processes and targets; what the shared-state check needs."""
    redis = start_redis(run)
    local_env = _env({"RAWGATE_HOME": str(_home(run, "local"))})
    key = _cli(local_env, "keys", "add", "bench", "--rpm", str(BIG_RPM)).strip()
    auth = (("authorization", f"Bearer {key}"),)
    one = start_instance(run, "one-local", local_env, emulate=True)
    run.targets.append(Target("one-local", one.port, [one], headers=auth))
    lb1 = start_lb(run, "lb-one", [one])
    run.targets.append(Target("one-local+lb", lb1.port, [one], lb=lb1, headers=auth))
    ctx: dict[str, Any] = {"redis": redis}
    if redis is None:
        return ctx
    shared = {
        "RAWGATE_STATE_BACKEND": "redis",
        "RAWGATE_STATE_REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
        "RAWGATE_STATE_KEY_PREFIX": "bench:",
        # The shared 2-core box can stall a call past the 250 ms default; a degraded episode
        # would serve from local state and void the shared-state check (which counts them).
        "RAWGATE_STATE_REDIS_TIMEOUT_MS": "2000",
    }
    envs = [_env(shared | {"RAWGATE_HOME": str(_home(run, f"redis{i}"))}) for i in (1, 2)]
    rkey = _cli(envs[0], "keys", "add", "bench", "--rpm", str(BIG_RPM)).strip()
    rauth = (("authorization", f"Bearer {rkey}"),)
    a = start_instance(run, "redis-a", envs[0], emulate=True)
    b = start_instance(run, "redis-b", envs[1], emulate=True)
    run.targets.append(Target("one-redis", a.port, [a], redis=redis, headers=rauth))
    lb2 = start_lb(run, "lb-two", [a, b])
    run.targets.append(Target("two-redis+lb", lb2.port, [a, b], lb=lb2, redis=redis,
                              headers=rauth))
    lb3 = start_lb(run, "lb-two-per-request", [a, b], per_request=True)
    run.targets.append(Target("two-redis+lb/req", lb3.port, [a, b], lb=lb3, redis=redis,
                              headers=rauth))
    ctx |= {"env": envs[0], "instances": [a, b], "lb": lb2}
    return ctx


def setup_reqlog(run: Run) -> dict[str, Any]:
    port = procs.free_port()
    up = Proc("upstream", [sys.executable, "-m", "rawgate", "emulate", "--host", "127.0.0.1",
                           "--port", str(port), "--api-key", API_KEY, "--engine", "fast"],
              port=port, ready_path="/v1beta/models", env=_env({}), cwd=str(ROOT),
              log_dir=run.log_dir)
    up.start().wait_ready(START_S)
    homes: dict[str, Path] = {}
    for name, on in (("log-on", "true"), ("log-off", "false")):
        homes[name] = _home(run, name)
        env = _env({
            "RAWGATE_HOME": str(homes[name]),
            "RAWGATE_UPSTREAM_GEMINI_BASE_URL": f"http://127.0.0.1:{port}",
            "RAWGATE_AUTH_MODE": "off",
            "RAWGATE_LOG_REQUEST_LOG": on,
        })
        _cli(env, "accounts", "add", "--api-key", API_KEY, "--label", "bench")
        p = start_instance(run, name, env, emulate=False)
        run.targets.append(Target(name, p.port, [p]))
    return {"homes": homes}


def reqlog_check(run: Run, homes: dict[str, Path]) -> bool:
    """After the instances stopped: the log-on instance logged every measured answer (warm-ups
    and all, so at least as many rows), the log-off one never opened a log."""
    answered = sum(r["ok"] for r in run.records
                   if r.get("kind") == "run" and r.get("target") == "log-on" and "ok" in r)
    db = homes["log-on"] / "requests.db"
    rows = 0
    if db.exists():
        with contextlib.closing(sqlite3.connect(db)) as con:
            rows = con.execute("SELECT count(*) FROM requests").fetchone()[0]
    off = (homes["log-off"] / "requests.db").exists()
    passed = rows >= answered > 0 and not off
    run.emit({"kind": "reqlog_check", "answered": answered, "rows": rows,
              "off_has_db": off, "passed": passed})
    run.note(f"request-log check: log-on wrote {rows:,} rows for {answered:,} measured answers "
             f"(warm-ups are logged too); log-off {'HAS' if off else 'has no'} requests.db: "
             f"{'PASSED' if passed else 'FAILED'}")
    return passed


# --- runs --------------------------------------------------------------------------------------


def run_case(run: Run, case_id: str, case: Case, t: Target, rep: int) -> None:
    spec = loadgen_spec(t.info(), Upstream("emulator", 0, API_KEY), case)
    marks: dict[str, Any] = {}

    def on_start() -> None:
        marks["t0"], marks["c0"] = time.perf_counter(), t.cpu()

    def on_end() -> None:
        marks["t1"], marks["c1"] = time.perf_counter(), t.cpu()

    rec: dict[str, Any] = {"kind": "run", "case": case_id, "target": t.name, "repeat": rep}
    try:
        res = procs.run_loadgen(spec, on_start=on_start, on_end=on_end)
    except ProcError as e:
        run.broken.append(f"{case_id} {t.name}: {str(e).splitlines()[0]}")
        rec["error"] = str(e)
        run.emit(rec)
        return
    ok = res["ok"]
    cpu = {k: _delta(marks["c0"][k], v) for k, v in marks["c1"].items()} if "c1" in marks else {}
    rec |= {
        "ok": ok, "rps": res["rps"], "errors": res["errors"],
        "p50_ms": res["latency_ms"].get("p50"), "p99_ms": res["latency_ms"].get("p99"),
        "cpu_ms_per_req": {k: v * 1000 / ok for k, v in cpu.items()} if ok else {},
        "window_s": marks["t1"] - marks["t0"] if "t1" in marks else None,
    }  # fmt: skip
    run.emit(rec)
    per = rec["cpu_ms_per_req"]
    print(f"  [{case_id} r{rep}] {t.name:>13}: {res['rps']:8,.0f} req/s  p50 "
          f"{rec['p50_ms'] or float('nan'):7.3f} ms  p99 {rec['p99_ms'] or float('nan'):7.3f} ms"
          "  CPU ms/req " + " ".join(f"{k} {v:.3f}" for k, v in per.items())
          + (f"  errors {res['errors']}" if res["error_total"] else ""),
          file=sys.stderr, flush=True)
    if ok == 0:
        run.broken.append(f"{case_id} {t.name}: no good response ({res['errors']})")


def cases_for(only: list[str]) -> list[tuple[str, Case]]:
    table = all_scenarios()
    out = []
    for item in only:
        sc, _, label = item.partition(":")
        if sc not in table:
            raise SystemExit(f"unknown scenario {sc!r}; known: {', '.join(table)}")
        found = [c for c in table[sc].cases if not label or c.label == label]
        if not found:
            raise SystemExit(f"{sc} has no case {label!r}; cases: "
                             + ", ".join(c.label for c in table[sc].cases))
        out += [(f"{sc} {c.label}", c) for c in found]
    return out


def _scaled(case: Case, duration: float, warmup: float) -> Case:
    return replace(case, load=replace(case.load, duration_s=duration, warmup_s=warmup))


# --- the shared-state check (mode lb) ----------------------------------------------------------


def _metric(port: int, headers: tuple[tuple[str, str], ...], name: str,
            labels: str) -> float:
    """The value of `name{labels...}` in one instance's /metrics (0 when absent)."""
    req = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    req += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    data = b""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(req.encode())
        while chunk := s.recv(65536):
            data += chunk
    total = 0.0
    pat = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+]+)$", re.M)
    for m in pat.finditer(data.decode(errors="replace")):
        if all(part in m.group(1) for part in labels.split(",") if part):
            total += float(m.group(2))
    return total


def shared_state_check(run: Run, ctx: dict[str, Any], n: int) -> bool:
    env, (a, b), lb = ctx["env"], ctx["instances"], ctx["lb"]
    name = f"shared-count-{int(time.time())}"
    key = _cli(env, "keys", "add", name, "--rpm", str(n)).strip()
    auth = (("authorization", f"Bearer {key}"),)
    left = 60.0 - time.time() % 60.0
    if left < MINUTE_MARGIN_S + n / 200:
        time.sleep(left + 0.05)  # the rpm window is a UTC minute: start a fresh one
    chat = all_scenarios()["chat"].cases[0]
    total = n + COUNT_EXTRA
    case = replace(chat, load=Load(concurrency=8, duration_s=60.0, warmup_s=0.0,
                                   max_requests=total, timeout_s=30.0))
    t = Target("two-redis+lb", lb.port, [a, b], headers=auth)
    res = procs.run_loadgen(loadgen_spec(t.info(), Upstream("emulator", 0, API_KEY), case))
    refused = res["errors"].get("status_429", 0)
    deadline = time.monotonic() + USAGE_SETTLE_S
    while True:
        usage = json.loads(_cli(env, "keys", "usage", name, "--json", "--since", "2h"))
        used = sum(u["requests"] for u in usage.get(name, []))
        if used >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    per = [_metric(p.port, auth, "rawgate_key_requests_total",
                   f'key="{name}",outcome="allowed"') for p in (a, b)]
    rpm = sum(_metric(p.port, auth, "rawgate_key_requests_total",
                      f'key="{name}",outcome="rpm"') for p in (a, b))
    degraded = sum(_metric(p.port, auth, "rawgate_state_degraded_episodes_total", "")
                   for p in (a, b))
    passed = (res["ok"] == n and refused == COUNT_EXTRA and res["error_total"] == COUNT_EXTRA
              and used == n and sum(per) == n and min(per) > 0 and rpm == COUNT_EXTRA
              and degraded == 0)
    rec = {"kind": "shared_state", "limit_rpm": n, "sent": total, "answered": res["ok"],
           "refused_429": refused, "other_errors": res["error_total"] - refused,
           "usage_requests": used, "allowed_per_instance": per, "refused_rpm": rpm,
           "degraded_episodes": degraded, "passed": passed}  # fmt: skip
    run.emit(rec)
    run.note(
        f"shared-state check: key with --rpm {n}, {total} requests through the balancer: "
        f"{res['ok']} answered, {refused} refused with 429, "
        f"{res['error_total'] - refused} other errors; Redis usage {used} requests; allowed "
        f"per instance {' + '.join(f'{x:.0f}' for x in per)}; degraded episodes "
        f"{degraded:.0f}: {'PASSED' if passed else 'FAILED'}")
    return passed


# --- the report --------------------------------------------------------------------------------


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _cell(xs: list[float], digits: int) -> str:
    if not xs:
        return "-"
    s = f"{_med(xs):,.{digits}f}"
    if len(xs) > 1:
        s += f" ({min(xs):,.{digits}f}..{max(xs):,.{digits}f})"
    return s


def summarize(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[float]]]:
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in records:
        if r.get("kind") != "run" or "ok" not in r or not r["ok"]:
            continue
        d = out.setdefault((r["case"], r["target"]), {})
        for k in ("rps", "p50_ms", "p99_ms"):
            if r.get(k) is not None:
                d.setdefault(k, []).append(r[k])
        for k, v in r["cpu_ms_per_req"].items():
            d.setdefault("cpu_" + k, []).append(v)
        d.setdefault("errors", []).append(sum(r["errors"].values()))
    return out


def table(records: list[dict[str, Any]]) -> str:
    s = summarize(records)
    lines = ["| case | target | req/s | p50 ms | p99 ms | CPU ms/req: instances | of it, "
             "event-loop threads | balancer | redis-server | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (case, tgt), d in s.items():
        lines.append(
            f"| {case} | {tgt} | {_cell(d['rps'], 0)} | {_cell(d['p50_ms'], 3)} | "
            f"{_cell(d['p99_ms'], 3)} | {_cell(d.get('cpu_instances', []), 3)} | "
            f"{_cell(d.get('cpu_loop', []), 3)} | "
            f"{_cell(d.get('cpu_lb', []), 3)} | {_cell(d.get('cpu_redis', []), 3)} | "
            f"{sum(d['errors']):.0f} |")
    return "\n".join(lines)


def diff_table(records: list[dict[str, Any]], a: str, b: str) -> str:
    """Per case: target a minus target b (CPU us/req, of it the event-loop thread's, p50 us)
    and a/b throughput; medians over repeats."""
    s = summarize(records)
    lines = [f"| case | CPU us/req {a} | {b} | difference per request (us) | of it, event-loop "
             f"thread (us) | p50 difference (us) | req/s {a} / {b} |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for case in dict.fromkeys(c for c, _ in s):
        da, db = s.get((case, a)), s.get((case, b))
        if not da or not db:
            continue
        ca, cb = _med(da["cpu_instances"]) * 1000, _med(db["cpu_instances"]) * 1000
        la, lb_ = _med(da["cpu_loop"]) * 1000, _med(db["cpu_loop"]) * 1000
        lines.append(
            f"| {case} | {ca:,.1f} | {cb:,.1f} | {ca - cb:+,.1f} | {la - lb_:+,.1f} | "
            f"{(_med(da['p50_ms']) - _med(db['p50_ms'])) * 1000:+,.0f} | "
            f"{_med(da['rps']) / _med(db['rps']):.3f} |")
    return "\n".join(lines)


def render(mode: str, run: Run, meta: dict[str, Any]) -> str:
    head = (f"bench.variants {mode}: commit {meta['commit']}, {meta['cpu_model']}, "
            f"{meta['cores']} cores, Python {meta['python']}, {meta['timestamp']}; "
            "median (min..max) over repeats")
    parts = [head, "", table(run.records)]
    if mode == "reqlog":
        parts += ["", diff_table(run.records, "log-on", "log-off")]
    if mode == "lb":
        parts += ["", diff_table(run.records, "one-redis", "one-local")]
    if run.notes:
        parts += ["", *(f"- {n}" for n in run.notes)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.variants",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("lb", "reqlog"))
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", action="append", metavar="SCENARIO[:CASE]",
                    help="cases to run (repeatable); default per mode")
    ap.add_argument("--rate", type=float, default=0.0, metavar="R",
                    help="open loop at R requests/s (up to 64 in flight) instead of closed "
                    "loop: every target does the same work per second, so CPU per request is "
                    "compared at the same load")
    ap.add_argument("--count", type=int, default=1000,
                    help="lb: the shared-state check's rpm limit (requests answered)")
    ap.add_argument("--json", metavar="FILE", help="JSON lines: one per run, note and check")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cases = [(cid, _scaled(c, args.duration, args.warmup))
             for cid, c in cases_for(args.only or DEFAULT_CASES[args.mode])]
    if args.rate > 0:
        cases = [(f"{cid} @{args.rate:g}/s", replace(c, load=replace(
            c.load, mode="open", rate=args.rate, concurrency=max(OPEN_IN_FLIGHT,
                                                                 c.load.concurrency))))
                 for cid, c in cases]  # fmt: skip
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = Run(OUT_DIR / f"variants-{args.mode}-{stamp}")
    run.log_dir.mkdir(parents=True, exist_ok=True)
    run.json_out = open(args.json, "w") if args.json else None
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    meta = report.machine_meta(ROOT, loop, False)
    run.emit({"kind": "meta", **meta})
    check_ok = True
    ctx: dict[str, Any] = {}
    try:
        ctx = setup_lb(run) if args.mode == "lb" else setup_reqlog(run)
        for cid, case in cases:
            print(f"bench.variants: {cid}", file=sys.stderr, flush=True)
            for rep in range(args.repeats):
                for t in run.targets:
                    run_case(run, cid, case, t, rep)
        if args.mode == "lb" and ctx.get("redis") is not None:
            check_ok = shared_state_check(run, ctx, args.count)
    except KeyboardInterrupt:
        print("bench.variants: interrupted; stopping every process", file=sys.stderr)
        return 130
    except ProcError as e:
        run.broken.append(str(e).splitlines()[0])
    finally:
        procs.stop_all()
    if args.mode == "reqlog" and "homes" in ctx and not run.broken:
        check_ok = reqlog_check(run, ctx["homes"])
    if run.json_out is not None:
        run.json_out.close()
    print(render(args.mode, run, meta))
    if run.broken:
        print("bench.variants: harness breakage:\n  " + "\n  ".join(run.broken),
              file=sys.stderr)
        return 1
    return 0 if check_ok else 1


if __name__ == "__main__":
    sys.exit(main())
