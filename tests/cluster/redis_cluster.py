"""A real Redis Cluster on loopback for the tests: 3 primaries and 3 replicas, each a
``redis-server --cluster-enabled yes`` with AOF on, joined by ``redis-cli --cluster create``.

Ports are picked free at start (each port and its cluster bus port, port + 10000), so nothing
else on the machine is touched; every file lives under the directory given and is removed on
``stop``. No redis-server or redis-cli on PATH fails the test that asked for a cluster, loudly:
a cluster test never skips."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: Short, so a failover takes seconds: a primary unreachable this long is failed over.
NODE_TIMEOUT_MS = 2_000


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free now whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10_000 < 65_536 and port not in ports and _free(port + 10_000):
            ports.append(port)
    return ports


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH: the Redis Cluster tests need redis-server and redis-cli"
            " (Debian: apt-get install redis-server redis-tools)",
            pytrace=False,
        )
    return path


@dataclass
class Node:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class RedisClusterHandle:
    root: Path
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The service's ``redis_url`` of this cluster (three nodes to start discovering from)."""
        return "redis+cluster://" + ",".join(n.addr for n in self.nodes[:3])

    def cli(self, port: int, *args: str, timeout: float = 10.0) -> str:
        out = subprocess.run(
            [_tool("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            timeout=timeout,
            check=True,
        )
        return out.stdout.decode()

    def info(self, port: int, section: str) -> dict[str, str]:
        lines = self.cli(port, "info", section).splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def primaries(self) -> list[Node]:
        """The live nodes that are primaries now."""
        return [n for n in self.alive() if self.info(n.port, "replication")["role"] == "master"]

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def start_node(self, n: Node) -> None:
        n.dir.mkdir(parents=True, exist_ok=True)
        log = (n.dir / "redis.log").open("ab")
        n.proc = subprocess.Popen(
            [
                _tool("redis-server"),
                "--port", str(n.port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(n.dir / "nodes.conf"),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--dir", str(n.dir),
                "--appendonly", "yes",
                "--save", "",
                "--protected-mode", "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        self._wait(lambda: self._pings(n), f"redis-server on {n.port} answering", n)

    def _pings(self, n: Node) -> bool:
        try:
            return self.cli(n.port, "ping", timeout=2).strip() == "PONG"
        except subprocess.SubprocessError:
            return False

    def _wait(
        self, ok: Callable[[], bool], what: str, n: Node | None = None, within: float = 30.0
    ) -> None:
        deadline = time.monotonic() + within
        while not ok():
            if n is not None and n.proc is not None and n.proc.poll() is not None:
                raise RuntimeError(f"{what}: it exited; see {n.dir / 'redis.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not within {within} s")
            time.sleep(0.05)

    def start(self) -> None:
        for i, port in enumerate(free_ports(6)):
            self.nodes.append(Node(port, self.root / f"node-{i}"))
        for n in self.nodes:
            self.start_node(n)
        subprocess.run(
            [_tool("redis-cli"), "--cluster", "create", *(n.addr for n in self.nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            timeout=60,
            check=True,
        )  # fmt: skip
        self.wait_healthy()

    def healthy(self) -> bool:
        """Every live node says cluster_state:ok and agrees there are 3 primaries, and every
        replica's link to its primary is up and caught up."""
        try:
            for n in self.alive():
                info = dict(
                    line.split(":", 1)
                    for line in self.cli(n.port, "cluster", "info", timeout=2).split()
                    if ":" in line
                )
                if info.get("cluster_state") != "ok" or info.get("cluster_size") != "3":
                    return False
                repl = self.info(n.port, "replication")
                if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                    return False
            return len(self.primaries()) == 3
        except subprocess.SubprocessError:
            return False

    def wait_healthy(self, within: float = 60.0) -> None:
        self._wait(self.healthy, "the Redis Cluster in cluster_state:ok", within=within)

    def wait_replicas_caught_up(self, primary: Node, within: float = 10.0) -> None:
        """Until every replica of ``primary`` has acknowledged its whole replication stream."""

        def caught_up() -> bool:
            repl = self.info(primary.port, "replication")
            offset = int(repl["master_repl_offset"])
            replicas = [v for k, v in repl.items() if k.startswith("slave") and "offset=" in v]
            return bool(replicas) and all(
                int(dict(p.split("=") for p in r.split(","))["offset"]) >= offset
                for r in replicas
            )

        self._wait(caught_up, f"replicas of {primary.port} caught up", within=within)

    def kill(self, n: Node) -> None:
        """SIGKILL: the process dies at once, as a machine would."""
        assert n.proc is not None
        n.proc.send_signal(signal.SIGKILL)
        n.proc.wait(10)

    def replicas_of(self, primary: Node) -> list[Node]:
        """The nodes replicating ``primary`` now (its INFO replication's ``slaveN`` lines)."""
        repl = self.info(primary.port, "replication")
        return [
            self.node(int(dict(p.split("=") for p in v.split(","))["port"]))
            for k, v in repl.items()
            if k.startswith("slave") and "port=" in v
        ]

    @contextlib.contextmanager
    def frozen(self, n: Node) -> Iterator[None]:
        """``n`` stopped (SIGSTOP) inside the block: it reads nothing and answers nothing (a
        replica acknowledges no writes), and goes on (SIGCONT) after it. Ask nothing of it
        meanwhile (``info``, ``primaries``, ``healthy``): its answer would wait."""
        assert n.proc is not None and n.proc.poll() is None
        n.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            n.proc.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def cut_off(self, replica: Node, primary: Node) -> Iterator[None]:
        """``replica`` frozen (``frozen``) and its replication link closed by ``primary``
        (``CLIENT KILL TYPE replica``): nothing ``primary`` writes in the block reaches it.
        Frozen alone is not enough for that: the kernel still fills a stopped process's socket
        buffer, and the replica would apply all of it when it goes on, even after its primary
        died (seen here). It reconnects after the block, if ``primary`` still lives."""
        with self.frozen(replica):
            assert self.cli(primary.port, "client", "kill", "type", "replica").strip() == "1"
            yield

    def wait_promoted(self, replica: Node, within: float = 60.0) -> bool:
        """Until ``replica`` is a primary: by the cluster's own failover (its primary down for
        the node timeout), else, past a few node timeouts, by ``CLUSTER FAILOVER TAKEOVER``
        (a replica that was stopped for long may hold back from an election). True when the
        cluster failed over by itself."""

        def primary() -> bool:
            try:
                return self.info(replica.port, "replication")["role"] == "master"
            except subprocess.SubprocessError:
                return False

        deadline = time.monotonic() + 5 * NODE_TIMEOUT_MS / 1000
        while not primary() and time.monotonic() < deadline:
            time.sleep(0.05)
        if primary():
            return True
        self.cli(replica.port, "cluster", "failover", "takeover")
        self._wait(primary, f"{replica.port} a primary", replica, within=within)
        return False

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.terminate()
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(10)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def redis_cluster(root: Path) -> Iterator[RedisClusterHandle]:
    """A started cluster under ``root`` (removed afterwards)."""
    handle = RedisClusterHandle(root)
    try:
        handle.start()
        yield handle
    finally:
        handle.stop()

