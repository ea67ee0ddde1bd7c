"""Redis (AOF, every write fsynced) stopped and started again under load: SIGKILLed once, shut
down once, each time for longer than redis-py's own retries last, under the whole loop (models,
aggregator, runner, rounds with evolution), so every component must back off, reconnect, reload and
go on. Nothing may crash, and nothing may be lost or done twice: the same checks as the chaos run
(tests/faults/chaos/). A worker started while Redis is down waits for it.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.chaos import ChaosConfig, Incarnation, RedisServer, run, spawn, worker_command

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]


def test_workers_ride_out_redis_restarts_without_losing_an_entry(tmp_path) -> None:
    config = ChaosConfig(
        kills=0,
        redis_restarts=2,
        aggregator_kills=0,
        runner_kills=0,
        evolution_kills=0,
        models=2,
        envs=4,
        seed=2,
        gap=(1.0, 2.0),
        outage=(6.0, 6.5),
        workdir=str(tmp_path),
    )
    figures = run(config)
    print(figures.table())

    assert figures.redis_restarts == 2
    assert figures.incarnations == 2 and not figures.crashes  # the same two workers throughout
    # Each worker noticed each restart, and backed off while Redis was away.
    assert all(n >= 2 for n in figures.reconnects_per_model.values()), figures.reconnects_per_model
    assert all(n >= 2 for n in figures.unreachable_per_model.values()), figures.unreachable_per_model
    assert figures.replies == figures.replies_expected > 0
    assert figures.lost == 0 and figures.duplicates == 0
    assert figures.counters_exact, figures.counter_mismatches
    assert figures.actions == figures.observations and figures.actions_missing == 0
    assert not figures.run_failures and not figures.generations_failed and figures.sets_not_one_per_get == 0
    assert not figures.unclean_stops and figures.pending == 0 and figures.dead == 0


def test_a_worker_started_while_redis_is_down_waits_for_it(tmp_path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    server.stop("shutdown")
    worker: Incarnation | None = None
    try:
        worker = spawn(worker_command(server.url, "m1", "--lease-ttl", "1"), tmp_path / "m1.log", "m1")
        deadline = time.monotonic() + 120
        while not worker.events["redis unavailable, retrying"]:
            assert worker.process.poll() is None, worker.log_path.read_text()
            assert time.monotonic() < deadline, "the worker never tried"
            worker.read_log()
            time.sleep(0.05)
        server.start()
        while worker.ready is None:
            assert worker.process.poll() is None, worker.log_path.read_text()
            assert time.monotonic() < deadline, "the worker never became ready"
            worker.read_log()
            time.sleep(0.05)
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=30) == 0
    finally:
        if worker is not None and worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()
        server.close()
