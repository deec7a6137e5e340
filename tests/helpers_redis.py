"""A real redis-server for tests: a free loopback port, no persistence, stopped at teardown.

redis-server cannot listen on port 0, so a free port is picked by binding one and closing it
(a race with another process is possible in theory; start() then fails loudly). Tests that need
it skip with a clear reason only when the binary is missing (.ci/run installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

REDIS_BIN = shutil.which("redis-server")
START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        if REDIS_BIN is None:
            pytest.skip("redis-server not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_BIN is not None
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """kill -9: no goodbye to clients, like a crashed or unplugged server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    stop = kill


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    try:
        yield srv
    finally:
        srv.stop()


class RedisClusterNodes:
    """Three masters on free loopback ports joined by `redis-cli --cluster create`."""

    def __init__(self, tmp: str) -> None:
        if REDIS_BIN is None or shutil.which("redis-cli") is None:
            pytest.skip("redis-server / redis-cli not installed (apt-get install redis-server)")
        self.tmp = tmp
        # Six distinct ports (3 clients + 3 cluster buses; the default bus port is port+10000,
        # beyond 65535 for most ephemeral ports): all sockets held while picking, since one
        # at a time the kernel may hand the same just-closed port out twice.
        socks = [socket.socket() for _ in range(6)]
        try:
            for s in socks:
                s.bind(("127.0.0.1", 0))
            ports = [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()
        self.nodes = [RedisServer(p) for p in ports[:3]]
        self.bus_ports = ports[3:]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisClusterNodes:
        assert REDIS_BIN is not None
        for i, n in enumerate(self.nodes):
            n.proc = subprocess.Popen(
                [REDIS_BIN, "--port", str(n.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"{self.tmp}/nodes-{i}.conf", "--dir", self.tmp,
                 "--cluster-port", str(self.bus_ports[i])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(_ping(n.port) for n in self.nodes):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("cluster nodes did not start")
            time.sleep(0.02)
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
        )  # fmt: skip
        while True:
            info = subprocess.run(
                ["redis-cli", "-p", str(self.nodes[0].port), "cluster", "info"],
                capture_output=True, text=True, timeout=10,
            ).stdout
            if "cluster_state:ok" in info:
                return self
            if time.monotonic() > deadline + 20:
                self.stop()
                raise RuntimeError("cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    c = RedisClusterNodes(str(tmp_path_factory.mktemp("cluster"))).start()
    try:
        yield c
    finally:
        c.stop()
