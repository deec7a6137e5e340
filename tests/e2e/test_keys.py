"""Client keys: records and keys.json (keys.py), the sans-IO limiter (limiter.py), `rawgate keys`
on both backends, and the local backend's limits shared by worker processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rawgate.__main__ import main
from rawgate.config import ConfigError, build_config
from rawgate.state.keys import KeyFile, KeyStoreError, add_record, hash_key, parse_since
from rawgate.state.limiter import (
    DAY_MS,
    MINUTE_MS,
    Limits,
    WindowCounts,
    decide,
    model_allowed,
)
from tests.helpers_redis import RedisServer

# ---- limiter ----


def test_decide_fixed_windows_and_retry_after() -> None:
    now = 1_800_000_000_000 + 15_500  # 15.5 s into a minute
    lim = Limits(rpm=3, tpm=100, daily_tokens=1000)
    assert decide(lim, WindowCounts(2, 99, 999), now).allowed
    d = decide(lim, WindowCounts(3, 0, 0), now)
    assert (d.allowed, d.reason, d.retry_after_s) == (False, "rpm", 45)  # 44.5 s rounds up
    assert decide(lim, WindowCounts(0, 100, 0), now).reason == "tpm"
    day = decide(lim, WindowCounts(0, 0, 1000), now)
    assert day.reason == "daily_tokens"
    assert day.retry_after_s == -(-(DAY_MS - now % DAY_MS) // 1000)
    assert decide(Limits(), WindowCounts(10**9, 10**9, 10**9), now).allowed  # 0 = no limit
    # The last millisecond of a window still waits a whole second, never 0.
    last_ms = now - now % MINUTE_MS + MINUTE_MS - 1
    assert decide(lim, WindowCounts(3, 0, 0), last_ms).retry_after_s == 1


def test_model_patterns() -> None:
    assert model_allowed((), "anything")
    pats = ("gemini-2.5-*", "gpt-4o")
    assert model_allowed(pats, "gemini-2.5-pro") and model_allowed(pats, "gpt-4o")
    assert not model_allowed(pats, "gpt-4o-mini") and not model_allowed(pats, "gemini-3-pro")
    assert not model_allowed(("gemini-2.5-*",), "GEMINI-2.5-PRO")  # case-sensitive
    assert model_allowed(("gemini-[12].5-flash",), "gemini-1.5-flash")


# ---- records and keys.json ----


def test_keys_json_is_0600_hashed_and_never_holds_the_key(tmp_path: Path) -> None:
    kf = KeyFile(tmp_path / "keys.json")
    _, key = kf.update(lambda salt, recs: add_record(recs, salt, "alice", rpm=5))
    data = (tmp_path / "keys.json").read_bytes()
    assert key.encode() not in data and key[7:-4].encode() not in data
    assert stat.S_IMODE(os.stat(tmp_path / "keys.json").st_mode) == 0o600
    salt, recs = kf.load()
    assert recs["alice"].hash == hash_key(salt, key) != hash_key("00" * 16, key)
    assert not kf.changed()
    kf.update(lambda salt, recs: add_record(recs, salt, "bob"))
    assert kf.changed()


def test_corrupt_keys_json_is_an_error_and_left_alone(tmp_path: Path) -> None:
    p = tmp_path / "keys.json"
    p.write_bytes(b'{"version": 1, "salt": "ab", "keys": [')
    kf = KeyFile(p)
    with pytest.raises(KeyStoreError, match="not a keys file"):
        kf.update(lambda salt, recs: add_record(recs, salt, "x"))
    assert p.read_bytes() == b'{"version": 1, "salt": "ab", "keys": ['


def test_bad_limits_and_since() -> None:
    with pytest.raises(KeyStoreError, match="--rpm"):
        add_record({}, "00", "a", rpm=-1)
    with pytest.raises(KeyStoreError, match="model pattern"):
        add_record({}, "00", "a", models=["has space"])
    assert parse_since("24h") == 86400 and parse_since("90m") == 5400
    with pytest.raises(KeyStoreError, match="--since"):
        parse_since("yesterday")


def test_state_config_checks() -> None:
    cfg = build_config({}, {"RAWGATE_STATE_BACKEND": "redis", "RAWGATE_STATE_LIMITS_FAIL":
                            "closed"}, {})  # fmt: skip
    assert (cfg.state.backend, cfg.state.limits_fail, cfg.state.redis_timeout_ms) == (
        "redis", "closed", 250)  # fmt: skip
    with pytest.raises(ConfigError, match=r"^config: state\.redis_url: must start") as ei:
        build_config({"state": {"backend": "redis", "redis_url": "http://u:s3cret@h"}}, {}, {})
    assert "s3cret" not in str(ei.value)
    with pytest.raises(ConfigError, match="key_prefix"):
        build_config({"state": {"key_prefix": "a{b}"}}, {}, {})
    with pytest.raises(ConfigError, match="limits_fail"):
        build_config({"state": {"limits_fail": "maybe"}}, {}, {})


# ---- the CLI, on both backends ----


@pytest.fixture(params=["local", "redis"])
def cli_env(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    monkeypatch.setenv("RAWGATE_HOME", str(tmp_path))
    if request.param == "redis":
        srv: RedisServer = request.getfixturevalue("redis_server")
        monkeypatch.setenv("RAWGATE_STATE_BACKEND", "redis")
        monkeypatch.setenv("RAWGATE_STATE_REDIS_URL", srv.url)
        monkeypatch.setenv("RAWGATE_STATE_KEY_PREFIX", f"cli{os.urandom(4).hex()}:")
    return str(request.param)


def test_cli_keys_flow(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "add", "alice", "--rpm", "60", "--models", "gemini-2.5-*", "gpt-4o"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("rk-") and "not shown again" in err and "rpm 60" in err
    assert main(["keys", "list"]) == 0
    out, _ = capsys.readouterr()
    assert "alice" in out and key[:7] in out and key not in out and "gemini-2.5-*,gpt-4o" in out
    assert main(["keys", "disable", "alice"]) == 0
    assert main(["keys", "list", "--json"]) == 0
    out, _ = capsys.readouterr()
    assert '"enabled":false' in out and key not in out
    assert main(["keys", "enable", "alice"]) == 0
    assert "enabled key alice" in capsys.readouterr().out
    assert main(["keys", "rotate", "alice"]) == 0
    out, _ = capsys.readouterr()
    assert out.strip().startswith("rk-") and key not in out
    assert main(["keys", "usage", "--since", "2h"]) == 0
    assert "no usage" in capsys.readouterr().out
    assert main(["keys", "remove", "alice"]) == 0
    assert main(["keys", "remove", "alice"]) == 1
    assert "no key named 'alice'" in capsys.readouterr().err
    assert main(["keys", "usage", "--since", "soon"]) == 1
    assert main(["keys", "add", "bad name"]) == 1


def test_cli_redis_down_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.helpers_redis import free_port

    monkeypatch.setenv("RAWGATE_HOME", str(tmp_path))
    monkeypatch.setenv("RAWGATE_STATE_BACKEND", "redis")
    monkeypatch.setenv("RAWGATE_STATE_REDIS_URL", f"redis://:pw-s3cret@127.0.0.1:{free_port()}/0")
    assert main(["keys", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not answer" in err and "s3cret" not in err


# ---- local backend, serve --workers N: one limit across processes ----

_WORKER = """
import sys, anyio
from pathlib import Path
from rawgate.config import build_config
from rawgate.state.store import open_state

