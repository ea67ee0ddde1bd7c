"""Fuzzing a live worker: thousands of malformed entries of every class, mixed with valid traffic.

A real worker process (``python -m worker model``) on the real redis-server reads a seeded stream of
rounds. Each round is what a swarm would publish at once: one valid observation per environment
(several ``ENV_ID``\\ s, both encodings, chained with ``REWARD``/``ACTION``, episode ends, truncations,
evaluation steps), now and then a valid ``GET`` or ``SET``, and dozens of malformed entries drawn
from the classes in :data:`CLASSES`. A control worker with the same seed, in this process, reads
only the valid entries of each round. Then:

- the worker process never died, and exits cleanly on SIGTERM;
- every malformed entry is in ``<prefix>:dead`` with a non-empty reason, its stream and ID, and its
  original fields (or only its size, if oversized); nothing else is (``SET``\\ s naming only other
  models are, by the protocol, ignored: not answered, not dead);
- every valid observation is answered exactly once, with the control's logits; every valid command
  once, with the control's weights;
- the weights are finite and equal to the control's: the bad entries changed nothing.

Rounds are published in one MULTI/EXEC with commands first: a blocked XREADGROUP over two streams
is woken by one of them (Redis 7.0 then returns only that stream), so the worker may take the
commands and the observations of a round in two batches; with commands first that is the order the
control handles them in. The next round is published once the worker has committed the previous one.

The long form prints the figures. ``--entries`` is how many malformed entries must be dead-lettered,
spread evenly over the nine classes that are (the SETs for other models come on top, as many as one
class): 90000 is 10000 of every class::

    python -m tests.faults.test_fuzz --entries 90000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.common.servers import embedded_redis
from worker.model.loop import ModelWorker
from worker.model.policy import make_policy, unpack_state, weights_as_vector
from worker.model.settings import ModelSettings
from worker.model.store import ModelStore
from worker.protocol import DATA_FIELD, Streams

CAP = 32 * 1024  # --max-entry-bytes of the fuzzed worker: a JSON SET of 755 weights is about 15 KiB
N_PARAMS = 755  # CartPole-v1, net_arch pi/vf [16, 16]
COMPONENT = "m1"
ENVS = ["e0", "e1", 7, "e3", "e4", "cart-5"]  # 7: an integer ENV_ID
BAD_PER_ROUND = 40
BATCH = 1000  # > the entries of a round in one stream: a round is read at once
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
Fields = dict[bytes, bytes]


def plain(message: dict[str, Any]) -> Fields:
    """Plain fields: every value as JSON text (NaN and Infinity as JSON's extensions)."""
    return {k.encode(): json.dumps(v).encode() for k, v in message.items()}


def packed(message: Any) -> Fields:
    return {DATA_FIELD: msgpack.packb(message, use_bin_type=True)}


def digest(fields: Fields) -> bytes:
    return hashlib.blake2b(msgpack.packb(sorted(fields.items())), digest_size=16).digest()


@dataclass
class Entry:
    """One entry to publish; ``cls`` is None for valid traffic."""

    stream: str  # "observation" or "evolution"
    fields: Fields
    cls: str | None = None
    words: tuple[str, ...] = ()  # a dead letter's reason must mention each
    oversized: bool = False
    obs: bool = False  # a valid observation (to be answered with logits)
    command: bool = False  # a valid command (to be answered on the weights stream)


# --------------------------------------------------------------------------- malformed entries


class Malformed:
    """Seeded generator of malformed entries, one method per class (see :data:`CLASSES`)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def pick(self, options: list) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def obs(self) -> list[float]:
        return self.rng.normal(0, 0.5, 4).round(4).tolist()

    def message(self, step: bool | None = None) -> dict[str, Any]:
        """A valid observation message of one of the real environments (the bad entry then breaks it)."""
        message: dict[str, Any] = {"OBSERVATION": self.obs(), "ENV_ID": self.pick(ENVS)}
        if step if step is not None else self.rng.random() < 0.5:
            message |= {"REWARD": float(self.rng.normal()), "ACTION": int(self.rng.integers(2))}
        return message

    def encode(self, message: Any) -> Fields:
        return plain(message) if self.rng.random() < 0.5 and isinstance(message, dict) else packed(message)

    def vector(self, n: int) -> list[float]:
        return self.rng.normal(0, 0.1, n).round(4).tolist()  # short JSON text

    def bad_encoding(self) -> Entry:
        v = int(self.rng.integers(7))
        stream = self.pick(["observation", "evolution"])
        valid = packed(self.message())[DATA_FIELD]
        if v == 0:  # a value that is not UTF-8
            noise = bytes(self.rng.integers(0x80, 0x100, int(self.rng.integers(1, 9)), dtype=np.uint8))
            fields = {**plain(self.message()), b"ENV_ID": b"\xff" + noise}
            return Entry(stream, fields, words=("UTF-8",))
        if v == 1:  # a field name that is not UTF-8
            return Entry(stream, {**plain(self.message()), b"KEY\xfe\xff": b"1"}, words=("UTF-8",))
        if v == 2:  # not msgpack at all (0xc1 is never used)
            noise = bytes(self.rng.integers(0, 256, int(self.rng.integers(0, 40)), dtype=np.uint8))
            return Entry(stream, {DATA_FIELD: b"\xc1" + noise}, words=("msgpack",))
        if v == 3:  # valid msgpack followed by more bytes
            noise = bytes(self.rng.integers(0, 256, int(self.rng.integers(1, 9)), dtype=np.uint8))
            return Entry(stream, {DATA_FIELD: valid + noise}, words=("msgpack",))
        if v == 4:  # msgpack, but not a map
            value = self.pick([self.obs(), 7, "OBSERVATION", None, b"\x00\x01", 1.5, [{"CMD": "GET"}]])
            return Entry(stream, packed(value), words=("map",))
        if v == 5:  # a map whose keys are not all strings (a bin key, an integer key)
            key = self.pick([b"OBSERVATION", 1, -3, 2.5])
            message = {**self.message(), key: self.obs()}
            return Entry(stream, packed(message), words=("string keys",))
        text = json.dumps(self.obs())  # JSON text cut short: any strict prefix of "[...]" is invalid
        return Entry(
            "observation",
            {b"OBSERVATION": text[: int(self.rng.integers(len(text)))].encode()},
            words=("OBSERVATION",),
        )

    def truncated_msgpack(self) -> Entry:
        if self.rng.random() < 0.7:
            stream, message = "observation", self.message()
        else:
            weights = self.vector(N_PARAMS)
            vector = np.asarray(weights, "<f4").tobytes() if self.rng.random() < 0.5 else weights
            stream, message = (
                "evolution",
                self.pick([{"CMD": "GET"}, {"CMD": "SET", "WEIGHTS": {COMPONENT: vector}}]),
            )
        data = msgpack.packb(message, use_bin_type=True)
        return Entry(stream, {DATA_FIELD: data[: int(self.rng.integers(len(data)))]}, words=("msgpack",))

    def wrong_shape(self) -> Entry:
        shapes = [[], [1], [2], [3], [5], [6], [8], [16], [64], [1, 4], [4, 1], [2, 2], [2, 4], [1, 1, 4], []]
        shape = self.pick(shapes)
        value: Any = self.rng.normal(0, 1, shape).round(3).tolist() if shape else float(self.rng.normal())
        if self.rng.random() < 0.1:
            value = [[0.1, 0.2], [0.3]]  # ragged
        message = self.message()
        if self.rng.random() < 0.25:  # the terminal observation of a truncation
            message |= {"REWARD": 1.0, "ACTION": 0, "TRUNCATED": True, "TERMINAL_OBSERVATION": value}
        else:
            message["OBSERVATION"] = value
        return Entry("observation", self.encode(message), words=("OBSERVATION",))

    def wrong_type(self) -> Entry:
        key = self.pick(
            ["OBSERVATION", "REWARD", "ACTION", "DONE", "TRUNCATED", "DETERMINISTIC", "ENV_ID", "WEIGHTS"]
        )
        message = self.message(step=key in ("REWARD", "ACTION"))
        bad = {
            "OBSERVATION": [
                ["a", "b", "c", "d"],
                [1, "2", 3, 4],
                [1, True, 0, 0],
                [None] * 4,
                {"x": 1},
                "1,2,3,4",
                True,
                None,
            ],
            "REWARD": ["1", True, None, [1.0], {"r": 1}, "NaN"],
            "ACTION": [1.0, 2, -1, 7, True, "0", None, [0, 1], [[0]], 0.5],
            "DONE": ["true", 2, -1, 0.5, None, [True], {"a": 1}],
            "TRUNCATED": ["true", 2, 0.5, None, [True]],
            "DETERMINISTIC": ["false", 3, 1.0, None, [False]],
            "ENV_ID": ["", "e" * int(self.rng.integers(257, 400)), ["e0"], {"e": 0}, True, 1.5, None],
        }
        if key == "WEIGHTS":  # SET with WEIGHTS that is not a map from component IDs
            weights = self.pick([self.vector(N_PARAMS), COMPONENT, 5, None, {1: self.vector(4)}, True])
            fields = packed({"CMD": "SET", "WEIGHTS": weights})  # msgpack: integer keys are possible
            return Entry("evolution", fields, words=("WEIGHTS",))
        message[key] = self.pick(bad[key])
        return Entry("observation", self.encode(message), words=(key,))

    def non_finite(self) -> Entry:
        v = int(self.rng.integers(4))
        special = self.pick([math.nan, math.inf, -math.inf, 1e39, -3.5e38, 1e300])
        message = self.message()
        if v == 0:
            message["OBSERVATION"][int(self.rng.integers(4))] = special
            return Entry("observation", self.encode(message), words=("OBSERVATION", "finite"))
        if v == 1:
            message |= {"REWARD": self.pick([math.nan, math.inf, -math.inf]), "ACTION": 1}
            if self.rng.random() < 0.3:  # an integer beyond the float range: JSON only
                return Entry("observation", {**plain(message), b"REWARD": b"9" * 400}, words=("REWARD",))
            return Entry("observation", self.encode(message), words=("REWARD", "finite"))
        if v == 2:
            terminal = self.obs()
            terminal[int(self.rng.integers(4))] = special
            message |= {"REWARD": 1.0, "ACTION": 1, "TRUNCATED": True, "TERMINAL_OBSERVATION": terminal}
            return Entry("observation", self.encode(message), words=("TERMINAL_OBSERVATION", "finite"))
        vector = self.vector(N_PARAMS)  # a SET naming this model, with a NaN or infinity
        vector[int(self.rng.integers(N_PARAMS))] = self.pick([math.nan, math.inf, -math.inf])
        value: Any = np.asarray(vector, "<f4").tobytes() if self.rng.random() < 0.5 else vector
        fields = (
            self.encode({"CMD": "SET", "WEIGHTS": {COMPONENT: value}})
            if isinstance(value, list)
            else packed({"CMD": "SET", "WEIGHTS": {COMPONENT: value}})
        )
        return Entry("evolution", fields, words=("WEIGHTS", "finite"))

    def huge_array(self) -> Entry:
        v = int(self.rng.integers(4))
        if v == 0:  # an OBSERVATION beyond the size cap, either encoding
            n = CAP // 8 + int(self.rng.integers(1, 1000))
            fields = self.encode(
                {**self.message(), "OBSERVATION": self.rng.normal(0, 1, n).round(5).tolist()}
            )
            assert sum(len(k) + len(x) for k, x in fields.items()) > CAP
            return Entry("observation", fields, words=("exceeds", "bytes"), oversized=True)
        if v == 1:  # a SET of too many float32 weights, beyond the cap
            blob = self.rng.normal(0, 1, CAP // 4 + int(self.rng.integers(1, 500))).astype("<f4").tobytes()
            return Entry(
                "evolution",
                packed({"CMD": "SET", "WEIGHTS": {COMPONENT: blob}}),
                words=("exceeds",),
                oversized=True,
            )
        if v == 2:  # a big array under the cap: the wrong shape
            n = int(self.rng.integers(500, 3000))
            fields = self.encode({**self.message(), "OBSERVATION": self.rng.integers(-9, 10, n).tolist()})
            return Entry("observation", fields, words=("OBSERVATION", "shape"))
        depth = int(self.rng.integers(2000, 12000))  # nested beyond any parser's stack
        if self.rng.random() < 0.5:
            return Entry(
                "observation", {b"OBSERVATION": b"[" * depth + b"1" + b"]" * depth}, words=("OBSERVATION",)
            )
        return Entry(
            "observation",
            {DATA_FIELD: b"\x81\xabOBSERVATION" + b"\x91" * depth + b"\x00"},
            words=("msgpack",),
        )

    def unknown_command(self) -> Entry:
        v = int(self.rng.integers(4))
        if v == 0:
            cmd = self.pick(
                ["get", "set", "Get", "DELETE", "FLUSHALL", "PING", "EVAL", "", "GET ", "SET\x00", "GETS"]
            )
            return Entry("evolution", self.encode({"CMD": cmd}), words=("CMD",))
        if v == 1:
            cmd = self.pick([1, None, True, ["GET"], {"GET": 1}, 0.0])
            return Entry("evolution", self.encode({"CMD": cmd, "WEIGHTS": {}}), words=("CMD",))
        if v == 2:  # no CMD: an observation (or weights alone) on the command stream
            message = self.pick([self.message(), {"WEIGHTS": {COMPONENT: self.vector(N_PARAMS)}}])
            return Entry("evolution", self.encode(message), words=("CMD",))
        # a command on the observation stream
        return Entry("observation", self.encode({"CMD": self.pick(["GET", "SET"])}), words=("OBSERVATION",))

    def wrong_length_weights(self) -> Entry:
        n = int(self.pick([0, 1, N_PARAMS - 1, N_PARAMS + 1, int(self.rng.integers(2, 2 * N_PARAMS))]))
        n += n == N_PARAMS
        weights: dict[str, Any] = {COMPONENT: self.vector(n)}
        if self.rng.random() < 0.4:  # float32 bytes: wrong count, or not a multiple of 4
            blob = np.asarray(weights[COMPONENT], "<f4").tobytes()
            weights[COMPONENT] = self.pick(
                [blob, np.zeros(N_PARAMS, "<f4").tobytes()[: -int(self.rng.integers(1, 4))]]
            )
        if self.rng.random() < 0.3:
            weights["m2"] = self.vector(N_PARAMS)  # a valid vector for another model does not help
        fields = packed({"CMD": "SET", "WEIGHTS": weights})
        if not any(isinstance(w, bytes) for w in weights.values()) and self.rng.random() < 0.5:
            fields = plain({"CMD": "SET", "WEIGHTS": weights})
        return Entry("evolution", fields, words=("WEIGHTS", str(N_PARAMS)))

    def set_unknown_model(self) -> Entry:
        """A SET naming only other models: ignored by this one (no reply, no dead letter, no change)."""
        value = self.pick([self.vector(N_PARAMS), self.vector(3), "junk", None, [math.nan] * 4])
        fields = self.encode({"CMD": "SET", "WEIGHTS": {f"other-{int(self.rng.integers(100))}": value}})
        return Entry("evolution", fields)

    def inconsistent(self) -> Entry:
        v = int(self.rng.integers(6))
        message = self.message(step=True)
        if v == 0:
            del message["OBSERVATION"]
            return Entry("observation", self.encode(message), words=("OBSERVATION",))
        if v in (1, 2):  # REWARD without ACTION, or ACTION without REWARD
            del message[self.pick(["REWARD", "ACTION"])]
            return Entry("observation", self.encode(message), words=("REWARD", "ACTION"))
        if v == 3:
            message = {k: message[k] for k in ("OBSERVATION", "ENV_ID")} | {"TRUNCATED": True}
            message["TERMINAL_OBSERVATION"] = self.obs()
            return Entry("observation", self.encode(message), words=("TRUNCATED",))
        if v == 4:
            message["TRUNCATED"] = True  # without TERMINAL_OBSERVATION
            return Entry("observation", self.encode(message), words=("TERMINAL_OBSERVATION",))
        return Entry("evolution", self.encode({"CMD": "SET"}), words=("WEIGHTS",))


CLASSES = [
    "bad_encoding",
    "truncated_msgpack",
    "wrong_shape",
    "wrong_type",
    "non_finite",
    "huge_array",
    "unknown_command",
    "wrong_length_weights",
    "set_unknown_model",
    "inconsistent",
]
IGNORED = {"set_unknown_model"}  # by the protocol: a SET not naming a model is not for it


# --------------------------------------------------------------------------- valid traffic


class Traffic:
    """Valid rounds: one observation per environment, chained; a GET, then a SET, now and then."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.started: set = set()

    def observation(self, env: Any) -> Entry:
        rng = self.rng
        message: dict[str, Any] = {"OBSERVATION": rng.normal(0, 0.5, 4).round(4).tolist(), "ENV_ID": env}
        if env in self.started and rng.random() > 0.02:  # now and then an environment restarts
            message |= {"REWARD": round(float(rng.normal(1, 0.3)), 3), "ACTION": int(rng.integers(2))}
            u = rng.random()
            if u < 0.05:
                message["DONE"] = True
            elif u < 0.08:
                message |= {
                    "TRUNCATED": True,
                    "TERMINAL_OBSERVATION": rng.normal(0, 0.5, 4).round(4).tolist(),
                }
        self.started.add(env)
        if rng.random() < 0.04:
            message["DETERMINISTIC"] = True
        if rng.random() < 0.03:
            message["COLOR"] = "red"  # unknown keys are ignored
        fields = plain(message) if rng.random() < 0.5 else packed(message)
        return Entry("observation", fields, obs=True)

    def command(self, r: int) -> Entry | None:
        if r % 20 == 5:
            return Entry(
                "evolution", plain({"CMD": "GET"}) if r % 40 == 5 else packed({"CMD": "GET"}), command=True
            )
        if r % 20 == 7:
            vector = self.rng.normal(0, 0.2, N_PARAMS).astype("<f4")
            weights: dict[str, Any] = {COMPONENT: vector.tobytes(), "other": b"\0" * 8}
            if r % 40 == 7:
                return Entry(
                    "evolution", plain({"CMD": "SET", "WEIGHTS": {COMPONENT: vector.tolist()}}), command=True
                )
            return Entry("evolution", packed({"CMD": "SET", "WEIGHTS": weights}), command=True)
        return None


def rounds(n_bad: int, seed: int):
    """Yield the rounds: lists of entries, commands first (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    per_class = math.ceil(n_bad / (len(CLASSES) - len(IGNORED)))
    schedule = [cls for cls in CLASSES for _ in range(per_class)]
    rng.shuffle(schedule)
    bad, valid = Malformed(np.random.default_rng(seed + 1)), Traffic(np.random.default_rng(seed + 2))
    for r, start in enumerate(range(0, len(schedule), BAD_PER_ROUND)):
        entries = []
        for cls in schedule[start : start + BAD_PER_ROUND]:
            entry = getattr(bad, cls)()
            entry.cls = cls
            entries.append(entry)
        entries += [valid.observation(env) for env in ENVS]
        if (command := valid.command(r)) is not None:
            entries.append(command)
        order = rng.permutation(len(entries))
        entries = [entries[i] for i in order]
        yield [e for e in entries if e.stream == "evolution"] + [
            e for e in entries if e.stream == "observation"
        ]


# --------------------------------------------------------------------------- the run


@dataclass
class Figures:
    tried: Counter = field(default_factory=Counter)  # malformed entries published, per class
    dead: Counter = field(default_factory=Counter)  # of those, dead-lettered with a reason
    ignored: Counter = field(default_factory=Counter)  # of those, ignored (SETs for other models)
    valid_obs: int = 0
    answered_obs: int = 0
    valid_commands: int = 0
    answered_commands: int = 0
    updates: int = 0
    rounds: int = 0
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{'class':<22}{'tried':>9}{'dead':>9}{'ignored':>9}"]
        for cls in CLASSES:
            lines.append(f"{cls:<22}{self.tried[cls]:>9}{self.dead[cls]:>9}{self.ignored[cls]:>9}")
        total = (sum(self.tried.values()), sum(self.dead.values()), sum(self.ignored.values()))
        lines.append(f"{'all':<22}{total[0]:>9}{total[1]:>9}{total[2]:>9}")
        lines.append(
            f"valid observations answered: {self.answered_obs} of {self.valid_obs} (each exactly once)"
        )
        lines.append(f"valid commands answered: {self.answered_commands} of {self.valid_commands}")
        lines.append(f"A2C updates: {self.updates}; rounds: {self.rounds}; {self.seconds:.1f} s")
        return "\n".join(lines)


def _id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq)


def _committed(client: redis.Redis, stream: str, last: str) -> bool:
    """The worker's group has read up to ``last`` and has nothing pending: that batch is committed."""
    for group in client.xinfo_groups(stream):
        if group["name"] in (b"model:m1", "model:m1"):
            return _id_key(group["last-delivered-id"]) >= _id_key(last) and group["pending"] == 0
    return False


def start_worker(url: str, log: Any, stream_maxlen: int) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "worker", "model",
        "--redis-url", url, "--prefix", "fz", "--component-id", COMPONENT, "--seed", "0",
        "--batch-size", str(BATCH), "--n-steps", "5", "--max-entry-bytes", str(CAP),
        "--evolution-timeout", "36000", "--stream-maxlen", str(stream_maxlen), "--block-ms", "200",
        "--log-level", "error",
    ]  # fmt: skip
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def control_worker(url: str, client: redis.Redis, stream_maxlen: int) -> ModelWorker:
    settings = ModelSettings(
        _cli_parse_args=False, redis_url=url, prefix="ctl", component_id=COMPONENT, seed=0, batch_size=BATCH,
        n_steps=5, max_entry_bytes=CAP, evolution_timeout=36000, stream_maxlen=stream_maxlen, block_ms=20,
    )  # fmt: skip
    worker = ModelWorker(settings, client)
    worker.start()
    return worker


