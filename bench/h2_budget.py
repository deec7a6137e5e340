"""What the h2 library costs rawgate's HTTP/2 client per non-stream exchange, sans I/O, one core:
`python -m bench.h2_budget [--n 20000] [--repeat 5]`.

Why it exists: at concurrency 1 a non-stream request through rawgate costs ~0.25 ms more CPU
over an h2c upstream than over HTTP/1.1 (bench/README.md, "Results"). This isolates the library
part of that: rawgate's own h2 connection as `h2_client.new_h2` configures it (`h2_data.FastH2`
with the DATA fast path, its HPACK encoder, inbound validation off) sending a
Gemini-sized request (8 header fields, a 300-byte body) and receiving the reply Google's shape
has (HEADERS with 4 fields, one DATA frame with END_STREAM, a connection WINDOW_UPDATE), all in
memory. The server side is plain h2 and is not timed.

Its cases (named by the code's performance comments, "(bench.h2_budget: <case>)"): `send` and
`receive` of that exchange, and `data frame`: one plain DATA frame of a streamed answer (330
bytes, Gemini's one-event-per-frame shape, 16 KiB reads), received with rawgate's DATA fast path
(upstream/h2_data.py) and, for comparison, by h2 alone (`new_h2(..., fast=False)`).

Invariants: no sockets, no event loop; best of --repeat runs (the machine is shared); the reply
bytes are made by a real h2 server connection, so every exchange is a valid one.
"""

from __future__ import annotations

import argparse
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived

from rawgate.compat import H2ClientConnection
from rawgate.config import UpstreamConfig
from rawgate.upstream.h2_client import new_h2

_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"127.0.0.1:8046"),
    (b":path", b"/v1beta/models/gemini-2.5-flash:generateContent"),
    (b"content-type", b"application/json"),
    (b"x-goog-api-key", b"bench-key-0123456789abcdef"),
    (b"user-agent", b"rawgate/0.1.0"),
    (b"content-length", b"300"),
]
_REPLY = [
    (b":status", b"200"),
    (b"content-type", b"application/json; charset=UTF-8"),
    (b"vary", b"Origin, X-Origin, Referer"),
    (b"x-content-type-options", b"nosniff"),
]


def _pair(fast: bool = True) -> tuple[H2ClientConnection, H2Connection]:
    client = new_h2(UpstreamConfig(), 100, fast)
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())  # the SETTINGS ACK
    # Plenty of connection window both ways, as rawgate's own credit policy keeps it.
    client.increment_flow_control_window(2**31 - 1 - 65535)
    server.receive_data(client.data_to_send())
    return client, server


def run(n: int) -> tuple[float, float]:
    """Microseconds per exchange: (client send: stream + HEADERS + DATA, client receive)."""
    client, server = _pair()
    body = b"x" * 300
    answer = b"y" * 323
    send_s = recv_s = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, _REQUEST, end_stream=False)
        client.send_data(sid, body, end_stream=True)
        out = client.data_to_send()
        t1 = time.perf_counter()
        for ev in server.receive_data(out):
            if isinstance(ev, RequestReceived):
                server.send_headers(sid, _REPLY)
                server.send_data(sid, answer, end_stream=True)
                server.increment_flow_control_window(len(body))
        reply = server.data_to_send()
        t2 = time.perf_counter()
        client.receive_data(reply)
        t3 = time.perf_counter()
        send_s += t1 - t0
        recv_s += t3 - t2
    return send_s / n * 1e6, recv_s / n * 1e6


_GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]


def run_data(frames: int, fast: bool) -> float:
    """Microseconds per plain DATA frame received (best of 20 streams of `frames` frames)."""
    client, server = _pair(fast)
    best = float("inf")
    for _ in range(20):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, _GET, end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(sid, _REPLY)
        client.receive_data(server.data_to_send())
        for _ in range(frames):
            server.send_data(sid, b"d" * 330)
        wire = server.data_to_send()
        t0 = time.perf_counter()
        for i in range(0, len(wire), 16384):
            client.receive_data(wire[i : i + 16384])
        best = min(best, (time.perf_counter() - t0) / frames * 1e6)
        client.reset_stream(sid)
        server.receive_data(client.data_to_send())
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.h2_budget", description=__doc__)
    p.add_argument("--n", type=int, default=20_000, help="exchanges per run")
    p.add_argument("--repeat", type=int, default=5, help="runs; the best is reported")
    a = p.parse_args(argv)
    runs = [run(a.n) for _ in range(a.repeat)]
    send = min(r[0] for r in runs)
    recv = min(r[1] for r in runs)
    print(f"h2 library per non-stream exchange (best of {a.repeat} x {a.n}):")
    print(f"  send (stream + HEADERS + DATA): {send:6.1f} us")
    print(f"  receive (HEADERS + DATA END_STREAM + WINDOW_UPDATE): {recv:6.1f} us")
    print(f"  total: {send + recv:6.1f} us")
    frames = 200  # 66 KB: within the default 256 KiB stream window
    fast = min(run_data(frames, True) for _ in range(a.repeat))
    plain = min(run_data(frames, False) for _ in range(a.repeat))
    print("one streamed DATA frame received (data frame):")
    print(f"  DATA fast path: {fast:6.2f} us   h2 alone: {plain:6.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
