"""A local client's copy of one model's policy: built from the spec the model publishes, refreshed
from its published weights, acting without a round trip."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from worker.model.policy import load_weight_vector, make_policy
from worker.model.settings import A2CSettings
from worker.protocol import Spaces


class LocalPolicy:
    """The same ``ActorCriticPolicy`` as the model's, with the model's last published weights.

    :param spec: the ``spec`` of the model's policy hash (architecture and spaces)
    :param spaces: the spaces it describes
    """

    def __init__(self, spec: dict[str, Any], spaces: Spaces) -> None:
        settings = A2CSettings(
            _cli_parse_args=False,
            gym_env="none",
            obs_shape=list(spaces.obs_shape),
            n_actions=spaces.n_actions,
            net_arch=spec["net_arch"],
            activation_fn=spec["activation_fn"],
            ortho_init=spec.get("ortho_init", True),
        )
        self.policy = make_policy(settings)

    def set_weights(self, weights: bytes) -> None:
        load_weight_vector(self.policy, np.frombuffer(weights, dtype="<f4").copy())

    def act(self, observations: np.ndarray, deterministic: bool) -> list[int]:
        """One action per row: a sample from the policy, or its most likely action."""
        with torch.no_grad():
            return self.policy._predict(torch.as_tensor(observations), deterministic).tolist()
