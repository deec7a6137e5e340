"""accounts.json: format, crash safety (real kill -9), cross-process locking, hot reload, CLI."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rawgate.__main__ import main
from rawgate.accounts.store import (
    Account,
    AccountStore,
    AccountStoreError,
    find_account,
    mask_secret,
    write_atomic,
)
from rawgate.cli.accounts import parse_import

KEY = "AIzaSyA1234567890abcdefghijklmnopqrstu"
KEY2 = "AIzaSyB0987654321zyxwvutsrqponmlkjihgf"
RTOKEN = "1//0gSECRETrefreshTOKENvalue-abcdefghijklmnop"
ROOT = Path(__file__).resolve().parents[2]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _write_raw(p: Path, data: bytes) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    p.chmod(0o600)


# ---- format and validation ------------------------------------------------------------------


def test_missing_file_is_empty_and_not_created(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "home" / "accounts.json")
    assert store.load() == []
    assert not store.path.exists()


def test_add_writes_versioned_format(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "home" / "accounts.json")
    a = store.add_api_key(KEY, label="work", email="w@example.com")
    b = store.add_oauth(RTOKEN, email="me@example.com", project="proj-1")
    doc = json.loads(store.path.read_bytes())
    assert doc["version"] == 1
    assert [x["id"] for x in doc["accounts"]] == [a.id, b.id]
    assert doc["accounts"][0]["api_key"] == KEY
    assert doc["accounts"][1]["project"] == "proj-1"
    loaded = store.load()
    assert loaded == [a, b]
    assert _mode(store.path.parent) == 0o700


def test_duplicate_secret_is_refused(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "accounts.json")
    a = store.add_api_key(KEY)
    with pytest.raises(AccountStoreError, match=f"already account {a.id}") as ei:
        store.add_api_key(" " + KEY + "\n")
    assert KEY not in str(ei.value)
    assert len(store.load()) == 1


def test_file_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = AccountStore(tmp_path / "accounts.json")
        store.add_api_key(KEY)
        assert _mode(store.path) == 0o600
        assert _mode(store.lock_path) == 0o600
    finally:
        os.umask(old)


def test_temp_file_is_private_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(stat.S_IMODE(os.stat(src).st_mode))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    old = os.umask(0)
    try:
        AccountStore(tmp_path / "accounts.json").add_api_key(KEY)
    finally:
        os.umask(old)
    assert seen == [0o600]


VALID = (
    b'{"version": 1, "accounts": [{"id": "a1", "kind": "api_key", "api_key": "'
    + KEY.encode()
    + b'"}]}'
)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"{", "not valid JSON"),
        (VALID[: len(VALID) // 2], "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"accounts": []}', "version"),
        (b'{"version": 2, "accounts": []}', "newer"),
        (b'{"version": 1}', "wrong shape"),
        (b'{"version": 1, "accounts": {}}', "wrong shape"),
        (b'{"version": 1, "accounts": [{"id": "a", "kind": "weird", "api_key": "k"}]}', "shape"),
        (b'{"version": 1, "accounts": [{"id": "a", "kind": "api_key"}]}', "without api_key"),
        (b'{"version": 1, "accounts": [{"id": "a", "kind": "oauth"}]}', "without refresh"),
        (
            b'{"version": 1, "accounts": [{"id": "a", "kind": "api_key", "api_key": "'
            + KEY.encode()
            + b'", "bogus": 1}]}',
            "unknown field",
        ),
        (
            b'{"version": 1, "accounts": [{"id": "a", "kind": "api_key", "api_key": "x"},'
            b' {"id": "a", "kind": "api_key", "api_key": "y"}]}',
            "duplicate id",
        ),
        (b'{"version": 1, "accounts": [{"id": "a b", "kind": "api_key", "api_key": "x"}]}', "id"),
    ],
)
def test_corrupt_file_stops_and_is_never_overwritten(
    tmp_path: Path, data: bytes, needle: str
) -> None:
    store = AccountStore(tmp_path / "accounts.json")
    _write_raw(store.path, data)
    with pytest.raises(AccountStoreError, match=needle) as ei:
        store.load()
    msg = str(ei.value)
    assert str(store.path) in msg
    assert KEY not in msg
    assert "\n" not in msg
    with pytest.raises(AccountStoreError):
        store.add_api_key(KEY2)
    with pytest.raises(AccountStoreError):
        store.update(lambda accounts: [])
    assert store.path.read_bytes() == data


def test_invalid_result_of_update_is_not_written(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "accounts.json")
    a = store.add_api_key(KEY)
    before = store.path.read_bytes()

    def bad(accounts: list[Account]) -> list[Account]:
        return [*accounts, Account(id=a.id, kind="api_key", api_key=KEY2)]

    with pytest.raises(AccountStoreError, match="duplicate id"):
        store.update(bad)
    assert store.path.read_bytes() == before


@pytest.mark.parametrize("fail_at", ["fsync", "replace", "write"])
def test_failed_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    store = AccountStore(tmp_path / "accounts.json")
    store.add_api_key(KEY)
    before = store.path.read_bytes()

    def boom(*args: object, **kw: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, fail_at, boom)
    with pytest.raises(AccountStoreError, match=r"cannot write.*Input/output error"):
        store.add_api_key(KEY2)
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert not list(tmp_path.glob(".accounts.json.*.tmp"))
    assert len(store.load()) == 1


def test_stray_temp_files_are_swept_by_the_next_update(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "accounts.json")
    store.add_api_key(KEY)
    stray = tmp_path / ".accounts.json.999.deadbeef.tmp"
    stray.write_bytes(b'{"version": 1, "acc')
    assert store.load()  # readers ignore it
    store.add_api_key(KEY2)
    assert not stray.exists()


def test_world_readable_file_is_tightened_not_rewritten(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "accounts.json")
    store.path.write_bytes(VALID)
    store.path.chmod(0o644)
    assert [a.id for a in store.load()] == ["a1"]
    assert _mode(store.path) == 0o600
    assert store.path.read_bytes() == VALID


def test_write_atomic_replaces_and_cleans_up(tmp_path: Path) -> None:
    p = tmp_path / "f.json"
    write_atomic(p, b"one")
    write_atomic(p, b"two", durable=False)
    assert p.read_bytes() == b"two"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.json"]


# ---- hot reload ------------------------------------------------------------------------------


def test_changed_tracks_other_writers(tmp_path: Path) -> None:
    path = tmp_path / "accounts.json"
    server, cli = AccountStore(path), AccountStore(path)
    assert server.load() == []
    assert not server.changed()
    a = cli.add_api_key(KEY, label="aaaa")
    assert server.changed()
    assert [x.id for x in server.load()] == [a.id]
    assert not server.changed()
    # Same size, same second: the rename still gives a new inode.
    cli.update(lambda accs: [msgspec_replace(accs[0], label="bbbb")])
    assert server.changed()
    assert server.load()[0].label == "bbbb"
    path.unlink()
    assert server.changed()
    assert server.load() == []
    assert not server.changed()


def msgspec_replace(acc: Account, **kw: object) -> Account:
    import msgspec

    return msgspec.structs.replace(acc, **kw)


def test_own_writes_show_up_as_changes(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "accounts.json")
    store.load()
    store.add_api_key(KEY)
    assert store.changed()  # the gateway reloads what it wrote, so memory equals disk


# ---- masking and lookup ----------------------------------------------------------------------


def test_masking_and_display_name_never_show_secrets() -> None:
    a = Account(id="k1", kind="api_key", api_key=KEY, label="work")
    o = Account(id="o1", kind="oauth", refresh_token=RTOKEN, email="me@example.com", label="x")
    assert mask_secret(KEY) == "AIza...rstu"
    assert mask_secret("short-key") == "****"
    assert mask_secret("") == ""
    assert a.display_name() == "work"
    assert o.display_name() == "me@example.com"
    assert Account(id="z9", kind="api_key", api_key=KEY).display_name() == "z9"
    for acc, secret in ((a, KEY), (o, RTOKEN)):
        for text in (repr(acc), str(acc), repr([acc]), json.dumps(acc.masked())):
            assert secret not in text
            assert secret[:12] not in text
        assert acc.masked()["secret"] == mask_secret(secret)


def test_add_stats_keeps_last_error_short() -> None:
    a = Account(id="k1", kind="api_key", api_key=KEY)
    a.add_stats(3, 10, 20, 1, "boom\n" * 100)
    assert (a.requests, a.tokens_in, a.tokens_out, a.errors) == (3, 10, 20, 1)
    assert "\n" not in a.last_error
    assert len(a.last_error) <= 200


def test_find_account_by_id_label_email() -> None:
    accs = [
        Account(id="k1", kind="api_key", api_key="a", label="Work"),
        Account(id="k2", kind="api_key", api_key="b", email="me@example.com"),
        Account(id="k3", kind="api_key", api_key="c", label="dup"),
        Account(id="k4", kind="api_key", api_key="d", label="dup"),
    ]
    assert find_account(accs, "k2").id == "k2"
    assert find_account(accs, "work").id == "k1"
    assert find_account(accs, "ME@example.com").id == "k2"
    with pytest.raises(AccountStoreError, match="several"):
        find_account(accs, "dup")
    with pytest.raises(AccountStoreError, match="no account"):
        find_account(accs, "nope")


# ---- import formats --------------------------------------------------------------------------


def _jwt(claims: dict[str, object]) -> str:
    import base64

    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJSUzI1NiJ9.{body}.sig"


def test_import_formats() -> None:
    own = parse_import(VALID, "own.json")
    assert [(a.id, a.kind, a.api_key) for a in own] == [("a1", "api_key", KEY)]

    keys = parse_import(json.dumps([KEY, RTOKEN]).encode(), "list.json", now=5)
    assert [(a.kind, a.secret(), a.created) for a in keys] == [
        ("api_key", KEY, 5),
        ("oauth", RTOKEN, 5),
    ]

    objs = parse_import(
        json.dumps(
            {"accounts": [{"key": KEY, "label": "L"}, {"refresh_token": RTOKEN, "project": "p"}]}
        ).encode(),
        "objs.json",
    )
    assert (objs[0].label, objs[1].project) == ("L", "p")

    seed = parse_import(
        json.dumps(
            {
                "id": "not an id!",
                "email": "seed@example.com",
                "name": "Seed",
                "token": {"access_token": "ya29.x", "refresh_token": RTOKEN, "project_id": "pp"},
                "disabled": True,
                "disabled_reason": "invalid_grant",
            }
        ).encode(),
        "seed.json",
    )
    s = seed[0]
    assert (s.kind, s.email, s.label, s.project, s.enabled, s.disabled_reason, s.id) == (
        "oauth",
        "seed@example.com",
        "Seed",
        "pp",
        False,
        "invalid_grant",
        "",
    )

    creds = parse_import(
        json.dumps(
            {
                "access_token": "ya29.x",
                "refresh_token": RTOKEN,
                "token_type": "Bearer",
                "id_token": _jwt({"email": "cli@example.com"}),
                "expiry_date": 1,
            }
        ).encode(),
        "oauth_creds.json",
    )
    assert (creds[0].kind, creds[0].email) == ("oauth", "cli@example.com")

    text = parse_import(f"# my keys\n\n{KEY} personal key\n{KEY2}\n".encode(), "keys.txt")
    assert [(a.api_key, a.label) for a in text] == [(KEY, "personal key"), (KEY2, "")]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1]", "expected a key string"),
        (b'[{"label": "x"}]', "no api_key or refresh_token"),
        (b"\xff\xfe", "neither JSON nor UTF-8"),
        (b"5", "expected a list"),
    ],
)
def test_import_errors_are_clear(data: bytes, needle: str) -> None:
    with pytest.raises(AccountStoreError, match=needle):
        parse_import(data, "in.json")


def test_import_skips_present_accounts_and_renames_taken_ids(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "accounts.json")
    first = store.add_api_key(KEY)
    incoming = [
        Account(id=first.id, kind="api_key", api_key=KEY2),
        Account(id="x", kind="api_key", api_key=KEY),
    ]
    added, skipped = store.import_accounts(incoming)
    assert skipped == 1
    assert len(added) == 1 and added[0].id != first.id and added[0].api_key == KEY2
    assert len(store.load()) == 2


# ---- cross-process: locking and kill -9 ------------------------------------------------------

_WRITER = """
import contextlib, os, sys, time
from rawgate.accounts.store import AccountStore
store = AccountStore(sys.argv[1])
me, n, go = sys.argv[2], int(sys.argv[3]), sys.argv[4]
if len(sys.argv) > 5:  # the control experiment: no lock
    store._locked = contextlib.nullcontext
    store._sweep_tmp = lambda: None  # (it relies on the lock too)
