"""bench.client_pool: rawgate's upstream client pool alone, against a minimal fast origin.

Usage: `python -m bench.client_pool [--seconds 3] [--concurrency 64] [--loop uvloop] [--json]`
       (`--quick`: 1 s runs, for a smoke test; `--profile CASE`: cProfile one case, e.g. h2-unary).

What it measures: requests/s through `UpstreamClient.request()` + `read()` (unary, a ~600 B
JSON reply like a small generateContent) and streams/s through `aiter_bytes()` (10 SSE chunks
of ~150 B like a streamGenerateContent), over HTTP/1.1 (one connection per in-flight request)
and h2c (all streams multiplexed on one connection), plus the client's own CPU per request
(the number that matters on a shared machine: the origin runs in another process).

Invariants:
- The origin is a separate process (one asyncio Protocol, pre-encoded replies, no HTTP
  library: HTTP/1.1 by keep-alive head parsing, HTTP/2 by raw frames with a static HPACK block),
  so it costs a few microseconds per request and is never what is measured. It honours the
  client's connection flow-control window.
- Every response is checked inside the timed loop (status and byte count), after a warm-up.
- Each run is bounded by --seconds (<= 10); the origin process is always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.procs import Proc, free_port, stop_all  # noqa: E402
from bench.report import machine_meta  # noqa: E402

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
UNARY_BODY = (
    b'{"candidates":[{"content":{"parts":[{"text":"'
    + b"lorem ipsum " * 40
    + b'"}],"role":"model"},"finishReason":"STOP","index":0}],'
    b'"usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":80,"totalTokenCount":89},'
    b'"modelVersion":"gemini-2.5-flash","responseId":"bench"}'
)
CHUNK = b'data: {"candidates":[{"content":{"parts":[{"text":"' + b"tok " * 20 + b'"}]}}]}\r\n\r\n'
STREAM_CHUNKS = 10
REQUEST_BODY = b'{"contents":[{"role":"user","parts":[{"text":"' + b"hello " * 100 + b'"}]}]}'
MAX_RUN_S = 10.0  # the machine is shared: no run longer than this


# ---- the origin (runs in its own process) ---------------------------------------------------


def _h1_reply(stream: bool) -> bytes:
    if not stream:
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % len(UNARY_BODY)
            + UNARY_BODY
        )
    out = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    for _ in range(STREAM_CHUNKS):
        out += b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK)
    return out + b"0\r\n\r\n"


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + sid.to_bytes(4, "big")
    return head + payload


def _hpack_literal(index: int, value: bytes) -> bytes:
    # literal without indexing, indexed name (4-bit prefix): no dynamic table state at all
    assert index >= 15 and len(value) < 127
    return bytes((0x0F, index - 15, len(value))) + value


class _Origin(asyncio.Protocol):
    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.mode = ""
        self.t: Any = None
        self.window = 65535  # the client's connection window for our DATA
        self.pending: list[tuple[int, bytes]] = []
        self.consumed = 0
        ctype = b"text/event-stream" if stream else b"application/json"
        self.block = b"\x88" + _hpack_literal(31, ctype)  # :status 200, content-type
        self.h1 = _h1_reply(stream)
        self.data = [CHUNK] * STREAM_CHUNKS if stream else [UNARY_BODY]

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.mode:
            if len(self.buf) < len(PREFACE) and PREFACE.startswith(self.buf):
                return
            if self.buf.startswith(PREFACE):
                self.mode = "h2"
                del self.buf[: len(PREFACE)]
                settings = (3).to_bytes(2, "big") + (1024).to_bytes(4, "big")
                self.t.write(
                    _frame(4, 0, 0, settings) + _frame(8, 0, 0, (16 << 20).to_bytes(4, "big"))
                )
            else:
                self.mode = "h1"
        if self.mode == "h1":
            self._h1()
        else:
            self._h2()

    def _h1(self) -> None:
        buf = self.buf
        out = []
        while True:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                break
            head = bytes(buf[:i]).lower()
            j = head.find(b"content-length:")
            n = 0
            if j >= 0:
                end = head.find(b"\r\n", j)
                n = int(head[j + 15 : end if end >= 0 else len(head)])
            if len(buf) < i + 4 + n:
                break
            del buf[: i + 4 + n]
            out.append(self.h1)
        if out:
            self.t.write(b"".join(out))

    def _h2(self) -> None:
        buf = self.buf
        out = []
        while len(buf) >= 9:
            length = int.from_bytes(buf[0:3], "big")
            if len(buf) < 9 + length:
                break
            ftype, flags = buf[3], buf[4]
            sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(buf[9 : 9 + length])
            del buf[: 9 + length]
            if ftype == 4 and not flags & 1:  # SETTINGS -> ACK
                out.append(_frame(4, 1, 0, b""))
            elif ftype == 6 and not flags & 1:  # PING -> ACK
                out.append(_frame(6, 1, 0, payload))
            elif ftype == 1 and flags & 1:  # HEADERS + END_STREAM
                out.append(self._reply(sid))
            elif ftype == 0:
                self.consumed += length
                if self.consumed >= 1 << 20:
                    out.append(_frame(8, 0, 0, self.consumed.to_bytes(4, "big")))
                    self.consumed = 0
                if flags & 1:
                    out.append(self._reply(sid))
            elif ftype == 8 and sid == 0:
                self.window += int.from_bytes(payload, "big") & 0x7FFFFFFF
                out.extend(self._flush_pending())
        if out:
            self.t.write(b"".join(out))

    def _reply(self, sid: int) -> bytes:
        head = _frame(1, 0x4, sid, self.block)
        need = sum(map(len, self.data))
        if self.window < need or self.pending:
            self.pending.append((sid, head))
            return b""
        return head + self._data(sid, need)

    def _data(self, sid: int, need: int) -> bytes:
        self.window -= need
        last = len(self.data) - 1
        return b"".join(_frame(0, 1 if i == last else 0, sid, d) for i, d in enumerate(self.data))

    def _flush_pending(self) -> list[bytes]:
        need = sum(map(len, self.data))
        out = []
        while self.pending and self.window >= need:
            sid, head = self.pending.pop(0)
            out.append(head + self._data(sid, need))
        return out


def serve(unary_port: int, stream_port: int) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    loop = asyncio.new_event_loop()
    for port, stream in ((unary_port, False), (stream_port, True)):
        loop.run_until_complete(
            loop.create_server(lambda s=stream: _Origin(s), "127.0.0.1", port, backlog=1024)
        )
    print("ready", flush=True)
    loop.run_forever()


# ---- the same origin in-process (--inproc): client CPU without the kernel or the machine ----


class _Wire:
    """What `_Origin` writes to (instead of a socket): the client's read buffer."""

    def __init__(self, stream: _InprocStream) -> None:
        self._s = stream

    def write(self, data: bytes) -> None:
        self._s.rx.append(data)
        w = self._s.waiter
        if w is not None and not w.done():
            w.set_result(True)


