"""The pool: the pure assign step (records in, a Plan out) and the async driver around it."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings, strategies as st

from rawgate.errors import UpstreamConnectError, UpstreamPoolTimeout
from rawgate.upstream.pool import (
    Connection,
    ConnState,
    Limits,
    OriginPool,
    PendingConnection,
    Plan,
    Waiter,
    assign,
)

NOW = 1000.0
LIM = Limits(max_connections=4, max_keepalive=4, keepalive_expiry_s=60.0)


class Fake:
    """A connection record for the pure step."""

    def __init__(
        self,
        state: ConnState = ConnState.IDLE,
        *,
        http2: bool = False,
        capacity: int = 1,
        in_use: int = 0,
        idle_since: float = NOW - 1,
        stale: bool = False,
        cid: int = 0,
    ) -> None:
        self.id = cid
        self.state = state
        self.http2 = http2
        self.capacity = capacity
        self.in_use = in_use
        self.idle_since = idle_since
        self.stale = stale
        self.closed = False

    def is_stale(self) -> bool:
        return self.stale

    async def aclose(self) -> None:
        self.closed = True
        self.state = ConnState.CLOSED

    def __repr__(self) -> str:
        return f"<Fake #{self.id} {self.state.name} {self.in_use}/{self.capacity}>"


def waiters(n: int) -> list[Waiter]:
    return [Waiter() for _ in range(n)]


# ---- the pure step --------------------------------------------------------------------------


def test_idle_connection_is_reused_most_recent_first() -> None:
    old = Fake(idle_since=NOW - 30, cid=1)
    new = Fake(idle_since=NOW - 2, cid=2)
    ws = waiters(1)
    plan = assign([old, new], ws, LIM, NOW, expect=1)
    assert plan.assigned == [(ws[0], new)]
    assert plan.opened == [] and plan.closed == []


def test_no_free_connection_opens_one_until_the_limit_then_queues_fifo() -> None:
    busy = [Fake(ConnState.ACTIVE, in_use=1, cid=i) for i in range(3)]
    ws = waiters(3)
    plan = assign(busy, ws, LIM, NOW, expect=1)
    assert plan.opened == [ws[0]]  # 3 busy + 1 new = the limit of 4
    assert plan.assigned == []
    # ws[1] and ws[2] stay queued, in order


def test_known_http1_origin_opens_one_connection_per_waiter() -> None:
    ws = waiters(6)
    plan = assign([], ws, LIM, NOW, expect=1)
    assert plan.opened == ws[:4]


def test_possible_h2_origin_opens_one_connection_for_a_burst() -> None:
    ws = waiters(200)
    plan = assign([], ws, LIM, NOW, expect=100)
    # one connection expected to carry 100; the 101st waiter opens the second
    assert plan.opened == [ws[0], ws[100]]


def test_connecting_slot_absorbs_waiters_while_it_may_be_h2() -> None:
    pending = PendingConnection(1)
    ws = waiters(5)
    assert assign([pending], ws, LIM, NOW, expect=100).opened == []
    assert assign([pending], ws, LIM, NOW, expect=1).opened == ws[:3]


def test_h2_connection_takes_waiters_up_to_its_capacity_then_a_second_opens() -> None:
    c = Fake(ConnState.ACTIVE, http2=True, capacity=3, in_use=1, cid=1)
    ws = waiters(4)
    plan = assign([c], ws, LIM, NOW, expect=3)
    assert plan.assigned == [(ws[0], c), (ws[1], c)]
    assert plan.opened == [ws[2]]  # ws[3] is absorbed by the new connection


def test_busy_h2_connection_is_preferred_over_an_idle_one() -> None:
    idle = Fake(ConnState.IDLE, http2=True, capacity=10, idle_since=NOW - 1, cid=1)
    busy = Fake(ConnState.ACTIVE, http2=True, capacity=10, in_use=4, cid=2)
    ws = waiters(1)
    assert assign([idle, busy], ws, LIM, NOW, expect=10).assigned == [(ws[0], busy)]


def test_expired_idle_connections_are_closed() -> None:
    expired = Fake(idle_since=NOW - 61, cid=1)
    fresh = Fake(idle_since=NOW - 1, cid=2)
    plan = assign([expired, fresh], [], LIM, NOW, expect=1)
    assert plan.closed == [expired]


def test_idle_beyond_max_keepalive_closes_the_oldest() -> None:
    lim = Limits(max_connections=10, max_keepalive=2, keepalive_expiry_s=60.0)
    cs = [Fake(idle_since=NOW - 10 + i, cid=i) for i in range(4)]
    plan = assign(cs, [], lim, NOW, expect=1)
    assert plan.closed == cs[:2]


def test_stale_idle_connection_is_closed_at_pick_time_and_the_next_one_used() -> None:
    stale = Fake(idle_since=NOW - 1, stale=True, cid=1)
    good = Fake(idle_since=NOW - 5, cid=2)
    ws = waiters(1)
    plan = assign([stale, good], ws, LIM, NOW, expect=1)
    assert plan.closed == [stale]
    assert plan.assigned == [(ws[0], good)]


def test_stale_check_only_on_the_connection_handed_out() -> None:
    probed: list[int] = []

    class Probe(Fake):
        def is_stale(self) -> bool:
            probed.append(self.id)
            return False

    cs = [Probe(idle_since=NOW - 10 + i, cid=i) for i in range(4)]
    assign(cs, waiters(1), LIM, NOW, expect=1)
    assert probed == [3]  # one syscall per checkout, not one per idle connection


def test_draining_connections_do_not_count_and_close_when_empty() -> None:
    lim = Limits(max_connections=1, max_keepalive=4, keepalive_expiry_s=60.0)
    draining = Fake(ConnState.DRAINING, http2=True, capacity=100, in_use=3, cid=1)
    ws = waiters(1)
    plan = assign([draining], ws, lim, NOW, expect=100)
    assert plan.opened == ws and plan.closed == []
    drained = Fake(ConnState.DRAINING, http2=True, capacity=100, in_use=0, cid=2)
    assert assign([drained], [], lim, NOW, expect=100).closed == [drained]


def test_closed_connections_are_dropped_not_closed_again() -> None:
    gone = Fake(ConnState.CLOSED, cid=1)
    plan = assign([gone], [], LIM, NOW, expect=1)
    assert plan.dropped == [gone] and plan.closed == []


def test_a_fresh_waiter_opens_a_new_connection_even_with_idle_ones() -> None:
    idle = Fake(cid=1)
    w = Waiter(fresh=True)
    plan = assign([idle], [w], LIM, NOW, expect=1)
    assert plan.opened == [w] and plan.assigned == []


def test_a_fresh_waiter_at_the_limit_takes_what_is_there() -> None:
    lim = Limits(max_connections=1, max_keepalive=4, keepalive_expiry_s=60.0)
    idle = Fake(cid=1)
    w = Waiter(fresh=True)
    assert assign([idle], [w], lim, NOW, expect=1).assigned == [(w, idle)]


def test_assign_does_not_mutate_its_inputs() -> None:
    c = Fake(ConnState.ACTIVE, http2=True, capacity=5, in_use=1)
    ws = waiters(3)
    assign([c], ws, LIM, NOW, expect=5)
    assert c.in_use == 1 and c.state is ConnState.ACTIVE
    assert all(w.conn is None for w in ws)


conn_st = st.builds(
    Fake,
    st.sampled_from(list(ConnState)),
    http2=st.booleans(),
    capacity=st.integers(1, 5),
    in_use=st.integers(0, 5),
    idle_since=st.floats(NOW - 100, NOW),
    stale=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(
    conns=st.lists(conn_st, max_size=8),
    n_waiters=st.integers(0, 12),
    max_conns=st.integers(1, 6),
    expect=st.integers(1, 4),
)
def test_plan_invariants(conns: list[Fake], n_waiters: int, max_conns: int, expect: int) -> None:
    for c in conns:
        c.in_use = min(c.in_use, c.capacity)
        if c.state is ConnState.IDLE:
            c.in_use = 0
    lim = Limits(max_connections=max_conns, max_keepalive=3, keepalive_expiry_s=60.0)
    ws = waiters(n_waiters)
    plan = assign(conns, ws, lim, NOW, expect)
    served = [w for w, _ in plan.assigned] + plan.opened
    assert len(served) == len(set(map(id, served)))  # nobody twice
    # never over a connection's capacity, never onto a closed/draining/closing one
    closing = {id(c) for c in plan.closed + plan.dropped}
    for c in conns:
        n = sum(1 for _, x in plan.assigned if x is c)
        if n:
            assert c.state in (ConnState.IDLE, ConnState.ACTIVE)
            assert id(c) not in closing
            assert c.in_use + n <= c.capacity
    # openings never push the usable connections above the limit
    live = sum(
        1
        for c in conns
        if id(c) not in closing and c.state not in (ConnState.DRAINING, ConnState.CLOSED)
    )
    assert not plan.opened or live + len(plan.opened) <= max_conns
    # only idle (expired, stale, over the keep-alive cap) or drained connections get closed
    for gone in plan.closed:
        assert gone.state is ConnState.IDLE or (
            gone.state is ConnState.DRAINING and gone.in_use == 0
        )


def _reference_assign(conns: list[Fake], ws: list[Waiter], lim: Limits, expect: int) -> Plan:
    """assign() as first written: every waiter one by one (O(waiters) per call)."""
    from rawgate.upstream.pool import _USABLE, _pick

    plan = Plan()
    live: list[Fake] = []
    idle: list[Fake] = []
    for c in conns:
        if c.state is ConnState.CLOSED:
            plan.dropped.append(c)
        elif (c.state is ConnState.IDLE and NOW - c.idle_since >= lim.keepalive_expiry_s) or (
            c.state is ConnState.DRAINING and c.in_use == 0
        ):
            plan.closed.append(c)
        else:
            live.append(c)
            if c.state is ConnState.IDLE:
                idle.append(c)
    excess = len(idle) - lim.max_keepalive
    if excess > 0:
        idle.sort(key=lambda c: c.idle_since)
        for c in idle[:excess]:
            plan.closed.append(c)
            live.remove(c)
    free = [c.capacity - c.in_use if c.state in _USABLE else 0 for c in live]
    absorb = sum(max(0, expect - c.in_use) for c in live if c.state is ConnState.CONNECTING)
    total = sum(1 for c in live if c.state is not ConnState.DRAINING)
    for w in ws:
        if w.fresh and total < lim.max_connections:
            plan.opened.append(w)
            total += 1
            absorb += expect - 1
            continue
        i = _pick(live, free)  # type: ignore[arg-type]
        while i >= 0 and live[i].state is ConnState.IDLE and live[i].is_stale():
            plan.closed.append(live[i])
            free[i] = 0
            total -= 1
            i = _pick(live, free)  # type: ignore[arg-type]
        if i >= 0:
            free[i] -= 1
            plan.assigned.append((w, live[i]))
        elif absorb > 0:
            absorb -= 1
        elif total < lim.max_connections:
            plan.opened.append(w)
            total += 1
            absorb += expect - 1
        else:
            break
    return plan


@settings(max_examples=300, deadline=None)
@given(
    conns=st.lists(conn_st, max_size=8),
    fresh=st.lists(st.booleans(), max_size=40),
    max_conns=st.integers(1, 8),
    expect=st.integers(1, 12),
)
def test_plan_equals_the_one_by_one_reference(
    conns: list[Fake], fresh: list[bool], max_conns: int, expect: int
) -> None:
    for c in conns:
        c.in_use = min(c.in_use, c.capacity)
        if c.state is ConnState.IDLE:
            c.in_use = 0
    lim = Limits(max_connections=max_conns, max_keepalive=3, keepalive_expiry_s=60.0)
    ws = [Waiter(f) for f in fresh]
    got = assign(conns, ws, lim, NOW, expect)
    want = _reference_assign(conns, ws, lim, expect)
    for field in ("assigned", "opened", "closed", "dropped"):
        assert getattr(got, field) == getattr(want, field), field


def test_a_burst_behind_connections_being_opened_is_one_step() -> None:
    # 10 h2 connections being opened absorb 990 waiters: the next 10 open 10 more, the rest
    # wait, and FIFO order holds.
    pending = [PendingConnection(i) for i in range(10)]
    ws = waiters(1200)
    lim = Limits(max_connections=12, max_keepalive=12, keepalive_expiry_s=60.0)
    plan = assign(pending, ws, lim, NOW, expect=100)
    assert plan.opened == [ws[990], ws[1090]]
    assert plan.assigned == []


# ---- the driver -----------------------------------------------------------------------------

class Dialer:
    """A connect() for OriginPool that makes Fake connections (or fails / blocks)."""

    def __init__(self, *, http2: bool = False, capacity: int = 1) -> None:
        self.http2 = http2
        self.capacity = capacity
        self.made: list[Fake] = []
        self.fail: Exception | None = None
        self.gate: anyio.Event | None = None

    async def __call__(self, cid: int) -> Fake:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        c = Fake(ConnState.IDLE, http2=self.http2, capacity=self.capacity, cid=cid)
        self.made.append(c)
        return c


def make_pool(dialer: Dialer, *, max_conns: int = 2, pool_s: float = 5.0) -> OriginPool:
    return OriginPool(
        "http://origin",
        Limits(max_conns, max_conns, 60.0),
        dialer,
        pool_timeout_s=pool_s,
        h2_streams=dialer.capacity,
        http2=dialer.http2,
    )


@pytest.mark.anyio
async def test_driver_opens_reuses_and_shows_state_in_repr() -> None:
    d = Dialer()
    pool = make_pool(d)
    assert repr(pool) == "<OriginPool http://origin h1 conns=[] waiters=0>"
    c = await pool.acquire()
    assert repr(pool) == "<OriginPool http://origin h1 conns=[<Fake #1 ACTIVE 1/1>] waiters=0>"
    await pool.release(c)
    assert repr(pool) == "<OriginPool http://origin h1 conns=[<Fake #1 IDLE 0/1>] waiters=0>"
    assert await pool.acquire() is c
    assert len(d.made) == 1


@pytest.mark.anyio
async def test_driver_waiters_are_served_fifo_as_connections_free_up() -> None:
    d = Dialer()
    pool = make_pool(d, max_conns=1)
    held = await pool.acquire()
    order: list[int] = []

    async def want(i: int) -> None:
        c = await pool.acquire()
        order.append(i)
        await anyio.lowlevel.checkpoint()
        await pool.release(c)

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(want, i)
            await anyio.lowlevel.checkpoint()
        await anyio.wait_all_tasks_blocked()
        assert "waiters=5" in repr(pool)
        await pool.release(held)
    assert order == [0, 1, 2, 3, 4]
    assert len(d.made) == 1
    assert "waiters=0" in repr(pool)


@pytest.mark.anyio
async def test_driver_pool_timeout_raises_its_class_and_leaves_no_waiter() -> None:
    pool = make_pool(Dialer(), max_conns=1, pool_s=0.05)
    held = await pool.acquire()
    with pytest.raises(UpstreamPoolTimeout):
        await pool.acquire()
    assert "waiters=0" in repr(pool)
    await pool.release(held)
    assert await pool.acquire() is held


@pytest.mark.anyio
async def test_driver_cancelled_waiter_leaves_the_queue() -> None:
    pool = make_pool(Dialer(), max_conns=1)
    held = await pool.acquire()
    with anyio.move_on_after(0.05):
        await pool.acquire()
    assert "waiters=0" in repr(pool)
    await pool.release(held)
    assert "IDLE" in repr(pool)


@pytest.mark.anyio
async def test_driver_connect_failure_propagates_and_frees_the_slot() -> None:
    d = Dialer()
    d.fail = UpstreamConnectError("refused")
    pool = make_pool(d)
    with pytest.raises(UpstreamConnectError):
        await pool.acquire()
    assert repr(pool) == "<OriginPool http://origin h1 conns=[] waiters=0>"
    d.fail = None
    c = await pool.acquire()
    assert c.state is ConnState.ACTIVE


@pytest.mark.anyio
async def test_driver_cancel_during_connect_frees_the_slot() -> None:
    d = Dialer()
    d.gate = anyio.Event()
    pool = make_pool(d, max_conns=1)
    with anyio.move_on_after(0.05):
        await pool.acquire()
    assert repr(pool) == "<OriginPool http://origin h1 conns=[] waiters=0>"
    d.gate.set()
    assert (await pool.acquire()).in_use == 1


@pytest.mark.anyio
async def test_driver_h2_burst_waits_for_one_connection_and_shares_it() -> None:
    d = Dialer(http2=True, capacity=10)
    d.gate = anyio.Event()
    pool = make_pool(d, max_conns=4)
    got: list[Connection] = []

    async def want() -> None:
        got.append(await pool.acquire())

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(want)
        await anyio.wait_all_tasks_blocked()
        assert "waiters=9" in repr(pool)  # one opens, nine wait for it
        d.gate.set()
    assert len(d.made) == 1
    assert {id(c) for c in got} == {id(d.made[0])}
    assert d.made[0].in_use == 10


@pytest.mark.anyio
async def test_driver_aclose_fails_waiters_and_closes_connections() -> None:
    d = Dialer()
    pool = make_pool(d, max_conns=1)
    held = await pool.acquire()
    errors: list[BaseException] = []

    async def want() -> None:
        try:
            await pool.acquire()
        except Exception as e:
            errors.append(e)

    async with anyio.create_task_group() as tg:
        tg.start_soon(want)
        await anyio.wait_all_tasks_blocked()
        await pool.aclose()
    assert len(errors) == 1 and "closed" in str(errors[0])
    assert isinstance(held, Fake) and held.closed
