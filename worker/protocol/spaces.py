"""Observation and action spaces as JSON, as each model publishes them (``spaces`` in its ``info``
hash) so that a client can check observations and type actions without running the model's code.

Only the spaces the models serve are described: a ``Box`` of observations (its shape; bounds are
not checked, as the models accept any finite value) and a ``Discrete`` set of actions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np


@dataclass(frozen=True)
class Spaces:
    """What observations a model takes and what actions it answers with."""

    obs_shape: tuple[int, ...]
    n_actions: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "observation": {"type": "Box", "shape": list(self.obs_shape), "dtype": "float32"},
                "action": {"type": "Discrete", "n": self.n_actions},
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Spaces:
        """:raises ValueError: not a description of spaces this code knows"""
        try:
            spec: Any = json.loads(text)
            obs, act = spec["observation"], spec["action"]
            if obs["type"] != "Box" or act["type"] != "Discrete":
                raise ValueError(f"spaces {obs['type']} and {act['type']} are not supported")
            return cls(tuple(int(n) for n in obs["shape"]), int(act["n"]))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a description of spaces: {exc!r}") from None

    def gym(self) -> tuple[gym.spaces.Box, gym.spaces.Discrete]:
        """The gymnasium spaces (unbounded observations, as the models take them)."""
        return gym.spaces.Box(-np.inf, np.inf, self.obs_shape, np.float32), gym.spaces.Discrete(
            self.n_actions
        )
