"""Evolution: the pure operators, fitness, and whole generations over real model workers via Redis."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import redis
import torch

from tests.helpers import read, xadd
from worker.evolution.fitness import EvolutionError, mean_returns
from worker.evolution.generation import decide, evolve, generation_key, request_weights, run, send_weights
from worker.evolution.operators import ga_step, pbt_step
from worker.evolution.settings import EvolutionSettings
from worker.model.loop import ModelWorker
from worker.model.policy import make_policy, weights_as_vector
from worker.model.settings import ModelSettings
from worker.protocol import Streams

OBS = [0.01, -0.02, 0.03, 0.04]


def evo_settings(url: str = "redis://unused", **update) -> EvolutionSettings:
    return EvolutionSettings(_cli_parse_args=False, **{"redis_url": url, "seed": 0, "timeout": 5.0, **update})


def population(n: int, size: int = 50) -> dict[str, np.ndarray]:
    """Model i's weight j is i * 1000 + j: every gene tells where it came from."""
    return {f"m{i}": (i * 1000 + np.arange(size)).astype(np.float32) for i in range(n)}


# --------------------------------------------------------------------------- PBT


def test_pbt_copies_the_best_into_the_worst() -> None:
    vectors, fitness = population(4), {"m0": 1.0, "m1": 9.0, "m2": 5.0, "m3": 3.0}
    new, actions = pbt_step(vectors, fitness, evo_settings(pbt_sigma=0.0), np.random.default_rng(0))
    np.testing.assert_array_equal(new["m0"], vectors["m1"])  # quantile 0.25 of 4: one replaced
    assert actions == {"m0": "copied m1", "m1": "kept", "m2": "kept", "m3": "kept"}
    assert all(new[c] is vectors[c] for c in ("m1", "m2", "m3"))


def test_pbt_perturbs_the_copy() -> None:
    vectors = {"a": np.zeros(20_000, np.float32), "b": np.ones(20_000, np.float32)}
    new, actions = pbt_step(
        vectors, {"a": 0.0, "b": 1.0}, evo_settings(pbt_sigma=0.05), np.random.default_rng(1)
    )
    noise = new["a"] - vectors["b"]
    assert new["a"].dtype == np.float32 and abs(noise.std() - 0.05) < 0.002 and abs(noise.mean()) < 0.002
    assert actions["a"] == "copied b + N(0, 0.05)" and new["b"] is vectors["b"]


def test_pbt_keeps_ties_and_single_models() -> None:
    vectors, settings, rng = population(3), evo_settings(), np.random.default_rng(0)
    new, actions = pbt_step(vectors, dict.fromkeys(vectors, 0.0), settings, rng)
    assert set(actions.values()) == {"kept"} and all(new[c] is vectors[c] for c in vectors)
    new, actions = pbt_step({"m0": vectors["m0"]}, {"m0": 1.0}, settings, rng)
    assert actions == {"m0": "kept"}


# --------------------------------------------------------------------------- GA


def test_ga_keeps_elites_and_builds_offspring_from_parents_genes() -> None:
    vectors = population(6)
    fitness = {f"m{i}": float(i) for i in range(6)}
    settings = evo_settings(elitism=2, cxpb=1.0, mutpb=0.0)
    new, actions = ga_step(vectors, fitness, settings, seed=7)
    assert new["m5"] is vectors["m5"] and new["m4"] is vectors["m4"]  # the two best, untouched
    assert actions["m5"] == actions["m4"] == "elite, kept"
    crossed = 0
    for cid in ("m0", "m1", "m2", "m3"):
        child = new[cid]
        assert child.dtype == np.float32 and child.shape == (50,) and np.isfinite(child).all()
        parents = child // 1000
        np.testing.assert_array_equal(child % 1000, np.arange(50))  # each gene stays at its locus
        assert set(parents) <= set(range(6))
        crossed += len(set(parents)) > 1
        assert actions[cid].startswith(("crossover of", "copy of"))
    assert crossed >= 2  # with cxpb=1 the pairs mixed


