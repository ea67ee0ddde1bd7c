"""Clients of one model, through the wire: repeated steps are not learned twice, the model's inbox is
answered with actions, and the weights a local client acts with are published in the commit."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import redis
import torch

from tests.helpers import drain, read, xadd
from worker.model.loop import ModelWorker
from worker.model.policy import load_weight_vector, policy_from_spec, weights_as_vector
from worker.model.settings import ModelSettings
from worker.model.store import CommitRefused
from worker.protocol import Spaces

_cartpole = gym.make("CartPole-v1")
CARTPOLE = Spaces(_cartpole.observation_space, _cartpole.action_space)

INBOX = "rl:model:m1:observation"


def obs(t: int) -> list[float]:
    return [0.01 * t, -0.02, 0.03, 0.04 * t]


def step(t: int, env: str = "e", **more) -> dict:
    """Step ``t`` of ``env``: STEP t, and the REWARD and ACTION of step t-1 unless t is 0."""
    return {
        "OBSERVATION": obs(t),
        "ENV_ID": env,
        "STEP": t,
        **({"REWARD": 1.0, "ACTION": 1} if t else {}),
        **more,
    }


def softmax(logits) -> np.ndarray:
    z = np.exp(np.asarray(logits, dtype=np.float64) - max(logits))
    return z / z.sum()


def started(client: redis.Redis, settings: ModelSettings, **update) -> ModelWorker:
    worker = ModelWorker(settings.model_copy(update=update), client)
    worker.start()
    return worker


# --------------------------------------------------------------------------- repeats


@pytest.mark.parametrize("batched", [False, True], ids=["later batch", "same batch"])
def test_a_repeat_of_the_last_step_is_answered_alike_and_not_learned(real_redis, settings, batched) -> None:
    """A client that lost its answer sends the step again: the same distribution comes back, the
    memory and the counters of learning stay as they were. With ``n_steps`` 1 each step trains, so the
    original is answered after an update; its repeat (here with another OBSERVATION, as a second
    XADD by mistake might carry) neither trains nor moves the memory the update refreshed."""
    worker = started(real_redis, settings, n_steps=1)
    xadd(real_redis, "rl:observation", step(0))
    drain(worker)
    xadd(real_redis, "rl:observation", step(1))
    if not batched:
        drain(worker)
        before = (worker.memories["e"].pack(), worker.counters.transitions, worker.counters.updates)
    xadd(real_redis, "rl:observation", {**step(1), "OBSERVATION": obs(7)})
    drain(worker)

    original, repeat = (reply for _, reply in read(real_redis, "rl:logits")[1:])
    assert original["STEP"] == repeat["STEP"] == 1
    np.testing.assert_allclose(softmax(repeat["LOGITS"]), softmax(original["LOGITS"]), rtol=1e-5)
    c = worker.counters
    assert (c.transitions, c.updates, c.repeats, c.observations) == (1, 1, 1, 3)
    memory = worker.memories["e"]
    assert memory.step == 1
    np.testing.assert_array_equal(memory.obs, np.array(obs(1), dtype=np.float32))
    params, _ = worker.learner.evaluate(np.array([obs(1)], dtype=np.float32))
    np.testing.assert_allclose(memory.params, params[0], rtol=1e-5)  # refreshed by the original
    if not batched:
        assert (memory.pack(), c.transitions, c.updates) == before
    assert worker.store.load().memory["e"] == memory.pack()  # as committed


def test_a_repeat_of_an_older_step_gets_fresh_logits_and_changes_nothing(real_redis, settings) -> None:
    worker = started(real_redis, settings)
    for t in range(4):
        xadd(real_redis, "rl:observation", step(t))
    drain(worker)
    memory, transitions = worker.memories["e"].pack(), worker.counters.transitions
    xadd(real_redis, "rl:observation", step(2))
    xadd(real_redis, "rl:observation", step(3, OBSERVATION=obs(9)))  # the last step, resent
    drain(worker)
    assert worker.memories["e"].pack() == memory and worker.counters.transitions == transitions == 3
    assert worker.counters.repeats == 2
    replies = [reply for _, reply in read(real_redis, "rl:logits")]
    logits, _ = worker.learner.evaluate(np.array([obs(2)], dtype=np.float32))
    np.testing.assert_allclose(replies[4]["LOGITS"], logits[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(softmax(replies[5]["LOGITS"]), softmax(replies[3]["LOGITS"]), rtol=1e-5)


def test_a_step_without_reward_starts_the_chain_again_and_its_step(real_redis, settings) -> None:
    worker = started(real_redis, settings)
    for t in range(4):
        xadd(real_redis, "rl:observation", step(t))
    xadd(real_redis, "rl:observation", step(0))  # the environment restarted: never a repeat
    drain(worker)
    assert worker.memories["e"].step == 0 and worker.counters.repeats == 0
    assert worker.counters.dropped == 3  # the chain is broken
    xadd(real_redis, "rl:observation", step(1))  # not a repeat of the step 1 before the restart
    drain(worker)
    assert worker.counters.transitions == 4 and worker.memories["e"].step == 1
    xadd(real_redis, "rl:observation", {"OBSERVATION": obs(0), "ENV_ID": "e"})  # without STEP
    xadd(real_redis, "rl:observation", step(1))  # then nothing is a repeat
    drain(worker)
    assert worker.counters.transitions == 5 and worker.counters.repeats == 0


def test_a_step_too_large_to_remember_is_dead_lettered(real_redis, settings) -> None:
    worker = started(real_redis, settings)
    real_redis.xadd("rl:observation", {"OBSERVATION": "[0,0,0,0]", "STEP": str(2**64)})
    xadd(real_redis, "rl:observation", step(0))
    assert drain(worker) == 2
    [(_, letter)] = read(real_redis, "rl:dead")
    assert "STEP must be at most 9223372036854775807" in letter["dead:reason"]
    assert worker.counters.observations == 1 and worker.memories["e"].step == 0


# --------------------------------------------------------------------------- the inbox


def test_an_inbox_observation_is_answered_with_an_action_on_its_reply_stream(real_redis, settings) -> None:
    worker = started(real_redis, settings)
    first = xadd(real_redis, INBOX, {**step(0), "REPLY_TO": "c1"})
    second = xadd(real_redis, INBOX, step(1), "msgpack")  # no REPLY_TO: the shared action stream
    assert drain(worker) == 2
    assert read(real_redis, "rl:logits") == []
    [(_, action)] = read(real_redis, "rl:action:c1")
    assert action["ACTION"] in (0, 1) and action["OBS_ID"] == first and action["STEP"] == 0
    assert (action["ENV_ID"], action["MODELS"], action["DETERMINISTIC"]) == ("e", 1, False)
    [(_, shared)] = read(real_redis, "rl:action")
    assert b"data" in real_redis.xrange("rl:action")[0][1]  # in the encoding of what it answers
    assert shared["OBS_ID"] == second and shared["STEP"] == 1
    assert worker.counters.transitions == 1  # and learned from as any observation
    assert real_redis.xpending(INBOX, "model:m1")["pending"] == 0


def test_a_deterministic_inbox_observation_gets_the_most_likely_action(real_redis, settings) -> None:
    worker = started(real_redis, settings)
    batch = [[0.5 * k, -1.0, 2.0 * (k % 3) - 2, 0.3 * k] for k in range(12)]
    for o in batch:
        xadd(real_redis, INBOX, {"OBSERVATION": o, "DETERMINISTIC": True, "REPLY_TO": "c"})
    drain(worker)
    logits, _ = worker.learner.evaluate(np.array(batch, dtype=np.float32))
    assert [a["ACTION"] for _, a in read(real_redis, "rl:action:c")] == logits.argmax(axis=1).tolist()


def test_sampled_actions_follow_the_policy_and_the_seed(real_redis, settings) -> None:
    """Weights that make action 1 all but certain (by a SET): every sample is 1; and two models of
    one seed sample alike."""
    worker = started(real_redis, settings)
    vector = weights_as_vector(worker.policy).copy()
    bias = [name for name in worker.policy.state_dict()].index("action_net.bias")
    offset = sum(t.numel() for t in list(worker.policy.state_dict().values())[:bias])
    vector[offset : offset + 2] = [-30.0, 30.0]
    xadd(real_redis, "rl:evolution", {"CMD": "SET", "WEIGHTS": {"m1": vector.tolist()}})
    for t in range(20):
        xadd(real_redis, INBOX, {"OBSERVATION": obs(t), "ENV_ID": f"e{t}", "REPLY_TO": "c"})
    drain(worker)
    assert [a["ACTION"] for _, a in read(real_redis, "rl:action:c")] == [1] * 20

    twins = [started(real_redis, settings, component_id=c, prefix=c) for c in ("p", "q")]
    for twin in twins:
        for t in range(20):
            xadd(
                real_redis,
                f"{twin.component_id}:model:{twin.component_id}:observation",
                {"OBSERVATION": obs(t)},
            )
        drain(twin)
    actions = [[a["ACTION"] for _, a in read(real_redis, f"{c}:action")] for c in ("p", "q")]
    assert actions[0] == actions[1] and len(actions[0]) == 20 and 0 < sum(actions[0]) < 20


def test_answer_false_gets_no_reply_but_is_learned_from(real_redis, settings) -> None:
    worker = started(real_redis, settings)
    for t in range(3):
        xadd(real_redis, INBOX, {**step(t), "ANSWER": False, "REPLY_TO": "c"})
        xadd(real_redis, "rl:observation", step(t, env="shared", ANSWER=False))
    drain(worker)
    assert not real_redis.exists("rl:action:c", "rl:action", "rl:logits")
    assert worker.counters.transitions == 4 and worker.counters.observations == 6


def test_another_model_never_sees_an_inbox(real_redis, settings) -> None:
    m1, m2 = started(real_redis, settings), started(real_redis, settings, component_id="m2")
    xadd(real_redis, INBOX, {**step(0), "REPLY_TO": "c"})
    xadd(real_redis, "rl:observation", step(0, env="shared"))
    drain(m1)
    drain(m2)
    assert m1.counters.observations == 2 and m2.counters.observations == 1
    assert [g["name"] for g in real_redis.xinfo_groups(INBOX)] == [b"model:m1"]
    assert len(read(real_redis, "rl:action:c")) == 1 and "e" not in m2.memories


def test_silence_is_measured_on_both_observation_streams(real_redis, settings) -> None:
    worker = started(real_redis, settings, memory_ttl=10.0)
    xadd(real_redis, "rl:observation", step(0, env="quiet"), entry_id="1000-0")
    xadd(real_redis, INBOX, step(0, env="busy"), entry_id="7000-0")
    drain(worker)
    xadd(real_redis, INBOX, step(1, env="busy"), entry_id="14000-0")  # "quiet" silent for 13 s
    drain(worker)
    assert set(worker.memories) == {"busy"} and worker.counters.forgotten == 1


def test_reply_streams_of_clients_expire(real_redis, settings) -> None:
    worker = started(real_redis, settings, reply_ttl=30.0)
    xadd(real_redis, INBOX, {**step(0), "REPLY_TO": "c"})
    xadd(real_redis, INBOX, step(0, env="f"))
    drain(worker)
    assert 29_000 < real_redis.pttl("rl:action:c") <= 30_000
    assert real_redis.pttl("rl:action") == -1  # the shared stream is no client's own


def test_a_reply_to_naming_another_kind_of_key_gets_nothing_and_holds_nothing_up(real_redis, settings):
    worker = started(real_redis, settings)
    real_redis.set("rl:action:bad", "a string")
    xadd(real_redis, INBOX, {**step(0), "REPLY_TO": "bad"})
    xadd(real_redis, INBOX, {**step(0, env="f"), "REPLY_TO": "c"})
    assert drain(worker) == 2
    assert real_redis.get("rl:action:bad") == b"a string" and real_redis.ttl("rl:action:bad") == -1
    assert len(read(real_redis, "rl:action:c")) == 1 and worker.counters.observations == 2
    assert real_redis.xpending(INBOX, "model:m1")["pending"] == 0


# --------------------------------------------------------------------------- published weights


def published_policy(client: redis.Redis, component_id: str = "m1") -> tuple[dict, np.ndarray]:
    """The policy hash, and the weights a local client loads from it into the policy its spec builds."""
    stored = {k.decode(): v for k, v in client.hgetall(f"rl:model:{component_id}:policy").items()}
    assert stored["format"] == b"1"
    policy = policy_from_spec(json.loads(stored["spec"]))
    load_weight_vector(policy, np.frombuffer(stored["weights"], "<f4").copy())
    return stored, weights_as_vector(policy)


def local_logits(spec: bytes, weights: np.ndarray, observation: list[float]) -> np.ndarray:
    """What a local client's copy of the policy answers."""
    policy = policy_from_spec(json.loads(spec))
    load_weight_vector(policy, weights)
    with torch.no_grad():
        features = policy.extract_features(torch.tensor([observation]))
        return policy.action_net(policy.mlp_extractor(features)[0]).numpy()[0]


