"""bench.emulator_alone: the Gemini emulator on its own, so we know it is never the bottleneck.

    python -m bench.emulator_alone [--duration 2] [--quick] [--json] [--engines fast,standard]

For each engine (fast = the benchmark server, standard = rawgate's listener), protocol (HTTP/1.1,
h2c) and call (unary generateContent, SSE streamGenerateContent) it starts `rawgate emulate` in
its own process (pinned to the last CPU when there are several), drives it with h2load (or wrk
for HTTP/1.1, or a small asyncio client when neither is installed) pinned to CPU 0, and reports:
- req/s and chunks/s the load generator saw (every response checked for status 2xx by the tool),
- the emulator's CPU time per request (utime+stime from /proc over the run) and what that means
  for one full core ("capacity"): on a shared 2-core box the load generator is often the
  bottleneck, so capacity is the number to compare with the gateway's ~2,000 req/s target.
Runs are short (default 2 s each plus 0.5 s warm-up) because the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

KEY = "AIzaSyEmulatorDemoKey-rawgate-000000000"
PROMPT = "Hello there, this is a benchmark prompt of moderate length for the emulator."
BODY = json.dumps({"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}).encode()
PATHS = {
    "unary": "/v1beta/models/gemini-2.5-flash:generateContent",
    "stream": "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
}
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _pin(cpu: int) -> Any:
    def pre() -> None:
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {cpu})

    return pre


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def start_emulator(engine: str, chunks: int) -> tuple[subprocess.Popen[str], int]:
    last = (os.cpu_count() or 1) - 1
    proc = subprocess.Popen(
        [sys.executable, "-m", "rawgate", "emulate", "--port", "0", "--engine", engine,
         "--chunks", str(chunks), "--h2-max-streams", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_pin(last))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"emulator did not start: {line!r}")
    return proc, int(m.group(1))


def run_h2load(port: int, path: str, h1: bool, duration: float, body_file: str) -> dict[str, Any]:
    conns = ["--h1", "-c", "64"] if h1 else ["-c", "4", "-m", "32"]
    done = subprocess.run(
        ["h2load", *conns, "-D", str(max(1, round(duration))), "--warm-up-time", "500ms",
         "-d", body_file, "-H", f"x-goog-api-key: {KEY}", "-H", "content-type: application/json",
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, preexec_fn=_pin(0), timeout=duration + 30)
    out = done.stdout + done.stderr
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) "
                    r"failed", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    if not (rps and req and codes):
        raise RuntimeError(f"cannot parse h2load output:\n{out}")
    return {"tool": "h2load", "rps": float(rps.group(1)), "done": int(req.group(2)),
            "ok_2xx": int(codes.group(1)), "failed": int(req.group(4))}


def run_wrk(port: int, path: str, duration: float, lua: str) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", "-c64", f"-d{max(1, round(duration))}s", "-s", lua,
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, preexec_fn=_pin(0), timeout=duration + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    done = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not (rps and done):
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    n = int(done.group(1))
    return {"tool": "wrk", "rps": float(rps.group(1)), "done": n,
            "ok_2xx": n - int(bad.group(1) if bad else 0), "failed": 0}


async def _py_worker(port: int, request: bytes, stop: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            ok = head.startswith(b"HTTP/1.1 2")
            m = re.search(rb"content-length: (\d+)", head, re.I)
            if m:
                await reader.readexactly(int(m.group(1)))
            else:
                await reader.readuntil(b"\r\n0\r\n\r\n")
            counts[0 if ok else 1] += 1
    finally:
        writer.close()


def run_python(port: int, path: str, duration: float) -> dict[str, Any]:
    request = (f"POST {path} HTTP/1.1\r\nhost: x\r\nx-goog-api-key: {KEY}\r\n"
               f"content-length: {len(BODY)}\r\n\r\n").encode() + BODY

    async def main() -> list[int]:
        counts = [0, 0]
        stop = time.perf_counter() + duration
        await asyncio.gather(*(_py_worker(port, request, stop, counts) for _ in range(16)))
        return counts

    ok, bad = asyncio.run(main())
    return {"tool": "asyncio", "rps": (ok + bad) / duration, "done": ok + bad, "ok_2xx": ok,
            "failed": bad}


def bench_one(engine: str, proto: str, kind: str, duration: float, chunks: int,
              files: dict[str, str]) -> dict[str, Any] | None:
    h2load, wrk = shutil.which("h2load"), shutil.which("wrk")
    if proto == "h2c" and not h2load:
        return None
    proc, port = start_emulator(engine, chunks)
    try:
        t0 = _cpu_s(proc.pid)
        wall = time.perf_counter()
        if h2load:
            r = run_h2load(port, PATHS[kind], proto == "h1", duration, files["body"])
        elif wrk:
            r = run_wrk(port, PATHS[kind], duration, files["lua"])
        else:
            r = run_python(port, PATHS[kind], duration)
        wall = time.perf_counter() - wall
        cpu = _cpu_s(proc.pid) - t0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # The CPU window includes h2load's 0.5 s warm-up, so divide by requests over the same window
    # (req/s x wall time) rather than by the measured-window count.
    per_req_us = cpu / max(1.0, r["rps"] * wall) * 1e6
    events = chunks if kind == "stream" else 1
    return {"engine": engine, "proto": proto, "kind": kind, **r,
            "chunks_per_s": r["rps"] * events, "server_cpu_s": round(cpu, 3),
            "server_busy": round(cpu / wall, 2), "cpu_us_per_req": round(per_req_us, 1),
            "capacity_rps": round(1e6 / per_req_us) if per_req_us else 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.emulator_alone", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=2, help="seconds per run (default 2)")
    p.add_argument("--quick", action="store_true", help="1 s runs, fast engine only")
    p.add_argument("--engines", default="fast,standard")
    p.add_argument("--chunks", type=int, default=3, help="text chunks per streamed reply")
    p.add_argument("--json", action="store_true", help="one JSON object per run on stdout")
    a = p.parse_args(argv)
    duration = 1 if a.quick else max(1, min(a.duration, 10))
    engines = ["fast"] if a.quick else a.engines.split(",")
    tmp = f"/tmp/rawgate-bench-emulator-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    files = {"body": f"{tmp}/body.json", "lua": f"{tmp}/post.lua"}
    with open(files["body"], "wb") as f:
        f.write(BODY)
    with open(files["lua"], "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY.decode())}\n'
                f'wrk.headers["x-goog-api-key"] = "{KEY}"\n'
                'wrk.headers["content-type"] = "application/json"\n')
    rows = []
    for engine in engines:
        for proto in ("h1", "h2c"):
            for kind in ("unary", "stream"):
                row = bench_one(engine, proto, kind, duration, a.chunks, files)
                if row is None:
                    continue
                rows.append(row)
                if a.json:
                    print(json.dumps(row), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if not a.json:
        print(f"{'engine':9}{'proto':6}{'call':7}{'tool':8}{'req/s':>9}{'chunks/s':>10}"
              f"{'2xx':>8}{'fail':>6}{'cpu us/req':>11}{'busy':>6}{'capacity':>10}")
        for r in rows:
            print(f"{r['engine']:9}{r['proto']:6}{r['kind']:7}{r['tool']:8}{r['rps']:>9.0f}"
                  f"{r['chunks_per_s']:>10.0f}{r['ok_2xx']:>8}{r['failed']:>6}"
                  f"{r['cpu_us_per_req']:>11}{r['server_busy']:>6}{r['capacity_rps']:>10}")
    bad = [r for r in rows if r["failed"] or r["ok_2xx"] < r["done"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
