"""Slow and dead consumers, with real worker processes: entries left pending on a consumer that died
are reclaimed once idle for ``--claim-idle-ms``; a frozen worker is replaced by a standby and cannot
commit when it wakes; an entry that kills every worker that reads it goes to ``dead`` with its history
after ``--max-deliveries`` instead of looping forever, and the entries around it are answered.

(In-process versions of the first and last cases are in tests/test_recovery.py; these add the
processes, the periodic reclaim, SIGSTOP and a real kill per delivery.)
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from tests.faults.chaos import Incarnation, spawn, worker_command
from tests.helpers import read
from worker.common.connections import ensure_group
from worker.model.store import ModelStore
from worker.protocol import Streams

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]

OBS = "[0.0,0.1,0.0,-0.1]"


def start(url: str, log: Path, *extra: str, module: str = "worker") -> Incarnation:
    return spawn(worker_command(url, "m1", "--lease-ttl", "1", *extra, module=module), log, "m1")


def wait_for(condition, timeout: float, what: str, worker: Incarnation | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if worker is not None and worker.process.poll() is not None:
            raise AssertionError(
                f"worker exited with {worker.process.returncode}: {worker.log_path.read_text()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def logged(worker: Incarnation, event: str) -> bool:
    worker.read_log()
    return worker.events[event] > 0


def answers(client: redis.Redis) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, reply in read(client, "rl:logits"):
        counts[reply["OBS_ID"]] = counts.get(reply["OBS_ID"], 0) + 1
    return counts


def stop(worker: Incarnation) -> None:
    if worker.process.poll() is None:
        worker.process.send_signal(signal.SIGCONT)
        worker.process.send_signal(signal.SIGTERM)
        try:
            worker.process.wait(timeout=30)
        except Exception:
            worker.process.kill()
            worker.process.wait()


def test_entries_left_on_a_dead_consumer_are_reclaimed_once_idle(
    real_redis, redis_server_url, tmp_path
) -> None:
    idle_ms = 2000
    worker = start(
        redis_server_url, tmp_path / "m1.log", "--claim-idle-ms", str(idle_ms), "--heartbeat-interval", "0.2"
    )
    try:
        wait_for(lambda: logged(worker, "ready"), 120, "the worker", worker)
        # A consumer reads five entries and dies. XADD and XREADGROUP in one transaction, so the live
        # worker (blocked on the group) cannot get them first.
        with real_redis.pipeline(transaction=True) as pipe:
            for k in range(5):
                pipe.xadd("rl:observation", {"OBSERVATION": OBS, "ENV_ID": f"orphan-{k}"})
            pipe.xreadgroup("model:m1", "dead-consumer", {"rl:observation": ">"}, count=10)
            *orphans, _ = pipe.execute()
        orphans = [i.decode() for i in orphans]
        read_at = time.monotonic()
        # Entries published meanwhile are answered at once: nothing waits behind the orphans.
        live = [
            real_redis.xadd("rl:observation", {"OBSERVATION": OBS, "ENV_ID": "live"}).decode()
            for _ in range(3)
        ]
        wait_for(lambda: all(i in answers(real_redis) for i in live), 30, "the live entries", worker)
        # Before the idle time the orphans still belong to their consumer: a live consumer is not robbed.
        time.sleep(max(0.0, read_at + 0.6 * idle_ms / 1000 - time.monotonic()))
        assert not set(orphans) & set(answers(real_redis))
        consumers = {
            c["name"].decode(): c["pending"] for c in real_redis.xinfo_consumers("rl:observation", "model:m1")
        }
        assert consumers["dead-consumer"] == 5

        wait_for(lambda: set(orphans) <= set(answers(real_redis)), idle_ms / 1000 + 30, "the reclaim", worker)
        counts = answers(real_redis)
        assert [counts[i] for i in orphans + live] == [1] * 8  # each exactly once
        assert real_redis.xpending("rl:observation", "model:m1")["pending"] == 0
        assert real_redis.xlen("rl:dead") == 0
    finally:
        stop(worker)
    assert worker.process.returncode == 0


def test_a_frozen_worker_is_replaced_and_cannot_commit_when_it_thaws(
    real_redis, redis_server_url, tmp_path
) -> None:
    ensure_group(real_redis, "rl:observation", "model:m1")
    first = start(redis_server_url, tmp_path / "first.log")
    standby = None
    published: list[str] = []

    def publish_round(t: int) -> None:
        with real_redis.pipeline(transaction=True) as pipe:
            for k in range(4):
                step = {"REWARD": "1", "ACTION": "0"} if t else {}
                pipe.xadd("rl:observation", {"OBSERVATION": OBS, "ENV_ID": f"e{k}", **step})
            published.extend(i.decode() for i in pipe.execute())

    try:
        wait_for(lambda: logged(first, "ready"), 120, "the first worker", first)
        standby = start(redis_server_url, tmp_path / "standby.log")
        wait_for(lambda: logged(standby, "waiting for the lease"), 120, "the standby", standby)
        publish_round(0)
        wait_for(lambda: len(answers(real_redis)) == len(published), 30, "round 0", first)

        # Freeze the first worker while it blocks on XREADGROUP: Redis still delivers the next round
        # to it, so those entries are pending on a consumer that does not run.
        for t in range(1, 6):
            first.process.send_signal(signal.SIGSTOP)
            time.sleep(0.1)
            publish_round(t)
            time.sleep(0.1)
            pending = real_redis.xpending("rl:observation", "model:m1")
            if pending["pending"]:
                break
            first.process.send_signal(signal.SIGCONT)  # it was not blocked on the read; try again
            wait_for(lambda: len(answers(real_redis)) == len(published), 30, "the round", first)
        else:
            pytest.fail("could not freeze the worker with entries pending on it")
        frozen_round = published[-4:]

        # Its lease expires; the standby takes over, reclaims the frozen consumer's entries, answers.
        wait_for(lambda: logged(standby, "ready"), 30, "the standby to take over", standby)
        assert standby.ready is not None and standby.ready["reclaimed"] == 4
        wait_for(lambda: set(frozen_round) <= set(answers(real_redis)), 30, "the reclaimed round", standby)

        # The frozen worker thaws with the round in hand: its commit is refused (lease), it reloads
        # and waits as the new standby. Nothing is published twice.
        first.process.send_signal(signal.SIGCONT)
        wait_for(lambda: logged(first, "lease lost, reloading"), 30, "the thawed worker to notice", first)
        publish_round(6)
        wait_for(lambda: len(answers(real_redis)) == len(published), 30, "the last round", standby)
        time.sleep(0.5)
        counts = answers(real_redis)
        assert sorted(counts) == sorted(published) and set(counts.values()) == {1}
        counters = ModelStore(real_redis, Streams("rl"), "m1").load().counters
        assert (counters.observations, counters.transitions) == (len(published), len(published) - 4)
        assert first.process.poll() is None  # a standby again, not crashed
    finally:
        stop(first)
        if standby is not None:
            stop(standby)
    assert first.process.returncode == 0 and standby.process.returncode == 0


def test_an_entry_that_kills_every_worker_goes_to_dead_with_its_history(
    real_redis, redis_server_url, tmp_path
) -> None:
    max_deliveries = 5
    ensure_group(real_redis, "rl:observation", "model:m1")
    with real_redis.pipeline(transaction=True) as pipe:  # one batch: the killer among innocents
        for k in range(9):
            fields = {"OBSERVATION": OBS, "ENV_ID": f"e{k}"}
            pipe.xadd("rl:observation", {**fields, "POISON": "1"} if k == 4 else fields)
        ids = [i.decode() for i in pipe.execute()]
    killer, innocents = ids[4], ids[:4] + ids[5:]

    def buried() -> bool:
        return real_redis.xlen("rl:dead") > 0 and set(innocents) <= set(answers(real_redis))

    kills, worker = 0, None
    try:
        deadline = time.monotonic() + 180
        while not buried():
            assert time.monotonic() < deadline, "the killer entry was never buried"
            if worker is None or worker.process.poll() is not None:
                if worker is not None:
                    assert worker.process.returncode == -signal.SIGKILL, worker.log_path.read_text()
                    kills += 1
                    assert kills <= max_deliveries, "the entry keeps killing workers"
                worker = start(
                    redis_server_url,
                    tmp_path / f"m1.{kills}.log",
                    "--max-deliveries",
                    str(max_deliveries),
                    module="tests.faults.poison_worker",
                )
            time.sleep(0.05)
        assert worker is not None
        wait_for(lambda: logged(worker, "rejected entry"), 10, "the log line", worker)
        [(_, letter)] = read(real_redis, "rl:dead")
        assert letter["dead:id"] == killer and letter["dead:stream"] == "rl:observation"
        assert letter["dead:component_id"] == "m1"
        assert int(letter["dead:deliveries"]) > max_deliveries
        assert f"delivered {letter['dead:deliveries']} times" in letter["dead:reason"]
        assert letter["POISON"] == 1 and letter["ENV_ID"] == "e4"  # the original fields, as they were
        counts = answers(real_redis)
        assert killer not in counts and [counts[i] for i in innocents] == [1] * 8
        assert real_redis.xpending("rl:observation", "model:m1")["pending"] == 0
        # And the worker that buried it serves on.
        after = real_redis.xadd("rl:observation", {"OBSERVATION": OBS, "ENV_ID": "after"}).decode()
        wait_for(lambda: after in answers(real_redis), 30, "an entry after the burial", worker)
        assert 2 <= kills <= max_deliveries
    finally:
        if worker is not None:
            stop(worker)
