"""Faults for every space, through a real redis-server: a worker that crashes mid-training resumes
exactly as if it had not (normalization statistics included), and bad entries of each space are
dead-lettered with a reason naming the key and the problem. Forms and training: ``test_spaces.py``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import redis

from tests.helpers import drain
from tests.test_spaces import (
    BOX,
    DEAD,
    DICT,
    DISCRETE,
    ENCODINGS,
    IMAGE,
    LOGITS,
    MULTI_BINARY,
    MULTI_DISCRETE,
    OBSERVATION,
    VECTOR,
    Spec,
    binary_array,
    episodes,
    model_settings,
    publish,
    replies,
    sample,
    sample_action,
    start,
    stats,
    wire,
)
from worker.model.loop import ModelWorker
from worker.model.policy import weights_as_vector

# --------------------------------------------------------------------------- crash mid-training

CRASHES: dict[str, tuple[Spec, Spec, dict[str, Any]]] = {
    "box-normalized": (VECTOR, BOX, {"normalize_obs": True, "normalize_reward": True}),
    "dict-multidiscrete-normalized": (
        DICT,
        MULTI_DISCRETE,
        {"normalize_obs": True, "normalize_reward": True},
    ),
    "box-sde": (VECTOR, BOX, {"use_sde": True}),
    "image-multibinary": (IMAGE, MULTI_BINARY, {}),
}
K, ROUNDS = 3, 8  # environments, rounds of one step each


def feeder(
    client: redis.Redis, rounds: list[list[dict[str, Any]]], prefix: str
) -> Callable[[int, int], None]:
    """Publish rounds ``[first, last)`` under ``prefix`` with the same entry IDs in every run."""

    def feed(first: int, last: int) -> None:
        for t in range(first, last):
            for k, message in enumerate(rounds[t]):
                encoding, binary = ENCODINGS[k % len(ENCODINGS)]
                publish(client, message, encoding, binary, f"{prefix}:observation", f"{1000 + t}-{k}")

    return feed


def assert_same_state(client: redis.Redis, mine: ModelWorker, theirs: ModelWorker) -> None:
    """Two workers (prefixes ``rl`` and ``ref``) hold and committed the same state, answered alike."""
    assert mine.counters == theirs.counters
    np.testing.assert_array_equal(weights_as_vector(mine.policy), weights_as_vector(theirs.policy))
    assert {e: m.pack() for e, m in mine.memories.items()} == {
        e: m.pack() for e, m in theirs.memories.items()
    }
    ours, refs = (client.hgetall(f"{p}:model:m1:checkpoint") for p in ("rl", "ref"))
    for key in (b"policy", b"optimizer", b"meta", b"version", b"normalization"):
        assert ours.get(key) == refs.get(key), key
    assert client.hgetall("rl:model:m1:memory") == client.hgetall("ref:model:m1:memory")
    assert {i: r for i, (_, r) in replies(client).items()} == {
        i: r for i, (_, r) in replies(client, "ref:logits").items()
    }
    assert client.xpending(OBSERVATION, "model:m1")["pending"] == 0 and client.xlen(DEAD) == 0


@pytest.mark.parametrize("name", list(CRASHES))
def test_a_crash_mid_training_resumes_exactly(real_redis, settings, name: str) -> None:
    observation, action, extra = CRASHES[name]
    rounds = episodes(observation, action, ROUNDS, K, seed=5)
    base = model_settings(settings, observation, action, batch_size=K, **extra)
    reference = start(real_redis, base.model_copy(update={"prefix": "ref"}))
    feeder(real_redis, rounds, "ref")(0, ROUNDS)
    drain(reference)

    first, feed = start(real_redis, base), feeder(real_redis, rounds, "rl")
    feed(0, ROUNDS // 2)
    drain(first)
    feed(ROUNDS // 2, ROUNDS)
    # The first worker reads the next batch and dies before committing it.
    [(_, read_batch)] = real_redis.xreadgroup("model:m1", first.consumer, {OBSERVATION: ">"}, count=K)
    assert len(read_batch) == K
    real_redis.delete("rl:model:m1:lease")
    second = start(real_redis, base)  # a fresh process: everything it knows comes from Redis
    assert drain(second) == K * (ROUNDS - ROUNDS // 2)

    assert second.counters.updates > 0
    assert_same_state(real_redis, second, reference)
    normalization = real_redis.hget("rl:model:m1:checkpoint", "normalization")
    if extra.get("normalize_obs"):
        found = stats(second)
        assert found == stats(reference)
        key = "pos" if observation is DICT else ""  # Box keys only: images are not normalized
        assert sorted(found) == sorted([key, "ret"])
        assert found[key][2] == pytest.approx(1e-4 + K * ROUNDS)  # every training observation, once
        assert normalization == second.learner.inputs.pack()
    else:
        assert normalization is None


PACED: dict[str, Spec] = {
    "discrete": {"type": "Discrete", "n": 5},
    "dict-with-discrete": {"type": "Dict", "spaces": {"pos": VECTOR, "mode": {"type": "Discrete", "n": 5}}},
}


@pytest.mark.parametrize("name", list(PACED))
def test_environments_at_different_paces_train_across_a_restart_as_without(
    real_redis, settings, name: str
) -> None:
    """One update on a fast environment's segment of steps from before the restart and a slow one's
    that straddles it: the observations in memory must come back as the fresh ones are."""
    observation, rng = PACED[name], np.random.default_rng(3)

    def step(env: str, t: int) -> dict[str, Any]:
        reward = {"REWARD": 1.0, "ACTION": t % 3} if t else {}
        return {"OBSERVATION": sample(observation, rng), "ENV_ID": env, **reward}

    batches = [
        [step("fast", 0), step("slow", 0), step("fast", 1)],
        [step("fast", 2), step("slow", 1), step("slow", 2)],
    ]
    base = model_settings(settings, observation, DISCRETE)
    reference = start(real_redis, base.model_copy(update={"prefix": "ref"}))
    workers = [start(real_redis, base)]
    for b, batch in enumerate(batches):
        for i, message in enumerate(batch):
            for prefix in ("ref", "rl"):
                publish(real_redis, message, "json", False, f"{prefix}:observation", f"{1000 + b}-{i}")
        drain(reference)
        drain(workers[-1])
        real_redis.delete("rl:model:m1:lease")  # the worker stops; a fresh one takes over
        workers.append(start(real_redis, base))
    assert reference.counters.updates == 1
    assert_same_state(real_redis, workers[-1], reference)


def test_an_update_does_not_depend_on_numpys_global_generator(real_redis, settings) -> None:
    rounds = episodes(VECTOR, DISCRETE, 5, K, seed=4)
    held = np.random.get_state()
    try:
        workers: list[ModelWorker] = []
        for prefix, seed in (("ref", 1), ("rl", 2)):
            workers.append(start(real_redis, model_settings(settings, VECTOR, DISCRETE, prefix=prefix)))
            np.random.seed(seed)  # what another process would hold: state no commit carries
            feeder(real_redis, rounds, prefix)(0, len(rounds))
            drain(workers[-1])
    finally:
        np.random.set_state(held)
    assert workers[0].counters.updates == 1
    assert_same_state(real_redis, workers[1], workers[0])


# --------------------------------------------------------------------------- bad entries


@dataclass(frozen=True)
class Bad:
    name: str
    fields: dict[str, Any]  # replace the valid step's (an ACTION comes with a REWARD)
    encoding: str
    words: tuple[str, ...]  # the reason must mention each


def big_endian(values: list[float], dtype: str) -> dict[str, Any]:
    array = np.array(values, dtype)
    return binary_array(array, dtype, array.tobytes())  # numpy writes them in the order named


def obs(name: str, value: Any, encoding: str, *words: str) -> Bad:
    return Bad(name, {"OBSERVATION": value}, encoding, ("OBSERVATION", *words))


def act(name: str, value: Any, encoding: str, *words: str) -> Bad:
    return Bad(name, {"ACTION": value}, encoding, ("ACTION", *words))


def key(name: str, sub: str, value: Any, *words: str) -> Bad:
    """An observation of ``DICT`` whose key ``sub`` holds ``value``."""
    return Bad(name, {"OBSERVATION": {**DICT_OK, sub: value}}, "msgpack", (f"OBSERVATION.{sub}", *words))


X = np.array([0.5, -1.0, 2.0], np.float32)
ZEROS = np.zeros((36, 36, 3), np.uint8)  # an image
NEGATIVE = ZEROS.astype(int)
NEGATIVE[5, 5, 1] = -1
DICT_OK = wire(sample(DICT, np.random.default_rng(9)), True)
WITHOUT_MODE = {k: v for k, v in DICT_OK.items() if k != "mode"}
WITHOUT_POS = {k: v for k, v in DICT_OK.items() if k != "pos"}
BOX_ACTION = [
    act("action too short", [0.1], "json", "shape [2]", "[1]"),
    act("action a number", 0.5, "msgpack", "shape [2]"),
    act("action NaN", [math.nan, 0.0], "msgpack", "finite"),
    act("action JSON Infinity", "[Infinity, 0.0]", "json", "finite"),
    act("action beyond float32", [1e39, 0.0], "msgpack", "finite"),
    act("action text", "left", "json", "numbers"),
    act("action big-endian", big_endian([0.1, 0.2], ">f4"), "msgpack", "little-endian"),
    act("action NaN binary", binary_array(np.array([0, math.nan], np.float32)), "msgpack", "finite"),
]
FAULTS: dict[str, tuple[Spec, Spec, list[Bad]]] = {
    "vector/box": (
        VECTOR,
        BOX,
        [
            obs("wrong shape", [1.0, 2.0], "json", "shape [3]", "[2]"),
            obs("nested", [X.tolist()], "msgpack", "shape [3]", "[1, 3]"),
            obs("data too short", binary_array(X, data=X.tobytes()[:-1]), "msgpack", "11 bytes", "12"),
            obs("binary shape", binary_array(X.reshape(1, 3)), "msgpack", "shape [3]", "[1, 3]"),
            obs("big-endian", big_endian(X.tolist(), ">f4"), "msgpack", "little-endian"),
            obs("complex dtype", binary_array(X, "complex64"), "msgpack", "dtype"),
            obs("binary extra key", {**binary_array(X), "order": "C"}, "msgpack", "dtype, shape and data"),
            *BOX_ACTION,
        ],
    ),
    "image/discrete": (
        IMAGE,
        DISCRETE,
        [
            obs(
                "channels first",
                binary_array(ZEROS.transpose(2, 0, 1)),
                "msgpack",
                "[36, 36, 3]",
                "[3, 36, 36]",
            ),
            obs("fractions", binary_array(ZEROS.astype(np.float32) + 0.5), "msgpack", "whole numbers"),
            obs("beyond uint8", binary_array(ZEROS.astype(np.int16) + 300), "msgpack", "uint8", "[0, 255]"),
            obs("negative pixel", NEGATIVE.tolist(), "json", "uint8", "[0, 255]"),
            obs("data too long", binary_array(ZEROS, data=bytes(3889)), "msgpack", "3889 bytes", "3888"),
            act("action out of range", 3, "json", "[0, 3)"),
            act("action negative", -1, "msgpack", "[0, 3)"),
            act("action a list", [0, 1], "json", "[0, 3)"),
            act("action a float", 1.0, "json", "integer"),
            act("action a bool", True, "msgpack", "integer"),
        ],
    ),
    "discrete/multidiscrete": (
        {"type": "Discrete", "n": 5},
        MULTI_DISCRETE,
        [
            obs("out of range", 5, "json", "[0, 5)"),
            obs("negative", -1, "msgpack", "[0, 5)"),
            obs("a float", 2.0, "json", "integer"),
            obs("a pair", [1, 2], "msgpack", "integer"),
            act("action out of range", [3, 0, 0], "json", "[3, 2, 4]"),
            act("action second dimension", [0, 2, 0], "msgpack", "[3, 2, 4]"),
            act("action too short", [1, 1], "json", "shape [3]", "[2]"),
            act("action an int", 2, "json", "shape [3]"),
            act("action fractions", [0.5, 0, 0], "json", "whole numbers"),
            act("action big-endian", big_endian([1, 0, 2], ">i8"), "msgpack", "little-endian"),
        ],
    ),
    "multidiscrete/multibinary": (
        {"type": "MultiDiscrete", "nvec": [3, 4]},
        MULTI_BINARY,
        [
            obs("out of range", [3, 0], "json", "[3, 4]"),
            obs("too long", [0, 1, 2], "msgpack", "shape [2]", "[3]"),
            obs("fractions", binary_array(np.array([0.5, 1.0])), "msgpack", "whole numbers"),
            obs(
                "data too short", binary_array(np.array([1, 2]), data=bytes(12)), "msgpack", "12 bytes", "16"
            ),
            act("action a 2", [0, 1, 2], "json", "0 or 1"),
            act("action negative", [-1, 0, 0], "msgpack", "0 or 1"),
            act("action too short", [1, 0], "json", "shape [3]"),
            act("action bools", [True, False, True], "json", "numbers"),
        ],
    ),
    "multibinary/box-sde": (
        {"type": "MultiBinary", "n": 4},
        BOX,
        [
            obs("a 2", [0, 1, 2, 0], "json", "0 or 1"),
            obs("too short", [0, 1, 0], "msgpack", "shape [4]", "[3]"),
            obs("binary 2", binary_array(np.array([0, 2, 0, 1], np.int8)), "msgpack", "0 or 1"),
            *BOX_ACTION,
        ],
    ),
    "dict/multidiscrete": (
        DICT,
        MULTI_DISCRETE,
        [
            obs("missing key", WITHOUT_MODE, "msgpack", "missing", "'mode'"),
            obs("extra key", {**DICT_OK, "color": 1}, "msgpack", "'color'"),
            obs("not a map", [1, 2], "json", "map"),
            key("pos shape", "pos", [1.0], "shape [3]"),
            key("pos big-endian", "pos", big_endian(X.tolist(), ">f4"), "little-endian"),
            key("pos a map", "pos", {"x": 1}, "dtype, shape and data"),
            key("cam data", "cam", binary_array(ZEROS, data=b""), "0 bytes", "3888"),
            key("mode out of range", "mode", 5, "[0, 5)"),
            key("bits out of range", "bits", [0, 1, 1, 3], "0 or 1"),
            key("grid out of range", "grid", [0, 4], "[3, 4]"),
            Bad(
                "terminal observation missing a key",
                {"TRUNCATED": True, "ACTION": [0, 0, 0], "TERMINAL_OBSERVATION": WITHOUT_POS},
                "msgpack",
                ("TERMINAL_OBSERVATION", "missing", "'pos'"),
            ),
            act("action out of range", [0, 0, 4], "msgpack", "[3, 2, 4]"),
        ],
    ),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_bad_entries_of_each_space_are_dead_lettered_with_their_reason(
    real_redis, settings, name: str
) -> None:
    observation, action, bad = FAULTS[name]
    extra = {"use_sde": True} if name.endswith("sde") else {}
    worker = start(real_redis, model_settings(settings, observation, action, batch_size=7, **extra))
    rng = np.random.default_rng(0)
    good, bad_ids = [], {}
    for t, case in enumerate(bad):
        # A valid step before every bad entry, in both encodings, chained with REWARD/ACTION.
        encoding, binary = ENCODINGS[t % len(ENCODINGS)]
        step = {"OBSERVATION": sample(observation, rng), "ENV_ID": "good"}
        if t:
            step |= {"REWARD": 1.0, "ACTION": sample_action(action, rng)}
        good.append(publish(real_redis, step, encoding, binary))
        message = {"OBSERVATION": wire(step["OBSERVATION"], case.encoding == "msgpack"), "ENV_ID": "good"}
        if "ACTION" in case.fields:
            message |= {"REWARD": 0.5, "ACTION": wire(sample_action(action, rng), False)}
        message |= case.fields
        bad_ids[publish(real_redis, message, case.encoding, False)] = case
    drain(worker)

    letters = {f[b"dead:id"].decode(): f for _, f in real_redis.xrange(DEAD)}
    assert set(letters) == set(bad_ids), "exactly the bad entries are dead"
    for entry_id, case in bad_ids.items():
        letter = letters[entry_id]
        reason = letter[b"dead:reason"].decode()
        assert not reason.startswith("internal error") and len(reason) < 300, f"{case.name}: {reason}"
        [(_, original)] = real_redis.xrange(OBSERVATION, entry_id, entry_id)
        assert {k: v for k, v in letter.items() if not k.startswith(b"dead:")} == original  # verbatim
        for word in case.words:
            assert word in reason, f"{case.name}: {reason!r} does not mention {word!r}"
    assert sorted(replies(real_redis, LOGITS)) == sorted(good), "every valid step answered, once"
    counters = worker.counters
    assert counters.dead == len(bad) and counters.transitions == len(good) - 1  # the chain held
    assert counters.updates > 0 and np.isfinite(weights_as_vector(worker.policy)).all()
    assert real_redis.xpending(OBSERVATION, "model:m1")["pending"] == 0
