"""Takeover of a dead consumer's entries, entries that keep killing workers, the lease, key layout."""

from __future__ import annotations

import time

import msgpack
import pytest
import redis

from tests.helpers import drain, read, xadd
from worker.common.connections import ensure_group
from worker.common.registry import live_models
from worker.model.learner import Counters
from worker.model.loop import ModelWorker
from worker.model.memory import FormatError
from worker.model.settings import ModelSettings
from worker.model.store import Batch, CommitRefused, LostLease, ModelStore
from worker.protocol import Streams

OBS = [0.0, 0.1, 0.0, -0.1]


def test_entries_of_a_dead_consumer_are_replayed_in_order(any_redis, settings: ModelSettings) -> None:
    ensure_group(any_redis, "rl:observation", "model:m1")
    ids = [
        xadd(
            any_redis,
            "rl:observation",
            {"OBSERVATION": OBS, "ENV_ID": "e", **({"REWARD": 1.0, "ACTION": 1} if t else {})},
        )
        for t in range(6)
    ]
    any_redis.xreadgroup("model:m1", "ghost", {"rl:observation": ">"}, count=4)  # read, never committed

    worker = ModelWorker(settings, any_redis)
    worker.start()
    drain(worker)
    assert [r["OBS_ID"] for _, r in read(any_redis, "rl:logits")] == ids
    assert worker.counters.transitions == 5
    assert any_redis.xpending("rl:observation", "model:m1")["pending"] == 0


def test_an_entry_that_keeps_killing_workers_goes_to_dead(any_redis, settings: ModelSettings) -> None:
    ensure_group(any_redis, "rl:observation", "model:m1")
    killer = xadd(any_redis, "rl:observation", {"OBSERVATION": OBS})
    any_redis.xreadgroup("model:m1", "ghost-0", {"rl:observation": ">"})
    for n in range(1, 4):  # three more workers claimed it and died
        any_redis.xclaim("rl:observation", "model:m1", f"ghost-{n}", 0, [killer])

    worker = ModelWorker(settings.model_copy(update={"max_deliveries": 3}), any_redis)
    worker.start()
    [(_, letter)] = read(any_redis, "rl:dead")
    assert letter["dead:id"] == killer and "delivered 5 times" in letter["dead:reason"]
    assert read(any_redis, "rl:logits") == []
    assert any_redis.xpending("rl:observation", "model:m1")["pending"] == 0


def test_second_worker_waits_for_the_lease_and_a_stale_one_cannot_commit(real_redis, settings) -> None:
    first = ModelWorker(settings, real_redis)
    first.start()
    assert live_models(real_redis, first.streams) == ["m1"]
    # The lease expires (say the first worker froze); a successor takes over.
    real_redis.delete("rl:model:m1:lease")
    second = ModelWorker(
        settings.model_copy(update={"claim_idle_ms": 0, "heartbeat_interval": 0.01}), real_redis
    )
    second.start()
    xadd(real_redis, "rl:observation", {"OBSERVATION": OBS})
    with pytest.raises(LostLease):
        first.poll()
    assert read(real_redis, "rl:logits") == []  # the stale worker published nothing
    time.sleep(0.02)
    assert drain(second) == 1  # and what it had read is reclaimed by the lease holder
    assert len(read(real_redis, "rl:logits")) == 1


def test_a_batch_that_outlasts_the_lease_commits_when_nobody_took_it(any_redis, settings) -> None:
    """A slow batch (images parsed from JSON, a CNN on a busy machine) may take longer than the
    lease: with no successor, its commit takes the lease back instead of failing for ever."""
    worker = ModelWorker(settings, any_redis)
    worker.start()
    step = worker.learner.step

    def slow(run):  # the lease expires while the batch is handled
        any_redis.delete("rl:model:m1:lease")
        return step(run)

    worker.learner.step = slow  # type: ignore[method-assign]
    xadd(any_redis, "rl:observation", {"OBSERVATION": OBS})
    assert drain(worker) == 1 and len(read(any_redis, "rl:logits")) == 1
    assert any_redis.get("rl:model:m1:lease") == worker.consumer.encode()  # held again
    assert any_redis.xpending("rl:observation", "model:m1")["pending"] == 0


