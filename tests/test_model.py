"""The model worker through the wire protocol: logits, many environments, GET/SET, resume."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from tests.helpers import drain, read, xadd
from worker.model.loop import ModelWorker
from worker.model.memory import MEMORY_FORMAT, EnvMemory, Segment, Transition
from worker.model.policy import make_policy, weights_as_vector
from worker.model.settings import ModelSettings

OBS = [0.01, -0.02, 0.03, 0.04]


def numpy_forward(vector: np.ndarray, settings: ModelSettings, obs: np.ndarray) -> np.ndarray:
    """Action logits of a flat weight vector, by hand: tanh MLP then the action head.

    Independent of the worker's code path: only the layout (state_dict order and shapes) comes
    from a fresh policy.
    """
    shapes = {name: tuple(t.shape) for name, t in make_policy(settings).state_dict().items()}
    params, start = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        params[name] = vector[start : start + size].reshape(shape)
        start += size
    assert start == len(vector)
    h = obs
    for i in range(len(settings.net_arch["pi"])):
        h = np.tanh(
            h @ params[f"mlp_extractor.policy_net.{2 * i}.weight"].T
            + params[f"mlp_extractor.policy_net.{2 * i}.bias"]
        )
    return h @ params["action_net.weight"].T + params["action_net.bias"]


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_logits_for_each_encoding(any_redis, settings: ModelSettings, encoding: str) -> None:
    worker = ModelWorker(settings, any_redis)
    worker.start()
    obs_id = xadd(
        any_redis, "rl:observation", {"OBSERVATION": OBS, "ENV_ID": "e1", "DETERMINISTIC": True}, encoding
    )
    assert drain(worker) == 1

    [(_, reply)] = read(any_redis, "rl:logits")
    raw = any_redis.xrange("rl:logits")[0][1]
    assert (b"data" in raw) == (encoding == "msgpack")  # a reply uses the encoding it answers
    assert reply["OBS_ID"] == obs_id and reply["ENV_ID"] == "e1" and reply["COMPONENT_ID"] == "m1"
    assert reply["DETERMINISTIC"] is True
    expected = numpy_forward(weights_as_vector(worker.policy), settings, np.array(OBS, dtype=np.float32))
    np.testing.assert_allclose(reply["LOGITS"], expected, rtol=1e-5, atol=1e-6)
    assert any_redis.xpending("rl:observation", "model:m1")["pending"] == 0


def test_plain_fields_as_redis_cli_sends_them(real_redis, settings: ModelSettings) -> None:
    """``redis-cli XADD rl:observation '*' OBSERVATION '[...]' ENV_ID cart-1``: no JSON quotes needed."""
    worker = ModelWorker(settings, real_redis)
    worker.start()
    real_redis.xadd("rl:observation", {"OBSERVATION": "[0.01,0.02,0.03,0.04]", "ENV_ID": "cart-1"})
    real_redis.xadd(
        "rl:observation",
        {
            "OBSERVATION": "[0.01,0.02,0.03,0.05]",
            "ENV_ID": "cart-1",
            "REWARD": "1",
            "ACTION": "0",
            "DONE": "false",
        },
    )
    drain(worker)
    replies = read(real_redis, "rl:logits")
    assert [r["ENV_ID"] for _, r in replies] == ["cart-1", "cart-1"]
    assert worker.counters.transitions == 1


def test_many_environments_interleaved_train_on_their_own_transitions(real_redis, settings: ModelSettings):
    """Four environments share one stream; each segment holds only its own environment's steps."""
    settings = settings.model_copy(update={"n_steps": 3, "batch_size": 1000})
    worker = ModelWorker(settings, real_redis)
    worker.start()
    envs = [f"env-{i}" for i in range(4)]
    for t in range(7):  # 7 observations -> 6 transitions -> 2 segments per environment
        for k, env in enumerate(envs):
            # the observation encodes (environment, step) so we can trace it into the buffer
            message = {"OBSERVATION": [k, t, 0.0, 0.0], "ENV_ID": env}
            if t:
                message |= {"REWARD": float(10 * k + t), "ACTION": (k + t) % 2}
            xadd(real_redis, "rl:observation", message)
    drain(worker)

    assert worker.counters.transitions == 4 * 6
    assert worker.counters.segments == 8 and worker.counters.updates == 1  # one update for the batch
    buffer = worker.last_buffer
    # after get() SB3 flattens env-major: rows [col * n_steps + t]
    obs = buffer.observations.reshape(8, 3, 4)
    rewards = buffer.rewards.T  # get() leaves rewards unflattened: (n_steps, n_envs)
    actions = buffer.actions.reshape(8, 3)
    seen = set()
    for col in range(8):
        k = int(obs[col, 0, 0])
        steps = obs[col, :, 1].astype(int)
        assert (obs[col, :, 0] == k).all(), "a segment mixes environments"
        assert list(steps) == list(range(steps[0], steps[0] + 3)), "a segment is not consecutive"
        np.testing.assert_array_equal(rewards[col], 10 * k + steps + 1)  # reward of step t arrives at t+1
        np.testing.assert_array_equal(actions[col], (k + steps + 1) % 2)
        seen.add((k, int(steps[0])))
    assert seen == {(k, s) for k in range(4) for s in (0, 3)}
    assert len(read(real_redis, "rl:logits")) == 28


