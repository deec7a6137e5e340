"""bench.bare_server: requests/s, latency and CPU cost of GET /healthz on the bare server.

Run as `python -m bench.bare_server [--seconds 5] [--connections 32] [--streams 10] [--json]`.

What it measures: `rawgate serve` (one worker: the full app layer - request id, auth check,
routing, metrics, no access log) and, with `--app bare`, the drivers alone under a trivial app
(`--serve-bare`, the same listener and drivers with one fixed JSON answer). HTTP/1.1 with wrk
(keep-alive, no pipelining) and HTTP/2 with h2load (h2c prior knowledge, `--streams` concurrent
streams per connection). When wrk / h2load are missing, the harness's own load generator
(bench.loadgen) takes their place.

Invariants:
- The server is pinned to one core and the load generator to the other (taskset), so requests/s
  is what ONE worker on ONE core does. On a shared machine requests/s moves with the neighbours'
  load; `server_us_per_req` (server CPU time over the measured window / requests) moves much less
  and is the number to compare between commits.
- Every run is bounded: warm-up + measured window <= `--seconds` + 1 s each, and every process
  started here is stopped (SIGTERM, then SIGKILL) before the script exits.
- A run with any failed request, socket error or non-2xx answer is reported as an error, never
  as a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from bench.procs import cpu_seconds, pin_argv

# Warm-up before each measured window: lets the loop, the allocator and the CPU clocks settle.
WARMUP_S = 1.0
# Server start-up budget (imports + bind), then the script gives up.
START_TIMEOUT_S = 20.0
SERVER_CPU = 1
LOADGEN_CPU = 0
PATH = "/healthz"


# ---- the bare server: listener + drivers + one fixed answer --------------------------------------


def serve_bare(port: int) -> None:
    """Serve GET anything -> 200 {"status":"ok"} with rawgate's listener and drivers."""
    import anyio

    from rawgate.config import Config
    from rawgate.http.listener import open_server
    from rawgate.respond import json_response

    body = b'{"status":"ok","version":"bare"}'

    async def app(request: Any, sink: Any) -> None:
        await json_response(sink, 200, body)

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with open_server(app, Config(), host="127.0.0.1", port=port) as server:
                print(f"bare server listening on http://127.0.0.1:{server.port}", flush=True)
                async for _ in signals:
                    break
                await server.shutdown(1.0)

    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})


# ---- processes ----------------------------------------------------------------------------------


