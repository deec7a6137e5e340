"""The bench harness's pure parts: statistics, response checks, the HTTP/1.1 response parser,
wrk/h2load output parsing, request building, report formatting and target verdicts; plus one
request each over h1 and h2c against the in-process stand-in (no load)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
from typing import Any

import anyio
import anyio.abc
import pytest

from bench import external, procs, report, scenarios, standin
from bench.loadgen import (
    Check,
    Checker,
    H1Client,
    H1Parser,
    H2Client,
    ResponseError,
    Runner,
    Spec,
    cdf,
    percentile,
    summarize,
)

# ---- statistics ---------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy_linear() -> None:
    v = [1.0, 2.0, 3.0, 4.0]
    assert percentile(v, 0) == 1.0
    assert percentile(v, 100) == 4.0
    assert percentile(v, 50) == 2.5
    assert percentile(v, 90) == pytest.approx(3.7)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_summarize_reports_milliseconds() -> None:
    s = summarize([0.001, 0.002, 0.003])
    assert s["n"] == 3
    assert s["min"] == pytest.approx(1.0)
    assert s["p50"] == pytest.approx(2.0)
    assert s["max"] == pytest.approx(3.0)
    assert s["mean"] == pytest.approx(2.0)
    assert summarize([]) == {"n": 0}


def test_cdf_spans_the_samples_and_keeps_the_tail() -> None:
    values = [i / 1000 for i in range(1, 1001)]  # 1..1000 ms
    points = cdf(values, points=11)
    assert points[0] == [1.0, 0.0]
    assert points[-1] == [1000.0, 1.0]
    qs = [q for _, q in points]
    assert qs == sorted(qs)
    assert 0.999 in qs and 0.99 in qs
    assert cdf([], 10) == []


# ---- response checks ----------------------------------------------------------------------------


def test_checker_accepts_a_good_chat_stream() -> None:
    chk = Checker(Check(tail="data: [DONE]", min_events=2, min_bytes=10))
    body = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    assert chk(200, body) is None


def _messages_stream(sep: str, stop: bool = True) -> bytes:
    """An Anthropic stream of 3 text deltas, its JSON written with `sep` after each colon
    (rawgate: compact; LiteLLM 1.108: json.dumps' `": "`), ending with message_stop or not."""
    def frame(etype: str, rest: str = "") -> str:
        return f'event: {etype}\ndata: {{"type":{sep}"{etype}"{rest}}}\n\n'
    delta = (f',{sep}"index":{sep}0,{sep}"delta":{sep}'
             f'{{"type":{sep}"text_delta","text":{sep}"abcd"}}')
    frames = [frame("message_start"), *(frame("content_block_delta", delta) for _ in range(3)),
              frame("message_delta")]
    if stop:
        frames.append(frame("message_stop"))
    return "".join(frames).encode()


@pytest.mark.parametrize("sep", ["", " "])
def test_messages_checks_take_either_json_spacing_and_still_need_the_stop(sep: str) -> None:
    w = scenarios.Workload(api="messages", stream=True, chunks=3, chunk_bytes=4)
    chk = Checker(Check(**scenarios.build_request(_target(), UP_EMU, w).check))
    assert chk(200, _messages_stream(sep)) is None
    assert chk(200, _messages_stream(sep, stop=False)) in ("missing_marker", "bad_tail")
    w = scenarios.Workload(api="messages", chunks=3, chunk_bytes=4)
    chk = Checker(Check(**scenarios.build_request(_target(), UP_EMU, w).check))
    good = (b'{"id":"m","type":"message","content":[{"type":"text","text":"abcdabcdabcd"}],'
            b'"stop_reason":"end_turn"}')
    assert chk(200, good) is None
    assert chk(200, good.replace(b'"type":"text"', b'"type":"tool_use"')) == "missing_marker"


@pytest.mark.parametrize(
    ("check", "status", "body", "kind"),
    [
        (Check(), 500, b"{}", "status_500"),
        (Check(min_bytes=10), 200, b"short", "short_body"),
        (Check(max_bytes=3), 200, b"too long", "long_body"),
        (Check(contains=('"choices"',)), 200, b'{"error":{}}', "missing_marker"),
        (Check(tail="data: [DONE]"), 200, b"data: {}\n\n", "bad_tail"),
        (Check(min_events=3), 200, b"data: 1\n\ndata: 2\n\n", "few_events"),
        (Check(contains=("response.completed",)), 200, b"event: response.failed\n",
         "missing_marker"),
    ],
)
def test_checker_names_each_failure(check: Check, status: int, body: bytes, kind: str) -> None:
    assert Checker(check)(status, body) == kind


# ---- HTTP/1.1 response parser -------------------------------------------------------------------


def _feed_split(raw: bytes, cut: int) -> H1Parser:
    p = H1Parser()
    done = p.feed(raw[:cut]) if cut else False
    if not done:
        assert p.feed(raw[cut:])
    return p


CL_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX: y\r\n\r\nhello world"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n"
    b"7\r\ndata: 1\r\nB;ext=1\r\n\n\ndata: [DO\r\n4\r\nNE]\n\r\n0\r\n\r\n"
)


