"""bench.loadgen: the harness's own HTTP load generator (anyio + h11 / h2), one process per run.

Run as `python -m bench.loadgen SPEC.json` (or `-` for stdin); it prints one JSON object on stdout.

Invariants:
- Every response is checked inside the timed loop (status, byte count, markers such as
  `data: [DONE]` or `response.completed`, SSE event count): a fast run that did no work cannot
  pass, and every failure is counted by kind, never dropped.
- Bounded in count and time: a run stops issuing at `duration_s` (or after `max_requests`) and
  gives in-flight requests at most `timeout_s` more; each request has its own `timeout_s`.
- Closed loop: C workers, each with its own HTTP/1.1 keep-alive connection, or C streams spread
  over N HTTP/2 connections; latency is measured from the moment a worker sends.
- Open loop: request i is due at t0 + i / rate whatever happened before; latency is measured from
  that scheduled time, so a stalled server shows up in the percentiles (no coordinated omission).
- Connections are opened before the clock starts (closed loop) so the numbers describe requests;
  an open-loop run opens connections on demand up to `concurrency` and that cost is included.
- Warm-up (`warmup_s`) runs the same loop on the same connections and is discarded.
- On stderr, `@bench start` / `@bench end` lines mark the measured window so the orchestrator
  can read the servers' CPU time and RSS over exactly that window.
"""

from __future__ import annotations

import array
import json
import math
import os
import resource
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal

import anyio
import h11
import msgspec

# Big reads: an SSE stream of 100 chunks arrives in a few segments; 64 KiB per receive() halves
# the number of event-loop round trips compared with 16 KiB on a 20 KB response.
RECV_BYTES = 65536
# HTTP/2 receive windows: large enough that the server is never flow-control bound on a
# benchmark stream (16 MiB per stream, 1 GiB for the connection).
H2_STREAM_WINDOW = 1 << 24
H2_CONN_WINDOW = 1 << 30
# How many error samples (kind + detail) a run keeps for the report.
MAX_ERROR_SAMPLES = 5
# Default number of points in the latency CDF written for plots.
CDF_POINTS = 200


class Check(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a good response looks like. Empty fields are not checked."""

    status: int = 200
    min_bytes: int = 0
    max_bytes: int = 0  # 0: no upper bound
    contains: tuple[str, ...] = ()
    tail: str = ""  # the body, right-stripped, must end with this
    min_events: int = 0  # occurrences of b"data:" (SSE events)


class Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One load-generator run."""

    host: str
    port: int
    path: str
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""
    proto: Literal["h1", "h2"] = "h1"
    mode: Literal["closed", "open"] = "closed"
    concurrency: int = 1  # closed: workers; open: max requests in flight
    connections: int = 1  # h2 only: streams are spread over this many connections
    rate: float = 0.0  # open loop: requests per second
    duration_s: float = 5.0
    warmup_s: float = 0.0
    max_requests: int = 0  # 0: bounded by duration only
    timeout_s: float = 30.0
    check: Check = Check()
    cdf_points: int = CDF_POINTS
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    h1_parser: Literal["fast", "h11"] = "fast"  # h11: the strict (slower) response parser


# ---------------------------------------------------------------------------------------------
# Pure parts: checks and statistics (unit-tested in tests/e2e/test_bench.py).


class Checker:
    """A `Check` with its markers encoded once, so the per-response test is a few C calls."""

    __slots__ = ("contains", "max_bytes", "min_bytes", "min_events", "status", "tail")

    def __init__(self, check: Check) -> None:
        self.status = check.status
        self.min_bytes = check.min_bytes
        self.max_bytes = check.max_bytes
        self.contains = tuple(m.encode() for m in check.contains)
        self.tail = check.tail.encode()
        self.min_events = check.min_events

    def __call__(self, status: int, body: bytes) -> str | None:
        """None when the response is good, else the error kind."""
        if status != self.status:
            return f"status_{status}"
        n = len(body)
        if n < self.min_bytes:
            return "short_body"
        if self.max_bytes and n > self.max_bytes:
            return "long_body"
        for marker in self.contains:
            if marker not in body:
                return "missing_marker"
        if self.tail and not body.rstrip().endswith(self.tail):
            return "bad_tail"
        if self.min_events and body.count(b"data:") < self.min_events:
            return "few_events"
        return None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's
    default), of an ascending sequence; NaN when empty."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    if n == 1:
        return float(sorted_values[0])
    pos = (n - 1) * min(max(q, 0.0), 100.0) / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def summarize(values_s: Sequence[float]) -> dict[str, float]:
    """Latency summary in milliseconds from values in seconds."""
    v = sorted(values_s)
    if not v:
        return {"n": 0}
    ms = 1000.0
    return {
        "n": len(v),
        "min": v[0] * ms,
        "mean": sum(v) / len(v) * ms,
        "p50": percentile(v, 50) * ms,
        "p90": percentile(v, 90) * ms,
        "p99": percentile(v, 99) * ms,
        "p999": percentile(v, 99.9) * ms,
        "max": v[-1] * ms,
    }