async def main():
    cfg = build_config({}, {}, {})
    async with open_state(cfg, Path(sys.argv[1]), processes=2) as st:
        rec = st.lookup_key(sys.argv[2])
        allowed = 0
        for _ in range(int(sys.argv[3])):
            allowed += (await st.check_key(rec, "m")).allowed
        print(allowed)

anyio.run(main)
"""


def test_local_limits_are_shared_by_worker_processes(tmp_path: Path) -> None:
    import anyio

    from rawgate.state.store import open_state

    async def setup() -> str:
        async with open_state(build_config({}, {}, {}), tmp_path) as st:
            _, key = await st.add_key("w", rpm=25)
            return key

    key = anyio.run(setup)
    if time.time() % 60 > 50:  # keep the count inside one minute window
        time.sleep(61 - time.time() % 60)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path), key, "20"],
            stdout=subprocess.PIPE, text=True,
        )
        for _ in range(3)
    ]
    counts = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(counts) == 25, counts


def test_health_episodes_warn_once_and_back_off(caplog: pytest.LogCaptureFixture) -> None:
    from rawgate.state.store import BACKOFF_BASE_S, Health

    now = [100.0]
    h = Health("store", backoff_max_s=3.0, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="rawgate.state.store"):
        for _ in range(5):
            h.failed(ConnectionError("refused"))
        assert h.degraded and h.episodes == 1 and h.failures == 5
        assert [h.next_delay() for _ in range(5)] == [BACKOFF_BASE_S, 1.0, 2.0, 3.0, 3.0]
        now[0] = 107.5
        h.succeeded()
        h.failed(TimeoutError("slow"))
    msgs = [r.getMessage() for r in caplog.records]
    assert len([m for m in msgs if "unreachable" in m]) == 2  # one per episode
    assert any("back after 7.5 s" in m for m in msgs)
    assert h.episodes == 2 and h.next_delay() == BACKOFF_BASE_S  # the backoff restarts


def test_an_error_without_text_still_names_a_cause(caplog: pytest.LogCaptureFixture) -> None:
    """anyio's stream errors carry no message (a killed server on the lean Redis path): the
    one warning of the episode still says what happened, never an empty "(X: )"."""
    import anyio

    from rawgate.state.store import Health

    with caplog.at_level("WARNING", logger="rawgate.state.store"):
        Health("store", backoff_max_s=3.0).failed(anyio.BrokenResourceError())
        Health("store", backoff_max_s=3.0).failed(RuntimeError())
    msgs = [r.getMessage() for r in caplog.records]
    assert "(BrokenResourceError: the connection was closed)" in msgs[0]
    assert "(RuntimeError: no detail given)" in msgs[1]
