"""`rawgate serve` as an operator meets it, through real subprocesses on 127.0.0.1:
start-up failures (one stderr line, exit 2 for config, 1 for bind, with and without --emulate and
--workers), the banner and the no-account warning, SIGHUP reload under a live stream, and
/metrics across `--workers 2` (totals, never backwards, scheduler families)."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from rawgate.metrics import Family
from tests.unit.test_metrics import Series, get, parse

WAIT_S = 20.0


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAWGATE_")}
    env["RAWGATE_HOME"] = str(home)
    env.update(extra)
    return env


def _run(home: Path, *args: str, **env: str) -> tuple[int, str, str]:
    p = subprocess.run(
        [sys.executable, "-m", "rawgate", "serve", "--host", "127.0.0.1", *args],
        env=_env(home, **env),
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# ---- start-up failures ------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [(), ("--emulate",), ("--emulate", "--workers", "2")])
def test_taken_port_is_one_line_exit_1_naming_port_flag(
    tmp_path: Path, taken_port: int, extra: tuple[str, ...]
) -> None:
    rc, out, err = _run(tmp_path, "--port", str(taken_port), *extra)
    assert rc == 1 and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"cannot listen on 127.0.0.1 port {taken_port}" in lines[0]
    assert "Address already in use" in lines[0] and "--port" in lines[0]


CASES: dict[str, tuple[tuple[str, ...], dict[str, str], str, str]] = {
    # name: (args, env, config.toml text or "", what the line must say)
    "flag out of range": (
        ("--port", "99999"), {}, "", "--port: server.port = 99999: must be 0..65535"
    ),
    "flag not a number": (
        ("--port", "8o45"), {}, "", "--port: server.port = '8o45': expected an integer"
    ),
    "flag enum": (
        ("--log-level", "loud"),
        {},
        "",
        "--log-level: log.level = 'loud': must be one of debug, info, warning, error",
    ),
    "env var": (
        (), {"RAWGATE_SERVER_PORT": "abc"}, "", "RAWGATE_SERVER_PORT: server.port = 'abc'"
    ),
    "enum in the file": (
        (),
        {},
        '[routing]\nscheduling = "fastest"\n',
        "config.toml: routing.scheduling = 'fastest': must be one of round_robin, least_loaded,"
        " sticky",
    ),
    "strict auth without keys": (
        (), {}, '[auth]\nmode = "strict"\n', "config.toml: auth.mode = 'strict' needs"
    ),
    "lan access without keys, from env": (
        (),
        {"RAWGATE_SERVER_ALLOW_LAN_ACCESS": "true"},
        "",
        "RAWGATE_SERVER_ALLOW_LAN_ACCESS: auth.mode = 'all_except_health' needs",
    ),
}


@pytest.mark.parametrize("extra", [(), ("--emulate",), ("--emulate", "--workers", "2")])
@pytest.mark.parametrize("case", list(CASES))
def test_config_errors_are_one_line_exit_2_naming_the_real_source(
    tmp_path: Path, case: str, extra: tuple[str, ...]
) -> None:
    args, env, toml, needle = CASES[case]
    if toml:
        (tmp_path / "config.toml").write_text(toml)
    port = () if "RAWGATE_SERVER_PORT" in env else ("--port", "0")  # a flag beats the env
    rc, out, err = _run(tmp_path, *port, *args, *extra, **env)
    assert rc == 2 and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rawgate: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err
    if not toml:  # no file was read: none may be named
        assert "config.toml" not in err


@pytest.mark.parametrize("extra", [(), ("--emulate",), ("--emulate", "--workers", "2")])
def test_corrupt_accounts_file_is_one_line_exit_2(tmp_path: Path, extra: tuple[str, ...]) -> None:
    accounts = tmp_path / "accounts.json"
    accounts.write_text("{bad")
    accounts.chmod(0o600)
    rc, out, err = _run(tmp_path, "--port", "0", *extra)
    assert rc == 2 and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{accounts}: not valid JSON" in lines[0], err


# ---- what the operator sees at start ----------------------------------------------------------


@dataclass
class Proc:
    proc: subprocess.Popen[str]
    port: int
    banner: str
    log: Path  # stderr

    def stderr(self) -> str:
        return self.log.read_text()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    procs: list[Proc] = []

    def start(*args: str, home: Path = tmp_path) -> Proc:
        log = home / f"stderr-{len(procs)}.log"
        with log.open("w") as err:
            p = subprocess.Popen(
                [sys.executable, "-m", "rawgate", "serve", "--host", "127.0.0.1", "--port", "0",
                 *args],
                env=_env(home),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )  # fmt: skip
        assert p.stdout is not None
        line = p.stdout.readline()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+) \((.*)\)", line)
        assert m, (line, log.read_text())
        proc = Proc(p, int(m.group(1)), line, log)
        procs.append(proc)
        return proc

    yield start
    for pr in procs:
        if pr.proc.poll() is None:
            pr.proc.kill()
        pr.proc.communicate(timeout=WAIT_S)


def _stop(pr: Proc) -> None:
    pr.proc.send_signal(signal.SIGTERM)
    assert pr.proc.wait(timeout=WAIT_S) == 0, pr.stderr()


def test_banner_names_the_emulator_and_no_account_warns(serve: Any) -> None:
    emu = serve("--emulate")
    assert "upstream: the built-in emulator" in emu.banner
    assert _chat(emu.port, "gpt-4o")[0] == 200
    samples = _scrape(emu.port)  # one process: the scheduler's families are there too
    assert get(samples, "rawgate_account_requests_total", account="emulator-demo") == 1
    assert get(samples, "rawgate_account_tokens_total", account="emulator-demo",
               direction="out") > 0  # fmt: skip
    assert ("rawgate_workers_reporting", frozenset()) not in samples
    _stop(emu)
    assert "no upstream account" not in emu.stderr()  # the demo account serves
    bare = serve()
    assert "emulator" not in bare.banner
    _stop(bare)
    warnings = [ln for ln in bare.stderr().splitlines() if "WARNING" in ln]
    assert len(warnings) == 1 and "rawgate accounts add --api-key KEY" in warnings[0]


# ---- SIGHUP -----------------------------------------------------------------------------------


def _send_chat(
    port: int, model: str, content: str, *, stream: bool, key: str = ""
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    body = orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}
    )
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    c.request("POST", "/v1/chat/completions", body, headers)
    return c, c.getresponse()


def _chat(port: int, model: str, key: str = "") -> tuple[int, str | None]:
    """A non-stream chat on a new connection: (status, X-Mapped-Model)."""
    c, r = _send_chat(port, model, "hi", stream=False, key=key)
    with closing(c):
        r.read()
        return r.status, r.getheader("x-mapped-model")


def _wait_for(pred: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_sighup_reloads_config_while_a_stream_runs_on(serve: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[routing]\ndefault_model = \"gemini-2.5-flash\"\n")
    pr = serve("--emulate")
    # 12 chunks 150 ms apart: the reload lands in the middle of this stream.
    conn, resp = _send_chat(
        pr.port, "gpt-4o", "[[emu:chunks n=12]] [[emu:delay ms=150]] " + "word " * 24, stream=True
    )
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: {")

    cfg.write_text(
        '[auth]\nmode = "strict"\napi_keys = ["sk-after-reload"]\n'
        '[routing.custom_mapping]\n"my-alias" = "gemini-2.5-pro"\n'
        "[limits]\nmax_connections = 10\n"  # needs a restart: kept, and named in a warning
        '[log]\nlevel = "warning"\n'  # no more access lines (INFO)
    )
    # An idle keep-alive connection opened before the reload is still usable after it.
    idle = http.client.HTTPConnection("127.0.0.1", pr.port, timeout=WAIT_S)
    idle.request("GET", "/healthz")
    assert idle.getresponse().read().startswith(b'{"status":"ok"')
    idle_sock = idle.sock
    pr.proc.send_signal(signal.SIGHUP)
    rest = resp.read()
    conn.close()
    assert rest.endswith(b"data: [DONE]\n\n"), rest[-200:]
    events = [e for e in (first + rest).split(b"\n\n") if e.startswith(b"data: {")]
    deltas = [orjson.loads(e[6:])["choices"] for e in events]
    text = "".join(ch[0]["delta"].get("content") or "" for ch in deltas if ch)
    assert text.split() == ["word"] * 24  # intact: every chunk, in order
    assert b"error" not in rest

    # The next request sees the new config: auth on, the new mapping.
    _wait_for(lambda: "config reloaded" in pr.stderr(), "no reload logged")
    access_lines = pr.stderr().count("rawgate.access")
    assert access_lines >= 1  # /healthz, at the old level
    # The stream ended after the reload: its access line (INFO, written when it ends) fell under
    # the new log.level. So the reload really happened with the stream in flight.
    assert "POST /v1/chat/completions" not in pr.stderr()
    assert _chat(pr.port, "gpt-4o")[0] == 401
    assert _chat(pr.port, "my-alias", key="sk-after-reload") == (200, "gemini-2.5-pro")
    idle.request("GET", "/healthz", headers={"authorization": "Bearer sk-after-reload"})
    assert idle.getresponse().status == 200
    assert idle.sock is idle_sock  # http.client would have reconnected had it been closed
    idle.close()
    log = pr.stderr()
    assert re.search(r"WARNING .*limits\.max_connections changed: needs a restart", log), log
    assert log.count("rawgate.access") == access_lines

    # A config that does not load: one error line, the running config stays, alive.
    cfg.write_text("[auth\n")
    pr.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: "config not reloaded" in pr.stderr(), "no reload error logged")
    assert pr.proc.poll() is None
    samples = _scrape(pr.port, key="sk-after-reload")
    assert get(samples, "rawgate_config_reloads_total", outcome="ok") == 1
    assert get(samples, "rawgate_config_reloads_total", outcome="failed") == 1
    assert get(samples, "rawgate_config_last_reload_successful") == 0
    assert _chat(pr.port, "my-alias", key="sk-after-reload") == (200, "gemini-2.5-pro")
    assert "Traceback" not in pr.stderr()
    _stop(pr)


def test_sighup_with_workers_reaches_every_worker(serve: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    pr = serve("--emulate", "--workers", "2")
    cfg.write_text('[routing.custom_mapping]\n"my-alias" = "gemini-2.5-pro"\n')
    pr.proc.send_signal(signal.SIGHUP)
    for i in (0, 1):
        _wait_for(lambda i=i: f"worker {i}: config reloaded" in pr.stderr(), f"worker {i}")
    for _ in range(6):  # new connections: SO_REUSEPORT spreads them over both workers
        assert _chat(pr.port, "my-alias") == (200, "gemini-2.5-pro")
    # A refused reload reaches every worker too, and the metric an alert reads says so.
    cfg.write_text("[routing\n")
    pr.proc.send_signal(signal.SIGHUP)
    for i in (0, 1):
        _wait_for(lambda i=i: f"worker {i}: SIGHUP: config not reloaded" in pr.stderr(), f"{i}")
    def refused_by_both() -> bool:  # each worker's share is at most metrics.PUBLISH_S old
        samples = _scrape(pr.port)
        failed = get(samples, "rawgate_config_reloads_total", outcome="failed")
        assert failed <= 2
        return failed == 2 and get(samples, "rawgate_config_last_reload_successful") == 0

    _wait_for(refused_by_both, "the refused reload is not in /metrics")
    assert _chat(pr.port, "my-alias") == (200, "gemini-2.5-pro")
    assert pr.proc.poll() is None
    _stop(pr)


# ---- /metrics across workers --------------------------------------------------------------------


def _scrape(port: int, key: str = "") -> Series:
    with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)) as c:
        c.request("GET", "/metrics", headers={"authorization": f"Bearer {key}"} if key else {})
        r = c.getresponse()
        assert r.status == 200
        samples, types = parse(r.read().decode())
    for family in ("rawgate_account_up", "rawgate_account_requests_total",
                   "rawgate_account_tokens_total", "rawgate_account_cooling_models",
                   "rawgate_retries_total"):  # fmt: skip
        assert family in types, family
    return samples


def _counters(s: Series) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    keep = ("_total", "_bucket", "_count", "_sum")
    return {k: v for k, v in s.items() if k[0].endswith(keep)}


def _total(port: int, sent: int) -> bool:
    samples = _scrape(port)
    assert get(samples, "rawgate_workers_reporting") == 2
    assert get(samples, "rawgate_account_up", account="emulator-demo") == 1
    chat = {"route": "/v1/chat/completions", "method": "POST", "status": "200"}
    requests = get(samples, "rawgate_requests_total", **chat)
    attempts = get(samples, "rawgate_account_requests_total", account="emulator-demo")
    assert requests <= sent and attempts <= sent
    return requests == attempts == sent


def test_metrics_across_two_workers_are_totals_that_never_go_back(
    serve: Any, tmp_path: Path
) -> None:
    pr = serve("--emulate", "--workers", "2")
    chat = {"route": "/v1/chat/completions", "method": "POST", "status": "200"}
    previous: dict[Any, float] = {}
    sent = 0
    for _ in range(12):
        for _ in range(2):
            assert _chat(pr.port, "gpt-4o")[0] == 200
            sent += 1
        for _ in range(2):
            now = _counters(_scrape(pr.port))
            went_back = {k: (v, now.get(k)) for k, v in previous.items() if now.get(k, 0) < v}
            assert not went_back
            previous = now
        # Every request is counted, whichever worker served it and whichever answers the scrape:
        # the other worker's share is at most metrics.PUBLISH_S old.
        _wait_for(lambda n=sent: _total(pr.port, n), f"the scrapes never showed {sent} requests")
    # Both workers served some of them (the kernel spreads 24 connections; the files say who).
    (run,) = (tmp_path / "run").iterdir()
    decode = msgspec.json.Decoder(list[Family]).decode
    per_worker = []
    for f in sorted(run.glob("worker-*.json")):
        (fam,) = [x for x in decode(f.read_bytes()) if x.name == "rawgate_requests_total"]
        per_worker.append(sum(v for n, labels, v in fam.samples if labels == chat))
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker), per_worker
    assert sum(per_worker) == sent

    # A worker killed and restarted by the supervisor carries on from its published counters.
    before = _counters(_scrape(pr.port))
    children = Path(f"/proc/{pr.proc.pid}/task/{pr.proc.pid}/children").read_text().split()
    os.kill(int(children[0]), signal.SIGKILL)
    _wait_for(lambda: "restarting it" in pr.stderr(), "no restart")
    for _ in range(20):
        now = _counters(_scrape(pr.port))
        assert not {k for k, v in before.items() if now.get(k, 0) < v}
        before = now
    _wait_for(lambda: _total(pr.port, sent), "the restarted worker lost counts")
    _stop(pr)
    assert not run.exists()  # the supervisor removes its run directory


def test_a_worker_still_starting_survives_a_sighup(tmp_path: Path) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "rawgate", "serve", "--host", "127.0.0.1", "--port", "0",
         "--emulate", "--workers", "2"],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
        _wait_for(lambda: len(children.read_text().split()) == 2, "no workers")
        for pid in children.read_text().split():  # before they serve (a reload from outside)
            os.kill(int(pid), signal.SIGHUP)
        assert p.stdout is not None
        assert "listening on" in p.stdout.readline()  # both became ready: none died
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=WAIT_S)
        assert p.returncode == 0 and "exited" not in err, err
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=WAIT_S)
