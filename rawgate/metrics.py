"""A small metrics registry rendered in the Prometheus text exposition format 0.0.4.

Invariants:
- The hot path (`observe`) does two dict updates and one bisect: no string formatting, no
  allocation beyond the first sight of a (route, method, status) key. All text is built on scrape.
- Label values come from a closed set: the route PATTERN (never the raw path), a method from a
  fixed list (anything else is "OTHER") and the integer status. Cardinality stays bounded whatever
  clients send.
- Extra series come from collectors (callables run at scrape time) registered by other parts
  (upstream pool, account scheduler). A collector that raises is skipped and logged; it never
  breaks the scrape of the others.
- Single event-loop thread: the registry and its collectors are only read on the loop. The
  files of the worker exchange are written and read in a thread, from a snapshot.
- `serve --workers N`: a scrape reaches one worker (SO_REUSEPORT), so every worker publishes its
  families to <dir>/worker-<i>.json (atomic replace, at most every PUBLISH_S and on each scrape)
  and the worker that answers sums all files. Each file only ever moves forward (a sequence
  number guards the replace), so no counter a scraper reads goes backwards; a worker restarted by
  the supervisor starts from the counters its predecessor published (prometheus_client's
  multiprocess mode, by worker slot instead of by pid).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Literal

import anyio
import msgspec

from rawgate.conn import ServerState
from rawgate.wire import METHODS

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS_S",
    "PUBLISH_S",
    "Collector",
    "Family",
    "Merge",
    "Metrics",
    "Sample",
    "WorkerExchange",
    "format_families",
    "merge_families",
    "method_label",
]

log = logging.getLogger("rawgate.metrics")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# A gateway answers /healthz in well under a millisecond and a long thinking stream in tens of
# seconds: buckets span 0.5 ms .. 60 s roughly evenly on a log scale.
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Rendered once: the `le` label text of every bucket, +Inf last.
_LE_TEXT: tuple[str, ...] = (*(repr(b) for b in DURATION_BUCKETS_S), "+Inf")

# Methods with a label of their own (the drivers' interned ones); any other is "OTHER".
_KNOWN_METHODS = frozenset(METHODS.values())
_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

Sample = tuple[Mapping[str, str], float]
"""One series of a collected metric: its labels and its value."""
Collector = Callable[[], Iterable[Sample]]
Merge = Literal["sum", "max", "min"]

# How often a worker of `serve --workers N` publishes its families for the others to sum. A
# scrape also publishes the answering worker's own first, so only the others' can be this old.
PUBLISH_S = 0.5


class Family(msgspec.Struct, array_like=True):
    """One metric family as collected: what a worker publishes and what is rendered.

    `samples` are (sample name, labels, value): a histogram has its _bucket/_sum/_count samples.
    `merge` says how the workers' values of one series combine: counters and histograms sum,
    a gauge sums (in flight), or takes the max/min of the workers' views (account state)."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    merge: str
    samples: list[tuple[str, dict[str, str], float]]


def method_label(method: str) -> str:
    """The method as a label value; unknown methods collapse so clients cannot add series."""
    return method if method in _KNOWN_METHODS else "OTHER"


def _escape(value: str) -> str:
    # Text format 0.0.4: backslash, double quote and line feed are escaped in label values.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Mapping[str, str]) -> str:
    if not pairs:
        return ""
    for k in pairs:
        if not _LABEL_RE.match(k):
            raise ValueError(f"invalid label name {k!r}")
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}"


