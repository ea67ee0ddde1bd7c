"""A worker process killed with SIGKILL mid-stream and restarted with the same component ID loses
nothing and does nothing twice; SIGTERM drains and exits cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import redis

from tests.helpers import drain, read
from worker.common.connections import ensure_group
from worker.model.loop import ModelWorker
from worker.model.policy import make_policy, unpack_state, weights_as_vector
from worker.model.store import ModelStore
from worker.protocol import Encoding, Streams, encode_entry

pytestmark = pytest.mark.slow

K, ROUNDS, N_STEPS = 8, 250, 5


def episode_messages(seed: int) -> list[list[dict]]:
    """ROUNDS rounds of K environments, with episode ends and time-limit truncations."""
    rng = np.random.default_rng(seed)
    rounds = []
    for t in range(ROUNDS):
        batch = []
        for k in range(K):
            message = {"OBSERVATION": rng.normal(0, 0.5, 4).tolist(), "ENV_ID": f"env-{k}"}
            if t:
                message |= {"REWARD": 1.0, "ACTION": int(rng.integers(2))}
                u = rng.random()
                if u < 0.05:
                    message["DONE"] = True
                elif u < 0.08:
                    message |= {"TRUNCATED": True, "TERMINAL_OBSERVATION": rng.normal(0, 0.5, 4).tolist()}
            batch.append(message)
        rounds.append(batch)
    return rounds


def publish(client: redis.Redis, prefix: str, rounds: list[list[dict]]) -> list[str]:
    ids = []
    with client.pipeline(transaction=False) as pipe:
        for batch in rounds:
            for message in batch:
                pipe.xadd(f"{prefix}:observation", encode_entry(message, Encoding.MSGPACK))
        ids = [i.decode() for i in pipe.execute()]
    return ids


def start_worker(url: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": url, "COMPONENT_ID": "m1", "STREAM_PREFIX": "rl"}
    args = [
        sys.executable,
        "-m",
        "worker",
        "model",
        "--seed",
        "0",
        "--batch-size",
        str(K),
        "--lease-ttl",
        "0.6",
        "--n-steps",
        str(N_STEPS),
        *extra,
    ]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_sigkill_mid_stream_loses_and_duplicates_nothing(real_redis, redis_server_url, settings):
    rounds = episode_messages(seed=7)
    total = K * ROUNDS
    ensure_group(real_redis, "rl:observation", "model:m1")  # the group starts at '$': create it first
    ids = publish(real_redis, "rl", rounds)

    answered = lambda: real_redis.xlen("rl:logits")  # noqa: E731
    killed_at = []
    for threshold in (150, 600, 1000, 1400, 1800):
        proc = start_worker(redis_server_url)
        wait_for(lambda t=threshold, p=proc: answered() >= t or p.poll() is not None, 120, "progress")
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
        killed_at.append(answered())
    assert sum(n < total for n in killed_at) >= 4, f"kills did not land mid-stream: {killed_at}"

    proc = start_worker(redis_server_url)
    wait_for(
        lambda: answered() >= total and real_redis.xpending("rl:observation", "model:m1")["pending"] == 0,
        120,
        "the rest of the stream",
    )
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output

    # Every observation answered exactly once.
    replies = read(real_redis, "rl:logits")
    assert sorted(r["OBS_ID"] for _, r in replies) == sorted(ids)

    # Counters, committed with the state they count, are exactly what the input implies.
    snapshot = ModelStore(real_redis, Streams("rl"), "m1").load()
    counters = snapshot.counters
    segments_per_env = (ROUNDS - 1) // N_STEPS
    assert counters.observations == total
    assert counters.transitions == K * (ROUNDS - 1)
    assert counters.segments == K * segments_per_env
    assert counters.updates == segments_per_env  # one update per round that completed segments
    assert counters.dead == 0 and counters.dropped == 0

    # And the result equals an uninterrupted run over the same entries.
    ref_settings = settings.model_copy(update={"prefix": "ref", "batch_size": K, "n_steps": N_STEPS})
    reference = ModelWorker(ref_settings, real_redis)
    reference.start()
    publish(real_redis, "ref", rounds)
    drain(reference)
    assert reference.counters.updates == counters.updates
    final = make_policy(settings)
    final.load_state_dict(unpack_state(snapshot.policy))
    np.testing.assert_allclose(
        weights_as_vector(final), weights_as_vector(reference.policy), rtol=1e-4, atol=1e-5
    )
    ref_logits = [r["LOGITS"] for _, r in read(real_redis, "ref:logits")]
    by_id = {r["OBS_ID"]: r["LOGITS"] for _, r in replies}
    np.testing.assert_allclose([by_id[i] for i in ids], ref_logits, rtol=1e-4, atol=1e-5)


def test_sigterm_drains_checkpoints_and_releases(real_redis, redis_server_url):
    ensure_group(real_redis, "rl:observation", "model:m1")
    rounds = episode_messages(seed=3)[:40]
    publish(real_redis, "rl", rounds)
    proc = start_worker(redis_server_url)
    wait_for(lambda: real_redis.xlen("rl:logits") >= 40, 60, "some progress")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "stopped" in output
    assert real_redis.get("rl:model:m1:lease") is None  # a successor can start at once
    assert real_redis.zscore("rl:models", "m1") is None
    pending = real_redis.xpending("rl:observation", "model:m1")["pending"]
    answered = real_redis.xlen("rl:logits")
    counters = ModelStore(real_redis, Streams("rl"), "m1").load().counters
    assert counters.observations == answered  # what was answered is exactly what was committed
    assert pending == 0