class _InprocStream:
    """A NetworkStream whose peer is an `_Origin` called synchronously: each write is answered
    before it returns, so a run measures rawgate's own code (plus the few us of the origin)."""

    def __init__(self, stream: bool) -> None:
        self.rx: list[bytes] = []
        self.waiter: asyncio.Future[bool] | None = None
        self.origin = _Origin(stream)
        self.origin.connection_made(_Wire(self))

    async def read(self, max_bytes: int, timeout: float | None, error: Any = None) -> bytes:
        while not self.rx:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        data = b"".join(self.rx)
        self.rx.clear()
        return data

    async def write(self, data: bytes, timeout: float | None) -> None:
        self.origin.data_received(data)
        # A real exchange always waits for its answer once: yield here like it would (and
        # so that the clock task runs; with answers always ready nothing else would yield).
        await asyncio.sleep(0)

    async def start_tls(self, *a: Any) -> _InprocStream:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass

    @property
    def alpn_protocol(self) -> str | None:
        return None

    def is_readable(self) -> bool:
        return False


class _InprocBackend:
    def __init__(self, stream: bool) -> None:
        self.stream = stream

    async def connect_tcp(self, host: str, port: int, timeout: float | None) -> Any:
        return _InprocStream(self.stream)


# ---- the client side ------------------------------------------------------------------------


