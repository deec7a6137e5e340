"""The Redis/Valkey state backend (coredis: anyio-native, RESP3, multiplexed connections).

Key layout (P = `[state] key_prefix`; the {braces} are the cluster hash tag, so every script
touches exactly one key, hence one slot):
    P{cd}                 hash "account\\x1fmodel" -> "until_ms\\x1freason"  every live cooldown
    P{keys}               hash name -> KeyRecord JSON;  P{keys}:salt  the per-install salt
    P{k:NAME}:lim         hash m r t dd d: minute, requests and tokens in it, day, day tokens
    P{u}:HOUR_MS          hash "kind\\x1fname\\x1f(r|i|o)" -> count   (TTL [state] usage_days)
    P{r:ID}               stored Response (JSON [input, output]), PX = response_store_max_age_s
    P{a:ACCOUNT}:tok      "expires_ms\\x1ftoken", PXAT expires;  P{a:ACCOUNT}:lock  owner, PX ttl
    P{accts}              hash id -> Account JSON;  P{accts}:v  its version (INCR per write,
                          never deleted: missing = the server lost its data)
    P{accts}:n            hash "id\\x1f(r|i|o|e)" -> counters the servers add (HINCRBY, batched),
                          "id\\x1fl" -> last error; added to the JSON's counters when read
    channel P events      "cd\\x1faccount\\x1fmodel\\x1funtil_ms\\x1freason"
                          | "clr\\x1faccount" | "keys" | "accts"

Invariants:
- Cooldowns: EXTEND only ever moves an end later (it compares with the stored end and does
  nothing otherwise) and PUBLISHes what it stored; every instance's subscriber folds events
  into its mirror with the same rule. After every (re)subscription the mirror is rebuilt from
  P{cd} (after pushing what this instance learned while degraded), so a missed event costs
  nothing. Ends come from the server's TIME: one clock decides "later".
- Limits: CHECK reads and counts in one script (no check-then-record race), RECORD adds tokens.
  Window boundaries come from the server's TIME.
- Every call runs under `[state] redis_timeout_ms` (fail_after around the coredis call; the
  connect timeout is the same). A failure flips `health.degraded`, and until the supervisor
  gets a PING and a subscription through again, calls skip Redis at once (no timeout paid per
  request): cooldowns and tokens from the mirror, usage buffered (bounded) and pushed on
  recovery, limits per `limits_fail`. Responses: each instance keeps those it stored (bounded
  like the local store) and reads them first; the ones stored while degraded go to Redis after
  the recovery (in the background: they may be large).
- Recovery pushes from buffers taken whole, then, once healthy, once more: what requests
  learned during the pushes (still degraded) is pushed too, never cleared with them.
- A server back without the key table's salt (set once, never deleted) or without the
  accounts' version (INCRed by every write, never deleted) lost its data: the first instance
  back writes its key table (and salt), the accounts list it last read and its live cooldowns
  back (one script per slot, each a no-op when its key is there). The accounts listeners are
  told only after that; a read finding no version while this instance holds a list restores
  it first, so an empty list from a server that lost it is never installed.
- coredis retries are off (NoRetryPolicy): one attempt per call, the backoff is ours.
- Accounts: every write is a version compare-and-set that PUBLISHes "accts"; the accounts
  listeners hear it, and once more after every resync (an event missed while away). Counters
  the servers add go to P{accts}:n by one script per flush (no version bump, no event): they
  are added onto the JSON's counters when read for a listing and never folded into the JSON
  (a read-modify-write reads without them), so no increment is counted twice or lost.
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import anyio
import anyio.lowlevel
import coredis
import coredis.exceptions
import coredis.retry
import msgspec
import orjson
from coredis.connection import TCPLocation

from rawgate.accounts.store import (
    ID_RE,
    Account,
    AccountStoreError,
    find_secret,
    new_account_id,
    validate_accounts,
)
from rawgate.config import Config
from rawgate.state.keys import (
    KeyRecord,
    KeyStoreError,
    add_record,
    decode_record,
    encode_record,
    find,
    new_salt,
    rotate_record,
)
from rawgate.state.lean_redis import LeanPool, lean_supported
from rawgate.state.limiter import DAY_MS, HOUR_MS, Decision, Limits, Usage
from rawgate.state.resp import ReplyError
from rawgate.state.response_store import ResponseStore
from rawgate.state.store import AccountStats, Cooldown, Health, State, StateUnavailable

__all__ = ["RedisState"]

log = logging.getLogger("rawgate.state.store")

SEP = "\x1f"
# Usage counts buffered while Redis is away: distinct (hour, kind, name) rows, then dropped.
MAX_PENDING_USAGE_ROWS = 10_000
MAX_COOLDOWN_FIELDS = 4096
# Cooldowns pushed per round trip after an outage.
EXTEND_BATCH = 256
# The subscriber PINGs a silent connection after this long, so a dead one is noticed.
PUBSUB_IDLE_S = 5.0
# Optimistic writes of the accounts list: tries before giving up (with jittered backoff).
ACCOUNTS_CAS_ATTEMPTS = 50

# KEYS[1] = P{cd}; ARGV = field, duration_ms, reason, channel, max_fields
_EXTEND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local untilms = now + math.floor(tonumber(ARGV[2]))
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local old = tonumber(string.sub(cur, 1, string.find(cur, '\\31', 1, true) - 1))
  if old >= untilms then return {0, old} end
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', untilms) .. '\\31' .. ARGV[3])
local all = redis.call('HGETALL', KEYS[1])
local latest, n = untilms, 0
for i = 1, #all, 2 do
  local e = tonumber(string.sub(all[i + 1], 1, string.find(all[i + 1], '\\31', 1, true) - 1))
  if e <= now then redis.call('HDEL', KEYS[1], all[i]) else
    n = n + 1
    if e > latest then latest = e end
  end
end
redis.call('PEXPIREAT', KEYS[1], string.format('%d', latest))
redis.call('PUBLISH', ARGV[4], 'cd\\31' .. ARGV[1] .. '\\31' .. string.format('%d', untilms)
  .. '\\31' .. ARGV[3])
return {1, untilms}
"""

# KEYS[1] = P{cd}; ARGV = "account\x1f", channel, account
_CLEAR = """
local all = redis.call('HKEYS', KEYS[1])
for _, f in ipairs(all) do
  if string.sub(f, 1, #ARGV[1]) == ARGV[1] then redis.call('HDEL', KEYS[1], f) end
end
redis.call('PUBLISH', ARGV[2], 'clr\\31' .. ARGV[3])
return 1
"""

