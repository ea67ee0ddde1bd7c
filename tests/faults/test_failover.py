"""A failover: the components started against a replica, which refuses every write (READONLY), back
off and wait instead of crashing; once the replica is promoted they start, and the loop runs on it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import redis

from tests.faults.chaos import Incarnation, RedisServer, spawn, worker_command
from tests.helpers import read, xadd
from worker.control import wait_for_loop
from worker.protocol import Streams

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]


def component(url: str, name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "worker", name, "--redis-url", url, "--log-json", *args]


def wait(condition, what: str, processes: list[Incarnation], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for p in processes:
            assert p.process.poll() is None, f"{p.log_path.name} exited:\n{p.log_path.read_text()[-3000:]}"
            p.read_log()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_loop_started_on_a_replica_runs_once_it_is_promoted(tmp_path: Path) -> None:
    servers = []
    for name in ("primary", "replica"):
        (tmp_path / name).mkdir()
        servers.append(RedisServer(tmp_path / name))
    primary, replica = servers
    processes: list[Incarnation] = []
    try:
        for server in servers:
            server.start()
        client = redis.Redis.from_url(replica.url)
        client.replicaof("127.0.0.1", primary.port)
        commands = {
            "model": worker_command(replica.url, "m1", "--lease-ttl", "1"),
            "aggregator": component(replica.url, "aggregator"),
            "env": component(replica.url, "env", "--n-envs", "2", "--runner-id", "r", "--seed", "0"),
        }
        processes = [spawn(args, tmp_path / f"{name}.log", name) for name, args in commands.items()]
        # Each of them tried to write (its consumer group, its "ready" mark) and was refused.
        wait(lambda: all(p.events["redis unreachable, retrying"] for p in processes), "refusals", processes)

        client.replicaof("NO", "ONE")  # the failover: the replica becomes the primary
        streams = Streams("rl")
        wait(lambda: processes[0].ready is not None, "the model to be ready", processes)
        wait_for_loop(client, streams, ["r"], since=0)
        xadd(client, streams.control, {"CMD": "RUN", "RUN_ID": "after-failover", "STEPS": 10})

        def reports() -> list[dict]:
            return [m for _, m in read(client, streams.status) if m.get("EVENT") == "run"]

        wait(lambda: reports(), "the run's report", processes)
        [report] = reports()
        assert report["STEPS"] == 10 and "ERROR" not in report, report
        answered = {m["OBS_ID"] for _, m in read(client, streams.action)}
        assert {i for i, _ in read(client, streams.observation)} == answered
    finally:
        for p in processes:
            if p.process.poll() is None:
                p.process.terminate()
        for p in processes:
            try:
                p.process.wait(timeout=30)
            except Exception:
                p.process.kill()
        for server in servers:
            server.close()


def test_the_loop_rides_out_its_primary_being_demoted_and_promoted_again(tmp_path: Path) -> None:
    """A failover and back, under running components: demoted, the primary ends their blocked reads
    (UNBLOCKED) and refuses their writes (READONLY); they back off, and go on once it is promoted."""
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        servers.append(RedisServer(tmp_path / name))
    a, b = servers
    processes: list[Incarnation] = []
    try:
        for server in servers:
            server.start()
        client, other = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
        other.replicaof("127.0.0.1", a.port)
        commands = {
            "model": worker_command(a.url, "m1", "--lease-ttl", "1"),
            "aggregator": component(a.url, "aggregator"),
            "env": component(a.url, "env", "--n-envs", "2", "--runner-id", "r", "--seed", "0"),
        }
        processes = [spawn(args, tmp_path / f"{name}.log", name) for name, args in commands.items()]
        streams = Streams("rl")
        wait(lambda: processes[0].ready is not None, "the model to be ready", processes)
        wait_for_loop(client, streams, ["r"], since=0)

        def run(run_id: str) -> dict:
            xadd(client, streams.control, {"CMD": "RUN", "RUN_ID": run_id, "STEPS": 10})

            def report() -> list[dict]:
                runs = [m for _, m in read(client, streams.status) if m.get("EVENT") == "run"]
                return [m for m in runs if m.get("RUN_ID") == run_id]  # not its episodes' entries

            wait(report, f"the report of {run_id}", processes)
            return report()[0]

        assert "ERROR" not in run("before")
        wait(
            lambda: (
                other.info("replication")["master_repl_offset"]
                >= client.info("replication")["master_repl_offset"]
            ),
            "b to catch up",
            processes,
        )  # noqa: E501
        other.replicaof("NO", "ONE")  # the failover: b is the primary, a its replica
        client.replicaof("127.0.0.1", b.port)
        wait(lambda: all(p.events["redis unreachable, retrying"] for p in processes), "refusals", processes)
        wait(lambda: client.info("replication")["master_link_status"] == "up", "a to follow b", processes)
        client.replicaof("NO", "ONE")  # and back
        other.replicaof("127.0.0.1", a.port)
        report = run("after")
        assert report["STEPS"] == 10 and "ERROR" not in report, report
        assert all(p.process.poll() is None for p in processes)  # nobody crashed
    finally:
        for p in processes:
            if p.process.poll() is None:
                p.process.terminate()
        for p in processes:
            try:
                p.process.wait(timeout=30)
            except Exception:
                p.process.kill()
        for server in servers:
            server.close()