def test_ga_is_reproducible_and_mutates() -> None:
    vectors, fitness = population(5), {f"m{i}": float(i) for i in range(5)}
    settings = evo_settings(elitism=1, mutpb=1.0, indpb=1.0, mutation_sigma=0.1)
    first, actions = ga_step(vectors, fitness, settings, seed=3)
    second, _ = ga_step(vectors, fitness, settings, seed=3)
    third, _ = ga_step(vectors, fitness, settings, seed=4)
    assert all(np.array_equal(first[c], second[c]) for c in vectors)
    assert any(not np.array_equal(first[c], third[c]) for c in vectors)
    for cid in ("m0", "m1", "m2", "m3"):  # every weight mutated: no child equals any parent
        assert all(not np.array_equal(first[cid], v) for v in vectors.values())
        assert actions[cid].endswith(", mutated")
    assert first["m4"] is vectors["m4"]


# --------------------------------------------------------------------------- fitness


def always_right(settings: EvolutionSettings) -> np.ndarray:
    """A policy that always pushes the cart right, as a weight vector."""
    policy = make_policy(settings)
    with torch.no_grad():
        policy.action_net.weight.zero_()
        policy.action_net.bias.copy_(torch.tensor([0.0, 1.0]))
    return weights_as_vector(policy)


def test_mean_returns_plays_deterministic_seeded_episodes() -> None:
    settings, seeds = evo_settings(), [11, 12, 13]
    vector = always_right(settings)
    expected = []
    env = gym.make("CartPole-v1")  # by hand: push right until the pole falls
    for seed in seeds:
        env.reset(seed=seed)
        steps, done = 0, False
        while not done:
            _, _, terminated, truncated, _ = env.step(1)
            steps, done = steps + 1, terminated or truncated
        expected.append(steps)
    fitness = mean_returns(
        {"right": vector, "random": weights_as_vector(make_policy(settings))}, settings, seeds
    )
    assert fitness["right"] == pytest.approx(np.mean(expected))
    assert fitness == mean_returns(
        {"right": vector, "random": weights_as_vector(make_policy(settings))}, settings, seeds
    )
    assert 1 <= fitness["random"] <= 500
    with pytest.raises(EvolutionError, match="has 755 weights"):  # models of another --net-arch
        mean_returns({"m1": vector}, evo_settings(net_arch={"pi": [8], "vf": [8]}), seeds)


def test_contribution_is_read_and_reset_with_the_get(any_redis) -> None:
    any_redis.hset("rl:contribution", mapping={"m1": "2.5", "m2": "0.5"})
    any_redis.zadd("rl:models", {"m1": time.time(), "m2": time.time()})
    settings = evo_settings(fitness="contribution")
    generation = request_weights(any_redis, Streams("rl"), settings)
    assert generation.shares == {"m1": 2.5, "m2": 0.5} and generation.number == 1
    assert generation.live == ["m1", "m2"] and not generation.resumed
    assert not any_redis.exists("rl:contribution")
    assert read(any_redis, "rl:evolution") == [(generation.get_id, {"CMD": "GET"})]
    # Until the generation is over, asking again gets it back: no second GET, no second take.
    again = request_weights(any_redis, Streams("rl"), settings)
    assert again.resumed and again.number == 1 and again.get_id == generation.get_id
    assert again.shares == {"m1": 2.5, "m2": 0.5} and len(read(any_redis, "rl:evolution")) == 1
    any_redis.delete(generation_key(Streams("rl")))
    following = request_weights(any_redis, Streams("rl"), settings)
    assert (following.number, following.shares) == (2, {})


def test_no_live_models_is_a_clear_error(fake_redis) -> None:
    fake_redis.zadd("rl:models", {"stale": time.time() - 60})
    with pytest.raises(EvolutionError, match="no live models"):
        evolve(fake_redis, evo_settings())


# --------------------------------------------------------------------------- whole generations