_WINDOWS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute = now - now % 60000
local day = now - now % 86400000
local v = redis.call('HMGET', KEYS[1], 'm', 'r', 't', 'dd', 'd')
local r, tk, d = 0, 0, 0
if tonumber(v[1]) == minute then r = tonumber(v[2]) or 0; tk = tonumber(v[3]) or 0 end
if tonumber(v[4]) == day then d = tonumber(v[5]) or 0 end
"""

_STORE = """
redis.call('HSET', KEYS[1], 'm', string.format('%d', minute), 'r', r, 't', tk,
  'dd', string.format('%d', day), 'd', d)
redis.call('PEXPIRE', KEYS[1], 86400000 + 60000)
"""

# KEYS[1] = P{k:NAME}:lim; ARGV = rpm, tpm, daily_tokens (0 = none), tokens (this instance's
# answers of the key not flushed yet: added first, as RECORD would have)
# -> {allowed 0|1, retry_after_ms, reason}
_CHECK = (
    _WINDOWS
    + """
local rpm, tpm, daily = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local add = tonumber(ARGV[4] or '0')
if add > 0 then
  tk = tk + add; d = d + add
  if (rpm > 0 and r >= rpm) or (tpm > 0 and tk >= tpm) or (daily > 0 and d >= daily) then
"""
    + _STORE
    + """
  end
end
if rpm > 0 and r >= rpm then return {0, minute + 60000 - now, 'rpm'} end
if tpm > 0 and tk >= tpm then return {0, minute + 60000 - now, 'tpm'} end
if daily > 0 and d >= daily then return {0, day + 86400000 - now, 'daily_tokens'} end
r = r + 1
"""
    + _STORE
    + "return {1, 0, ''}\n"
)

# KEYS[1] = P{k:NAME}:lim; ARGV = tokens
_RECORD = (
    _WINDOWS
    + "tk = tk + tonumber(ARGV[1]); d = d + tonumber(ARGV[1])\n"
    + _STORE
    + "return 1\n"
)

# KEYS[1] = P{u}:HOUR; ARGV = ttl_ms, field, n, field, n, ...
_USAGE = """
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1] = lock; ARGV = owner
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS[1] = P{keys}; ARGV = field, expected old value ('' = absent), new value ('' = delete),
# channel. Compare-and-set so two admins' edits of one key never undo each other silently.
_CAS = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
redis.call('PUBLISH', ARGV[4], 'keys')
return 1
"""

# KEYS = P{keys}, P{keys}:salt; ARGV = salt, channel, name1, json1, name2, json2, ...
# The salt is set once (SET NX) and never deleted: its absence after a reconnection means the
# server lost its data (restarted without persistence, FLUSHALL, failover to an empty replica).
# Then the key table an instance mirrors is put back, with its salt (the records' hashes use it).
_RESTORE_KEYS = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
for i = 3, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PUBLISH', ARGV[2], 'keys')
return 1
"""

# KEYS = P{accts}, P{accts}:v; ARGV = version, channel, id1, json1, id2, json2, ...
# Every write of the list INCRs its version and nothing deletes it: its absence while an
# instance holds a list it read (hence at a version > 0) means the server lost its data. The
# first instance to see it puts its list back (SET-if-absent: the others find the version and
# read what it wrote); a separate script from _RESTORE_KEYS (P{accts} is another cluster slot).
_RESTORE_ACCTS = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[2], 'accts')
return 1
"""

# KEYS = P{accts}, P{accts}:v, P{accts}:n; ARGV[1] = '1' to read the counters too.
# -> {version, {id, json, ...}, {field, value, ...}}: one atomic read. A script, not a MULTI
# pipeline: a transaction holds its connection until EXEC's reply, so a reload overlapping
# any other call (every instance re-reads on each "accts" event) opened one more connection.
_READ_ACCTS = """
local n = {}
if ARGV[1] == '1' then n = redis.call('HGETALL', KEYS[3]) end
return {redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1]), n}
"""

# KEYS = P{accts}, P{accts}:v, P{accts}:n; ARGV = expected version, channel, id1, json1, ...
# The counters of accounts no longer listed go with them.
_REPLACE_ACCTS = """
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for _, f in ipairs(redis.call('HKEYS', KEYS[3])) do
  local id = string.sub(f, 1, string.find(f, '\\31', 1, true) - 1)
  if redis.call('HEXISTS', KEYS[1], id) == 0 then redis.call('HDEL', KEYS[3], f) end
end
redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[2], 'accts')
return 1
"""

# KEYS[1] = P{accts}:n; ARGV = field, value, ... (a field ending in 'l' is set, others added)
_ACCT_STATS = """
for i = 1, #ARGV, 2 do
  if string.sub(ARGV[i], -1) == 'l' then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  else redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""

_FAILED: Any = object()
_account_dec = msgspec.json.Decoder(Account)
_account_enc = msgspec.json.Encoder()


def _leaf(e: BaseException) -> Exception:
    """What the one warning of an episode names: the first real error inside task-group
    wrappers (coredis' pubsub raises "unhandled errors in a TaskGroup"), not the wrapper."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e if isinstance(e, Exception) else RuntimeError(str(e))


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _add_counters(accounts: list[Account], stats: dict[Any, Any]) -> None:
    """The servers' counters (P{accts}:n fields) onto the accounts read from the JSON."""
    by_id = {a.id: a for a in accounts}
    for f, v in stats.items():
        acc_id, _, letter = _text(f).rpartition(SEP)
        a = by_id.get(acc_id)
        if a is None:
            continue
        if letter == "l":
            a.last_error = _text(v)
        elif letter in _COUNTER_FIELDS:
            setattr(a, _COUNTER_FIELDS[letter], getattr(a, _COUNTER_FIELDS[letter]) + int(v))


_COUNTER_FIELDS = {"r": "requests", "i": "tokens_in", "o": "tokens_out", "e": "errors"}


