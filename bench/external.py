"""bench.external: wrk and h2load as cross-checks of the harness's own load generator.

Invariants:
- Optional: when a tool is not installed (`apt-get install -y wrk nghttp2-client`) the
  cross-check is reported as skipped; the harness never needs them.
- Parsers are pure (text in, dict out; unit-tested on captured output) and return times in ms.
- These tools do not check bodies: their numbers cross-check the load generator's speed and
  latency, never rawgate's correctness (non-2xx and socket errors are still reported).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.procs import pin_argv

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def duration_ms(text: str) -> float:
    """'210.00us' / '1.81ms' / '2.05s' / '1.2m' -> milliseconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s|m|h)\s*", text)
    if m is None:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def _count(text: str) -> float:
    """'29.00k' / '1.2M' / '512' -> number."""
    m = re.fullmatch(r"\s*([0-9.]+)([kMG]?)\s*", text)
    if m is None:
        raise ValueError(f"not a count: {text!r}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """wrk 4.x output (with --latency) -> rps, requests, latency percentiles, errors."""
    res: dict[str, Any] = {"tool": "wrk"}
    m = re.search(r"Requests/sec:\s*([0-9.]+)", out)
    if m is None:
        raise ValueError("no Requests/sec line in wrk output")
    res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([0-9.]+\w+),", out)
    if m:
        res["requests"] = int(m.group(1))
        res["elapsed_s"] = duration_ms(m.group(2)) / 1000.0
    m = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:
        res["latency_mean_ms"] = duration_ms(m.group(1))
        res["latency_max_ms"] = duration_ms(m.group(3))
    pct = {}
    for p, v in re.findall(r"^\s+(\d+(?:\.\d+)?)%\s+(\S+)\s*$", out, re.M):
        pct[f"p{p.rstrip('0').rstrip('.') if '.' in p else p}"] = duration_ms(v)
    res["latency_ms"] = pct
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    if m:
        res["non_2xx"] = int(m.group(1))
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                        map(int, m.groups()), strict=True))
        errors += sum(map(int, m.groups()))
    res["errors"] = errors
    return res


def parse_h2load(out: str) -> dict[str, Any]:
    """h2load (nghttp2 1.4x-1.5x) output -> rps, counts, request/TTFB times."""
    res: dict[str, Any] = {"tool": "h2load"}
    m = re.search(r"finished in ([0-9.]+\w+), ([0-9.]+) req/s", out)
    if m is None:
        raise ValueError("no 'finished in' line in h2load output")
    res["elapsed_s"] = duration_ms(m.group(1)) / 1000.0
    res["rps"] = float(m.group(2))
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    if m:
        keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
        res["requests"] = dict(zip(keys, map(int, m.groups()), strict=True))
        res["errors"] = res["requests"]["failed"] + res["requests"]["errored"] + res[
            "requests"]["timeout"]
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        res["status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups()), strict=True))
    for label, key in (("time for request", "request_ms"), ("time to 1st byte", "ttfb_ms"),
                       ("time for connect", "connect_ms")):
        m = re.search(re.escape(label) + r":\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out)
        if m:
            res[key] = {k: duration_ms(v) for k, v in zip(("min", "max", "mean", "sd"),
                                                          m.groups(), strict=True)}
    return res


def available(tool: str) -> bool:
    return shutil.which(tool) is not None


def run_wrk(
    url: str, body: str, headers: list[tuple[str, str]], connections: int, duration_s: float,
    cpu: int | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as d:
        script = Path(d) / "post.lua"
        lines = ['wrk.method = "POST"', f"wrk.body = {_lua_str(body)}"]
        lines += [f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in headers]
        script.write_text("\n".join(lines) + "\n")
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
                "--latency", "-s", str(script), url]
        out = subprocess.run(pin_argv(argv, cpu), capture_output=True, text=True,
                             timeout=duration_s + 30)
    res = parse_wrk(out.stdout)
    res["command"] = " ".join(argv[:-3]) + " ... " + url
    return res


def run_h2load(
    url: str, body: str, headers: list[tuple[str, str]], clients: int, streams: int,
    duration_s: float, h1: bool, cpu: int | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-h2load-") as d:
        data = Path(d) / "body.json"
        data.write_text(body)
        argv = ["h2load", f"-c{clients}", f"-m{streams}", "-D", f"{max(1, round(duration_s))}",
                "-d", str(data)]
        if h1:
            argv.insert(1, "--h1")
        for k, v in headers:
            argv += ["-H", f"{k}: {v}"]
        argv.append(url)
        out = subprocess.run(pin_argv(argv, cpu), capture_output=True, text=True,
                             timeout=duration_s + 30)
    res = parse_h2load(out.stdout)
    res["command"] = " ".join(a for a in argv if not a.startswith("/tmp"))
    return res


def _lua_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
