"""Cluster mode under the least-privilege ACL users of docs/security.md: the rules it needs beyond
them, each shown to be needed, and nothing refused with them.

redis-py's cluster client sends commands a single server's client never does: ``CLUSTER SLOTS``
(the slot map, when it connects and again after a ``MOVED`` or a lost node) and ``COMMAND`` (the
command table it finds the keys of a command in, ``XREADGROUP``'s and ``XREAD``'s among them; older
redis-py releases ask ``COMMAND GETKEYS``, which ``+command`` grants too). It may send them to any
node, so the users exist on every node. ``--wait-replicas`` (on a cluster or not) runs each commit
in a pipeline with ``WAIT``; redis-py checks a pipeline's scripts with ``SCRIPT EXISTS`` first.

The tests start private clusters of three primaries without replicas (the session's shared
cluster keeps the users it has): one on plain ports, one that speaks TLS only.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest
import redis

from tests.components import running
from tests.faults.test_security import PASSWORD, _need, acl_setuser, openssl, skip_unless_tls_built
from worker.aggregator import Aggregator, AggregatorSettings
from worker.client import PolicyClient
from worker.common.connections import RedisAccessError, connect
from worker.common.servers import LocalCluster, cluster_ports, embedded_cluster
from worker.model.loop import ModelWorker
from worker.model.settings import ModelSettings
from worker.model.store import CommitRefused

pytestmark = [pytest.mark.redis_server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "{rl}"  # the default prefix on a cluster
CLUSTER_EXTRAS = ("+cluster|slots", "+command")  # both users
WAIT_EXTRAS = ("+wait", "+script|exists")  # the model's user, with --wait-replicas
OBS = [0.01, -0.02, 0.03, 0.04]


class Nodes(Protocol):
    """A cluster's nodes: their ports and an admin client (the ``default`` user) for each."""

    ports: list[int]

    def node(self, port: int) -> redis.Redis: ...


def rules(user: str, *extras: str) -> list[str]:
    """docs/security.md's ``ACL SETUSER`` command of ``user`` for the prefix ``{rl}``, plus ``extras``."""
    return [*acl_setuser(PREFIX, user=user), *extras]


def prepare(cluster: Nodes, *users: list[str]) -> None:
    """Every node empty, with ``users`` (``ACL SETUSER`` commands) and an empty ``ACL LOG``."""
    for port in cluster.ports:
        with cluster.node(port) as node:
            node.flushall()
            for command in users:
                node.execute_command(*command)
            node.execute_command("ACL", "LOG", "RESET")


def refused(cluster: Nodes) -> set[tuple[str, str]]:
    """What any node refused: (user, command or key) pairs from every node's ``ACL LOG``."""
    found = set()
    for port in cluster.ports:
        with cluster.node(port) as node:
            found |= {(entry["username"], entry["object"]) for entry in node.acl_log()}
    return found


def user_url(user: str, port: int, scheme: str = "redis", query: str = "") -> str:
    return f"{scheme}://{user}:{PASSWORD}@127.0.0.1:{port}/0{query}"


def model_settings(url: str, **changes) -> ModelSettings:
    return ModelSettings(
        _cli_parse_args=False, redis_url=url, cluster=True, component_id="m1", seed=0, block_ms=50,
        lease_ttl=2.0, **changes,
    )  # fmt: skip


def play(url: str, mode: str) -> list[int]:
    """A client on ``url`` stepping one environment three times in ``mode``."""
    model = None if mode == "ensemble" else "m1"
    with PolicyClient(url, mode=mode, model=model, cluster=True, timeout=10.0, client_id=mode) as client:
        actions = [client.act("e", OBS)]
        actions += [client.act("e", [0.01 * k, 0, 0, 0], reward=1.0) for k in (1, 2)]
    return actions


@pytest.fixture(scope="module")
def acl_cluster() -> Iterator[LocalCluster]:
    _need("redis-server")
    _need("redis-cli")
    with embedded_cluster(masters=3, replicas=0) as cluster:
        yield cluster


def other_node(cluster: LocalCluster) -> int:
    """A primary that does not serve the swarm's slot: a client given it must follow the slot map."""
    return next(port for port in cluster.ports if port != cluster.master_of(PREFIX))


