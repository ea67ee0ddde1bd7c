"""Bounded streams: what a worker writes (logits, weights, dead) is trimmed on every XADD.

``--trim maxlen`` (the default) appends with ``MAXLEN ~ --stream-maxlen``; ``--trim minid`` with
``MINID ~ <now - --stream-min-age-ms>``. Both are approximate: Redis drops whole macro nodes (of at
most ``stream-node-max-entries`` entries), so a stream may exceed its bound by less than one node.
The input streams are the producers' to trim (the environment runner writes ``observation`` with
``MAXLEN ~``; this test's producer does the same).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from tests.helpers import drain
from worker.common.trimming import StreamTrim
from worker.model.learner import Counters
from worker.model.loop import ModelWorker
from worker.model.settings import ModelSettings
from worker.model.store import Batch, ModelStore
from worker.protocol import Encoding, Streams, encode_entry

pytestmark = pytest.mark.redis_server

WRITTEN = ("rl:logits", "rl:weights", "rl:dead")


def node_size(client: redis.Redis) -> int:
    """Entries per stream macro node: the slack of approximate trimming."""
    return int(client.config_get("stream-node-max-entries")["stream-node-max-entries"])


def entries_added(client: redis.Redis, stream: str) -> int:
    return int(client.xinfo_stream(stream)["entries-added"])


def test_trim_arguments() -> None:
    assert StreamTrim.of(500).xadd_args() == {"maxlen": 500, "approximate": True}
    minid = StreamTrim("minid", min_age_ms=60_000).xadd_args(now=1_700_000_000.0)
    assert minid == {"minid": "1699999940000-0", "approximate": True}
    assert StreamTrim("minid", min_age_ms=10**15).xadd_args()["minid"] == "0-0"
    settings = ModelSettings(_cli_parse_args=["--trim", "minid", "--stream-min-age-ms", "5000"])
    assert settings.trimming == StreamTrim("minid", maxlen=100_000, min_age_ms=5000)
    assert ModelSettings(_cli_parse_args=False, stream_maxlen=7).trimming == StreamTrim("maxlen", maxlen=7)


def test_written_streams_stay_bounded(real_redis, settings) -> None:
    """A long run of traffic, bad entries and evolution commands: the written streams stay near MAXLEN."""
    maxlen, slack = 300, node_size(real_redis)
    worker = ModelWorker(settings.model_copy(update={"stream_maxlen": maxlen, "batch_size": 64}), real_redis)
    worker.start()
    rng = np.random.default_rng(0)
    envs = [f"env-{k}" for k in range(8)]
    longest = dict.fromkeys(WRITTEN, 0)
    sent = 0
    for chunk in range(40):
        with real_redis.pipeline(transaction=False) as pipe:
            for step in range(25):
                for env in envs:
                    message = {"OBSERVATION": rng.normal(0, 0.5, 4).tolist(), "ENV_ID": env}
                    if chunk or step:
                        message |= {"REWARD": 1.0, "ACTION": int(rng.integers(2))}
                    fields = encode_entry(message, Encoding.MSGPACK)
                    pipe.xadd("rl:observation", fields, maxlen=2000, approximate=True)  # a trimming producer
                    sent += 1
                pipe.xadd("rl:observation", {"OBSERVATION": "[1, 2]"}, maxlen=2000, approximate=True)  # dead
            command = {"CMD": "GET"} if chunk % 2 == 0 else {"CMD": "SET", "WEIGHTS": {"other": [0.0]}}
            pipe.xadd("rl:evolution", encode_entry(command, Encoding.JSON), maxlen=2000, approximate=True)
            pipe.execute()
        drain(worker)
        for stream in WRITTEN:
            longest[stream] = max(longest[stream], real_redis.xlen(stream))

    assert worker.counters.observations == sent == 8000
    assert entries_added(real_redis, "rl:logits") == sent
    assert entries_added(real_redis, "rl:dead") == 40 * 25 == worker.counters.dead
    assert entries_added(real_redis, "rl:weights") == 20
    for stream in ("rl:logits", "rl:dead"):
        assert maxlen <= longest[stream] < maxlen + slack, (stream, longest[stream])
    assert longest["rl:weights"] == 20  # never reached its bound
    assert real_redis.xlen("rl:observation") < 2000 + slack  # the producer's own trimming


def old_entries(client: redis.Redis, stream: str, age_ms: int, n: int) -> list[str]:
    """``n`` entries whose IDs say they were added ``age_ms`` ago."""
    ms = int(time.time() * 1000) - age_ms
    with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(stream, {"OLD": str(i)}, id=f"{ms}-{i}")
        return [i.decode() for i in pipe.execute()]


def test_minid_trims_by_age(real_redis) -> None:
    """``ModelStore.commit`` with ``--trim minid``: entries older than the age go, younger ones stay."""
    slack = node_size(real_redis)
    old = old_entries(real_redis, "rl:logits", age_ms=600_000, n=1000)  # ten minutes old
    recent = old_entries(real_redis, "rl:logits", age_ms=1_000, n=50)  # one second old
    minid = StreamTrim("minid", min_age_ms=60_000)
    store = ModelStore(real_redis, Streams("rl"), "m1", consumer="me", trim=minid)
    assert store.acquire("me", 5.0) is None
    messages = [("rl:logits", {"NEW": "1"})]
    version = store.commit(Batch(Counters(), messages=messages))

    left = [i.decode() for i, _ in real_redis.xrange("rl:logits")]
    assert set(recent) <= set(left)  # younger than a minute: all kept
    assert len(set(old) & set(left)) < slack  # older: gone, but for (part of) one macro node
    assert len(left) <= len(recent) + 1 + slack

    # The same commit with a MAXLEN keeps the newest.
    store = ModelStore(real_redis, Streams("rl"), "m1", consumer="me", trim=StreamTrim("maxlen", maxlen=20))
    store.commit(Batch(Counters(version=version), messages=messages))
    assert 20 <= real_redis.xlen("rl:logits") < 20 + slack


def test_worker_trims_by_age_with_trim_minid(real_redis, settings) -> None:
    worker = ModelWorker(
        settings.model_copy(update={"trim": "minid", "stream_min_age_ms": 60_000}), real_redis
    )
    worker.start()
    old = old_entries(real_redis, "rl:logits", age_ms=600_000, n=1000)
    real_redis.xadd("rl:observation", encode_entry({"OBSERVATION": [0.0] * 4}, Encoding.JSON))
    drain(worker)
    assert len(set(old) & {i.decode() for i, _ in real_redis.xrange("rl:logits")}) < node_size(real_redis)
