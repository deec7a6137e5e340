"""The emulator as a test bed: keys added while `rawgate serve --emulate` runs, JSON mode and
structured outputs that real SDK parsers accept."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from tests.helpers_gateway import serve_process

RELOAD_POLLS = 100  # x 0.1 s: the server reloads accounts.json within a second
POLL_GAP_S = 0.1


def _chat(origin: str, prompt: str) -> tuple[int, str, dict[str, Any]]:
    body = orjson.dumps({"model": "gemini-2.5-flash",
                         "messages": [{"role": "user", "content": prompt}]})
    req = urllib.request.Request(origin + "/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("x-account-email", ""), orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-account-email", ""), orjson.loads(e.read())


def test_serve_emulate_accepts_a_key_added_while_it_runs(tmp_path: Path) -> None:
    env = {**os.environ, "RAWGATE_HOME": str(tmp_path)}
    with serve_process(tmp_path) as origin:
        status, who, _ = _chat(origin, "before")
        assert status == 200 and who == "emulator-demo"
        subprocess.run([sys.executable, "-m", "rawgate", "accounts", "add", "--api-key",
                        "NEWKEY-added-while-running", "--label", "x"], env=env, check=True,
                       capture_output=True)
        for _ in range(RELOAD_POLLS):  # until the server has reloaded accounts.json
            status, who, doc = _chat(origin, "after")
            if who != "emulator-demo":
                break
            time.sleep(POLL_GAP_S)
        assert who == "x", (status, who)
        assert status == 200, doc  # not API_KEY_INVALID from the in-process emulator
        assert doc["choices"][0]["message"]["content"] == "after"
