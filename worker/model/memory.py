"""Per-environment memory: what a model must remember between two observations of one environment.

An observation of environment *e* carries the reward for, and the action taken at, *e*'s previous
observation. So the model remembers, per environment, the previous observation with the value and
log-probabilities it computed for it, and turns the next message into one transition
``(obs, action, reward, episode_start, value, log_prob)``. Every ``n_steps`` transitions of one
environment form a segment, bootstrapped with the value of the observation that completed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy as np

from worker.protocol import Observation, split_id

MEMORY_FORMAT = 2  # the layout of a packed EnvMemory: its first item
READABLE_FORMATS = (1, MEMORY_FORMAT)  # format 1 had no ``step``: it unpacks with ``step`` None


class FormatError(ValueError):
    """Stored state in a format this code does not read (written by another version): refused,
    never misread."""


FORMAT_HINT = "run the version that wrote it, or `control forget` this model"


@dataclass(slots=True)
class Transition:
    obs: np.ndarray
    action: int
    reward: float
    episode_start: bool
    value: float
    log_prob: float


@dataclass(slots=True)
class Segment:
    """``n_steps`` consecutive transitions of one environment, ready for the A2C update.

    :param last_value: V(s_{t+n}), the value of the observation that followed the last transition
    :param last_done: whether the last transition ended its episode (then ``last_value`` is unused)
    """

    env_id: str
    transitions: list[Transition]
    last_value: float
    last_done: bool


@dataclass(slots=True)
class EnvMemory:
    """The last observation of one environment and the rollout collected since the last segment."""

    obs: np.ndarray
    value: float
    log_probs: np.ndarray  # log pi(a | obs) for every action a
    episode_start: bool
    deterministic: bool
    seen_ms: int  # stream time (entry-ID milliseconds) of ``obs``: when this environment was last heard of
    rollout: list[Transition] = field(default_factory=list)
    step: int | None = None  # the STEP of ``obs``, if it had one: a step up to it is a repeat

    def pack(self) -> bytes:
        r = self.rollout
        return msgpack.packb(
            [
                MEMORY_FORMAT,
                self.obs.astype("<f4").tobytes(),
                list(self.obs.shape),
                self.value,
                self.log_probs.astype("<f4").tobytes(),
                self.episode_start,
                self.deterministic,
                self.seen_ms,
                b"".join(t.obs.astype("<f4").tobytes() for t in r),
                [[t.action, t.reward, t.episode_start, t.value, t.log_prob] for t in r],
                self.step,
            ],
            use_bin_type=True,
        )

    @classmethod
    def unpack(cls, blob: bytes) -> EnvMemory:
        fields = msgpack.unpackb(blob)
        found = fields[0] if isinstance(fields, list) and fields else None
        if found not in READABLE_FORMATS or len(fields) != 10 + (found != 1):
            raise FormatError(f"an environment's memory has format {found}, this code reads {MEMORY_FORMAT}")
        _, obs, shape, value, log_probs, start, deterministic, seen_ms, rollout_obs, rows = fields[:10]
        step = fields[10] if found != 1 else None
        obs_array = np.frombuffer(obs, "<f4").reshape(shape)
        obs_rows = np.frombuffer(rollout_obs, "<f4").reshape((len(rows), *shape))
        rollout = [Transition(o.copy(), *row) for o, row in zip(obs_rows, rows, strict=True)]
        return cls(
            obs_array.copy(),
            value,
            np.frombuffer(log_probs, "<f4").copy(),
            start,
            deterministic,
            seen_ms,
            rollout,
            step,
        )


@dataclass(slots=True)
class StepResult:
    """What one observation did to its environment's memory."""

    transition: bool  # a transition was recorded
    segment: Segment | None  # the transition completed a segment
    dropped: int  # transitions of an interrupted rollout that were thrown away
    forgotten: bool  # the memory was older than the TTL: the environment starts afresh
    repeat: bool = False  # a step already seen: the memory was left as it was


def observe(
    memory: EnvMemory | None,
    obs: Observation,
    value: float,
    log_probs: np.ndarray,
    terminal_value: float | None,
    gamma: float,
    n_steps: int,
    train_deterministic: bool,
    ttl_ms: int,
) -> tuple[EnvMemory, StepResult]:
    """Advance one environment's memory by one observation.

    :param memory: the environment's memory, ``None`` for an environment never seen (or forgotten)
    :param value: V(obs) under the current policy
    :param log_probs: log pi(. | obs) under the current policy
    :param terminal_value: V(terminal observation) when the previous step was truncated
    :param ttl_ms: a memory older than this (by entry IDs) is forgotten, as if never seen
    :return: the new memory and what happened; for a repeat (:func:`is_repeat`), ``memory`` itself
    """
    segment, recorded, dropped, forgotten = None, False, 0, False
    seen_ms = split_id(obs.entry_id)[0]
    if memory is not None and seen_ms - memory.seen_ms > ttl_ms:
        # Decided here, by the entry IDs alone, so that what is learned never depends on when a
        # sweep ran (batching, restarts): Learner.forget_silent only frees what never comes back.
        dropped, forgotten, memory = len(memory.rollout), True, None
    if memory is not None and is_repeat(memory, obs):
        return memory, StepResult(False, None, 0, False, repeat=True)
    rollout = memory.rollout if memory is not None else []
    usable = memory is not None and (train_deterministic or not memory.deterministic)
    if obs.reward is not None and usable:
        assert memory is not None and obs.action is not None
        reward = obs.reward
        if obs.truncated:
            # Time-limit truncation is not a real end: bootstrap as SB3's A2C.collect_rollouts does.
            assert terminal_value is not None
            reward += gamma * terminal_value
        rollout.append(
            Transition(
                memory.obs,
                obs.action,
                reward,
                memory.episode_start,
                memory.value,
                float(memory.log_probs[obs.action]),
            )
        )
        recorded = True
        if len(rollout) == n_steps:
            segment = Segment(obs.env_id, rollout, last_value=value, last_done=obs.done)
            rollout = []
    elif rollout:
        # The chain of transitions is broken (an environment restarted without REWARD, or an
        # evaluation step): a segment must be consecutive steps, so the partial rollout goes.
        dropped, rollout = len(rollout), []
    # An environment seen for the first time, or restarted without REWARD, starts an episode.
    episode_start = obs.done or obs.reward is None
    new = EnvMemory(
        obs.observation, value, log_probs, episode_start, obs.deterministic, seen_ms, rollout, obs.step
    )
    return new, StepResult(recorded, segment, dropped, forgotten)


def is_repeat(memory: EnvMemory, obs: Observation) -> bool:
    """Whether ``obs`` reports a step this memory has already taken in: a client that resent a step
    after losing its answer, or an entry added twice. Only a step with REWARD can be one: without,
    it starts the environment's chain again, whatever its STEP.

    :param memory: the environment's memory (not forgotten)
    :param obs: the environment's new observation
    """
    return (
        obs.reward is not None
        and obs.step is not None
        and memory.step is not None
        and obs.step <= memory.step
    )