def _num(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


class _Histogram:
    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        # Non-cumulative counts per bucket (+Inf last); made cumulative only on scrape.
        self.buckets = [0] * (len(DURATION_BUCKETS_S) + 1)
        self.count = 0
        self.total = 0.0


class Metrics:
    """The registry behind GET /metrics."""

    def __init__(self, state: ServerState | None = None) -> None:
        self.state = state
        self._requests: dict[tuple[str, str, int], int] = {}
        self._durations: dict[str, _Histogram] = {}
        self._in_flight: Callable[[], int] = lambda: 0
        self._collectors: list[tuple[str, str, str, Merge, Collector]] = []
        self.exchange: WorkerExchange | None = None

    def set_in_flight_source(self, fn: Callable[[], int]) -> None:
        """Where `rawgate_requests_in_flight` is read from at scrape time."""
        self._in_flight = fn

    def add_collector(
        self,
        name: str,
        kind: Literal["gauge", "counter"],
        help: str,
        fn: Collector,
        merge: Merge = "sum",
    ) -> None:
        """Register extra series, e.g. upstream pool connections or account states.

        `fn()` runs at scrape time and returns `(labels, value)` pairs. Counter names should end
        in `_total`. Label values must come from a bounded set (labels, never keys or raw input).
        `merge`: how the workers of `serve --workers N` combine a gauge (counters always sum).
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        if kind not in ("gauge", "counter"):
            raise ValueError(f"metric kind must be gauge or counter, not {kind!r}")
        if merge not in ("sum", "max", "min") or (kind == "counter" and merge != "sum"):
            raise ValueError(f"a {kind} cannot merge by {merge!r}")
        if any(c[0] == name for c in self._collectors):
            raise ValueError(f"metric {name!r} is already registered")
        self._collectors.append((name, kind, help, merge, fn))

    def observe(self, route: str, method: str, status: int, duration_s: float) -> None:
        """Count one finished request. `route` is the route pattern; `method` a method_label()."""
        key = (route, method, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        h = self._durations.get(route)
        if h is None:
            h = self._durations[route] = _Histogram()
        # bisect_left: a duration equal to a bound belongs to that bucket (le = "less or equal").
        h.buckets[bisect_left(DURATION_BUCKETS_S, duration_s)] += 1
        h.count += 1
        h.total += duration_s

    def collect(self) -> list[Family]:
        """Every family with its current values (on the event loop: collectors read live state)."""
        requests = Family(
            "rawgate_requests_total",
            "counter",
            "Requests answered, by route pattern, method and status.",
            "sum",
            [
                ("rawgate_requests_total", {"route": r, "method": m, "status": str(st)}, n)
                for (r, m, st), n in sorted(self._requests.items())
            ],
        )
        durations = Family(
            "rawgate_request_duration_seconds",
            "histogram",
            "Time from request received to response done.",
            "sum",
            [],
        )
        ds = durations.samples
        for route, h in sorted(self._durations.items()):
            cumulative = 0
            for le, n in zip(_LE_TEXT, h.buckets, strict=True):
                cumulative += n
                ds.append(("rawgate_request_duration_seconds_bucket", {"route": route, "le": le},
                           cumulative))  # fmt: skip
            ds.append(("rawgate_request_duration_seconds_sum", {"route": route}, h.total))
            ds.append(("rawgate_request_duration_seconds_count", {"route": route}, h.count))
        conns = self.state.open_connections if self.state is not None else {"h1": 0, "h2": 0}
        open_conns: list[tuple[str, dict[str, str], float]] = [
            ("rawgate_open_connections", {"protocol": k}, v) for k, v in sorted(conns.items())
        ]
        out = [
            requests,
            durations,
            Family(
                "rawgate_requests_in_flight",
                "gauge",
                "Requests being handled right now.",
                "sum",
                [("rawgate_requests_in_flight", {}, self._in_flight())],
            ),
            Family(
                "rawgate_open_connections",
                "gauge",
                "Open client connections by protocol.",
                "sum",
                open_conns,
            ),
        ]
        for name, kind, help, merge, fn in self._collectors:
            try:
                samples = [(name, dict(labels), float(value)) for labels, value in fn()]
                for _, labels, _ in samples:
                    _labels(labels)  # an invalid label name fails this collector, not the scrape
            except Exception:
                log.exception("metrics collector %s failed; skipped in this scrape", name)
                continue
            out.append(Family(name, kind, help, merge, samples))
        return out

    def render(self) -> bytes:
        """This process's exposition text."""
        return format_families(self.collect())

    async def exposition(self) -> bytes:
        """What GET /metrics answers: this process's families, or with a worker exchange the
        sum over all workers (file I/O in a thread)."""
        exchange = self.exchange
        if exchange is None:
            return self.render()
        snapshot = exchange.snapshot()
        return await anyio.to_thread.run_sync(exchange.scrape, snapshot)


def format_families(families: Iterable[Family]) -> bytes:
    """The text exposition format 0.0.4 of `families`."""
    out: list[str] = []
    for f in families:
        out.append(f"# HELP {f.name} {_escape_help(f.help)}")
        out.append(f"# TYPE {f.name} {f.kind}")
        out.extend(f"{name}{_labels(labels)} {_num(v)}" for name, labels, v in f.samples)
    out.append("")
    return "\n".join(out).encode()


def merge_families(sources: Iterable[list[Family]]) -> list[Family]:
    """One family list from several workers': series matched by name and labels, combined by
    each family's `merge`; families and series in order of first appearance."""
    merged: dict[str, tuple[Family, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for families in sources:
        for f in families:
            entry = merged.get(f.name)
            if entry is None:
                entry = merged[f.name] = (Family(f.name, f.kind, f.help, f.merge, []), {})
            values = entry[1]
            combine = _COMBINE.get(f.merge, _COMBINE["sum"])
            for name, labels, v in f.samples:
                key = (name, tuple(labels.items()))
                old = values.get(key)
                values[key] = v if old is None else combine(old, v)
    out = []
    for family, values in merged.values():
        family.samples = [(name, dict(labels), v) for (name, labels), v in values.items()]
        out.append(family)
    return out


_COMBINE: dict[str, Callable[[float, float], float]] = {
    "sum": lambda a, b: a + b,
    "max": max,
    "min": min,
}
_FAMILIES = msgspec.json.Decoder(list[Family])
_ENCODER = msgspec.json.Encoder()


class WorkerExchange:
    """The metrics of `serve --workers N` as one set: see the module invariants.

    `directory` belongs to one supervisor run (it creates and removes it); worker `index` owns
    `worker-<index>.json` in it."""

    def __init__(self, metrics: Metrics, directory: Path, index: int) -> None:
        self.metrics = metrics
        self.directory = directory
        self.path = directory / f"worker-{index}.json"
        self._lock = threading.Lock()
        self._seq = 0  # snapshots taken (on the loop)
        self._written = 0  # the newest snapshot on disk (under the lock)
        self._last = b""  # its bytes
        # What a previous worker in this slot counted: its counters and histograms carry on.
        self._base: list[Family] = []
        try:
            self._base = [f for f in _FAMILIES.decode(self.path.read_bytes()) if f.kind != "gauge"]
        except (OSError, msgspec.DecodeError):
            pass

    def snapshot(self) -> tuple[int, list[Family]]:
        """This worker's families now, numbered (call on the event loop)."""
        self._seq += 1
        own = self.metrics.collect()
        return self._seq, merge_families([self._base, own]) if self._base else own

    def publish(self, snapshot: tuple[int, list[Family]]) -> None:
        """Replace this worker's file with `snapshot` unless a newer one is there (blocking)."""
        seq, families = snapshot
        data = _ENCODER.encode(families)
        with self._lock:
            if seq <= self._written:
                return
            if data != self._last:  # an idle worker does not rewrite its file every PUBLISH_S
                tmp = self.path.with_name(f".{self.path.name}.{seq}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, self.path)
                self._last = data
            self._written = seq

    def scrape(self, snapshot: tuple[int, list[Family]]) -> bytes:
        """Publish our own families, then sum every worker's file (blocking). Our own are read
        back from the file too: the periodic publisher may have written a newer snapshot than
        `snapshot`, and another worker's scrape may already have shown it."""
        try:
            self.publish(snapshot)
        except OSError as e:
            log.warning("publishing metrics to %s failed: %s", self.path, e)
        sources: list[list[Family]] = []
        own = False
        for p in sorted(self.directory.glob("worker-*.json")):
            try:
                sources.append(_FAMILIES.decode(p.read_bytes()))
                own = own or p == self.path
            except (OSError, msgspec.DecodeError) as e:  # a worker starting or gone: skip it
                log.debug("metrics of %s unreadable: %s", p.name, e)
        if not own:  # our file could not be written or read: this scrape still counts us
            sources.append(snapshot[1])
        families = merge_families(sources)
        families.append(
            Family(
                "rawgate_workers_reporting",
                "gauge",
                "Worker processes whose metrics this scrape sums.",
                "sum",
                [("rawgate_workers_reporting", {}, float(len(sources)))],
            )
        )
        return format_families(families)

    async def run(self) -> None:
        """Publish every PUBLISH_S until cancelled."""
        while True:
            snapshot = self.snapshot()
            try:
                await anyio.to_thread.run_sync(self.publish, snapshot)
            except OSError as e:
                log.warning("publishing metrics to %s failed: %s", self.path, e)
            await anyio.sleep(PUBLISH_S)


def _escape_help(text: str) -> str:
    # HELP lines escape only backslash and line feed.
    return text.replace("\\", "\\\\").replace("\n", "\\n")
