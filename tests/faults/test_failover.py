"""Failovers: the components started against a replica, which refuses every write (READONLY), back
off and wait instead of crashing, and the loop runs once the replica is promoted; a primary demoted
under a running loop (UNBLOCKED, then READONLY) and promoted again finds it running on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from tests.faults.chaos import Incarnation, RedisServer, spawn, worker_command
from tests.helpers import read, xadd
from worker.control.train import wait_for_loop
from worker.protocol import Streams

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]
STREAMS = Streams("rl")


def wait(condition, what: str, processes: list[Incarnation], timeout: float = 120) -> None:
    """Until ``condition()``, while every process lives (their logs read as it goes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        for p in processes:
            assert p.process.poll() is None, f"{p.log_path.name} exited:\n{p.log_path.read_text()[-3000:]}"
            p.read_log()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def two_servers(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    servers: list[RedisServer] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            servers.append(RedisServer(tmp_path / name))
            servers[-1].start()
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.close()


@contextmanager
def the_loop(url: str, tmp_path: Path) -> Iterator[list[Incarnation]]:
    """A model worker, the aggregator and a runner ``r`` of 2 environments, as processes on ``url``."""

    def command(name: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "worker", name, "--redis-url", url, "--log-json", *args]

    commands = {
        "model": worker_command(url, "m1", "--lease-ttl", "1"),
        "aggregator": command("aggregator"),
        "env": command("env", "--n-envs", "2", "--runner-id", "r", "--seed", "0", "--no-trim-replies"),
    }
    processes: list[Incarnation] = []
    try:
        for name, args in commands.items():
            processes.append(spawn(args, tmp_path / f"{name}.log", name))
        yield processes
    finally:
        for p in processes:
            if p.process.poll() is None:
                p.process.terminate()
        for p in processes:
            try:
                p.process.wait(timeout=30)
            except Exception:
                p.process.kill()


def run(client: redis.Redis, run_id: str, processes: list[Incarnation]) -> dict:
    """Send a RUN of 10 steps and wait for its report (its EVENT run entry, not its episodes')."""
    xadd(client, STREAMS.control, {"CMD": "RUN", "RUN_ID": run_id, "STEPS": 10})

    def reports() -> list[dict]:
        return [
            m for _, m in read(client, STREAMS.status) if m.get("EVENT") == "run" and m["RUN_ID"] == run_id
        ]

    wait(reports, f"the report of {run_id}", processes)
    return reports()[0]


def refused(processes: list[Incarnation]) -> bool:
    return all(p.events["redis unavailable, retrying"] for p in processes)


def test_the_loop_started_on_a_replica_runs_once_it_is_promoted(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (primary, replica):
        client = redis.Redis.from_url(replica.url)
        client.replicaof("127.0.0.1", primary.port)
        with the_loop(replica.url, tmp_path) as processes:
            # Each of them tried to write (its consumer group, its "ready" mark) and was refused.
            wait(lambda: refused(processes), "refusals", processes)
            client.replicaof("NO", "ONE")  # the failover: the replica becomes the primary
            wait(lambda: processes[0].ready is not None, "the model to be ready", processes)
            wait_for_loop(client, STREAMS, ["r"], since=0)
            report = run(client, "after-failover", processes)
            assert report["STEPS"] == 10 and "ERROR" not in report, report
            answered = {m["OBS_ID"] for _, m in read(client, STREAMS.replies("r"))}
            assert {i for i, _ in read(client, STREAMS.observation)} == answered


def test_the_loop_rides_out_its_primary_being_demoted_and_promoted_again(tmp_path: Path) -> None:
    """A failover and back, under running components: demoted, the primary ends their blocked reads
    (UNBLOCKED) and refuses their writes (READONLY); they back off, and go on once it is promoted."""
    with two_servers(tmp_path) as (a, b):
        client, other = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
        other.replicaof("127.0.0.1", a.port)
        with the_loop(a.url, tmp_path) as processes:
            wait(lambda: processes[0].ready is not None, "the model to be ready", processes)
            wait_for_loop(client, STREAMS, ["r"], since=0)
            assert "ERROR" not in run(client, "before", processes)

            def offset(c: redis.Redis) -> int:
                return c.info("replication")["master_repl_offset"]

            wait(lambda: offset(other) >= offset(client), "b to catch up", processes)
            other.replicaof("NO", "ONE")  # the failover: b is the primary, a its replica
            client.replicaof("127.0.0.1", b.port)
            wait(lambda: refused(processes), "refusals", processes)
            wait(lambda: client.info("replication")["master_link_status"] == "up", "a to follow b", processes)
            client.replicaof("NO", "ONE")  # and back
            other.replicaof("127.0.0.1", a.port)
            report = run(client, "after", processes)
            assert report["STEPS"] == 10 and "ERROR" not in report, report
            assert all(p.process.poll() is None for p in processes)  # nobody crashed
