"""Models that normalize their observations are not evolved: their weights would move without the
statistics they were trained with. The others evolve; everyone resumes. And a generation that cannot
take place does not stop training."""

from __future__ import annotations

import numpy as np

from tests.test_evolution import evo_settings, models
from worker.evolution.generation import evolve
from worker.model.policy import weights_as_vector


def test_normalizing_models_keep_their_weights(real_redis, redis_server_url) -> None:
    with models(redis_server_url, "n1", "n2", "m1", "m2", normalize_obs=True) as workers:
        before = {cid: weights_as_vector(w.policy) for cid, w in workers.items()}
        real_redis.hset("rl:contribution", mapping={"n1": 10, "n2": 1, "m1": 5, "m2": 1})
        settings = evo_settings(redis_server_url, fitness="contribution", pbt_quantile=0.5, pbt_sigma=0.0)
        report = evolve(real_redis, settings)
        assert report.acknowledged == ["m1", "m2", "n1", "n2"] and report.unacknowledged == []
        assert report.actions["n1"] == report.actions["n2"] == "kept: it normalizes its observations"
        assert report.fitness == {"m1": 5.0, "m2": 1.0}  # only the others are ranked
        after = {cid: weights_as_vector(w.policy) for cid, w in workers.items()}
        for cid in ("n1", "n2", "m1"):
            np.testing.assert_array_equal(after[cid], before[cid])
        np.testing.assert_array_equal(after["m2"], before["m1"])  # the worst of the others took the best's
        assert not any(w.learner.paused() for w in workers.values())


def test_control_train_skips_a_generation_that_cannot_take_place(
    real_redis, redis_server_url, capsys
) -> None:
    """No model answers (none is live here): training must go on, not die with the generation."""
    from worker.control.train import evolve_through_outages

    evolve_through_outages(real_redis, evo_settings(redis_server_url, prefix="nobody"))
    assert "generation skipped: training goes on" in capsys.readouterr().err
