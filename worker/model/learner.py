"""The learning side of a model, without any I/O: policy, per-environment memory, counters.

:class:`Learner` takes a run of validated observations, answers them with logits from one batched
forward pass, turns them into transitions, and trains once on the segments they completed.
:mod:`worker.model` feeds it from Redis and commits what it changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from stable_baselines3.common.buffers import RolloutBuffer

from worker.common import logs
from worker.common.distributions import log_prob
from worker.model import a2c
from worker.model.inputs import Inputs, row
from worker.model.memory import EnvMemory, Evaluated, Rules, Segment, Transition, find_repeats, observe
from worker.model.policy import (
    evaluate,
    load_weight_vector,
    make_policy,
    make_spaces,
    n_params,
    pack_state,
    unpack_state,
    weights_as_vector,
)
from worker.model.sb3zip import read_policy
from worker.model.settings import ModelSettings
from worker.protocol import Observation

log = logs.get(__name__)


@dataclass
class Counters:
    """Monotonic counters, committed with the state they describe (so they are exact after a crash)."""

    version: int = 0  # commits
    observations: int = 0  # valid observations handled (answered unless ANSWER false)
    transitions: int = 0  # transitions recorded into rollouts
    dropped: int = 0  # transitions of interrupted rollouts thrown away
    segments: int = 0  # n_steps segments trained on
    discarded: int = 0  # segments completed while training was paused
    updates: int = 0  # A2C gradient steps
    skipped: int = 0  # A2C updates not applied: their gradient was not finite (absurd rewards)
    commands: int = 0  # evolution commands applied
    dead: int = 0  # entries dead-lettered
    forgotten: int = 0  # environments forgotten after memory_ttl seconds without an observation
    repeats: int = 0  # observations of a step already learned from (answered, not learned again)


@dataclass
class Snapshot:
    """A model's whole committed state, as stored: ``policy`` is ``None`` for a model never checkpointed.

    :param policy: the policy's packed ``state_dict``
    :param optimizer: the optimizer's packed ``state_dict``
    :param memory: env_id -> packed :class:`~worker.model.memory.EnvMemory`
    :param normalization: the packed statistics of :class:`~worker.model.inputs.Inputs`, if any
    """

    policy: bytes | None
    optimizer: bytes | None
    counters: Counters
    paused_until: float
    memory: dict[str, bytes]
    normalization: bytes | None = None


class PolicyLag:
    """How many updates lie between the policy that chose each action and the update that learns
    from it, over the transitions trained on since the worker started. SB3's A2C collects a rollout
    with one policy and then updates: its lag is 0. Environments that step on their own complete
    their segments at different times, so an update may learn from actions older policies chose."""

    CAP = 64  # larger lags are counted as this one

    def __init__(self) -> None:
        self.counts = np.zeros(self.CAP + 1, dtype=np.int64)

    def add(self, updates: int, segments: list[Segment]) -> None:
        """Count the lags of ``segments``' transitions, learned from by update ``updates + 1``."""
        lags = [updates - t.answered_at for s in segments for t in s.transitions if t.answered_at >= 0]
        if lags:
            self.counts += np.bincount(np.minimum(lags, self.CAP), minlength=self.CAP + 1)

    def summary(self) -> dict[str, float]:
        """Transitions counted, mean lag, share with lag 0, 99th percentile and maximum."""
        n = int(self.counts.sum())
        if n == 0:
            return {"transitions": 0}
        lags = np.arange(self.CAP + 1)
        p99 = int(np.searchsorted(np.cumsum(self.counts), 0.99 * n))
        return {
            "transitions": n,
            "mean": round(float((lags * self.counts).sum() / n), 3),
            "zero": round(float(self.counts[0] / n), 4),
            "p99": p99,
            "max": int(lags[self.counts > 0].max()),
        }


