"""h2_server's stream workers: a task that finished a stream takes the next one."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from h2.errors import ErrorCodes

from rawgate.seam import Request, ResponseSink
from tests.e2e.test_h2_server import Recorder, client_for, make_cfg

pytestmark = pytest.mark.anyio


async def test_streams_after_a_reset_run_on_reused_workers() -> None:
    app = Recorder()
    app.expect = 1
    async with client_for(app) as (c, h):
        blocked = await c.open_stream("GET", "/block")
        with anyio.fail_after(5):
            await app.arrived_event.wait()
        await c.reset(blocked)
        with anyio.fail_after(5):
            await app.cancelled_event.wait()
        # The worker of the reset stream is idle now; these run one after another on it.
        for i in range(30):
            r = await c.response(await c.open_stream("POST", "/echo", body=b"x" * i))
            assert r.status == 200 and r.json()["len"] == i
        assert h.state.in_flight == 0
    assert app.cancelled == ["/block"]
    assert app.finished.count("/echo") == 30


class _TaskRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.tasks: set[int] = set()

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        self.tasks.add(id(asyncio.current_task()))
        await super().__call__(request, sink)


async def test_bursts_reuse_at_most_the_stream_limit_of_workers() -> None:
    cfg = make_cfg(h2_max_concurrent_streams=4)
    app = _TaskRecorder()
    app.expect = 4
    tasks_after: list[int] = []
    async with client_for(app, cfg) as (c, _):
        await c.wait_for(lambda: c.conn.remote_settings.max_concurrent_streams == 4)
        for _ in range(3):  # bursts of 4 concurrent streams
            app.arrived = 0
            app.arrived_event = anyio.Event()
            app.release = anyio.Event()
            sids = [await c.open_stream("GET", "/block") for _ in range(4)]
            with anyio.fail_after(5):
                await app.arrived_event.wait()
            app.release.set()
            for sid in sids:
                assert (await c.response(sid)).status == 200
            await anyio.sleep(0.01)
            tasks_after.append(len(asyncio.all_tasks()))
    assert len(app.finished) == 12
    assert len(app.tasks) == 4  # 12 streams, 4 worker tasks
    assert tasks_after[0] == tasks_after[1] == tasks_after[2]  # idle workers do not pile up



async def test_a_stream_longer_than_the_idle_timeout_is_not_cut() -> None:
    """The idle timer armed before the request fires while the stream is open: it must lapse,
    and the connection closes only after being idle again."""
    cfg = make_cfg(keepalive_idle_s=0.1)
    app = Recorder()
    app.expect = 1
    async with client_for(app, cfg) as (c, h):
        sid = await c.open_stream("GET", "/block")
        with anyio.fail_after(5):
            await app.arrived_event.wait()
        await anyio.sleep(0.35)  # several idle periods while the stream is open
        goaway_before = c.goaway  # a local: mypy would keep c.goaway narrowed to None
        assert not h.done.is_set() and goaway_before is None
        app.release.set()
        assert (await c.response(sid)).status == 200
        with anyio.fail_after(5):
            await h.done.wait()  # then idle: GOAWAY and close
        assert c.goaway is not None and c.goaway.error_code == ErrorCodes.NO_ERROR
