"""`rawgate emulate`: flags map onto Settings, and the command serves and stops on SIGINT."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from rawgate.__main__ import build_parser
from rawgate.cli.emulate import build_settings
from rawgate.emulator.server import DEMO_ACCOUNT, DEMO_API_KEY


def test_flags_map_onto_settings() -> None:
    args = build_parser().parse_args([
        "emulate", "--api-key", "k1", "--api-key", "k2", "--refresh-token", "r1",
        "--quota", "5", "--quota-window", "10", "--chunks", "7", "--chunk-delay-ms", "20",
        "--first-byte-ms", "5", "--token-lifetime", "30", "--no-validate", "--model", "emu-x",
    ])
    s = build_settings(args)
    assert s.api_keys == ("k1", "k2") and s.quota_requests == 5 and s.quota_window_s == 10
    assert s.chunks == 7 and s.chunk_delay_s == 0.02 and s.first_byte_delay_s == 0.005
    assert s.access_token_lifetime_s == 30 and not s.validate and s.extra_models == ("emu-x",)
    assert [a.refresh_token for a in s.oauth_accounts] == ["r1"]
    assert s.oauth_accounts[0].project == "emu-project-1"


def test_defaults_are_the_demo_credentials() -> None:
    s = build_settings(build_parser().parse_args(["emulate"]))
    assert s.api_keys == (DEMO_API_KEY,) and s.oauth_accounts == (DEMO_ACCOUNT,)
    assert s.quota_requests is None and s.validate and s.require_auth


def _emulate_parser() -> argparse.ArgumentParser:
    (subs,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return subs.choices["emulate"]


def test_every_flag_has_help() -> None:
    sub = _emulate_parser()
    for action in sub._actions:
        assert action.help, action.option_strings


def test_engine_help_says_what_the_fast_engine_serves() -> None:
    # It once said "HTTP/1.1-only"; emulator_fast.py serves h2c and TLS h2 too
    # (tests/e2e/test_emulator_fast.py drives both).
    sub = _emulate_parser()
    (engine,) = [a for a in sub._actions if "--engine" in a.option_strings]
    assert engine.help is not None
    fast = engine.help.split("fast:", 1)[1]
    assert "HTTP/1.1-only" not in engine.help
    for words in ("HTTP/1.1", "h2c", "h2 over TLS", "411", "benchmark-only"):
        assert words in fast, words


def test_tls_flags_go_together() -> None:
    from rawgate.cli.emulate import run

    assert run(build_parser().parse_args(["emulate", "--tls-cert", "x.pem"])) == 2


@pytest.mark.parametrize("engine", ["standard", "fast"])
def test_serves_and_stops_on_sigint(engine: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "rawgate", "emulate", "--port", "0",
                             "--engine", engine], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", first)
        assert m, first
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/healthz", timeout=10) as r:
            assert r.status == 200 and r.read() == b"rawgate Gemini emulator\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
