"""The distributions of every action space: one log-probability however it is computed, and the
combination rules of the aggregator's docstring, checked against their formulas."""

from __future__ import annotations

import numpy as np
import pytest

from worker.common.distributions import decide, log_prob, softmax
from worker.protocol import Family

FAMILIES = {
    "categorical": (Family("categorical", (3,)), np.asarray(2)),
    "multi": (Family("multi", (3, 2, 2)), np.array([2, 0, 1])),
    "gaussian": (Family("gaussian", (2,)), np.array([0.3, -1.2])),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_a_batch_of_log_probabilities_is_each_one(name: str) -> None:
    family, action = FAMILIES[name]
    params = np.random.default_rng(0).normal(size=(3, family.n_params))
    batch = log_prob(family, params, np.stack([action] * 3))
    assert batch.tolist() == pytest.approx([float(log_prob(family, row, action)) for row in params])


def test_categorical_log_probability_is_log_softmax() -> None:
    family, params = Family("categorical", (3,)), np.array([1.0, 2.0, 0.5])
    assert float(log_prob(family, params, np.asarray(1))) == pytest.approx(np.log(softmax(params)[1]))


def test_gaussian_log_probability_is_the_normal_density() -> None:
    family, params = Family("gaussian", (1,)), np.array([0.5, np.log(2.0)])
    density = np.exp(-0.5 * ((1.5 - 0.5) / 2.0) ** 2) / (2.0 * np.sqrt(2 * np.pi))
    assert float(log_prob(family, params, np.array([1.5]))) == pytest.approx(np.log(density))


@pytest.mark.parametrize("combine", ["prob", "logits"])
def test_deterministic_decisions_follow_the_rules(combine: str) -> None:
    rng = np.random.default_rng(0)
    gaussian = Family("gaussian", (1,))
    params = np.array([[[-1.0, np.log(1.0)], [3.0, np.log(0.5)]]])  # two models, one observation
    (action,), shares = decide(gaussian, params, np.array([True]), combine, rng)
    precision = np.array([1.0, 4.0])
    expected = 1.0 if combine == "prob" else (precision * [-1.0, 3.0]).sum() / precision.sum()
    assert action == pytest.approx([expected])
    likelihoods = np.exp([float(log_prob(gaussian, params[0, m], np.array(action))) for m in range(2)])
    assert shares[0] == pytest.approx(likelihoods / likelihoods.sum())

    multi = Family("multi", (2, 3))
    logits = np.array([[[0.0, 2.0, 0.0, 0.0, 5.0], [1.0, 0.0, 3.0, 0.0, 0.0]]])
    (action,), _ = decide(multi, logits, np.array([True]), combine, rng)
    first = softmax(logits[0, :, :2]).mean(0) if combine == "prob" else softmax(logits[0, :, :2].mean(0))
    second = softmax(logits[0, :, 2:]).mean(0) if combine == "prob" else softmax(logits[0, :, 2:].mean(0))
    assert action == [int(first.argmax()), int(second.argmax())]


def test_one_model_is_its_own_policy() -> None:
    gaussian = Family("gaussian", (2,))
    params = np.array([0.5, -0.5, np.log(0.1), np.log(0.1)])
    draws = np.array(
        [
            decide(gaussian, params[None, None], np.array([False]), "prob", np.random.default_rng(k))[0][0]
            for k in range(400)
        ]
    )
    assert draws.mean(0) == pytest.approx([0.5, -0.5], abs=0.02) and draws.std(0) == pytest.approx(
        [0.1, 0.1], rel=0.2
    )