def test_a_worker_that_retakes_an_expired_lease_cannot_commit_over_its_successor(any_redis, settings) -> None:
    """The lease alone is not enough: the commit also checks the checkpoint's version."""
    first = ModelWorker(settings, any_redis)
    first.start()
    any_redis.delete("rl:model:m1:lease")  # the first froze; a successor serves and stops
    second = ModelWorker(settings, any_redis)
    second.start()
    xadd(any_redis, "rl:observation", {"OBSERVATION": OBS})
    assert drain(second) == 1
    second.shutdown()
    # The first thaws and its heartbeat takes the free lease again, but its state is two commits old.
    assert first.store.acquire(first.consumer, 5.0) is None  # what its next heartbeat does
    xadd(any_redis, "rl:observation", {"OBSERVATION": OBS})
    with pytest.raises(LostLease, match="STALE"):
        first.poll()
    assert len(read(any_redis, "rl:logits")) == 1


def test_a_commit_sent_twice_applies_once(any_redis, settings) -> None:
    """redis-py resends a command whose reply was lost; the version makes the second one a no-op."""
    store = ModelStore(any_redis, Streams("rl"), "m1", consumer="me")
    assert store.acquire("me", 5.0) is None
    batch = Batch(Counters(), messages=[("rl:logits", {"LOGITS": "[0, 1]"})])
    assert store.commit(batch) == 1
    with pytest.raises(LostLease, match="STALE"):
        store.commit(batch)  # the same commit again, as if its reply was lost
    assert any_redis.xlen("rl:logits") == 1
    assert store.load().counters.version == 1


def test_cluster_hash_tag_prefix_keeps_every_key_under_it(real_redis, settings: ModelSettings) -> None:
    worker = ModelWorker(settings.model_copy(update={"prefix": "{rl}"}), real_redis)
    worker.start()
    xadd(real_redis, "{rl}:observation", {"OBSERVATION": OBS})
    xadd(real_redis, "{rl}:observation", {"OBSERVATION": [1, 2]})
    xadd(real_redis, "{rl}:evolution", {"CMD": "GET"})
    drain(worker)
    keys = sorted(k.decode() for k in real_redis.keys("*"))
    assert keys and all(k.startswith("{rl}:") for k in keys), keys
    assert {"{rl}:logits", "{rl}:dead", "{rl}:weights", "{rl}:model:m1:checkpoint"} <= set(keys)


# --------------------------------------------------------------------------- the commit is all or nothing


def test_an_entry_of_thousands_of_fields_is_dead_lettered_without_them(any_redis, settings) -> None:
    """Its dead letter would not fit one XADD of the commit script: it keeps only size and count."""
    worker = ModelWorker(settings, any_redis)
    worker.start()
    any_redis.xadd("rl:observation", {f"K{i}": "1" for i in range(4000)})
    xadd(any_redis, "rl:observation", {"OBSERVATION": OBS})
    assert drain(worker) == 2
    [(_, letter)] = any_redis.xrange("rl:dead")
    assert letter[b"dead:fields"] == b"4000" and b"K0" not in letter
    assert worker.counters.observations == 1 and len(read(any_redis, "rl:logits")) == 1


def test_a_commit_that_cannot_be_applied_whole_writes_nothing(any_redis, settings) -> None:
    """A key of the wrong type is found before the first write: no half-applied batch, no replay."""
    worker = ModelWorker(settings, any_redis)
    worker.start()
    any_redis.set("rl:logits", "not a stream")
    xadd(any_redis, "rl:observation", {"OBSERVATION": OBS})
    before = any_redis.hgetall("rl:model:m1:checkpoint")
    with pytest.raises(CommitRefused, match="WRONGTYPE rl:logits is a string"):
        worker.poll()
    assert any_redis.hgetall("rl:model:m1:checkpoint") == before
    assert any_redis.xpending("rl:observation", "model:m1")["pending"] == 1  # not acknowledged

    any_redis.delete("rl:logits")  # repaired: a worker that reloads answers the entry once
    successor = ModelWorker(settings, any_redis)
    any_redis.delete("rl:model:m1:lease")
    successor.start()
    assert drain(successor) == 1  # the pending entry, claimed at start
    assert len(read(any_redis, "rl:logits")) == 1 and successor.counters.observations == 1


