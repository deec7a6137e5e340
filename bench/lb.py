"""bench.lb: the bench's own load balancer, TCP round robin per connection (or per request).

    python -m bench.lb --port P --backend 127.0.0.1:A --backend 127.0.0.1:B [--per-request]

Invariants:
- Layer 4, not HTTP: each accepted connection is given to the next backend in turn and its
  bytes are copied both ways unchanged until either side closes. With keep-alive clients a
  backend gets whole connections, so requests are spread evenly only when the clients open
  many connections (the bench's load generator opens C of them, so C/N per backend); one
  connection's requests all go to one backend. That is what an L4 balancer (haproxy in
  `mode tcp`, a cloud NLB) does; an HTTP-aware balancer would spread per request.
- A backend that refuses the connection is skipped for that connection (the next one in turn
  is tried, each at most once); when none accepts, the client's connection is closed.
- Half-close is passed on (EOF on one side -> send_eof on the other), so close-delimited
  bodies work; the connection ends when both directions have ended.
- `--per-request` (HTTP/1.1 aware, for the bench's own clients): each request goes to the next
  backend in turn over a keep-alive connection this client connection holds to each backend;
  the request is read whole (Content-Length bodies only: a chunked request closes the
  connection), the response is relayed as it arrives and its end found by the load
  generator's parser (bench.loadgen.H1Parser: Content-Length, chunked, close-delimited; never a
  HEAD request, never pipelining). `Connection: close` on either side closes the client's
  connection after that response.
- SIGTERM/SIGINT stop it; it prints one line per backend (connections given) on stderr at exit,
  so a run's log shows the spread.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
from dataclasses import dataclass, field

import anyio
import anyio.abc

from bench.loadgen import H1Parser

# Bytes read per receive: large enough that a 100-event stream crosses in a few reads.
READ_BYTES = 65536
# Failed connections printed to stderr (the rest only counted).
MAX_REPORTED = 5
# --per-request: a request head larger than this closes the connection.
MAX_HEAD_BYTES = 65536


@dataclass
class Balancer:
    backends: list[tuple[str, int]]
    given: list[int] = field(default_factory=list)
    failed: int = 0
    _next: int = 0

    def __post_init__(self) -> None:
        self.given = [0] * len(self.backends)

    async def _connect(self) -> anyio.abc.SocketStream | None:
        for _ in range(len(self.backends)):
            i = self._next
            self._next = (i + 1) % len(self.backends)
            host, port = self.backends[i]
            try:
                conn = await anyio.connect_tcp(host, port)
            except OSError:
                continue
            self.given[i] += 1
            return conn
        return None

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        try:
            async with client:
                upstream = await self._connect()
                if upstream is None:
                    return
                async with upstream, anyio.create_task_group() as tg:
                    tg.start_soon(_pipe, client, upstream)
                    tg.start_soon(_pipe, upstream, client)
        except Exception as e:  # one connection's failure never stops the balancer
            self.failed += 1
            if self.failed <= MAX_REPORTED:
                print(f"bench.lb: connection failed: {e!r}", file=sys.stderr, flush=True)


class RequestBalancer(Balancer):
    """--per-request: round robin per HTTP/1.1 request (see the module note)."""

    async def _backend(
        self, conns: dict[int, anyio.abc.SocketStream]
    ) -> tuple[int, anyio.abc.SocketStream] | None:
        for _ in range(len(self.backends)):
            i = self._next
            self._next = (i + 1) % len(self.backends)
            if i in conns:
                self.given[i] += 1
                return i, conns[i]
            host, port = self.backends[i]
            try:
                conns[i] = await anyio.connect_tcp(host, port)
            except OSError:
                continue
            self.given[i] += 1
            return i, conns[i]
        return None

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        conns: dict[int, anyio.abc.SocketStream] = {}
        try:
            async with client:
                buf = b""
                while True:
                    while (end := buf.find(b"\r\n\r\n")) < 0:
                        if len(buf) > MAX_HEAD_BYTES:
                            return
                        try:
                            buf += await client.receive(READ_BYTES)
                        except (anyio.EndOfStream, anyio.ClosedResourceError):
                            return
                    head, rest = buf[: end + 4], buf[end + 4 :]
                    length, close = request_framing(head)
                    while len(rest) < length:
                        rest += await client.receive(READ_BYTES)
                    body, buf = rest[:length], rest[length:]
                    picked = await self._backend(conns)
                    if picked is None:
                        return
                    i, up = picked
                    await up.send(head + body)
                    parser = H1Parser()
                    while True:
                        try:
                            data = await up.receive(READ_BYTES)
                        except anyio.EndOfStream:
                            data = b""
                        done = parser.feed(data)
                        if data:
                            await client.send(data)
                        if done:
                            break
                    if not parser.keep_alive:
                        await conns.pop(i).aclose()
                    if close or not parser.keep_alive:
                        return
        except Exception as e:  # one connection's failure never stops the balancer
            self.failed += 1
            if self.failed <= MAX_REPORTED:
                print(f"bench.lb: connection failed: {e!r}", file=sys.stderr, flush=True)
        finally:
            for c in conns.values():
                await c.aclose()


def request_framing(head: bytes) -> tuple[int, bool]:
    """(body length, close after the response) of a request head; ValueError for what the
    per-request mode does not take (a chunked body, a bad Content-Length)."""
    lines = head.split(b"\r\n")
    close = lines[0].endswith(b"HTTP/1.0")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
            if length < 0:
                raise ValueError("negative Content-Length")
        elif name == b"transfer-encoding":
            raise ValueError("chunked request bodies are not relayed per request")
        elif name == b"connection":
            close = value == b"close" or (close and value != b"keep-alive")
    return length, close


async def _pipe(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
    try:
        while True:
            data = await src.receive(READ_BYTES)
            await dst.send(data)
    except (anyio.EndOfStream, anyio.ClosedResourceError):
        pass
    except (OSError, anyio.BrokenResourceError):
        # A reset on one side: the other side is closed with it (the task group's exit).
        await dst.aclose()
        return
    try:
        await dst.send_eof()
    except (OSError, RuntimeError, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the other side is gone already (uvloop says so with a RuntimeError)


async def serve(port: int, backends: list[tuple[str, int]], per_request: bool = False) -> None:
    lb = RequestBalancer(backends) if per_request else Balancer(backends)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port,
                                               reuse_port=False)
    print(f"bench.lb: 127.0.0.1:{port} -> " + ", ".join(f"{h}:{p}" for h, p in backends)
          + (" per request" if per_request else " per connection"), file=sys.stderr, flush=True)
    try:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, lb.handle)
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break
    finally:
        unit = "requests" if per_request else "connections"
        for (h, p), n in zip(backends, lb.given, strict=True):
            print(f"bench.lb: {h}:{p} got {n} {unit}", file=sys.stderr, flush=True)
        print(f"bench.lb: {lb.failed} connections failed", file=sys.stderr, flush=True)


def parse_backend(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lb", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backend", type=parse_backend, action="append", required=True,
                    metavar="HOST:PORT")
    ap.add_argument("--per-request", action="store_true",
                    help="HTTP/1.1 aware: round robin per request, not per connection")
    args = ap.parse_args(argv)
    opts = {"use_uvloop": True} if importlib.util.find_spec("uvloop") else {}
    anyio.run(serve, args.port, args.backend, args.per_request, backend_options=opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
