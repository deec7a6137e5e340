"""bench.plots: PNGs from the run records (needs the `bench` extra: matplotlib).

Invariants:
- Reads only the records (the same JSON lines `--json` writes); writes only into the given
  directory; uses the non-interactive Agg backend (no display needed).
- Three figures: latency CDF per non-stream scenario case (one curve per target), throughput
  vs concurrency (scenario `concurrency`), memory vs open streams (scenario `slow-streams`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.report import aggregate, median

# Targets in a stable order and colour across figures.
ORDER = ("direct", "rawgate", "standin", "litellm", "portkey")


def _order(name: str) -> int:
    return ORDER.index(name) if name in ORDER else len(ORDER)


def latency_cdf(
    records: Sequence[dict[str, Any]], out: Path, scenario: str, case: str
) -> Path | None:
    aggs = {k: a for k, a in aggregate(records).items() if k[0] == scenario and k[1] == case}
    if not any(a.cdf for a in aggs.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (_, _, tgt), a in sorted(aggs.items(), key=lambda kv: _order(kv[0][2])):
        if not a.cdf:
            continue
        xs = [p[0] for p in a.cdf]
        ys = [p[1] for p in a.cdf]
        ax.plot(xs, ys, label=tgt, linewidth=1.6)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"latency CDF: {scenario} {case}")
    return _save(fig, ax, out / f"latency-cdf-{_slug(scenario)}-{_slug(case)}.png")


def throughput_vs_concurrency(records: Sequence[dict[str, Any]], out: Path) -> Path | None:
    aggs = {k: a for k, a in aggregate(records).items() if k[0] == "concurrency" and a.rps}
    if not aggs:
        return None
    by: dict[str, list[tuple[float, float]]] = {}
    for (_, _, tgt), a in aggs.items():
        by.setdefault(tgt, []).append((a.x, median(a.rps)))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for tgt in sorted(by, key=_order):
        pts = sorted(by[tgt])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=tgt)
    ax.set_xscale("log", base=2)
    xs = sorted({p[0] for pts in by.values() for p in pts})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("concurrent connections")
    ax.set_ylabel("requests / s (median of repeats)")
    ax.set_title("non-stream chat: throughput vs concurrency")
    return _save(fig, ax, out / "throughput-vs-concurrency.png")


def memory_vs_streams(records: Sequence[dict[str, Any]], out: Path) -> Path | None:
    aggs = {k: a for k, a in aggregate(records).items() if k[0] == "slow-streams" and a.rss_mb}
    if not aggs:
        return None
    by: dict[str, list[tuple[float, float, int]]] = {}
    for (_, _, tgt), a in aggs.items():
        by.setdefault(tgt, []).append((a.x, max(a.rss_mb), a.error_total))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for tgt in sorted(by, key=_order):
        if tgt == "direct":
            continue  # the upstream's own memory is not a gateway's
        pts = sorted(by[tgt])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=tgt)
        for x, y, errs in pts:
            if errs:
                ax.annotate(f"{errs} err", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8, color="red")
    ax.axhline(150, color="grey", linestyle="--", linewidth=1)
    ax.text(ax.get_xlim()[0], 152, " target: 150 MB at 1,000 streams", fontsize=8, color="grey")
    ax.set_xlabel("concurrent open streams")
    ax.set_ylabel("peak RSS of the gateway (MB)")
    ax.set_title("memory vs open streams")
    return _save(fig, ax, out / "memory-vs-streams.png")


def write_all(records: Sequence[dict[str, Any]], out: Path, gateway: str = "rawgate") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    seen: set[tuple[str, str]] = set()
    for r in records:
        if r.get("kind") != "run" or not r.get("result"):
            continue
        key = (r["scenario"], r["case"])
        if key in seen or r["scenario"] in ("slow-streams",):
            continue
        seen.add(key)
        p = latency_cdf(records, out, *key)
        if p:
            paths.append(p)
    for fn in (throughput_vs_concurrency, memory_vs_streams):
        p = fn(records, out)
        if p:
            paths.append(p)
    return paths


def _save(fig: Any, ax: Any, path: Path) -> Path:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    if ax.get_xscale() == "log":  # plain numbers, no overlapping minor-tick labels
        if not ax.get_xticklabels() or not ax.get_xticklabels()[0].get_text():
            ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in s).strip("-")
