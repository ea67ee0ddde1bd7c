"""Environments and their episodes, without Redis: what the environment runner steps and counts.

:class:`Slot` is one gymnasium environment and where its chain stands (the next observation to
publish, the reward of the step that led to it, an episode's end); :class:`Progress` is a run's
target and what it achieved. :mod:`worker.env.runner` asks its :class:`~worker.client.PolicyClient`
for their actions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gymnasium as gym

from worker.protocol import episode_report

if TYPE_CHECKING:
    from worker.common.metrics import RunnerMetrics


@dataclass
class Outcome:
    """What one step of an environment gave (``first``: the next episode's first observation, after
    the environment was reset because this step ended the episode)."""

    observation: Any
    reward: float
    terminated: bool
    truncated: bool
    first: Any = None


@dataclass
class Slot:
    """One gymnasium environment and where its chain of steps stands."""

    env_id: str
    env: gym.Env
    deterministic: bool
    seed: int | None
    pending: Any = None  # the next observation to publish (carried over between runs)
    reward: float | None = None  # the reward of the step that led to it (None: the chain starts there)
    finish: tuple[Any, float, bool, bool] | None = None  # an episode's end, for the client's end()
    waiting: bool = False  # published, its action not yet applied
    ret: float = 0.0
    length: int = 0

    def reset(self, seed: int | None = None) -> None:
        """Start a fresh episode: its first observation has no reward."""
        obs, _ = self.env.reset(seed=seed)
        self.ret, self.length, self.waiting = 0.0, 0, False
        self.pending, self.reward = obs, None

    def step(self, action: Any) -> tuple[float, int] | None:
        """Apply ``action``; ``(return, length)`` if the episode ended (then :attr:`finish` holds its
        last observation, reward and flags, and the next episode's first observation is pending)."""
        return self.land(self.advance(action))

    def advance(self, action: Any) -> Outcome:
        """The environment's half of :meth:`step`: it touches the environment alone, never the
        slot's bookkeeping, so it may run in another thread while the runner reads the slot."""
        obs, reward, terminated, truncated, _ = self.env.step(action)
        first = self.env.reset()[0] if terminated or truncated else None
        return Outcome(obs, float(reward), bool(terminated), bool(truncated), first)

    def land(self, outcome: Outcome) -> tuple[float, int] | None:
        """The bookkeeping's half of :meth:`step`, in the runner's thread: see :meth:`step`."""
        self.ret, self.length, self.waiting = self.ret + outcome.reward, self.length + 1, False
        if outcome.first is None:
            self.pending, self.reward = outcome.observation, outcome.reward
            return None
        ended = (self.ret, self.length)
        self.finish = (outcome.observation, outcome.reward, outcome.terminated, outcome.truncated)
        self.ret, self.length = 0.0, 0
        self.pending, self.reward = outcome.first, None
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
    metrics: RunnerMetrics | None = None  # the runner's: every step and episode counted as it lands

    def ready(self, slots: list[Slot]) -> list[Slot]:
        """The envs to publish next: those still wanted and not waiting for an action, but not more
        than the steps left once the steps asked for (the waiting envs') are taken."""
        if self.episodes is not None and len(self.returns) >= self.episodes:
            return []
        asked = sum(s.waiting for s in slots)
        room = len(slots) if self.steps is None else self.steps - self.taken - asked
        under_quota = [s for s in slots if self.ended.get(s.env_id, 0) < self.quota.get(s.env_id, math.inf)]
        return [s for s in under_quota if s.pending is not None and not s.waiting][: max(room, 0)]

    def record(self, slot: Slot, action: Any) -> dict[str, Any] | None:
        """Step ``slot``; the status entry of the episode it ended, if it did."""
        return self.count(slot, slot.step(action))

    def count(self, slot: Slot, ended: tuple[float, int] | None) -> dict[str, Any] | None:
        """Count a step of ``slot`` that ended the episode ``ended`` (``(return, length)``) or none;
        the status entry of that episode."""
        self.taken += 1
        if self.metrics is not None:
            self.metrics.stepped(slot.deterministic, ended)
        if ended is None:
            return None
        self.returns.append(ended[0])
        self.ended[slot.env_id] = self.ended.get(slot.env_id, 0) + 1
        return episode_report(self.run_id, self.runner_id, slot.env_id, ret=ended[0], length=ended[1])
