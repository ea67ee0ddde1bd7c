"""A fixed cost per environment step, to stand for environments dearer than CartPole's 13 µs.

Real environments cost far more per step: a physics simulator burns 0.1 to 10 ms of CPU, a remote
game or a robot makes its caller wait milliseconds for the answer. The two differ in what they let
run meanwhile, which is what decides how to step many of them: CPU work holds Python's GIL (more
processes use more cores), a wait releases it (threads overlap the waits). :class:`StepCost` adds
either kind to any gymnasium environment, so the runner (``--step-cost-ms``, ``--step-cost-kind``)
and a benchmark's stable-baselines3 environments pay the same::

    from stable_baselines3.common.env_util import make_vec_env
    from worker.env import StepCost
    envs = make_vec_env("CartPole-v1", 32, wrapper_class=StepCost, wrapper_kwargs={"cost_ms": 1.0})
"""

from __future__ import annotations

import time
from typing import Any, Literal

import gymnasium as gym

CostKind = Literal["cpu", "wait"]
KINDS = ("cpu", "wait")


def burn(seconds: float) -> None:
    """Busy-loop until this thread has used ``seconds`` of CPU time (not wall-clock: a loaded machine
    makes it take longer, as it would a simulator)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class StepCost(gym.Wrapper):
    """Every ``step()`` costs ``cost_ms`` more: CPU work (``kind="cpu"``) or a wait (``"wait"``).

    :param env: the environment to wrap
    :param cost_ms: the cost added to each step, in milliseconds (0: none)
    :param kind: ``"cpu"``, a busy loop of that much CPU time of the stepping thread; ``"wait"``, a
        sleep of that long, as for a remote game or a robot (it holds no CPU and releases the GIL)
    """

    def __init__(self, env: gym.Env, cost_ms: float = 1.0, kind: CostKind = "wait") -> None:
        super().__init__(env)
        if cost_ms < 0:
            raise ValueError(f"cost_ms must not be negative, got {cost_ms}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.cost_ms, self.kind = cost_ms, kind

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        if self.cost_ms > 0:
            (burn if self.kind == "cpu" else time.sleep)(self.cost_ms / 1000)
        return self.env.step(action)
