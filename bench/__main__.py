"""`python -m bench`: rawgate side by side with the direct path and peer gateways, one run.

    python -m bench [scenario ...] [--quick] [--json FILE] [--plot DIR] [--pin]
                    [--peers litellm,portkey] [--repeats N] [--duration S] [--upstream KIND]

Invariants:
- Separate processes: the upstream (rawgate's emulator, or the harness's own stand-in when the
  emulator is not there yet), rawgate, each peer, and one load generator per run. All are
  started and stopped by bench.procs, so Ctrl-C or a crash never leaves one behind.
- `--pin`: rawgate and the peers on CPU 1; load generator and upstream on CPU 0.
- For each scenario case, repeats are interleaved across targets (direct, rawgate, peers,
  direct, ...). Each run: warm-up, then a measured window; the servers' CPU time and peak RSS
  are read over exactly that window.
- A number never fails the run. The exit status is 1 only for harness breakage: a load
  generator that produced no result, or (`--quick`) a direct path that answered nothing.
  `--strict` also fails on any counted error.
- When rawgate cannot start (`rawgate serve` not wired yet), the report says why and, so the
  harness still exercises every path, the stand-in's OpenAI face runs as the gateway target,
  labelled "standin (self-test)": such numbers describe the harness, not rawgate.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import external, peers, procs, profile, report
from bench.procs import Proc, ProcError
from bench.scenarios import (
    Case,
    Load,
    Scenario,
    TargetInfo,
    Upstream,
    all_scenarios,
    build_request,
    loadgen_spec,
    quick_scenarios,
    scale,
)

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"  # gitignored: logs and default result files
# rawgate's CPU in `--pin`; the load generator and the upstream share the other one.
GATEWAY_CPU = 1
CLIENT_CPU = 0
# Start-up bounds.
UPSTREAM_START_S = 10.0
RAWGATE_START_S = 30.0
# A run whose load generator + upstream used more than this share of their core is flagged:
# the client side, not the gateway, may have been the limit (reliability.md 5.3).
CLIENT_BOUND_UTIL = 0.85
RAWGATE_CMD = "{python} -m rawgate serve --host 127.0.0.1 --port {port}"
# Special scenarios handled here rather than by the load generator alone.
CEILING = "loadgen-ceiling"
XCHECK = "xcheck"


@dataclass
class Target:
    info: TargetInfo
    kind: str  # direct | gateway | peers
    proc: Proc  # whose CPU and RSS are this target's cost
    label: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pin = bool(args.pin)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_dir = OUT_DIR / f"logs-{stamp}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.targets: list[Target] = []
        self.upstream: Upstream | None = None
        self.upstream_proc: Proc | None = None
        self.broken: list[str] = []
        self.json_out = open(args.json, "w") if args.json else None
        self.loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        self.meta = report.machine_meta(ROOT, self.loop, self.pin)

    # -- output ---------------------------------------------------------------------------------

    def emit(self, rec: dict[str, Any]) -> None:
        rec = {**rec, "meta": self.meta}
        self.records.append(rec)
        if self.json_out is not None:
            self.json_out.write(json.dumps(rec) + "\n")
            self.json_out.flush()

    def note(self, text: str) -> None:
        print(f"bench: {text}", file=sys.stderr)
        self.notes.append(text)
        self.emit({"kind": "note", "text": text})

    def cpu(self, which: str) -> int | None:
        if not self.pin:
            return None
        return GATEWAY_CPU if which == "gateway" else CLIENT_CPU

    # -- processes ------------------------------------------------------------------------------

    def start_upstream(self) -> None:
        kind = self.args.upstream
        if kind == "auto":
            kind = "emulator" if importlib.util.find_spec("rawgate.emulator.server") else "standin"
            if kind == "standin":
                self.note("rawgate.emulator.server not importable yet: upstream is the harness's "
                          "stand-in (bench/standin.py)")
        port = procs.free_port()
        if kind == "emulator":
            argv = [sys.executable, "-m", "rawgate", "emulate", "--host", "127.0.0.1",
                    "--port", str(port), "--api-key", self.args.api_key,
                    "--engine", self.args.emulator_engine]
            ready = "/v1beta/models"
        else:
            argv = [sys.executable, "-m", "bench.standin", "--port", str(port)]
            ready = "/healthz"
        p = Proc(kind, argv, port=port, ready_path=ready, cwd=str(ROOT), cpu=self.cpu("client"),
                 log_dir=self.log_dir, env=_env())
        try:
            p.start().wait_ready(UPSTREAM_START_S)
        except ProcError as e:
            p.stop()
            if kind == "emulator" and self.args.emulator_engine == "fast":
                self.note(f"emulator --engine fast did not start ({_first(e)}); "
                          "trying --engine standard")
                self.args.emulator_engine = "standard"
                self.start_upstream()
                return
            if kind == "emulator" and self.args.upstream == "auto":
                self.note(f"emulator did not start ({_first(e)}); using the stand-in")
                self.args.upstream = "standin"
                self.start_upstream()
                return
            raise
        if kind == "emulator":
            self.note(f"upstream: rawgate emulate --engine {self.args.emulator_engine}")
        self.upstream = Upstream("emulator" if kind == "emulator" else "standin", port,
                                 api_key=self.args.api_key)
        self.upstream_proc = p
        # Both emulator engines and the stand-in speak HTTP/1.1 and h2c, so the direct path
        # takes the h2 cases too.
        protos = frozenset({"h1", "h2"})
        # Native requests are what direct sends anyway; embeddings only the emulator answers.
        apis = {"chat", "responses", "messages", "native"}
        if kind == "emulator":
            apis.add("embeddings")
        self.targets.append(Target(
            TargetInfo("direct", "gemini", port, apis=frozenset(apis), protos=protos),
            "direct", p))

    def start_rawgate(self) -> None:
        assert self.upstream is not None and self.upstream_proc is not None
        home = Path(tempfile.mkdtemp(prefix="bench-rawgate-home-", dir=self.log_dir))
        env = _env() | {
            "RAWGATE_HOME": str(home),
            "RAWGATE_UPSTREAM_GEMINI_BASE_URL": f"http://127.0.0.1:{self.upstream.port}",
            "RAWGATE_AUTH_MODE": "off",
            "RAWGATE_LOG_LEVEL": "warning",
        }
        # rawgate reaches the emulator over h2c (upstream.cleartext_http2 = "auto"): 100 streams
        # per connection on the default 32 connections, as with Google, so no override here.
        reason = ""
        add = subprocess.run(
            [sys.executable, "-m", "rawgate", "accounts", "add", "--api-key",
             self.upstream.api_key, "--label", "bench"],
            env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=30,
        )
        if add.returncode != 0:
            reason = "`rawgate accounts add` failed: " + (add.stdout + add.stderr).strip()[:200]
        else:
            port = procs.free_port()
            apis = {"chat", "responses", "messages", "native"}
            if self.upstream.kind == "emulator":  # the stand-in has no embeddings
                apis.add("embeddings")
            argv = [a.replace("{port}", str(port)).replace("{python}", sys.executable)
                    for a in shlex.split(self.args.rawgate_cmd)]
            p = Proc("rawgate", argv, port=port, ready_path="/healthz", env=env, cwd=str(ROOT),
                     cpu=self.cpu("gateway"), log_dir=self.log_dir)
            try:
                p.start().wait_ready(RAWGATE_START_S)
                self.targets.append(Target(
                    TargetInfo("rawgate", "openai", port, apis=frozenset(apis),
                               protos=frozenset({"h1", "h2"})),
                    "gateway", p))
                return
            except ProcError as e:
                p.stop()
                reason = _first(e)
        self.note(f"rawgate unavailable: {reason}")
        if self.upstream.kind == "standin":
            self.note("gateway target is the stand-in's OpenAI face, 'standin (self-test)': "
                      "its numbers measure the harness, not rawgate")
            self.targets.append(Target(
                TargetInfo("standin", "openai", self.upstream.port,
                           protos=frozenset({"h1", "h2"})),
                "gateway", self.upstream_proc))

    def start_peers(self) -> None:
        assert self.upstream is not None
        names = [n.strip() for n in (self.args.peers or "").split(",") if n.strip()]
        for name in names:
            t0 = time.monotonic()
            try:
                proc, info = peers.start_peer(name, self.upstream, procs.free_port(),
                                              self.cpu("gateway"), self.log_dir)
            except peers.PeerUnavailable as e:
                self.note(f"peer {name} unavailable: {_first(e)}")
                continue
            for field_name, why in info.relaxed.items():
                self.note(f"{name}: check `{field_name}` relaxed: {why}")
            self.note(f"peer {name} {peers.version(name)} ready in "
                      f"{time.monotonic() - t0:.1f} s on port {info.port}")
            self.targets.append(Target(info, "peers", proc))

    @property
    def gateway_name(self) -> str:
        for t in self.targets:
            if t.kind == "gateway":
                return t.info.name
        return "rawgate"

    # -- runs -------------------------------------------------------------------------------------

    def run_case(self, sc: Scenario, case: Case, t: Target, rep: int) -> None:
        assert self.upstream is not None and self.upstream_proc is not None
        spec = loadgen_spec(t.info, self.upstream, case, self.loop)
        up = self.upstream_proc
        same = up is t.proc
        window: dict[str, Any] = {}
        with procs.Sampler([t.proc] if same else [t.proc, up]) as sampler:

            raw = None
            if self.args.profile and t.kind == "gateway":
                label = "".join(ch if ch.isalnum() else "-" for ch in case.label)
                raw = Path(self.args.profile) / f"{sc.name}-{label}-{t.info.name}-r{rep}.txt"

            def on_start() -> None:
                if raw is not None:
                    window["spy"] = profile.start(t.proc.pid, case.load.duration_s, raw)
                window["t0"] = time.perf_counter()
                window["cpu0"] = t.proc.cpu_seconds()
                window["up0"] = up.cpu_seconds()
                sampler.begin()

            def on_end() -> None:
                window["t1"] = time.perf_counter()
                window["cpu1"] = t.proc.cpu_seconds()
                window["up1"] = up.cpu_seconds()
                window["peak"] = sampler.end()

            rec: dict[str, Any] = {
                "kind": "run", "scenario": sc.name, "case": case.label, "x": case.x,
                "target": t.info.name, "repeat": rep, "workload": vars(case.workload),
                "load": vars(case.load),
            }
            try:
                res = procs.run_loadgen(spec, cpu=self.cpu("client"), on_start=on_start,
                                        on_end=on_end)
            except ProcError as e:
                rec["error"] = str(e)
                self.broken.append(f"{sc.name} {case.label} {t.info.name}: {_first(e)}")
                self.emit(rec)
                print(f"  [{sc.name} {case.label} r{rep}] {t.info.name}: loadgen failed: "
                      f"{_first(e)}", file=sys.stderr)
                return
        rec["result"] = res
        if window.get("spy") is not None and raw is not None:
            summary = profile.finish(window["spy"], raw)
            if summary:
                rec["profile"] = {"file": str(raw), **summary}
                top = ", ".join(f"{f.split(' (')[0]} {sh:.0%}" for f, sh in summary["self"][:5])
                print(f"  profile {raw.with_suffix('.top.txt')}: {top}", file=sys.stderr)
        ok = res["ok"] or 0
        srv: dict[str, Any] = {}
        if "cpu1" in window:
            cpu = window["cpu1"] - window["cpu0"]
            upc = window["up1"] - window["up0"]
            wall = window["t1"] - window["t0"]
            srv = {
                "target_cpu_s": cpu, "upstream_cpu_s": upc, "window_s": wall,
                "target_cpu_ms_per_req": cpu * 1000 / ok if ok else None,
                "upstream_cpu_ms_per_req": upc * 1000 / ok if ok else None,
                "target_rss_peak": window["peak"].get(t.proc.name, 0),
                "upstream_rss_peak": window["peak"].get(up.name, 0),
                "target_cpu_util": cpu / wall if wall > 0 else 0.0,
                "upstream_chunks_per_s": (ok * case.workload.chunks / res["elapsed_s"]
                                          if case.workload.stream and res["elapsed_s"] else None),
            }
            # CPU 0 carries the load generator and the upstream (for `direct`, the target).
            client_util = res["loadgen_cpu_util"] + (upc / wall if wall else 0.0)
            srv["client_core_util"] = client_util
            if self.pin and client_util > CLIENT_BOUND_UTIL:
                srv["client_bound"] = True
        rec["server"] = srv
        self.emit(rec)
        lat = res["latency_ms"]
        errs = res["error_total"]
        print(
            f"  [{sc.name} {case.label} r{rep}] {t.info.name:>8}: {res['rps']:>9,.0f} req/s  "
            f"p50 {lat.get('p50', float('nan')):7.3f} ms  p99 {lat.get('p99', float('nan')):8.3f}"
            f" ms  errors {errs}" + (f" {res['errors']}" if errs else "")
            + ("  (client-bound?)" if srv.get("client_bound") else ""),
            file=sys.stderr,
        )
        if not t.proc.alive():
            self.note(f"{t.info.name} died during {sc.name} {case.label}:\n{t.proc.log_tail(5)}")

    def run_scenario(self, sc: Scenario, repeats: int) -> None:
        print(f"bench: {sc.name}: {sc.description}", file=sys.stderr)
        for case in sc.cases:
            if self.args.case and case.label not in self.args.case:
                continue
            todo = [t for t in self.targets if t.kind in sc.kinds and t.info.supports(case)]
            skipped = [t.info.name for t in self.targets
                       if t.kind in sc.kinds and not t.info.supports(case)]
            if skipped:
                print(f"  [{sc.name} {case.label}] not supported by: {', '.join(skipped)}",
                      file=sys.stderr)
            for rep in range(repeats):
                for t in todo:
                    if t.proc.alive():
                        self.run_case(sc, case, t, rep)

    # -- cross-checks ------------------------------------------------------------------------------

    def run_ceiling(self) -> None:
        """The load generator's own ceiling against the trivial stand-in, with wrk/h2load."""
        port = procs.free_port()
        p = Proc("trivial", [sys.executable, "-m", "bench.standin", "--trivial", "--port",
                             str(port)], port=port, ready_path="/", cwd=str(ROOT),
                 cpu=self.cpu("gateway"), log_dir=self.log_dir, env=_env())
        p.start().wait_ready(UPSTREAM_START_S)
        info = TargetInfo("trivial", "openai", port)
        up = Upstream("standin", port)
        dur = self.args.duration or 3.0
        chat = all_scenarios()["chat"].cases[0].workload
        try:
            for c in (1, 16, 64):
                case = Case(f"c={c}", chat, Load(concurrency=c, duration_s=dur, warmup_s=0.5),
                            x=c)
                spec = loadgen_spec(info, up, case, self.loop)
                spec["check"] = {"contains": ['"choices"']}  # the trivial reply's marker
                self._xrun("loadgen-ceiling", case.label, "loadgen", spec, p)
            req = build_request(info, up, chat)
            self._external("loadgen-ceiling", "c=64", port, req.path, req.body,
                           list(req.headers), 64, dur)
        finally:
            p.stop()

    def _xrun(self, scenario: str, case: str, name: str, spec: dict[str, Any], p: Proc) -> None:
        cpu0 = p.cpu_seconds()
        res = procs.run_loadgen(spec, cpu=self.cpu("client"))
        srv_cpu = p.cpu_seconds() - cpu0
        self.emit({"kind": "run", "scenario": scenario, "case": case, "target": name,
                   "x": spec["concurrency"], "repeat": 0, "result": res,
                   "server": {"target_cpu_s": srv_cpu}})
        lat = res["latency_ms"]
        print(f"  [{scenario} {case}] {name}: {res['rps']:,.0f} req/s p50 "
              f"{lat.get('p50', 0):.3f} ms (loadgen CPU {res['loadgen_cpu_util']:.0%}, "
              f"{res['rps_per_cpu_s']:,.0f} req per CPU-s), errors {res['error_total']}",
              file=sys.stderr)

    def _external(self, scenario: str, case: str, port: int, path: str, body: str,
                  headers: list[tuple[str, str]], conns: int, dur: float) -> None:
        url = f"http://127.0.0.1:{port}{path}"
        hdrs = [h for h in headers if h[0] != "content-length"]
        runs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        if external.available("wrk"):
            runs.append(("wrk", lambda: external.run_wrk(url, body, hdrs, conns, dur,
                                                         self.cpu("client"))))
        if external.available("h2load"):
            runs.append(("h2load-h1", lambda: external.run_h2load(
                url, body, hdrs, conns, 1, dur, True, self.cpu("client"))))
        if not runs:
            self.note("wrk/h2load not installed (apt-get install -y wrk nghttp2-client): "
                      "cross-check skipped")
        for name, fn in runs:
            try:
                res = fn()
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                self.note(f"{name} failed: {e}")
                continue
            self.emit({"kind": "external", "scenario": scenario, "case": case, "tool": name,
                       "result": res})
            print(f"  [{scenario} {case}] {name}: {res['rps']:,.0f} req/s, errors "
                  f"{res.get('errors', '?')}", file=sys.stderr)

    def run_xcheck(self) -> None:
        """wrk/h2load against the same chat request as the `chat` scenario, per target."""
        assert self.upstream is not None
        case = all_scenarios()["chat"].cases[0]
        for t in self.targets:
            if t.kind == "peers" and not self.args.xcheck_peers:
                continue
            req = build_request(t.info, self.upstream, case.workload)
            self._external(XCHECK, f"c=16 {t.info.name}", t.info.port, req.path, req.body,
                           list(req.headers), 16, self.args.duration or 5.0)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _first(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [*all_scenarios(), CEILING, XCHECK]
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("scenarios", nargs="*", metavar="scenario",
                   help=f"default: all of {', '.join(names)}")
    p.add_argument("--quick", action="store_true", help="tiny CI smoke run (seconds)")
    p.add_argument("--json", metavar="FILE", help="write JSON lines (one per run) here")
    p.add_argument("--markdown", metavar="FILE", help="write the markdown report here too")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots here (needs matplotlib)")
    p.add_argument("--pin", action="store_true",
                   help=f"rawgate/peers on CPU {GATEWAY_CPU}, loadgen + upstream on {CLIENT_CPU}")
    p.add_argument("--peers", default="", help="comma list: litellm,portkey")
    p.add_argument("--repeats", type=int, default=None, help="repeats per case (default 3)")
    p.add_argument("--duration", type=float, default=None,
                   help="measured seconds per run (default per scenario, 5 s)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per run")
    p.add_argument("--case", action="append", metavar="LABEL",
                   help="only cases with this label (repeatable), e.g. --case c=1")
    p.add_argument("--upstream", choices=("auto", "emulator", "standin"), default="auto")
    p.add_argument("--api-key", default="bench-key", help="the upstream account's API key")
    p.add_argument("--emulator-engine", choices=("fast", "standard"), default="fast",
                   help="rawgate emulate --engine (fast: the cheaper upstream, HTTP/1.1 and h2c)")
    p.add_argument("--rawgate-cmd", default=RAWGATE_CMD, metavar="CMD",
                   help="how to start rawgate ({port}, {python} are substituted), e.g. with "
                   "--workers 2 or under py-spy record (default: %(default)s)")
    p.add_argument("--xcheck-peers", action="store_true", help="xcheck the peers too")
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy rawgate during each measured window; collapsed stacks and a "
                   "top-frames summary per run go to DIR")
    p.add_argument("--strict", action="store_true", help="exit 1 on any counted error")
    p.add_argument("--list", action="store_true", help="list scenarios and exit")
    p.add_argument("--report", metavar="FILE", help="re-print the report of a JSON-lines file")
    p.add_argument("--baseline", metavar="FILE",
                   help="a previous run's JSON lines: rawgate's numbers side by side with it")
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in names]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(names)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C must stop the run even when the shell started it with SIGINT ignored (`cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.list:
        for s in [*all_scenarios().values()]:
            print(f"{s.name:18} {s.description}")
            for c in s.cases:
                print(f"{'':18}   {c.label}")
        print(f"{CEILING:18} the load generator's own ceiling vs a trivial server (+ wrk/h2load)")
        print(f"{XCHECK:18} wrk/h2load on the chat request, per target")
        return 0
    if args.report:
        recs = report.load_records(Path(args.report))
        meta: dict[str, Any] = next((r["meta"] for r in recs if "meta" in r), {})
        notes = [r["text"] for r in recs if r.get("kind") == "note"]
        gw = next((r["target"] for r in recs if r.get("target") in ("rawgate", "standin")),
                  "rawgate")
        print(report.full_report(recs, meta, notes, gw, _baseline(args)))
        return 0
    table = quick_scenarios() if args.quick else all_scenarios()
    chosen = args.scenarios or ([*table] if args.quick else [*table, CEILING, XCHECK])
    repeats = args.repeats or (1 if args.quick else 3)
    b = Bench(args)
    try:
        if args.profile and profile.py_spy() is None:
            b.note("--profile: py-spy not installed (pip install py-spy); no profiles")
            args.profile = None
        b.start_upstream()
        b.start_rawgate()
        b.start_peers()
        for name in chosen:
            if name == CEILING:
                b.run_ceiling()
            elif name == XCHECK:
                b.run_xcheck()
            elif name in table:
                b.run_scenario(scale(table[name], args.duration, args.warmup), repeats)
            else:
                print(f"bench: {name} has no --quick form; skipped", file=sys.stderr)
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every process", file=sys.stderr)
        procs.stop_all()
        return 130
    except ProcError as e:
        print(f"bench: {e}", file=sys.stderr)
        b.broken.append(_first(e))
    finally:
        procs.stop_all()
        if b.json_out is not None:
            b.json_out.close()
    text = report.full_report(b.records, b.meta, b.notes, b.gateway_name, _baseline(args))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        try:
            from bench import plots
        except ImportError as e:
            print(f"bench: no plots ({e}); pip install -e '.[bench]'", file=sys.stderr)
        else:
            for path in plots.write_all(b.records, Path(args.plot), b.gateway_name):
                print(f"bench: wrote {path}", file=sys.stderr)
    return exit_status(b, args)


def _baseline(args: argparse.Namespace) -> list[dict[str, Any]]:
    return report.load_records(Path(args.baseline)) if args.baseline else []


def exit_status(b: Bench, args: argparse.Namespace) -> int:
    if b.broken:
        print("bench: harness breakage:\n  " + "\n  ".join(b.broken), file=sys.stderr)
        return 1
    if args.quick:
        direct_ok = sum(r["result"]["ok"] for r in b.records
                        if r.get("kind") == "run" and r.get("target") == "direct"
                        and r.get("result"))
        if direct_ok == 0:
            print("bench: the direct path answered nothing: harness or upstream broken",
                  file=sys.stderr)
            return 1
    if args.strict:
        errs = sum(r["result"]["error_total"] for r in b.records
                   if r.get("kind") == "run" and r.get("result"))
        if errs:
            print(f"bench: --strict: {errs} errors counted", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