@pytest.mark.parametrize("raw", [CL_RESPONSE, CHUNKED])
def test_parser_is_split_proof(raw: bytes) -> None:
    whole = _feed_split(raw, 0)
    for cut in range(1, len(raw)):
        p = _feed_split(raw, cut)
        assert (p.status, b"".join(p.body), p.keep_alive) == (
            whole.status, b"".join(whole.body), whole.keep_alive)
    assert whole.status == 200


def test_parser_decodes_chunked_bodies() -> None:
    p = _feed_split(CHUNKED, 0)
    assert b"".join(p.body) == b"data: 1\n\ndata: [DONE]\n"
    assert p.body_len == len(b"data: 1\n\ndata: [DONE]\n")


def test_parser_skips_interim_responses_and_honours_close() -> None:
    raw = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    p = _feed_split(raw, 0)
    assert p.status == 201 and b"".join(p.body) == b"ok" and not p.keep_alive


def test_parser_reads_a_close_delimited_body_until_eof() -> None:
    p = H1Parser()
    assert not p.feed(b"HTTP/1.1 200 OK\r\n\r\npart one ")
    assert not p.feed(b"part two")
    assert p.feed(b"")
    assert b"".join(p.body) == b"part one part two" and not p.keep_alive


def test_parser_http10_without_keepalive_closes_and_204_has_no_body() -> None:
    p = _feed_split(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", 0)
    assert not p.keep_alive
    p = _feed_split(b"HTTP/1.1 204 No Content\r\n\r\n", 0)
    assert p.status == 204 and p.body == [] and p.keep_alive


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"SPDY/3 200 OK\r\n\r\n", "protocol_error"),
        (b"HTTP/1.1 abc OK\r\n\r\n", "protocol_error"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", "protocol_error"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "protocol_error"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX", "protocol_error"),
    ],
)
def test_parser_rejects_broken_responses(raw: bytes, kind: str) -> None:
    with pytest.raises(ResponseError) as e:
        H1Parser().feed(raw)
    assert e.value.kind == kind


def test_parser_reports_an_early_close() -> None:
    p = H1Parser()
    assert not p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(ResponseError) as e:
        p.feed(b"")
    assert e.value.kind == "closed_early"


# ---- wrk / h2load output ------------------------------------------------------------------------

WRK_OUT = """\
Running 2s test @ http://127.0.0.1:18701/v1/chat/completions
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.07ms    1.36ms   8.68ms   83.17%
    Req/Sec    29.00k     3.74k   37.25k    70.00%
  Latency Distribution
     50%  210.00us
     75%    1.81ms
     90%    3.03ms
     99%    5.62ms
  57788 requests in 2.01s, 4.79MB read
  Non-2xx or 3xx responses: 12
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  28807.25
Transfer/sec:      2.39MB
"""

H2LOAD_OUT = "\n".join([
    "starting benchmark...",
    "Application protocol: http/1.1",
    "finished in 2.00s, 73598.00 req/s, 6.11MB/s",
    "requests: 147196 total, 147212 started, 147196 done, 147196 succeeded, 0 failed, "
    "0 errored, 0 timeout",
    "status codes: 147196 2xx, 0 3xx, 0 4xx, 0 5xx",
    "traffic: 12.21MB (12806052) total, 6.18MB (6477064) headers (space savings 0.00%), "
    "2.25MB (2355296) data",
    "                     min         max         mean         sd        +/- sd",
    "time for request:       29us     16.24ms       217us       670us    97.86%",
    "time for connect:       19us       145us        89us        37us    62.50%",
    "time to 1st byte:     1.22ms      2.05ms      1.54ms       267us    62.50%",
    "req/s           :    4569.84     4644.75     4599.26       26.23    56.25%",
])


def test_parse_wrk() -> None:
    r = external.parse_wrk(WRK_OUT)
    assert r["rps"] == pytest.approx(28807.25)
    assert r["requests"] == 57788 and r["elapsed_s"] == pytest.approx(2.01)
    assert r["latency_ms"] == {"p50": pytest.approx(0.21), "p75": pytest.approx(1.81),
                               "p90": pytest.approx(3.03), "p99": pytest.approx(5.62)}
    assert r["latency_mean_ms"] == pytest.approx(1.07)
    assert r["non_2xx"] == 12 and r["socket_errors"]["read"] == 2 and r["errors"] == 15


def test_parse_h2load() -> None:
    r = external.parse_h2load(H2LOAD_OUT)
    assert r["rps"] == pytest.approx(73598.0) and r["elapsed_s"] == pytest.approx(2.0)
    assert r["requests"]["succeeded"] == 147196 and r["errors"] == 0
    assert r["status"]["2xx"] == 147196
    assert r["request_ms"]["mean"] == pytest.approx(0.217)
    assert r["ttfb_ms"]["max"] == pytest.approx(2.05)


