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
- Single event-loop thread: no locks.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from rawgate.conn import ServerState

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS_S",
    "Collector",
    "Metrics",
    "Sample",
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

_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

Sample = tuple[Mapping[str, str], float]
"""One series of a collected metric: its labels and its value."""
Collector = Callable[[], Iterable[Sample]]


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
        self._collectors: list[tuple[str, str, str, Collector]] = []

    def set_in_flight_source(self, fn: Callable[[], int]) -> None:
        """Where `rawgate_requests_in_flight` is read from at scrape time."""
        self._in_flight = fn

    def add_collector(
        self, name: str, kind: Literal["gauge", "counter"], help: str, fn: Collector
    ) -> None:
        """Register extra series, e.g. upstream pool connections or account states.

        `fn()` runs at scrape time and returns `(labels, value)` pairs. Counter names should end
        in `_total`. Label values must come from a bounded set (labels, never keys or raw input).
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        if kind not in ("gauge", "counter"):
            raise ValueError(f"metric kind must be gauge or counter, not {kind!r}")
        if any(n == name for n, _, _, _ in self._collectors):
            raise ValueError(f"metric {name!r} is already registered")
        self._collectors.append((name, kind, help, fn))

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

    def render(self) -> bytes:
        """The whole exposition text."""
        out: list[str] = [
            "# HELP rawgate_requests_total Requests answered, by route pattern, method and status.",
            "# TYPE rawgate_requests_total counter",
        ]
        for (route, method, status), n in sorted(self._requests.items()):
            out.append(
                f'rawgate_requests_total{{route="{_escape(route)}",method="{method}",'
                f'status="{status}"}} {n}'
            )
        out.append(
            "# HELP rawgate_request_duration_seconds Time from request received to response done."
        )
        out.append("# TYPE rawgate_request_duration_seconds histogram")
        for route, h in sorted(self._durations.items()):
            r = _escape(route)
            cumulative = 0
            for le, n in zip(_LE_TEXT, h.buckets, strict=True):
                cumulative += n
                out.append(
                    f'rawgate_request_duration_seconds_bucket{{route="{r}",le="{le}"}} {cumulative}'
                )
            out.append(f'rawgate_request_duration_seconds_sum{{route="{r}"}} {_num(h.total)}')
            out.append(f'rawgate_request_duration_seconds_count{{route="{r}"}} {h.count}')
        out.append("# HELP rawgate_requests_in_flight Requests being handled right now.")
        out.append("# TYPE rawgate_requests_in_flight gauge")
        out.append(f"rawgate_requests_in_flight {self._in_flight()}")
        out.append("# HELP rawgate_open_connections Open client connections by protocol.")
        out.append("# TYPE rawgate_open_connections gauge")
        conns = self.state.open_connections if self.state is not None else {"h1": 0, "h2": 0}
        for proto, n in sorted(conns.items()):
            out.append(f'rawgate_open_connections{{protocol="{_escape(proto)}"}} {n}')
        for name, kind, help, fn in self._collectors:
            try:
                lines = [f"{name}{_labels(labels)} {_num(value)}" for labels, value in fn()]
            except Exception:
                log.exception("metrics collector %s failed; skipped in this scrape", name)
                continue
            out.append(f"# HELP {name} {_escape_help(help)}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)
        out.append("")
        return "\n".join(out).encode()


def _escape_help(text: str) -> str:
    # HELP lines escape only backslash and line feed.
    return text.replace("\\", "\\\\").replace("\n", "\\n")
