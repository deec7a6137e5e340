"""In-process gateway micro-benchmark: `python -m bench.gateway_micro`.

The whole request path above the sockets, on one core: the app (routing, auth off, access record,
metrics) -> the gateway's route (decode, model router, mapping) -> the attempt loop (scheduler
pick/acquire/release, upstream request build) -> a canned upstream answer -> render or the stream
pump (SSE decode, transcode, one sink write per upstream read) -> an in-memory sink. No network,
no upstream latency: what is left is rawgate's own CPU per request, the part the front seam and
the attempt loop could make slower.

It uses only the public surface (GatewayApp, Gateway(client=...), Gateway.install) so the same
file runs against older trees for a before/after comparison (PYTHONPATH=<old tree>).

Cases (best of --repeat runs of about --seconds each; rates per CPU second of this process, so a
busy shared machine skews them less than wall time would):
- chat non-stream / responses non-stream: one request, a ~400-byte text answer.
- chat stream / responses stream: one request, an upstream body of --chunks SSE events delivered
  in 16 KiB reads.

`--request-log` adds what `serve` attaches with `[log] request_log = true` (rawgate.cli.stack's
observer: the row built from the finished request and queued), so with/without is the request
log's cost on the request path (issue 17's goal: under 10 us per request). The writer thread is
not started (its SQLite writes are off the request path); the queue is emptied every
RLOG_DRAIN rows, as the writer would, so the row queue neither grows nor wakes a writer.
`--request-log-writer` starts the writer too (real SQLite batches in a temporary
requests.db): the rates then include its CPU (process time counts every thread) and what the
event-loop thread pays for sharing the GIL with it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import orjson

from rawgate.accounts.store import Account
from rawgate.config import build_config
from rawgate.gateway.core import Gateway
from rawgate.http.app import GatewayApp
from rawgate.seam import Request

READ_BYTES = 16 * 1024
# --request-log: rows queued before the bench empties the queue (the writer wakes at 1,000).
RLOG_DRAIN = 500


def _chunk(i: int, last: bool) -> bytes:
    cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": f"word{i} " * 4}]}}
    doc: dict[str, Any] = {"candidates": [cand], "modelVersion": "gemini-2.5-flash"}
    if last:
        cand["finishReason"] = "STOP"
        doc["usageMetadata"] = {"promptTokenCount": 5, "candidatesTokenCount": 40}
    return orjson.dumps(doc)


def _stream_body(n: int) -> list[bytes]:
    body = b"".join(b"data: " + _chunk(i, i == n - 1) + b"\r\n\r\n" for i in range(n))
    return [body[i : i + READ_BYTES] for i in range(0, len(body), READ_BYTES)]


_WHOLE = orjson.dumps(
    {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": "lorem ipsum " * 32}]},
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 40},
        "modelVersion": "gemini-2.5-flash",
        "responseId": "r1",
    }
)


class _Resp:
    def __init__(self, pieces: list[bytes] | None) -> None:
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = []
        self._pieces = list(pieces) if pieces is not None else None

    async def read(self, max_bytes: int | None = None) -> bytes:
        return _WHOLE

    async def receive_within(self, quiet_s: float | None) -> bytes | None:
        assert self._pieces is not None
        return self._pieces.pop(0) if self._pieces else b""

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> _Resp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


class _Client:
    """Stands in for UpstreamClient: a canned 200, streamed when the URL asks for SSE."""

    def __init__(self, stream_pieces: list[bytes]) -> None:
        self.pieces = stream_pieces

    async def request(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
    ) -> _Resp:
        return _Resp(self.pieces if "alt=sse" in url else None)

    async def __aenter__(self) -> _Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


class _Sink:
    __slots__ = ("_status", "bytes_sent", "ended")

    def __init__(self) -> None:
        self._status = 0
        self.bytes_sent = 0
        self.ended = False

    @property
    def started(self) -> bool:
        return self._status != 0

    @property
    def status(self) -> int:
        return self._status

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._status = status

    async def send(self, data: bytes) -> None:
        self.bytes_sent += len(data)

    async def end(self, data: bytes = b"") -> None:
        self.bytes_sent += len(data)
        self.ended = True

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self._status = status
        self.bytes_sent += len(body)
        self.ended = True


_H = [(b"content-type", b"application/json"), (b"host", b"127.0.0.1")]


def _request(path: str, body: bytes) -> Request:
    return Request("POST", path.encode(), path, "", list(_H), body)


async def _run(
    seconds: float, repeat: int, chunks: int, count: tuple[str, int] | None = None,
    request_log: bool = False, writer: bool = False,
) -> list[tuple[str, float, str]]:
    cfg = build_config({"auth": {"mode": "off"}, "log": {"access_log": False}}, {}, {})
    acc = Account(id="bench", kind="api_key", api_key="bench-key", label="bench")
    out: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as home:
        client: Any = _Client(_stream_body(chunks))
        async with Gateway(cfg, home=Path(home), client=client, demo_accounts=[acc]) as gw:
            app = GatewayApp(cfg)
            gw.install(app)
            queue: Any = None
            close_log: Any = None
            logged = 0  # rows the request log queued (proof the observer ran)
            if request_log:  # only then: older trees (before/after runs) lack these
                from rawgate.cli.stack import _observe
                from rawgate.monitor.request_log import RequestLog

                rlog = RequestLog(Path(home) / "requests.db", queue_max=1 << 30)
                try:  # since the dashboard, the observer also feeds the per-minute rate ring
                    from rawgate.monitor.rates import RateRing
                except ImportError:  # an older tree (before/after runs)
                    _observe(app, rlog)  # type: ignore[call-arg,unused-ignore]
                else:
                    _observe(app, rlog, RateRing())
                if writer:
                    rlog.start()
                    close_log = rlog.close
                else:
                    queue = rlog._q
            chat = orjson.dumps(
                {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
            )
            chat_s = orjson.dumps(
                {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            )
            resp = b'{"model":"gpt-5","input":"hi","store":false}'
            resp_s = b'{"model":"gpt-5","input":"hi","store":false,"stream":true}'
            cases = [
                ("gateway chat non-stream", "/v1/chat/completions", chat, "req/s", 1),
                ("gateway responses non-stream", "/v1/responses", resp, "req/s", 1),
                ("gateway chat stream", "/v1/chat/completions", chat_s, "chunks/s", chunks),
                ("gateway responses stream", "/v1/responses", resp_s, "chunks/s", chunks),
            ]
            if count is not None:  # exactly N requests of one case, nothing timed
                name, path, body, _, _ = next(c for c in cases if c[0] == count[0])
                for _ in range(count[1]):
                    await app(_request(path, body), _Sink())
                    if queue is not None and len(queue) >= RLOG_DRAIN:
                        queue.clear()
                if close_log is not None:
                    close_log()
                return []
            for name, path, body, unit, per in cases:
                best = 0.0
                for _ in range(repeat):
                    n = 0
                    # CPU time of this process (the box may be shared); the run lasts `seconds`.
                    c0 = time.process_time()
                    deadline = time.perf_counter() + seconds
                    while True:
                        sink = _Sink()
                        await app(_request(path, body), sink)
                        if sink.status != 200 or not sink.ended:
                            raise SystemExit(f"{name}: status {sink.status}")
                        if queue is not None and len(queue) >= RLOG_DRAIN:
                            logged += len(queue)
                            queue.clear()
                        n += 1
                        if time.perf_counter() >= deadline:
                            break
                    best = max(best, n * per / max(time.process_time() - c0, 1e-9))
                out.append((name, best, unit))
            if queue is not None:
                print(f"request log: {logged + len(queue)} rows queued", file=sys.stderr)
            if close_log is not None:
                close_log()
                print(f"request log: {rlog.written} rows written", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.gateway_micro", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="short runs (CI smoke test)")
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    ap.add_argument("--seconds", type=float, default=0.5, help="length of one run")
    ap.add_argument("--repeat", type=int, default=5, help="runs per case (best is kept)")
    ap.add_argument("--chunks", type=int, default=100, help="upstream chunks per stream")
    ap.add_argument(
        "--count",
        nargs=2,
        metavar=("CASE", "N"),
        help="run exactly N requests of CASE (e.g. 'gateway chat non-stream' 1000) and print"
        " nothing: for an instruction count, `valgrind --tool=cachegrind --cache-sim=no` with"
        " N and with 0, divided by N (deterministic where wall time on a shared box is not)",
    )
    ap.add_argument("--request-log", action="store_true",
                    help="with the request log's observer attached, as `serve` does by default")
    ap.add_argument("--request-log-writer", action="store_true",
                    help="--request-log and its writer thread running (SQLite batches)")
    args = ap.parse_args(argv)
    seconds, repeat = (0.05, 1) if args.quick else (args.seconds, args.repeat)
    count = (args.count[0], int(args.count[1])) if args.count else None
    results = anyio.run(_run, seconds, repeat, args.chunks, count,
                        args.request_log or args.request_log_writer, args.request_log_writer)
    if count is not None:
        return 0
    meta = {"python": platform.python_version(), "machine": platform.machine()}
    if args.json:
        for name, value, unit in results:
            print(json.dumps({"bench": name, "value": round(value, 1), "unit": unit, **meta}))
    else:
        print(f"rawgate in-process gateway (Python {meta['python']}, one core, best of {repeat})")
        for name, value, unit in results:
            per = 1e6 / value if value else 0.0
            print(f"  {name:<32} {value:>12,.0f} {unit:<9} ({per:7.2f} us each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