def test_get_and_set_round_trip(any_redis, settings: ModelSettings) -> None:
    worker = ModelWorker(settings, any_redis)
    worker.start()
    before = weights_as_vector(worker.policy)

    get_id = xadd(any_redis, "rl:evolution", {"CMD": "GET"})
    drain(worker)
    [(_, reply)] = read(any_redis, "rl:weights")
    assert reply["COMPONENT_ID"] == "m1" and reply["REQUEST_ID"] == get_id
    np.testing.assert_array_equal(np.array(reply["WEIGHTS"], dtype=np.float32), before)
    assert worker.learner.paused()

    new = np.random.default_rng(1).normal(0, 0.5, size=len(before)).astype(np.float32)
    set_id = xadd(
        any_redis, "rl:evolution", {"CMD": "SET", "WEIGHTS": {"m1": new.tolist(), "other": [1.0]}}, "msgpack"
    )
    obs_id = xadd(any_redis, "rl:observation", {"OBSERVATION": OBS})
    drain(worker)

    ack = read(any_redis, "rl:weights")[-1][1]
    assert ack == {"ACK": "SET", "COMPONENT_ID": "m1", "REQUEST_ID": set_id}
    assert not worker.learner.paused()
    np.testing.assert_array_equal(weights_as_vector(worker.policy), new)
    [(_, logits)] = read(any_redis, "rl:logits")
    assert logits["OBS_ID"] == obs_id
    expected = numpy_forward(new, settings, np.array(OBS, dtype=np.float32))
    np.testing.assert_allclose(logits["LOGITS"], expected, rtol=1e-5, atol=1e-6)


def test_training_paused_after_get_resumes_after_timeout(real_redis, settings: ModelSettings) -> None:
    settings = settings.model_copy(update={"n_steps": 2, "evolution_timeout": 0.3})
    worker = ModelWorker(settings, real_redis)
    worker.start()

    def steps(n: int) -> None:
        for t in range(n):
            xadd(real_redis, "rl:observation", {"OBSERVATION": OBS, "REWARD": 1.0, "ACTION": t % 2})
        drain(worker)

    xadd(real_redis, "rl:observation", {"OBSERVATION": OBS})
    xadd(real_redis, "rl:evolution", {"CMD": "GET"})
    steps(4)
    assert worker.counters.updates == 0 and worker.counters.discarded == 2
    frozen = weights_as_vector(worker.policy)
    import time

    time.sleep(0.35)
    steps(2)
    assert worker.counters.updates == 1
    assert not np.array_equal(weights_as_vector(worker.policy), frozen)


def test_restart_resumes_from_redis(real_redis, settings: ModelSettings) -> None:
    """A new worker with the same component ID continues the same memory, weights and optimizer."""
    settings = settings.model_copy(update={"n_steps": 2})
    first = ModelWorker(settings, real_redis)
    first.start()
    for t in range(3):
        xadd(
            real_redis,
            "rl:observation",
            {"OBSERVATION": [t, 0, 0, 0], **({"REWARD": 1.0, "ACTION": 1} if t else {})},
        )
    drain(first)
    first.shutdown()
    assert first.counters.updates == 1

    second = ModelWorker(settings.model_copy(update={"seed": 123}), real_redis)  # seed must not matter
    second.start()
    np.testing.assert_array_equal(weights_as_vector(second.policy), weights_as_vector(first.policy))
    for a, b in zip(
        first.policy.optimizer.state_dict()["state"].values(),
        second.policy.optimizer.state_dict()["state"].values(),
        strict=True,
    ):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert second.counters == first.counters
    np.testing.assert_array_equal(second.memories["default"].obs, [2, 0, 0, 0])
    xadd(real_redis, "rl:observation", {"OBSERVATION": [3, 0, 0, 0], "REWARD": 1.0, "ACTION": 0})
    drain(second)
    assert second.counters.transitions == 3 and len(second.memories["default"].rollout) == 1


