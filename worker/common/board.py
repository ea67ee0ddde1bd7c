"""TensorBoard under stable-baselines3's names, written by SB3's own logger.

A model (``python -m worker model --tensorboard-log DIR``) writes what SB3's ``A2C`` writes:
``rollout/ep_rew_mean`` and ``rollout/ep_len_mean`` (the last 100 training episodes of the
environments it serves, raw rewards, as SB3's ``Monitor`` counts them), ``train/policy_loss``,
``train/value_loss``, ``train/entropy_loss``, ``train/learning_rate`` and ``train/n_updates`` (the
last update's, as SB3 logs them), and ``time/fps``, against its transitions (SB3's
``num_timesteps``). ``control train --tensorboard-log DIR`` writes each round's training and
evaluation returns (``rollout/ep_rew_mean``, ``eval/mean_reward``) against the swarm's steps. Each
writer has its own run directory under DIR (``DIR/<component ID>``, ``DIR/control``), so that one
``tensorboard --logdir DIR`` shows them side by side; a user's SB3 dashboards keep working.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

from worker.protocol import Observation

EPISODES = 100  # SB3's ep_info_buffer


def sb3_logger(folder: str | Path, run: str) -> Any:
    """SB3's logger writing TensorBoard event files into ``folder/run``."""
    from stable_baselines3.common.logger import configure

    return configure(str(Path(folder) / run), ["tensorboard"])


class ModelBoard:
    """A model's scalars: fed every batch's observations and the learner's updates, written on
    :meth:`dump` (each heartbeat).

    :param folder: ``--tensorboard-log``
    :param component_id: the model's ID, its run's name
    """

    def __init__(self, folder: str | Path, component_id: str) -> None:
        self.logger = sb3_logger(folder, component_id)
        self.running: dict[str, tuple[float, int, int | None]] = {}  # env -> return, length, last STEP
        self.episodes: deque[tuple[float, int]] = deque(maxlen=EPISODES)
        self.started: tuple[float, int] | None = None  # (monotonic time, transitions) at the first dump
        self.dumped = (-1, -1)  # (transitions, updates) last written

    def observe(self, run: list[Observation]) -> None:
        """Count the training episodes' rewards and lengths (evaluation steps and repeats left out)."""
        for obs in run:
            if obs.deterministic or obs.reward is None:
                if obs.reward is None:
                    self.running[obs.env_id] = (0.0, 0, obs.step)
                continue
            ret, length, last = self.running.get(obs.env_id, (0.0, 0, None))
            if obs.step is not None and last is not None and obs.step <= last:
                continue  # a step sent again: counted once
            ret, length = ret + obs.reward, length + 1
            if obs.done:
                self.episodes.append((ret, length))
                ret, length = 0.0, 0
            self.running[obs.env_id] = (ret, length, obs.step)

    def dump(self, learner: Any) -> None:
        """Write the scalars if anything moved since the last write.

        :param learner: the model's :class:`~worker.model.learner.Learner`: its counters (transitions:
            the x axis), its last update and that update's learning rate, and the environments it
            remembers (the episodes of the others are forgotten here too)
        """
        for env in [env for env in self.running if env not in learner.memories]:
            del self.running[env]
        transitions, updates, last = (
            learner.counters.transitions,
            learner.counters.updates,
            learner.last_update,
        )
        if (transitions, updates) == self.dumped:
            return
        now = time.monotonic()
        if self.started is None:
            self.started = (now, transitions)
        record = self.logger.record
        if self.episodes:
            record("rollout/ep_rew_mean", sum(r for r, _ in self.episodes) / len(self.episodes))
            record("rollout/ep_len_mean", sum(n for _, n in self.episodes) / len(self.episodes))
        elapsed = now - self.started[0]
        if elapsed > 0:
            record("time/fps", int((transitions - self.started[1]) / elapsed))
        record("time/total_timesteps", transitions)
        if last is not None:
            record("train/n_updates", updates)
            record("train/learning_rate", learner.last_learning_rate)
            record("train/policy_loss", last.policy_loss)
            record("train/value_loss", last.value_loss)
            record("train/entropy_loss", -last.entropy)
        self.logger.dump(step=transitions)
        self.dumped = (transitions, updates)

    def close(self) -> None:
        self.logger.close()


class RoundBoard:
    """``control train``'s scalars: each round's returns against the swarm's training steps.

    :param folder: ``--tensorboard-log``
    """

    def __init__(self, folder: str | Path) -> None:
        self.logger = sb3_logger(folder, "control")

    def __call__(self, point: Any) -> None:
        """Write one :class:`~worker.control.train.RoundResult`."""
        record = self.logger.record
        record("rollout/ep_rew_mean", point.train_return)
        record("eval/mean_reward", point.eval_return)
        if point.train_seconds > 0:
            record("time/fps", int(point.train_steps / point.train_seconds))
        record("time/total_timesteps", point.train_steps)
        record("time/iterations", point.round)
        self.logger.dump(step=point.train_steps)

    def close(self) -> None:
        self.logger.close()
