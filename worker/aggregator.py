"""The aggregator: one action per observation from the logits every live model replied with.

It reads ``<prefix>:logits`` through the consumer group ``aggregator`` and collects the replies of
each observation (``OBS_ID``). The observation is decided once every live model (heartbeat in
``<prefix>:models`` at most ``registry_max_age`` seconds old) has answered, or ``deadline_ms`` after
its first reply with whatever arrived, so a dead model never stalls an environment. Replies arriving
after the decision are ignored. The registry is read every second, at once when a reply comes from a
model not in the last view (models that join are awaited from their first reply on), and whenever an
observation is newer than the view (by Redis's clock: every model live when it was published is
awaited, also one that registered a moment before).

**The decision**, by the form of the replies (their action space; :mod:`worker.common.distributions`
computes it). With M models answering:

- **Discrete** (``LOGITS``, one number per action), with p_i = softmax(logits_i)::

      p = mean_i p_i   (--combine prob)     or     p = softmax(mean_i logits_i)   (--combine logits)
      a = argmax p if DETERMINISTIC, else a sample from p

- **MultiDiscrete, MultiBinary** (``LOGITS``, one list per dimension; a MultiBinary value's pair is
  ``[0, l]``): the same rule in each dimension, independently; ``ACTION`` is the list of choices.
- **Box** (``MEAN`` and ``LOG_STD``: model i's Gaussian N(mu_i, sigma_i^2) per value)::

      prob:    p(a) = mean_i N(a; mu_i, sigma_i^2)     the mixture: a sample picks a model
               uniformly and draws from its Gaussian; the deterministic action is the mixture's
               mean, mean_i mu_i (its spread, mean_i sigma_i^2 + var_i mu_i, includes the models'
               disagreement)
      logits:  p(a) ~ prod_i N(a; mu_i, sigma_i^2)^(1/M)     the mean of log-densities: a Gaussian
               of precision tau = mean_i sigma_i^-2 and mean sum_i sigma_i^-2 mu_i / (M tau), which
               is also the deterministic action

  ``ACTION`` is the list of values (flattened), not clipped: the client clips to the space's bounds
  before the environment sees it, and the models learn from the action as sampled (as SB3 does).

With a single model every rule is exactly that model's policy. ``{ACTION, ENV_ID, OBS_ID, MODELS,
DETERMINISTIC}``, and ``STEP`` if the observation had one, goes in the encoding of the logits replies
to the client that asked: ``<prefix>:action:<REPLY_TO>``, or the shared ``<prefix>:action`` for an
observation without ``REPLY_TO``. ``MODELS`` is how many models were combined. A private stream
expires ``reply_ttl`` seconds after its last action, so the streams of clients that went away vanish;
the shared one never does. Observations are told apart by ``OBS_ID`` (their entry ID) alone: clients
that happen to use the same ``ENV_ID`` each get their own answers.

**Contribution.** Each decision hands every model that answered the share of the probability mass
on the chosen action that came from it: ``share_i = p_i(a) / sum_j p_j(a)``, with p_i(a) the
probability of a (multi: the product over dimensions; Box: the density), computed from
log-probabilities so that it stays exact where the probabilities underflow. Shares of one decision
sum to 1; a model that made the action likely gets much, one that made it unlikely little. They are
accumulated with HINCRBYFLOAT in the hash ``<prefix>:contribution`` (field: COMPONENT_ID), so
``share / decisions`` is a model's influence on the acting ensemble.

Entries are acknowledged with the decision they led to (one atomic, idempotent script with the
actions and the contributions), so a restarted aggregator rebuilds undecided observations from its
pending entries, and a flush sent twice is written once.
Run one aggregator per prefix: two consumers of the group would split an observation's replies.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import redis
from pydantic import Field

from worker.common import logs, lua
from worker.common.connections import ensure_group
from worker.common.distributions import decide
from worker.common.draws import Draws
from worker.common.metrics import AggregatorMetrics
from worker.common.serve import Service
from worker.common.settings import ServiceSettings
from worker.protocol import (
    Encoding,
    Family,
    LogitsReply,
    ProtocolError,
    action_message,
    before,
    dead_letter,
    decode_entry,
    encode_entry,
    parse_logits_reply,
    split_id,
)

log = logs.get(__name__)

FLUSH = lua.source(__package__, "aggregator.lua", sections=True)  # a decision's writes, at once
LIVE = lua.source(__package__, "live.lua")  # the live models and the server's clock, at once

GROUP = "aggregator"


class AggregatorSettings(ServiceSettings):
    """``python -m worker aggregator``: the ensemble's action selection."""

    deadline_ms: int = Field(1000, gt=0, description="decide this long after an observation's first reply")
    registry_max_age: float = Field(5.0, gt=0, description="models with an older heartbeat are not awaited")
    seed: int | None = Field(None, description="seed of the actions drawn (with each ENV_ID and STEP)")
    combine: Literal["prob", "logits"] = Field("prob", description="mean of probabilities, or of logits")
    consumer: str = Field("aggregator", min_length=1, description="consumer name in the group")
    block_ms: int = Field(100, gt=0, le=30_000, description="longest blocking XREADGROUP")
    batch_size: int = Field(1000, gt=0, description="entries read per XREADGROUP")
    max_entry_bytes: int = Field(1 << 20, gt=0, description="larger entries are dead-lettered unread")
    stream_maxlen: int = Field(100_000, gt=0, description="approximate MAXLEN of the streams written")
    remembered: int = Field(100_000, gt=0, description="decided OBS_IDs remembered to drop late replies")
    reply_ttl: float = Field(
        3600.0, gt=0, description="seconds a client's reply stream lives after its last action"
    )


