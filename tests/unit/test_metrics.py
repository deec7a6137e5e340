"""The metrics registry and GET /metrics, read back with a small text-format 0.0.4 parser."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest

from rawgate.config import AuthConfig, Config
from rawgate.conn import ServerState
from rawgate.http.app import GatewayApp
from rawgate.metrics import DURATION_BUCKETS_S, Metrics, method_label
from rawgate.respond import json_response
from rawgate.seam import Request, ResponseSink
from tests.helpers_app import call

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]

_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)\Z")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|\Z)')


def parse(text: str) -> tuple[Series, dict[str, str]]:
    """(samples, types): every sample keyed by (name, labels); types from the # TYPE lines."""
    samples: Series = {}
    types: dict[str, str] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"duplicate TYPE for {name}"
            types[name] = kind
            continue
        if line.startswith("#"):
            assert line.startswith("# HELP ")
            continue
        m = _LINE.match(line)
        assert m, line
        labels: list[tuple[str, str]] = []
        raw = m.group(2) or ""
        pos = 0
        while pos < len(raw):
            lm = _LABEL.match(raw, pos)
            assert lm, (line, raw[pos:])
            value = lm.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
            labels.append((lm.group(1), value))
            pos = lm.end()
        key = (m.group(1), frozenset(labels))
        assert key not in samples, f"duplicate series {line}"
        samples[key] = float(m.group(3))
    return samples, types


