"""The caller's values, checked before anything is built from them: an environment's ID, an
observation that must become an array, a reward (the wire's own checks follow, in ``parse_observation``)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from worker.protocol import wire_value


def env_name(env_id: Any) -> str:
    """An environment's ENV_ID: a non-empty string, or an integer taken as its decimal text (as the
    protocol takes it: 7 and "7" are one environment)."""
    if type(env_id) is int:
        return str(env_id)
    if isinstance(env_id, str) and env_id:
        return env_id
    raise ValueError(f"an environment's ID must be a non-empty string or an integer, got {env_id!r}")


def wire(env_id: str, observation: Any, space: gym.Space, binary_arrays: bool) -> Any:
    """``observation`` as a message carries it (:func:`~worker.protocol.wire_value`): Box values as
    binary arrays in msgpack entries (floats in the space's own type), lists in JSON ones."""
    try:
        return wire_value(observation, space, binary_arrays)
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"{env_id!r}: OBSERVATION does not fit {space}: {exc}") from None


def applied(space: gym.Space, action: Any) -> Any:
    """The action the caller applies: an integer (Discrete), an integer array (MultiDiscrete,
    MultiBinary), or a Box's values in its shape, clipped to its bounds as SB3 clips them (the
    models learn from the action as sampled)."""
    if isinstance(action, int):
        return action
    array = np.asarray(action)
    if isinstance(space, gym.spaces.Box):
        return np.clip(array.reshape(space.shape), space.low, space.high).astype(space.dtype)
    return array.astype(np.int64)


def number(env_id: str, key: str, value: Any) -> float:
    """A reward as the protocol takes it: a number (not a bool, not text), finite (checked later)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{env_id!r}: {key} must be a number, got {value!r}")
    return float(value)
