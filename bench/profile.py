"""bench.profile: py-spy samples of rawgate during a measured window, summarised.

Invariants:
- Optional (`python -m bench ... --profile DIR`): needs `py-spy` on PATH or in the venv; without
  it the run goes on and says so.
- py-spy attaches to the already-running rawgate (`record --pid`, idle frames excluded) for the
  measured window only, so warm-up and start-up never show up in the profile.
- `summarize()` is pure: collapsed stacks ("frame;frame;frame count" lines, py-spy's `raw`
  format) in, self and inclusive shares out.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# 200 Hz: ~1,000 samples in a 5 s window, enough for 1 % resolution, ~2 % overhead on the target.
RATE_HZ = 200


def py_spy() -> str | None:
    exe = shutil.which("py-spy")
    if exe:
        return exe
    cand = Path(sys.executable).with_name("py-spy")
    return str(cand) if cand.exists() else None


def start(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    exe = py_spy()
    if exe is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "-r", str(RATE_HZ), "-d", str(max(1, round(seconds))), "-f", "raw",
            "-o", str(out), "--pid", str(pid), "--subprocesses"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(lines: list[str], top: int = 15, prefix: str = "rawgate/") -> dict[str, Any]:
    """Self and inclusive shares (0..1) of the busiest frames; inclusive only for frames whose
    text contains `prefix` (rawgate's own code)."""
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        line = line.rstrip()
        stack, _, n_text = line.rpartition(" ")
        if not stack or not n_text.isdigit():
            continue
        n = int(n_text)
        total += n
        frames = stack.split(";")
        self_t[frames[-1]] += n
        for f in set(frames):
            if prefix in f:
                incl[f] += n
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}
    return {
        "samples": total,
        "self": [(f, n / total) for f, n in self_t.most_common(top)],
        "inclusive": [(f, n / total) for f, n in incl.most_common(top)],
    }


def render(summary: dict[str, Any]) -> str:
    out = [f"samples: {summary['samples']}", "", "self time:"]
    out += [f"  {share * 100:5.1f} %  {frame}" for frame, share in summary["self"]]
    out += ["", "inclusive (rawgate frames):"]
    out += [f"  {share * 100:5.1f} %  {frame}" for frame, share in summary["inclusive"]]
    return "\n".join(out) + "\n"


def finish(p: subprocess.Popen[bytes], raw: Path, timeout: float = 30.0) -> dict[str, Any] | None:
    """Wait for py-spy, write `<raw>.top.txt`, return the summary (None if nothing recorded)."""
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
    if not raw.exists():
        return None
    summary = summarize(raw.read_text(errors="replace").splitlines())
    raw.with_suffix(".top.txt").write_text(render(summary))
    return summary
