"""Every space stable-baselines3's A2C takes, through a real redis-server: the form of the answers
for each action space (checked against SB3's own distribution), each observation space in both
encodings (binary arrays in msgpack), training, and evolution's GET/SET (normalization statistics
untouched). Crashes and bad entries per space: ``test_space_faults.py``."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
import torch
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    MultiInputActorCriticPolicy,
)

from tests.helpers import drain, read, xadd
from worker.model.loop import ModelWorker
from worker.model.policy import weights_as_vector
from worker.model.settings import ModelSettings

Spec = dict[str, Any]  # a space as JSON, as the ``spaces`` setting takes it

VECTOR: Spec = {"type": "Box", "shape": [3], "dtype": "float32", "low": None, "high": None}
IMAGE: Spec = {"type": "Box", "shape": [36, 36, 3], "dtype": "uint8", "low": 0, "high": 255}
DISCRETE: Spec = {"type": "Discrete", "n": 3}
BOX: Spec = {"type": "Box", "shape": [2], "dtype": "float32", "low": -1, "high": 1}
MULTI_DISCRETE: Spec = {"type": "MultiDiscrete", "nvec": [3, 2, 4]}
MULTI_BINARY: Spec = {"type": "MultiBinary", "n": 3}
DICT: Spec = {
    "type": "Dict",
    "spaces": {
        "pos": VECTOR,
        "cam": IMAGE,
        "mode": {"type": "Discrete", "n": 5},
        "bits": {"type": "MultiBinary", "n": 4},
        "grid": {"type": "MultiDiscrete", "nvec": [3, 4]},
    },
}
ACTIONS: dict[str, tuple[Spec, dict[str, Any]]] = {
    "discrete": (DISCRETE, {}),
    "box": (BOX, {}),
    "box-sde": (BOX, {"use_sde": True}),
    "box-2x2": ({**BOX, "shape": [2, 2]}, {}),  # answered and learned flattened, in C order
    "multidiscrete": (MULTI_DISCRETE, {}),
    "multibinary": (MULTI_BINARY, {}),
}
OBSERVATIONS: dict[str, Spec] = {
    "vector": VECTOR,
    "image": IMAGE,
    "discrete": {"type": "Discrete", "n": 5},
    "multidiscrete": {"type": "MultiDiscrete", "nvec": [3, 4]},
    "multibinary": {"type": "MultiBinary", "n": 4},
    "dict": DICT,
}
BOX_ACTIONS = (-7.5, -0.5, 0.25, 1.5, 5.0)  # exact in float32; most beyond the Box's bounds [-1, 1]
VALUES = ("OBSERVATION", "ACTION", "TERMINAL_OBSERVATION")
# How environment k publishes: (encoding, Box values as binary arrays).
ENCODINGS = (("json", False), ("msgpack", False), ("msgpack", True))
OBSERVATION, LOGITS, EVOLUTION, WEIGHTS, DEAD = (
    "rl:observation",
    "rl:logits",
    "rl:evolution",
    "rl:weights",
    "rl:dead",
)


# --------------------------------------------------------------------------- values and messages


def sample(space: Spec, rng: np.random.Generator) -> Any:
    """A random value of ``space``, as an environment gives it (numpy arrays, ints, dicts)."""
    kind = space["type"]
    if kind == "Dict":
        return {key: sample(sub, rng) for key, sub in space["spaces"].items()}
    if kind == "Discrete":
        return int(rng.integers(space["n"]))
    if kind == "MultiDiscrete":
        return np.array([rng.integers(n) for n in space["nvec"]], np.int64)
    if kind == "MultiBinary":
        return rng.integers(0, 2, space["n"]).astype(np.int8)
    if space["dtype"] == "uint8":
        return rng.integers(0, 256, space["shape"]).astype(np.uint8)
    if np.dtype(space["dtype"]).kind in "iu":
        return rng.integers(space["low"], space["high"] + 1, space["shape"]).astype(space["dtype"])
    return rng.normal(0, 1, space["shape"]).astype(np.float32)


def sample_action(space: Spec, rng: np.random.Generator) -> Any:
    if space["type"] == "Box":  # as SB3 learns from them: sampled, unclipped
        return rng.choice(BOX_ACTIONS, space["shape"]).astype(np.float32)
    return sample(space, rng)


def binary_array(array: np.ndarray, dtype: str | None = None, data: bytes | None = None) -> dict[str, Any]:
    """A msgpack binary array, written here by hand (not by the worker's own encoder)."""
    little = array.astype(array.dtype.newbyteorder("<"))
    return {
        "dtype": dtype or array.dtype.name,
        "shape": list(array.shape),
        "data": little.tobytes() if data is None else data,
    }


def wire(value: Any, binary: bool) -> Any:
    """``value`` as a message carries it: nested lists, or binary arrays (msgpack only)."""
    if isinstance(value, dict):
        return {key: wire(sub, binary) for key, sub in value.items()}
    if isinstance(value, np.ndarray):
        return binary_array(value) if binary else value.tolist()
    return value


def publish(
    client: redis.Redis,
    message: dict[str, Any],
    encoding: str = "msgpack",
    binary: bool = True,
    stream: str = OBSERVATION,
    entry_id: str = "*",
) -> str:
    sent = {key: wire(value, binary) if key in VALUES else value for key, value in message.items()}
    return xadd(client, stream, sent, encoding, entry_id)


def episodes(
    observation: Spec, action: Spec, rounds: int, envs: int, seed: int
) -> list[list[dict[str, Any]]]:
    """``rounds`` rounds of ``envs`` environments, chained by REWARD/ACTION, with episode ends
    and time-limit truncations (their TERMINAL_OBSERVATION of the space too)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(rounds):
        row = []
        for k in range(envs):
            message: dict[str, Any] = {"OBSERVATION": sample(observation, rng), "ENV_ID": f"e{k}"}
            if t:
                message |= {"REWARD": round(float(rng.normal()), 3), "ACTION": sample_action(action, rng)}
                u = rng.random()
                if u < 0.1:
                    message["DONE"] = True
                elif u < 0.2:
                    message |= {"TRUNCATED": True, "TERMINAL_OBSERVATION": sample(observation, rng)}
            row.append(message)
        out.append(row)
    return out


def publish_rounds(client: redis.Redis, rounds: list[list[dict[str, Any]]]) -> dict[str, tuple[str, dict]]:
    """Publish environment k's steps in ``ENCODINGS[k]``; OBS_ID -> (encoding, message)."""
    sent = {}
    for row in rounds:
        for k, message in enumerate(row):
            encoding, binary = ENCODINGS[k % len(ENCODINGS)]
            sent[publish(client, message, encoding, binary)] = (encoding, message)
    return sent


def replies(client: redis.Redis, stream: str = LOGITS) -> dict[str, tuple[str, dict[str, Any]]]:
    """OBS_ID -> (encoding, reply): msgpack in one ``data`` field, or JSON plain fields."""
    out = {}
    for _, fields in client.xrange(stream):
        if b"data" in fields:
            assert set(fields) == {b"data"}
            encoding, message = "msgpack", msgpack.unpackb(fields[b"data"], raw=False)
        else:
            encoding, message = "json", {k.decode(): json.loads(v) for k, v in fields.items()}
        assert message["OBS_ID"] not in out, "answered twice"
        out[message["OBS_ID"]] = (encoding, message)
    return out


# --------------------------------------------------------------------------- workers and checks


def model_settings(settings: ModelSettings, observation: Spec, action: Spec, **update: Any) -> ModelSettings:
    spaces = json.dumps({"observation": observation, "action": action})
    tiny = {"gym_env": "none", "spaces": spaces, "net_arch": {"pi": [8], "vf": [8]}, "n_steps": 2}
    return settings.model_copy(update=tiny | update)


def start(client: redis.Redis, settings: ModelSettings) -> ModelWorker:
    worker = ModelWorker(settings, client)
    worker.start()
    return worker


def log_softmax(logits: Any) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


def close(got: Any, expected: Any) -> None:
    np.testing.assert_allclose(
        np.asarray(got, np.float64), np.asarray(expected, np.float64), rtol=1e-5, atol=1e-6
    )


def check_reply(
    reply: dict[str, Any],
    action: Spec,
    policy: ActorCriticPolicy,
    value: Any,
    env_id: str,
    deterministic: bool = False,
) -> None:
    """``reply`` has the form of ``action``'s family and is SB3's distribution for ``value``."""
    assert reply["COMPONENT_ID"] == "m1" and reply["ENV_ID"] == env_id
    assert reply["DETERMINISTIC"] is deterministic
    keys = {"COMPONENT_ID", "DETERMINISTIC", "ENV_ID", "OBS_ID"}
    with torch.no_grad():
        dist = policy.get_distribution(policy.obs_to_tensor(value)[0]).distribution
    kind = action["type"]
    if kind == "Box":
        d = int(np.prod(action["shape"]))
        assert set(reply) == keys | {"MEAN", "LOG_STD"}
        assert len(reply["MEAN"]) == len(reply["LOG_STD"]) == d
        close(reply["MEAN"], dist.mean[0])
        close(np.exp(reply["LOG_STD"]), dist.stddev[0])
        return
    assert set(reply) == keys | {"LOGITS"}
    logits = reply["LOGITS"]
    if kind == "Discrete":
        assert len(logits) == action["n"] and all(type(x) is float for x in logits)
        close(log_softmax(logits), dist.logits[0])
    elif kind == "MultiDiscrete":
        assert [len(row) for row in logits] == action["nvec"]
        for row, categorical in zip(logits, dist, strict=True):
            close(log_softmax(row), categorical.logits[0])
    else:  # MultiBinary: the pair [0, l] per value, whose softmax is the Bernoulli's
        assert [len(row) for row in logits] == [2] * action["n"] and all(row[0] == 0 for row in logits)
        close([np.exp(log_softmax(row))[1] for row in logits], dist.probs[0])


def learned_actions(worker: ModelWorker) -> list[tuple[float, ...]]:
    assert worker.last_buffer is not None
    actions = worker.last_buffer.actions
    return sorted(tuple(a) for a in actions.reshape(-1, actions.shape[-1]).tolist())


def run_one_batch(
    client: redis.Redis, worker: ModelWorker, observation: Spec, action: Spec, rounds: int = 7
) -> dict[str, tuple[str, dict]]:
    """Publish 3 environments' steps in the three encodings and handle them as one batch: one
    update, after which every reply is computed (so each is SB3's distribution under the final
    weights); check the replies, the training and that the actions were learned as sent."""
    before = weights_as_vector(worker.policy).copy()
    sent = publish_rounds(client, episodes(observation, action, rounds, 3, seed=1))
    assert worker.poll() == len(sent)
    got = replies(client)
    assert set(got) == set(sent) and client.xlen(DEAD) == 0
    for obs_id, (encoding, message) in sent.items():
        reply_encoding, reply = got[obs_id]
        assert reply_encoding == encoding
        check_reply(reply, action, worker.policy, message["OBSERVATION"], message["ENV_ID"])
    counters = worker.counters
    assert counters.transitions == 3 * (rounds - 1) and counters.segments == 3 * (rounds - 1) // 2
    assert counters.updates == 1 and counters.skipped == 0
    after = weights_as_vector(worker.policy)
    assert np.isfinite(after).all() and not np.array_equal(after, before), "the weights did not change"
    sent_actions = [m["ACTION"] for _, m in sent.values() if "ACTION" in m]
    assert learned_actions(worker) == sorted(tuple(np.reshape(a, -1).tolist()) for a in sent_actions)
    return sent


# --------------------------------------------------------------------------- each space


@pytest.mark.parametrize("name", list(ACTIONS))
def test_each_action_space_is_answered_in_its_form_and_learned(real_redis, settings, name: str) -> None:
    action, extra = ACTIONS[name]
    worker = start(real_redis, model_settings(settings, VECTOR, action, **extra))
    run_one_batch(real_redis, worker, VECTOR, action)
    if action["type"] == "Box":  # learned from as sent, not clipped to the bounds
        assert np.abs(worker.last_buffer.actions).max() > 1  # type: ignore[union-attr]


@pytest.mark.parametrize("name", list(OBSERVATIONS))
def test_each_observation_space_is_accepted_in_both_encodings_and_learned(
    real_redis, settings, name: str
) -> None:
    observation = OBSERVATIONS[name]
    worker = start(real_redis, model_settings(settings, observation, DISCRETE))
    expected = {"image": ActorCriticCnnPolicy, "dict": MultiInputActorCriticPolicy}.get(
        name, ActorCriticPolicy
    )
    assert type(worker.policy) is expected
    run_one_batch(real_redis, worker, observation, DISCRETE)
    memory = worker.memories["e2"]  # kept as the policy takes it: images channel-first, uint8
    obs = memory.obs["cam"] if name == "dict" else memory.obs
    if name in ("image", "dict"):
        assert obs.shape == (3, 36, 36) and obs.dtype == np.uint8  # type: ignore[union-attr]


def test_an_84x84_image_travels_as_a_21_kb_binary_array(real_redis, settings) -> None:
    space = {**IMAGE, "shape": [84, 84, 3]}
    worker = start(real_redis, model_settings(settings, space, DISCRETE))
    image = np.random.default_rng(0).integers(0, 256, (84, 84, 3)).astype(np.uint8)
    obs_id = publish(real_redis, {"OBSERVATION": image, "ENV_ID": "cam"})
    [(_, fields)] = real_redis.xrange(OBSERVATION)
    size = sum(len(k) + len(v) for k, v in fields.items())
    assert 84 * 84 * 3 < size < 84 * 84 * 3 + 100, size  # 21,168 bytes of pixels, a few of framing
    assert len(json.dumps(image.tolist())) > 2.5 * size  # what the same image costs as JSON
    assert drain(worker) == 1 and real_redis.xlen(DEAD) == 0
    check_reply(replies(real_redis)[obs_id][1], DISCRETE, worker.policy, image, "cam")


# --------------------------------------------------------------------------- evolution


def stats(worker: ModelWorker) -> dict[str, tuple[list[float], list[float], float]]:
    inputs = worker.learner.inputs
    out = {
        key: (rms.mean.tolist(), rms.var.tolist(), float(rms.count)) for key, rms in inputs.obs_rms.items()
    }
    if inputs.ret_rms is not None:
        rms = inputs.ret_rms
        out["ret"] = (np.ravel(rms.mean).tolist(), np.ravel(rms.var).tolist(), float(rms.count))
    return out


@pytest.mark.parametrize("extra", [{}, {"use_sde": True}], ids=["box", "box-sde"])
def test_get_and_set_carry_log_std_and_leave_normalization_alone(
    real_redis, settings, extra: dict[str, Any]
) -> None:
    update = {"normalize_obs": True, "normalize_reward": True, **extra}
    worker = start(real_redis, model_settings(settings, VECTOR, BOX, **update))
    publish_rounds(real_redis, episodes(VECTOR, BOX, 5, 3, seed=2))
    drain(worker)
    assert worker.counters.updates > 0
    before = stats(worker)
    checkpoint = "rl:model:m1:checkpoint"
    stored = real_redis.hget(checkpoint, "normalization")
    assert stored == worker.learner.inputs.pack()

    get_id = xadd(real_redis, EVOLUTION, {"CMD": "GET"})
    drain(worker)
    [(_, answer)] = read(real_redis, WEIGHTS)
    assert answer["REQUEST_ID"] == get_id
    state = worker.policy.state_dict()
    vector = np.asarray(answer["WEIGHTS"], np.float32)
    assert len(vector) == worker.learner.n_params == sum(t.numel() for t in state.values())
    np.testing.assert_array_equal(vector, weights_as_vector(worker.policy))
    names = list(state)
    at = sum(state[n].numel() for n in names[: names.index("log_std")])
    log_std = slice(at, at + state["log_std"].numel())
    np.testing.assert_array_equal(vector[log_std], state["log_std"].numpy().ravel())
    assert stats(worker) == before and real_redis.hget(checkpoint, "normalization") == stored

    vector[log_std] = -0.5
    vector[:at] += 0.01
    set_fields = {"CMD": "SET", "WEIGHTS": {"m1": vector.astype("<f4").tobytes()}}
    set_id = xadd(real_redis, EVOLUTION, set_fields, "msgpack")
    drain(worker)
    assert read(real_redis, WEIGHTS)[-1][1] == {"ACK": "SET", "COMPONENT_ID": "m1", "REQUEST_ID": set_id}
    np.testing.assert_array_equal(weights_as_vector(worker.policy), vector)
    assert (worker.policy.log_std == -0.5).all()
    assert stats(worker) == before and real_redis.hget(checkpoint, "normalization") == stored
    policy_hash = real_redis.hgetall("rl:model:m1:policy")  # what local clients act with
    assert policy_hash[b"weights"] == vector.astype("<f4").tobytes()
    assert policy_hash[b"normalization"] == stored

    # An evaluation step (not taken into the statistics) is answered with the new standard deviation.
    x = np.array([1.0, -2.0, 0.5], np.float32)
    obs_id = publish(real_redis, {"OBSERVATION": x, "ENV_ID": "eval", "DETERMINISTIC": True})
    drain(worker)
    assert stats(worker) == before
    reply = replies(real_redis)[obs_id][1]
    rms = worker.learner.inputs.obs_rms[""]
    normalized = np.clip((x - rms.mean) / np.sqrt(rms.var + 1e-8), -10, 10).astype(np.float32)
    check_reply(reply, BOX, worker.policy, normalized, "eval", deterministic=True)
    if not extra:
        assert reply["LOG_STD"] == [-0.5, -0.5]
