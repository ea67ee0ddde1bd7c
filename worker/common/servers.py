"""Private Redis servers for demos, tests and benchmarks: one ``redis-server``, or a Redis Cluster.

Both run from the ``redis-server`` binary on loopback ports and keep their files in a temporary
folder removed on exit. A cluster node also listens on its *bus* port, its port + 10000, so cluster
ports are picked below 55000 with both free.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.cluster import key_slot


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """``count`` consecutive free ports below 55000 whose bus ports (+10000) are free as well."""
    for _ in range(200):
        first = random.randrange(20000, 55000 - count)
        ports = list(range(first, first + count))
        if all(_bindable(p) and _bindable(p + 10000) for p in ports):
            return ports
    raise RuntimeError("no free loopback ports below 55000 for a Redis Cluster")


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (Debian: apt-get install redis-server)")
    return binary


def _wait_ping(url: str, process: subprocess.Popen, args: list[str], timeout: float = 10.0) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {' '.join(args)}") from None
                time.sleep(0.02)
    finally:
        client.close()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def embedded_redis(appendonly: bool = False, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """Start a private ``redis-server`` on a free loopback port; yield its URL; stop it after.

    :param appendonly: keep an AOF (for restart tests); otherwise nothing touches the disk
    :param extra: more ``redis-server`` arguments
    """
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="rl-redis-")
    args = [_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir]
    args += ["--appendonly", "yes" if appendonly else "no", *extra]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_ping(url, process, args)
        yield url
    finally:
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


class LocalCluster:
    """A Redis Cluster of ``masters`` primaries with ``replicas`` replicas each, on loopback ports.

    Nodes keep their cluster state (``nodes.conf``) in their own folder, so a node killed and
    started again rejoins the cluster, as a replica if its replica was promoted meanwhile.

    :param masters: primaries (3 is the least ``redis-cli --cluster create`` accepts)
    :param replicas: replicas per primary
    :param node_timeout_ms: how long a primary may be unreachable before its replica takes over
    :param extra: more ``redis-server`` arguments for every node
    """

    def __init__(
        self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000, extra: tuple[str, ...] = ()
    ) -> None:
        self.ports = cluster_ports(masters * (1 + replicas))
        self.masters, self.replicas = masters, replicas
        self.node_timeout_ms, self.extra = node_timeout_ms, extra
        self.workdir = Path(tempfile.mkdtemp(prefix="rl-cluster-"))
        self.processes: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """A URL of one node: a cluster client discovers the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start_node(self, port: int) -> None:
        folder = self.workdir / str(port)
        folder.mkdir(exist_ok=True)
        args = [_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", str(self.node_timeout_ms), "--save", "", "--appendonly", "no"]
        args += ["--logfile", "redis.log", "--repl-diskless-sync-delay", "0", *self.extra]
        self.processes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_ping(f"redis://127.0.0.1:{port}/0", self.processes[port], args)

    def start(self) -> LocalCluster:
        for port in self.ports:
            self.start_node(port)
        command = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
        command += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
        self.wait_ok()
        return self

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every running node says ``cluster_state:ok`` and agrees on one primary per shard, and
        every replica is in sync with its primary."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(self._ok(port) for port in self.running()):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster on {self.ports} did not become ready")
            time.sleep(0.1)

    def _ok(self, port: int) -> bool:
        with self.node(port) as client:
            if client.cluster("INFO")["cluster_state"] != "ok":
                return False
            masters = [n for n in client.cluster("NODES").values() if "master" in n["flags"]]
            live = [n for n in masters if "fail" not in n["flags"] and n["slots"]]
            if len(live) != self.masters:
                return False
            info = client.info("replication")
            if info["role"] == "master":  # its replicas are in sync: WAIT counts them
                online = [v for k, v in info.items() if k.startswith("slave") and v.get("state") == "online"]
                expected = sum(1 for other in self.running() if self._follows(other, port))
                return len(online) >= expected
            return info.get("master_link_status") == "up"

    def _follows(self, port: int, primary: int) -> bool:
        """Whether the node on ``port`` is a replica of the one on ``primary``."""
        with self.node(port) as client:
            info = client.info("replication")
        return info["role"] == "slave" and info["master_port"] == primary

    def running(self) -> list[int]:
        return [port for port, process in self.processes.items() if process.poll() is None]

    def master_of(self, key: str) -> int:
        """The port of the primary that serves ``key``'s slot now."""
        slot = key_slot(key.encode())
        for port in self.running():
            try:
                with self.node(port) as client:
                    for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                        if start <= slot <= end:
                            return int(primary[1])
            except redis.RedisError:
                continue
        raise RuntimeError(f"no running node knows the slot of {key!r}")

    def replica_of(self, primary: int) -> int:
        """The port of a running replica of the primary on ``primary``."""
        for port in self.running():
            if port != primary and self._follows(port, primary):
                return port
        raise RuntimeError(f"no running replica of 127.0.0.1:{primary}")

    def pause(self, port: int) -> None:
        """``SIGSTOP`` a node: it reads nothing more (its replication falls behind) until :meth:`resume`."""
        os.kill(self.processes[port].pid, signal.SIGSTOP)

    def resume(self, port: int) -> None:
        os.kill(self.processes[port].pid, signal.SIGCONT)

    def kill(self, port: int) -> None:
        """``SIGKILL`` a node: it writes nothing more, and replies in flight are lost."""
        process = self.processes[port]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        for process in self.processes.values():
            _stop(process)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextmanager
def embedded_cluster(masters: int = 3, replicas: int = 1, **options) -> Iterator[LocalCluster]:
    """Start a private :class:`LocalCluster`; yield it (its ``url`` names one node); stop it after."""
    cluster = LocalCluster(masters, replicas, **options)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