def test_the_weights_are_published_for_local_clients(real_redis, settings) -> None:
    worker = started(real_redis, settings, n_steps=1, publish_weights_every=2)
    stored, weights = published_policy(real_redis)  # with the first checkpoint
    assert stored["updates"] == b"0" and "seen" not in stored
    np.testing.assert_array_equal(weights, weights_as_vector(worker.policy))
    assert json.loads(stored["spec"])["spaces"] == json.loads(CARTPOLE.to_json())
    logits, _ = worker.learner.evaluate(np.array([obs(3)], dtype=np.float32))
    np.testing.assert_allclose(local_logits(stored["spec"], weights, obs(3)), logits[0], rtol=1e-6)

    ids = [xadd(real_redis, INBOX, {**step(t), "REPLY_TO": "c"}) for t in range(2)]  # one update
    drain(worker)
    stored, weights = published_policy(real_redis)
    assert worker.counters.updates == 1 and stored["updates"] == b"0"  # not yet 2 updates
    assert stored["seen"].decode() == ids[-1]
    assert not np.array_equal(weights, weights_as_vector(worker.policy))
    ids.append(xadd(real_redis, INBOX, {**step(2), "REPLY_TO": "c"}))
    drain(worker)
    stored, weights = published_policy(real_redis)
    assert stored["updates"] == b"2" and stored["seen"].decode() == ids[-1]
    np.testing.assert_array_equal(weights, weights_as_vector(worker.policy))

    xadd(real_redis, "rl:observation", step(3))  # the shared stream moves the weights, not `seen`
    drain(worker)
    assert published_policy(real_redis)[0]["seen"].decode() == ids[-1]
    new = np.full(worker.learner.n_params, 0.01, dtype=np.float32)
    xadd(real_redis, "rl:evolution", {"CMD": "SET", "WEIGHTS": {"m1": new.tolist()}})
    drain(worker)
    stored, weights = published_policy(real_redis)
    np.testing.assert_array_equal(weights, new)  # a SET is published at once
    assert stored["updates"] == b"3"