class Server:
    def __init__(self, app: str) -> None:
        if app == "bare":
            argv = [sys.executable, "-m", "bench.bare_server", "--serve-bare", "0"]
        else:
            argv = [sys.executable, "-m", "rawgate", "serve", "--port", "0"]
            argv += ["--log-level", "warning"]  # no access log: it is not the server's speed
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAWGATE_")}
        env["RAWGATE_HOME"] = os.environ.get("BENCH_RAWGATE_HOME", "/nonexistent-rawgate-home")
        self.proc = subprocess.Popen(
            pin_argv(argv, SERVER_CPU),
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            start_new_session=True,
        )
        self.port = self._wait_port()

    def _wait_port(self) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if m:
                return int(m.group(1))
        self.stop()
        raise SystemExit("the server did not start (no start-up line)")

    @property
    def cpu_s(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _run(argv: list[str], timeout: float, stdin: str | None = None) -> str:
    r = subprocess.run(
        pin_argv(argv, LOADGEN_CPU),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {r.stderr.strip()[:300]}")
    return r.stdout


# ---- load generators and their output -----------------------------------------------------------


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        return float("nan")
    v = float(m.group(1))
    return {"us": v / 1000.0, "ms": v, "s": v * 1000.0}[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {"tool": "wrk"}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s)", out)
    res["requests"] = int(m.group(1)) if m else 0
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        res[f"p{q}_ms"] = _ms(m.group(1)) if m else float("nan")
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    res["errors"] = errors
    return res


def parse_h2load(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {"tool": "h2load"}
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(
        r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed,"
        r" (\d+) errored, (\d+) timeout",
        out,
    )
    if m:
        # h2load's "failed" already includes the errored and timed-out requests.
        ok, failed = int(m.group(3)), int(m.group(4))
        res["requests"] = ok
        res["errors"] = failed
    else:
        res["requests"] = 0
        res["errors"] = 1
    m = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        res["errors"] += sum(int(x) for x in m.groups())
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:  # h2load reports min, max, mean, sd (no percentiles)
        res["min_ms"], res["max_ms"], res["mean_ms"], res["sd_ms"] = (_ms(x) for x in m.groups())
    return res


def run_h1(port: int, seconds: float, conns: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}{PATH}"
    if shutil.which("wrk"):
        _run(["wrk", "-t1", f"-c{conns}", f"-d{WARMUP_S:g}s", url], WARMUP_S + 30)
        out = _run(["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", url], seconds + 30)
        return parse_wrk(out)
    return _loadgen("h1", port, seconds, conns, 1)


def run_h2(port: int, seconds: float, conns: int, streams: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}{PATH}"
    if shutil.which("h2load"):
        base = ["h2load", f"-c{conns}", f"-m{streams}", "-t1"]
        out = _run(
            [*base, f"--warm-up-time={WARMUP_S:g}s", f"-D{seconds:g}s", url], seconds + 30
        )
        return parse_h2load(out)
    return _loadgen("h2", port, seconds, conns * streams, conns)


def _loadgen(proto: str, port: int, seconds: float, conc: int, conns: int) -> dict[str, Any]:
    spec = {
        "host": "127.0.0.1",
        "port": port,
        "path": PATH,
        "method": "GET",
        "proto": proto,
        "concurrency": conc,
        "connections": conns,
        "duration_s": seconds,
        "warmup_s": WARMUP_S,
    }
    argv = [sys.executable, "-m", "bench.loadgen", "-"]
    out = json.loads(_run(argv, seconds + WARMUP_S + 60, stdin=json.dumps(spec)))
    lat = out.get("latency_ms", {})
    return {
        "tool": "bench.loadgen",
        "rps": out["rps"],
        "requests": out["ok"],
        "errors": out["error_total"],
        "p50_ms": lat.get("p50"),
        "p90_ms": lat.get("p90"),
        "p99_ms": lat.get("p99"),
    }


# ---- main ---------------------------------------------------------------------------------------


def measure(app: str, proto: str, seconds: float, conns: int, streams: int) -> dict[str, Any]:
    server = Server(app)
    try:
        # The warm-up inside run_h1/run_h2 also costs server CPU: read the counter around the
        # whole run and subtract the warm-up share in proportion of time (both are at full load).
        cpu0 = server.cpu_s
        t0 = time.monotonic()
        if proto == "h1":
            res = run_h1(server.port, seconds, conns)
        else:
            res = run_h2(server.port, seconds, conns, streams)
        wall = time.monotonic() - t0
        cpu = server.cpu_s - cpu0
    finally:
        server.stop()
    measured_share = seconds / max(wall, seconds)
    if res["requests"]:
        res["server_us_per_req"] = cpu * measured_share / res["requests"] * 1e6
    res["server_cpu_util"] = cpu / wall if wall else 0.0
    res.update(app=app, proto=proto, connections=conns)
    if proto == "h2":
        res["streams_per_connection"] = streams
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0, help="measured window per run (<= 10)")
    p.add_argument("--connections", type=int, default=32, help="client connections (default 32)")
    p.add_argument("--streams", type=int, default=10, help="h2 streams per connection (10)")
    p.add_argument(
        "--app",
        choices=("gateway", "bare", "both"),
        default="both",
        help="rawgate serve (gateway), the drivers under a trivial app (bare), or both",
    )
    p.add_argument("--proto", choices=("h1", "h2", "both"), default="both")
    p.add_argument("--json", action="store_true", help="one JSON object per run on stdout")
    p.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return 0
    seconds = min(args.seconds, 10.0)  # shared machine: short runs only
    apps = ["gateway", "bare"] if args.app == "both" else [args.app]
    protos = ["h1", "h2"] if args.proto == "both" else [args.proto]
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        print("note: fewer than 2 CPUs or no taskset: server and load generator not pinned")
    failed = False
    for app in apps:
        for proto in protos:
            res = measure(app, proto, seconds, args.connections, args.streams)
            failed |= bool(res.get("errors"))
            if args.json:
                print(json.dumps(res), flush=True)
                continue
            nan = float("nan")
            if "p50_ms" in res:
                lat = f"p50 {res.get('p50_ms', nan):.2f} ms  p99 {res.get('p99_ms', nan):.2f} ms"
            else:
                lat = f"mean {res.get('mean_ms', nan):.2f} ms  max {res.get('max_ms', nan):.2f} ms"
            print(
                f"{app:8} {proto}  {res['rps']:9.0f} req/s  {lat}  server"
                f" {res.get('server_us_per_req', float('nan')):.1f} us/req"
                f" (cpu {res['server_cpu_util']:.0%})  errors {res['errors']}  [{res['tool']}]",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