def test_parsers_refuse_foreign_output() -> None:
    with pytest.raises(ValueError):
        external.parse_wrk("command not found")
    with pytest.raises(ValueError):
        external.parse_h2load("")
    assert external.duration_ms("1.5s") == 1500.0
    assert external.duration_ms("250us") == pytest.approx(0.25)


# ---- request building ---------------------------------------------------------------------------

UP_STANDIN = scenarios.Upstream("standin", 9000)
UP_EMU = scenarios.Upstream("emulator", 9000, api_key="k1")


def test_prompt_is_seeded_and_sized() -> None:
    w = scenarios.Workload(prompt_bytes=20_000)
    p1, p2 = scenarios.prompt(UP_EMU, w), scenarios.prompt(UP_EMU, w)
    assert p1 == p2 and len(p1) == 20_000
    assert p1.startswith(UP_EMU.directive(w))


def test_emulator_directives_parse_with_the_emulators_parser() -> None:
    from rawgate.emulator import directives

    w = scenarios.Workload(stream=True, chunks=100, chunk_bytes=16, delay_ms=250)
    found, _rest = directives.parse_directives(scenarios.prompt(UP_EMU, w))
    assert {d.name: d.args for d in found} == {
        "reply": {"chars": 1600}, "chunks": {"n": 100}, "delay": {"ms": 250}}


def test_standin_understands_its_directive() -> None:
    w = scenarios.Workload(chunks=7, chunk_bytes=5, delay_ms=12.5)
    assert standin.directive(UP_STANDIN.directive(w).encode()) == (7, 5, 12.5)


def _target(name: str = "rawgate", dialect: Any = "openai", **kw: Any) -> scenarios.TargetInfo:
    return scenarios.TargetInfo(name, dialect, 8045, **kw)


def test_direct_path_gets_the_equivalent_gemini_request() -> None:
    w = scenarios.Workload(stream=True, tools=True, chunks=100, chunk_bytes=16)
    req = scenarios.build_request(_target("direct", "gemini"), UP_EMU, w)
    assert req.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert ("x-goog-api-key", "k1") in req.headers
    body = json.loads(req.body)
    assert body["contents"][0]["parts"][0]["text"] == scenarios.prompt(UP_EMU, w)
    assert [f["name"] for f in body["tools"][0]["functionDeclarations"]] == [
        "get_weather", "search_docs"]
    assert req.check == {"min_bytes": 1600, "contains": ['"finishReason"'], "min_events": 100}


@pytest.mark.parametrize(
    ("api", "stream", "path", "check"),
    [
        ("chat", False, "/v1/chat/completions", {"contains": ['"choices"']}),
        ("chat", True, "/v1/chat/completions", {"tail": "data: [DONE]", "min_events": 3}),
        ("responses", False, "/v1/responses", {"contains": ['"output"']}),
        ("responses", True, "/v1/responses",
         {"contains": ["response.completed"], "min_events": 3}),
        ("messages", False, "/v1/messages",
         {"contains": ['"type":"text"', '"stop_reason":"end_turn"']}),
        ("messages", True, "/v1/messages",
         {"contains": ["event: content_block_delta", "event: message_stop"],
          "tail": '"message_stop"}', "min_events": 3}),
    ],
)
def test_openai_requests_and_their_checks(
    api: Any, stream: bool, path: str, check: dict[str, Any]
) -> None:
    w = scenarios.Workload(api=api, stream=stream)
    req = scenarios.build_request(_target(), UP_EMU, w)
    assert req.path == path
    assert req.check == {"min_bytes": 48, **check}
    body = json.loads(req.body)
    assert body.get("stream", False) is stream and body["model"] == scenarios.MODEL


def test_native_and_embeddings_send_rawgate_what_direct_sends_upstream() -> None:
    for stream in (False, True):
        w = scenarios.Workload(api="native", stream=stream, chunks=100)
        direct = scenarios.build_request(_target("direct", "gemini"), UP_EMU, w)
        gw = scenarios.build_request(_target(apis=frozenset({"native"})), UP_EMU, w)
        assert (gw.path, gw.body, gw.check) == (direct.path, direct.body, direct.check)
        assert ("x-goog-api-key", "k1") not in gw.headers  # rawgate uses its own pool's key
    w = scenarios.Workload(api="embeddings", inputs=100)
    direct = scenarios.build_request(_target("direct", "gemini"), UP_EMU, w)
    gw = scenarios.build_request(_target(), UP_EMU, w)
    assert direct.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    items = json.loads(direct.body)["requests"]
    body = json.loads(gw.body)
    assert gw.path == "/v1/embeddings" and body["encoding_format"] == "base64"
    assert [i["content"]["parts"][0]["text"] for i in items] == body["input"]
    assert len(set(body["input"])) == 100
    assert gw.check["min_bytes"] == direct.check["min_bytes"] == 100 * 3072
    case = scenarios.all_scenarios()["embeddings"].cases[0]
    assert not _target().supports(case)  # peers and the stand-in do not take it
    assert _target(apis=frozenset({"embeddings"})).supports(case)


