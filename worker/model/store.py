"""A model's state in Redis and the one transaction that moves it forward.

Keys, all under ``<prefix>:model:<COMPONENT_ID>``:

- ``:checkpoint`` hash: ``policy`` and ``optimizer`` (msgpack state dicts), ``normalization`` (the
  running statistics of ``--normalize-obs``/``--normalize-reward``), ``meta`` (counters, pause),
  ``version`` (commits so far), ``format`` (:data:`CHECKPOINT_FORMAT`: a checkpoint of another
  format is refused, never misread)
- ``:memory`` hash: one field per ENV_ID, that environment's :class:`~worker.model.memory.EnvMemory`
  (deleted once the environment has been silent for ``--memory-ttl`` seconds)
- ``:lease`` string: the consumer allowed to commit; it expires when its worker dies
- ``:policy`` hash: what local clients act with: ``format``, ``spec`` (JSON: spaces and network),
  ``weights`` (little-endian float32), ``updates`` (of those weights), ``seen`` (the newest inbox
  entry committed); written by the commits that change them

Why one atomic commit per batch: the batch's replies, the memory it changed, the checkpoint it
trained and the XACK of its entries must become visible together. A worker killed before the commit
leaves its entries pending and the state as it was, so its successor replays them to the same
result; a worker killed after it has nothing left to do. Either way no transition is lost or trained
on twice. The commit is one Lua script (``commit.lua``, beside this module), atomic as a MULTI/EXEC,
which first checks two fences: the lease (a worker replaced by a successor cannot commit over it;
one whose lease merely expired during a long batch, with no successor, takes it back) and the
checkpoint's version (a worker whose state is not the
last commit's, because it took back an expired lease after a successor committed, or because
redis-py resent this very commit after losing its reply, cannot commit either; it reloads).

Redis that comes back empty (a restart without persistence, a ``FLUSHALL``) has lost the last
commit, but the worker still holds it: it writes it back (:meth:`ModelStore.write_back`, a commit
whose version fence expects no checkpoint at all), so a model never silently starts afresh.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import msgpack
import redis

from worker.common import logs, lua
from worker.common.serve import Interrupted
from worker.common.trimming import StreamTrim
from worker.model.learner import Counters, Snapshot
from worker.model.memory import FORMAT_HINT, FormatError
from worker.protocol import Streams

log = logs.get(__name__)

COMMIT = lua.source(__package__, "commit.lua", sections=True)
MAX_MESSAGE_FIELDS = 1000  # field/value pairs per XADD (one unpack of twice as many values)
CHECKPOINT_FORMAT = 1  # the layout of the checkpoint hash and its blobs


@dataclass(frozen=True)
class ReplicaWait:
    """After each commit, wait until ``replicas`` replicas hold it, at most ``timeout_ms`` (Redis
    ``WAIT``). Replication is asynchronous: a primary that dies loses the commits it acknowledged
    but had not sent on, and the replica promoted in its place resumes from before them. Waiting
    shrinks that window to the commits that timed out, at the price of a round trip to a replica.

    :param replicas: replicas that must acknowledge each commit; 0: do not wait
    :param timeout_ms: the longest wait; a commit is never undone when it runs out, only counted,
        and the commits after it are not waited for (one a second looks whether the replicas caught up)
    """

    replicas: int = 0
    timeout_ms: int = 1000


class LostLease(Interrupted):
    """This worker may no longer commit from its local state: another consumer holds the lease, or
    the stored checkpoint is not the version the local state grew from. Reload."""

    event = "lease lost, reloading"


class CommitRefused(Interrupted):
    """Redis refused a commit before writing anything (a key of the wrong type, a consumer group
    gone, a command the ACL user may not run): nothing changed; retry after a pause."""

    event = "commit refused, reloading"


@dataclass
class Batch:
    """Everything one commit applies, at once.

    :param counters: the counters after the batch; ``counters.version`` is the version the stored
        checkpoint must have (the fence), and the commit stores ``version + 1``
    :param paused_until: unix time until which training is paused (evolution)
    :param memory: env_id -> packed memory of every environment the batch touched
    :param checkpoint: ``policy``/``optimizer`` blobs when the weights changed
    :param messages: (stream, fields) to XADD: replies, weights, dead letters
    :param acks: stream -> entry IDs this batch consumed
    :param forget: environments whose memory is deleted
    :param published: fields of the policy hash to set (weights for local clients, ``seen``)
    """

    counters: Counters
    paused_until: float = 0.0
    memory: dict[str, bytes] = field(default_factory=dict)
    checkpoint: dict[str, bytes] | None = None
    messages: list[tuple[str, Mapping]] = field(default_factory=list)
    acks: dict[str, list[str]] = field(default_factory=dict)
    forget: list[str] = field(default_factory=list)
    published: dict[str, bytes | str] | None = None


class ModelStore:
    """Reads and commits one model's state.

    :param client: a redis-py client (decode_responses must be off: state is binary)
    :param streams: the deployment's names
    :param component_id: the model
    :param consumer: the consumer (lease token) this store commits as
    :param lease_ttl: seconds the lease lives after each commit
    :param trim: how the streams a commit writes are trimmed
    :param reply_ttl: seconds a client's reply stream (``<prefix>:action:<REPLY_TO>``) lives after
        a commit wrote to it, so that the streams of clients gone away vanish
    """

    def __init__(
        self,
        client: redis.Redis,
        streams: Streams,
        component_id: str,
        consumer: str = "",
        lease_ttl: float = 5.0,
        trim: StreamTrim | None = None,
        reply_ttl: float = 3600.0,
        wait: ReplicaWait | None = None,
    ) -> None:
        self.redis = client
        self.wait = wait or ReplicaWait()
        self.unreplicated = 0  # commits fewer than wait.replicas replicas acknowledged in time
        self._replicas_behind = False  # the last wait ran out
        self._probed = 0.0  # monotonic time of the last wait
        self.streams = streams
        self.component_id = component_id
        self.consumer, self.lease_ttl, self.trim = consumer, lease_ttl, trim or StreamTrim()
        self.group = Streams.group(component_id)
        self.checkpoint_key = streams.model_key(component_id, "checkpoint")
        self.memory_key = streams.model_key(component_id, "memory")
        self.lease_key = streams.model_key(component_id, "lease")
        self.info_key = streams.model_key(component_id, "info")
        self.policy_key = streams.model_key(component_id, "policy")
        self.reply_ttl_ms = max(int(reply_ttl * 1000), 1)
        self._private_replies = streams.key("action", "")  # <prefix>:action:, a client's own stream
        self._commit_script = client.register_script(COMMIT)
        # What this store last committed, as written: written back if Redis loses it.
        self.committed = Snapshot(None, None, Counters(), 0.0, {})

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
        """The last committed state (a :class:`Snapshot` with ``policy`` ``None`` if there is none).

        :raises FormatError: the checkpoint has another format than this code's
        """
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.checkpoint_key)
            pipe.hgetall(self.memory_key)
            checkpoint, memory = pipe.execute()
        if not checkpoint:
            return Snapshot(None, None, Counters(), 0.0, {k.decode(): v for k, v in memory.items()})
        found = checkpoint.get(b"format", b"none").decode()
        if found != str(CHECKPOINT_FORMAT):
            raise FormatError(
                f"{self.checkpoint_key} has checkpoint format {found}, this code reads format"
                f" {CHECKPOINT_FORMAT}: {FORMAT_HINT}"
            )
        meta = msgpack.unpackb(checkpoint[b"meta"])
        paused_until = float(meta.pop("paused_until", 0.0))
        meta["version"] = int(checkpoint[b"version"])  # the fence: what the next commit grows from
        return Snapshot(
            policy=checkpoint.get(b"policy"),
            optimizer=checkpoint.get(b"optimizer"),
            counters=Counters(**meta),
            paused_until=paused_until,
            memory={k.decode(): v for k, v in memory.items()},
            normalization=checkpoint.get(b"normalization"),
        )

    def commit(self, batch: Batch) -> int:
        """Apply ``batch`` atomically (one script, one round trip) and return the version committed;
        or raise :class:`LostLease` and change nothing: when another consumer holds the lease, or the
        stored checkpoint is not ``batch.counters.version`` (a successor committed meanwhile, or
        redis-py retried this very commit after a lost reply: then reloading finds it applied).

        :raises CommitRefused: Redis refused it before writing anything (see the class)
        """
        version = self._apply(batch, fence=batch.counters.version, version=batch.counters.version + 1)
        held = self.committed
        held.counters, held.paused_until = replace(batch.counters, version=version), batch.paused_until
        checkpoint = batch.checkpoint or {}  # as HSET: the fields given replace, the others stay
        held.policy = checkpoint.get("policy", held.policy)
        held.optimizer = checkpoint.get("optimizer", held.optimizer)
        held.normalization = checkpoint.get("normalization", held.normalization)
        held.memory.update(batch.memory)
        for env in batch.forget:
            held.memory.pop(env, None)
        return version

    def last_commit(self) -> Snapshot:
        """The last commit, which :attr:`committed` becomes: what Redis holds, or this store's own
        last commit written back if Redis lost its checkpoint (it came back empty). A stored
        checkpoint older than ours (Redis restored from an older snapshot) stays the truth, as the
        streams went back with it."""
        stored, held = self.load(), self.committed
        if held.policy is None:
            self.committed = stored
            return stored
        versions = {
            f"{which}_{counter}": getattr(state.counters, counter)
            for which, state in (("stored", stored), ("held", held))
            for counter in ("version", "transitions", "updates")
        }
        if stored.policy is None:
            log.warning(
                "the checkpoint is gone (Redis came back empty?): writing back the last commit",
                component_id=self.component_id,
                envs=len(held.memory),
                **versions,
            )
            self.write_back(held)
            return held
        if stored.counters.version < held.counters.version:
            log.error(
                "the checkpoint is older than this worker's last commit (a failover lost the newest"
                " writes, or Redis restored an older snapshot): continuing from it, as the streams"
                " went back with it",
                component_id=self.component_id,
                **versions,
            )
        self.committed = stored
        return stored

    def write_back(self, state: Snapshot) -> int:
        """Write a whole committed state into a Redis that lost it (no checkpoint at all: the fence),
        at the version it had; every environment's memory included."""
        assert state.policy is not None and state.optimizer is not None
        batch = Batch(
            counters=state.counters,
            paused_until=state.paused_until,
            memory=dict(state.memory),
            checkpoint={"policy": state.policy, "optimizer": state.optimizer}
            | ({"normalization": state.normalization} if state.normalization else {}),
        )
        return self._apply(batch, fence=0, version=state.counters.version)

    def _apply(self, batch: Batch, fence: int, version: int) -> int:
        meta = {**asdict(batch.counters), "paused_until": batch.paused_until}
        del meta["version"]  # stored once, as the fence reads it
        streams: dict[str, int] = {}  # stream -> its index in KEYS

        def key(stream: str) -> int:
            return streams.setdefault(stream, len(streams) + 5)

        args: list[Any] = []  # after the fixed arguments and the reply streams (known at the end)
        state = {"meta": msgpack.packb(meta), "version": version, "format": CHECKPOINT_FORMAT}
        args += lua.fields({**state, **(batch.checkpoint or {})})
        args += lua.fields(batch.memory)
        args += lua.section(list(batch.forget))
        args += lua.fields(batch.published or {})
        acks = {stream: ids for stream, ids in batch.acks.items() if ids}
        args.append(len(acks))
        for stream, ids in acks.items():
            args += [key(stream), *lua.section(ids)]
        args.append(len(batch.messages))
        for stream, fields in batch.messages:
            if not 0 < len(fields) <= MAX_MESSAGE_FIELDS:
                raise ValueError(
                    f"a message for {stream} has {len(fields)} fields (1 to {MAX_MESSAGE_FIELDS})"
                )
            args += [key(stream), *lua.fields(fields)]
        replies = {stream for stream, _ in batch.messages if stream.startswith(self._private_replies)}
        ttl_ms = int(self.lease_ttl * 1000)
        fixed = [self.consumer, ttl_ms, fence, *self.trim.threshold(), self.group, self.reply_ttl_ms]
        args = [*fixed, *lua.section([streams[stream] for stream in sorted(replies)]), *args]
        keys = [self.lease_key, self.checkpoint_key, self.memory_key, self.policy_key, *streams]
        try:
            if self.wait.replicas:
                dropped = self._commit_and_wait(keys, args)
            else:
                dropped = self._commit_script(keys=keys, args=args, client=self.redis)
        except redis.ResponseError as exc:
            if str(exc).startswith(("LOSTLEASE", "STALE")):
                raise LostLease(f"{self.component_id}: {exc}") from None
            if str(exc).startswith(("WRONGTYPE", "NOGROUP", "DENIED")):  # refused before any write
                raise CommitRefused(f"{self.component_id}: {exc}") from None
            raise  # an outage (OOM, READONLY, ...), nothing written either: the serve loop's
        if dropped:
            log.warning(
                "answers not sent: a client's REPLY_TO names a key that is not a stream",
                component_id=self.component_id,
                keys=[key.decode() if isinstance(key, bytes) else key for key in dropped],
            )
        return version

    def _commit_and_wait(self, keys: list[str], args: list[Any]) -> Any:
        """The commit, then ``WAIT``, on one connection: ``WAIT`` counts the replicas that hold the
        writes of its own connection. On a cluster, that is a connection to the primary serving
        the swarm's slot, as the cluster client's map has it."""
        # Once a wait ran out (a replica down, or resyncing), later commits do not wait, and one a
        # second asks again (1 ms, which Redis ends only at its next tick, up to 100 ms later): a
        # primary left without its replica must not slow the loop to one commit per timeout.
        # Commits not waited for are counted as unreplicated.
        probe = not self._replicas_behind or time.monotonic() - self._probed >= 1.0
        if not probe:
            self.unreplicated += 1
            return self._commit_script(keys=keys, args=args, client=self.redis)
        self._probed = time.monotonic()
        timeout_ms = 1 if self._replicas_behind else self.wait.timeout_ms
        node: Any = self.redis
        if isinstance(node, redis.RedisCluster):
            node = node.get_redis_connection(node.get_node_from_key(keys[0]))
        with node.pipeline(transaction=False) as pipe:
            self._commit_script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.wait.replicas, timeout_ms)
            try:
                dropped, acknowledged = pipe.execute(raise_on_error=False)
            except redis.exceptions.NoPermissionError as exc:  # SCRIPT EXISTS, before any write
                raise CommitRefused(f"{self.component_id}: {exc}") from None
        if isinstance(dropped, redis.exceptions.MovedError | redis.exceptions.AskError):
            # The slot moved (a failover): nothing was written. The serve loop starts again,
            # through the cluster client, which follows the MOVED and learns the new map.
            raise redis.exceptions.TryAgainError(f"the swarm's slot moved: {dropped}")
        if isinstance(dropped, Exception):
            raise dropped  # refused before any write, as without the wait
        if isinstance(acknowledged, Exception):  # the commit stands; only its wait was refused
            if not self.unreplicated:
                log.error(
                    "WAIT refused: commits are not waited for (the ACL user needs +wait)",
                    component_id=self.component_id,
                    error=str(acknowledged),
                )
            acknowledged = 0
        self._replicas_behind = acknowledged < self.wait.replicas
        if self._replicas_behind:
            self.unreplicated += 1
            if self.unreplicated == 1 or self.unreplicated % 1000 == 0:
                log.warning(
                    "commits not acknowledged by --wait-replicas replicas in time",
                    component_id=self.component_id,
                    replicas=acknowledged,
                    wanted=self.wait.replicas,
                    timeout_ms=self.wait.timeout_ms,
                    commits=self.unreplicated,
                )
        return dropped

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
