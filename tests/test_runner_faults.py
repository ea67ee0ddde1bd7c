"""The environment runner through faults: Redis refusing or unreachable mid-run, a crash and a restart
under the same runner ID, reports sent twice."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from tests.helpers import read, xadd
from tests.scripted import alternate, failing, serve, statuses
from worker.env.runner import PUBLISH, EnvRunner
from worker.protocol import split_id


def test_a_run_rides_out_redis_refusing_it(real_redis, env_settings, scripted) -> None:
    """Out of memory while publishing, unreachable while waiting for actions: the run backs off,
    keeps its environments, and goes on once Redis is back; every observation answered once."""
    runner = EnvRunner(env_settings, real_redis)
    fake = scripted(alternate)
    failures = {
        "EVALSHA": redis.exceptions.OutOfMemoryError("command not allowed when used memory"),
        "XREAD": redis.ConnectionError("Redis went away mid-run"),
    }

    def flaky(command: str) -> None:
        if command in failures and fake.seen:
            raise failures.pop(command)

    with failing(real_redis, flaky):
        report = runner.run("r1", steps=6)
    assert not failures, "both faults happened"
    assert report["STEPS"] == 6 and "ERROR" not in report
    assert len(fake.seen) == 6 and all(obs_id in fake.answers for obs_id, _ in fake.seen)
    assert runner.outages.failures == 0 and [m["RUN_ID"] for m in statuses(real_redis)] == ["r1"]


def test_a_run_outlasts_an_outage_longer_than_the_action_timeout(real_redis, env_settings, scripted) -> None:
    """Redis unreachable for longer than --action-timeout is not the models' slowness: the round is
    sent again (the same steps: one entry each) until it is back, and the run goes on."""
    runner = EnvRunner(env_settings.model_copy(update={"action_timeout": 1.0}), real_redis)
    fake = scripted(alternate)
    down: dict[str, float | None] = {"until": None}

    def unreachable(command: str) -> None:
        if command == "XREAD" and fake.seen:
            down["until"] = down["until"] or time.monotonic() + 2.5
            if time.monotonic() < down["until"]:
                raise redis.ConnectionError("Redis went away mid-run")

    with failing(real_redis, unreachable):
        report = runner.run("r1", steps=6)
    assert down["until"] is not None and "ERROR" not in report and report["STEPS"] == 6
    assert len(fake.seen) == 6 and all(obs_id in fake.answers for obs_id, _ in fake.seen)  # once each


def test_reports_sent_twice_are_published_once(real_redis) -> None:
    """redis-py resends a command whose reply was lost: the copy of a publish is not applied again."""
    script = real_redis.register_script(PUBLISH)
    keys = ["rl:status", "rl:runner:env"]
    args = ["abc:1", 1000, "5-0", 2, "EVENT", '"episode"', 2, "EVENT", '"run"']
    assert script(keys=keys, args=args) == 1 and script(keys=keys, args=args) == 0
    assert real_redis.xlen("rl:status") == 2 and real_redis.hget("rl:runner:env", "finished") == b"5-0"
    script(keys=keys, args=["abc:2", *args[1:]])  # the next publish is applied
    assert real_redis.xlen("rl:status") == 4


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler sees it."""


def test_a_runner_restarted_after_a_crash_runs_the_interrupted_run_again(
    real_redis, env_settings, scripted
) -> None:
    """The runner's key remembers the last command finished: a runner killed mid-run and started
    again with the same ID runs that RUN again and obeys what came while it was down; a STOP, once
    obeyed, is not obeyed again by the next start."""
    runner = EnvRunner(env_settings, real_redis)
    runner.start()
    fake = scripted(lambda *_: None)  # nothing answers: the run waits for its first actions
    run_1 = xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "r1", "STEPS": 6})

    def killed(*_: Any, **__: Any) -> Any:
        raise Killed

    runner.client.collect = killed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        runner.step()  # the first round is out, then the process dies
    assert real_redis.xlen("rl:observation") == 2 and statuses(real_redis) == []
    finished = real_redis.hget("rl:runner:env", "finished").decode()
    assert split_id(finished) < split_id(run_1)  # not finished
    xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "r2", "STEPS": 2})  # sent while it is down
    stop = xadd(real_redis, "rl:control", {"CMD": "STOP"})

    fake.policy = alternate
    again = EnvRunner(env_settings, redis.Redis.from_url(env_settings.redis_url))
    serve(again)
    assert again.resumed_from == finished
    runs = [s for s in statuses(real_redis) if s["EVENT"] == "run"]
    assert [(r["RUN_ID"], r["STEPS"], "ERROR" in r) for r in runs] == [("r1", 6, False), ("r2", 2, False)]
    assert real_redis.hget("rl:runner:env", "finished").decode() == stop
    # The dead runner's observations were answered too; the new attempt's chains start afresh.
    first_new = real_redis.xrange("rl:observation")[2][0].decode()
    assert "REWARD" not in fake.seen[2][1] and fake.seen[2][0] == first_new

    reported = len(statuses(real_redis))
    third = EnvRunner(env_settings, real_redis)
    third.start()
    third.step()  # nothing left to obey: the STOP was obeyed
    assert not third.stopping and len(statuses(real_redis)) == reported


def test_a_report_finishes_its_run_in_the_same_script(real_redis, env_settings, scripted) -> None:
    runner = EnvRunner(env_settings, real_redis)
    runner.start()
    scripted(alternate)
    run_id = xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "r1", "STEPS": 3})
    runner.step()
    [(report_id, _)] = [(i, m) for i, m in read(real_redis, "rl:status") if m["EVENT"] == "run"]
    key = real_redis.hgetall("rl:runner:env")
    assert key[b"finished"].decode() == run_id and key[b"name"]  # by the publish of the report


def test_a_restarted_runner_skips_commands_older_than_its_resume_window(
    real_redis, env_settings, scripted
) -> None:
    real_redis.hset("rl:runner:env", "finished", "1-0")  # a runner of this ID finished something once
    seconds, _ = real_redis.time()
    stale = f"{(seconds - 30) * 1000}-0"
    xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "stale", "STEPS": 1}, entry_id=stale)
    xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "fresh", "STEPS": 1})
    xadd(real_redis, "rl:control", {"CMD": "STOP"})
    scripted(alternate)
    serve(EnvRunner(env_settings.model_copy(update={"resume_window": 10.0}), real_redis))
    assert [s["RUN_ID"] for s in statuses(real_redis) if s["EVENT"] == "run"] == ["fresh"]
