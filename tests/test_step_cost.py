"""The step cost wrapper: CPU work costs CPU time, a wait only wall-clock; the runner's flags apply it."""

from __future__ import annotations

import time
from types import SimpleNamespace

import gymnasium as gym
import pytest
import redis
from stable_baselines3.common.env_util import make_vec_env

from worker.client import ActionTimeout
from worker.env import StepCost
from worker.env.runner import EnvRunner
from worker.env.settings import EnvSettings
from worker.env.stepping import RunAborted, Stepping


def _timed(env: gym.Env, steps: int) -> tuple[float, float]:
    """(CPU seconds of this thread, wall-clock seconds) of ``steps`` steps."""
    env.reset(seed=0)
    cpu, wall = time.thread_time(), time.monotonic()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return time.thread_time() - cpu, time.monotonic() - wall


def test_cpu_cost_consumes_cpu_time() -> None:
    cpu, wall = _timed(StepCost(gym.make("CartPole-v1"), cost_ms=5.0, kind="cpu"), 20)
    assert cpu >= 20 * 0.005  # at least the cost in CPU time of this thread, whatever the load
    assert wall >= cpu * 0.9


def test_wait_cost_takes_time_but_no_cpu() -> None:
    cpu, wall = _timed(StepCost(gym.make("CartPole-v1"), cost_ms=5.0, kind="wait"), 20)
    assert wall >= 20 * 0.005
    assert cpu < 0.25 * wall  # CartPole's own step is microseconds: the rest was sleeping


def test_no_cost_and_bad_arguments() -> None:
    cpu, wall = _timed(StepCost(gym.make("CartPole-v1"), cost_ms=0.0, kind="cpu"), 200)
    assert wall < 0.5
    with pytest.raises(ValueError, match="kind"):
        StepCost(gym.make("CartPole-v1"), 1.0, kind="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        StepCost(gym.make("CartPole-v1"), -1.0)


def test_sb3_vector_envs_take_the_same_wrapper() -> None:
    envs = make_vec_env("CartPole-v1", 2, wrapper_class=StepCost, wrapper_kwargs={"cost_ms": 3.0})
    envs.reset()
    wall = time.monotonic()
    for _ in range(5):
        envs.step([0, 1])
    assert time.monotonic() - wall >= 2 * 5 * 0.003  # DummyVecEnv steps one env after the other
    envs.close()


def test_runner_flags_wrap_training_and_evaluation_envs(real_redis, redis_server_url) -> None:
    settings = EnvSettings(
        _cli_parse_args=False, redis_url=redis_server_url, n_envs=2, step_cost_ms=2.5, step_cost_kind="cpu"
    )
    runner = EnvRunner(settings, real_redis)
    for slot in runner.train + runner.eval:
        assert isinstance(slot.env, StepCost) and (slot.env.cost_ms, slot.env.kind) == (2.5, "cpu")
    assert settings.threads == 1  # CPU work holds the GIL: stepped in the runner's thread
    plain = EnvRunner(settings.model_copy(update={"step_cost_ms": 0.0}), real_redis)
    assert not any(isinstance(slot.env, StepCost) for slot in plain.train + plain.eval)
    runner.shutdown()
    plain.shutdown()


@pytest.mark.parametrize(
    ("changes", "threads"),
    [
        ({}, 1),
        ({"stepping": "async"}, 1),
        ({"stepping": "async", "step_cost_ms": 1.0}, 8),  # waits overlap in a thread each
        ({"stepping": "async", "step_cost_ms": 1.0, "step_cost_kind": "cpu"}, 1),
        ({"stepping": "lockstep", "step_cost_ms": 1.0}, 1),
        ({"step_threads": 3}, 3),
    ],
)
def test_stepping_threads_default(changes: dict, threads: int) -> None:
    settings = EnvSettings(_cli_parse_args=False, n_envs=8, **changes)
    assert settings.threads == threads


@pytest.mark.parametrize(
    ("cause", "resent"),
    [(redis.ConnectionError("down"), True),
     (redis.exceptions.RedisClusterUnreachableError("no node answers"), True),  # not a RedisError
     (redis.ResponseError("WRONGTYPE"), False), (None, False)],
)  # fmt: skip
def test_an_action_timeout_in_an_outage_sends_the_steps_again_and_any_other_aborts(cause, resent) -> None:
    client = SimpleNamespace(client_id="c1")  # all the decision reads of the client
    stepping = Stepping(client, "async", 1, lambda: None, lambda: False)  # type: ignore[arg-type]
    timeout = ActionTimeout("no action", "e1")
    timeout.__cause__ = cause
    try:
        if resent:
            stepping._resend_or_abort(timeout)  # logs, and the caller sends the steps again
        else:
            with pytest.raises(RunAborted):
                stepping._resend_or_abort(timeout)
    finally:
        stepping.close()
