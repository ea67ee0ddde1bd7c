"""A model's state in Redis and the one transaction that moves it forward.

Keys, all under ``<prefix>:model:<COMPONENT_ID>``:

- ``:checkpoint`` hash: ``policy`` and ``optimizer`` (msgpack state dicts), ``meta`` (counters, pause),
  ``version`` (commits so far)
- ``:memory`` hash: one field per ENV_ID, that environment's :class:`~worker.memory.EnvMemory`
  (deleted once the environment has been silent for ``--memory-ttl`` seconds)
- ``:lease`` string: the consumer allowed to commit; it expires when its worker dies

Why one atomic commit per batch: the batch's replies, the memory it changed, the checkpoint it
trained and the XACK of its entries must become visible together. A worker killed before the commit
leaves its entries pending and the state as it was, so its successor replays them to the same
result; a worker killed after it has nothing left to do. Either way no transition is lost or trained
on twice. The commit is one Lua script (:data:`worker.scripts.COMMIT`), atomic as a MULTI/EXEC,
which first checks two fences: the lease (a worker that lost it, paused too long or replaced,
cannot commit over its successor) and the checkpoint's version (a worker whose state is not the
last commit's, because it took back an expired lease after a successor committed, or because
redis-py resent this very commit after losing its reply, cannot commit either; it reloads).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import redis

from worker import scripts
from worker.protocol import Streams
from worker.trimming import StreamTrim


class LostLease(RuntimeError):
    """This worker may no longer commit from its local state: another consumer holds the lease, or
    the stored checkpoint is not the version the local state grew from. Reload."""


class CommitRefused(RuntimeError):
    """Redis refused a commit before writing anything (a key of the wrong type, a consumer group
    gone, out of memory, a command the ACL user may not run): nothing changed; retry after a pause."""


@dataclass
class Counters:
    """Monotonic counters, committed with the state they describe (so they are exact after a crash)."""

    version: int = 0  # commits
    observations: int = 0  # observations answered with logits
    transitions: int = 0  # transitions recorded into rollouts
    dropped: int = 0  # transitions of interrupted rollouts thrown away
    segments: int = 0  # n_steps segments trained on
    discarded: int = 0  # segments completed while training was paused
    updates: int = 0  # A2C gradient steps
    skipped: int = 0  # A2C updates not applied: their gradient was not finite (absurd rewards)
    commands: int = 0  # evolution commands applied
    dead: int = 0  # entries dead-lettered
    forgotten: int = 0  # environments forgotten after memory_ttl seconds without an observation


@dataclass
class Snapshot:
    """What :meth:`ModelStore.load` found; ``policy`` is ``None`` for a model never checkpointed."""

    policy: bytes | None
    optimizer: bytes | None
    counters: Counters
    paused_until: float
    memory: dict[str, bytes]


class ModelStore:
    """Reads and commits one model's state.

    :param client: a redis-py client (decode_responses must be off: state is binary)
    :param streams: the deployment's names
    :param component_id: the model
    """

    def __init__(self, client: redis.Redis, streams: Streams, component_id: str) -> None:
        self.redis = client
        self.streams = streams
        self.component_id = component_id
        self.checkpoint_key = streams.model_key(component_id, "checkpoint")
        self.memory_key = streams.model_key(component_id, "memory")
        self.lease_key = streams.model_key(component_id, "lease")
        self.info_key = streams.model_key(component_id, "info")
        self._commit_script = client.register_script(scripts.COMMIT)

    # ----------------------------------------------------------------- lease

    def acquire(self, token: str, ttl: float) -> str | None:
        """Take or renew the lease; return ``None`` on success, else the current holder."""
        ttl_ms = int(ttl * 1000)
        if self.redis.set(self.lease_key, token, nx=True, px=ttl_ms):
            return None
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.lease_key)
                holder = pipe.get(self.lease_key)
                if holder is not None and holder.decode() != token:
                    return holder.decode()
                pipe.multi()
                pipe.set(self.lease_key, token, px=ttl_ms)
                pipe.execute()
                return None
            except redis.WatchError:
                return "(changed while acquiring)"

    def release(self, token: str) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.lease_key)
                if pipe.get(self.lease_key) == token.encode():
                    pipe.multi()
                    pipe.delete(self.lease_key)
                    pipe.execute()
            except redis.WatchError:
                pass

    # ----------------------------------------------------------------- state

    def load(self) -> Snapshot:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.checkpoint_key)
            pipe.hgetall(self.memory_key)
            checkpoint, memory = pipe.execute()
        meta = msgpack.unpackb(checkpoint[b"meta"]) if b"meta" in checkpoint else {}
        paused_until = float(meta.pop("paused_until", 0.0))
        if b"version" in checkpoint:  # the commit's fence: what the next commit must grow from
            meta["version"] = int(checkpoint[b"version"])
        return Snapshot(
            policy=checkpoint.get(b"policy"),
            optimizer=checkpoint.get(b"optimizer"),
            counters=Counters(**meta),
            paused_until=paused_until,
            memory={k.decode(): v for k, v in memory.items()},
        )

    def commit(
        self,
        token: str,
        ttl: float,
        counters: Counters,
        paused_until: float,
        memory: Mapping[str, bytes],
        checkpoint: Mapping[str, bytes] | None,
        messages: Iterable[tuple[str, Mapping]],
        acks: Mapping[str, list[str]],
        group: str,
        maxlen: int | StreamTrim,
        forget: Collection[str] = (),
    ) -> None:
        """Apply one batch atomically (one script, one round trip), or raise :class:`LostLease` and
        change nothing: when another consumer holds the lease, or the stored checkpoint is not the
        version this worker's state grew from (a successor committed meanwhile, or redis-py retried
        this very commit after a lost reply: then reloading finds it applied).

        :param memory: env_id -> packed memory of every environment the batch touched
        :param checkpoint: ``policy``/``optimizer`` blobs when the weights changed
        :param messages: (stream, fields) to XADD: replies, weights, dead letters
        :param acks: stream -> entry IDs this batch consumed
        :param maxlen: how the streams written are trimmed: a :class:`StreamTrim`, or an approximate MAXLEN
        :param forget: environments whose memory is deleted
        """
        meta = msgpack.packb(
            {**asdict(counters), "version": counters.version + 1, "paused_until": paused_until}
        )
        streams: dict[str, int] = {}  # stream -> its index in KEYS

        def key(stream: str) -> int:
            return streams.setdefault(stream, len(streams) + 4)

        trim = StreamTrim.of(maxlen).threshold()
        args: list[Any] = [token, int(ttl * 1000), counters.version, *trim, group]
        state = {"meta": meta, "version": counters.version + 1, **(checkpoint or {})}
        args += scripts.fields(state)
        args += scripts.fields(memory)
        args += scripts.section(list(forget))
        acks = {stream: ids for stream, ids in acks.items() if ids}
        args.append(len(acks))
        for stream, ids in acks.items():
            args += [key(stream), *scripts.section(ids)]
        messages = list(messages)
        args.append(len(messages))
        for stream, fields in messages:
            if not 0 < len(fields) <= scripts.MAX_MESSAGE_FIELDS:
                raise ValueError(
                    f"a message for {stream} has {len(fields)} fields (1 to {scripts.MAX_MESSAGE_FIELDS})"
                )
            args += [key(stream), *scripts.fields(fields)]
        keys = [self.lease_key, self.checkpoint_key, self.memory_key, *streams]
        try:
            self._commit_script(keys=keys, args=args, client=self.redis)
        except redis.ResponseError as exc:
            if str(exc).startswith(("LOSTLEASE", "STALE")):
                raise LostLease(f"{self.component_id}: {exc}") from None
            refused = isinstance(exc, redis.exceptions.OutOfMemoryError)  # redis-py drops the OOM prefix
            if refused or str(exc).startswith(("WRONGTYPE", "NOGROUP", "DENIED")):  # before any write
                raise CommitRefused(f"{self.component_id}: {exc}") from None
            raise
        counters.version += 1

    # ----------------------------------------------------------------- registry

    def heartbeat(self, info: Mapping[str, str | int | float]) -> None:
        """Announce this model as live; other tools list models by recent heartbeat."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.streams.registry, {self.component_id: time.time()})
            pipe.hset(self.info_key, mapping={k: str(v) for k, v in info.items()})
            pipe.execute()

    def unregister(self) -> None:
        self.redis.zrem(self.streams.registry, self.component_id)


def digest(blob: bytes) -> str:
    """Short SHA-256 of a checkpoint blob (``policy``, ``optimizer``), as a worker logs after a load."""
    return hashlib.sha256(blob).hexdigest()[:16]


def live_models(client: redis.Redis, streams: Streams, max_age: float = 5.0) -> list[str]:
    """Component IDs whose last heartbeat is at most ``max_age`` seconds old."""
    members = client.zrangebyscore(streams.registry, time.time() - max_age, "+inf")
    return sorted(m.decode() if isinstance(m, bytes) else m for m in members)