def test_litellm_gets_the_native_request_on_its_gemini_pass_through() -> None:
    # LiteLLM serves Gemini's paths under /gemini and reads a client key from x-goog-api-key;
    # its upstream and key come from its environment (GEMINI_API_BASE, GEMINI_API_KEY).
    from bench import peers

    t = peers.litellm_info(UP_EMU, 8046)
    env = peers.litellm_env(UP_EMU)
    assert env["GEMINI_API_BASE"] == f"http://127.0.0.1:{UP_EMU.port}"
    assert env["GEMINI_API_KEY"] == UP_EMU.api_key
    for stream in (False, True):
        w = scenarios.Workload(api="native", stream=stream, chunks=100)
        case = scenarios.Case("c", w, scenarios.Load())
        assert t.supports(case)
        direct = scenarios.build_request(_target("direct", "gemini"), UP_EMU, w)
        req = scenarios.build_request(t, UP_EMU, w)
        assert req.path == "/gemini" + direct.path
        assert (req.body, req.check) == (direct.body, direct.check)
        assert ("x-goog-api-key", "sk-bench-client") in req.headers
        assert ("x-goog-api-key", UP_EMU.api_key) not in req.headers


def test_relaxed_checks_are_replaced_not_dropped() -> None:
    t = _target("portkey", relaxed={"tail": "why"}, stream_contains=('"finish_reason":"stop"',))
    req = scenarios.build_request(t, UP_EMU, scenarios.Workload(stream=True))
    assert "tail" not in req.check
    assert req.check["contains"] == ['"finish_reason":"stop"'] and req.check["min_events"] == 3


def test_loadgen_spec_decodes_as_a_spec() -> None:
    import msgspec

    case = scenarios.all_scenarios()["h1-h2"].cases[1]
    spec = msgspec.json.decode(json.dumps(
        scenarios.loadgen_spec(_target(protos=frozenset({"h1", "h2"})), UP_EMU, case)), type=Spec)
    assert spec.proto == "h2" and spec.connections == 4 and spec.concurrency == 64


def test_targets_skip_cases_they_cannot_serve() -> None:
    h2case = scenarios.all_scenarios()["h1-h2"].cases[1]
    resp = scenarios.all_scenarios()["responses"].cases[0]
    assert not _target().supports(h2case)
    assert not _target(apis=frozenset({"chat"})).supports(resp)
    assert _target(protos=frozenset({"h1", "h2"})).supports(h2case)


def test_scale_keeps_count_bounded_cases() -> None:
    sc = scenarios.scale(scenarios.all_scenarios()["slow-streams"], 1.0, 0.1)
    assert all(c.load.duration_s == 15.0 for c in sc.cases)
    sc = scenarios.scale(scenarios.all_scenarios()["chat"], 1.0, 0.1)
    assert sc.cases[0].load.duration_s == 1.0 and sc.cases[0].load.warmup_s == 0.1


# ---- stand-in replies ---------------------------------------------------------------------------


def test_standin_json_array_stream_is_framed_like_google() -> None:
    status, _, frames, _ = standin.reply_for(
        "POST", "/v1beta/models/m:streamGenerateContent",
        b'{"contents":[{"parts":[{"text":"[[bench chunks=3 bytes=4 delay_ms=0]]"}]}]}')
    assert status == 200
    raw = b"".join(frames).decode()
    # Portkey: split on CRLF, strip "[" / trailing "," / the last two characters "\n]".
    parts = []
    for piece in raw.split("\r\n"):
        n = piece.strip()
        n = n[1:] if n.startswith("[") else n
        n = n[:-1] if n.endswith(",") else n
        n = n[:-2] if n.endswith("]") else n
        parts.append(json.loads(n))
    assert [p["candidates"][0]["content"]["parts"][0]["text"] for p in parts] == [
        "abcd", "bcde", "cdef"]
    assert json.loads(raw)[-1]["candidates"][0]["finishReason"] == "STOP"


# ---- report -------------------------------------------------------------------------------------


def _run(scenario: str, case: str, target: str, rps: float, p50: float, p99: float, *,
         errors: dict[str, int] | None = None, cpu: float = 0.1, rss: int = 50 * report.MB,
         ok: int = 1000, chunks_ps: float | None = None) -> dict[str, Any]:
    lat = {"n": ok, "p50": p50, "p99": p99, "p999": p99 * 2}
    return {
        "kind": "run", "scenario": scenario, "case": case, "target": target, "x": 1,
        "result": {"ok": ok, "errors": errors or {}, "rps": rps, "latency_ms": lat,
                   "ttfb_ms": lat, "events_per_s": 0.0, "cdf": [[p50, 0.5]],
                   "loadgen_cpu_util": 0.5},
        "server": {"target_cpu_ms_per_req": cpu, "upstream_cpu_ms_per_req": 0.05,
                   "target_rss_peak": rss, "upstream_chunks_per_s": chunks_ps},
    }


