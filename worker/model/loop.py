"""The model worker: read a batch, answer and learn from it, commit it in one transaction.

One observation's path: ``XREADGROUP`` (:meth:`ModelWorker.poll`) ->
:func:`~worker.protocol.decode_entry` and :func:`~worker.protocol.parse_observation` -> one batched
forward (:meth:`Learner.step <worker.model.learner.Learner.step>`) ->
:func:`~worker.model.memory.observe` turns it into a transition -> :mod:`worker.model.a2c` trains on
the completed segments -> :meth:`~worker.model.store.ModelStore.commit` publishes the logits (an
action, for an observation of the model's inbox: :mod:`worker.model.clients`) and acknowledges the
entry, together with the new memory and checkpoint (and the weights local clients act with).

Its store keeps a copy of what it last committed (:attr:`ModelStore.committed
<worker.model.store.ModelStore.committed>`). Every start
(the first, and again after each outage, lost lease or refused commit) makes the local state equal
to the last commit in Redis; if Redis lost it (it came back empty), the copy is written back.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
import uuid
from dataclasses import replace
from typing import Any

import redis
import torch
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy

from worker.common import logs
from worker.common.board import ModelBoard
from worker.common.connections import ensure_group
from worker.common.draws import Draws
from worker.common.metrics import ModelMetrics
from worker.common.serve import REDIS_ERRORS, Service
from worker.model import clients, reclaim
from worker.model.batches import Entry, Outbox, entries_of, linger
from worker.model.learner import Counters, Learner
from worker.model.memory import FORMAT_HINT, EnvMemory, FormatError
from worker.model.settings import ModelSettings
from worker.model.store import Batch, LostLease, ModelStore, ReplicaWait, digest
from worker.protocol import (
    Command,
    Observation,
    ProtocolError,
    Streams,
    dead_letter,
    decode_entry,
    encode_entry,
    parse_command,
    parse_observation,
    parse_weight_vector,
    set_ack,
    split_id,
    weights_reply,
)

log = logs.get(__name__)


class ModelWorker(Service):
    """One model (component ID): its policy, its per-environment memory, its consumer group.

    :param settings: the worker's settings
    :param client: see :class:`~worker.common.serve.Service`
    """

    def __init__(self, settings: ModelSettings, client: redis.Redis) -> None:
        self.component_id = settings.component_id or uuid.uuid4().hex
        super().__init__(settings, client, log, component_id=self.component_id)
        self.settings: ModelSettings = settings
        if settings.component_id is None:
            log.warning(
                "no component ID given: using a random one, so this model cannot resume",
                component_id=self.component_id,
            )
        self.consumer = settings.consumer or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.group = Streams.group(self.component_id)
        wait = ReplicaWait(settings.wait_replicas, settings.wait_timeout_ms)
        store_settings = (settings.lease_ttl, settings.trimming, settings.reply_ttl, wait)
        self.store = ModelStore(client, self.streams, self.component_id, self.consumer, *store_settings)
        torch.set_num_threads(settings.torch_threads)
        self.learner = Learner(settings)
        self.spaces = self.learner.spaces  # what observations must fit
        self.inbox = self.streams.inbox(self.component_id)
        # Input streams: observations (shared, then this model's own) and commands.
        self._inputs = (self.streams.observation, self.inbox, self.streams.evolution)
        self.publisher = clients.Publisher(settings, self.learner, self.inbox)
        self.draws = Draws(settings.seed)  # the actions sampled for the inbox
        self._started = False
        self._pending_first = True
        self._last_heartbeat = 0.0
        self._suspects: set[str] = set()  # pending entries that may have crashed a predecessor
        self._acked_upto: dict[str, str] = {}  # per input stream, the newest entry ID committed
        self.restored: dict[str, Any] = {}  # what the last load found: see _load
        self.metrics: ModelMetrics = ModelMetrics(self.component_id, self.outages)
        folder = settings.tensorboard_log
        self.board = ModelBoard(folder, self.component_id) if folder is not None else None

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Become the last commit: make the groups, take the lease, load (or write back) the state,
        claim what a predecessor left pending. Called again after every outage or lost lease."""
        for stream in self._inputs:
            after = self._acked_upto.get(stream, "$")
            if ensure_group(self.redis, stream, self.group, after) and self._started:
                log.warning("consumer group was gone: made again after the last entry done", stream=stream)
        self._acquire_lease()
        self._load()
        claimed = self._claim_pending()
        self._heartbeat(force=True)
        event = "reloaded" if self._started else "ready"
        self._started = True
        log.info(
            event,
            component_id=self.component_id,
            consumer=self.consumer,
            envs=len(self.memories),
            reclaimed=claimed,
            params=self.learner.n_params,
            **self.restored,
        )

    def step(self) -> None:
        self.poll()

    def shutdown(self) -> None:
        """Every batch is committed as it completes, so a drained worker only leaves the registry."""
        try:
            self.store.unregister()
            self.store.release(self.consumer)
        except REDIS_ERRORS as exc:
            log.warning("could not release lease", error=str(exc))
        if self.board is not None:
            self.board.dump(self.learner)
            self.board.close()
        reconnects = self.outages.reconnects
        log.info("stopped", component_id=self.component_id, reconnects=reconnects, **vars(self.counters))

    def _acquire_lease(self) -> None:
        announced = False
        while (holder := self.store.acquire(self.consumer, self.settings.lease_ttl)) is not None:
            if self.stopping:
                raise SystemExit(0)
            if not announced:
                log.info("waiting for the lease", holder=holder, ttl=self.settings.lease_ttl)
                announced = True
            time.sleep(min(0.25, self.settings.lease_ttl / 4))

    def _load(self) -> None:
        """Make local state equal to the last commit, writing it back if Redis lost it (or write the
        first checkpoint); :attr:`restored` tells the version and digests of the state as loaded."""
        stored = self.store.last_commit()
        self.publisher.restart()
        try:
            restored = self.learner.restore(stored)
        except FormatError as exc:
            raise FormatError(f"{self.store.memory_key}: {exc}: {FORMAT_HINT}") from None
        if not restored:
            self._commit(Outbox(weights_changed=True), empty=True)  # the first checkpoint
        held = self.store.committed
        assert held.policy is not None and held.optimizer is not None
        self.restored = {"restored": restored, "checkpoint_version": self.counters.version}
        self.restored |= {"policy_sha": digest(held.policy), "optimizer_sha": digest(held.optimizer)}
        self._pending_first = True
        self.metrics.loaded(self.counters)

    def _claim_pending(self, min_idle_ms: int = 0) -> int:
        """Take over entries a dead predecessor read but never committed (we hold the lease).

        At start every pending entry is ours to replay; later, a periodic call with ``min_idle_ms``
        picks up what a stale worker (one that lost the lease mid-batch) read and left behind.
        Likely killers go to the dead stream, suspects are read one at a time (:func:`reclaim.triage`).
        """
        claimed, doomed = 0, Outbox()
        for stream in self._inputs:
            entries = reclaim.claim(self.redis, stream, self.group, self.consumer, min_idle_ms)
            claimed += len(entries)
            buried, suspects = reclaim.triage(entries, self.settings.max_deliveries)
            self._suspects |= suspects
            for entry in buried:
                doomed.acks[stream].append(entry.entry_id)
                self._reject(
                    doomed,
                    (stream, entry.entry_id, entry.fields),
                    f"delivered {entry.deliveries} times without a commit: it may crash the worker",
                    deliveries=entry.deliveries,
                )
        self._commit(doomed)
        if claimed:
            self._pending_first = True
        return claimed

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        # Renew well inside the lease's lifetime, or an idle worker would lose it between reads.
        interval = min(self.settings.heartbeat_interval, self.settings.lease_ttl / 3)
        if force or now - self._last_heartbeat >= interval:
            self._last_heartbeat = now
            if self.store.acquire(self.consumer, self.settings.lease_ttl) is not None:
                self.metrics.lease_losses.inc()
                raise LostLease("lease taken by another consumer")
            self.store.heartbeat(
                {
                    "consumer": self.consumer,
                    "version": self.counters.version,
                    "updates": self.counters.updates,
                    "paused": int(self.learner.paused()),
                    "envs": len(self.memories),
                    "reconnects": self.outages.reconnects,
                    "unreplicated": self.store.unreplicated,
                    "policy_lag": json.dumps(self.learner.lag.summary()),
                    "normalize_obs": int(self.settings.normalize_obs),
                    "spaces": self.spaces.to_json(),
                }
            )
            self.metrics.heartbeat(self.redis, self.group, self._inputs, len(self.memories))
            if self.board is not None:
                self.board.dump(self.learner)
            if not force:
                self._claim_pending(self.settings.claim_idle_ms)

    # ----------------------------------------------------------------- the loop

    def poll(self) -> int:
        """Read one batch (our pending entries first), handle and commit it; return its size."""
        self._heartbeat()
        if self.outages.reconnected():
            self._pending_first = True  # a read whose reply was lost may have left entries on us
        entries = self._read("0", None, 1 if self._suspects else None) if self._pending_first else []
        if not entries:
            self._pending_first = False
            self._suspects.clear()
            entries = self._read(">", min(self.settings.block_ms, int(self.settings.lease_ttl * 1000 / 3)))
            entries = self._linger(entries)
            if self.outages.reconnected():
                # redis-py retried the read on a new connection: an earlier attempt may have delivered
                # entries whose reply was lost. They are pending on us, before these: read them all.
                self._pending_first = True
                entries = self._read("0", None)
        if self._suspects and any(entry[1] in self._suspects for entry in entries):
            for entry in entries:  # one at a time, so only an entry that kills us is blamed
                self.handle([entry])
        elif entries:
            self.handle(entries)
        return len(entries)

    def _linger(self, entries: list[Entry]) -> list[Entry]:
        """Fewer than ``--min-batch`` entries wait up to ``--linger-ms`` for more (:func:`linger`)."""
        s = self.settings
        more = functools.partial(self._read, ">", None)  # new entries, without blocking
        return linger(entries, (s.min_batch, s.batch_size), s.linger_ms, more, self.streams.evolution)

    def _read(self, ids: str, block: int | None, count: int | None = None) -> list[Entry]:
        """XREADGROUP the input streams; ``0`` re-reads our pending entries, ``>`` new ones."""
        count = self.settings.batch_size if count is None else count
        streams = dict.fromkeys(self._inputs, ids)
        reply = self.redis.xreadgroup(self.group, self.consumer, streams, count=count, block=block)
        return entries_of(reply, self.streams.evolution)

    def handle(self, entries: list[Entry]) -> None:
        """Handle and commit ``entries``; a bug triggered by one entry dead-letters only that entry."""
        try:
            outbox = self._process(entries)
        except (*REDIS_ERRORS, LostLease):
            raise
        except Exception as exc:
            log.exception("internal error while handling a batch; isolating", size=len(entries))
            self._load()  # forget whatever the failed batch changed
            if len(entries) > 1:
                for entry in entries:
                    self.handle([entry])
                return
            outbox = Outbox()
            outbox.acks[entries[0][0]].append(entries[0][1])
            self._reject(outbox, entries[0], f"internal error: {type(exc).__name__}: {exc}")
        self._commit(outbox)

    def _process(self, entries: list[Entry]) -> Outbox:
        outbox = Outbox()
        run: list[tuple[Observation, bool]] = []  # each observation, and whether it is the inbox's
        for entry in entries:
            stream, entry_id, fields = entry
            outbox.acks[stream].append(entry_id)
            try:
                message, encoding = decode_entry(fields, self.settings.max_entry_bytes)
                if stream != self.streams.evolution:
                    obs = parse_observation(message, entry_id, encoding, self.spaces)
                    run.append((obs, stream == self.inbox))
                    continue
                command = parse_command(message, entry_id, encoding)
                self._step(run, outbox)  # observations before a command see the weights before it
                run = []
                self._command(command, outbox)
            except ProtocolError as exc:
                self._reject(outbox, entry, str(exc))
        self._step(run, outbox)
        # The observation streams' own time (the evolution stream's need not agree with it).
        observed = [split_id(e[1])[0] for e in entries if e[0] != self.streams.evolution]
        if observed:
            outbox.forgotten_envs = self.learner.forget_silent(max(observed))
        return outbox

    def _step(self, run: list[tuple[Observation, bool]], outbox: Outbox) -> None:
        """Let the learner answer and learn from a run of observations (each with whether it came
        from the inbox, which is answered with an action); queue the replies."""
        observations = [obs for obs, _ in run]
        answers, trained = self.learner.step(observations)
        if self.board is not None:
            self.board.observe(observations)
        outbox.weights_changed |= trained
        outbox.touched_envs.update(obs.env_id for obs, _ in run)
        outbox.answered += [obs.entry_id for obs, _ in run if obs.answer]
        family = self.learner.family
        outbox.messages += clients.replies(run, family, answers, self.component_id, self.streams, self.draws)

    def _command(self, command: Command, outbox: Outbox) -> None:
        """GET publishes the weights and pauses training; SET (naming this model) loads and resumes."""
        if command.cmd == "GET":
            reply = weights_reply(command, self.learner.weights().tolist(), self.component_id)
            self.learner.pause(self.settings.evolution_timeout)
        else:
            assert command.weights is not None
            if self.component_id not in command.weights:
                return  # a SET for other models
            self.learner.load_weights(
                parse_weight_vector(command.weights[self.component_id], self.learner.n_params)
            )
            outbox.weights_changed = outbox.weights_loaded = True
            reply = set_ack(command, self.component_id)
        self.counters.commands += 1
        outbox.messages.append((self.streams.weights, encode_entry(reply, command.encoding)))

    def _reject(self, outbox: Outbox, entry: Entry, reason: str, **history: int) -> None:
        """Queue a dead letter; ``history`` (e.g. ``deliveries``) adds ``dead:<key>`` fields."""
        stream, entry_id, fields = entry
        log.warning("rejected entry", stream=stream, id=entry_id, reason=reason, **history)
        self.counters.dead += 1
        outbox.rejected.append(reason)
        letter = dead_letter(
            fields, stream, entry_id, reason, self.component_id, self.settings.max_entry_bytes
        )
        letter.update({f"dead:{k}".encode(): str(v).encode() for k, v in history.items()})
        outbox.messages.append((self.streams.dead, letter))

    def _commit(self, outbox: Outbox, empty: bool = False) -> None:
        """Commit what ``outbox`` holds; nothing if it consumed no entry, unless ``empty``."""
        if not outbox.acks and not empty:
            return
        learner = self.learner
        touched = [env for env in outbox.touched_envs | learner.taken_envs if env in learner.memories]
        batch = Batch(
            counters=replace(learner.counters),
            paused_until=learner.paused_until,
            memory={env: learner.memories[env].pack() for env in touched},
            checkpoint=learner.checkpoint(outbox.weights_changed),
            messages=outbox.messages,
            acks=outbox.acks,
            forget=outbox.forgotten_envs,
            published=self.publisher.fields(outbox.acks, outbox.weights_loaded),
        )
        try:
            learner.counters.version = self.store.commit(batch)
        except LostLease:
            self.metrics.lease_losses.inc()
            raise
        self.metrics.committed(batch.acks, outbox.answered, outbox.rejected, batch.counters)
        learner.taken_envs.clear()
        self.publisher.committed(batch.published)
        for stream, ids in batch.acks.items():  # in stream order; a vanished group is made again after them
            if ids and split_id(ids[-1]) > split_id(self._acked_upto.get(stream, "0-0")):
                self._acked_upto[stream] = ids[-1]

    # ----------------------------------------------------------------- views of the learner's state

    @property
    def policy(self) -> ActorCriticPolicy:
        return self.learner.policy

    @property
    def counters(self) -> Counters:
        return self.learner.counters

    @property
    def memories(self) -> dict[str, EnvMemory]:
        return self.learner.memories

    @property
    def last_buffer(self) -> RolloutBuffer | None:
        return self.learner.last_buffer