@contextlib.contextmanager
def models(url: str, *ids: str, **flags: Any) -> Iterator[dict[str, ModelWorker]]:
    """Real model workers, each polling in a thread on its own connection (``flags``: settings of
    the models whose IDs start with ``n``)."""
    workers, stop, errors = {}, threading.Event(), []
    for i, cid in enumerate(ids):
        settings = ModelSettings(
            _cli_parse_args=False,
            redis_url=url,
            component_id=cid,
            seed=i,
            block_ms=20,
            n_steps=2,
            lease_ttl=3.0,
            **(flags if cid.startswith("n") else {}),
        )
        workers[cid] = ModelWorker(settings, redis.Redis.from_url(url))
        workers[cid].start()

    def serve(worker: ModelWorker) -> None:
        try:
            while not stop.is_set():
                worker.poll()
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(w,), daemon=True) for w in workers.values()]
    for thread in threads:
        thread.start()
    try:
        yield workers
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
        for worker in workers.values():
            worker.shutdown()
    assert not errors, errors


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("sigma", [0.0, 0.05])
def test_pbt_generation_over_real_workers(real_redis, redis_server_url, sigma: float) -> None:
    with models(redis_server_url, "m1", "m2", "m3") as workers:
        before = {cid: weights_as_vector(w.policy) for cid, w in workers.items()}
        real_redis.hset("rl:contribution", mapping={"m1": 10, "m2": 5, "m3": 1})
        settings = evo_settings(redis_server_url, fitness="contribution", pbt_quantile=0.34, pbt_sigma=sigma)
        report = evolve(real_redis, settings)

        assert report.generation == 1 and report.missing == [] and report.unacknowledged == []
        assert report.fitness == {"m1": 10.0, "m2": 5.0, "m3": 1.0} and not real_redis.exists(
            "rl:contribution"
        )
        assert report.acknowledged == ["m1", "m2", "m3"]
        replies = [m for _, m in read(real_redis, "rl:weights") if "WEIGHTS" in m]
        assert sorted(m["COMPONENT_ID"] for m in replies) == ["m1", "m2", "m3"]  # GET reached every model
        for m in replies:
            np.testing.assert_array_equal(np.float32(m["WEIGHTS"]), before[m["COMPONENT_ID"]])
        after = {cid: weights_as_vector(w.policy) for cid, w in workers.items()}
        np.testing.assert_array_equal(after["m1"], before["m1"])
        np.testing.assert_array_equal(after["m2"], before["m2"])
        assert not np.array_equal(before["m3"], before["m1"])
        if sigma:
            noise = after["m3"] - before["m1"]
            assert 0.5 * sigma < noise.std() < 1.5 * sigma
        else:
            np.testing.assert_array_equal(after["m3"], before["m1"])

        # every model resumed: not paused, and training goes on
        assert not any(w.learner.paused() for w in workers.values())
        for t in range(6):
            xadd(
                real_redis,
                "rl:observation",
                {"OBSERVATION": OBS, **({"REWARD": 1.0, "ACTION": t % 2} if t else {})},
            )
        wait_for(lambda: all(w.counters.segments >= 2 and w.counters.updates >= 1 for w in workers.values()))
        assert all(w.counters.discarded == 0 for w in workers.values())


def test_ga_generation_on_returns_keeps_the_elite(real_redis, redis_server_url) -> None:
    with models(redis_server_url, "m1", "m2", "m3") as workers:
        before = {cid: weights_as_vector(w.policy) for cid, w in workers.items()}
        settings = evo_settings(redis_server_url, algorithm="ga", fitness_episodes=3, elitism=1, mutpb=1.0)
        report = evolve(real_redis, settings)
        assert report.acknowledged == ["m1", "m2", "m3"] and report.generation == 1
        assert all(1 <= f <= 500 for f in report.fitness.values())
        elite = max(report.fitness, key=report.fitness.get)
        assert report.actions[elite] == "elite, kept"
        for cid, worker in workers.items():
            after = weights_as_vector(worker.policy)
            assert after.shape == before[cid].shape and np.isfinite(after).all()
            assert np.array_equal(after, before[cid]) == (cid == elite)
        assert evolve(real_redis, settings).generation == 2