def bump(accounts):
    for a in accounts:
        if a.id in (me, "shared"):
            a.requests += 1
print("ready", flush=True)
while not os.path.exists(go):  # start together, so the two writers really overlap
    time.sleep(0.001)
for _ in range(n):
    store.update(bump)
"""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _race(tmp_path: Path, n: int, *, lock: bool) -> dict[str, int]:
    store = AccountStore(tmp_path / "accounts.json")
    store.update(
        lambda _: [
            Account(id=i, kind="api_key", api_key=f"key-{i}-0123456789abcdef")
            for i in ("p1", "p2", "shared")
        ]
    )
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    go = tmp_path / "go"
    extra = [] if lock else ["nolock"]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(store.path), me, str(n), str(go), *extra],
            env=_child_env(),
            stdout=subprocess.PIPE,
        )
        for me in ("p1", "p2")
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        go.touch()
        for p in procs:
            assert p.wait(timeout=50) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
    return {a.id: a.requests for a in store.load()}


def test_two_processes_updating_lose_nothing(tmp_path: Path) -> None:
    n = 200
    assert _race(tmp_path, n, lock=True) == {"p1": n, "p2": n, "shared": 2 * n}


def test_control_without_the_lock_updates_are_lost(tmp_path: Path) -> None:
    # Proves the race above is real: the same two writers without the flock lose updates
    # (about half of them on this machine; zero losses would need 400 perfect alternations).
    counts = _race(tmp_path, 200, lock=False)
    assert counts["shared"] < 400


_KILLED = """
import sys
from rawgate.accounts.store import Account, AccountStore
store = AccountStore(sys.argv[1])
gen = int(sys.argv[2])
pad = "x" * 2000
print("ready", flush=True)
while True:
    gen += 1
    label = f"{gen}:{pad}"
    store.update(lambda _: [Account(id=f"a{i}", kind="api_key", api_key=f"key-{i}-abcdefghijkl",
                                    label=label) for i in range(500)])