def cdf(values_s: Sequence[float], points: int = CDF_POINTS) -> list[list[float]]:
    """[[latency_ms, fraction], ...] at `points` evenly spaced fractions plus the tail
    (0.99, 0.995, 0.999), for plotting a latency CDF without shipping every sample."""
    v = sorted(values_s)
    if not v or points < 2:
        return []
    qs = sorted({i / (points - 1) for i in range(points)} | {0.99, 0.995, 0.999})
    return [[round(percentile(v, q * 100) * 1000.0, 4), round(q, 4)] for q in qs]


class Stats:
    """What one measured window collected."""

    def __init__(self) -> None:
        self.latency = array.array("d")
        self.ttfb = array.array("d")
        self.ok = 0
        self.bytes = 0
        self.events = 0
        self.errors: dict[str, int] = {}
        self.samples: list[dict[str, str]] = []
        self.late = array.array("d")  # open loop: send time minus scheduled time

    def error(self, kind: str, detail: str = "") -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append({"kind": kind, "detail": detail[:300]})


def result_json(
    spec: Spec, stats: Stats, elapsed: float, loop: str, cpu_s: float
) -> dict[str, Any]:
    ok = stats.ok
    out: dict[str, Any] = {
        "ok": ok,
        "errors": dict(sorted(stats.errors.items())),
        "error_total": sum(stats.errors.values()),
        "error_samples": stats.samples,
        "elapsed_s": round(elapsed, 6),
        "rps": ok / elapsed if elapsed > 0 else 0.0,
        "bytes": stats.bytes,
        "events": stats.events,
        "events_per_s": stats.events / elapsed if elapsed > 0 else 0.0,
        "latency_ms": summarize(stats.latency),
        "ttfb_ms": summarize(stats.ttfb),
        "cdf": cdf(stats.latency, spec.cdf_points),
        "loadgen_cpu_s": round(cpu_s, 4),
        "loadgen_cpu_util": cpu_s / elapsed if elapsed > 0 else 0.0,
        # Requests per CPU-second of this process: its speed even when it shares its core.
        "rps_per_cpu_s": ok / cpu_s if cpu_s > 0 else 0.0,
        "loadgen_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loop": loop,
        "proto": spec.proto,
        "mode": spec.mode,
        "concurrency": spec.concurrency,
        "connections": spec.connections if spec.proto == "h2" else spec.concurrency,
        "rate": spec.rate,
    }
    if spec.mode == "open":
        out["late_ms"] = summarize(stats.late)
    return out


# ---------------------------------------------------------------------------------------------
# Drivers.


