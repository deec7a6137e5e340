"""lean_redis.py on a real Redis: replies always match their call, also when calls are
cancelled at random points under load (a cancelled call's connection is closed, never reused);
AUTH and SELECT from the URL; the backend on the lean path and off it."""

from __future__ import annotations

import random
import secrets
from pathlib import Path

import anyio
import coredis
import pytest

from rawgate.config import build_config
from rawgate.state.lean_redis import LeanPool, lean_supported
from rawgate.state.redis_backend import RedisState
from rawgate.state.resp import ReplyError
from rawgate.state.store import open_state
from tests.helpers_redis import RedisServer

pytestmark = pytest.mark.anyio

TASKS = 16
CALLS = 120
MAX_CONNECTIONS = 4
# Scripts echo their argument; some replies are large, so they arrive in several reads and a
# cancellation lands between them too.
ECHO = "return ARGV[1]"


async def test_cancelled_calls_never_mix_up_replies(redis_server: RedisServer) -> None:
    pool = LeanPool(redis_server.url, MAX_CONNECTIONS)
    rng = random.Random(16)
    done = cancelled = 0

    async def worker(t: int) -> None:
        nonlocal done, cancelled
        for i in range(CALLS):
            tok = f"{t}:{i}:" + "x" * rng.choice([0, 10, 3000, 70_000])
            # None = no deadline; the others cancel before the write, while waiting for a
            # connection, between the write and the reply, or in the middle of a long reply.
            limit = rng.choice([None, None, 0.0, 0.00002, 0.0001, 0.0003, 0.001])
            with anyio.CancelScope(deadline=anyio.current_time() + limit if limit is not None
                                   else float("inf")) as scope:  # fmt: skip
                out = await pool.call([("EVAL", ECHO, 0, tok), ("EVAL", ECHO, 0, tok + "b")])
            if scope.cancelled_caught:
                cancelled += 1
                continue
            assert out == [tok.encode(), (tok + "b").encode()], (t, i)
            done += 1

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for t in range(TASKS):
                tg.start_soon(worker, t)
    print(f"\n{done} calls answered, {cancelled} cancelled, {pool.opened} connections opened")
    assert done > 100 and cancelled > 50
    # A cancelled call after its write closed its connection (else the replies would mix up
    # above); connections are bounded however many calls were cancelled.
    assert MAX_CONNECTIONS < pool.opened <= MAX_CONNECTIONS + cancelled
    assert len(pool._idle) <= MAX_CONNECTIONS
    assert await pool.call([("PING",)]) == ["PONG"]
    await pool.aclose()


async def test_auth_and_select_from_the_url(redis_server: RedisServer) -> None:
    user, pw, db = f"lean{secrets.token_hex(3)}", secrets.token_hex(8), 3
    admin = coredis.Redis.from_url(redis_server.url)
    root = LeanPool(redis_server.url, 1)
    async with admin:
        assert await root.call([("ACL", "SETUSER", user, "on", f">{pw}", "~*", "&*", "+@all")]) \
            == ["OK"]  # fmt: skip
        url = f"redis://{user}:{pw}@127.0.0.1:{redis_server.port}/{db}"
        pool = LeanPool(url, 2)
        key = f"lean:{secrets.token_hex(4)}"
        assert await pool.call([("SET", key, "v"), ("ACL", "WHOAMI")]) == ["OK", user.encode()]
        assert await admin.get(key) is None  # not in db 0 ...
        in_db = coredis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{db}")
        async with in_db:
            assert await in_db.get(key) == b"v"  # ... in db 3
        r = (await pool.call([("EVALSHA", "0" * 40, 0)]))[0]
        assert isinstance(r, ReplyError) and r.code == "NOSCRIPT"
        assert await pool.call([("PING",)]) == ["PONG"]  # an error reply leaves it in step
        await pool.aclose()
        bad = LeanPool(f"redis://{user}:wrong-{pw}@127.0.0.1:{redis_server.port}/0", 1)
        with pytest.raises(ConnectionError) as e:
            await bad.call([("PING",)])
        assert "WRONGPASS" in str(e.value) and pw not in str(e.value)
        await root.call([("ACL", "DELUSER", user)])
        await root.aclose()
    assert lean_supported("redis://h/0") and lean_supported("unix:///tmp/r.sock")
    assert not lean_supported("rediss://h/0")


async def test_an_idle_connection_closed_by_a_restart_is_not_used() -> None:
    srv = RedisServer().start()
    try:
        pool = LeanPool(srv.url, 4)
        assert await pool.call([("PING",)]) == ["PONG"]
        assert pool.opened == 1 and len(pool._idle) == 1
        srv.kill()
        srv.start()  # the same port; nothing called in between
        await anyio.sleep(0.05)  # (the loop reads the old connection's end meanwhile)
        assert await pool.call([("PING",)]) == ["PONG"]
        assert pool.opened == 2 and len(pool._idle) == 1
        await pool.aclose()
    finally:
        srv.stop()


@pytest.mark.parametrize("lean", [True, False])
async def test_backend_on_and_off_the_lean_path(
    lean: bool, redis_server: RedisServer, tmp_path: Path
) -> None:
    cfg = build_config({"state": {"backend": "redis", "redis_url": redis_server.url,
                                  "key_prefix": f"lean{secrets.token_hex(3)}:",
                                  "redis_timeout_ms": 3000, "redis_lean_path": lean}},
                       {}, {})  # fmt: skip
    async with open_state(cfg, tmp_path) as st:
        assert isinstance(st, RedisState) and (st._lean is not None) == lean
        rec, _ = await st.add_key("k", rpm=2)
        assert (await st.check_key(rec, "m")).allowed
        await st.client.script_flush()  # NOSCRIPT: loaded and run again, not degraded
        assert (await st.check_key(rec, "m")).allowed
        d = await st.check_key(rec, "m")
        assert (d.allowed, d.reason) == (False, "rpm") and not st.degraded
        await st.record_usage("k", "acc1", "m", 4, 5)
        await st.push_usage()
        assert (await st.usage("key", "k", 3600))["k"][0].tokens_out == 5
        if lean:
            assert st._lean is not None and st._lean.opened >= 1