"""


def test_kill_9_during_writes_leaves_old_or_new_file(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "accounts.json")
    store.update(lambda _: [Account(id="a0", kind="api_key", api_key="key-0-abcdefghijkl",
                                    label="0:")])  # fmt: skip
    script = tmp_path / "killed.py"
    script.write_text(_KILLED)
    rng = random.Random(1234)
    last_gen = 0
    kills = 0
    deadline = time.monotonic() + 4.0
    while kills < 15 and time.monotonic() < deadline:
        child = subprocess.Popen(
            [sys.executable, str(script), str(store.path), str(last_gen)],
            stdout=subprocess.PIPE,
            env=_child_env(),
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.0, 0.05))
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=10)
            if child.stdout is not None:
                child.stdout.close()
        kills += 1
        accounts = store.load()  # parses: never torn, never empty
        gens = {int(a.label.split(":")[0]) for a in accounts}
        assert len(gens) == 1, "a file mixing two versions"
        gen = gens.pop()
        assert gen >= last_gen
        assert len(accounts) == (1 if gen == 0 else 500)
        assert _mode(store.path) == 0o600
        last_gen = gen
    assert kills >= 3
    assert last_gen > 0  # the children did write
    store.update(lambda accounts: accounts)
    assert not list(tmp_path.glob(".accounts.json.*.tmp"))


# ---- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "rawgate-home"
    monkeypatch.setenv("RAWGATE_HOME", str(h))
    return h


def test_cli_add_list_disable_enable_remove(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["accounts", "add", "--api-key", KEY, "--label", "work"]) == 0
    out = capsys.readouterr().out
    assert "added account" in out and KEY not in out and mask_secret(KEY) in out
    acc_id = out.split()[2]
    assert main(["accounts", "add-oauth", "--refresh-token", RTOKEN, "--email", "me@x.io"]) == 0
    capsys.readouterr()

    assert main(["accounts", "list"]) == 0
    out = capsys.readouterr().out
    assert KEY not in out and RTOKEN not in out
    assert "work" in out and "me@x.io" in out and " ok" in out

    assert main(["accounts", "disable", "work", "--reason", "quota gone"]) == 0
    capsys.readouterr()
    assert main(["accounts", "list"]) == 0
    assert "disabled: quota gone" in capsys.readouterr().out

    assert main(["accounts", "list", "--json"]) == 0
    raw = capsys.readouterr().out
    doc = json.loads(raw)
    first = next(a for a in doc["accounts"] if a["id"] == acc_id)
    assert first["enabled"] is False and first["disabled_reason"] == "quota gone"
    assert first["secret"] == mask_secret(KEY) and KEY not in raw and RTOKEN not in raw

    assert main(["accounts", "enable", acc_id]) == 0
    assert main(["accounts", "remove", acc_id]) == 0
    capsys.readouterr()
    assert [a.kind for a in AccountStore(home / "accounts.json").load()] == ["oauth"]


def test_cli_errors_are_one_line_and_nonzero(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["accounts", "remove", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no account 'nope'" in err
    assert main(["accounts", "add", "--api-key", KEY]) == 0
    assert main(["accounts", "add", "--api-key", KEY]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already" in err and KEY not in err
    assert main(["accounts", "add", "--api-key", "  "]) == 1
    assert "empty" in capsys.readouterr().err
    assert main(["accounts", "import", str(home / "missing.json")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_reads_secret_from_stdin(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(KEY + "\n"))
    assert main(["accounts", "add", "--api-key", "-"]) == 0
    assert AccountStore(home / "accounts.json").load()[0].api_key == KEY


def test_cli_import(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "keys.txt"
    f.write_text(f"{KEY} one\n{KEY2} two\n")
    assert main(["accounts", "import", str(f)]) == 0
    out = capsys.readouterr().out
    assert "imported 2 account(s), skipped 0" in out and KEY not in out
    assert main(["accounts", "import", str(f)]) == 0
    assert "imported 0 account(s), skipped 2" in capsys.readouterr().out


def test_cli_corrupt_store_as_a_real_process(home: Path) -> None:
    home.mkdir()
    (home / "accounts.json").write_bytes(b'{"version": 1, "accounts": [')
    (home / "accounts.json").chmod(0o600)
    r = subprocess.run(
        [sys.executable, "-m", "rawgate", "accounts", "list"],
        capture_output=True,
        env={**_child_env(), "RAWGATE_HOME": str(home)},
        timeout=30,
    )
    assert r.returncode == 1
    assert r.stdout == b""
    assert r.stderr.count(b"\n") == 1 and b"not valid JSON" in r.stderr
    assert (home / "accounts.json").read_bytes() == b'{"version": 1, "accounts": ['


def test_cli_list_shows_shared_cooldowns(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rawgate.accounts.cooldowns import CooldownBoard
    from rawgate.accounts.scheduler import Cooldown

    assert main(["accounts", "add", "--api-key", KEY, "--label", "work"]) == 0
    acc_id = capsys.readouterr().out.split()[2]
    CooldownBoard(home / "cooldowns.json").publish(
        [Cooldown(acc_id, "gemini-2.5-pro", time.time() + 42, "rate_limited")], time.time()
    )
    assert main(["accounts", "list"]) == 0
    out = capsys.readouterr().out
    assert "cooling: gemini-2.5-pro 4" in out
    assert main(["accounts", "enable", acc_id]) == 0  # a human says it is fine: forget it
    capsys.readouterr()
    assert main(["accounts", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accounts"][0]["cooldowns"] == []
