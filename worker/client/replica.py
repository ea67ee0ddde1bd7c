"""A local client's copy of one model's policy: built from the spec the model publishes, refreshed
from its published weights (and normalization statistics), acting without a round trip."""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.common.distributions import decide
from worker.common.draws import Draws
from worker.model.inputs import Inputs
from worker.model.policy import evaluate, load_weight_vector, policy_from_spec
from worker.protocol import Spaces, parse_value


class LocalPolicy:
    """The same policy as the model's, with the model's last published weights, turning
    observations into the policy's inputs as the model does.

    :param spec: the ``spec`` of the model's policy hash (spaces, network, normalization)
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spaces = Spaces.from_json_data(spec["spaces"])
        self.family = self.spaces.family
        self.policy = policy_from_spec(spec)
        # The statistics come with the weights; rewards are the model's business.
        self.inputs = Inputs(self.spaces.observation, bool(spec.get("normalize_obs")), False, 0.0)
        self.draws = Draws()

    def set_weights(self, weights: bytes, normalization: bytes | None = None) -> None:
        load_weight_vector(self.policy, np.frombuffer(weights, dtype="<f4").copy())
        if normalization is not None:
            self.inputs.restore(normalization)

    def act(self, observations: list[Any], deterministic: bool, keys: list[tuple[str, int]]) -> list[Any]:
        """One action per observation (as a message carries it): a sample from the policy, or its
        most likely action, as the model itself would answer.

        :param keys: each observation's environment and step, which its random numbers are keyed by
        """
        values = [parse_value(o, self.spaces.observation, "OBSERVATION") for o in observations]
        batch = self.inputs.policy_batch(values, [False] * len(values))
        params, _ = evaluate(self.policy, self.family, batch)
        flags = np.full(len(values), deterministic)
        rows = self.draws.rows([env for env, _ in keys], [step for _, step in keys])
        actions, _ = decide(self.family, params.astype(np.float64)[:, None, :], flags, "prob", rows)
        return actions
