"""`rawgate serve` and the admin key, as a user runs it (real processes): the key file is made
0600 once and reused, the /ui URL with the key is printed once on stderr and the key appears
nowhere else; configured keys are never printed; with --workers N every worker accepts the one
key made before they start.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx

DASHBOARD = re.compile(r"rawgate: dashboard: (http://127\.0\.0\.1:\d+/ui)(#key=(\S+))?")


@contextmanager
def _serve(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, list[str]]]:
    """A `rawgate serve --emulate --port 0` process: (origin, its stderr lines once stopped)."""
    full_env = {**os.environ, "RAWGATE_HOME": str(home), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rawgate", "serve", "--emulate", "--port", "0", *args],
        env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    err: list[str] = []
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://\S+)", line)
        assert m, f"no start-up line: {line!r}"
        yield m.group(1), err
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err.extend(proc.stderr.read().splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def test_the_key_file_is_made_once_printed_once_and_reused(tmp_path: Path) -> None:
    keys = []
    for _ in range(2):
        with _serve(tmp_path) as (origin, err), httpx.Client(base_url=origin) as c:
            key = (tmp_path / "admin_key").read_text().strip()
            assert (tmp_path / "admin_key").stat().st_mode & 0o777 == 0o600
            assert c.get("/admin/overview", headers={"x-admin-key": key}).status_code == 200
            r = c.get("/admin/overview", headers={"x-admin-key": key[:-1]})
            assert r.status_code == 401 and key[:-1] not in r.text
            assert c.get("/admin/overview", params={"key": key}).status_code == 401
            chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
            assert c.post("/v1/chat/completions", json=chat).status_code == 200
        keys.append(key)
        lines = [ln for ln in err if "dashboard" in ln]
        assert len(lines) == 1, err
        m = DASHBOARD.fullmatch(lines[0])
        assert m is not None and m.group(1) == origin + "/ui" and m.group(3) == key
        # Nowhere else: not in the access log, not in any other line.
        assert [ln for ln in err if key in ln] == lines
    assert keys[0] == keys[1]


def test_configured_keys_are_used_and_never_printed(tmp_path: Path) -> None:
    secret = "adm-configured-0123456789abcdef"
    env = {"RAWGATE_ADMIN_API_KEYS": secret}
    with _serve(tmp_path, env=env) as (origin, err), httpx.Client(base_url=origin) as c:
        assert c.get("/admin/overview", headers={"x-admin-key": secret}).status_code == 200
        assert c.get("/admin/overview", headers={"x-admin-key": "other"}).status_code == 401
    assert not (tmp_path / "admin_key").exists()
    (line,) = [ln for ln in err if "dashboard" in ln]
    assert line == f"rawgate: dashboard: {origin}/ui (admin key: [admin] api_keys)"
    assert not [ln for ln in err if secret in ln]


def test_every_worker_accepts_the_one_key(tmp_path: Path) -> None:
    with _serve(tmp_path, "--workers", "2") as (origin, err):
        key = (tmp_path / "admin_key").read_text().strip()
        seen: set[str] = set()
        for _ in range(60):  # a new connection each time: the kernel spreads them
            with httpx.Client(base_url=origin) as c:
                r = c.get("/admin/overview", headers={"authorization": f"Bearer {key}"})
                assert r.status_code == 200, r.text
                seen.add(r.json()["instance"]["id"])
            if len(seen) == 2:
                break
        assert len(seen) == 2
    lines = [ln for ln in err if "dashboard" in ln]
    assert len(lines) == 1 and lines[0].endswith("#key=" + key)
