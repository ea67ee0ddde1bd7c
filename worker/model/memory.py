"""Per-environment memory: what a model must remember between two observations of one environment.

An observation of environment *e* carries the reward for, and the action taken at, *e*'s previous
observation. So the model remembers, per environment, the previous observation with the value and
log-probabilities it computed for it, and turns the next message into one transition
``(obs, action, reward, episode_start, value, log_prob)``. Every ``n_steps`` transitions of one
environment form a segment, bootstrapped with the value of the observation that completed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from worker.model.inputs import Inputs
from worker.protocol import Observation, split_id
from worker.protocol.values import Value

MEMORY_FORMAT = 4  # the layout of a packed EnvMemory: its first item
READABLE_FORMATS = (1, 2, 3, MEMORY_FORMAT)  # 1 and 2: float32 vectors and discrete actions only


class FormatError(ValueError):
    """Stored state in a format this code does not read (written by another version): refused,
    never misread."""


FORMAT_HINT = "run the version that wrote it, or `control forget` this model"

Action = int | np.ndarray  # an integer for a Discrete space, else an array


@dataclass(slots=True)
class Transition:
    obs: Value  # as the policy takes it (images channel-first, normalized if the model normalizes)
    action: Action
    reward: float  # as learned from (scaled, if the model normalizes rewards)
    episode_start: bool
    value: float
    log_prob: float  # log pi(action | obs) under the policy that answered obs
    # The update count of that policy: a measurement (policy lag), not state; -1 once restored.
    answered_at: int = -1


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


def _pack(value: Value | Action) -> Any:
    """An array as ``[dtype, shape, bytes]`` (numpy's own dtype string: cheaper than its name), a
    Dict observation as a map of those, an integer as itself."""
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [value.dtype.str, value.shape, value.tobytes()]
    return value


def _unpack(packed: Any) -> Any:
    if isinstance(packed, dict):
        return {k: _unpack(v) for k, v in packed.items()}
    if isinstance(packed, list):
        dtype, shape, data = packed
        return np.frombuffer(data, np.dtype(dtype)).reshape(shape).copy()
    return packed


@dataclass(slots=True)
class EnvMemory:
    """The last observation of one environment and the rollout collected since the last segment."""

    obs: Value  # as the policy takes it
    value: float
    params: np.ndarray  # the distribution answered for ``obs`` (:class:`~worker.protocol.Family`'s vector)
    episode_start: bool
    deterministic: bool
    seen_ms: int  # stream time (entry-ID milliseconds) of ``obs``: when this environment was last heard of
    rollout: list[Transition] = field(default_factory=list)
    step: int | None = None  # the STEP of ``obs``, if it had one: a step up to it is a repeat
    ret: float = 0.0  # the discounted return so far (reward normalization's R_t)
    answered_at: int = -1  # the update count of the policy that answered ``obs`` (not stored)
    # Segments complete and not trained on yet (--segments-per-update): committed with the memory,
    # so that a crash neither loses them nor trains on them twice.
    ready: list[Segment] = field(default_factory=list)

    def pack(self) -> bytes:
        rows = _rows(self.rollout)
        ready = [[_rows(s.transitions), s.last_value, s.last_done] for s in self.ready]
        return msgpack.packb(
            [
                MEMORY_FORMAT,
                _pack(self.obs),
                self.value,
                _pack(self.params.astype("<f4")),
                self.episode_start,
                self.deterministic,
                self.seen_ms,
                rows,
                self.step,
                self.ret,
                ready,
            ],
            use_bin_type=True,
        )

    @classmethod
    def unpack(cls, blob: bytes) -> EnvMemory:
        fields = msgpack.unpackb(blob, raw=False)
        found = fields[0] if isinstance(fields, list) and fields else None
        if found in (1, 2) and len(fields) == 10 + (found == 2):
            return _unpack_vectors(fields)
        if not (found == 3 and len(fields) == 10 or found == MEMORY_FORMAT and len(fields) == 11):
            raise FormatError(f"an environment's memory has format {found}, this code reads {MEMORY_FORMAT}")
        _, obs, value, params, start, deterministic, seen_ms, rows, step, ret, *rest = fields
        rollout = _transitions(rows)
        memory = cls(_unpack(obs), value, _unpack(params), start, deterministic, seen_ms, rollout, step, ret)
        # The environment's ID is the memory's key: the learner fills it in.
        memory.ready = [Segment("", _transitions(r), v, d) for r, v, d in (rest[0] if rest else [])]
        return memory


def _rows(transitions: list[Transition]) -> list[list[Any]]:
    return [
        [_pack(t.obs), _pack(t.action), t.reward, t.episode_start, t.value, t.log_prob] for t in transitions
    ]


def _transitions(rows: list[list[Any]]) -> list[Transition]:
    return [Transition(_unpack(o), _unpack(a), *rest) for o, a, *rest in rows]


def _unpack_vectors(fields: list[Any]) -> EnvMemory:
    """Formats 1 and 2: float32 observations, discrete actions, log-probabilities as the logits."""
    _, obs, shape, value, log_probs, start, deterministic, seen_ms, rollout_obs, rows = fields[:10]
    obs_rows = np.frombuffer(rollout_obs, "<f4").reshape((len(rows), *shape))
    rollout = [Transition(o.copy(), *row) for o, row in zip(obs_rows, rows, strict=True)]
    obs_array = np.frombuffer(obs, "<f4").reshape(shape).copy()
    params = np.frombuffer(log_probs, "<f4").copy()
    step = fields[10] if len(fields) == 11 else None
    return EnvMemory(obs_array, value, params, start, deterministic, seen_ms, rollout, step)


@dataclass(slots=True)
class StepResult:
    """What one observation did to its environment's memory."""

    segment: Segment | None  # the transition completed a segment
    dropped: int  # transitions of an interrupted rollout that were thrown away
    forgotten: bool  # the memory was older than the TTL: the environment starts afresh
    repeat: bool = False  # a step already seen: the memory was left as it was
    # The transition recorded, its REWARD, its bootstrap and the distribution its action was drawn
    # from: the learner scales the rewards and takes the log-probabilities of a batch at once.
    recorded: tuple[Transition, float, float, np.ndarray] | None = None

    @property
    def transition(self) -> bool:
        """A transition was recorded."""
        return self.recorded is not None


@dataclass(frozen=True, slots=True)
class Rules:
    """How observations become transitions: A2C's ``gamma`` and ``n_steps``, whether evaluation
    steps are learned from, the memory's TTL (ms), the action space's family and the model's inputs
    (reward scaling)."""

    gamma: float
    n_steps: int
    train_deterministic: bool
    ttl_ms: int
    inputs: Inputs


@dataclass(slots=True)
class Evaluated:
    """What the model computed for one observation: the policy's input, V(obs), the distribution
    answered, and V(terminal observation) when the previous step was truncated."""

    obs: Value
    value: float
    params: np.ndarray
    terminal_value: float | None = None


def observe(
    memory: EnvMemory | None, obs: Observation, evaluated: Evaluated, rules: Rules, repeat: bool
) -> tuple[EnvMemory, StepResult]:
    """Advance one environment's memory by one observation.

    :param memory: the environment's memory, ``None`` for an environment never seen (or forgotten)
    :param obs: the observation
    :param evaluated: what the current policy made of it
    :param rules: see :class:`Rules`
    :param repeat: ``obs`` is a repeat, as :func:`find_repeats` found it for its run
    :return: the new memory and what happened; for a repeat, ``memory`` itself
    """
    segment, recorded, dropped, forgotten = None, None, 0, False
    seen_ms = split_id(obs.entry_id)[0]
    ready = memory.ready if memory is not None else []  # complete: they outlive the TTL
    if memory is not None and seen_ms - memory.seen_ms > rules.ttl_ms:
        # Decided here, by the entry IDs alone, so that what is learned never depends on when a
        # sweep ran (batching, restarts): Learner.forget_silent only frees what never comes back.
        dropped, forgotten, memory = len(memory.rollout), True, None
    if repeat:
        assert memory is not None  # a repeat has a memory within the TTL: find_repeats saw it
        return memory, StepResult(None, 0, False, repeat=True)
    rollout = memory.rollout if memory is not None else []
    ret = 0.0
    usable = memory is not None and (rules.train_deterministic or not memory.deterministic)
    if obs.reward is not None and usable:
        assert memory is not None and obs.action is not None
        ret = rules.inputs.discount(obs.reward, memory.ret)
        bootstrap = 0.0
        if obs.truncated:
            # Time-limit truncation is not a real end: bootstrap as SB3's A2C.collect_rollouts does.
            assert evaluated.terminal_value is not None
            bootstrap = rules.gamma * evaluated.terminal_value
        # Reward and log-probability are the learner's to fill in, for the whole batch at once.
        transition = Transition(
            memory.obs, obs.action, 0.0, memory.episode_start, memory.value, 0.0, memory.answered_at
        )
        rollout.append(transition)
        recorded = (transition, obs.reward, bootstrap, memory.params)
        if len(rollout) == rules.n_steps:
            segment = Segment(obs.env_id, rollout, last_value=evaluated.value, last_done=obs.done)
            rollout = []
    elif rollout:
        # The chain of transitions is broken (an environment restarted without REWARD, or an
        # evaluation step): a segment must be consecutive steps, so the partial rollout goes.
        dropped, rollout = len(rollout), []
    # An environment seen for the first time, or restarted without REWARD, starts an episode.
    episode_start = obs.done or obs.reward is None
    new = EnvMemory(
        evaluated.obs,
        evaluated.value,
        evaluated.params,
        episode_start,
        obs.deterministic,
        seen_ms,
        rollout,
        obs.step,
        0.0 if obs.done else ret,
        ready=ready,
    )
    return new, StepResult(segment, dropped, forgotten, recorded=recorded)


def is_repeat(last_step: int | None, obs: Observation) -> bool:
    """Whether ``obs`` reports a step its environment's memory has already taken in: a client that
    resent a step after losing its answer, or an entry added twice. Only a step with REWARD can be
    one: without, it starts the environment's chain again, whatever its STEP.

    :param last_step: the STEP of the memory's last observation (not forgotten)
    :param obs: the environment's new observation
    """
    return obs.reward is not None and obs.step is not None and last_step is not None and obs.step <= last_step


def find_repeats(memories: dict[str, EnvMemory], run: list[Observation], ttl_ms: int) -> list[bool]:
    """Which observations of ``run`` are repeats (:func:`is_repeat`) of their environment's memory
    as :func:`observe` will find it, the TTL applied: told before the run is observed, as the
    statistics of normalization must not take them in."""
    last = {env: (memory.step, memory.seen_ms) for env, memory in memories.items()}
    found = []
    for obs in run:
        seen_ms = split_id(obs.entry_id)[0]
        step, at = last.get(obs.env_id, (None, seen_ms))
        repeat = is_repeat(step if seen_ms - at <= ttl_ms else None, obs)
        if not repeat:
            last[obs.env_id] = (obs.step, seen_ms)
        found.append(repeat)
    return found
