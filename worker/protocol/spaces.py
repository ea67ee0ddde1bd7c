"""Observation and action spaces as JSON, as each model publishes them (``spaces`` in its ``info``
hash), so that a client can check observations and type actions without running the model's code;
and the form of the distribution a model answers with for its action space (:class:`Family`).

Spaces are gymnasium's, described as JSON objects (``null`` for an infinite bound)::

    {"type": "Box", "shape": [3], "dtype": "float32", "low": [-1, -1, -8], "high": [1, 1, 8]}
    {"type": "Discrete", "n": 2}
    {"type": "MultiDiscrete", "nvec": [3, 2]}
    {"type": "MultiBinary", "n": 4}
    {"type": "Dict", "spaces": {"camera": {...}, "speed": {...}}}      (observations only)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

ACTION_SPACES = (gym.spaces.Discrete, gym.spaces.Box, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
OBSERVATION_SPACES = (*ACTION_SPACES, gym.spaces.Dict)
NUMERIC_KINDS = "biuf"  # dtype kinds a Box may have: bool, signed, unsigned, float


def unsupported(space: gym.Space, role: str) -> str | None:
    """Why ``space`` cannot be the ``role`` ("observation" or "action") space, or ``None`` if it can.

    What stable-baselines3's A2C takes: any of the four simple spaces for observations (and a Dict
    of them), Discrete/Box/MultiDiscrete/MultiBinary for actions; discrete values counted from 0.
    """
    allowed = OBSERVATION_SPACES if role == "observation" else ACTION_SPACES
    if not isinstance(space, allowed):
        names = ", ".join(kind.__name__ for kind in allowed)
        return f"{role} space {space} is not one of {names}"
    if isinstance(space, gym.spaces.Dict):
        for key, sub in space.spaces.items():
            if isinstance(sub, gym.spaces.Dict):
                return f"observation space key {key!r}: nested Dict spaces are not supported (as in SB3)"
            if (why := unsupported(sub, role)) is not None:
                return f"key {key!r}: {why}"
    if isinstance(space, gym.spaces.Discrete | gym.spaces.MultiDiscrete) and np.any(space.start != 0):
        return f"{role} space {space} starts at {space.start}, not 0: SB3 counts discrete values from 0"
    if isinstance(space, gym.spaces.MultiBinary) and np.ndim(space.n) != 0:
        return f"{role} space {space}: only a flat MultiBinary(n) is supported"
    if isinstance(space, gym.spaces.MultiDiscrete) and space.nvec.ndim != 1:
        return f"{role} space {space}: only a flat MultiDiscrete is supported"
    if isinstance(space, gym.spaces.Box) and space.dtype.kind not in NUMERIC_KINDS:
        return f"{role} space {space} has dtype {space.dtype}, not a number type"
    if role == "action" and isinstance(space, gym.spaces.Box) and space.dtype.kind != "f":
        return f"action space {space}: a Box of actions must hold floats"
    return None


def _bounds(values: np.ndarray) -> Any:
    """A Box's bound as JSON: one number if every entry is the same, else a nested list; ``null``
    for an infinite one."""
    flat = [
        None if math.isinf(v) else (int(v) if float(v).is_integer() else float(v)) for v in values.ravel()
    ]
    if len(set(flat)) == 1:
        return flat[0]
    return np.array(flat, dtype=object).reshape(values.shape).tolist()


def _bound(value: Any, shape: tuple[int, ...], sign: float) -> np.ndarray:
    array = np.array(value, dtype=object)
    array = np.where(array == None, sign * np.inf, array).astype(np.float64)  # noqa: E711 (elementwise)
    return np.broadcast_to(array, shape).copy()


def describe_space(space: gym.Space) -> dict[str, Any]:
    """The JSON-ready description of a supported space."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": [int(n) for n in space.nvec]}
    if isinstance(space, gym.spaces.MultiBinary):
        return {"type": "MultiBinary", "n": int(space.n)}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict", "spaces": {key: describe_space(sub) for key, sub in space.spaces.items()}}
    assert isinstance(space, gym.spaces.Box)
    return {
        "type": "Box",
        "shape": list(space.shape),
        "dtype": space.dtype.name,
        "low": _bounds(space.low),
        "high": _bounds(space.high),
    }