def get(samples: Series, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(app: GatewayApp) -> tuple[Series, dict[str, str]]:
    sink = await call(app, "GET", "/metrics")
    assert sink.status == 200
    assert sink.header("content-type") == b"text/plain; version=0.0.4; charset=utf-8"
    return parse(sink.body.decode())


@pytest.mark.anyio
async def test_counters_move_and_histogram_is_consistent() -> None:
    state = ServerState()
    state.open_connections["h1"] = 3
    state.open_connections["h2"] = 1
    app = GatewayApp(Config(), state)

    async def model(request: Request, sink: ResponseSink) -> None:
        await json_response(sink, 200, b"{}")

    app.router.add("GET", "/v1/models/", model, prefix=True)
    before, types = await scrape(app)
    assert types["rawgate_requests_total"] == "counter"
    assert types["rawgate_request_duration_seconds"] == "histogram"
    assert types["rawgate_requests_in_flight"] == "gauge"
    assert types["rawgate_open_connections"] == "gauge"
    assert get(before, "rawgate_open_connections", protocol="h1") == 3
    assert get(before, "rawgate_open_connections", protocol="h2") == 1
    # The scrape itself is not counted: /metrics and /healthz never count against max_in_flight.
    assert get(before, "rawgate_requests_in_flight") == 0

    for _ in range(3):
        await call(app, "GET", "/healthz")
    await call(app, "HEAD", "/healthz")
    await call(app, "POST", "/healthz")
    for i in range(5):
        await call(app, "GET", f"/v1/models/model-{i}")
        await call(app, "GET", f"/random/path/{i}")
    await call(app, "BREW", "/coffee")
    after, _ = await scrape(app)

    def delta(**labels: str) -> float:
        return get(after, "rawgate_requests_total", **labels) - get(
            before, "rawgate_requests_total", **labels
        )

    assert delta(route="/healthz", method="GET", status="200") == 3
    assert delta(route="/healthz", method="HEAD", status="200") == 1
    assert delta(route="unmatched", method="POST", status="405") == 1
    assert delta(route="/v1/models/{id}", method="GET", status="200") == 5
    assert delta(route="unmatched", method="GET", status="404") == 5
    assert delta(route="unmatched", method="OTHER", status="404") == 1
    # The previous scrape was counted too.
    assert delta(route="/metrics", method="GET", status="200") == 1
    # Cardinality: no raw path ever becomes a label value.
    text = (await call(app, "GET", "/metrics")).body.decode()
    assert "model-3" not in text and "/random" not in text and "BREW" not in text

    for route, n in (("/healthz", 4), ("/v1/models/{id}", 5), ("unmatched", 7)):
        count = get(after, "rawgate_request_duration_seconds_count", route=route)
        assert count == n
        buckets = [
            get(after, "rawgate_request_duration_seconds_bucket", route=route, le=le)
            for le in [*(repr(b) for b in DURATION_BUCKETS_S), "+Inf"]
        ]
        assert buckets == sorted(buckets)  # cumulative
        assert buckets[-1] == count
        total = get(after, "rawgate_request_duration_seconds_sum", route=route)
        assert 0 < total < 60 * n


def test_histogram_bucket_edges() -> None:
    m = Metrics()
    for d in (0.0, 0.0005, 0.00051, 60.0, 61.0, 1e9):
        m.observe("/r", "GET", 200, d)
    samples, _ = parse(m.render().decode())

    def le(x: str) -> float:
        return get(samples, "rawgate_request_duration_seconds_bucket", route="/r", le=x)

    assert le("0.0005") == 2  # le is "less than or equal"
    assert le("0.001") == 3
    assert le("30.0") == 3
    assert le("60.0") == 4
    assert le("+Inf") == 6
    assert get(samples, "rawgate_requests_total", route="/r", method="GET", status="200") == 6


def test_collectors_escaping_and_failures(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    pool = {"open": 2, "idle": 5}
    m.add_collector(
        "rawgate_upstream_connections",
        "gauge",
        "Upstream connections by state.\nSecond line \\ here.",
        lambda: [({"state": s}, float(n)) for s, n in pool.items()],
    )
    m.add_collector(
        "rawgate_account_weird_total",
        "counter",
        "Labels with characters that need escaping.",
        lambda: [({"account": 'a"b\\c\nd'}, 1.5), ({}, float("inf"))],
    )

    def broken() -> list[tuple[dict[str, str], float]]:
        raise RuntimeError("collector bug")

    m.add_collector("rawgate_broken", "gauge", "Always fails.", broken)
    m.add_collector("rawgate_bad_label", "gauge", "Bad label.", lambda: [({"0x": "v"}, 1.0)])
    with caplog.at_level(logging.ERROR, logger="rawgate.metrics"):
        text = m.render().decode()
    samples, types = parse(text)
    assert get(samples, "rawgate_upstream_connections", state="idle") == 5
    assert types["rawgate_upstream_connections"] == "gauge"
    assert "# HELP rawgate_upstream_connections Upstream connections by state.\\nSecond" in text
    assert get(samples, "rawgate_account_weird_total", account='a"b\\c\nd') == 1.5
    assert math.isinf(get(samples, "rawgate_account_weird_total"))
    assert "rawgate_broken" not in types and "rawgate_bad_label" not in types
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 2
    pool["open"] = 7  # read at scrape time, not at registration
    samples, _ = parse(m.render().decode())
    assert get(samples, "rawgate_upstream_connections", state="open") == 7


def test_collector_registration_is_checked() -> None:
    m = Metrics()
    m.add_collector("rawgate_x", "gauge", "x", list)
    with pytest.raises(ValueError, match="already"):
        m.add_collector("rawgate_x", "gauge", "x", list)
    with pytest.raises(ValueError, match="name"):
        m.add_collector("rawgate-x", "gauge", "x", list)
    with pytest.raises(ValueError, match="kind"):
        m.add_collector("rawgate_y", "summary", "x", list)  # type: ignore[arg-type]


def test_method_label_is_closed() -> None:
    assert method_label("POST") == "POST"
    assert method_label("post") == "OTHER"
    assert method_label("X" * 100) == "OTHER"


@pytest.mark.anyio
async def test_metrics_is_protected_when_auth_is_on() -> None:
    app = GatewayApp(Config(auth=AuthConfig(mode="all_except_health", api_keys=["sk-m"])))
    assert (await call(app, "GET", "/metrics")).status == 401
    sink = await call(app, "GET", "/metrics", [("authorization", "Bearer sk-m")])
    assert sink.status == 200
    assert b"sk-m" not in sink.body
    samples, _ = parse(sink.body.decode())
    assert get(samples, "rawgate_requests_total", route="/metrics", method="GET", status="401") == 1


def test_worker_exchange_sums_workers_and_never_goes_back(tmp_path: Path) -> None:
    import anyio

    from rawgate.metrics import WorkerExchange

    def worker(i: int) -> Metrics:
        m = Metrics()
        m.exchange = WorkerExchange(m, tmp_path, i)
        return m

    def total(text: bytes) -> float:
        samples, _ = parse(text.decode())
        return get(samples, "rawgate_requests_total", route="/r", method="GET", status="200")

    a, b = worker(0), worker(1)
    seen: list[float] = []
    for _ in range(5):
        a.observe("/r", "GET", 200, 0.01)
        b.observe("/r", "GET", 200, 0.01)
        b.observe("/r", "GET", 200, 0.01)
        # A scrape publishes its own worker first, then reads the others.
        seen.extend(total(anyio.run(m.exposition)) for m in (a, b))
    assert seen == sorted(seen) and seen[-1] == 15  # b's last scrape saw a's 5 and its own 10
    # A snapshot taken before a newer one was written never replaces it.
    assert a.exchange is not None
    old = a.exchange.snapshot()
    a.observe("/r", "GET", 200, 0.01)
    a.exchange.publish(a.exchange.snapshot())
    a.exchange.publish(old)
    assert total(anyio.run(b.exposition)) == 16
    # A scrape whose own snapshot lost the race to the periodic publisher shows the newer file.
    assert total(a.exchange.scrape(old)) == 16
    # A worker restarted in slot 0 carries on from what its predecessor published.
    a2 = worker(0)
    a2.observe("/r", "GET", 200, 0.01)
    text = anyio.run(a2.exposition)
    assert total(text) == 17
    samples, _ = parse(text.decode())
    assert get(samples, "rawgate_workers_reporting") == 2
    assert get(samples, "rawgate_request_duration_seconds_count", route="/r") == 17


def test_merge_families_by_kind() -> None:
    from rawgate.metrics import Family, merge_families

    def fam(merge: str, *values: float) -> list[Family]:
        return [Family("x", "gauge", "h", merge, [("x", {"a": str(i)}, v) for i, v in
                                                 enumerate(values)])]  # fmt: skip

    for merge, want in (("sum", [4.0, 1.0]), ("max", [3.0, 1.0]), ("min", [1.0, 0.0])):
        (out,) = merge_families([fam(merge, 1, 0), fam(merge, 3, 1)])
        assert [v for _, _, v in out.samples] == want