class RedisState(State):
    backend = "redis"

    def __init__(self, cfg: Config, home: Path) -> None:
        super().__init__()
        st = cfg.state
        self.cfg = cfg
        self.home = Path(home)
        self.timeout_s = st.redis_timeout_ms / 1000
        self.health = Health("redis state store", st.redis_backoff_max_s)
        common: dict[str, Any] = {
            "stream_timeout": self.timeout_s,
            "connect_timeout": self.timeout_s,
            "pool_timeout": self.timeout_s,
            "max_connections": st.redis_max_connections,
            "retry_policy": coredis.retry.NoRetryPolicy(),
        }
        self.cluster = st.redis_cluster
        self.client: Any
        if self.cluster:
            # (RedisCluster.from_url warns about its own startup-node dicts in coredis 6.9.)
            # non_atomic_cross_slot=False: a command across slots is an error, never split
            # silently; the key layout guarantees none is sent (tests run on a real cluster).
            u = urlsplit(st.redis_url)
            self.client = coredis.RedisCluster(
                startup_nodes=[TCPLocation(u.hostname or "127.0.0.1", u.port or 6379)],
                username=unquote(u.username) if u.username else None,
                password=unquote(u.password) if u.password else None,
                ssl=u.scheme == "rediss",
                non_atomic_cross_slot=False,
                **common,
            )
        else:
            self.client = coredis.Redis.from_url(st.redis_url, client_name="rawgate", **common)
        # The hot path's EVALSHA calls on connections of their own (lean_redis.py), or None.
        self._lean = (
            LeanPool(st.redis_url, st.redis_max_connections)
            if st.redis_lean_path and not self.cluster and lean_supported(st.redis_url)
            else None
        )
        p = st.key_prefix
        self.k_cd = f"{p}{{cd}}"
        self.k_keys = f"{p}{{keys}}"
        self.k_salt = f"{p}{{keys}}:salt"
        self.k_accts = f"{p}{{accts}}"
        self.k_accts_v = f"{p}{{accts}}:v"
        self.k_accts_n = f"{p}{{accts}}:n"
        self.channel = f"{p}events"
        self._p = p
        self._extend = self.client.register_script(_EXTEND)
        self._clear = self.client.register_script(_CLEAR)
        self._check = self.client.register_script(_CHECK)
        self._record = self.client.register_script(_RECORD)
        self._release = self.client.register_script(_RELEASE)
        self._usage = self.client.register_script(_USAGE)
        self._cas = self.client.register_script(_CAS)
        self._replace_accts = self.client.register_script(_REPLACE_ACCTS)
        self._acct_stats = self.client.register_script(_ACCT_STATS)
        self._restore_keys = self.client.register_script(_RESTORE_KEYS)
        self._restore_accts = self.client.register_script(_RESTORE_ACCTS)
        self._read_accts = self.client.register_script(_READ_ACCTS)
        # The accounts list as this instance last read it from Redis (with the servers'
        # counters added: the server losing its data loses P{accts}:n too), and its version:
        # what _restore_accounts puts back. Empty until a read found a list.
        self._held_accounts: tuple[int, list[Account]] = (0, [])
        self._accounts_listeners: list[Callable[[], None]] = []
        self._cooldowns: dict[tuple[str, str], Cooldown] = {}
        self._pending_cd: dict[tuple[str, str], Cooldown] = {}
        self._pending_clear: set[str] = set()
        self._during_resync: list[Cooldown] | None = None
        self._trouble = anyio.Event()  # a request-path call failed: the watchdog probes
        self._keys_changed = anyio.Event()  # a "keys" event: the reloader re-reads the table
        self._responses_back = anyio.Event()  # recovered with Responses stored while away
        self._listeners: list[Callable[[Cooldown], None]] = []
        self._salt = ""
        self._by_hash: dict[str, KeyRecord] = {}
        self._pending_usage: dict[tuple[int, str], int] = {}
        self._pending_tokens: dict[str, int] = {}
        self._flusher_running = False
        # Answers whose usage write failed or timed out and was kept for a retry: a write that
        # timed out on a hung server may have run anyway, so at most these count twice.
        self.usage_retried = 0
        self._local_tokens: dict[str, tuple[str, float]] = {}
        lim = cfg.limits
        # Every Response this instance stored, bounded like the local backend's store: read
        # first, so continuing on the same instance costs no round trip and still works while
        # Redis is away. `_unsent`: the ids stored while degraded, pushed after the recovery.
        self._responses = ResponseStore(
            lim.response_store_max_count, lim.response_store_max_age_s,
            lim.response_store_max_bytes,
        )  # fmt: skip
        self._unsent: dict[str, None] = {}
        self._ready = anyio.Event()
        # Set by the supervisor after each successful (re)sync; tests wait on it.
        self.synced = 0

    # ---- plumbing ----

    async def _call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """fn() under the timeout; _FAILED (never an exception) when Redis does not answer."""
        if self.health.degraded:
            return _FAILED
        try:
            with anyio.fail_after(self.timeout_s):
                return await fn()
        except TimeoutError:
            self.health.failed(TimeoutError(f"no answer within {self.timeout_s * 1000:g} ms"))
        except (OSError, coredis.exceptions.RedisError) as e:
            self.health.failed(e)
        except Exception as e:  # a coredis internal (ExceptionGroup ...): still not the caller's
            log.debug("redis call failed", exc_info=True)
            self.health.failed(_leaf(e))
        self._trouble.set()
        return _FAILED

    @contextlib.asynccontextmanager
    async def _lean_open(self) -> AsyncIterator[None]:
        """The lean path's connections live as long as the client's."""
        try:
            yield
        finally:
            if self._lean is not None:
                await self._lean.aclose()

    async def _admin(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """For the CLI: the store is required, a failure is one clear line."""
        try:
            with anyio.fail_after(max(self.timeout_s, 2.0)):
                return await fn()
        except (TimeoutError, OSError, coredis.exceptions.RedisError) as e:
            raise StateUnavailable(
                f"Redis ([state] redis_url) does not answer: {type(e).__name__}: {str(e)[:200]}"
            ) from None

    async def run(
        self, *, task_status: Any = anyio.TASK_STATUS_IGNORED, background: bool = True
    ) -> None:
        async with self.client, self._lean_open():
            if not background:
                task_status.started()
                await anyio.sleep_forever()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._supervise)
                if self.cfg.state.usage_flush_ms > 0:
                    tg.start_soon(self._usage_flusher)
                # Serve at once: with Redis down at start, requests run degraded meanwhile.
                with anyio.move_on_after(self.timeout_s * 4):
                    await self._ready.wait()
                task_status.started()

    async def _supervise(self) -> None:
        """Keep a subscription open; after each (re)subscription push and resync; back off."""
        while True:
            try:
                async with self.client.pubsub(
                    channels=[self.channel],
                    ignore_subscribe_messages=True,
                    retry_policy=coredis.retry.NoRetryPolicy(),
                    subscription_timeout=max(self.timeout_s, 1.0),
                    max_idle_seconds=PUBSUB_IDLE_S,
                ) as ps:
                    await self._resync()
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._watchdog)
                        tg.start_soon(self._keys_reloader)
                        tg.start_soon(self._responses_pusher)
                        async for msg in ps:
                            self._on_message(_text(msg["data"]))
                raise ConnectionError("subscription ended")
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt | SystemExit):
                    raise
                # Shutting down? coredis' pubsub cleanup can raise ClosedResourceError inside
                # a group while we are cancelled; the cancellation surfaces at this checkpoint.
                await anyio.lowlevel.checkpoint()
                self.health.failed(_leaf(e))
            self._ready.set()
            await anyio.sleep(self.health.next_delay())

    async def _watchdog(self) -> None:
        """While subscribed: a request-path failure marked us degraded; probe until back."""
        while True:
            await self._trouble.wait()
            self._trouble = anyio.Event()
            while self.health.degraded:
                await anyio.sleep(self.health.next_delay())
                try:
                    with anyio.fail_after(self.timeout_s):
                        await self.client.ping()
                    await self._resync()
                except (TimeoutError, OSError, coredis.exceptions.RedisError):
                    continue

    async def _responses_pusher(self) -> None:
        """After each recovery: the Responses stored while degraded go to Redis."""
        while True:
            await self._responses_back.wait()
            self._responses_back = anyio.Event()
            await self._push_responses()

    async def _push_responses(self) -> None:
        """Oldest first, one call each with the TTL they have left, so a previous_response_id
        naming one continues on any instance from now on. Off the recovery itself (they may
        be many and large); a failure stops it, the rest wait for the next recovery."""
        max_age_s = self.cfg.limits.response_store_max_age_s
        for rid, age_s, inputs, outputs in self._responses.live():
            if rid not in self._unsent:
                continue
            ttl_ms = int((max_age_s - age_s) * 1000)
            if ttl_ms > 0:
                put = partial(self.client.set, f"{self._p}{{r:{rid}}}",
                              orjson.dumps([inputs, outputs]), px=ttl_ms)  # fmt: skip
                if await self._call(put) is _FAILED:
                    return
            self._unsent.pop(rid, None)
        # Ids no longer held (evicted or expired while Redis was away) cannot be pushed; an id
        # added during the pushes (a new failure) stays for the next recovery.
        held = {rid for rid, _, _, _ in self._responses.live()}
        for rid in [r for r in self._unsent if r not in held]:
            del self._unsent[rid]

    async def _keys_reloader(self) -> None:
        """A key was added, changed or removed somewhere: re-read the table (one HGETALL)."""
        while True:
            await self._keys_changed.wait()
            self._keys_changed = anyio.Event()
            await self._call(self._load_keys)

    async def _resync(self) -> None:
        """Push what was learned while away, rebuild the mirrors, then declare health."""
        with anyio.fail_after(max(self.timeout_s * 8, 2.0)):
            if await self._restore_lost():
                # The cooldowns went with the rest: put back every live one this instance
                # knows (pub/sub gave it everyone's); EXTEND keeps the later end of any race.
                await self._extend_many([c for k, c in self._cooldowns.items()
                                         if k not in self._pending_cd])  # fmt: skip
            await self._push_pending()
            # Events folded while HGETALL is in flight may postdate its answer (the watchdog
            # resyncs while the subscriber runs): they are kept aside and folded in again.
            self._during_resync = []
            try:
                raw = await self.client.hgetall(self.k_cd)
            except BaseException:
                self._during_resync = None
                raise
            mirror: dict[tuple[str, str], Cooldown] = {}
            for f, v in raw.items():
                acct, _, model = _text(f).partition(SEP)
                until_ms, _, reason = _text(v).partition(SEP)
                mirror[(acct, model)] = Cooldown(acct, model, int(until_ms) / 1000, reason)
            learned = [c for k, c in mirror.items() if (old := self._cooldowns.get(k)) is None
                       or c.until > old.until]  # fmt: skip
            self._cooldowns = mirror
            late, self._during_resync = self._during_resync, None
            for c in late:
                self._fold(c)
            await self._load_keys()
        self.health.succeeded()
        # Requests answered during the pushes above were still degraded: what they learned
        # went to fresh buffers; from here on nothing more is buffered, so one more push
        # empties them (else they would wait for the next outage).
        if self._pending_clear or self._pending_cd or self._pending_usage or self._pending_tokens:
            await self._call(self._push_pending)
        if self._unsent:
            self._responses_back.set()
        self.synced += 1
        self._ready.set()
        for c in learned:
            self._notify(c)
        # A change of the accounts list may have been published while we were away.
        self._accounts_changed()

    def _accounts_changed(self) -> None:
        for fn in self._accounts_listeners:
            try:
                fn()
            except Exception:
                log.exception("accounts listener failed")

    async def _push_pending(self) -> None:
        """Push what was learned while degraded: clears, cooldowns, then usage. Each buffer is
        taken whole first, so what arrives during the pushes lands in a fresh one instead of
        being cleared with the pushed entries; what did not get through goes back."""
        clears, self._pending_clear = self._pending_clear, set()
        cds, self._pending_cd = self._pending_cd, {}
        try:
            for account in list(clears):
                await self._clear(keys=[self.k_cd], args=[account + SEP, self.channel, account])
                clears.discard(account)
            await self._extend_many(list(cds.values()))
            cds.clear()
        finally:
            self._pending_clear |= clears
            for k, c in cds.items():
                old = self._pending_cd.get(k)
                if old is None or old.until < c.until:
                    self._pending_cd[k] = c
        await self._flush_usage()

    async def _restore_lost(self) -> bool:
        """True when Redis came back without its data and this instance put back what it
        mirrors (the key table with its salt, the accounts list; the caller adds the
        cooldowns). The first instance to reconnect does it; the others find the salt and the
        accounts' version there and keep what they read. Without it, every client key would be
        unknown at once (and with `[auth] mode = "auto"` on loopback, no key at all turns auth
        off), and every instance would re-read an empty accounts list: 503s for everyone."""
        keys = False
        if self._salt:
            args: list[Any] = [self._salt, self.channel]
            for rec in self._by_hash.values():
                args += [rec.name, encode_record(rec)]
            keys = int(await self._restore_keys(keys=[self.k_keys, self.k_salt], args=args)) == 1
        accounts = await self._restore_accounts()
        if not (keys or accounts):
            return False
        log.warning(
            "%s came back without its data: restored %d client keys, %d accounts and the live"
            " cooldowns from this instance (usage history, limit windows, stored Responses and"
            " OAuth tokens held there are gone)", self.health.name,
            len(self._by_hash) if keys else 0, len(self._held_accounts[1]) if accounts else 0,
        )  # fmt: skip
        return True

    async def _restore_accounts(self) -> bool:
        """Put the accounts list this instance holds back if the server lost it (_RESTORE_ACCTS);
        True when this call did."""
        version, held = self._held_accounts
        if not held:
            return False
        args: list[Any] = [version, self.channel]
        for a in held:
            args += [a.id, _account_enc.encode(a)]
        return int(await self._restore_accts(keys=[self.k_accts, self.k_accts_v], args=args)) == 1

    def _on_message(self, data: str) -> None:
        parts = data.split(SEP)
        if parts[0] == "cd" and len(parts) >= 5:
            c = Cooldown(parts[1], parts[2], int(parts[3]) / 1000, SEP.join(parts[4:]))
            self._fold(c)
        elif parts[0] == "clr" and len(parts) == 2:
            for k in [k for k in self._cooldowns if k[0] == parts[1]]:
                del self._cooldowns[k]
            self._notify(Cooldown(parts[1], "", 0.0, "cleared"))
        elif parts[0] == "keys":
            self._keys_changed.set()  # reloaded by _keys_reloader, off the subscriber loop
        elif parts[0] == "accts":
            self._accounts_changed()

    def _fold(self, c: Cooldown) -> bool:
        if self._during_resync is not None:
            self._during_resync.append(c)
        k = (c.account, c.model)
        old = self._cooldowns.get(k)
        if old is not None and old.until >= c.until:
            return False
        self._cooldowns[k] = c
        if len(self._cooldowns) > MAX_COOLDOWN_FIELDS:
            now = time.time()
            self._cooldowns = {k: v for k, v in self._cooldowns.items() if v.until > now}
        self._notify(c)
        return True

    def _notify(self, c: Cooldown) -> None:
        for fn in self._listeners:
            try:
                fn(c)
            except Exception:
                log.exception("cooldown listener failed")

    # ---- cooldowns ----

    async def _extend_raw(self, account: str, model: str, seconds: float, reason: str) -> Any:
        return await self._extend(
            keys=[self.k_cd],
            args=[f"{account}{SEP}{model}", int(seconds * 1000), reason[:200], self.channel,
                  MAX_COOLDOWN_FIELDS],
        )  # fmt: skip

    async def _extend_many(self, cooldowns: list[Cooldown]) -> None:
        """The live ones of `cooldowns` in few round trips (a recovery may push thousands, and
        runs under one deadline): the first through the Script object, which loads the script
        into a server that just restarted, the rest pipelined EXTEND_BATCH at a time."""
        now = time.time()
        live = [c for c in cooldowns if c.until > now]
        if not live:
            return
        first = live[0]
        await self._extend_raw(first.account, first.model, first.until - now, first.reason)
        for i in range(1, len(live), EXTEND_BATCH):
            await self._evalsha_many([
                (self._extend, self.k_cd, (f"{c.account}{SEP}{c.model}",
                 int((c.until - now) * 1000), c.reason[:200], self.channel, MAX_COOLDOWN_FIELDS))
                for c in live[i : i + EXTEND_BATCH]
            ])  # fmt: skip

    async def set_cooldown(self, account: str, model: str, seconds: float, reason: str) -> float:
        seconds = max(0.0, seconds)
        local = Cooldown(account, model, time.time() + seconds, reason)
        res = await self._call(lambda: self._extend_raw(account, model, seconds, reason))
        if res is _FAILED:
            self._fold(local)
            old = self._pending_cd.get((account, model))
            if old is None or old.until < local.until:
                self._pending_cd[(account, model)] = local
            return self._cooldowns[(account, model)].until
        # Our own event comes back through the subscriber too; fold now so this instance
        # does not wait for it.
        self._fold(Cooldown(account, model, int(res[1]) / 1000, reason))
        return self._cooldowns[(account, model)].until

    async def clear_cooldowns(self, account: str) -> None:
        for k in [k for k in self._cooldowns if k[0] == account]:
            del self._cooldowns[k]
        for k in [k for k in self._pending_cd if k[0] == account]:
            del self._pending_cd[k]
        res = await self._call(
            lambda: self._clear(keys=[self.k_cd], args=[account + SEP, self.channel, account])
        )
        if res is _FAILED:  # cleared in Redis on recovery, before the mirror is rebuilt from it
            self._pending_clear.add(account)
        self._notify(Cooldown(account, "", 0.0, "cleared"))

    # ---- keys ----

    async def _load_keys(self) -> None:
        salt = await self.client.get(self.k_salt)
        raw = await self.client.hgetall(self.k_keys)
        self._salt = _text(salt) if salt else ""
        recs = [decode_record(v if isinstance(v, bytes) else v.encode()) for v in raw.values()]
        self._by_hash = {r.hash: r for r in recs}

    async def refresh_keys(self) -> bool:
        """Re-read the key table now (it also follows every change by itself, via pub/sub)."""
        return await self._call(self._load_keys) is not _FAILED

    async def _count_request(self, record: KeyRecord, limits: Limits) -> Decision:
        # The key's tokens buffered by record_usage ride along (added before the check), so
        # this instance's own answers count against the key's next request at once; taken
        # out of the buffer first, put back if the call fails.
        add = self._pending_tokens.pop(record.name, 0)
        res = await self._call(
            lambda: self._evalsha(
                self._check, f"{self._p}{{k:{record.name}}}:lim",
                (limits.rpm, limits.tpm, limits.daily_tokens, add),
            )
        )  # fmt: skip
        if res is _FAILED:
            if add:
                self._pending_tokens[record.name] = self._pending_tokens.get(record.name, 0) + add
            if self.cfg.state.limits_fail == "open":
                return Decision(True, degraded=True)
            return Decision(False, max(1, int(self.health.delay_s + 0.999)),
                            "state_unavailable", degraded=True)  # fmt: skip
        if int(res[0]) == 1:
            return Decision(True)
        return Decision(False, max(1, -(-int(res[1]) // 1000)), _text(res[2]))

    async def _evalsha(self, script: Any, key: str, args: tuple[Any, ...]) -> Any:
        """The hot path's one script call: on the lean path (lean_redis.py) 89 us CPU per check
        at c=1 against 182 through a pooled coredis connection, itself ~70 us less than the
        client's command layer (bench.state_cost, bench/README.md). NOSCRIPT (a restarted or
        failed-over server) goes through the Script object, which loads it and runs it again."""
        return (await self._evalsha_many([(script, key, args)]))[0]

    async def _evalsha_many(
        self, calls: list[tuple[Any, str, tuple[Any, ...]]], out: list[Any] | None = None
    ) -> list[Any]:
        """Several one-key scripts written back to back on one connection: one round trip.
        On a cluster each goes to its slot's node through the Script object. Replies are
        appended to `out` as they arrive: after a failure, its length says how many of the
        calls (a prefix) got through."""
        out = [] if out is None else out
        if self.cluster:
            for script, key, args in calls:
                out.append(await script(keys=[key], args=list(args)))
            return out
        if self._lean is not None:
            replies = await self._lean.call(
                [("EVALSHA", script.sha, 1, key, *args) for script, key, args in calls]
            )
            for r, (script, key, args) in zip(replies, calls, strict=True):
                if isinstance(r, ReplyError):
                    if r.code != "NOSCRIPT":
                        raise coredis.exceptions.ResponseError(str(r))
                    r = await script(keys=[key], args=list(args))  # loads it, runs it again
                out.append(r)
            return out
        pool = self.client.connection_pool
        conn = await pool.get_connection()
        try:
            reqs = [conn.create_request(b"EVALSHA", script.sha, 1, key, *args, decode=False)
                    for script, key, args in calls]  # fmt: skip
        finally:
            pool.release(conn)  # multiplexed: replies are matched to `reqs`, not to a lease
        for req, (script, key, args) in zip(reqs, calls, strict=True):
            try:
                out.append(await req)
            except coredis.exceptions.NoScriptError:
                out.append(await script(keys=[key], args=list(args)))
        return out

    async def record_usage(
        self, key: str | None, account: str, model: str, tokens_in: int, tokens_out: int
    ) -> None:
        """Buffered (same fields merged); the flusher sends the buffer every
        `[state] usage_flush_ms` in one round trip (0: at once, one round trip per answer).
        While degraded the same buffer waits for the recovery's push."""
        if key is not None:
            self.tally_tokens(key, tokens_in, tokens_out)
        now_ms = time.time_ns() // 1_000_000
        hour = now_ms - now_ms % HOUR_MS
        tin, tout = max(0, tokens_in), max(0, tokens_out)
        fields: dict[str, int] = {}
        for kind, name in (("key", key), ("account", account), ("model", model[:64])):
            if name:
                fields[f"{kind}{SEP}{name}{SEP}r"] = 1
                fields[f"{kind}{SEP}{name}{SEP}i"] = tin
                fields[f"{kind}{SEP}{name}{SEP}o"] = tout
        tokens = tin + tout if key is not None else 0
        if key is not None and tokens:
            self._pending_tokens[key] = self._pending_tokens.get(key, 0) + tokens
        self._buffer_usage(hour, fields)
        if not self._flusher_running:  # usage_flush_ms = 0, or no background tasks (the CLI)
            await self._call(self._flush_usage)

    async def before_stop(self) -> None:
        # The usage still buffered goes out (one round trip under the call timeout; while
        # degraded it is lost, as it was before batching).
        await self._call(self._flush_usage)

    async def push_usage(self) -> None:
        """Send what `record_usage` buffered now (the flusher does it every `[state]
        usage_flush_ms`). Never raises: a failure keeps it for the next push."""
        await self._call(self._flush_usage)

    def metrics_collectors(self) -> list[tuple[str, Literal["gauge", "counter"], str, Any]]:
        def retried() -> list[tuple[dict[str, str], float]]:
            return [({"backend": self.backend}, float(self.usage_retried))]

        return [*super().metrics_collectors(), (
            "rawgate_state_usage_retried_total", "counter",
            "Answers whose usage write failed or timed out and was kept for a retry (one that "
            "timed out on a hung server may have run too: these may count twice).", retried,
        )]  # fmt: skip

    async def _usage_flusher(self) -> None:
        """Every `[state] usage_flush_ms`: the buffered usage and tokens, one round trip. While
        degraded it waits: the recovery pushes the same buffers (`_push_pending`)."""
        period = self.cfg.state.usage_flush_ms / 1000
        self._flusher_running = True
        try:
            while True:
                await anyio.sleep(period)
                if (self._pending_usage or self._pending_tokens) and not self.health.degraded:
                    await self._call(self._flush_usage)
        finally:
            self._flusher_running = False

    def _buffer_usage(self, hour: int, fields: dict[str, int]) -> None:
        for f, n in fields.items():
            k = (hour, f)
            if k in self._pending_usage or len(self._pending_usage) < MAX_PENDING_USAGE_ROWS:
                self._pending_usage[k] = self._pending_usage.get(k, 0) + n

    async def _flush_usage(self) -> None:
        """Push the buffered usage and tokens in one pipelined round trip (each key's token
        windows, then each hour's usage hash). The buffers are taken whole first: answers
        recorded during the push (or while degraded) buffer into fresh ones, never into rows
        being pushed (an increment there would be lost with the row). What did not get
        through goes back, merged with what arrived meanwhile."""
        if not self._pending_usage and not self._pending_tokens:
            return
        tokens, self._pending_tokens = self._pending_tokens, {}
        rows, self._pending_usage = self._pending_usage, {}
        ttl = self.cfg.state.usage_days * DAY_MS + HOUR_MS
        by_hour: dict[int, list[Any]] = {}
        for (hour, f), n in rows.items():
            if n:
                by_hour.setdefault(hour, [ttl]).extend((f, n))
        names = [name for name, n in tokens.items() if n]
        calls: list[tuple[Any, str, tuple[Any, ...]]] = [
            (self._record, f"{self._p}{{k:{name}}}:lim", (tokens[name],)) for name in names
        ]
        calls += [(self._usage, f"{self._p}{{u}}:{hour}", tuple(args))
                  for hour, args in by_hour.items()]  # fmt: skip
        done: list[Any] = []
        try:
            await self._evalsha_many(calls, done)
        finally:
            # The calls answered (a prefix of `calls`) are through; the rest goes back.
            for i in range(len(done), len(calls)):
                if i < len(names):
                    name = names[i]
                    self._pending_tokens[name] = self._pending_tokens.get(name, 0) + tokens[name]
                else:
                    args = calls[i][2]
                    hour = int(calls[i][1].rsplit(":", 1)[1])
                    back = dict(zip(args[1::2], args[2::2], strict=True))
                    self._buffer_usage(hour, back)
                    answers: dict[str, int] = {}  # per kind: each answer has an "r" of each
                    for f, n in back.items():
                        if f.endswith(SEP + "r"):
                            kind = f.split(SEP, 1)[0]
                            answers[kind] = answers.get(kind, 0) + n
                    self.usage_retried += max(answers.values(), default=0)

    async def usage(self, kind: str, name: str | None, since_s: float) -> dict[str, list[Usage]]:
        now_ms = time.time_ns() // 1_000_000
        first = now_ms - int(since_s * 1000)
        first -= first % HOUR_MS
        hours = list(range(first, now_ms + 1, HOUR_MS))

        async def fetch() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                reqs = [pipe.hgetall(f"{self._p}{{u}}:{h}") for h in hours]
            return [await r for r in reqs]

        # This instance's buffered usage first, so it reads what it just recorded.
        if not self.health.degraded:
            await self._admin(self._flush_usage)
        rows = await self._admin(fetch)
        out: dict[str, list[Usage]] = {}
        for h, raw in zip(hours, rows, strict=True):
            per: dict[str, list[int]] = {}
            for f, v in raw.items():
                kd, n, what = _text(f).split(SEP)
                if kd != kind or (name is not None and n != name):
                    continue
                per.setdefault(n, [0, 0, 0])["rio".index(what)] += int(v)
            for n, (r, i, o) in sorted(per.items()):
                out.setdefault(n, []).append(Usage(h, r, i, o))
        return out

    async def _records(self) -> tuple[str, dict[str, KeyRecord], dict[str, bytes]]:
        async def read() -> tuple[Any, Any]:
            await self.client.set(self.k_salt, new_salt(), condition=coredis.PureToken.NX)
            return await self.client.get(self.k_salt), await self.client.hgetall(self.k_keys)

        salt, raw = await self._admin(read)
        rawb = {_text(k): (v if isinstance(v, bytes) else v.encode()) for k, v in raw.items()}
        return _text(salt), {k: decode_record(v) for k, v in rawb.items()}, rawb

    async def _edit(
        self, name: str, fn: Callable[[str, dict[str, KeyRecord]], Any]
    ) -> Any:
        """Apply a pure record edit to one key with compare-and-set; retried on a race."""
        for _ in range(5):
            salt, recs, raw = await self._records()
            old = raw.get(name, b"")
            result = fn(salt, recs)
            new = encode_record(recs[name]) if name in recs else b""
            ok = await self._admin(
                partial(self._cas, keys=[self.k_keys], args=[name, old, new, self.channel])
            )
            if int(ok) == 1:
                await self._call(self._load_keys)
                return result
        raise KeyStoreError(f"key {name!r} is being changed concurrently; try again")

    async def list_keys(self) -> list[KeyRecord]:
        _, recs, _ = await self._records()
        return sorted(recs.values(), key=lambda r: r.name)

    async def add_key(
        self, name: str, *, rpm: int = 0, tpm: int = 0, daily_tokens: int = 0,
        models: list[str] | None = None,
    ) -> tuple[KeyRecord, str]:  # fmt: skip
        out: tuple[KeyRecord, str] = await self._edit(
            name,
            lambda salt, recs: add_record(
                recs, salt, name, rpm=rpm, tpm=tpm, daily_tokens=daily_tokens, models=models
            ),
        )
        return out

    async def rotate_key(self, name: str) -> tuple[KeyRecord, str]:
        out: tuple[KeyRecord, str] = await self._edit(
            name, lambda salt, recs: rotate_record(recs, salt, name)
        )
        return out

    async def set_key_enabled(self, name: str, enabled: bool) -> KeyRecord:
        def apply(salt: str, recs: dict[str, KeyRecord]) -> KeyRecord:
            recs[name] = msgspec.structs.replace(find(recs, name), enabled=enabled)
            return recs[name]

        out: KeyRecord = await self._edit(name, apply)
        return out

    async def remove_key(self, name: str) -> KeyRecord:
        out: KeyRecord = await self._edit(name, lambda salt, recs: recs.pop(find(recs, name).name))
        # A new key of that name starts with empty windows (usage history stays).
        await self._admin(lambda: self.client.delete([f"{self._p}{{k:{name}}}:lim"]))
        return out

    # ---- stored Responses ----

    async def put_response(
        self, response_id: str, input_items: list[dict[str, Any]],
        output_items: list[dict[str, Any]],
    ) -> bool:  # fmt: skip
        data = orjson.dumps([input_items, output_items])
        if len(data) > self.cfg.state.response_max_bytes:
            return False
        ttl_ms = max(1, int(self.cfg.limits.response_store_max_age_s * 1000))
        res = await self._call(
            lambda: self.client.set(f"{self._p}{{r:{response_id}}}", data, px=ttl_ms)
        )
        self._responses.put(response_id, input_items, output_items)
        if res is _FAILED:
            self._unsent[response_id] = None
            if len(self._unsent) > 2 * self._responses.max_count:  # drop the evicted ones
                held = {rid for rid, _, _, _ in self._responses.live()}
                self._unsent = {rid: None for rid in self._unsent if rid in held}
        return True

    async def get_response(self, response_id: str) -> list[dict[str, Any]] | None:
        local = self._responses.get(response_id)
        if local is not None:
            return local
        data = await self._call(lambda: self.client.get(f"{self._p}{{r:{response_id}}}"))
        if data is _FAILED or data is None:
            return None
        inputs, outputs = orjson.loads(data)
        return [*inputs, *outputs]

    # ---- OAuth access tokens ----

    async def get_access_token(self, account: str) -> tuple[str, float] | None:
        data = await self._call(lambda: self.client.get(f"{self._p}{{a:{account}}}:tok"))
        if data is _FAILED:
            hit = self._local_tokens.get(account)
            return hit if hit is not None and hit[1] > time.time() else None
        if data is None:
            return None
        exp, _, token = _text(data).partition(SEP)
        return token, int(exp) / 1000

    async def put_access_token(self, account: str, token: str, expires_at: float) -> None:
        self._local_tokens[account] = (token, expires_at)
        exp_ms = int(expires_at * 1000)
        if exp_ms <= time.time() * 1000:
            return
        await self._call(
            lambda: self.client.set(
                f"{self._p}{{a:{account}}}:tok", f"{exp_ms}{SEP}{token}", pxat=exp_ms
            )
        )

    async def acquire_refresh_lock(self, account: str, ttl_s: float) -> str | None:
        owner = secrets.token_hex(16)
        res = await self._call(
            lambda: self.client.set(
                f"{self._p}{{a:{account}}}:lock", owner, px=max(1, int(ttl_s * 1000)),
                condition=coredis.PureToken.NX,
            )
        )  # fmt: skip
        if res is _FAILED:
            return owner  # degraded: each instance refreshes on its own (documented)
        return owner if res else None

    async def release_refresh_lock(self, account: str, owner: str) -> None:
        await self._call(
            lambda: self._release(keys=[f"{self._p}{{a:{account}}}:lock"], args=[owner])
        )

    # ---- accounts ----

    async def accounts_snapshot(self, *, counters: bool = True) -> tuple[int, list[Account]]:
        """(version, accounts) read together; the version grows with every write. `counters`:
        with the servers' counters (P{accts}:n) added (what listings show); without, the
        stored JSON as is (what a read-modify-write must write back).

        No version while this instance holds a list (the server lost its data and no instance
        has put it back yet, e.g. a reload or a write racing the reconnection): the list is put
        back first, then read, so an empty list from a server that lost it is never used or
        written over (a list emptied on purpose has its version and is read as it is)."""
        version, accts = await self._read_accounts(counters)
        if version == 0 and self._held_accounts[1]:
            if await self._admin(self._restore_accounts):
                log.warning(
                    "%s lost the accounts list: restored the %d accounts this instance "
                    "holds", self.health.name, len(self._held_accounts[1]),
                )  # fmt: skip
            version, accts = await self._read_accounts(counters)
        return version, accts

    async def _read_accounts(self, counters: bool) -> tuple[int, list[Account]]:
        v, raw, flat = await self._admin(
            partial(self._read_accts, keys=[self.k_accts, self.k_accts_v, self.k_accts_n],
                    args=["1" if counters else "0"])
        )  # fmt: skip
        accts = [_account_dec.decode(x if isinstance(x, bytes) else x.encode())
                 for x in raw[1::2]]  # fmt: skip
        if flat:
            _add_counters(accts, dict(zip(flat[::2], flat[1::2], strict=True)))
        return int(_text(v) or 0), sorted(accts, key=lambda a: (a.created, a.id))

    async def accounts_replace(self, version: int, accounts: list[Account]) -> bool:
        """Write the whole list if nobody wrote since `version` was read; False otherwise."""
        args: list[Any] = [version, self.channel]
        for a in accounts:
            args += [a.id, _account_enc.encode(a)]
        ok = await self._admin(
            partial(
                self._replace_accts, keys=[self.k_accts, self.k_accts_v, self.k_accts_n],
                args=args,
            )
        )  # fmt: skip
        return int(ok) == 1

    async def add_account_stats(self, deltas: dict[str, AccountStats]) -> bool:
        args: list[Any] = []
        for acc_id, (req, tin, tout, errs, last) in deltas.items():
            for letter, n in (("r", req), ("i", tin), ("o", tout), ("e", errs)):
                if n:
                    args += [f"{acc_id}{SEP}{letter}", n]
            if last:
                args += [f"{acc_id}{SEP}l", last]
        if not args:
            return True
        res = await self._call(partial(self._acct_stats, keys=[self.k_accts_n], args=args))
        return res is not _FAILED

    async def update_accounts(
        self, fn: Callable[[list[Account]], list[Account] | None]
    ) -> list[Account]:
        """AccountStore.update's contract (validate, then write all or nothing) on Redis:
        read with the version, apply `fn`, write if the version did not move; else retry."""
        for attempt in range(ACCOUNTS_CAS_ATTEMPTS):
            version, current = await self.accounts_snapshot(counters=False)
            result = fn(current)
            accounts = current if result is None else result
            validate_accounts(accounts, "accounts in Redis")
            if await self.accounts_replace(version, accounts):
                return accounts
            # Lost a race: back off with jitter so N writers do not collide again in lockstep.
            await anyio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise AccountStoreError("the accounts in Redis keep changing under us; try again")

    def hold_accounts(self, accounts: list[Account]) -> None:
        # Its version is not known (the cache keeps the list only): any version > 0 says
        # "read from Redis"; a list read in this run replaces it.
        if not self._held_accounts[1]:
            self._held_accounts = (1, list(accounts))

    async def load_accounts(self) -> list[Account]:
        snap = await self.accounts_snapshot()
        self._held_accounts = snap
        return snap[1]

    async def import_accounts(self, accounts: list[Account]) -> tuple[int, int]:
        counts = [0, 0]

        def apply(current: list[Account]) -> None:
            counts[:] = [0, 0]
            ids = {a.id for a in current}
            for acc in accounts:
                if find_secret(current, acc.secret()) is not None:
                    counts[1] += 1
                    continue
                new = msgspec.structs.replace(acc)
                if not ID_RE.match(new.id) or new.id in ids:
                    new.id = new_account_id(ids)
                ids.add(new.id)
                current.append(new)
                counts[0] += 1

        await self.update_accounts(apply)
        return counts[0], counts[1]

    def on_accounts_changed(self, listener: Callable[[], None]) -> None:
        self._accounts_listeners.append(listener)

    async def cooldown_entries(self) -> list[Cooldown]:
        """Every live cooldown read from Redis now (the CLI has no subscriber mirror)."""
        raw = await self._admin(lambda: self.client.hgetall(self.k_cd))
        now = time.time()
        out = []
        for f, v in raw.items():
            acct, _, model = _text(f).partition(SEP)
            until_ms, _, reason = _text(v).partition(SEP)
            if int(until_ms) / 1000 > now:
                out.append(Cooldown(acct, model, int(until_ms) / 1000, reason))
        return out