class Learner:
    """Policy, optimizer, memories and counters of one model.

    :param settings: hyper-parameters and the ``train_deterministic`` switch
    """

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.spaces = make_spaces(settings)
        self.family = self.spaces.family
        self.policy = make_policy(settings, self.spaces)
        self.n_params = n_params(self.policy)
        self.inputs = Inputs(
            self.spaces.observation, settings.normalize_obs, settings.normalize_reward, settings.gamma
        )
        self.memories: dict[str, EnvMemory] = {}
        self.counters = Counters()
        self.paused_until = 0.0  # unix time; training is paused between an evolution GET and SET
        self.last_buffer: RolloutBuffer | None = None  # what the latest update trained on
        self.ttl_ms = int(settings.memory_ttl * 1000)
        s = settings
        self.rules = Rules(s.gamma, s.n_steps, s.train_deterministic, self.ttl_ms, self.inputs)
        self._swept_below = -1  # the memories older than this (entry-ID ms) are gone
        self.lag = PolicyLag()
        # --init-from: a new model's first weights, read and checked now (a zip that does not fit
        # stops the start); kept until the model has a checkpoint, which wins.
        self.initial = read_policy(settings.init_from, settings, self.policy) if settings.init_from else None
        self._initial_used = False
        self.last_update: a2c.UpdateStats | None = None  # SB3 logs the last update's losses
        self.last_learning_rate = settings.learning_rate
        self.ready_envs: set[str] = set()  # environments with segments ready (see _take_ready)
        self.taken_envs: set[str] = set()  # environments whose ready segments were trained on

    # ----------------------------------------------------------------- acting and learning

    def evaluate(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        """Distributions and values of a batch of the policy's inputs, in one forward pass."""
        return evaluate(self.policy, self.family, batch)

    def step(self, run: list[Observation]) -> tuple[np.ndarray, bool]:
        """Answer ``run`` with distributions, record its transitions and train on the segments it
        completed.

        A repeat (:func:`~worker.model.memory.is_repeat`) of its environment's last step is answered
        with that step's own distribution (the one its answer had); a repeat of an older step with
        its distribution under the current weights.

        :param run: validated observations, in stream order
        :return: the distribution of each observation (one :class:`~worker.protocol.Family` vector
            per row), and whether the weights changed
        """
        if not run:
            return np.zeros((0, self.family.n_params)), False
        s, n = self.settings, len(run)
        repeats = find_repeats(self.memories, run, self.ttl_ms)
        learn = [
            not r and (s.train_deterministic or not o.deterministic)
            for o, r in zip(run, repeats, strict=True)
        ]
        terminal = [o.terminal_observation for o in run if o.truncated]
        batch = self.inputs.policy_batch(
            [o.observation for o in run] + terminal, learn + [False] * len(terminal)
        )
        params, values = self.evaluate(batch)
        next_terminal = n
        latest: dict[str, int] = {}  # env -> index in run of its last observation that was not a repeat
        echoes: dict[int, int | np.ndarray] = {}  # repeat index -> its original's index, or distribution
        recorded: list[tuple[Transition, float, float, np.ndarray]] = []  # see StepResult.recorded
        for i, obs in enumerate(run):
            evaluated = Evaluated(row(batch, i), float(values[i]), params[i])
            if obs.truncated:
                evaluated.terminal_value, next_terminal = float(values[next_terminal]), next_terminal + 1
            memory, result = observe(self.memories.get(obs.env_id), obs, evaluated, self.rules, repeats[i])
            self.memories[obs.env_id] = memory
            self.counters.observations += 1
            if result.repeat:
                self.counters.repeats += 1
                if obs.step == memory.step:
                    # An original in this run is answered below, maybe after an update: echo that.
                    echoes[i] = latest[obs.env_id] if obs.env_id in latest else memory.params.copy()
                continue
            latest[obs.env_id] = i
            memory.answered_at = self.counters.updates
            self.counters.transitions += result.transition
            self.counters.dropped += result.dropped
            self.counters.forgotten += result.forgotten
            if result.recorded is not None:
                recorded.append(result.recorded)
            if result.segment is not None:
                memory.ready.append(result.segment)
                self.ready_envs.add(obs.env_id)
        self._complete(recorded)
        paused = self.paused()
        trained = self.train(self._take_ready(paused), paused)
        if trained:
            # SB3 acts on the newest observations with the updated policy; so do we. The values of
            # the segments' last observations above stay those of the old policy, as in SB3.
            params, values = self.evaluate(batch)
            for env, i in latest.items():
                memory = self.memories[env]
                memory.value, memory.params = float(values[i]), params[i]
                memory.answered_at = self.counters.updates
        answers = params[:n]
        for i, echo in echoes.items():
            answers[i] = answers[echo] if isinstance(echo, int) else echo
        return answers, trained

    def _complete(self, recorded: list[tuple[Transition, float, float, np.ndarray]]) -> None:
        """Finish a batch's transitions at once: the rewards as learned from (scaled by the returns'
        statistics after this batch's, the identity without --normalize-reward, plus the bootstrap of
        a truncation) and log pi(action | obs) under the distribution that was answered."""
        if not recorded:
            return
        rewards = self.inputs.scale([reward for _, reward, _, _ in recorded])
        params = np.stack([p for *_, p in recorded]).astype(np.float64)
        flat = [np.reshape(t.action, -1) for t, *_ in recorded]
        actions = np.concatenate(flat) if self.family.kind == "categorical" else np.stack(flat)
        log_probs = log_prob(self.family, params, actions).tolist()
        for (transition, _, bootstrap, _), reward, lp in zip(recorded, rewards, log_probs, strict=True):
            transition.reward, transition.log_prob = reward + bootstrap, lp

    def _take_ready(self, paused: bool) -> list[Segment]:
        """The segments to train on now: all those ready once there are ``--segments-per-update``
        (all at once while training is paused, to be discarded), in the order of their environments'
        IDs, so that an update is the same after a restart; none before. :attr:`ready_envs` keeps
        the environments whose memories this changes until the commit takes them."""
        ready = [env for env in self.ready_envs if env in self.memories and self.memories[env].ready]
        count = sum(len(self.memories[env].ready) for env in ready)
        if count < self.settings.segments_per_update and not (count and paused):
            return []
        segments = []
        for env in sorted(ready):
            segments += self.memories[env].ready
            self.memories[env].ready = []
        self.taken_envs.update(ready)
        self.ready_envs.clear()
        return segments

    def train(self, segments: list[Segment], paused: bool) -> bool:
        """One A2C update over ``segments`` unless training is ``paused``; True if the weights changed."""
        if not segments:
            return False
        if paused:
            self.counters.discarded += len(segments)
            return False
        self.lag.add(self.counters.updates, segments)
        self.last_buffer = a2c.fill_buffer(self.policy, segments, self.settings)
        # SB3 sets the rate from the progress after the rollout: the transitions taken in so far.
        learning_rate = self.settings.learning_rate_at(self.counters.transitions)
        stats = a2c.update(self.policy, self.last_buffer, self.settings, learning_rate)
        if not stats.applied:
            self.counters.skipped += 1
            log.warning("update skipped: its gradient is not finite", segments=stats.segments)
            return False
        self.counters.updates += 1
        self.counters.segments += stats.segments
        self.last_update, self.last_learning_rate = stats, learning_rate
        log.debug("update", updates=self.counters.updates, **vars(stats))
        return True

    def forget_silent(self, now_ms: int) -> list[str]:
        """Free the memories of environments silent for the TTL: those older than the last quarter
        of the TTL that began ``memory_ttl`` before ``now_ms`` (an entry ID's time). :func:`observe`
        already treats such a memory as gone, so this changes what is remembered, never what is
        learned; and sweeping on quarter boundaries makes it the same however the observations were
        batched, or how often the worker restarted.

        :return: the environments forgotten
        """
        quarter = max(self.ttl_ms // 4, 1)
        below = now_ms // quarter * quarter - self.ttl_ms
        if below <= self._swept_below:
            return []
        self._swept_below = below
        # A memory with segments waiting stays until they are trained on: complete, they need no
        # further step, and whether they were trained must not depend on when this sweep ran.
        silent = [env for env, m in self.memories.items() if m.seen_ms < below and not m.ready]
        for env in silent:
            self.counters.dropped += len(self.memories.pop(env).rollout)
        self.counters.forgotten += len(silent)
        return silent

    # ----------------------------------------------------------------- evolution

    def paused(self) -> bool:
        return self.paused_until > time.time()

    def pause(self, seconds: float) -> None:
        self.paused_until = time.time() + seconds

    def weights(self) -> np.ndarray:
        return weights_as_vector(self.policy)

    def load_weights(self, vector: np.ndarray) -> None:
        """Take an evolved weight vector and resume training."""
        load_weight_vector(self.policy, vector)
        self.paused_until = 0.0

    # ----------------------------------------------------------------- persistence

    def checkpoint(self, weights: bool) -> dict[str, bytes] | None:
        """The checkpoint's fields a commit writes: the policy and optimizer if ``weights`` changed,
        the normalization statistics if they moved; ``None`` for none."""
        fields = {}
        if weights:
            fields["policy"] = pack_state(self.policy.state_dict())
            fields["optimizer"] = pack_state(self.policy.optimizer.state_dict())
        if self.inputs.changed:
            fields["normalization"], self.inputs.changed = self.inputs.pack(), False
        return fields or None

    def restore(self, snapshot: Snapshot) -> bool:
        """Become the committed state; False (and a fresh policy, or --init-from's) when there is none yet."""
        self._swept_below = -1
        self.inputs.restore(snapshot.normalization)
        if snapshot.policy is None:
            self.policy = make_policy(self.settings, self.spaces)
            if self.initial is not None:
                self.policy.load_state_dict(self.initial)
                self._initial_used = True
            self.counters, self.paused_until, self.memories = Counters(), 0.0, {}
            self.ready_envs, self.taken_envs = set(), set()
            return False
        if self.initial is not None and not self._initial_used:
            version = snapshot.counters.version
            log.warning("--init-from not used: the model has a checkpoint, which wins", version=version)
        self.initial = None
        self.policy.load_state_dict(unpack_state(snapshot.policy))
        if snapshot.optimizer is not None:
            self.policy.optimizer.load_state_dict(unpack_state(snapshot.optimizer))
        self.counters, self.paused_until = replace(snapshot.counters), snapshot.paused_until
        self.memories = {env: EnvMemory.unpack(blob) for env, blob in snapshot.memory.items()}
        self.ready_envs = {env for env, memory in self.memories.items() if memory.ready}
        self.taken_envs = set()
        for env in self.ready_envs:
            for segment in self.memories[env].ready:
                segment.env_id = env
        return True