RECORDS = [
    _run("concurrency", "c=1", "direct", 5000, 0.20, 0.40, cpu=0.05),
    _run("concurrency", "c=1", "rawgate", 2500, 0.60, 1.20, cpu=0.30),
    _run("concurrency", "c=1", "rawgate", 2600, 0.50, 1.00, cpu=0.28),
    _run("concurrency", "c=1", "rawgate", 2400, 0.70, 1.40, cpu=0.32, errors={"timeout": 2}),
    _run("concurrency", "c=1", "litellm", 200, 5.20, 9.40, rss=300 * report.MB),
    _run("concurrency", "c=1", "portkey", 900, 2.20, 4.40, rss=80 * report.MB),
]


def test_aggregate_takes_medians_and_sums_errors() -> None:
    a = report.aggregate(RECORDS)[("concurrency", "c=1", "rawgate")]
    assert report.median(a.rps) == 2500 and report.spread(a.rps) == (2400, 2600)
    assert report.median(a.p50) == pytest.approx(0.6)
    assert a.errors == {"timeout": 2} and a.ok == 3000 and a.repeats == 3


def test_markdown_table_shows_spread_and_errors() -> None:
    table = report.markdown_table(report.aggregate(RECORDS))
    row = next(line for line in table.splitlines() if "| rawgate |" in line)
    assert "2,500 (2,400..2,600)" in row and "timeout 2" in row
    assert "0.600 (0.500..0.700)" in row


def test_ratio_table_compares_added_latency() -> None:
    table = report.ratio_table(report.aggregate(RECORDS))
    lite = next(line for line in table.splitlines() if "| litellm |" in line)
    # rawgate adds 0.4 ms at p50, LiteLLM 5.0 ms: 0.08x; throughput 2500/200 = 12.5x.
    cells = [c.strip() for c in lite.split("|")]
    assert cells[4] == "5.00" and cells[7] == "12.50x" and cells[8] == "0.08x"
    assert cells[6] == "-" or cells[6].endswith("x")


def test_goals_state_met_and_missed_by_how_much() -> None:
    gs = {g.name: g for g in report.goals(report.aggregate(RECORDS))}
    p50 = gs["added p50, non-stream chat, c=1"]
    assert p50.value == pytest.approx(0.4) and p50.met
    rps = next(g for n, g in gs.items() if n.startswith("non-stream chat req/s"))
    assert rps.value == 2500 and rps.met
    lite = gs["throughput vs litellm (best level of each)"]
    assert lite.value == pytest.approx(12.5) and lite.met
    pk = gs["throughput vs portkey (best level of each)"]
    assert not pk.met and pk.verdict().startswith("missed by 7 %")
    assert gs["1,000 open streams: errors"].verdict() == "not measured"


def test_goal_verdict_for_an_upper_bound() -> None:
    g = report.Goal("x", "<= 150 MB", 180.0, 150.0, False, "MB")
    assert g.verdict() == "missed by 20 % (30 MB over)"


def test_full_report_lists_failures_and_notes() -> None:
    recs = [*RECORDS, {"kind": "run", "scenario": "chat", "case": "c=16", "target": "litellm",
                       "error": "loadgen exited with 1"}]
    text = report.full_report(recs, {"commit": "abc"}, ["peer portkey unavailable: no npm"])
    assert "run failed: loadgen exited with 1" in text
    assert "- peer portkey unavailable: no npm" in text and "`abc`" in text


# ---- processes ----------------------------------------------------------------------------------


def test_proc_accounting_reads_this_process() -> None:
    me = os.getpid()
    assert me in procs.tree(me)
    assert procs.cpu_seconds(me) > 0
    assert procs.rss_bytes(me) > 1 << 20
    assert procs.vm_hwm_bytes(me) >= procs.rss_bytes(me) // 2
    assert procs.pin_argv(["x"], None) == ["x"]
    assert 0 < procs.free_port() < 65536


# ---- one request per protocol against the in-process stand-in -----------------------------------



async def _with_standin(fn: Any) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, standin.serve_h1)
        try:
            with anyio.fail_after(10):
                await fn(port, tg)
        finally:
            tg.cancel_scope.cancel()


def _spec(port: int, proto: str, stream: bool) -> Spec:
    w = scenarios.Workload(stream=stream, chunks=5, chunk_bytes=8)
    case = scenarios.Case("t", w, scenarios.Load(proto=proto))  # type: ignore[arg-type]
    t = scenarios.TargetInfo("standin", "openai", port, protos=frozenset({"h1", "h2"}))
    import msgspec

    return msgspec.json.decode(json.dumps(scenarios.loadgen_spec(t, UP_STANDIN, case)), type=Spec)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("parser", ["fast", "h11"])
async def test_h1_client_round_trips_and_checks(stream: bool, parser: str) -> None:
    async def go(port: int, tg: anyio.abc.TaskGroup) -> None:
        spec = _spec(port, "h1", stream)
        runner = Runner(spec)
        runner.measuring = True
        client = H1Client("127.0.0.1", port, strict=parser == "h11")
        for _ in range(3):  # keep-alive: the same connection serves every exchange
            assert await runner.one(client, 0.0)
        await client.close()
        assert runner.stats.ok == 3 and runner.stats.errors == {}
        assert runner.stats.events == (18 if stream else 0)  # 5 chunks + [DONE], x3

    await _with_standin(go)