async def run_case(
    proto: str,
    kind: str,
    port: int,
    seconds: float,
    warm: float,
    concurrency: int,
    inproc: bool = False,
) -> dict[str, Any]:
    import anyio

    from rawgate.config import TimeoutsConfig, UpstreamConfig
    from rawgate.upstream.client import UpstreamClient

    cfg = UpstreamConfig(
        cleartext_http2="off" if proto == "h1" else "prior_knowledge",
        max_connections=max(concurrency, 1),
        max_keepalive_connections=max(concurrency, 1),
    )
    stream = kind == "stream"
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    url = f"http://127.0.0.1:{port}/v1beta/models/gemini-2.5-flash:{method}"
    headers = [(b"content-type", b"application/json"), (b"x-goog-api-key", b"bench-key")]
    expect = len(CHUNK) * STREAM_CHUNKS if stream else len(UNARY_BODY)
    done = 0
    chunks = 0
    errors = 0

    backend = _InprocBackend(stream) if inproc else None
    async with UpstreamClient(cfg, TimeoutsConfig(), backend=backend) as client:  # type: ignore[arg-type]

        async def worker() -> None:
            nonlocal done, chunks, errors
            while True:
                r = await client.request("POST", url, headers, REQUEST_BODY)
                n = 0
                if stream:
                    async for c in r.aiter_bytes():
                        n += len(c)
                        chunks += 1
                else:
                    n = len(await r.read())
                if r.status != 200 or n != expect:
                    errors += 1
                done += 1

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
            await anyio.sleep(warm)
            d0, c0, t0, ru0 = done, chunks, time.perf_counter(), _rusage()
            await anyio.sleep(seconds)
            d1, c1, t1, ru1 = done, chunks, time.perf_counter(), _rusage()
            conns = sum(len(p.conns) for p in client.pools)
            tg.cancel_scope.cancel()
    n = d1 - d0
    wall = t1 - t0
    if errors:
        raise SystemExit(f"{proto}-{kind}: {errors} bad responses")
    return {
        "case": f"{proto}-{kind}" + (" (in-process)" if inproc else ""),
        "proto": proto,
        "kind": kind,
        "concurrency": concurrency,
        "seconds": round(wall, 3),
        "requests": n,
        "req_per_s": round(n / wall, 1),
        "chunks_per_s": round((c1 - c0) / wall, 1) if stream else None,
        "client_cpu_us_per_req": round((sum(ru1) - sum(ru0)) / max(n, 1) * 1e6, 1),
        "client_user_us_per_req": round((ru1[0] - ru0[0]) / max(n, 1) * 1e6, 1),
        "client_sys_us_per_req": round((ru1[1] - ru0[1]) / max(n, 1) * 1e6, 1),
        "connections": conns,
    }


def _rusage() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.client_pool", description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per case (<= 10)")
    ap.add_argument("--warm", type=float, default=0.5, help="warm-up per case, not measured")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    ap.add_argument("--cases", default="h1-unary,h2-unary,h1-stream,h2-stream")
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    ap.add_argument("--quick", action="store_true", help="1 s cases (smoke test)")
    ap.add_argument("--profile", metavar="CASE", help="cProfile one case, print the top 25")
    ap.add_argument(
        "--inproc",
        action="store_true",
        help="also run each case against the origin in-process (no sockets): client CPU only",
    )
    ap.add_argument(
        "--serve", nargs=2, type=int, metavar=("UNARY", "STREAM"), help=argparse.SUPPRESS
    )
    a = ap.parse_args(argv)
    if a.serve:
        serve(*a.serve)
        return
    seconds = 1.0 if a.quick else min(a.seconds, MAX_RUN_S)
    warm = 0.2 if a.quick else a.warm
    ports = {"unary": free_port(), "stream": free_port()}
    origin = Proc(
        "client-pool-origin",
        [sys.executable, "-m", "bench.client_pool", "--serve", *map(str, ports.values())],
        port=ports["unary"],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    results = []
    try:
        origin.start().wait_ready(10.0)
        import anyio

        opts = {"use_uvloop": a.loop == "uvloop"}
        cases = [a.profile] if a.profile else a.cases.split(",")
        for case in cases:
            proto, kind = case.split("-")

            async def one(
                proto: str = proto, kind: str = kind, inproc: bool = False
            ) -> dict[str, Any]:
                return await run_case(
                    proto, kind, ports[kind], seconds, warm, a.concurrency, inproc
                )

            if a.profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
                res = anyio.run(one, proto, kind, a.inproc, backend="asyncio", backend_options=opts)
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            else:
                res = anyio.run(one, backend="asyncio", backend_options=opts)
            results.append(res)
            if a.inproc and not a.profile:
                results.append(anyio.run(one, proto, kind, True, backend="asyncio",
                                         backend_options=opts))
    finally:
        origin.stop()
        stop_all()
    meta = machine_meta(ROOT, a.loop, pinned=False)
    if a.json:
        for r in results:
            print(json.dumps({**r, **meta}))
        return
    print(f"# client pool alone, {a.loop}, concurrency {a.concurrency}, commit {meta['commit']}")
    print("| case | req/s | chunks/s | client CPU us/req (user + sys) | connections |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        cps = f"{r['chunks_per_s']:,.0f}" if r["chunks_per_s"] else "-"
        print(
            f"| {r['case']} | {r['req_per_s']:,.0f} | {cps} | {r['client_cpu_us_per_req']:.0f} "
            f"({r['client_user_us_per_req']:.0f} + {r['client_sys_us_per_req']:.0f}) "
            f"| {r['connections']} |"
        )


if __name__ == "__main__":
    main()