def decode(fields: Fields) -> dict[str, Any]:
    if DATA_FIELD in fields:
        return msgpack.unpackb(fields[DATA_FIELD], raw=False)
    return {k.decode(): json.loads(v) for k, v in fields.items()}


def run_fuzz(url: str, n_bad: int, seed: int = 0, progress: bool = False) -> Figures:
    """Fuzz a worker process on ``url`` with at least ``n_bad`` malformed entries; check; return figures."""
    client = redis.Redis.from_url(url)
    for pattern in ("fz:*", "ctl:*"):  # this run's keys only
        for key in client.scan_iter(pattern):
            client.delete(key)
    figures, started = Figures(), time.monotonic()
    stream_maxlen = 4 * n_bad + 100_000  # the checks below read the whole dead and logits streams
    expected: dict[tuple[str, str], Entry] = {}  # malformed entries by (stream, ID)
    digests: dict[tuple[str, str], bytes] = {}
    valid_obs: list[str] = []
    valid_commands: list[str] = []
    with tempfile.TemporaryFile() as log:
        proc = start_worker(url, log, stream_maxlen)
        control = control_worker(url, client, stream_maxlen)
        try:
            deadline = time.monotonic() + 120
            while not client.exists("fz:model:m1:info"):  # written once the worker is ready
                assert proc.poll() is None and time.monotonic() < deadline, "the worker did not start"
                time.sleep(0.05)
            base = int(time.time() * 1000) + 1000
            for r, entries in enumerate(rounds(n_bad, seed)):
                ids = [f"{base + r}-{i}" for i in range(len(entries))]  # one order across both streams
                with client.pipeline(transaction=True) as pipe:
                    for entry, entry_id in zip(entries, ids, strict=True):
                        # a producer trims what it writes; these are long consumed when trimmed
                        pipe.xadd(f"fz:{entry.stream}", entry.fields, id=entry_id, maxlen=2000)
                    pipe.execute()
                with client.pipeline(transaction=True) as pipe:
                    for entry, entry_id in zip(entries, ids, strict=True):
                        if entry.cls is None:
                            pipe.xadd(f"ctl:{entry.stream}", entry.fields, id=entry_id, maxlen=2000)
                    pipe.execute()
                assert control.poll() == sum(e.cls is None for e in entries)  # one batch
                for entry, entry_id in zip(entries, ids, strict=True):
                    key = (f"fz:{entry.stream}", entry_id)
                    if entry.cls is not None:
                        figures.tried[entry.cls] += 1
                        expected[key] = Entry(entry.stream, {}, entry.cls, entry.words, entry.oversized)
                        digests[key] = digest(entry.fields)
                    elif entry.obs:
                        valid_obs.append(entry_id)
                    else:
                        valid_commands.append(entry_id)
                last = {}
                for entry, entry_id in zip(entries, ids, strict=True):
                    last[entry.stream] = entry_id
                deadline = time.monotonic() + 60
                while not all(_committed(client, f"fz:{s}", i) for s, i in last.items()):
                    assert proc.poll() is None, f"the worker died in round {r}"
                    assert time.monotonic() < deadline, f"the worker is stuck in round {r}"
                    time.sleep(0.001)
                figures.rounds = r + 1
                if progress and r % 100 == 0:
                    print(f"round {r}: {sum(figures.tried.values())} malformed entries so far", flush=True)
            assert proc.poll() is None, "the worker died"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
        log.seek(0)
        output = log.read().decode(errors="replace")
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "internal error" not in output, output[-3000:]

    # Every malformed entry is dead, with its reason, origin and fields; nothing else is.
    seen: set[tuple[str, str]] = set()
    for _, letter in client.xrange("fz:dead"):
        key = (letter[b"dead:stream"].decode(), letter[b"dead:id"].decode())
        assert key in expected, f"a valid entry was dead-lettered: {key} {letter.get(b'dead:reason')!r}"
        assert key not in seen, f"dead-lettered twice: {key}"
        seen.add(key)
        entry, reason = expected[key], letter[b"dead:reason"].decode()
        assert entry.cls not in IGNORED, f"{entry.cls} {key} was dead-lettered: {reason}"
        assert reason and not reason.startswith("internal error"), (entry.cls, reason)
        for word in entry.words:
            assert word in reason, f"{entry.cls}: {reason!r} does not mention {word!r}"
        assert letter[b"dead:component_id"] == COMPONENT.encode()
        original = {k: v for k, v in letter.items() if not k.startswith(b"dead:")}
        if entry.oversized:
            assert original == {} and int(letter[b"dead:size"]) > CAP, (entry.cls, reason)
        else:
            assert digest(original) == digests[key], f"{entry.cls}: fields not copied verbatim"
        figures.dead[entry.cls] += 1
    for key, entry in expected.items():
        if entry.cls in IGNORED:
            figures.ignored[entry.cls] += 1
        else:
            assert key in seen, f"{entry.cls} {key} was not dead-lettered"

    # Every valid observation answered exactly once, with the control's logits. (Two processes agree
    # to float32 rounding, not bit for bit: torch's CPU kernels may sum in another order.)
    replies = {}
    for _, fields in client.xrange("fz:logits"):
        reply = decode(fields)
        assert reply["OBS_ID"] not in replies, f"answered twice: {reply['OBS_ID']}"
        replies[reply["OBS_ID"]] = reply["LOGITS"]
    control_replies = {(r := decode(f))["OBS_ID"]: r["LOGITS"] for _, f in client.xrange("ctl:logits")}
    assert set(replies) == set(valid_obs) == set(control_replies)
    np.testing.assert_allclose(
        [replies[i] for i in valid_obs], [control_replies[i] for i in valid_obs], **TOLERANCE
    )
    figures.valid_obs, figures.answered_obs = len(valid_obs), len(replies)

    # Every valid command answered once, as the control did: GETs with the same weights.
    answers = [decode(f) for _, f in client.xrange("fz:weights")]
    control_answers = [decode(f) for _, f in client.xrange("ctl:weights")]
    assert [a["REQUEST_ID"] for a in answers] == valid_commands == [a["REQUEST_ID"] for a in control_answers]
    for answer, control_answer in zip(answers, control_answers, strict=True):
        assert answer.keys() == control_answer.keys()
        if "WEIGHTS" in answer:
            np.testing.assert_allclose(answer["WEIGHTS"], control_answer["WEIGHTS"], **TOLERANCE)
    figures.valid_commands, figures.answered_commands = len(valid_commands), len(answers)

    # Learning saw exactly the valid traffic: the same transitions, segments and updates as the
    # control, which never saw a bad entry, and the same weights, all finite.
    counters = ModelStore(client, Streams("fz"), COMPONENT).load().counters
    for name in ("observations", "transitions", "dropped", "segments", "discarded", "updates", "commands"):
        assert getattr(counters, name) == getattr(control.counters, name), name
    assert counters.dead == sum(figures.dead.values()) and control.counters.dead == 0
    assert counters.updates > 0
    figures.updates = counters.updates
    policy = make_policy(control.settings)
    policy.load_state_dict(unpack_state(client.hget("fz:model:m1:checkpoint", "policy")))
    weights = weights_as_vector(policy)
    assert np.isfinite(weights).all()
    np.testing.assert_allclose(weights, weights_as_vector(control.policy), **TOLERANCE)
    control.shutdown()
    figures.seconds = time.monotonic() - started
    client.close()
    return figures