class ResponseError(Exception):
    """The exchange failed at the protocol level (kind is the error counter's name)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail


def _nodelay(stream: anyio.abc.SocketStream) -> None:
    # anyio sets TCP_NODELAY on connect_tcp already; set it again so a change there can never
    # bring back the 40 ms Nagle x delayed-ACK stall (peers.md 2b) into the client side.
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class H1Parser:
    """Incremental HTTP/1.1 response parser (sans-IO): `feed(data)` until it returns True.

    The load generator's hot path: h11 spends ~60 % of the client's CPU per request (cProfile,
    16 keep-alive connections against a fixed-response server: 4,900 req/s with h11 vs
    the numbers in bench/README.md with this parser). It handles what a server may send to a
    client that does not pipeline: 1xx interim responses (skipped), Content-Length, chunked and
    close-delimited bodies. Anything else is a protocol error. `h11` stays available as the
    strict parser (`Spec.h1_parser = "h11"`).
    """

    __slots__ = ("_buf", "_mode", "_remaining", "body", "body_len", "keep_alive", "status")

    # _mode: 0 head, 1 content-length body, 2 chunk size line, 3 chunk data, 4 chunk CRLF,
    # 5 trailers, 6 until close, 7 done
    def __init__(self) -> None:
        self._buf = b""
        self._mode = 0
        self._remaining = 0
        self.status = 0
        self.body: list[bytes] = []
        self.body_len = 0
        self.keep_alive = True

    def feed(self, data: bytes) -> bool:
        """Consume bytes; True when the response is complete. b"" means the peer closed."""
        if not data:
            if self._mode == 6:
                self._mode = 7
                self.keep_alive = False
                return True
            raise ResponseError("closed_early", f"status {self.status}, {self.body_len} bytes")
        buf = self._buf + data if self._buf else data
        self._buf = b""
        while True:
            mode = self._mode
            if mode == 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        raise ResponseError("protocol_error", "response head over 64 KiB")
                    self._buf = buf
                    return False
                self._head(buf[:end])
                buf = buf[end + 4 :]
            elif mode == 1 or mode == 3:  # n more body bytes: all of it, or one chunk's data
                n = self._remaining
                if len(buf) < n:
                    self._take(buf)
                    self._remaining = n - len(buf)
                    return False
                self._take(buf[:n])
                buf = buf[n:]
                if mode == 1:
                    return self._finish(buf)
                self._mode = 4
            elif mode == 2:
                end = buf.find(b"\r\n")
                if end < 0:
                    self._buf = buf
                    return False
                try:
                    size = int(buf[:end].split(b";", 1)[0], 16)
                except ValueError:
                    raise ResponseError("protocol_error", f"bad chunk size {buf[:end]!r}")
                buf = buf[end + 2 :]
                if size == 0:
                    self._mode = 5
                else:
                    self._remaining = size
                    self._mode = 3
            elif mode == 4:
                if len(buf) < 2:
                    self._buf = buf
                    return False
                if buf[:2] != b"\r\n":
                    raise ResponseError("protocol_error", "chunk not followed by CRLF")
                buf = buf[2:]
                self._mode = 2
            elif mode == 5:
                end = buf.find(b"\r\n")
                if end < 0:
                    self._buf = buf
                    return False
                line, buf = buf[:end], buf[end + 2 :]
                if not line:  # the empty line after the (usually absent) trailers
                    return self._finish(buf)
            elif mode == 6:
                self._take(buf)
                return False
            else:
                raise ResponseError("protocol_error", "data after the response")

    def _take(self, part: bytes) -> None:
        if part:
            self.body.append(part)
            self.body_len += len(part)

    def _finish(self, rest: bytes) -> bool:
        if rest:  # this client never pipelines, so a server must not send more
            raise ResponseError("protocol_error", f"{len(rest)} bytes after the response")
        self._mode = 7
        return True

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ResponseError("protocol_error", f"bad status line {lines[0][:80]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise ResponseError("protocol_error", f"bad status line {lines[0][:80]!r}")
        if 100 <= status < 200:  # interim response: the real one follows
            return
        self.status = status
        length = -1
        chunked = False
        keep = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif name == b"connection":
                v = value.strip().lower()
                keep = b"close" not in v and (keep or b"keep-alive" in v)
        self.keep_alive = keep
        if status in (204, 304):
            self._mode = 1
            self._remaining = 0
        elif chunked:
            self._mode = 2
        elif length >= 0:
            self._mode = 1
            self._remaining = length
        else:
            self._mode = 6
            self.keep_alive = False


class H1Client:
    """One HTTP/1.1 keep-alive connection used by one worker at a time."""

    def __init__(self, host: str, port: int, strict: bool = False) -> None:
        self.host = host
        self.port = port
        self.strict = strict
        self.stream: anyio.abc.SocketStream | None = None
        self.conn = h11.Connection(h11.CLIENT)

    async def connect(self) -> None:
        self.stream = await anyio.connect_tcp(self.host, self.port)
        _nodelay(self.stream)
        self.conn = h11.Connection(h11.CLIENT)

    async def close(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def exchange(
        self, raw: bytes, req: h11.Request, body: h11.Data | None
    ) -> tuple[int, bytes, float]:
        """Send one request, read the whole response: (status, body, time of first body byte).
        `raw` is the request's bytes, made once by h11; `req`/`body` drive the strict path."""
        if self.stream is None:
            await self.connect()
        if self.strict:
            return await self._exchange_h11(req, body)
        stream = self.stream
        assert stream is not None
        await stream.send(raw)
        p = H1Parser()
        t_first = 0.0
        while True:
            try:
                data = await stream.receive(RECV_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                data = b""
            done = p.feed(data)
            if not t_first and p.body_len:
                t_first = time.perf_counter()
            if done:
                break
        if not p.keep_alive:
            await self.close()
        body_out = p.body[0] if len(p.body) == 1 else b"".join(p.body)
        return p.status, body_out, t_first

    async def _exchange_h11(
        self, req: h11.Request, body: h11.Data | None
    ) -> tuple[int, bytes, float]:
        stream = self.stream
        assert stream is not None
        conn = self.conn
        out = conn.send(req)
        if body is not None:
            out += conn.send(body)
        out += conn.send(_EOM)
        await stream.send(out)
        status = 0
        chunks: list[bytes] = []
        t_first = 0.0
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise ResponseError("protocol_error", str(e))
            if ev is h11.NEED_DATA:
                try:
                    data = await stream.receive(RECV_BYTES)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    data = b""
                conn.receive_data(data)
                continue
            t = type(ev)
            if t is h11.Data:
                if not t_first:
                    t_first = time.perf_counter()
                chunks.append(ev.data)  # type: ignore[union-attr]
            elif t is h11.Response:
                status = ev.status_code  # type: ignore[union-attr]
            elif t is h11.EndOfMessage:
                break
            elif t is h11.ConnectionClosed:
                raise ResponseError("closed_early", f"status {status}, {len(chunks)} chunks")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:  # the server will close (Connection: close): open a fresh one next time
            await self.close()
        return status, b"".join(chunks) if len(chunks) != 1 else chunks[0], t_first


_EOM = h11.EndOfMessage()


class _H2Stream:
    __slots__ = ("chunks", "done", "error", "status", "t_first")

    def __init__(self) -> None:
        self.status = 0
        self.chunks: list[bytes] = []
        self.t_first = 0.0
        self.error: ResponseError | None = None
        self.done = anyio.Event()


class H2Client:
    """One HTTP/2 (h2c prior knowledge) connection shared by several workers' streams."""

    def __init__(self, host: str, port: int) -> None:
        import h2.config
        import h2.connection

        self.host = host
        self.port = port
        cfg = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            # The headers are built once by this module and are valid; h2's per-send validation
            # and normalisation cost ~15 % of the client's time per request.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(cfg)
        self.stream: anyio.abc.SocketStream | None = None
        self.streams: dict[int, _H2Stream] = {}
        self.send_lock = anyio.Lock()
        self.window_open = anyio.Event()
        self.stream_freed = anyio.Event()  # set (and replaced) whenever a stream closes
        self.settings_seen = anyio.Event()  # the server's first SETTINGS (its stream limit)
        self.dead: ResponseError | None = None

    async def connect(self, tg: anyio.abc.TaskGroup) -> None:
        from h2.settings import SettingCodes

        self.stream = await anyio.connect_tcp(self.host, self.port)
        _nodelay(self.stream)
        self.h2.initiate_connection()
        self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: H2_STREAM_WINDOW})
        self.h2.increment_flow_control_window(H2_CONN_WINDOW - 65535)
        await self._flush()
        tg.start_soon(self._reader)

    async def close(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            with anyio.CancelScope(shield=True):
                try:
                    self.h2.close_connection()
                    await stream.send(self.h2.data_to_send())
                except Exception:  # the peer may be gone already; closing is best effort
                    pass
                await stream.aclose()

    async def _flush(self) -> None:
        # The bytes are taken under the lock so frames leave in the order h2 produced them.
        async with self.send_lock:
            data = self.h2.data_to_send()
            if data and self.stream is not None:
                await self.stream.send(data)

    def _fail_all(self, err: ResponseError) -> None:
        self.dead = err
        self.stream_freed.set()
        self.settings_seen.set()
        for st in self.streams.values():
            if st.error is None:
                st.error = err
            st.done.set()
        self.streams.clear()
        self.window_open.set()

    async def _reader(self) -> None:
        import h2.events as ev

        stream = self.stream
        assert stream is not None
        h2c = self.h2
        try:
            while True:
                try:
                    data = await stream.receive(RECV_BYTES)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self._fail_all(ResponseError("closed_early", "h2 connection closed"))
                    return
                try:
                    events: list[Any] = h2c.receive_data(data)
                except Exception as exc:  # h2.exceptions.ProtocolError and friends
                    self._fail_all(ResponseError("protocol_error", repr(exc)))
                    return
                for e in events:
                    t = type(e)
                    if t is ev.DataReceived:
                        st = self.streams.get(e.stream_id)
                        if e.flow_controlled_length:
                            h2c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                        if st is not None:
                            if not st.t_first:
                                st.t_first = time.perf_counter()
                            st.chunks.append(e.data)
                    elif t is ev.ResponseReceived:
                        st = self.streams.get(e.stream_id)
                        if st is not None:
                            for k, v in e.headers:
                                if k == b":status":
                                    st.status = int(v)
                                    break
                    elif t is ev.StreamEnded:
                        st = self.streams.pop(e.stream_id, None)
                        if st is not None:
                            st.done.set()
                        self._freed()
                    elif t is ev.StreamReset:
                        st = self.streams.pop(e.stream_id, None)
                        if st is not None:
                            st.error = ResponseError("stream_reset", f"code {e.error_code}")
                            st.done.set()
                        self._freed()
                    elif t is ev.WindowUpdated:
                        self.window_open.set()
                    elif t is ev.RemoteSettingsChanged:
                        self.settings_seen.set()
                        self._freed()  # the stream limit may have grown
                    elif t is ev.ConnectionTerminated:
                        self._fail_all(
                            ResponseError("goaway", f"code {e.error_code} {e.additional_data!r}")
                        )
                        return
                await self._flush()  # WINDOW_UPDATEs, PING and SETTINGS acks
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as e:  # never let one connection's failure kill the whole run
            self._fail_all(ResponseError("client_error", repr(e)))

    def _freed(self) -> None:
        self.stream_freed.set()
        self.stream_freed = anyio.Event()

    async def exchange(
        self, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, bytes, float]:
        if self.dead is not None:
            raise self.dead
        h2c = self.h2
        if not self.settings_seen.is_set():
            await self.settings_seen.wait()
        # More workers than the server's MAX_CONCURRENT_STREAMS on this connection: wait for a
        # stream to close rather than have h2 refuse the new one.
        while h2c.open_outbound_streams >= h2c.remote_settings.max_concurrent_streams:
            await self.stream_freed.wait()
            if self.dead is not None:
                raise self.dead
        sid = h2c.get_next_available_stream_id()
        st = _H2Stream()
        self.streams[sid] = st
        try:
            h2c.send_headers(sid, headers, end_stream=not body)
            view = memoryview(body)
            while view:
                window = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
                if window <= 0:
                    if self.window_open.is_set():  # every waiter shares one event
                        self.window_open = anyio.Event()
                    await self._flush()
                    await self.window_open.wait()
                    if self.dead is not None:
                        raise self.dead
                    continue
                part = view[:window]
                view = view[window:]
                h2c.send_data(sid, part.tobytes(), end_stream=not view)
            await self._flush()
            await st.done.wait()
        except BaseException:
            if self.streams.pop(sid, None) is not None and self.dead is None:
                try:  # a cancelled or failed stream is reset so the connection stays usable
                    h2c.reset_stream(sid)
                except Exception:
                    pass
            raise
        if st.error is not None:
            raise st.error
        body_out = b"".join(st.chunks) if len(st.chunks) != 1 else st.chunks[0]
        return st.status, body_out, st.t_first


class Runner:
    """Runs a Spec: connects, warms up, measures, and returns the result dict."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.check = Checker(spec.check)
        self.strict = spec.h1_parser == "h11"
        body = spec.body.encode()
        self.body = body
        hdrs = [(k.lower().encode(), v.encode()) for k, v in spec.headers]
        names = {k for k, _ in hdrs}
        authority = f"{spec.host}:{spec.port}".encode()
        if spec.proto == "h1":
            h1_headers = [(b"host", authority), *hdrs]
            if body and b"content-length" not in names:
                h1_headers.append((b"content-length", str(len(body)).encode()))
            # Built once: h11 validates headers when the event is made, not when it is sent.
            self.h1_req = h11.Request(method=spec.method, target=spec.path, headers=h1_headers)
            self.h1_body = h11.Data(data=body) if body else None
            once = h11.Connection(h11.CLIENT)
            self.h1_raw = once.send(self.h1_req) + (
                once.send(self.h1_body) if self.h1_body else b""
            )
        self.h2_headers = [
            (b":method", spec.method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", spec.path.encode()),
            *[(k, v) for k, v in hdrs if k not in (b"host", b"connection")],
        ]
        if body and b"content-length" not in names:
            self.h2_headers.append((b"content-length", str(len(body)).encode()))
        self.stats = Stats()
        self.measuring = False
        self.stop_at = 0.0
        self.issued = 0
        self.cpu_s = 0.0  # this process's CPU time over the measured window

    # -- one exchange, checked --------------------------------------------------------------

    async def one(self, client: H1Client | H2Client, t_sched: float) -> bool:
        """One checked exchange; False when the connection should be replaced."""
        spec = self.spec
        t0 = time.perf_counter()
        if t_sched == 0.0:
            t_sched = t0
        keep = True
        kind: str | None = None
        detail = ""
        status = 0
        body = b""
        t_first = 0.0
        try:
            with anyio.fail_after(spec.timeout_s):
                if isinstance(client, H1Client):
                    status, body, t_first = await client.exchange(
                        self.h1_raw, self.h1_req, self.h1_body
                    )
                else:
                    status, body, t_first = await client.exchange(self.h2_headers, self.body)
        except TimeoutError:
            kind, detail, keep = "timeout", f"no complete response in {spec.timeout_s} s", False
        except ResponseError as e:
            kind, detail, keep = e.kind, e.detail, False
        except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as e:
            kind, detail, keep = "connection_error", repr(e), False
        except Exception as e:  # e.g. an h2 state error: counted, and the run goes on
            kind, detail, keep = "client_error", repr(e), False
        if kind is None:
            kind = self.check(status, body)
            if kind is not None:
                detail = body[:200].decode("utf-8", "replace")
        t_end = time.perf_counter()
        if not self.measuring:
            return keep
        st = self.stats
        if kind is None:
            st.ok += 1
            st.latency.append(t_end - t_sched)
            st.ttfb.append((t_first or t_end) - t_sched)
            st.bytes += len(body)
            st.events += body.count(b"data:")
            if spec.mode == "open":
                st.late.append(t0 - t_sched)
        else:
            st.error(kind, detail)
        return keep

    def _more(self) -> bool:
        if time.perf_counter() >= self.stop_at:
            return False
        if self.measuring and self.spec.max_requests and self.issued >= self.spec.max_requests:
            return False
        if self.measuring:
            self.issued += 1
        return True

    # -- closed loop ----------------------------------------------------------------------------

    async def _h1_worker(self, client: H1Client) -> None:
        while self._more():
            if not await self.one(client, 0.0):
                await client.close()
                try:
                    await client.connect()
                except OSError as e:
                    if self.measuring:
                        self.stats.error("connect_error", repr(e))
                    await anyio.sleep(0.01)

    async def _h2_worker(self, clients: list[H2Client], i: int, tg: anyio.abc.TaskGroup) -> None:
        while self._more():
            client = clients[i]
            if client.dead is not None:
                await client.close()
                client = clients[i] = H2Client(self.spec.host, self.spec.port)
                try:
                    await client.connect(tg)
                except OSError as e:
                    if self.measuring:
                        self.stats.error("connect_error", repr(e))
                    await anyio.sleep(0.01)
                    continue
            await self.one(client, 0.0)

    async def _phase(self, seconds: float, measuring: bool, body: Any) -> float:
        """Run `body()` (which starts workers) until `seconds` pass; return elapsed time."""
        self.measuring = measuring
        t0 = time.perf_counter()
        self.stop_at = t0 + seconds
        grace = seconds + self.spec.timeout_s + 1.0
        with anyio.move_on_after(grace):
            await body()
        return time.perf_counter() - t0

    async def closed(self) -> float:
        spec = self.spec
        c = spec.concurrency
        async with anyio.create_task_group() as outer:
            if spec.proto == "h1":
                h1s = [H1Client(spec.host, spec.port, self.strict) for _ in range(c)]
                await _connect_all([x.connect for x in h1s], self.stats)

                async def run_h1() -> None:
                    async with anyio.create_task_group() as tg:
                        for x in h1s:
                            if x.stream is not None:
                                tg.start_soon(self._h1_worker, x)

                runner = run_h1
                closers = [x.close for x in h1s]
            else:
                n = max(1, min(spec.connections, c))
                h2s = [H2Client(spec.host, spec.port) for _ in range(n)]
                await _connect_all([lambda x=x: x.connect(outer) for x in h2s], self.stats)

                async def run_h2() -> None:
                    async with anyio.create_task_group() as tg:
                        for i in range(c):
                            tg.start_soon(self._h2_worker, h2s, i % n, tg)

                runner = run_h2
                closers = [x.close for x in h2s]
            if spec.warmup_s > 0:
                await self._phase(spec.warmup_s, False, runner)
            _mark("start")
            cpu0 = _cpu_s()
            elapsed = await self._phase(spec.duration_s, True, runner)
            self.cpu_s = _cpu_s() - cpu0
            _mark("end")
            for close in closers:
                await close()
            outer.cancel_scope.cancel()
        return elapsed

    # -- open loop --------------------------------------------------------------------------------

    async def open(self) -> float:
        spec = self.spec
        if spec.rate <= 0:
            raise ValueError("open loop needs rate > 0")
        limit = anyio.Semaphore(max(1, spec.concurrency))
        async with anyio.create_task_group() as outer:
            idle_h1: list[H1Client] = []
            h2s: list[H2Client] = []
            if spec.proto == "h2":
                n = max(1, spec.connections)
                h2s = [H2Client(spec.host, spec.port) for _ in range(n)]
                await _connect_all([lambda x=x: x.connect(outer) for x in h2s], self.stats)
            rr = 0

            async def one_open(t_sched: float) -> None:
                nonlocal rr
                async with limit:
                    if spec.proto == "h1":
                        client = (idle_h1.pop() if idle_h1
                                  else H1Client(spec.host, spec.port, self.strict))
                        if client.stream is None:
                            try:
                                await client.connect()
                            except OSError as e:
                                if self.measuring:
                                    self.stats.error("connect_error", repr(e))
                                return
                        if await self.one(client, t_sched):
                            idle_h1.append(client)
                        else:
                            await client.close()
                    else:
                        rr = (rr + 1) % len(h2s)
                        i = rr
                        if h2s[i].dead is not None:
                            await h2s[i].close()
                            h2s[i] = H2Client(spec.host, spec.port)
                            try:
                                await h2s[i].connect(outer)
                            except OSError as e:
                                if self.measuring:
                                    self.stats.error("connect_error", repr(e))
                                return
                        await self.one(h2s[i], t_sched)

            async def schedule(seconds: float) -> None:
                interval = 1.0 / spec.rate
                t0 = time.perf_counter()
                i = 0
                async with anyio.create_task_group() as tg:
                    while True:
                        due = t0 + i * interval
                        if due >= self.stop_at:
                            break
                        if self.measuring and spec.max_requests and i >= spec.max_requests:
                            break
                        now = time.perf_counter()
                        if due > now:
                            await anyio.sleep(due - now)
                        tg.start_soon(one_open, due)
                        i += 1

            if spec.warmup_s > 0:
                await self._phase(spec.warmup_s, False, lambda: schedule(spec.warmup_s))
            _mark("start")
            cpu0 = _cpu_s()
            elapsed = await self._phase(spec.duration_s, True, lambda: schedule(spec.duration_s))
            self.cpu_s = _cpu_s() - cpu0
            _mark("end")
            for x in idle_h1:
                await x.close()
            for y in h2s:
                await y.close()
            outer.cancel_scope.cancel()
        return elapsed


async def _connect_all(connects: list[Any], stats: Stats) -> None:
    """Open connections 64 at a time (a 1,000-connection run must not overflow the server's
    accept backlog); failures are counted as errors of the measured run."""
    sem = anyio.Semaphore(64)

    async def one(fn: Any) -> None:
        async with sem:
            try:
                await fn()
            except OSError as e:
                stats.error("connect_error", repr(e))

    async with anyio.create_task_group() as tg:
        for fn in connects:
            tg.start_soon(one, fn)


def _mark(what: str) -> None:
    sys.stderr.write(f"@bench {what} {time.time():.6f}\n")
    sys.stderr.flush()


def _raise_nofile() -> None:
    # 1,000 concurrent streams need 1,000 sockets; the default soft limit is often 1,024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pick_loop(choice: str) -> str:
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise
        return "asyncio"
    return "uvloop"


def run(spec: Spec) -> dict[str, Any]:
    """Run one spec in this process and return the result dict."""
    _raise_nofile()
    loop = pick_loop(spec.loop)
    runner = Runner(spec)

    async def main() -> float:
        return await (runner.closed() if spec.mode == "closed" else runner.open())

    elapsed = anyio.run(main, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})
    return result_json(spec, runner.stats, elapsed, loop, runner.cpu_s)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m bench.loadgen SPEC.json|-   (prints one JSON result)")
        return 2
    raw = sys.stdin.buffer.read() if args[0] == "-" else open(args[0], "rb").read()
    spec = msgspec.json.decode(raw, type=Spec)
    out = run(spec)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
