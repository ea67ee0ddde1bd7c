"""The distributions of every action space: one log-probability however it is computed, and the
combination rules of the aggregator's docstring, checked against their formulas."""

from __future__ import annotations

import numpy as np
import pytest

from worker.common.distributions import decide, log_prob, softmax
from worker.common.draws import Draws
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
    rng = Draws(0).rows(["e"], [1])
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
            decide(gaussian, params[None, None], np.array([False]), "prob", Draws(0).rows(["e"], [k]))[0][0]
            for k in range(400)
        ]
    )
    assert draws.mean(0) == pytest.approx([0.5, -0.5], abs=0.02) and draws.std(0) == pytest.approx(
        [0.1, 0.1], rel=0.2
    )


def test_an_action_is_keyed_by_its_environment_and_step_not_by_its_batch() -> None:
    """The same (seed, ENV_ID, STEP) draws the same action alone or in any batch, in any order;
    another step, environment or seed draws independently."""
    family = Family("categorical", (4,))
    params = np.log(np.full((1, 1, 4), 0.25))
    envs, steps = [f"env-{i % 7}" for i in range(200)], [i // 7 for i in range(200)]

    def actions(seed: int, order: list[int]) -> dict[int, int]:
        rows = Draws(seed).rows([envs[i] for i in order], [steps[i] for i in order])
        chosen, _ = decide(family, np.repeat(params, len(order), 0), np.zeros(len(order), bool), "prob", rows)
        return dict(zip(order, chosen, strict=True))

    whole = actions(3, list(range(200)))
    shuffled = actions(3, [int(i) for i in np.random.default_rng(1).permutation(200)])
    one_by_one = {i: actions(3, [i])[i] for i in range(0, 200, 9)}
    assert shuffled == whole and one_by_one == {i: whole[i] for i in one_by_one}
    counts = np.bincount(list(whole.values()), minlength=4)
    assert counts.min() > 25  # uniform over 4: about 50 each
    other_seed = actions(4, list(range(200)))
    assert 0.15 < np.mean([other_seed[i] == whole[i] for i in range(200)]) < 0.4  # independent: 1/4


def test_keyed_numbers_are_uniform_and_normal() -> None:
    rows = Draws(11).rows([f"e{i}" for i in range(2000)], list(range(2000)))
    u, z = rows.uniform(3), rows.normal(2)
    assert u.shape == (2000, 3) and u.min() >= 0 and u.max() < 1
    assert u.mean() == pytest.approx(0.5, abs=0.02)
    assert np.corrcoef(u[:, 0], u[:, 1])[0, 1] == pytest.approx(0, abs=0.06)
    assert z.mean() == pytest.approx(0, abs=0.05) and z.std() == pytest.approx(1, abs=0.05)
    again = Draws(11).rows([f"e{i}" for i in range(2000)], list(range(2000)))
    assert (again.uniform(3) == u).all()  # the same numbers, drawn again


def test_observations_without_a_step_draw_from_the_seed() -> None:
    first, second = Draws(5).rows(["e", "e"], [None, None]), Draws(5).rows(["e", "e"], [None, None])
    a, b = first.uniform(1), second.uniform(1)
    assert (a == b).all() and a[0, 0] != a[1, 0]