def test_a_silent_model_does_not_stall_the_generation(real_redis, redis_server_url, capsys) -> None:
    with models(redis_server_url, "m1", "m2"):
        real_redis.zadd("rl:models", {"ghost": time.time()})  # registered, but nobody serves it
        started = time.monotonic()
        report = evolve(real_redis, evo_settings(redis_server_url, fitness="contribution", timeout=1.0))
        assert 1.0 <= time.monotonic() - started < 4.0
        assert report.missing == ["ghost"] and report.acknowledged == ["m1", "m2"]
        real_redis.zadd("rl:models", {"ghost": time.time()})
        assert run(evo_settings(redis_server_url, fitness="contribution", timeout=0.5)) == 1
        assert "missing (no weights within the timeout): ghost" in capsys.readouterr().out
        real_redis.zrem("rl:models", "ghost")
        assert run(evo_settings(redis_server_url, fitness="contribution")) == 0
        assert "generation 3 (pbt)" in capsys.readouterr().out
    assert run(evo_settings(redis_server_url)) == 1  # the workers left the registry
    assert "no live models" in capsys.readouterr().err


def test_a_failed_generation_resumes_every_model_unchanged(real_redis, redis_server_url) -> None:
    with models(redis_server_url, "m1", "m2") as workers:
        before = {cid: weights_as_vector(w.policy) for cid, w in workers.items()}
        wrong_arch = evo_settings(redis_server_url, net_arch={"pi": [8], "vf": [8]})  # fitness=returns fails
        with pytest.raises(EvolutionError, match="weights, the policy of these A2C flags"):
            evolve(real_redis, wrong_arch)
        acks = sorted(m["COMPONENT_ID"] for _, m in read(real_redis, "rl:weights") if m.get("ACK") == "SET")
        assert acks == ["m1", "m2"]  # the SET of their own weights was acknowledged before the error
        assert not any(w.learner.paused() for w in workers.values())
        for cid, worker in workers.items():
            np.testing.assert_array_equal(weights_as_vector(worker.policy), before[cid])


# --------------------------------------------------------------------------- interrupted generations


def commands(client: redis.Redis) -> list[str]:
    return [m["CMD"] for _, m in read(client, "rl:evolution")]


def test_a_generation_interrupted_after_its_get_is_finished_by_the_next_evolution(
    real_redis, redis_server_url
) -> None:
    """The evolution died after its GET: the next one reads the replies back, decides with the
    generation's own seed (drawn for it: no --seed here), sends the one SET and resumes everyone."""
    with models(redis_server_url, "m1", "m2", "m3") as workers:
        before = {cid: weights_as_vector(w.policy) for cid, w in workers.items()}
        real_redis.hset("rl:contribution", mapping={"m1": 10, "m2": 5, "m3": 1})
        settings = evo_settings(
            redis_server_url, fitness="contribution", pbt_quantile=0.34, pbt_sigma=0.05, seed=None
        )
        begun = request_weights(real_redis, Streams("rl"), settings)  # ... and then it was killed
        wait_for(lambda: all(w.learner.paused() for w in workers.values()))

        report = evolve(real_redis, settings)
        assert report.resumed and report.generation == begun.number == 1
        assert report.fitness == {"m1": 10.0, "m2": 5.0, "m3": 1.0} and report.missing == []
        assert report.acknowledged == ["m1", "m2", "m3"] and report.unacknowledged == []
        assert commands(real_redis) == ["GET", "SET"]
        assert not any(w.learner.paused() for w in workers.values())
        assert not real_redis.exists(generation_key(Streams("rl")))
        # Same seed, same replies: the SET is what the first attempt would have sent.
        expected, _ = pbt_step(before, report.fitness, settings, np.random.default_rng([begun.seed, 1]))
        for cid, worker in workers.items():
            np.testing.assert_array_equal(weights_as_vector(worker.policy), expected[cid])
        assert not np.array_equal(expected["m3"], before["m3"])
        assert evolve(real_redis, settings).generation == 2  # the next one is a new generation


