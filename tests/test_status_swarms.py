"""``control status --swarms``: every swarm on a Redis Cluster (each on its own primary) or on one
redis-server is found by its keys and listed with its live models, lag, pending and dead entries."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis

from tests.components import model, running
from tests.helpers import xadd
from worker.cli import main
from worker.common.connections import connect
from worker.common.servers import LocalCluster
from worker.control.status import status
from worker.control.swarms import Swarm, print_swarms, swarms
from worker.model.loop import ModelWorker
from worker.model.settings import ModelSettings
from worker.protocol import Streams

pytestmark = pytest.mark.redis_server

# Slots 8589, 4590 and 12584: one in each third of the slots, so on three primaries ({sc}, slot 463,
# would share {sb}'s). Each swarm gets its own count of observations, so no row can pass for another.
PUBLISHED = {"{sa}": 2, "{sb}": 3, "{sd}": 4}
OBSERVATION = [0.01, 0.02, 0.03, 0.04]  # CartPole-v1, the models' default


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def heartbeating(*workers: ModelWorker) -> Iterator[None]:
    """Keep workers that are started but never stepped in the registry, as their loop would."""
    halt = threading.Event()

    def beat() -> None:
        while not halt.wait(0.2):
            for worker in workers:
                worker.store.heartbeat({"consumer": worker.consumer})

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        halt.set()
        thread.join(5)


def forget(client: redis.Redis, prefix: str) -> None:
    """Delete every key of the swarm under ``prefix`` (the session's cluster outlives this test)."""
    for key in list(client.scan_iter(match=f"{prefix}*")):
        client.delete(key)


def read_one(client: redis.Redis, stream: str, worker: ModelWorker) -> None:
    """Take one entry in ``worker``'s group without committing it: pending 1, lag one less."""
    assert client.xreadgroup(worker.group, "status-test", {stream: ">"}, count=1)


def cli(*args: str) -> str:
    """``python -m worker control status ARGS`` in its own process; its standard output."""
    command = [sys.executable, "-m", "worker", "control", "status", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def cluster_client(cluster: LocalCluster) -> Iterator[redis.Redis]:
    client = connect(cluster.url, cluster=True)
    for prefix in PUBLISHED:
        forget(client, prefix)
    yield client
    for prefix in PUBLISHED:
        forget(client, prefix)
    client.close()


def expected(n: int, stepping: str, idle: str) -> dict:
    """A swarm of ``n`` observations whose stepping model answered all and whose idle one took one."""
    groups = {
        f"model:{stepping}": {"pending": 0, "lag": 0, "stale": False},
        f"model:{idle}": {"pending": 1, "lag": n - 1, "stale": False},
    }
    counts = {"observations": n, "lag": n - 1, "pending": 1, "stale": 0, "dead": 0}
    return {"models": sorted([stepping, idle]), **counts, "groups": groups}


def test_swarms_on_a_cluster_are_listed_with_their_models_lag_and_primaries(
    request: pytest.FixtureRequest, cluster: LocalCluster, cluster_client: redis.Redis
) -> None:
    client = cluster_client
    primaries = {prefix: cluster.master_of(Streams(prefix).registry) for prefix in PUBLISHED}
    assert len(set(primaries.values())) == 3, primaries

    def worker(prefix: str, name: str) -> ModelWorker:
        component_id = f"{prefix.strip('{}')}-{name}"
        options = {"cluster": True, "prefix": prefix, "component_id": component_id, "seed": 0, "block_ms": 50}
        settings = ModelSettings(_cli_parse_args=False, redis_url=cluster.url, **options)
        own = connect(cluster.url, cluster=True)
        request.addfinalizer(own.close)
        return ModelWorker(settings, own)

    stepping = {prefix: worker(prefix, "stepping") for prefix in PUBLISHED}
    idle = {prefix: worker(prefix, "idle") for prefix in PUBLISHED}
    for w in idle.values():
        w.start()  # its group, at the stream's end: every observation below is lag until read
    with running(*stepping.values()) as run, heartbeating(*idle.values()):
        for prefix, n in PUBLISHED.items():
            for i in range(n):
                xadd(client, Streams(prefix).observation, {"OBSERVATION": OBSERVATION, "ENV_ID": f"e{i}"})
        for prefix, n in PUBLISHED.items():
            answered = Streams(prefix).logits
            wait_until(lambda s=answered, n=n: run.errors or client.xlen(s) == n, f"{prefix}'s logits")
            assert not run.errors, run.errors
            read_one(client, Streams(prefix).observation, idle[prefix])
        want = {p: expected(n, stepping[p].component_id, idle[p].component_id) for p, n in PUBLISHED.items()}
        for p in want:
            want[p]["primary"] = f"127.0.0.1:{primaries[p]}"

        rows = {row.prefix: row for row in swarms(client)}  # other tests' swarms may be there too
        assert set(PUBLISHED) <= set(rows), sorted(rows)
        for prefix in PUBLISHED:
            row = rows[prefix]
            got = {k: getattr(row, k) for k in want[prefix]}
            assert got == want[prefix], prefix

        text = cli("--cluster", "--swarms", "--redis-url", cluster.url)
        assert text.startswith(f"redis: {cluster.url}\n"), text
        assert "primary" in text.splitlines()[2], text
        for prefix, n in PUBLISHED.items():
            (line,) = [line for line in text.splitlines() if line.split()[:1] == [prefix]]
            columns = line.split(maxsplit=8)
            assert columns[1:8] == ["2", str(n), str(n - 1), "1", "0", "0", want[prefix]["primary"]], line
            assert columns[8].split(", ") == want[prefix]["models"], line

        found = json.loads(cli("--cluster", "--swarms", "--redis-url", cluster.url, "--output", "json"))
        rows_json = {row["prefix"]: row for row in found["swarms"]}
        for prefix in PUBLISHED:
            row = rows_json[prefix]
            assert {k: row[k] for k in want[prefix]} == want[prefix], prefix
            assert row["live"] == 2

        # The one-prefix report reads the same swarm on the cluster as before.
        report = status(client, Streams("{sb}"))
        assert sorted(report["models"]) == want["{sb}"]["models"]
        assert report["streams"]["{sb}:observation"] == 3
        idle_group = report["groups"][f"{{sb}}:observation model:{idle['{sb}'].component_id}"]
        assert idle_group == {"pending": 1, "lag": 2}


def test_one_prefix_report_on_a_cluster_through_the_cli(
    capsys, cluster: LocalCluster, cluster_client: redis.Redis
) -> None:
    """``control status --cluster --prefix {sa}`` as a person types it: the swarm's own keys, one slot."""
    streams = Streams("{sa}")
    xadd(cluster_client, streams.observation, {"OBSERVATION": OBSERVATION, "ENV_ID": "e"})
    cluster_client.xgroup_create(streams.observation, Streams.group("gone"), id="0")
    cluster_client.xadd(streams.dead, {"REASON": "test"})
    args = ["--cluster", "--prefix", "{sa}", "--redis-url", cluster.url, "--output", "json"]
    assert main(["control", "status", *args]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["streams"]["{sa}:observation"] == 1 and report["dead"] == 1
    assert report["groups"]["{sa}:observation model:gone"] == {"pending": 0, "lag": 1, "stale": True}


@pytest.fixture
def plain(real_redis: redis.Redis, settings: ModelSettings) -> Iterator[dict[str, ModelWorker]]:
    """On one redis-server: swarm ``rl`` (model m1, a stale group, a reader that is no model), swarm
    ``team:b`` (a prefix with a colon; model m2, a dead entry, no observation yet), swarm ``old``
    (observations, no model left), and keys that only look like marks."""
    m1, m2 = model(settings, "m1"), model(settings, "m2", prefix="team:b")
    m1.start()
    m2.start()  # both leave an inbox behind, "<prefix>:model:<id>:observation": no swarm
    rl = Streams("rl")
    for i in range(3):
        xadd(real_redis, rl.observation, {"OBSERVATION": OBSERVATION, "ENV_ID": f"e{i}"})
    real_redis.xgroup_create(rl.observation, Streams.group("gone"), id="0")  # lag 3, not a live model's
    real_redis.xgroup_create(rl.observation, "audit", id="0")  # not a model's group: not counted at all
    for _ in range(2):
        read_one(real_redis, rl.observation, m1)  # m1: pending 2, lag 1
    real_redis.xadd(Streams("team:b").dead, {"REASON": "test"})
    xadd(real_redis, Streams("old").observation, {"OBSERVATION": OBSERVATION, "ENV_ID": "e"})
    real_redis.set("cache:models", "a string, not a registry")
    real_redis.rpush("queue:observation", "a list, not a stream")
    yield {"rl": m1, "team:b": m2}
    for worker in (m1, m2):
        worker.redis.close()


def beat(workers: dict[str, ModelWorker]) -> None:
    """Heartbeat now, so the started (never stepped) models are live when the report is made."""
    for worker in workers.values():
        worker.store.heartbeat({"consumer": worker.consumer})


def test_swarms_on_one_redis_server(real_redis: redis.Redis, plain: dict[str, ModelWorker]) -> None:
    beat(plain)
    rows = swarms(real_redis)
    assert [row.prefix for row in rows] == ["old", "rl", "team:b"]
    old, rl, team = rows
    assert old == Swarm("old", [], observations=1, lag=None, pending=0, stale=0, dead=0)
    assert (rl.models, rl.observations, rl.lag, rl.pending, rl.stale, rl.dead) == (["m1"], 3, 1, 2, 1, 0)
    assert rl.groups == {
        "model:m1": {"pending": 2, "lag": 1, "stale": False},
        "model:gone": {"pending": 0, "lag": 3, "stale": True},
    }
    assert (team.models, team.observations, team.lag, team.pending, team.dead) == (["m2"], 0, 0, 0, 1)
    assert rl.primary is None and team.primary is None


def test_swarms_of_one_redis_server_as_text_and_json(
    capsys, redis_server_url: str, plain: dict[str, ModelWorker]
) -> None:
    beat(plain)
    print_swarms(swarms(redis.Redis.from_url(redis_server_url)))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "swarms: 3" and "primary" not in lines[1]
    assert [line.split() for line in lines[2:]] == [
        ["old", "0", "1", "?", "0", "0", "0", "-"],
        ["rl", "1", "3", "1", "2", "1", "0", "m1"],
        ["team:b", "1", "0", "0", "0", "0", "1", "m2"],
    ]
    beat(plain)
    assert main(["control", "status", "--swarms", "--redis-url", redis_server_url, "--output", "json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["redis"] == redis_server_url
    assert [(s["prefix"], s["live"], s["models"], s["lag"]) for s in found["swarms"]] == [
        ("old", 0, [], None),
        ("rl", 1, ["m1"], 1),
        ("team:b", 1, ["m2"], 0),
    ]
