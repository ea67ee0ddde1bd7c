"""The environment runner against a scripted aggregator: message chain, status, carry-over, control."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.helpers import read, values, xadd
from tests.scripted import alternate, balance, serve, statuses
from worker.env.runner import EnvRunner


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_truncated_episodes_message_chain(real_redis, env_settings, scripted, encoding) -> None:
    settings = env_settings.model_copy(update={"max_episode_steps": 5, "encoding": encoding})
    runner = EnvRunner(settings, real_redis)
    fake = scripted(alternate)
    report = runner.run("r1", episodes=2)

    assert report == {
        "EVENT": "run",
        "RUN_ID": "r1",
        "RUNNER_ID": "env",
        "EPISODES": 2,
        "STEPS": 10,
        "MEAN_RETURN": 5.0,
        "RETURNS": [5.0, 5.0],
    }
    raw = real_redis.xrange("rl:observation")[0][1]
    assert (b"data" in raw) == (encoding == "msgpack")
    chains = fake.by_env()
    assert sorted(chains) == ["env-0", "env-1"]
    for chain in chains.values():
        assert len(chain) == 5  # the 6th message (episode end) is kept for the next run
        first = chain[0][1]
        assert set(first) == {"OBSERVATION", "ENV_ID", "STEP", "REPLY_TO"} and first["REPLY_TO"] == "env"
        assert [m["STEP"] for _, m in chain] == [1, 2, 3, 4, 5]
        for (prev_id, _), (_, message) in zip(chain, chain[1:], strict=False):
            assert message["ACTION"] == fake.answers[prev_id] and message["REWARD"] == 1.0
            assert "DONE" not in message and "TRUNCATED" not in message
    # Lockstep: both environments' observations go out together.
    assert [m["ENV_ID"] for _, m in fake.seen[:2]] == ["env-0", "env-1"]
    episodes = [s for s in statuses(real_redis) if s["EVENT"] == "episode"]
    assert [(s["ENV_ID"], s["RETURN"], s["LENGTH"], s["RUN_ID"]) for s in episodes] == [
        ("env-0", 5.0, 5, "r1"),
        ("env-1", 5.0, 5, "r1"),
    ]
    assert statuses(real_redis)[-1] == report

    # The next run opens with the carried-over messages: the truncated step, then the new episode.
    runner.run("r2", steps=2)
    for env_id, chain in fake.by_env().items():
        _, carried = chain[5]
        assert carried["DONE"] is True and carried["TRUNCATED"] is True, env_id
        assert carried["ACTION"] == fake.answers[chain[4][0]] and carried["REWARD"] == 1.0
        assert len(values(carried["TERMINAL_OBSERVATION"])) == 4
        # The latter is the reset one.
        assert values(carried["TERMINAL_OBSERVATION"]) != values(carried["OBSERVATION"])


def test_termination_is_done_without_truncation(real_redis, env_settings, scripted) -> None:
    runner = EnvRunner(env_settings, real_redis)
    fake = scripted(lambda message, step: 1)  # always push right: the pole falls within ~10 steps
    report = runner.run("r1", episodes=2)
    runner.run("r2", steps=2)
    assert report["EPISODES"] == 2 and 5 < report["MEAN_RETURN"] < 20
    for env_id, chain in fake.by_env().items():
        ends = [m for _, m in chain if m.get("DONE")]
        assert len(ends) == 1, env_id
        assert "TRUNCATED" not in ends[0] and "TERMINAL_OBSERVATION" not in ends[0]
        assert ends[0]["ACTION"] == 1 and ends[0]["REWARD"] == 1.0


def test_steps_target_is_exact_and_chains_carry_over(real_redis, env_settings, scripted) -> None:
    runner = EnvRunner(env_settings, real_redis)
    fake = scripted(alternate)
    assert runner.run("r1", steps=3)["STEPS"] == 3
    assert [m["ENV_ID"] for _, m in fake.seen] == ["env-0", "env-1", "env-0"]  # env-1 waits: 3 steps
    n = len(fake.seen)
    report = runner.run("r2", steps=4)
    assert report["STEPS"] == 4 and report["EPISODES"] == 0 and report["MEAN_RETURN"] is None
    second = fake.seen[n:]
    assert [m["ENV_ID"] for _, m in second[:2]] == ["env-0", "env-1"]
    for _, message in second[:2]:
        assert message["REWARD"] == 1.0 and "ACTION" in message  # the chain continues across runs
    # Every observation published was answered and applied.
    assert len(fake.seen) == 3 + 4 and all(obs_id in fake.answers for obs_id, _ in fake.seen)


def test_evaluation_envs_are_separate_and_reproducible(real_redis, env_settings, scripted) -> None:
    settings = env_settings.model_copy(update={"max_episode_steps": 3})
    runner = EnvRunner(settings, real_redis)
    fake = scripted(balance)
    runner.run("train-1", steps=2)
    n = len(fake.seen)
    first = runner.run("eval-1", episodes=3, deterministic=True)
    evaluation = fake.seen[n:]
    assert {m["ENV_ID"] for _, m in evaluation} == {"env-eval-0", "env-eval-1"}
    assert all(m["DETERMINISTIC"] is True for _, m in evaluation)
    assert first["EPISODES"] == 3 and first["RETURNS"] == [3.0, 3.0, 3.0]
    # Each evaluation env ends at most its share (1 and 2 of 3): no env crowds the others out.
    assert sorted(m["ENV_ID"] for _, m in evaluation if m.get("DONE")) == ["env-eval-1"]
    for env_id in ("env-eval-0", "env-eval-1"):
        assert "REWARD" not in next(m for _, m in evaluation if m["ENV_ID"] == env_id)

    n = len(fake.seen)
    runner.run("eval-2", episodes=3, deterministic=True)
    again = fake.seen[n:]
    assert [m["OBSERVATION"] for _, m in again] == [m["OBSERVATION"] for _, m in evaluation]

    n = len(fake.seen)
    runner.run("train-2", steps=2)
    for _, message in fake.seen[n:]:
        assert message["ENV_ID"] in ("env-0", "env-1") and "REWARD" in message  # untouched by evaluation


def test_action_timeout_aborts_the_run_and_restarts_the_chain(real_redis, env_settings, scripted) -> None:
    runner = EnvRunner(env_settings.model_copy(update={"action_timeout": 0.3}), real_redis)
    # The first observation of env-1 gets an invalid action (dead-lettered), then silence.
    fake = scripted(lambda message, step: 7 if message["ENV_ID"] == "env-1" and step == 0 else 0)
    report = runner.run("r1", steps=10)
    assert report["RUN_ID"] == "r1" and "EPISODES" not in report and "env-1" in report["ERROR"]
    assert statuses(real_redis)[-1] == report
    [(_, dead)] = real_redis.xrange("rl:dead")  # raw: it keeps the msgpack field of the action
    assert b"ACTION" in dead[b"dead:reason"] and dead[b"dead:stream"] == b"rl:action:env" and b"data" in dead

    n = len(fake.seen)
    fake.policy = alternate
    assert runner.run("r2", steps=2)["STEPS"] == 2
    restarted = {m["ENV_ID"]: m for _, m in reversed(fake.seen[n:])}
    assert "REWARD" not in restarted["env-1"]  # its unanswered step broke the chain: a fresh episode


def test_control_stream_commands_and_dead_letters(real_redis, env_settings, scripted) -> None:
    xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "before-start", "STEPS": 1})
    runner = EnvRunner(env_settings, real_redis)
    runner.start()
    scripted(alternate)
    xadd(real_redis, "rl:control", {"CMD": "JUMP"})
    xadd(real_redis, "rl:control", {"CMD": "RUN", "STEPS": 2})
    xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "x", "EPISODES": -1})
    xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "x"})
    real_redis.xadd("rl:control", {"data": b"\xc1"})  # not msgpack
    real_redis.xadd("rl:control", {"CMD": "RUN", "RUN_ID": "plain", "STEPS": "2"})  # as from redis-cli
    xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "packed", "EPISODES": 1}, "msgpack")
    xadd(real_redis, "rl:control", {"CMD": "STOP"})
    xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "after-stop", "STEPS": 1})
    serve(runner)

    runs = [s for s in statuses(real_redis) if s["EVENT"] == "run"]
    assert [(r["RUN_ID"], r.get("STEPS")) for r in runs] == [("plain", 2), ("packed", runs[1]["STEPS"])]
    assert runs[1]["EPISODES"] >= 1
    assert b"data" in real_redis.xrange("rl:status")[-1][1]  # status in the encoding of its command
    reasons = [d[b"dead:reason"].decode() for _, d in real_redis.xrange("rl:dead")]
    assert len(reasons) == 5
    assert "CMD" in reasons[0] and "RUN_ID" in reasons[1] and "EPISODES" in reasons[2]
    assert "EPISODES or STEPS" in reasons[3] and "msgpack" in reasons[4]


def test_stop_aborts_the_run_in_progress(real_redis, env_settings, scripted) -> None:
    """A STOP sent during a run wakes the runner from its wait for actions: the run ends with an
    ERROR report and the runner exits; a command queued behind the run is not obeyed."""
    runner = EnvRunner(env_settings.model_copy(update={"action_timeout": 60.0}), real_redis)
    runner.start()
    scripted(lambda *_: None)  # never answers: the run waits for its first actions
    xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "stuck", "STEPS": 100})

    def stop_when_waiting() -> None:
        while not real_redis.exists("rl:observation"):
            time.sleep(0.01)
        xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "queued", "STEPS": 1})
        xadd(real_redis, "rl:control", {"CMD": "STOP"})

    threading.Thread(target=stop_when_waiting, daemon=True).start()
    serve(runner)
    assert statuses(real_redis) == [
        {"EVENT": "run", "RUN_ID": "stuck", "RUNNER_ID": "env", "ERROR": "runner stopping"}
    ]
    # Obeyed, the STOP counts as finished, with what was queued before it: a restart obeys neither.
    [(stop_id, _)] = real_redis.xrevrange("rl:control", count=1)
    assert real_redis.hget("rl:runner:env", "finished") == stop_id


def test_models_aggregator_and_runner_play_cartpole_together(real_redis, settings, env_settings) -> None:
    """Two real model workers, the aggregator and the runner: every observation gets its action."""
    from worker.aggregator import Aggregator, AggregatorSettings
    from worker.model.loop import ModelWorker

    url = env_settings.redis_url
    workers = [
        ModelWorker(settings.model_copy(update={"component_id": c, "seed": k}), redis.Redis.from_url(url))
        for k, c in enumerate(("m1", "m2"))
    ]
    aggregator = Aggregator(
        AggregatorSettings(_cli_parse_args=False, redis_url=url, seed=0, block_ms=20), real_redis
    )
    for component in (*workers, aggregator):
        component.start()  # groups exist before the first observation is published
    halt = threading.Event()

    def serve(poll: Callable[[], Any]) -> None:
        while not halt.is_set():
            poll()

    threads = [threading.Thread(target=serve, args=(w.poll,), daemon=True) for w in workers]
    threads.append(threading.Thread(target=serve, args=(aggregator.step,), daemon=True))
    for thread in threads:
        thread.start()
    try:
        kept = env_settings.model_copy(update={"trim_replies": False})  # the actions stay, to count
        runner = EnvRunner(kept, redis.Redis.from_url(url))
        report = runner.run("play", episodes=3)
        evaluation = runner.run("evaluate", episodes=2, deterministic=True)
    finally:
        halt.set()
        for thread in threads:
            thread.join(5)

    assert report["EPISODES"] >= 3 and len(report["RETURNS"]) == 3 and "ERROR" not in report
    assert evaluation["EPISODES"] == 2 and "ERROR" not in evaluation
    observations = [obs_id for obs_id, _ in read(real_redis, "rl:observation")]
    actions = {m["OBS_ID"]: m for _, m in read(real_redis, "rl:action:env")}
    assert set(observations) == set(actions) and real_redis.xlen("rl:action") == 0
    assert all(a["MODELS"] == 2 for a in actions.values())
    assert sum(float(v) for v in real_redis.hgetall("rl:contribution").values()) == pytest.approx(
        len(actions)
    )
    assert len(read(real_redis, "rl:logits")) == 2 * len(observations)
    assert all(w.counters.transitions > 0 and w.counters.dead == 0 for w in workers)


@pytest.mark.slow
def test_processes_stop_on_sigterm_mid_run(real_redis, redis_server_url) -> None:
    """``python -m worker env`` aborts its run with an ERROR report on SIGTERM; both commands exit 0."""
    env = {**os.environ, "REDIS_URL": redis_server_url, "STREAM_PREFIX": "rl"}
    runner, aggregator = (
        subprocess.Popen(
            [sys.executable, "-m", "worker", *args], env=env, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        for args in (["env", "--n-envs", "2", "--block-ms", "100"], ["aggregator"])
    )
    try:
        for process in (runner, aggregator):  # commands sent, or signals, before this would be missed
            assert process.stderr is not None
            while "ready" not in process.stderr.readline():
                assert process.poll() is None, "exited before it was ready"
        xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "r", "STEPS": 100})
        while not real_redis.exists("rl:observation"):
            time.sleep(0.02)  # no model answers: the run waits for its first actions
        runner.send_signal(signal.SIGTERM)
        aggregator.send_signal(signal.SIGTERM)
        assert runner.wait(10) == 0 and aggregator.wait(10) == 0
    finally:
        for process in (runner, aggregator):
            if process.poll() is None:
                process.kill()
    assert statuses(real_redis) == [
        {"EVENT": "run", "RUN_ID": "r", "RUNNER_ID": "env", "ERROR": "runner stopping"}
    ]