@pytest.mark.slow
def test_fuzz_a_live_worker(real_redis, redis_server_url) -> None:
    figures = run_fuzz(redis_server_url, 10_000)
    print("\n" + figures.table())
    assert sum(figures.dead.values()) >= 10_000
    assert all(figures.tried[cls] > 0 for cls in CLASSES)


# --------------------------------------------------------------------------- mutated valid entries


TEMPLATES = [
    {"OBSERVATION": [0.1, -0.2, 0.3, 0.4], "ENV_ID": "h", "REWARD": 1.0, "ACTION": 1},
    {"OBSERVATION": [0.0, 0.5, -0.5, 1.0], "ENV_ID": 3, "REWARD": 0.5, "ACTION": 0, "TRUNCATED": True,
     "TERMINAL_OBSERVATION": [1.0, 1.0, 1.0, 1.0]},
    {"OBSERVATION": [1, 2, 3, 4], "DONE": True, "DETERMINISTIC": False},
]  # fmt: skip


@st.composite
def mutated(draw) -> Fields:
    """A valid observation, in either encoding, with a few bytes cut, flipped or inserted."""
    template = draw(st.sampled_from(TEMPLATES))
    fields = packed(template) if draw(st.booleans()) else plain(template)
    key = draw(st.sampled_from(sorted(fields)))
    value = bytearray(fields[key])
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(value)))
        kind = draw(st.sampled_from(["cut", "flip", "insert", "truncate"]))
        if kind == "cut":
            del value[at : at + draw(st.integers(1, 4))]
        elif kind == "flip" and at < len(value):
            value[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            value[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del value[at:]
    return {**fields, key: bytes(value)}


@pytest.fixture(scope="module")
def mutation_worker(redis_server_url):
    client = redis.Redis.from_url(redis_server_url)
    for key in client.keys("mut:*"):
        client.delete(key)
    settings = ModelSettings(_cli_parse_args=False, prefix="mut", component_id="m1", seed=0, block_ms=10)
    worker = ModelWorker(settings, client)
    worker.start()
    yield worker
    client.close()


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=mutated())
def test_mutated_entries_are_answered_or_dead(mutation_worker: ModelWorker, fields: Fields) -> None:
    """A valid entry with bytes cut, flipped or inserted: answered if still valid, else dead; no crash."""
    worker, client = mutation_worker, mutation_worker.redis
    before, dead_before = weights_as_vector(worker.policy).copy(), client.xlen("mut:dead")
    logits_before = client.xlen("mut:logits")
    entry_id = client.xadd("mut:observation", fields).decode()
    assert worker.poll() == 1
    dead = client.xrevrange("mut:dead", count=1) if client.xlen("mut:dead") > dead_before else []
    if dead:
        letter = dead[0][1]
        assert letter[b"dead:id"].decode() == entry_id and letter[b"dead:reason"]
        assert not letter[b"dead:reason"].startswith(b"internal error"), letter[b"dead:reason"]
        assert client.xlen("mut:logits") == logits_before
        np.testing.assert_array_equal(weights_as_vector(worker.policy), before)
    else:
        [(_, reply)] = client.xrevrange("mut:logits", count=1)
        assert decode(reply)["OBS_ID"] == entry_id
    assert np.isfinite(weights_as_vector(worker.policy)).all()
    assert client.xpending("mut:observation", "model:m1")["pending"] == 0


# --------------------------------------------------------------------------- long form


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--entries",
        type=int,
        default=90_000,
        help="malformed entries that must be dead (90000: 10000 a class)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="default: a private redis-server"
    )
    args = parser.parse_args(argv)
    if args.redis_url:
        figures = run_fuzz(args.redis_url, args.entries, args.seed, progress=True)
    else:
        with embedded_redis() as url:
            figures = run_fuzz(url, args.entries, args.seed, progress=True)
    print(figures.table())
    print(
        "all checks passed: no crash, every malformed entry dead with its reason, every valid entry answered"
        " once, weights finite and equal to the control's"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