def space_from(spec: Any) -> gym.Space:
    """The gymnasium space a description names (:func:`describe_space`'s inverse).

    :raises ValueError: not a description of a space
    """
    kind = spec["type"]
    if kind == "Discrete":
        return gym.spaces.Discrete(int(spec["n"]))
    if kind == "MultiDiscrete":
        return gym.spaces.MultiDiscrete([int(n) for n in spec["nvec"]])
    if kind == "MultiBinary":
        return gym.spaces.MultiBinary(int(spec["n"]))
    if kind == "Dict":
        return gym.spaces.Dict({str(key): space_from(sub) for key, sub in spec["spaces"].items()})
    if kind == "Box":
        shape = tuple(int(n) for n in spec["shape"])
        dtype = np.dtype(spec.get("dtype", "float32"))
        low, high = _bound(spec.get("low"), shape, -1.0), _bound(spec.get("high"), shape, 1.0)
        if dtype.kind in "iu":  # no infinity in integers: an unbounded side is the type's limit
            info = np.iinfo(dtype)
            low, high = np.nan_to_num(low, neginf=info.min), np.nan_to_num(high, posinf=info.max)
        return gym.spaces.Box(low.astype(dtype), high.astype(dtype), shape, dtype)
    raise ValueError(f"unknown space type {kind!r}")


@dataclass(frozen=True)
class Family:
    """The form of the distribution a model answers with, by its action space.

    - ``categorical`` (Discrete(n)): ``LOGITS``, n numbers; ``sizes`` ``(n,)``
    - ``multi`` (MultiDiscrete(nvec); MultiBinary(n) as nvec all 2): ``LOGITS``, one list of logits
      per dimension; ``sizes`` the nvec
    - ``gaussian`` (Box of d values): ``MEAN`` and ``LOG_STD``, d numbers each (the action's
      values flattened in C order); ``sizes`` ``(d,)``

    A distribution travels as one flat vector of :attr:`n_params` numbers: the logits one dimension
    after another, or the d means then the d log-standard-deviations.
    """

    kind: str
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, space: gym.Space) -> Family:
        if isinstance(space, gym.spaces.Discrete):
            return cls("categorical", (int(space.n),))
        if isinstance(space, gym.spaces.MultiDiscrete):
            return cls("multi", tuple(int(n) for n in space.nvec))
        if isinstance(space, gym.spaces.MultiBinary):
            return cls("multi", (2,) * int(space.n))
        assert isinstance(space, gym.spaces.Box)
        return cls("gaussian", (int(np.prod(space.shape)),))

    @property
    def n_params(self) -> int:
        return 2 * self.sizes[0] if self.kind == "gaussian" else sum(self.sizes)

    def fields(self, params: np.ndarray) -> dict[str, Any]:
        """A reply's fields carrying one distribution (``params``: a flat vector)."""
        values = params.tolist()
        if self.kind == "categorical":
            return {"LOGITS": values}
        if self.kind == "gaussian":
            d = self.sizes[0]
            return {"MEAN": values[:d], "LOG_STD": values[d:]}
        bounds = np.cumsum((0, *self.sizes))
        return {"LOGITS": [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]}


@dataclass(frozen=True, eq=False)
class Spaces:
    """What observations a model takes and what actions it answers with (gymnasium spaces).

    Two are equal when their descriptions are: spaces compare and hash by :meth:`to_json`.
    """

    observation: gym.Space
    action: gym.Space

    def __post_init__(self) -> None:
        for space, role in ((self.observation, "observation"), (self.action, "action")):
            if (why := unsupported(space, role)) is not None:
                raise ValueError(why)

    @classmethod
    def vector(cls, obs_shape: tuple[int, ...], n_actions: int) -> Spaces:
        """Unbounded float32 observations of ``obs_shape`` and ``n_actions`` discrete actions."""
        box = gym.spaces.Box(-np.inf, np.inf, tuple(obs_shape), np.float32)
        return cls(box, gym.spaces.Discrete(n_actions))

    @property
    def family(self) -> Family:
        return Family.of(self.action)

    def to_json(self) -> str:
        return json.dumps(
            {"observation": describe_space(self.observation), "action": describe_space(self.action)},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Spaces:
        """:raises ValueError: not a description of spaces this code knows"""
        try:
            return cls.from_json_data(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a description of spaces: {exc}") from None

    @classmethod
    def from_json_data(cls, spec: Any) -> Spaces:
        """From the parsed JSON. :raises ValueError: not a description of spaces this code knows"""
        try:
            return cls(space_from(spec["observation"]), space_from(spec["action"]))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a description of spaces: {exc!r}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Spaces) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __str__(self) -> str:
        return f"{self.observation} -> {self.action}"