@pytest.mark.anyio
async def test_h2_client_multiplexes_streams() -> None:
    async def go(port: int, tg: anyio.abc.TaskGroup) -> None:
        spec = _spec(port, "h2", True)
        runner = Runner(spec)
        runner.measuring = True
        client = H2Client("127.0.0.1", port)
        await client.connect(tg)
        async with anyio.create_task_group() as inner:
            for _ in range(4):
                inner.start_soon(runner.one, client, 0.0)
        await client.close()
        assert runner.stats.ok == 4 and runner.stats.errors == {}

    await _with_standin(go)


def test_http_probe_tells_silence_from_a_server_that_drops_connections() -> None:
    import socket
    import threading

    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        port = ls.getsockname()[1]

        def drop_one() -> None:
            conn, _ = ls.accept()
            conn.close()

        t = threading.Thread(target=drop_one)
        t.start()
        assert procs.http_probe("127.0.0.1", port, "/", timeout=2.0) == -1
        t.join(5)
    assert procs.http_probe("127.0.0.1", port, "/", timeout=0.5) == 0  # nothing listens now


def test_profile_summary_shares() -> None:
    from bench import profile

    lines = [
        "main (x.py:1);serve (rawgate/h1_server.py:9);send (anyio/a.py:3) 6",
        "main (x.py:1);serve (rawgate/h1_server.py:9);map (rawgate/mapping.py:5) 3",
        "main (x.py:1) 1",
        "garbage line",
    ]
    s = profile.summarize(lines)
    assert s["samples"] == 10
    assert s["self"][0] == ("send (anyio/a.py:3)", 0.6)
    assert dict(s["inclusive"]) == {"serve (rawgate/h1_server.py:9)": 0.9,
                                    "map (rawgate/mapping.py:5)": 0.3}
    assert "60.0 %  send (anyio/a.py:3)" in profile.render(s)
    assert profile.summarize([])["samples"] == 0


def test_external_table_lists_cross_checks() -> None:
    recs = [{"kind": "external", "scenario": "xcheck", "case": "c=16 rawgate",
             "tool": "wrk", "result": external.parse_wrk(WRK_OUT)},
            {"kind": "external", "scenario": "xcheck", "case": "c=16 rawgate",
             "tool": "h2load-h1", "result": external.parse_h2load(H2LOAD_OUT)}]
    table = report.external_table(recs)
    assert "| xcheck | c=16 rawgate | wrk | 28,807 | p50 0.210 ms, p99 5.62 ms | 15 |" in table
    assert "| h2load-h1 | 73,598 | mean 0.217 ms, max 16.24 ms | 0 |" in table
    assert report.external_table([]) == ""


def test_cli_rejects_unknown_scenarios_and_knows_the_special_ones() -> None:
    from bench.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["no-such-scenario"])
    args = parse_args(["chat", "loadgen-ceiling", "--case", "c=1", "--pin"])
    assert args.scenarios == ["chat", "loadgen-ceiling"] and args.case == ["c=1"] and args.pin


def test_exit_status_fails_only_on_harness_breakage() -> None:
    from types import SimpleNamespace

    from bench.__main__ import exit_status

    ok = {"kind": "run", "target": "direct", "result": {"ok": 5, "error_total": 0}}
    bad = {"kind": "run", "target": "rawgate", "result": {"ok": 0, "error_total": 7}}
    quick = argparse.Namespace(quick=True, strict=False)
    b: Any = SimpleNamespace(broken=[], records=[ok, bad])
    assert exit_status(b, quick) == 0  # rawgate's errors are numbers, not breakage
    assert exit_status(b, argparse.Namespace(quick=False, strict=True)) == 1
    b.records = [bad]
    assert exit_status(b, quick) == 1  # the direct path answered nothing
    b.broken = ["chat c=4 direct: loadgen exited with 1"]
    assert exit_status(b, argparse.Namespace(quick=False, strict=False)) == 1


def test_compare_table_against_a_baseline() -> None:
    old = report.aggregate([_run("chat", "c=16", "rawgate", 1000, 2.0, 4.0, cpu=0.5)])
    new = report.aggregate([_run("chat", "c=16", "rawgate", 1500, 1.0, 4.0, cpu=0.25),
                            _run("chat", "c=16", "litellm", 50, 9.0, 9.0)])
    table = report.compare_table(new, old, "rawgate")
    assert "| chat | c=16 | 1,000 -> 1,500 (+50 %) | 2.00 -> 1.00 (-50 %) " in table
    assert "litellm" not in table
    assert report.compare_table(new, {}, "rawgate") == ""


@pytest.mark.anyio
async def test_h2_client_waits_for_a_free_stream_beyond_the_servers_limit() -> None:
    async def go(port: int, tg: anyio.abc.TaskGroup) -> None:
        runner = Runner(_spec(port, "h2", False))
        runner.measuring = True
        client = H2Client("127.0.0.1", port)
        await client.connect(tg)
        async with anyio.create_task_group() as inner:
            for _ in range(130):  # the stand-in's h2 allows 100 concurrent streams
                inner.start_soon(runner.one, client, 0.0)
        await client.close()
        assert runner.stats.errors == {} and runner.stats.ok == 130

    await _with_standin(go)


