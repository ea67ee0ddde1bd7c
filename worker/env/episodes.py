"""Environments and their episodes, without Redis: what the environment runner steps and counts.

:class:`Slot` is one gymnasium environment and where its message chain stands (the next message to
publish, with the REWARD/ACTION/DONE/TRUNCATED of the step that led to it); :class:`Progress` is a
run's target and what it achieved. :mod:`worker.env.runner` publishes and reads for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from worker.protocol import episode_report


def _vector(array: Any) -> list[float]:
    return np.asarray(array, dtype=np.float64).tolist()


@dataclass
class Slot:
    """One gymnasium environment and where its message chain stands."""

    env_id: str
    env: gym.Env
    deterministic: bool
    seed: int | None
    pending: dict[str, Any] | None = None  # the next message to publish (carried over between runs)
    obs_id: str | None = None  # the published observation still waiting for its action
    ret: float = 0.0
    length: int = 0

    def reset(self, seed: int | None = None) -> None:
        """Start a fresh episode; its message has no REWARD, so a model starts a new chain."""
        obs, _ = self.env.reset(seed=seed)
        self.ret, self.length, self.obs_id = 0.0, 0, None
        self.pending = self.message(obs)

    def message(self, obs: Any) -> dict[str, Any]:
        return {"OBSERVATION": _vector(obs), "ENV_ID": self.env_id, "DETERMINISTIC": self.deterministic}

    def step(self, action: int) -> tuple[float, int] | None:
        """Apply ``action`` and build the next message; ``(return, length)`` if the episode ended."""
        obs, reward, terminated, truncated, _ = self.env.step(action)
        self.ret, self.length, self.obs_id = self.ret + float(reward), self.length + 1, None
        ended = None
        if terminated or truncated:
            ended = (self.ret, self.length)
            self.reset()
            assert self.pending is not None
            self.pending["DONE"] = True
            if truncated and not terminated:  # a time limit: the model bootstraps from the final obs
                self.pending.update(TRUNCATED=True, TERMINAL_OBSERVATION=_vector(obs))
        else:
            self.pending = self.message(obs)
        self.pending.update(REWARD=float(reward), ACTION=int(action))
        return ended


@dataclass
class Progress:
    """A run's target and what it achieved so far."""

    run_id: str
    runner_id: str
    episodes: int | None
    steps: int | None
    quota: dict[str, int]  # evaluation: the most episodes each env may end
    returns: list[float] = field(default_factory=list)
    ended: dict[str, int] = field(default_factory=dict)
    taken: int = 0

    def ready(self, slots: list[Slot]) -> list[Slot]:
        """The envs to publish next: those still wanted, but not more than the steps left."""
        if self.episodes is not None and len(self.returns) >= self.episodes:
            return []
        room = len(slots) if self.steps is None else self.steps - self.taken
        under_quota = [s for s in slots if self.ended.get(s.env_id, 0) < self.quota.get(s.env_id, math.inf)]
        return [s for s in under_quota if s.pending is not None][: max(room, 0)]

    def record(self, slot: Slot, action: int) -> dict[str, Any] | None:
        """Step ``slot``; the status entry of the episode it ended, if it did."""
        self.taken += 1
        if (ended := slot.step(action)) is None:
            return None
        self.returns.append(ended[0])
        self.ended[slot.env_id] = self.ended.get(slot.env_id, 0) + 1
        return episode_report(self.run_id, self.runner_id, slot.env_id, ret=ended[0], length=ended[1])