def test_silent_environments_are_forgotten(real_redis, settings: ModelSettings) -> None:
    """An environment silent for ``memory_ttl`` seconds of stream time (entry IDs) leaves the model's
    memory, in Redis too, with its unfinished rollout; if it comes back, it starts a new chain."""
    settings = settings.model_copy(update={"memory_ttl": 10.0})
    worker = ModelWorker(settings, real_redis)
    worker.start()

    def publish(env: str, ms: int, t: int) -> None:
        step = {"REWARD": 1.0, "ACTION": 0} if t else {}
        xadd(real_redis, "rl:observation", {"OBSERVATION": OBS, "ENV_ID": env, **step}, entry_id=f"{ms}-0")

    for t, ms in enumerate((1_000, 2_000, 3_000)):
        publish("gone", ms, t)
    publish("stays", 3_001, 0)
    drain(worker)
    assert set(real_redis.hkeys("rl:model:m1:memory")) == {b"gone", b"stays"}

    publish("stays", 12_000, 1)  # 9 s after "gone" was last heard of: not yet
    drain(worker)
    assert "gone" in worker.memories and worker.counters.forgotten == 0
    publish("stays", 16_000, 2)  # 13 s after (the model looks every quarter of the TTL)
    drain(worker)
    assert set(worker.memories) == {"stays"}
    assert real_redis.hkeys("rl:model:m1:memory") == [b"stays"]
    assert worker.counters.forgotten == 1 and worker.counters.dropped == 2  # its 2 unfinished transitions
    worker.shutdown()

    again = ModelWorker(settings, real_redis)  # the forgetting was committed: a successor agrees
    again.start()
    assert set(again.memories) == {"stays"} and again.counters == worker.counters
    assert real_redis.hget("rl:model:m1:info", "envs") == b"1"  # as the heartbeat tells it
    transitions = again.counters.transitions
    publish("gone", 17_000, 3)  # back, with the REWARD of an action the model no longer remembers
    drain(again)
    assert [r["ENV_ID"] for _, r in read(real_redis, "rl:logits")][-1] == "gone"  # answered
    assert again.counters.transitions == transitions and again.memories["gone"].rollout == []


# Entry-ID milliseconds of one input, three environments, memory_ttl 10 s: "a" pauses 11 s and comes
# back with a REWARD (which must be ignored), "c" falls silent for good, "b" never pauses.
FORGETTING_INPUT = sorted(
    [("a", 1_000, False), ("a", 2_000, True), ("a", 3_000, True)]
    + [("a", ms, True) for ms in range(14_000, 30_000, 1_000)]
    + [("b", 1_500, False)]
    + [("b", ms, True) for ms in range(2_500, 30_000, 1_000)]
    + [("c", 5_000, False), ("c", 6_000, True)],
    key=lambda step: step[1],
)


def forgetting_history(client, settings: ModelSettings, prefix: str, mode: str) -> tuple:
    """Feed FORGETTING_INPUT to a model, batched as ``mode`` says; what it learned and remembers."""
    settings = settings.model_copy(update={"memory_ttl": 10.0, "prefix": prefix})
    worker = ModelWorker(settings.model_copy(update={"batch_size": 4 if mode == "restart" else 256}), client)
    worker.start()
    for k, (env, ms, rewarded) in enumerate(FORGETTING_INPUT):
        step = {"REWARD": 1.0, "ACTION": 0} if rewarded else {}
        message = {"OBSERVATION": OBS, "ENV_ID": env, **step}
        xadd(client, f"{prefix}:observation", message, entry_id=f"{ms}-0")
        if mode == "one by one":
            drain(worker)
        elif mode == "restart" and k == len(FORGETTING_INPUT) // 2:
            drain(worker)
            worker.shutdown()
            worker = ModelWorker(worker.settings, client)
            worker.start()
    drain(worker)
    c = worker.counters
    memories = {env: (m.seen_ms, len(m.rollout)) for env, m in worker.memories.items()}
    stored = sorted(client.hkeys(f"{prefix}:model:m1:memory"))
    return (c.observations, c.transitions, c.segments, c.dropped, c.forgotten), memories, stored