@dataclass(frozen=True, slots=True)
class Action:
    """A decided action, the encoding of the replies it answers, and the stream it goes to."""

    message: dict[str, Any]
    encoding: Encoding
    stream: str


@dataclass
class Bucket:
    """The replies to one observation collected so far."""

    first: LogitsReply
    first_seen: float
    params: dict[str, np.ndarray] = field(default_factory=dict)  # component ID -> its distribution
    entry_ids: list[str] = field(default_factory=list)


def _form(family: Family) -> str:
    """A distribution's form, in the words of its fields."""
    if family.kind == "categorical":
        return f"LOGITS of {family.sizes[0]} actions"
    if family.kind == "multi":
        return f"LOGITS of dimensions {list(family.sizes)}"
    return f"MEAN and LOG_STD of {family.sizes[0]} values"


def _time_of(obs_id: str) -> int:
    """The time (ms) in an observation's entry ID; 0 for an OBS_ID that is not one."""
    try:
        return split_id(obs_id)[0]
    except ValueError:
        return 0


class Aggregator(Service):
    """Turns the models' logits into actions and credits each model its contribution.

    :param settings: the aggregator's settings
    :param client: see :class:`~worker.common.serve.Service`
    """

    def __init__(self, settings: AggregatorSettings, client: redis.Redis) -> None:
        super().__init__(settings, client, log, consumer=settings.consumer)
        self.draws = Draws(settings.seed)
        self.buckets: dict[str, Bucket] = {}
        self.decided: OrderedDict[str, None] = OrderedDict()
        self.live: set[str] = set()
        self._live_at = -math.inf
        self._view_ms = -1  # Redis's time of the last view of the registry
        self._newest_ms = 0  # the newest observation replied to (its entry ID's time)
        self._asked: set[str] = set()  # models not live that made us look again in the last second
        self._acks: list[str] = []  # entries done with (late, duplicate, dead) to ack with the next batch
        self._dead: list[dict] = []
        self._flush_script = client.register_script(FLUSH)
        self._live_script = client.register_script(LIVE)
        self._read_upto = "$"  # the last reply read: a vanished group is made again after it
        self.metrics: AggregatorMetrics = AggregatorMetrics(settings.consumer, self.outages)

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Create the group and take back the replies read before a restart but never decided: after
        an outage too, the undecided observations are rebuilt from what is pending on us."""
        undecided = [i for bucket in self.buckets.values() for i in bucket.entry_ids]
        self.buckets.clear()
        self._acks, self._dead = [], []
        # A group that vanished is made again before the oldest reply not yet decided, or after the
        # last one read: late replies to decided observations are dropped (decided), none is lost.
        start = before(min(undecided, key=split_id)) if undecided else self._read_upto
        ensure_group(self.redis, self.streams.logits, GROUP, start)
        # What was decided before a restart: late replies to those must not decide them again.
        recent = self.redis.zrange(self.streams.decided, -self.settings.remembered, -1)
        self.decided.update((obs_id.decode(), None) for obs_id in recent)
        cursor = "0"
        while True:
            reply = self.redis.xreadgroup(
                GROUP, self.settings.consumer, {self.streams.logits: cursor}, count=self.settings.batch_size
            )
            items = reply[0][1] if reply else []
            if not items:
                break
            self._collect(items)
            cursor = items[-1][0]
        log.info(
            "ready", consumer=self.settings.consumer, pending=len(self.buckets), combine=self.settings.combine
        )

    def shutdown(self) -> None:
        log.info("stopped", undecided=len(self.buckets))

    # ----------------------------------------------------------------- the loop

    def step(self, block_ms: int | None = None) -> list[dict[str, Any]]:  # type: ignore[override]
        """Read new replies once (blocking at most until the next deadline), decide what is due.

        :param block_ms: longest wait for new replies (default ``settings.block_ms``); 0 for none
        :return: the action messages published
        """
        now = time.monotonic()
        if now - self._live_at >= 1.0:  # the registry changes on a scale of seconds
            self._refresh_live()
            self._asked.clear()
        block = self.settings.block_ms if block_ms is None else block_ms
        if self.buckets:
            due = min(b.first_seen for b in self.buckets.values()) + self.settings.deadline_ms / 1000
            block = min(block, int((due - now) * 1000))
        reply = self.redis.xreadgroup(
            GROUP,
            self.settings.consumer,
            {self.streams.logits: ">"},
            count=self.settings.batch_size,
            block=block if block > 0 else None,  # redis-py: None does not block, 0 blocks forever
        )
        if self.outages.reconnected():
            # redis-py resent a read on a new connection: the reply it lost may have delivered
            # replies, pending on us now. Take everything back from there, as after a restart.
            self.start()
            return []
        items = reply[0][1] if reply else []
        if items:
            self._read_upto = items[-1][0].decode()
        if self._collect(items) or self._newest_ms > self._view_ms:
            self._refresh_live()  # a model may have joined since the last look
        return self._decide()

    def _refresh_live(self) -> None:
        since = time.time() - self.settings.registry_max_age
        seconds, micros, members = self._live_script(keys=[self.streams.registry], args=[since])
        self.live = {m.decode() if isinstance(m, bytes) else m for m in members}
        self._live_at, self._view_ms = time.monotonic(), int(seconds) * 1000 + int(micros) // 1000

    def _collect(self, items: list[tuple[bytes, dict[bytes, bytes] | None]]) -> bool:
        """File each reply under its observation; reject bad ones, drop late and duplicate ones.

        :return: whether a reply came from a model not in :attr:`live` (at most once a second each)
        """
        strangers = False
        for raw_id, fields in items:
            entry_id = raw_id.decode()
            if fields is None:  # trimmed from the stream while pending
                self._acks.append(entry_id)
                continue
            try:
                reply = parse_logits_reply(*decode_entry(fields, self.settings.max_entry_bytes))
                bucket = self.buckets.get(reply.obs_id)
                if bucket is not None and reply.family != bucket.first.family:
                    found, expected = _form(reply.family), _form(bucket.first.family)
                    raise ProtocolError(f"the reply is {found}, other models gave {expected}")
            except ProtocolError as exc:
                log.warning("rejected entry", id=entry_id, reason=str(exc))
                s = self.settings
                self._dead.append(
                    dead_letter(
                        fields, self.streams.logits, entry_id, str(exc), s.consumer, s.max_entry_bytes
                    )
                )
                self._acks.append(entry_id)
                continue
            if reply.obs_id in self.decided or (bucket is not None and reply.component_id in bucket.params):
                log.debug("late or duplicate reply", obs_id=reply.obs_id, component_id=reply.component_id)
                self._acks.append(entry_id)
                continue
            if bucket is None:
                bucket = self.buckets[reply.obs_id] = Bucket(reply, time.monotonic())
                self._newest_ms = max(self._newest_ms, _time_of(reply.obs_id))
            bucket.params[reply.component_id] = reply.params
            if reply.component_id not in self.live and reply.component_id not in self._asked:
                self._asked.add(reply.component_id)  # once a second at most: it may never register
                strangers = True
            bucket.entry_ids.append(entry_id)
        return strangers

    def _decide(self) -> list[dict[str, Any]]:
        """Decide every observation that is complete or past its deadline; publish it all at once.

        Observations answered by the same models are decided together, in one set of array
        operations: per observation it is only bookkeeping.
        """
        now, deadline = time.monotonic(), self.settings.deadline_ms / 1000
        groups: dict[tuple[tuple[str, ...], Family], list[tuple[str, Bucket]]] = defaultdict(list)
        due = [
            (obs_id, bucket)
            for obs_id, bucket in self.buckets.items()
            if self.live <= bucket.params.keys() or now - bucket.first_seen >= deadline
        ]
        for obs_id, bucket in due:
            groups[tuple(bucket.params), bucket.first.family].append((obs_id, bucket))
        actions: list[Action] = []
        shares: dict[str, float] = defaultdict(float)
        for (ids, family), members in groups.items():
            params = np.array([[bucket.params[i] for i in ids] for _, bucket in members])  # (n, models, P)
            deterministic = np.array([bucket.first.deterministic for _, bucket in members])
            rows = self.draws.rows([b.first.env_id for _, b in members], [b.first.step for _, b in members])
            chosen, share = decide(family, params, deterministic, self.settings.combine, rows)
            for component_id, value in zip(ids, share.sum(axis=0), strict=True):
                shares[component_id] += float(value)
            for (_, bucket), action in zip(members, chosen, strict=True):
                message = action_message(bucket.first, action, len(ids))
                stream = self.streams.replies(bucket.first.reply_to)
                actions.append(Action(message, bucket.first.encoding, stream))
        acks = self._acks + [i for _, bucket in due for i in bucket.entry_ids]
        # If the flush fails, nothing changed here: the same observations are decided next step
        # (and if it had landed after all, that flush finds its entries acknowledged and does nothing).
        self._flush(actions, shares, acks)
        self.metrics.decided([bucket.params.keys() for _, bucket in due], self.live)
        for obs_id, _ in due:
            del self.buckets[obs_id]
            self.decided[obs_id] = None
        while len(self.decided) > self.settings.remembered:
            self.decided.popitem(last=False)
        self._acks, self._dead = [], []
        return [a.message for a in actions]

    def _flush(self, actions: list[Action], shares: Mapping[str, float], acks: list[str]) -> None:
        """Actions, contributions, dead letters and acks at once (:data:`FLUSH`)."""
        if not acks:
            return  # every action and dead letter acknowledges at least one entry
        streams = self.streams
        keys = [streams.logits, streams.contribution, streams.dead, streams.decided]
        index: dict[str, int] = {}  # action stream -> its KEYS index (1-based, as Lua counts)
        for a in actions:
            if a.stream not in index:
                keys.append(a.stream)
                index[a.stream] = len(keys)
        now_ms, remembered = int(time.time() * 1000), self.settings.remembered
        ttl_ms = max(1, round(self.settings.reply_ttl * 1000))  # PEXPIRE 0 would delete at once
        args: list[Any] = [GROUP, self.settings.stream_maxlen, now_ms, remembered, ttl_ms, len(actions)]
        for a in actions:
            args.append(index[a.stream])
            args += lua.fields(encode_entry(a.message, a.encoding))
        args += lua.section([a.message["OBS_ID"] for a in actions])
        args += lua.fields(shares)
        args.append(len(self._dead))
        for letter in self._dead:
            args += lua.fields(letter)
        args += lua.section(acks)
        args += lua.section([k for stream, k in index.items() if stream != streams.action])
        skipped = self._flush_script(keys=keys, args=args, client=self.redis)
        if skipped:  # 0: applied already; else the streams holding another type, not written
            log.warning("reply streams of another type: actions dropped", keys=[keys[k - 1] for k in skipped])
