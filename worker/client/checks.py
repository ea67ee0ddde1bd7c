"""The caller's values, checked before anything is built from them: an environment's ID, an
observation that must become an array, a reward (the wire's own checks follow, in ``parse_observation``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def env_name(env_id: Any) -> str:
    """An environment's ENV_ID: a non-empty string, or an integer taken as its decimal text (as the
    protocol takes it: 7 and "7" are one environment)."""
    if type(env_id) is int:
        return str(env_id)
    if isinstance(env_id, str) and env_id:
        return env_id
    raise ValueError(f"an environment's ID must be a non-empty string or an integer, got {env_id!r}")


def as_list(env_id: str, observation: Any) -> list:
    try:
        return np.asarray(observation, dtype=np.float64).tolist()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{env_id!r}: OBSERVATION is not an array of numbers: {exc}") from None


def number(env_id: str, key: str, value: Any) -> float:
    """A reward as the protocol takes it: a number (not a bool, not text), finite (checked later)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{env_id!r}: {key} must be a number, got {value!r}")
    return float(value)