def test_a_checkpoint_deleted_under_a_running_worker_is_written_back(any_redis, settings) -> None:
    worker = ModelWorker(settings, any_redis)
    worker.start()
    xadd(any_redis, "rl:observation", {"OBSERVATION": OBS})
    drain(worker)
    held = worker.store.load()
    any_redis.delete("rl:model:m1:checkpoint")
    xadd(any_redis, "rl:observation", {"OBSERVATION": OBS})
    with pytest.raises(LostLease, match="STALE the checkpoint is at version 0"):
        worker.poll()
    worker.start()  # what serve() does next: the last commit goes back, at its version
    back = worker.store.load()
    assert back.counters == held.counters and (back.policy, back.optimizer) == (held.policy, held.optimizer)
    assert drain(worker) == 1
    assert worker.store.load().counters.version == worker.counters.version == held.counters.version + 1


def test_stored_state_of_another_format_is_refused(any_redis, settings) -> None:
    worker = ModelWorker(settings, any_redis)
    worker.start()
    xadd(any_redis, "rl:observation", {"OBSERVATION": OBS})
    drain(worker)
    any_redis.hset("rl:model:m1:checkpoint", "format", "2")
    with pytest.raises(FormatError, match="checkpoint format 2, this code reads format 1"):
        worker.store.load()
    any_redis.hdel("rl:model:m1:checkpoint", "format")
    with pytest.raises(FormatError, match="checkpoint format none"):
        worker.store.load()
    any_redis.hset("rl:model:m1:checkpoint", "format", "1")
    any_redis.hset("rl:model:m1:memory", "default", msgpack.packb([7, b"future"]))
    with pytest.raises(FormatError, match="memory has format 7"):
        ModelWorker(settings, any_redis).start()


def test_a_redis_out_of_memory_refuses_the_commit_whole(real_redis) -> None:
    store = ModelStore(real_redis, Streams("rl"), "m1", consumer="me")
    assert store.acquire("me", 5.0) is None
    assert store.commit(Batch(Counters(), checkpoint={"policy": b"p"})) == 1
    real_redis.config_set("maxmemory", 1)  # noeviction, the default: writes that may grow are refused
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError, match="maxmemory"):
            batch = Batch(Counters(version=1), memory={"e": b"m"}, messages=[("rl:logits", {"A": "1"})])
            store.commit(batch)
    finally:
        real_redis.config_set("maxmemory", 0)
    assert real_redis.hget("rl:model:m1:checkpoint", "version") == b"1" and real_redis.xlen("rl:logits") == 0


def test_a_deleted_input_stream_gets_its_group_back(real_redis, settings) -> None:
    worker = ModelWorker(settings, real_redis)
    worker.start()
    xadd(real_redis, "rl:observation", {"OBSERVATION": OBS})
    assert drain(worker) == 1
    real_redis.delete("rl:observation")  # and the group with it
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        worker.poll()
    worker.start()  # what serve() does next
    xadd(real_redis, "rl:observation", {"OBSERVATION": OBS})
    assert drain(worker) == 1 and len(read(real_redis, "rl:logits")) == 2


def test_a_worker_whose_redis_came_back_empty_misses_nothing_published_since(real_redis, settings) -> None:
    """Its groups are made again after the last entry it read, not at the stream's end, so what
    environments published between the flush and the worker noticing is answered too."""
    worker = ModelWorker(settings, real_redis)
    worker.start()
    xadd(real_redis, "rl:observation", {"OBSERVATION": OBS})
    assert drain(worker) == 1
    version = worker.counters.version
    real_redis.flushall()
    xadd(real_redis, "rl:observation", {"OBSERVATION": OBS, "ENV_ID": "after"})  # before it noticed
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        worker.poll()
    worker.start()  # what serve() does next: groups after the last entry read, the last commit back
    assert drain(worker) == 1
    assert [m["ENV_ID"] for _, m in read(real_redis, "rl:logits")] == ["after"]
    assert worker.store.load().counters.version == version + 1