def test_bench_quick_runs_end_to_end(tmp_path: Any) -> None:
    """`python -m bench --quick`, the harness's smoke test, as CI runs it (issue 6): real
    emulator + rawgate + load generator processes; fails only when the harness breaks."""
    import subprocess
    import sys

    out = tmp_path / "quick.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert any(r.get("target") == "rawgate" for r in rows), rows[:3]


@pytest.mark.parametrize("flags", [[], ["--request-log"], ["--request-log-writer"]])
def test_gateway_micro_runs_every_case_through_the_app(
    capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    """bench.gateway_micro drives the whole in-process path (app -> front -> attempt loop ->
    render / stream pump) and refuses to report a case whose request did not end in a 200;
    `--request-log` with the request log's observer attached as `serve` does (and its writer
    thread writing the rows)."""
    from bench import gateway_micro

    assert gateway_micro.main(["--quick", "--json", "--chunks", "20", *flags]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    logged = re.search(r"request log: (\d+) rows (queued|written)", err)
    assert (logged is not None and int(logged.group(1)) > 0) == bool(flags), err
    assert [r["bench"] for r in rows] == [
        "gateway chat non-stream",
        "gateway responses non-stream",
        "gateway chat stream",
        "gateway responses stream",
    ]
    assert all(r["value"] > 0 for r in rows)


# ---- bench.lb and bench.variants (issues 16, 17) -------------------------------------------------


@pytest.mark.anyio
async def test_lb_gives_connections_round_robin_and_skips_a_dead_backend() -> None:
    """bench.lb, in process: each connection goes to the next backend in turn, its bytes both
    ways unchanged, half-close passed on; a backend that refuses is skipped."""
    from bench import lb

    async def backend(name: bytes, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            got = b""
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    got += await stream.receive()
            await stream.send(name + b":" + got)  # after the client's EOF: half-close works

    async with contextlib.AsyncExitStack() as stack:
        lns = [await stack.enter_async_context(
            await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0))
            for _ in range(3)]  # fmt: skip
        ports = [ln.extra(anyio.abc.SocketAttribute.local_port) for ln in lns]
        dead = procs.free_port()
        bal = lb.Balancer([("127.0.0.1", ports[0]), ("127.0.0.1", dead),
                           ("127.0.0.1", ports[1])])
        answers = []
        # The task group last: it is cancelled and left before the listeners close.
        async with anyio.create_task_group() as tg:
            tg.start_soon(lns[0].serve, functools.partial(backend, b"A"))
            tg.start_soon(lns[1].serve, functools.partial(backend, b"B"))
            tg.start_soon(lns[2].serve, bal.handle)
            with anyio.fail_after(10):
                for i in range(4):
                    async with await anyio.connect_tcp("127.0.0.1", ports[2]) as c:
                        await c.send(b"x" * 100_000 + str(i).encode())
                        await c.send_eof()
                        data = b""
                        with contextlib.suppress(anyio.EndOfStream):
                            while True:
                                data += await c.receive()
                        answers.append(data)
            tg.cancel_scope.cancel()
    assert [a[:2] for a in answers] == [b"A:", b"B:", b"A:", b"B:"]
    assert all(a[2:] == b"x" * 100_000 + str(i).encode() for i, a in enumerate(answers))
    assert bal.given == [2, 0, 2] and bal.failed == 0


@pytest.mark.anyio
async def test_lb_per_request_alternates_requests_on_one_client_connection() -> None:
    """bench.lb --per-request, in process: the requests of one keep-alive client connection go
    to the backends in turn, bodies in both directions whole (Content-Length and chunked
    answers); `Connection: close` from the client ends the connection after its answer."""
    from bench import lb

    async def backend(name: bytes, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            buf = b""
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    while b"\r\n\r\n" not in buf:
                        buf += await stream.receive()
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    while len(buf) < n:
                        buf += await stream.receive()
                    body, buf = buf[:n], buf[n:]
                    answer = name + b":" + body
                    if body.startswith(b"chunked"):
                        half = len(answer) // 2
                        await stream.send(
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                            % (half, answer[:half], len(answer) - half, answer[half:]))
                    else:
                        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                          % (len(answer), answer))

    async def exchange(c: anyio.abc.SocketStream, body: bytes, close: bool = False) -> bytes:
        extra = b"Connection: close\r\n" if close else b""
        await c.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n%s\r\n%s"
                     % (len(body), extra, body))
        p = H1Parser()
        while not p.feed(await c.receive()):
            pass
        return b"".join(p.body)

    async with contextlib.AsyncExitStack() as stack:
        lns = [await stack.enter_async_context(
            await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0))
            for _ in range(3)]  # fmt: skip
        ports = [ln.extra(anyio.abc.SocketAttribute.local_port) for ln in lns]
        bal = lb.RequestBalancer([("127.0.0.1", ports[0]), ("127.0.0.1", ports[1])])
        async with anyio.create_task_group() as tg:
            tg.start_soon(lns[0].serve, functools.partial(backend, b"A"))
            tg.start_soon(lns[1].serve, functools.partial(backend, b"B"))
            tg.start_soon(lns[2].serve, bal.handle)
            with anyio.fail_after(10):
                async with await anyio.connect_tcp("127.0.0.1", ports[2]) as c:
                    got = [await exchange(c, b"one"), await exchange(c, b"chunked two" * 5000),
                           await exchange(c, b"three"), await exchange(c, b"four", close=True)]
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await c.receive()  # closed after the answer to `Connection: close`
            tg.cancel_scope.cancel()
    assert got == [b"A:one", b"B:" + b"chunked two" * 5000, b"A:three", b"B:four"]
    assert bal.given == [2, 2] and bal.failed == 0


