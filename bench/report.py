"""bench.report: run records -> medians and spreads, a markdown table, ratios and targets.

Invariants:
- Pure functions over the JSON-line records the runner writes (one per scenario x case x
  target x repeat); a results file can be re-reported later with `python -m bench --report F`.
- Medians over repeats, with min..max as the spread; errors are summed over repeats and always
  shown, next to the number they qualify.
- "Added" latency is target minus the direct path in the same case of the same run; ratios are
  rawgate / peer (throughput: higher is better; added latency and RSS: lower is better).
- A target is met or missed with the margin stated; a missing measurement says "not measured"
  rather than passing.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 1024 * 1024


# --- metadata ------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_meta(root: Path, loop: str, pinned: bool) -> dict[str, Any]:
    return {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(root),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "loop": loop,
        "pinned": pinned,
        "kernel": platform.release(),
    }


# --- aggregation ---------------------------------------------------------------------------------


@dataclass
class Agg:
    """One (scenario, case, target) over its repeats."""

    scenario: str
    case: str
    target: str
    x: float = 0.0
    repeats: int = 0
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    p999: list[float] = field(default_factory=list)
    ttfb50: list[float] = field(default_factory=list)
    events_ps: list[float] = field(default_factory=list)
    chunks_ps: list[float] = field(default_factory=list)  # upstream chunks relayed per second
    cpu_ms_req: list[float] = field(default_factory=list)
    up_cpu_ms_req: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    client_util: list[float] = field(default_factory=list)
    client_bound: int = 0  # repeats whose load generator + upstream core was > 85 % busy
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # runs that produced no result
    cdf: list[list[float]] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: Sequence[float]) -> tuple[float, float]:
    return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def aggregate(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], Agg]:
    out: dict[tuple[str, str, str], Agg] = {}
    best_cdf: dict[tuple[str, str, str], list[tuple[float, list[list[float]]]]] = {}
    for r in records:
        if r.get("kind") != "run":
            continue
        key = (r["scenario"], r["case"], r["target"])
        a = out.get(key)
        if a is None:
            a = out[key] = Agg(r["scenario"], r["case"], r["target"], x=float(r.get("x", 0)))
        a.repeats += 1
        res = r.get("result")
        if not res:
            a.failures.append(r.get("error", "no result"))
            continue
        a.ok += res["ok"]
        for k, v in res["errors"].items():
            a.errors[k] = a.errors.get(k, 0) + v
        for s in res.get("error_samples", []):
            if len(a.samples) < 3:
                a.samples.append(s)
        if res["ok"]:
            a.rps.append(res["rps"])
            a.p50.append(res["latency_ms"]["p50"])
            a.p99.append(res["latency_ms"]["p99"])
            a.p999.append(res["latency_ms"]["p999"])
            a.ttfb50.append(res["ttfb_ms"]["p50"])
            a.events_ps.append(res["events_per_s"])
            best_cdf.setdefault(key, []).append((res["latency_ms"]["p50"], res.get("cdf", [])))
        a.client_util.append(res.get("loadgen_cpu_util", 0.0))
        srv = r.get("server", {})
        if srv.get("client_bound"):
            a.client_bound += 1
        if srv.get("upstream_chunks_per_s"):
            a.chunks_ps.append(srv["upstream_chunks_per_s"])
        if srv.get("target_cpu_ms_per_req") is not None:
            a.cpu_ms_req.append(srv["target_cpu_ms_per_req"])
        if srv.get("upstream_cpu_ms_per_req") is not None:
            a.up_cpu_ms_req.append(srv["upstream_cpu_ms_per_req"])
        if srv.get("target_rss_peak"):
            a.rss_mb.append(srv["target_rss_peak"] / MB)
    for key, runs in best_cdf.items():
        runs.sort(key=lambda t: t[0])
        out[key].cdf = runs[len(runs) // 2][1]  # the median run's CDF
    return out


# --- formatting ----------------------------------------------------------------------------------


def fmt_num(v: float, digits: int = 0) -> str:
    if v != v:  # NaN
        return "-"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def fmt_value(v: float) -> str:
    """A measured value at a sensible precision: 63,500 / 85.6 / 3.97 / 0.412."""
    a = abs(v)
    if v == int(v) and a < 1e15:
        return f"{int(v):,}"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if a >= 0.001 else f"{v:.2g}"


def fmt_ms(v: float) -> str:
    if v != v:
        return "-"
    if v < 1:
        return f"{v:.3f}"
    if v < 100:
        return f"{v:.2f}"
    return f"{v:,.0f}"


def fmt_spread(xs: Sequence[float], fmt: Callable[[float], str] = fmt_num) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt(xs[0])
    lo, hi = spread(xs)
    return f"{fmt(median(xs))} ({fmt(lo)}..{fmt(hi)})"


def markdown_table(aggs: dict[tuple[str, str, str], Agg]) -> str:
    head = (
        "| scenario | case | target | req/s | p50 ms | p99 ms | TTFB p50 ms | events/s "
        "| CPU ms/req | peak RSS MB | ok | errors |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    rows = [head]
    for a in aggs.values():
        if a.failures and not a.rps:
            err = "; ".join(f.splitlines()[0][:80] for f in a.failures[:1])
            rows.append(f"| {a.scenario} | {a.case} | {a.target} | - | - | - | - | - | - | - | 0 "
                        f"| run failed: {err} |")
            continue
        errs = ", ".join(f"{k} {v}" for k, v in sorted(a.errors.items())) or "0"
        name = a.target + (" (client-bound?)" if a.client_bound else "")
        rows.append(
            f"| {a.scenario} | {a.case} | {name} | {fmt_spread(a.rps)} "
            f"| {fmt_spread(a.p50, fmt_ms)} | {fmt_spread(a.p99, fmt_ms)} "
            f"| {fmt_spread(a.ttfb50, fmt_ms)} "
            f"| {fmt_spread(a.events_ps) if any(a.events_ps) else '-'} "
            f"| {fmt_spread(a.cpu_ms_req, fmt_ms)} | {fmt_spread(a.rss_mb)} | {a.ok:,} | {errs} |"
        )
    return "\n".join(rows)


def ratio_table(aggs: dict[tuple[str, str, str], Agg], gateway: str = "rawgate") -> str:
    """Per case: the gateway's added latency over direct, CPU ratio, and gateway/peer ratios."""
    cases: dict[tuple[str, str], dict[str, Agg]] = {}
    for (sc, case, tgt), a in aggs.items():
        cases.setdefault((sc, case), {})[tgt] = a
    rows = [
        "| scenario | case | target | added p50 ms | added p99 ms | CPU/req vs upstream "
        f"| {gateway}/target req/s | {gateway}/target added p50 | {gateway}/target added p99 "
        f"| {gateway}/target RSS |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (sc, case), by in cases.items():
        direct = by.get("direct")
        gw = by.get(gateway)
        for tgt, a in by.items():
            if tgt == "direct" or not a.rps:
                continue
            add50 = added(a.p50, direct.p50) if direct else float("nan")
            add99 = added(a.p99, direct.p99) if direct else float("nan")
            up = median(direct.cpu_ms_req) if direct and direct.cpu_ms_req else float("nan")
            cpu_ratio = float("nan")
            if a.cpu_ms_req and up == up and up:
                cpu_ratio = median(a.cpu_ms_req) / up
            r_rps = r50 = r99 = r_rss = float("nan")
            if gw is not None and tgt != gateway and gw.rps:
                r_rps = median(gw.rps) / median(a.rps)
                if direct:
                    g50, g99 = added(gw.p50, direct.p50), added(gw.p99, direct.p99)
                    r50 = g50 / add50 if add50 > 0 else float("nan")
                    r99 = g99 / add99 if add99 > 0 else float("nan")
                if gw.rss_mb and a.rss_mb:
                    r_rss = median(gw.rss_mb) / median(a.rss_mb)
            rows.append(
                f"| {sc} | {case} | {tgt} | {fmt_ms(add50)} | {fmt_ms(add99)} "
                f"| {_x(cpu_ratio)} | {_x(r_rps)} | {_x(r50)} | {_x(r99)} | {_x(r_rss)} |"
            )
    return "\n".join(rows)


def added(target: Sequence[float], direct: Sequence[float]) -> float:
    """Median added latency: median(target) - median(direct), NaN without both."""
    if not target or not direct:
        return float("nan")
    return median(target) - median(direct)


def _x(v: float) -> str:
    return "-" if v != v else f"{v:.2f}x"


# --- performance goals ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    name: str
    want: str  # human form of the bound
    value: float  # measured (NaN: not measured)
    bound: float
    higher_is_better: bool
    unit: str

    @property
    def measured(self) -> bool:
        return self.value == self.value

    @property
    def met(self) -> bool:
        if not self.measured:
            return False
        return self.value >= self.bound if self.higher_is_better else self.value <= self.bound

    def verdict(self) -> str:
        if not self.measured:
            return "not measured"
        if self.met:
            return "met"
        if self.higher_is_better:
            short = (self.bound - self.value) / self.bound * 100
            gap = fmt_value(self.bound - self.value)
            return f"missed by {short:.0f} % ({gap} {self.unit} short)"
        if not self.bound:
            return f"missed ({fmt_value(self.value)} {self.unit})"
        over = (self.value - self.bound) / self.bound * 100
        return f"missed by {over:.0f} % ({fmt_value(self.value - self.bound)} {self.unit} over)"


def _get(aggs: dict[tuple[str, str, str], Agg], sc: str, case: str, tgt: str) -> Agg | None:
    return aggs.get((sc, case, tgt))


def goals(aggs: dict[tuple[str, str, str], Agg], gateway: str = "rawgate") -> list[Goal]:
    nan = float("nan")
    out: list[Goal] = []
    c1, d1 = _get(aggs, "concurrency", "c=1", gateway), _get(aggs, "concurrency", "c=1", "direct")
    out.append(Goal("added p50, non-stream chat, c=1", "<= 0.5 ms",
                    added(c1.p50, d1.p50) if c1 and d1 else nan, 0.5, False, "ms"))
    out.append(Goal("added p99, non-stream chat, c=1", "<= 1.5 ms",
                    added(c1.p99, d1.p99) if c1 and d1 else nan, 1.5, False, "ms"))
    # Throughput: the best HTTP/1.1 non-stream level of the concurrency sweep (or `chat`).
    def best(tgt: str) -> tuple[float, str]:
        cands = [(median(a.rps), a.case) for (sc, _c, t), a in aggs.items()
                 if t == tgt and sc in ("concurrency", "chat") and a.rps]
        return max(cands) if cands else (nan, "")
    g_rps, g_case = best(gateway)
    out.append(Goal(f"non-stream chat req/s, one worker, HTTP/1.1 ({g_case or 'best level'})",
                    ">= 2,000 req/s", g_rps, 2000, True, "req/s"))
    for peer, factor in (("litellm", 10.0), ("portkey", 3.0)):
        p_rps, _ = best(peer)
        ratio = g_rps / p_rps if g_rps == g_rps and p_rps == p_rps and p_rps else nan
        out.append(Goal(f"throughput vs {peer} (best level of each)", f">= {factor:g}x", ratio,
                        factor, True, "x"))
    s = _get(aggs, "stream-chat", "c=16", gateway)
    chunks_ps = median(s.chunks_ps) if s and s.chunks_ps else nan
    out.append(Goal("stream transcoding, upstream chunks/s through one worker (c=16)",
                    ">= 50,000/s", chunks_ps, 50_000, True, "chunks/s"))
    s1, sd1 = _get(aggs, "stream-chat", "c=1", gateway), _get(aggs, "stream-chat", "c=1", "direct")
    out.append(Goal("stream TTFB added (p50, c=1)", "<= 1 ms",
                    added(s1.ttfb50, sd1.ttfb50) if s1 and sd1 else nan, 1.0, False, "ms"))
    k = _get(aggs, "slow-streams", "streams=1000", gateway)
    out.append(Goal("1,000 open streams: errors", "0",
                    float(k.error_total + len(k.failures)) if k else nan, 0, False, "errors"))
    out.append(Goal("1,000 open streams: rawgate peak RSS", "<= 150 MB",
                    max(k.rss_mb) if k and k.rss_mb else nan, 150, False, "MB"))
    return out


def goals_table(gs: Sequence[Goal]) -> str:
    rows = ["| target | bound | measured | verdict |", "|---|---|---:|---|"]
    for g in gs:
        v = "-" if not g.measured else f"{fmt_value(g.value)} {g.unit}"
        rows.append(f"| {g.name} | {g.want} | {v} | {g.verdict()} |")
    return "\n".join(rows)


def external_table(records: Sequence[dict[str, Any]]) -> str:
    """wrk / h2load cross-checks: their req/s and latency next to the load generator's own
    number for the same target and request (the `chat` case, or the trivial server)."""
    rows = ["| scenario | case | tool | req/s | latency | errors |", "|---|---|---|---:|---|---:|"]
    for r in records:
        if r.get("kind") != "external":
            continue
        res = r["result"]
        if res["tool"] == "wrk":
            lat = res.get("latency_ms", {})
            latency = ", ".join(f"{k} {fmt_ms(v)} ms" for k, v in lat.items()
                                if k in ("p50", "p99"))
        else:
            req = res.get("request_ms", {})
            latency = f"mean {fmt_ms(req['mean'])} ms, max {fmt_ms(req['max'])} ms" if req else ""
        rows.append(f"| {r['scenario']} | {r['case']} | {r['tool']} | {fmt_num(res['rps'])} "
                    f"| {latency} | {res.get('errors', '-')} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def compare_table(
    new: dict[tuple[str, str, str], Agg], old: dict[tuple[str, str, str], Agg], target: str
) -> str:
    """`target`'s medians in this run against a baseline run, case by case (speed work)."""

    def cell(a: Sequence[float], b: Sequence[float], fmt: Callable[[float], str]) -> str:
        if not a or not b:
            return "-"
        x, y = median(b), median(a)
        pct = (y - x) / x * 100 if x else float("nan")
        return f"{fmt(x)} -> {fmt(y)} ({pct:+.0f} %)"

    rows = [
        "| scenario | case | req/s | p50 ms | p99 ms | CPU ms/req | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for (sc, case, tgt), a in new.items():
        b = old.get((sc, case, tgt))
        if tgt != target or b is None:
            continue
        rows.append(
            f"| {sc} | {case} | {cell(a.rps, b.rps, fmt_num)} | {cell(a.p50, b.p50, fmt_ms)} "
            f"| {cell(a.p99, b.p99, fmt_ms)} | {cell(a.cpu_ms_req, b.cpu_ms_req, fmt_ms)} "
            f"| {cell(a.rss_mb, b.rss_mb, fmt_num)} |"
        )
    return "\n".join(rows) if len(rows) > 2 else ""


def notes_section(notes: Sequence[str]) -> str:
    return "\n".join(f"- {n}" for n in notes)


def full_report(
    records: Sequence[dict[str, Any]], meta: dict[str, Any], notes: Sequence[str],
    gateway: str = "rawgate", baseline: Sequence[dict[str, Any]] = (),
) -> str:
    aggs = aggregate(records)
    parts = [
        "## bench run",
        "",
        f"commit `{meta.get('commit')}`, {meta.get('timestamp')}; {meta.get('cpu_model')}, "
        f"{meta.get('cores')} cores; Python {meta.get('python')}, loop {meta.get('loop')}; "
        f"pinned: {meta.get('pinned')}",
        "",
        "### Results (median over repeats, (min..max) spread)",
        "",
        markdown_table(aggs),
        "",
        f"### Added latency and ratios ({gateway} vs each target)",
        "",
        ratio_table(aggs, gateway),
        "",
        "### Performance goals",
        "",
        goals_table(goals(aggs, gateway)),
    ]
    if baseline:
        base_meta: dict[str, Any] = next((r["meta"] for r in baseline if "meta" in r), {})
        cmp = compare_table(aggs, aggregate(baseline), gateway)
        parts += ["", f"### {gateway} against the baseline (commit "
                  f"`{base_meta.get('commit', '?')}`, {base_meta.get('timestamp', '?')})", "",
                  cmp or "_no case in common with the baseline_"]
    ext = external_table(records)
    if ext:
        parts += ["", "### Cross-checks (wrk, h2load: no body checks)", "", ext]
    if notes:
        parts += ["", "### Notes", "", notes_section(notes)]
    errs = [(k, a) for k, a in aggs.items() if a.samples]
    if errs:
        parts += ["", "### Error samples", ""]
        for (sc, case, tgt), a in errs:
            for s in a.samples:
                parts.append(f"- {sc} {case} {tgt}: `{s['kind']}` {s['detail'][:160]!r}")
    return "\n".join(parts) + "\n"


def load_records(path: Path) -> list[dict[str, Any]]:
    import json

    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


if __name__ == "__main__":  # re-report a results file
    recs = load_records(Path(sys.argv[1]))
    meta: dict[str, Any] = next((r["meta"] for r in recs if "meta" in r), {})
    notes = [n for r in recs if r.get("kind") == "note" for n in [r["text"]]]
    print(full_report(recs, meta, notes))