def test_a_restarted_model_publishes_again_and_never_when_told(real_redis, settings) -> None:
    worker = started(real_redis, settings)
    worker.shutdown()
    real_redis.delete("rl:model:m1:policy")  # say, a model of a version that did not publish
    again = started(real_redis, settings)
    xadd(real_redis, "rl:observation", step(0))
    drain(again)
    np.testing.assert_array_equal(published_policy(real_redis)[1], weights_as_vector(again.policy))

    silent = started(real_redis, settings, component_id="m3", publish_weights_every=0)
    xadd(real_redis, "rl:model:m3:observation", step(0))
    drain(silent)
    assert not real_redis.exists("rl:model:m3:policy") and len(read(real_redis, "rl:action")) == 1


def test_spaces_are_in_the_info_hash(real_redis, settings) -> None:
    started(real_redis, settings)
    assert Spaces.from_json(real_redis.hget("rl:model:m1:info", "spaces")) == CARTPOLE


def test_a_policy_key_of_the_wrong_type_refuses_the_commit(real_redis, settings) -> None:
    worker = started(real_redis, settings)
    real_redis.delete("rl:model:m1:policy")
    real_redis.set("rl:model:m1:policy", "not a hash")
    xadd(real_redis, INBOX, {**step(0), "REPLY_TO": "c"})
    with pytest.raises(CommitRefused, match="WRONGTYPE rl:model:m1:policy is a string"):
        worker.poll()
    assert not real_redis.exists("rl:action:c") and real_redis.xpending(INBOX, "model:m1")["pending"] == 1