def test_lb_request_framing() -> None:
    from bench.lb import request_framing

    assert request_framing(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n") == (12, False)
    assert request_framing(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n") == (0, True)
    assert request_framing(b"GET / HTTP/1.0\r\n\r\n") == (0, True)
    assert request_framing(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n") == (0, False)
    with pytest.raises(ValueError):
        request_framing(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")


def _variants(tmp_path: Any, *args: str) -> tuple[Any, list[dict[str, Any]]]:
    import subprocess
    import sys

    out = tmp_path / "variants.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.variants", *args, "--duration", "0.3", "--warmup", "0.1",
         "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=180,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return proc, rows


def test_variants_lb_two_instances_share_one_redis(tmp_path: Any) -> None:
    """`python -m bench.variants lb`, tiny: one instance on local state, and two `serve --emulate`
    instances on one real redis-server behind bench.lb, same load; the key limit is counted
    across both (exactly --count answered, the rest 429, usage in Redis = --count, both served)."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    proc, rows = _variants(tmp_path, "lb", "--only", "chat:c=16", "--count", "30")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = {r["target"]: r for r in rows if r.get("kind") == "run"}
    assert set(runs) == {"one-local", "one-local+lb", "one-redis", "two-redis+lb",
                         "two-redis+lb/req"}
    assert all(r["ok"] > 0 and not r["errors"] for r in runs.values()), runs
    assert set(runs["two-redis+lb"]["cpu_ms_per_req"]) == {"instances", "loop", "lb", "redis"}
    [check] = [r for r in rows if r.get("kind") == "shared_state"]
    assert check["passed"], check
    assert (check["answered"], check["refused_429"], check["usage_requests"]) == (30, 10, 30)
    assert sum(check["allowed_per_instance"]) == 30 and min(check["allowed_per_instance"]) > 0
    assert "| chat c=16 | two-redis+lb |" in proc.stdout


def test_variants_reqlog_runs_the_log_on_and_off_side_by_side(tmp_path: Any) -> None:
    """`python -m bench.variants reqlog`, tiny: the same cases against an instance with the
    request log on and one with it off; the on one logged every answer, the off one nothing."""
    proc, rows = _variants(tmp_path, "reqlog", "--only", "chat:c=16",
                           "--only", "stream-chat:c=16")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = [(r["case"], r["target"]) for r in rows if r.get("kind") == "run" and r["ok"] > 0]
    assert runs == [("chat c=16", "log-on"), ("chat c=16", "log-off"),
                    ("stream-chat c=16", "log-on"), ("stream-chat c=16", "log-off")]
    [check] = [r for r in rows if r.get("kind") == "reqlog_check"]
    assert check["passed"] and check["rows"] >= check["answered"] > 0 and not check["off_has_db"]
    assert "difference per request (us)" in proc.stdout


def test_state_cost_reports_cpu_latency_and_total_per_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """bench.state_cost, tiny: every backend row has CPU, the check's latency percentiles and the
    per-request total (check + record_usage); the Redis rows when redis-server is installed."""
    import shutil

    from bench import state_cost

    assert state_cost.main(["--n", "64", "--repeat", "1", "--json"]) == 0
    rows = {r["backend"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    want = {"local", "local-shared"}
    if shutil.which("redis-server"):
        want |= {"redis c=1", "redis c=16", "raw PING"}
    assert set(rows) == want
    for name in want - {"raw PING"}:
        r = rows[name]
        assert r["cpu_us"] > 0 and r["p99_us"] >= r["p50_us"] > 0
        assert r["total_cpu_us"] == pytest.approx(r["cpu_us"] + r["record_cpu_us"])


def test_micro_h2_large_body_cases_run(capsys: pytest.CaptureFixture[str]) -> None:
    """bench.micro --only h2: the emulator frames the whole 6.5 MB body and the client takes
    every byte of it (both cases raise otherwise), fast paths on and off."""
    from bench import micro

    assert micro.main(["--quick", "--json", "--only", "h2"]) == 0
    names = [json.loads(line)["bench"] for line in capsys.readouterr().out.splitlines()]
    assert [n.split(" ")[0] for n in names] == [
        "emulator_h2_large_body", "h2_client_large_body", "h2_client_large_body_public"]
