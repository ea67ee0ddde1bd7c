"""Bad input through the real wire protocol, against a real redis-server and fakeredis.

Every malformed entry is acknowledged and lands in ``<prefix>:dead`` with its reason, where it came
from and its original fields; the valid entries around it are all answered, the weights stay
finite and the worker keeps serving.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import redis

from tests.helpers import read
from worker.model.loop import ModelWorker
from worker.model.policy import n_params, weights_as_vector
from worker.model.settings import ModelSettings

OBS = [0.01, -0.02, 0.03, 0.04]
OBSERVATION, EVOLUTION, LOGITS, WEIGHTS, DEAD = (
    "rl:observation",
    "rl:evolution",
    "rl:logits",
    "rl:weights",
    "rl:dead",
)
GROUP = "model:m1"
MAX_ENTRY_BYTES = 8192


def plain(**message) -> dict[bytes, bytes]:
    """Plain fields: strings are sent as given (unquoted, as redis-cli would), the rest as JSON."""
    return {
        k.encode(): v.encode() if isinstance(v, str) else json.dumps(v).encode() for k, v in message.items()
    }


def packed(message) -> dict[bytes, bytes]:
    return {b"data": msgpack.packb(message, use_bin_type=True)}


@dataclass(frozen=True)
class Bad:
    name: str
    stream: str
    fields: dict[bytes, bytes]
    words: tuple[str, ...]  # the reason must mention each


def bad_inputs(n: int) -> list[Bad]:
    """One entry per class of bad input; ``n`` is the model's number of parameters."""
    obs, evo = OBSERVATION, EVOLUTION
    nan_vector = [0.0] * n
    nan_vector[n // 2] = math.nan
    return [
        # msgpack
        Bad(
            "msgpack truncated", obs, {b"data": msgpack.packb({"OBSERVATION": OBS})[:-2]}, ("data", "msgpack")
        ),
        Bad("msgpack not a map", obs, packed([OBS]), ("data", "map")),
        Bad("msgpack non-string keys", obs, packed({"OBSERVATION": OBS, 7: 1}), ("data", "string keys")),
        Bad("msgpack garbage", evo, {b"data": b"\xc1\xc1"}, ("data",)),
        # JSON text
        Bad("bad JSON text", obs, plain(OBSERVATION="[0.1, 0.2,"), ("OBSERVATION", "not JSON")),
        Bad("non-UTF-8 field", obs, {b"OBSERVATION": b"[1,2,3,4]", b"ENV_ID": b"\xff\xfe"}, ("UTF-8",)),
        # OBSERVATION
        Bad("missing OBSERVATION", obs, plain(ENV_ID="e", REWARD=1.0, ACTION=0), ("OBSERVATION",)),
        Bad("wrong shape", obs, plain(OBSERVATION=[1, 2, 3]), ("OBSERVATION", "shape")),
        Bad("wrong rank", obs, packed({"OBSERVATION": [OBS]}), ("OBSERVATION", "shape")),
        Bad("ragged", obs, plain(OBSERVATION=[[1, 2], [3]]), ("OBSERVATION", "rectangular")),
        Bad("strings in array", obs, plain(OBSERVATION=[1, "2", 3, 4]), ("OBSERVATION", "numbers")),
        Bad("strings in msgpack array", obs, packed({"OBSERVATION": ["a", 1, 2, 3]}), ("OBSERVATION",)),
        Bad("bools in array", obs, plain(OBSERVATION=[1, True, 3, 4]), ("OBSERVATION", "numbers")),
        Bad("JSON NaN", obs, plain(OBSERVATION="[NaN, 0, 0, 0]"), ("OBSERVATION", "finite")),
        Bad("JSON Infinity", obs, plain(OBSERVATION="[0, -Infinity, 0, 0]"), ("OBSERVATION", "finite")),
        Bad(
            "msgpack nan", obs, packed({"OBSERVATION": [0.0, math.nan, 0.0, 0.0]}), ("OBSERVATION", "finite")
        ),
        Bad(
            "beyond float32", obs, packed({"OBSERVATION": [0.0, 0.0, 0.0, 1e300]}), ("OBSERVATION", "finite")
        ),
        # REWARD / ACTION
        Bad("REWARD as string", obs, plain(OBSERVATION=OBS, REWARD='"1"', ACTION=0), ("REWARD", "number")),
        Bad("REWARD as text", obs, plain(OBSERVATION=OBS, REWARD="one", ACTION=0), ("REWARD",)),
        Bad("REWARD NaN", obs, plain(OBSERVATION=OBS, REWARD="NaN", ACTION=0), ("REWARD", "finite")),
        Bad(
            "REWARD beyond float32",
            obs,
            packed({"OBSERVATION": OBS, "REWARD": 1e39, "ACTION": 0}),
            ("REWARD", "float32"),
        ),
        Bad(
            "REWARD msgpack inf",
            obs,
            packed({"OBSERVATION": OBS, "REWARD": math.inf, "ACTION": 0}),
            ("REWARD",),
        ),
        Bad("REWARD huge integer", obs, plain(OBSERVATION=OBS, REWARD="9" * 400, ACTION=0), ("REWARD",)),
        Bad("REWARD without ACTION", obs, plain(OBSERVATION=OBS, REWARD=1.0), ("REWARD", "ACTION")),
        Bad("ACTION without REWARD", obs, plain(OBSERVATION=OBS, ACTION=1), ("REWARD", "ACTION")),
        Bad("ACTION out of range", obs, plain(OBSERVATION=OBS, REWARD=1.0, ACTION=2), ("ACTION",)),
        Bad("ACTION negative", obs, packed({"OBSERVATION": OBS, "REWARD": 1.0, "ACTION": -1}), ("ACTION",)),
        Bad("ACTION float", obs, plain(OBSERVATION=OBS, REWARD=1.0, ACTION=1.0), ("ACTION",)),
        Bad("ACTION bool", obs, packed({"OBSERVATION": OBS, "REWARD": 1.0, "ACTION": True}), ("ACTION",)),
        # flags, ENV_ID, truncation
        Bad("DONE as string", obs, plain(OBSERVATION=OBS, DONE='"true"'), ("DONE",)),
        Bad("DONE as text", obs, plain(OBSERVATION=OBS, DONE="yes"), ("DONE",)),
        Bad("DETERMINISTIC as 2", obs, packed({"OBSERVATION": OBS, "DETERMINISTIC": 2}), ("DETERMINISTIC",)),
        Bad("ENV_ID too long", obs, plain(OBSERVATION=OBS, ENV_ID="e" * 300), ("ENV_ID",)),
        Bad("ENV_ID a list", obs, packed({"OBSERVATION": OBS, "ENV_ID": ["e"]}), ("ENV_ID",)),
        Bad(
            "TRUNCATED without TERMINAL_OBSERVATION",
            obs,
            plain(OBSERVATION=OBS, REWARD=1.0, ACTION=0, TRUNCATED=True),
            ("TERMINAL_OBSERVATION",),
        ),
        # commands
        Bad("unknown CMD", evo, plain(CMD="DELETE"), ("CMD",)),
        Bad("missing CMD", evo, plain(WEIGHTS={"m1": [0.0]}), ("CMD",)),
        Bad("SET without WEIGHTS", evo, plain(CMD="SET"), ("WEIGHTS",)),
        Bad("SET WEIGHTS not a map", evo, plain(CMD="SET", WEIGHTS=[0.0] * n), ("WEIGHTS", "map")),
        Bad("SET WEIGHTS as text", evo, plain(CMD="SET", WEIGHTS="m1"), ("WEIGHTS",)),
        Bad("SET wrong length", evo, plain(CMD="SET", WEIGHTS={"m1": [0.0] * (n - 1)}), ("WEIGHTS", str(n))),
        Bad(
            "SET wrong length bytes",
            evo,
            packed({"CMD": "SET", "WEIGHTS": {"m1": struct.pack(f"<{n + 1}f", *[0.0] * (n + 1))}}),
            ("WEIGHTS", str(n)),
        ),
        Bad(
            "SET NaN in JSON vector", evo, plain(CMD="SET", WEIGHTS={"m1": nan_vector}), ("WEIGHTS", "finite")
        ),
        Bad(
            "SET NaN in float32 bytes",
            evo,
            packed({"CMD": "SET", "WEIGHTS": {"m1": np.array(nan_vector, "<f4").tobytes()}}),
            ("WEIGHTS", "finite"),
        ),
        Bad(
            "SET inf in msgpack vector",
            evo,
            packed({"CMD": "SET", "WEIGHTS": {"m1": [math.inf] * n}}),
            ("WEIGHTS",),
        ),
        Bad(
            "SET strings in vector", evo, plain(CMD="SET", WEIGHTS={"m1": ["0"] * n}), ("WEIGHTS", "numbers")
        ),
        # size cap
        Bad(
            "oversized observation",
            obs,
            plain(OBSERVATION=OBS, PAD="x" * MAX_ENTRY_BYTES),
            ("exceeds", "bytes"),
        ),
        Bad("oversized command", evo, packed({"CMD": "GET", "PAD": b"\0" * MAX_ENTRY_BYTES}), ("exceeds",)),
    ]


def worker_for(client: redis.Redis, settings: ModelSettings, **update) -> ModelWorker:
    worker = ModelWorker(settings.model_copy(update={"max_entry_bytes": MAX_ENTRY_BYTES, **update}), client)
    worker.start()
    return worker


def drain(worker: ModelWorker, limit: int = 200) -> int:
    """Poll until nothing is left; fail (rather than hang) if the worker never gets there."""
    total = 0
    for _ in range(limit):
        n = worker.poll()
        if n == 0:
            return total
        total += n
    raise AssertionError(f"worker still busy after {limit} polls")


def xadd(client: redis.Redis, stream: str, fields: dict[bytes, bytes]) -> str:
    return client.xadd(stream, fields).decode()


def dead_letters(client: redis.Redis) -> dict[tuple[str, str], dict[bytes, bytes]]:
    """Dead-stream entries by (stream, ID) of the entry they bury: IDs of two streams may be equal."""
    letters = {}
    for _, fields in client.xrange(DEAD):
        letters[fields[b"dead:stream"].decode(), fields[b"dead:id"].decode()] = fields
    return letters


def assert_nothing_pending(client: redis.Redis) -> None:
    for stream in (OBSERVATION, EVOLUTION):
        assert client.xpending(stream, GROUP)["pending"] == 0, stream


@pytest.mark.parametrize("batch_size", [5, 256])
def test_every_bad_input_is_dead_lettered_and_the_rest_answered(any_redis, settings, batch_size: int) -> None:
    worker = worker_for(any_redis, settings, batch_size=batch_size, n_steps=2)
    bad = bad_inputs(n_params(worker.policy))
    good: list[str] = []
    bad_ids: dict[tuple[str, str], Bad] = {}
    ignored: list[tuple[str, str]] = []
    for t, case in enumerate(bad):
        # a valid observation before every bad entry: two environments, both encodings, chained
        # with REWARD/ACTION so the worker also trains among the bad entries
        step = {"REWARD": 1.0, "ACTION": t % 2} if t else {}
        message = {"OBSERVATION": [0.01 * t, 0.0, -0.01 * t, 0.0], "ENV_ID": "good", **step}
        good.append(xadd(any_redis, OBSERVATION, plain(**message)))
        message["ENV_ID"] = 7  # an integer ENV_ID
        good.append(xadd(any_redis, OBSERVATION, packed(message)))
        bad_ids[case.stream, xadd(any_redis, case.stream, case.fields)] = case
        if t == len(bad) // 2:
            # unknown keys are ignored; a SET naming only other models is not for us
            good.append(xadd(any_redis, OBSERVATION, plain(OBSERVATION=OBS, ENV_ID="x", COLOR="red", V=[1])))
            ignored.append(
                (EVOLUTION, xadd(any_redis, EVOLUTION, plain(CMD="SET", WEIGHTS={"other": [1.0, 2.0]})))
            )
    drain(worker)

    assert_nothing_pending(any_redis)
    letters = dead_letters(any_redis)
    assert set(letters) == set(bad_ids), "exactly the bad entries are dead"
    assert any_redis.xlen(DEAD) == len(bad) == worker.counters.dead
    for key, case in bad_ids.items():
        letter = letters[key]
        reason = letter[b"dead:reason"].decode()
        for word in case.words:
            assert word in reason, f"{case.name}: {reason!r} does not mention {word!r}"
        assert letter[b"dead:component_id"] == b"m1"
        original = {k: v for k, v in letter.items() if not k.startswith(b"dead:")}
        if case.name.startswith("oversized"):
            assert original == {} and int(letter[b"dead:size"]) > MAX_ENTRY_BYTES
        else:
            assert original == case.fields, case.name  # copied verbatim, binary-safe

    replies = read(any_redis, LOGITS)
    answered = Counter(reply["OBS_ID"] for _, reply in replies)
    assert answered == Counter(good), "every valid observation answered exactly once, no bad one"
    assert {reply["ENV_ID"] for _, reply in replies} == {"good", "7", "x"}
    assert all(len(reply["LOGITS"]) == 2 and all(map(math.isfinite, reply["LOGITS"])) for _, reply in replies)
    assert read(any_redis, WEIGHTS) == [] and ignored[0] not in letters
    assert worker.counters.transitions == 2 * (len(bad) - 1)  # the bad entries did not break the chains
    assert worker.counters.updates > 0
    assert np.isfinite(weights_as_vector(worker.policy)).all()

    # and it keeps serving
    last = xadd(any_redis, OBSERVATION, plain(OBSERVATION=OBS, ENV_ID="good", REWARD=0.5, ACTION=1))
    get = xadd(any_redis, EVOLUTION, plain(CMD="GET"))
    drain(worker)
    assert read(any_redis, LOGITS)[-1][1]["OBS_ID"] == last
    [(_, reply)] = read(any_redis, WEIGHTS)
    assert reply["REQUEST_ID"] == get and all(map(math.isfinite, reply["WEIGHTS"]))
    assert_nothing_pending(any_redis)


def test_bad_sets_leave_the_weights_unchanged(any_redis, settings) -> None:
    worker = worker_for(any_redis, settings)
    n = n_params(worker.policy)
    before = weights_as_vector(worker.policy).copy()
    ids = {
        (EVOLUTION, xadd(any_redis, EVOLUTION, case.fields)): case
        for case in bad_inputs(n)
        if case.stream == EVOLUTION and "WEIGHTS" in case.words
    }
    assert len(ids) >= 7
    other = xadd(any_redis, EVOLUTION, packed({"CMD": "SET", "WEIGHTS": {"other": [1.0] * 9, "m2": b"junk"}}))
    obs = xadd(any_redis, OBSERVATION, plain(OBSERVATION=OBS))
    drain(worker)

    np.testing.assert_array_equal(weights_as_vector(worker.policy), before)
    assert set(dead_letters(any_redis)) == set(ids)  # the SET for other models is not dead
    assert (EVOLUTION, other) not in dead_letters(any_redis)
    assert read(any_redis, WEIGHTS) == []  # and not acknowledged either: it was not for us
    assert worker.counters.commands == 0
    [(_, reply)] = read(any_redis, LOGITS)
    assert reply["OBS_ID"] == obs
    assert_nothing_pending(any_redis)


def test_dead_letter_of_a_republished_dead_letter(any_redis, settings) -> None:
    """Re-publishing a dead entry as is (its ``dead:*`` fields included) buries it again, once."""
    worker = worker_for(any_redis, settings)
    first = xadd(any_redis, OBSERVATION, plain(OBSERVATION=[1, 2]))
    drain(worker)
    [(_, letter)] = any_redis.xrange(DEAD)
    again = xadd(any_redis, OBSERVATION, letter)
    drain(worker)
    [_, (_, second)] = any_redis.xrange(DEAD)
    assert second[b"dead:id"].decode() == again != first
    assert second[b"OBSERVATION"] == b"[1, 2]"
    assert_nothing_pending(any_redis)


def _fail_on(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Make the learner raise, mid-batch, when it reaches the observation ``target``."""
    import worker.model.learner

    real = worker.model.learner.observe

    def observe(memory, obs, *args):
        if obs.entry_id == target:
            raise RuntimeError(f"injected failure on {target}")
        return real(memory, obs, *args)

    monkeypatch.setattr(worker.model.learner, "observe", observe)


def test_internal_error_spares_the_rest_of_the_batch(any_redis, settings, monkeypatch) -> None:
    """A bug hit by one entry: the batch is replayed entry by entry, the others answered exactly once."""
    worker = worker_for(any_redis, settings, n_steps=100)
    ids = [
        xadd(
            any_redis,
            OBSERVATION,
            plain(OBSERVATION=OBS, ENV_ID=f"e{i % 2}", **({"REWARD": 1, "ACTION": 0} if i > 1 else {})),
        )
        for i in range(7)
    ]
    target = ids[3]
    _fail_on(monkeypatch, target)
    assert worker.poll() == 7  # one batch

    answered = Counter(reply["OBS_ID"] for _, reply in read(any_redis, LOGITS))
    assert answered == Counter(i for i in ids if i != target)
    # the failed batch was rolled back before the replay: nothing counted twice
    assert worker.counters.observations == 6
    pending = any_redis.xpending_range(OBSERVATION, GROUP, "-", "+", 10)
    assert [p["message_id"].decode() for p in pending] in ([], [target])  # only the target may be left


def test_internal_error_dead_letters_only_that_entry(any_redis, settings, monkeypatch) -> None:
    worker = worker_for(any_redis, settings, n_steps=100)
    ids = [xadd(any_redis, OBSERVATION, plain(OBSERVATION=OBS, ENV_ID=f"e{i}")) for i in range(5)]
    target = ids[2]
    _fail_on(monkeypatch, target)
    drain(worker, limit=20)

    letters = dead_letters(any_redis)
    assert list(letters) == [(OBSERVATION, target)]
    letter = letters[OBSERVATION, target]
    assert letter[b"dead:reason"].decode().startswith("internal error")
    assert "injected failure" in letter[b"dead:reason"].decode()
    assert letter[b"dead:stream"] == OBSERVATION.encode()
    assert letter[b"OBSERVATION"] == json.dumps(OBS).encode()
    answered = Counter(reply["OBS_ID"] for _, reply in read(any_redis, LOGITS))
    assert answered == Counter(i for i in ids if i != target)
    assert_nothing_pending(any_redis)
    assert worker.counters.dead == 1 and worker.counters.observations == 4

    # the worker keeps serving new entries
    more = xadd(any_redis, OBSERVATION, plain(OBSERVATION=OBS, ENV_ID="e9"))
    drain(worker, limit=20)
    assert read(any_redis, LOGITS)[-1][1]["OBS_ID"] == more