def test_forgetting_depends_on_the_input_only(real_redis, settings: ModelSettings) -> None:
    """Whether a memory is too old is decided by the entry IDs alone: the same input, read one entry
    at a time, all at once, or in batches of 4 across a restart, leaves the same learning."""
    histories = [
        forgetting_history(real_redis, settings, f"h{k}", mode)
        for k, mode in enumerate(("one by one", "at once", "restart"))
    ]
    assert histories[0] == histories[1] == histories[2]
    counters, memories, stored = histories[0]
    n = len(FORGETTING_INPUT)
    # Every observation but the 3 first ones and a's return at 14 s completes a transition; a's
    # first 2 and c's 1 are dropped with their forgotten environments.
    assert counters == (n, n - 3 - 1, counters[2], 2 + 1, 2)
    assert set(memories) == {"a", "b"} and stored == [b"a", b"b"]


def test_a_memory_round_trips_with_its_format() -> None:
    obs, log_probs = np.array(OBS, "<f4"), np.log(np.full(2, 0.5, "<f4"))
    rollout = [Transition(obs, 1, 1.0, True, 0.4, -0.7)]
    memory = EnvMemory(obs, 0.5, log_probs, False, False, 1234, rollout, step=17)
    memory.ready = [Segment("e", [Transition(obs, 0, 2.0, False, 0.1, -0.2)] * 2, 0.3, True)]
    blob = memory.pack()
    assert msgpack.unpackb(blob)[0] == MEMORY_FORMAT == 4
    back = EnvMemory.unpack(blob)
    assert back.seen_ms == 1234 and back.value == 0.5 and back.rollout[0].log_prob == -0.7
    assert back.step == 17
    np.testing.assert_array_equal(back.rollout[0].obs, obs)
    [ready] = back.ready
    assert len(ready.transitions) == 2 and ready.transitions[1].reward == 2.0
    assert (ready.last_value, ready.last_done) == (0.3, True)
    format_3 = msgpack.unpackb(blob)[:-1]
    format_3[0] = 3  # written before segments waited for --segments-per-update: none ready
    older = EnvMemory.unpack(msgpack.packb(format_3))
    assert older.ready == [] and older.step == 17 and older.rollout[0].log_prob == -0.7


def test_a_memory_of_format_1_still_loads(real_redis, settings: ModelSettings) -> None:
    """Written before STEP existed: its last step is unknown, so the next one is never a repeat."""
    obs = np.array(OBS, "<f4")
    row = [1, 1.0, True, 0.4, -0.7]
    old = [1, obs.tobytes(), [4], 0.5, np.log(np.full(2, 0.5, "<f4")).tobytes(), False, False, 1234]
    ModelWorker(settings, real_redis).start()
    real_redis.hset("rl:model:m1:memory", "e", msgpack.packb([*old, obs.tobytes(), [row]]))
    worker = ModelWorker(settings, real_redis)
    worker.start()
    memory = worker.memories["e"]
    assert memory.step is None and memory.seen_ms == 1234 and memory.rollout[0].action == 1
    step = {"OBSERVATION": OBS, "ENV_ID": "e", "REWARD": 1.0, "ACTION": 0, "STEP": 0}
    xadd(real_redis, "rl:observation", step, entry_id="2000-0")  # 0.8 s after its last step
    drain(worker)
    assert worker.counters.transitions == 1 and len(worker.memories["e"].rollout) == 2
    assert worker.memories["e"].step == 0
    assert msgpack.unpackb(real_redis.hget("rl:model:m1:memory", "e"))[0] == 4  # written anew as format 4


def test_a_reward_that_overflows_the_returns_leaves_the_weights_alone(real_redis, settings) -> None:
    """Rewards near float32's limit are valid, but their returns overflow: the update's gradient is
    not finite. One step on it would make every weight NaN for good; the update is skipped instead."""
    worker = ModelWorker(settings, real_redis)
    worker.start()
    before = weights_as_vector(worker.policy).copy()
    for t in range(settings.n_steps + 1):  # one segment: n_steps rewards of 3e38
        step = {"REWARD": 3e38, "ACTION": 0} if t else {}
        xadd(real_redis, "rl:observation", {"OBSERVATION": OBS, "ENV_ID": "e", **step}, "msgpack")
    drain(worker)
    assert worker.counters.skipped == 1 and worker.counters.updates == 0 and worker.counters.dead == 0
    np.testing.assert_array_equal(weights_as_vector(worker.policy), before)
    assert len(read(real_redis, "rl:logits")) == settings.n_steps + 1  # all answered, with finite logits
    assert all(np.isfinite(reply["LOGITS"]).all() for _, reply in read(real_redis, "rl:logits"))