def test_a_generation_interrupted_after_its_set_only_waits_for_the_acks(real_redis, redis_server_url) -> None:
    with models(redis_server_url, "m1", "m2") as workers:
        settings = evo_settings(redis_server_url, fitness="contribution", pbt_sigma=0.0)
        streams = Streams("rl")
        generation = request_weights(real_redis, streams, settings)
        decide(real_redis, streams, generation, settings)  # the SET went out; killed before the acks
        assert generation.outcome is not None
        sent = generation.set_id
        wait_for(lambda: not any(w.learner.paused() for w in workers.values()))

        report = evolve(real_redis, settings)
        assert report.resumed and report.generation == 1 and report.acknowledged == ["m1", "m2"]
        assert (report.fitness, report.actions) == (
            generation.outcome["fitness"],
            generation.outcome["actions"],
        )
        assert commands(real_redis) == ["GET", "SET"]  # no second SET
        acks = [m for _, m in read(real_redis, "rl:weights") if m.get("ACK") == "SET"]
        assert {m["REQUEST_ID"] for m in acks} == {sent} and len(acks) == 2

        # redis-py resending the SET's script (its reply lost) gets the same ID and sends nothing.
        following = request_weights(real_redis, streams, settings)
        decide(real_redis, streams, following, settings)
        set_id = following.set_id
        send_weights(real_redis, streams, following, {}, {}, settings)
        assert following.set_id == set_id != sent
        assert commands(real_redis) == ["GET", "SET", "GET", "SET"]


def test_a_generation_older_than_the_models_pause_is_not_resumed(real_redis, redis_server_url) -> None:
    """Its models trained on after their own timeout: a new generation begins instead."""
    with models(redis_server_url, "m1", "m2") as workers:
        settings = evo_settings(redis_server_url, fitness="contribution", evolution_timeout=0.2)
        request_weights(real_redis, Streams("rl"), settings)  # ... and killed
        wait_for(lambda: not real_redis.exists(generation_key(Streams("rl"))))
        report = evolve(real_redis, settings)
        assert not report.resumed and report.generation == 2
        assert commands(real_redis) == ["GET", "GET", "SET"]
        assert not any(w.learner.paused() for w in workers.values())


def test_a_generation_that_outlived_the_models_pause_sends_no_set(real_redis, redis_server_url) -> None:
    """Its models train on once their pause is over: a late SET would overwrite what they learned."""
    with models(redis_server_url, "m1", "m2"):
        settings = evo_settings(redis_server_url, fitness="contribution", evolution_timeout=0.2)
        generation = request_weights(real_redis, Streams("rl"), settings)
        wait_for(lambda: not real_redis.exists(generation_key(Streams("rl"))))
        with pytest.raises(EvolutionError, match="outlived the models' pause"):
            decide(real_redis, Streams("rl"), generation, settings)
        assert commands(real_redis) == ["GET"]


def test_control_rides_a_generation_through_an_outage(real_redis, redis_server_url) -> None:
    """Redis refuses the SET's script (out of memory): control's next attempt resumes the generation
    instead of failing the training, and it still sends one GET and one SET."""
    from worker.control.train import evolve_through_outages

    with models(redis_server_url, "m1", "m2") as workers:
        settings = evo_settings(redis_server_url, fitness="contribution")
        client = redis.Redis.from_url(redis_server_url)
        execute, refused = client.execute_command, []

        def refuse_the_set(*args: Any, **options: Any) -> Any:
            is_set = args[0] == "EVALSHA" and b"SET" in b"".join(a for a in args if isinstance(a, bytes))
            if is_set and not refused:
                refused.append(args[1])
                raise redis.exceptions.OutOfMemoryError("command not allowed when used memory")
            return execute(*args, **options)

        client.execute_command = refuse_the_set  # type: ignore[method-assign]
        evolve_through_outages(client, settings)
        assert refused and commands(real_redis) == ["GET", "SET"]
        assert not any(w.learner.paused() for w in workers.values())
        assert not real_redis.exists(generation_key(Streams("rl")))
