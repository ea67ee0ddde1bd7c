"""``--segments-per-update``: segments wait, committed with their environments' memories, until
enough are complete for one update (SB3's n_envs columns), however the observations were batched
and across a restart; nothing is lost or trained on twice."""

from __future__ import annotations

import numpy as np

from tests.helpers import drain, xadd
from worker.model.loop import ModelWorker
from worker.model.policy import weights_as_vector
from worker.model.settings import ModelSettings

ENVS = [f"env-{k}" for k in range(4)]


def steps() -> list[dict]:
    """Three observations per environment (two transitions: one segment of n_steps 2), staggered
    as environments that step on their own: env-k starts k observations late."""
    timeline = []
    for tick in range(6):
        for k, env in enumerate(ENVS):
            t = tick - k
            if 0 <= t < 3:
                message = {"OBSERVATION": [k / 4, t / 3, 0.1, -0.1], "ENV_ID": env, "STEP": t}
                timeline.append(message | ({"REWARD": float(k + t), "ACTION": (k + t) % 2} if t else {}))
    return timeline


def test_an_update_waits_for_its_segments_across_batches_and_a_restart(real_redis, settings) -> None:
    settings = settings.model_copy(update={"n_steps": 2, "segments_per_update": 4})
    whole = ModelWorker(settings.model_copy(update={"component_id": "whole", "prefix": "a"}), real_redis)
    whole.start()
    for message in steps():
        xadd(real_redis, "a:observation", message)
    drain(whole)
    assert (whole.counters.segments, whole.counters.updates) == (4, 1)
    assert whole.last_buffer is not None and whole.last_buffer.buffer_size * whole.last_buffer.n_envs == 8

    one_by_one = settings.model_copy(update={"component_id": "staggered", "prefix": "b", "batch_size": 1})
    worker = ModelWorker(one_by_one, real_redis)
    worker.start()
    seen = []
    for n, message in enumerate(steps()):
        if n == 7:  # two segments ready, two to come: a new worker takes over
            assert worker.counters.segments == 0 and sum(len(m.ready) for m in worker.memories.values()) == 2
            worker.shutdown()
            worker = ModelWorker(one_by_one, real_redis)
            worker.start()
            assert sum(len(m.ready) for m in worker.memories.values()) == 2
        xadd(real_redis, "b:observation", message)
        drain(worker)
        seen.append(worker.counters.updates)
    assert seen.index(1) == len(seen) - 1  # the update came with the last segment, not before
    assert (worker.counters.segments, worker.counters.updates, worker.counters.transitions) == (4, 1, 8)
    assert all(not m.ready for m in worker.memories.values())
    np.testing.assert_allclose(weights_as_vector(worker.policy), weights_as_vector(whole.policy), rtol=1e-6)


def test_the_default_trains_on_every_batch_s_segments(real_redis, settings: ModelSettings) -> None:
    worker = ModelWorker(settings.model_copy(update={"n_steps": 2, "batch_size": 1}), real_redis)
    worker.start()
    for message in steps():
        xadd(real_redis, "rl:observation", message)
        drain(worker)
    assert (worker.counters.segments, worker.counters.updates) == (4, 4)  # one per segment


def test_segments_waiting_outlive_their_environment_s_silence(real_redis, settings: ModelSettings) -> None:
    """A segment waiting for others is complete: an environment falling silent past --memory-ttl
    does not take it away, however the observations were batched."""
    settings = settings.model_copy(update={"n_steps": 1, "segments_per_update": 2, "memory_ttl": 1.0})
    timeline = [
        ("1000-0", {"ENV_ID": "a"}),
        ("1001-0", {"ENV_ID": "a", "REWARD": 1.0, "ACTION": 1}),  # a's segment waits; a falls silent
        ("1002-0", {"ENV_ID": "b"}),
        ("2300-0", {"ENV_ID": "c"}),  # a is past the TTL: the sweep runs here, batch by batch
        ("2400-0", {"ENV_ID": "b", "REWARD": 1.0, "ACTION": 0}),  # b is past it too: no transition
        ("2401-0", {"ENV_ID": "c", "REWARD": 1.0, "ACTION": 0}),  # the second segment
    ]
    results = {}
    for batch_size in (256, 1):
        prefix = f"ttl{batch_size}"
        update = {"prefix": prefix, "batch_size": batch_size}
        worker = ModelWorker(settings.model_copy(update=update), real_redis)
        worker.start()
        for entry_id, message in timeline:
            xadd(
                real_redis,
                f"{prefix}:observation",
                {"OBSERVATION": [0.1, 0.2, 0.3, 0.4], **message},
                entry_id=entry_id,
            )
            if batch_size == 1:
                drain(worker)
        drain(worker)
        c = worker.counters
        results[batch_size] = (c.segments, c.updates, c.transitions, weights_as_vector(worker.policy))
    assert results[256][:3] == results[1][:3] == (2, 1, 2)
    np.testing.assert_allclose(results[256][3], results[1][3], atol=1e-7)  # batched apart, rounded apart