# --------------------------------------------------------------------------- with the extras


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["commit", "commit-and-wait"])
def test_the_documented_users_with_the_cluster_extras_need_nothing_more(
    acl_cluster: LocalCluster, wait_replicas: int
) -> None:
    """A model worker and clients (ensemble through the aggregator, which runs as the default user,
    and direct) under the documented users plus the cluster extras: no node refuses anything."""
    waits = WAIT_EXTRAS if wait_replicas else ()
    prepare(acl_cluster, rules("rl-model", *CLUSTER_EXTRAS, *waits), rules("rl-client", *CLUSTER_EXTRAS))
    settings = model_settings(
        user_url("rl-model", acl_cluster.ports[0]), wait_replicas=wait_replicas, wait_timeout_ms=20
    )
    worker = ModelWorker(settings, settings.connect())
    joined = AggregatorSettings(
        _cli_parse_args=False, redis_url=acl_cluster.url, cluster=True, seed=0, block_ms=20
    )
    client_url = user_url("rl-client", other_node(acl_cluster))
    with running(worker, Aggregator(joined, joined.connect())):
        actions = play(client_url, "ensemble") + play(client_url, "direct")
    assert set(actions) <= {0, 1} and len(actions) == 6
    assert worker.counters.observations == 6
    assert (worker.store.unreplicated > 0) is bool(wait_replicas)  # no replicas: every WAIT runs out
    assert refused(acl_cluster) == set(), "cluster mode needed more than the documented extras"


def test_the_command_extra_covers_the_key_lookup_of_older_redis_py(acl_cluster: LocalCluster) -> None:
    """redis-py before the key specs asked ``COMMAND GETKEYS`` where an XREADGROUP's keys lie."""
    prepare(acl_cluster, rules("rl-model", *CLUSTER_EXTRAS))
    read = ("XREADGROUP", "GROUP", "model:m1", "c", "STREAMS", f"{PREFIX}:observation", ">")
    for port in acl_cluster.ports:
        with redis.Redis.from_url(user_url("rl-model", port)) as user:
            assert user.execute_command("COMMAND GETKEYS", *read) == [f"{PREFIX}:observation"]
    assert refused(acl_cluster) == set()


def test_the_extras_grant_no_data(acl_cluster: LocalCluster) -> None:
    """The extras read the cluster's layout and the command table, never a key outside the rules."""
    prepare(acl_cluster, rules("rl-client", *CLUSTER_EXTRAS))
    forbidden = [
        ("CLUSTER", "NODES"),
        ("CLUSTER", "SHARDS"),
        ("CLUSTER", "GETKEYSINSLOT", "0", "10"),
        ("READONLY",),
        ("WAIT", "0", "0"),
    ]
    with redis.Redis.from_url(user_url("rl-client", acl_cluster.ports[0])) as node:
        for command in forbidden:
            with pytest.raises(redis.exceptions.NoPermissionError):
                node.execute_command(*command)
    client = redis.RedisCluster.from_url(user_url("rl-client", acl_cluster.ports[0]))
    with client, pytest.raises(redis.exceptions.NoPermissionError):
        client.hgetall(f"{PREFIX}:model:m1:checkpoint")


# --------------------------------------------------------------------------- without one


@pytest.mark.parametrize("missing", CLUSTER_EXTRAS)
@pytest.mark.parametrize("user", ["rl-model", "rl-client"])
def test_a_documented_user_short_of_a_cluster_extra_is_refused(
    acl_cluster: LocalCluster, user: str, missing: str
) -> None:
    """Without either extra a cluster client cannot connect: each one is needed, by both users."""
    prepare(acl_cluster, rules(user, *(extra for extra in CLUSTER_EXTRAS if extra != missing)))
    url = user_url(user, acl_cluster.ports[0])
    # One line naming what was refused (redis-py itself reports a refused CLUSTER SLOTS as "Cluster
    # mode is not enabled", and a refused COMMAND as a NoPermissionError from deep inside).
    wanted = "grant \\+cluster\\|slots" if missing == "+cluster|slots" else "run the 'command' command"
    with pytest.raises(RedisAccessError, match=wanted):
        if user == "rl-model":
            model_settings(url).connect()
        else:
            PolicyClient(url, mode="direct", model="m1", cluster=True, timeout=2.0)
    assert {command for _, command in refused(acl_cluster)} == {missing.lstrip("+")}


