"""What shared state costs per request: `python -m bench.state_cost [--n 5000] [--repeat 3]
[--redis-url URL] [--per-flush N] [--json]`.

Case `per_request`: what the gateway will do per request on the hot path, one limiter
check-and-count (`check_key` on a key with rpm/tpm limits high enough never to refuse) plus one
cooldown lookup (`cooldown_until`), on each backend:
- local: in-process counters (one worker);
- local-shared: limits.json under an flock (serve --workers N on the local backend);
- redis c=1: one request at a time (the Lua script's round trip on loopback);
- redis c=16: 16 concurrent callers (coredis pipelines them over its connections).

Case `after_answer`: `record_usage` (the key's token windows and the hourly usage of key,
account and model), one call at a time, after each answer (off the latency path). On Redis it
buffers (`[state] usage_flush_ms`): the case then sends the buffer itself every --per-flush
answers (default 100: 1,000 answers/s per instance at the default 100 ms, about what one
instance serves in bench.variants lb) and counts that CPU too, so the figure is the amortized
cost; `--per-flush 1` is the cost when each answer is alone in its flush.

Reported: rawgate's CPU (process_time: user+sys of this process) per request in microseconds,
redis-server's CPU per request when this script started it (from /proc/<pid>/stat), wall time
per request (total wall / requests: at c=16 that is the inverse of throughput, not a latency),
the latency of one check (p50 / p99 of each call's own wall time, waiting for a pipelined
connection included), the same for one `record_usage`, and the total CPU a request adds
(check + record_usage). Best of --repeat by CPU (the machine is shared). Without --redis-url a
redis-server on a free loopback port is started (and stopped); without the binary the redis rows
are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from rawgate.config import build_config
from rawgate.state.store import State, open_state

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


async def _measure(
    st: State, n: int, conc: int, server_pid: int | None, per_flush: int
) -> dict[str, float]:
    rec, _ = await st.add_key(f"bench{time.monotonic_ns()}", rpm=10**9, tpm=10**9)
    await st.set_cooldown("acc1", "gemini-2.5-flash", 3600, "bench")

    lat: list[float] = []
    clock = time.perf_counter

    async def worker(count: int) -> None:
        for _ in range(count):
            t = clock()
            d = await st.check_key(rec, "gemini-2.5-flash")
            st.cooldown_until("acc1", "gemini-2.5-flash")
            lat.append(clock() - t)
            assert d.allowed and not d.degraded

    await worker(200)  # warm-up: scripts loaded, connections open
    lat.clear()
    srv0, cpu0, t0 = _proc_cpu_s(server_pid), time.process_time(), time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(conc):
            tg.start_soon(worker, n // conc)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    srv = _proc_cpu_s(server_pid) - srv0
    done = (n // conc) * conc
    out = {"cpu_us": cpu / done * 1e6, "server_cpu_us": srv / done * 1e6,
           "wall_us": wall / done * 1e6, "p50_us": _pct(lat, 50),
           "p99_us": _pct(lat, 99)}  # fmt: skip
    # Case after_answer: record_usage (the key's token windows + hourly usage), one at a time.
    push = getattr(st, "push_usage", None)  # Redis: the buffered usage, one round trip
    for _ in range(100):
        await st.record_usage(rec.name, "acc1", "gemini-2.5-flash", 10, 20)
    if push is not None:
        await push()
    lat.clear()
    cpu0 = time.process_time()
    for i in range(max(1, n // 4)):
        t = clock()
        await st.record_usage(rec.name, "acc1", "gemini-2.5-flash", 10, 20)
        if push is not None and (i + 1) % per_flush == 0:
            await push()
        lat.append(clock() - t)
    if push is not None:
        await push()
    out["record_cpu_us"] = (time.process_time() - cpu0) / max(1, n // 4) * 1e6
    out["record_p50_us"] = _pct(lat, 50)
    out["total_cpu_us"] = out["cpu_us"] + out["record_cpu_us"]
    return out


def _pct(xs: list[float], q: float) -> float:
    """The q-th percentile of xs (seconds) in microseconds (nearest rank)."""
    if not xs:
        return float("nan")
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(len(ys) * q / 100))] * 1e6


async def _one(
    cfg: Any, home: Path, processes: int, n: int, conc: int, pid: int | None, per_flush: int
) -> dict[str, float]:
    async with open_state(cfg, home, processes=processes) as st:
        return await _measure(st, n, conc, pid, per_flush)


async def _raw_ping(url: str, n: int) -> dict[str, float]:
    """The floor: a PING round trip on a bare anyio socket, no client library."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    async with await anyio.connect_tcp(host, int(port)) as sock:
        for _ in range(200):
            await sock.send(b"*1\r\n$4\r\nPING\r\n")
            await sock.receive()
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            await sock.send(b"*1\r\n$4\r\nPING\r\n")
            await sock.receive()
        return {"cpu_us": (time.process_time() - cpu0) / n * 1e6, "server_cpu_us": 0.0,
                "wall_us": (time.perf_counter() - t0) / n * 1e6}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--redis-url", default="")
    ap.add_argument("--per-flush", type=int, default=100,
                    help="redis after_answer: answers per usage push (see the docstring)")
    ap.add_argument("--json", action="store_true", help="one JSON line per row, no table")
    args = ap.parse_args(argv)
    proc: subprocess.Popen[bytes] | None = None
    url = args.redis_url
    if not url and shutil.which("redis-server"):
        port = _free_port()
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.3)
    cases: list[tuple[str, str, int, int]] = [
        ("local", "local", 1, 1), ("local-shared", "local", 2, 1),
    ]  # fmt: skip
    if url:
        cases += [("redis c=1", "redis", 1, 1), ("redis c=16", "redis", 1, 16)]
    say = (lambda *a, **k: None) if args.json else print
    say(f"per_request: check_key + cooldown_until, n={args.n}, best of {args.repeat}")
    say(f"{'backend':<14} {'rawgate CPU us/req':>19} {'redis CPU us/req':>17}"
        f" {'wall us/req':>12} {'check p50/p99 us':>17} {'after_answer CPU us':>20}"
        f" {'record p50 us':>14} {'CPU us/request':>15}")  # fmt: skip
    try:
        for label, backend, processes, conc in cases:
            best: dict[str, float] | None = None
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as home:
                    state: dict[str, Any] = {"backend": backend}
                    if backend == "redis":
                        state.update(redis_url=url, key_prefix=f"bench{os.getpid()}:",
                                     redis_timeout_ms=2000)  # fmt: skip
                    cfg = build_config({"state": state}, {}, {})

                    pid = proc.pid if (proc and backend == "redis") else None
                    r = anyio.run(_one, cfg, Path(home), processes, args.n, conc, pid,
                                  max(1, args.per_flush))  # fmt: skip
                if best is None or r["cpu_us"] < best["cpu_us"]:
                    best = r
            assert best is not None
            srv = f"{best['server_cpu_us']:.1f}" if backend == "redis" and proc else "-"
            if args.json:
                print(json.dumps({"backend": label, **best}))
                continue
            pp = f"{best['p50_us']:.0f} / {best['p99_us']:.0f}"
            print(f"{label:<14} {best['cpu_us']:>19.1f} {srv:>17} {best['wall_us']:>12.1f}"
                  f" {pp:>17} {best['record_cpu_us']:>20.1f} {best['record_p50_us']:>14.0f}"
                  f" {best['total_cpu_us']:>15.1f}")  # fmt: skip
        if url:
            r = min((anyio.run(_raw_ping, url, args.n) for _ in range(args.repeat)),
                    key=lambda r: r["cpu_us"])  # fmt: skip
            if args.json:
                print(json.dumps({"backend": "raw PING", **r}))
            else:
                print(f"{'raw PING':<14} {r['cpu_us']:>19.1f} {'-':>17} {r['wall_us']:>12.1f}"
                      "   (floor: bare socket round trip)")  # fmt: skip
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
