"""Cluster mode on a real local Redis Cluster (3 primaries, 3 replicas): the flags and their
refusals, commits that wait for a replica, the client library, and the whole loop solving
CartPole-v1 with every key of its swarm in one slot."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest

from tests.components import running
from tests.helpers import read
from worker.client import PolicyClient
from worker.common.connections import connect, hash_tagged, swarm_prefix
from worker.common.servers import LocalCluster
from worker.control.demo import DemoSettings, train_swarm
from worker.model.loop import ModelWorker
from worker.model.settings import ModelSettings
from worker.protocol import Streams

pytestmark = pytest.mark.redis_server


def worker(cli: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker", *cli], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize(
    ("prefix", "tagged"),
    [("{rl}", True), ("{a}:x", True), ("team:{b}", True), ("rl", False), ("{}rl", False), ("{rl", False),
     ("{}{rl}", False)],  # Redis hashes a key whose first tag is empty whole
)
def test_a_prefix_fits_a_cluster_only_with_a_hash_tag(prefix: str, tagged: bool) -> None:
    assert hash_tagged(prefix) is tagged


def test_the_default_prefix_on_a_cluster_is_a_hash_tag_and_an_untagged_one_is_refused() -> None:
    assert swarm_prefix(None, cluster=True) == "{rl}" and swarm_prefix(None, cluster=False) == "rl"
    with pytest.raises(ValueError, match=r"use --prefix '\{team\}'"):
        swarm_prefix("team", cluster=True)


def test_the_cli_refuses_an_untagged_prefix_in_one_line(cluster: LocalCluster) -> None:
    done = worker(["model", "--redis-url", cluster.url, "--cluster", "--prefix", "rl"])
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "must hold a hash tag" in done.stderr and "--prefix '{rl}'" in done.stderr


def test_cluster_mode_against_a_single_redis_is_one_line(redis_server_url: str) -> None:
    done = worker(["control", "status", "--redis-url", redis_server_url, "--cluster"])
    assert done.returncode == 1
    wanted = f"error: Redis at {redis_server_url} is not a cluster node: drop --cluster (REDIS_CLUSTER)"
    assert done.stderr.strip() == wanted


def test_status_reads_a_swarm_on_a_cluster(cluster: LocalCluster) -> None:
    client = connect(cluster.url, cluster=True)
    client.zadd("{st}:models", {"m1": time.time()})
    done = worker(["control", "status", "--redis-url", cluster.url, "--cluster", "--prefix", "{st}"])
    assert done.returncode == 0, done.stderr
    assert "live models: 1" in done.stdout and "{st}:observation" in done.stdout


def test_stream_reads_go_to_their_slot_without_asking_the_default_node(cluster: LocalCluster) -> None:
    client = connect(cluster.url, cluster=True)
    client.xadd("{sr}:s", {"x": 1})
    client.xgroup_create("{sr}:s", "g", id="0")
    primary = cluster.master_of("{sr}:s")
    client.replace_default_node(next(n for n in client.get_primaries() if n.port != primary))

    def calls(command: str) -> dict[int, int]:
        found = {}
        for port in cluster.running():
            with cluster.node(port) as node:
                found[port] = node.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)
        return found

    before = (calls("command|getkeys"), calls("xread"), calls("xreadgroup"))
    for _ in range(5):
        assert client.xread({"{sr}:s": "0"}, count=1)
        client.xreadgroup("g", "c", {"{sr}:s": ">"}, count=1)
    after = (calls("command|getkeys"), calls("xread"), calls("xreadgroup"))
    assert after[0] == before[0]  # no COMMAND GETKEYS anywhere
    assert after[1][primary] - before[1][primary] == 5 and after[2][primary] - before[2][primary] == 5


def cluster_model(cluster: LocalCluster, prefix: str, **changes) -> ModelWorker:
    settings = ModelSettings(
        _cli_parse_args=False, redis_url=cluster.url, cluster=True, prefix=prefix, component_id="m1",
        seed=0, block_ms=50, lease_ttl=2.0, **changes,
    )  # fmt: skip
    return ModelWorker(settings, settings.connect())


def act_for_a_while(url: str, prefix: str, steps: int) -> list[int]:
    """A client in direct mode stepping one CartPole-like environment ``steps`` times."""
    rng = np.random.default_rng(0)
    with PolicyClient(url, prefix=prefix, mode="direct", model="m1", cluster=True, timeout=20) as client:
        actions = [client.act("e1", rng.normal(size=4).astype(np.float32))]
        for _ in range(steps - 1):
            actions.append(client.act("e1", rng.normal(size=4).astype(np.float32), reward=1.0))
        return actions


@pytest.mark.parametrize(("replicas", "unreplicated"), [(1, False), (3, True)])
def test_commits_wait_for_replicas_and_count_those_that_time_out(
    cluster: LocalCluster, replicas: int, unreplicated: bool
) -> None:
    prefix = f"{{wait{replicas}}}"
    model = cluster_model(cluster, prefix, wait_replicas=replicas, wait_timeout_ms=20)
    with running(model):
        actions = act_for_a_while(cluster.url, prefix, 30)
    assert len(actions) == 30 and set(actions) <= {0, 1}
    assert model.counters.observations == 30 and model.counters.transitions == 29
    # Each shard has one replica: WAIT 1 is met at once, WAIT 3 never (it returns 1 when it times out).
    assert (model.store.unreplicated > 0) is unreplicated
    assert model.store.unreplicated <= model.counters.version
    if replicas == 1:  # the last commit, on the replica of the swarm's primary, once WAIT returned
        primary = cluster.master_of(prefix)
        for port in cluster.running():
            with cluster.node(port) as node:
                info = node.info("replication")
                if info["role"] == "slave" and info["master_port"] == primary:
                    node.execute_command("READONLY")
                    stored = node.hget(Streams(prefix).model_key("m1", "checkpoint"), "version")
                    assert int(stored) == model.counters.version


def test_the_client_library_acts_on_a_cluster(cluster: LocalCluster) -> None:
    model = cluster_model(cluster, "{lib}")
    with running(model):
        assert len(act_for_a_while(cluster.url, "{lib}", 12)) == 12
    with pytest.raises(ValueError, match="hash tag"):
        PolicyClient(cluster.url, prefix="lib", cluster=True)


@pytest.mark.slow
def test_the_whole_loop_solves_cartpole_on_the_cluster(cluster: LocalCluster) -> None:
    """Two models, the aggregator and a runner of 8 environments as processes, PBT between rounds:
    the demo, on the cluster, until the mean deterministic return over 20 episodes reaches 475."""
    settings = DemoSettings(
        _cli_parse_args=False,
        redis_url=cluster.url,
        cluster=True,
        prefix="{solve}",
        rounds=20,
        steps=5_000,
        seed=0,
        progress=False,
    )
    curve = train_swarm(settings)
    assert curve and curve[-1].eval_return >= 475, [round(p.eval_return) for p in curve]
    client = connect(cluster.url, cluster=True)
    assert client.xlen("{solve}:dead") == 0


@pytest.mark.slow
def test_three_swarms_run_whole_loops_side_by_side_on_three_primaries(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIM_REPLIES", "false")  # the runners keep the actions they read, to count them
    prefixes = ["{a}", "{b}", "{c}"]
    assert len({cluster.master_of(f"{p}:observation") for p in prefixes}) == 3
    curves: dict[str, list] = {}

    def train(prefix: str) -> None:
        settings = DemoSettings(
            _cli_parse_args=False, redis_url=cluster.url, cluster=True, prefix=prefix, models=1,
            n_envs=2, rounds=1, steps=600, eval_episodes=2, target=None, seed=1, progress=False,
            evolve=False,
        )  # fmt: skip
        curves[prefix] = train_swarm(settings)

    threads = [threading.Thread(target=train, args=(p,)) for p in prefixes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert sorted(curves) == prefixes and all(len(c) == 1 for c in curves.values())
    client = connect(cluster.url, cluster=True)
    for prefix in prefixes:  # each swarm answered each of its own steps once, in its own slot
        observations = {i for i, _ in read(client, f"{prefix}:observation")}
        actions = Counter(m["OBS_ID"] for _, m in read(client, f"{prefix}:action:demo"))
        assert observations and set(actions) == observations and max(actions.values()) == 1
        assert client.xlen(f"{prefix}:dead") == 0 and curves[prefix][0].train_steps == 600


@pytest.mark.slow
def test_the_demo_runs_on_an_embedded_cluster(tmp_path) -> None:
    done = worker(
        ["demo", "--cluster", "--rounds", "1", "--steps", "1000", "--eval-episodes", "2", "--target", "1",
         "--no-progress", "--plot", str(tmp_path / "curve.png"), "--seed", "0"],
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "started a private Redis Cluster" in done.stdout + done.stderr
    assert "final mean deterministic return" in done.stdout and (tmp_path / "curve.png").exists()