@pytest.mark.parametrize("missing", WAIT_EXTRAS)
def test_wait_replicas_needs_its_extras(acl_cluster: LocalCluster, missing: str) -> None:
    """With ``--wait-replicas``, a user short of ``+script|exists`` has its first commit refused before
    anything is written; one short of ``+wait`` commits, and counts each commit as not waited for."""
    prepare(acl_cluster, rules("rl-model", *CLUSTER_EXTRAS, *(x for x in WAIT_EXTRAS if x != missing)))
    settings = model_settings(user_url("rl-model", acl_cluster.ports[0]), wait_replicas=1, wait_timeout_ms=20)
    worker = ModelWorker(settings, settings.connect())
    command = missing.lstrip("+")
    if command == "wait":
        worker.start()  # its first commit stands
        assert worker.store.unreplicated == 1 and worker.counters.version == 1
    else:
        with pytest.raises(CommitRefused, match=f"run the '{command}' command"):
            worker.start()
        admin = connect(acl_cluster.url, cluster=True)
        assert not admin.exists(worker.store.checkpoint_key)  # nothing written
    assert {refusal for _, refusal in refused(acl_cluster)} == {command}


def test_the_extras_are_documented() -> None:
    security = (ROOT / "docs/security.md").read_text()
    for extras in (CLUSTER_EXTRAS, WAIT_EXTRAS):
        assert f"`{' '.join(extras)}`" in security, extras


# --------------------------------------------------------------------------- TLS


@dataclass
class TLSNodes:
    """The nodes of a TLS-only cluster, and admin clients that trust its CA."""

    ports: list[int]
    ca: Path

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(self.ca), socket_timeout=5)

    def every(self, check: Callable[[redis.Redis], bool]) -> bool:
        """Whether ``check`` holds on every node (not while one does not answer)."""
        try:
            for port in self.ports:
                with self.node(port) as node:
                    if not check(node):
                        return False
        except redis.RedisError:
            return False
        return True


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA and a certificate for 127.0.0.1 it signed (the nodes' and the bus's)."""
    _need("openssl")
    d = tmp_path_factory.mktemp("tls")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=rl-test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=rl-server", "-keyout", "server.key",
            "-out", "server.csr", cwd=d)  # fmt: skip
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", "server.crt", "-extfile", "server.ext", cwd=d)  # fmt: skip
    return d


@pytest.fixture
def tls_cluster(certificates: Path) -> Iterator[TLSNodes]:
    """Three primaries with no plain port (``--port 0``), TLS on the bus too (``--tls-cluster yes``).

    Not a :class:`LocalCluster`: that gives every node a plain port and waits for a plain PING.
    """
    _need("redis-server")
    _need("redis-cli")
    tls = ("--tls-cert-file", str(certificates / "server.crt"), "--tls-key-file",
           str(certificates / "server.key"), "--tls-ca-cert-file", str(certificates / "ca.crt"),
           "--tls-auth-clients", "no")  # fmt: skip
    nodes = TLSNodes(cluster_ports(3), certificates / "ca.crt")
    workdir = Path(tempfile.mkdtemp(prefix="rl-tls-cluster-"))
    processes = []
    try:
        for port in nodes.ports:
            args = ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cluster", "yes"]
            args += ["--bind", "127.0.0.1", "--dir", str(workdir), "--cluster-enabled", "yes", "--save", ""]
            args += ["--cluster-config-file", f"nodes-{port}.conf", "--appendonly", "no", *tls]
            processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while not nodes.every(lambda node: node.ping()):
            if any(process.poll() is not None for process in processes):
                skip_unless_tls_built(tls)
                raise RuntimeError("a node of the TLS cluster did not start")
            assert time.monotonic() < deadline, "the TLS cluster's nodes did not answer"
            time.sleep(0.05)
        create = ["redis-cli", "--tls", "--cacert", str(nodes.ca), "--cluster", "create"]
        create += [f"127.0.0.1:{port}" for port in nodes.ports] + ["--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 60
        while not nodes.every(lambda node: node.cluster("INFO")["cluster_state"] == "ok"):
            assert time.monotonic() < deadline, "the TLS cluster did not become ready"
            time.sleep(0.1)
        yield nodes
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_tls_cluster_with_the_documented_users_and_extras(tls_cluster: TLSNodes) -> None:
    """``rediss://...?ssl_ca_certs=`` and ``--cluster``: connect() reaches every node over TLS (the
    slot map names the TLS ports), and the extras are the same as on plain ports."""
    prepare(tls_cluster, rules("rl-model", *CLUSTER_EXTRAS), rules("rl-client", *CLUSTER_EXTRAS))
    query = f"?ssl_ca_certs={tls_cluster.ca}"
    first, second = tls_cluster.ports[:2]
    settings = model_settings(user_url("rl-model", first, "rediss", query))
    worker = ModelWorker(settings, settings.connect())
    with running(worker):
        actions = play(user_url("rl-client", second, "rediss", query), "direct")
    assert set(actions) <= {0, 1} and worker.counters.observations == 3
    assert refused(tls_cluster) == set()
