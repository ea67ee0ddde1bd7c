"""``PolicyClient``: an environment of your own asks the models for actions, with redis-py."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import EqualJitterBackoff, ExponentialBackoff
from redis.retry import Retry

from worker.client.checks import env_name
from worker.client.core import PUBLISH, ClientCore, Ticket
from worker.client.errors import ActionTimeout
from worker.client.local import REFRESHED
from worker.common import logs
from worker.common.connections import connect, last_id, swarm_prefix
from worker.common.registry import live_models
from worker.common.serve import REDIS_ERRORS, Outages, is_outage
from worker.protocol import Spaces

T = TypeVar("T")
log = logs.get(__name__)


class PolicyClient:
    """Actions for your environments from the models, over Redis; one client per process or thread.

    ::

        client = PolicyClient("redis://localhost:6379/0", prefix="rl", timeout=10.0)
        a = client.act("robot-1", obs)                     # first observation of an episode
        a = client.act("robot-1", obs, reward=r)           # later steps: reward for the previous action
        client.end("robot-1", obs, reward=r, terminated=True)   # or truncated=True
        actions = client.act_many({"e1": o1, "e2": o2}, rewards={"e1": 1.0, "e2": 0.0})
        a = client.act("robot-1", obs, deterministic=True)  # evaluation: models do not learn from it

    :param url: Redis URL (``redis://``, ``rediss://``, ``unix://``), or a redis-py client to use
    :param prefix: the deployment's prefix (the models' ``--prefix``; default ``rl``, ``{rl}`` on a
        cluster, where it must hold a hash tag)
    :param timeout: seconds to wait for an action (an outage is ridden out within it) before
        :class:`~worker.client.ActionTimeout`, naming the environment and the observation
    :param mode: ``"ensemble"``: the aggregator combines every live model; ``"direct"``: ``model``
        answers itself (one hop less); ``"local"``: act with a copy of ``model``'s policy, refreshed
        from the weights it publishes, and stream the steps to it to learn from
    :param model: the model's ``COMPONENT_ID`` (direct and local modes)
    :param client_id: names this client's reply stream and its key (default host-pid-random);
        one client per ID at a time
    :param encoding: ``"msgpack"`` or ``"json"`` entries
    :param max_lag: local mode: the most of this client's steps the model may not have learned from
        yet; acting waits beyond that, so the copy never runs far ahead of the learning
    :param flush_every: local mode: steps sent to the model together
    :param shared_replies: read the actions from the shared ``<prefix>:action`` stream, as every
        environment did before replies were routed (every client reads every action): for comparison
    :param trim_replies: trim this client's reply stream as it reads it, and delete it on close
    :param stream_maxlen: approximate MAXLEN of the observation stream written
    :param reply_ttl: seconds this client's key lives after its last step
    :param spaces: the spaces, when known (the models' are read from Redis otherwise)
    :param block_ms: longest single blocking read
    :param outages: where outages are counted and logged (default: the client's own)
    :param cluster: ``url`` names a node of a Redis Cluster (implied by a ``redis.RedisCluster``)
    """

    def __init__(
        self,
        url: str | redis.Redis = "redis://localhost:6379/0",
        prefix: str | None = None,
        timeout: float = 10.0,
        mode: str = "ensemble",
        model: str | None = None,
        *,
        client_id: str | None = None,
        encoding: str = "msgpack",
        max_lag: int = 64,
        flush_every: int = 16,
        shared_replies: bool = False,
        trim_replies: bool = True,
        stream_maxlen: int = 100_000,
        reply_ttl: float = 3600.0,
        spaces: Spaces | None = None,
        block_ms: int = 1000,
        cluster: bool = False,
        outages: Outages | None = None,
    ) -> None:
        cluster = cluster or isinstance(url, redis.RedisCluster)
        self.core = ClientCore(
            swarm_prefix(prefix, cluster), timeout, mode, model, client_id, encoding, max_lag,
            shared_replies, trim_replies, stream_maxlen, reply_ttl, spaces,
        )  # fmt: skip
        self.flush_every, self.block_ms = max(1, flush_every), block_ms
        self._owned = isinstance(url, str)
        # Few, short retries inside redis-py: this client rides out outages itself, within its timeout.
        retry = Retry(ExponentialBackoff(cap=0.25, base=0.02), retries=2)
        own = isinstance(url, str)
        self.redis = connect(url, cluster, retry=retry, socket_connect_timeout=2) if own else url
        self._publish = self.redis.register_script(PUBLISH)
        self.closed = False
        self._outage: BaseException | None = None  # the last outage met, and when
        self._outage_at = -float("inf")
        if outages is None:
            outages = Outages(self.redis, log, client_id=self.core.client_id)
            outages.backoff = EqualJitterBackoff(cap=1.0, base=0.02)  # within an action's timeout
        self.outages = outages

    # ----------------------------------------------------------------- the API

    @property
    def client_id(self) -> str:
        return self.core.client_id

    @property
    def spaces(self) -> Spaces:
        """The models' spaces (read from Redis on first use)."""
        self._discover(time.monotonic() + self.core.timeout)
        assert self.core.spaces is not None
        return self.core.spaces

    def act(
        self, env_id: str, observation: Any, reward: float | None = None, deterministic: bool = False
    ) -> int:
        """The action for ``observation`` of ``env_id``; ``reward`` is for its previous action.

        :raises ValueError: a bad observation or reward (naming the environment and the problem)
        :raises ActionTimeout: no action within the timeout
        """
        rewards = None if reward is None else {env_id: reward}
        return self.act_many({env_id: observation}, rewards, deterministic)[env_id]

    def act_many(
        self,
        observations: Mapping[str, Any],
        rewards: Mapping[str, float] | None = None,
        deterministic: bool = False,
    ) -> dict[str, int]:
        """One action per environment, in one round trip; ``rewards`` for their previous actions."""
        ticket = self.send(observations, rewards, deterministic)
        while not self.collect(ticket):
            pass
        actions = ticket.result()
        return {env: actions[env_name(env)] for env in observations}  # keyed as asked

    def end(
        self,
        env_id: str,
        observation: Any,
        reward: float,
        terminated: bool = False,
        truncated: bool = False,
    ) -> None:
        """The episode of ``env_id`` ended with ``reward`` at ``observation`` (its last): sent with
        the environment's next observation, which starts the next episode. No round trip."""
        self._discover(time.monotonic() + self.core.timeout)
        self.core.end(env_id, observation, reward, terminated, truncated)

    def forget(self, env_id: str) -> None:
        """Begin ``env_id`` afresh: its next observation starts a new chain of steps."""
        self.core.forget(env_id)

    def close(self) -> None:
        """Send what local mode still holds, delete this client's reply stream and key, disconnect."""
        self.closed = True
        try:
            if self.core.local and self.core.local.outbox:
                self._flush(time.monotonic() + self.core.timeout)
            kept = () if not self.core.trim_replies else (self.core.replies,)  # kept for auditing
            self.redis.delete(self.core.client_key, *kept)
        except (*REDIS_ERRORS, ActionTimeout):
            pass  # the stream and the key expire by themselves
        finally:
            if self._owned:
                self.redis.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- two halves of act_many

    def send(
        self,
        observations: Mapping[str, Any],
        rewards: Mapping[str, float] | None = None,
        deterministic: bool = False,
    ) -> Ticket:
        """Publish the observations (local mode: act on them); :meth:`collect` gathers the actions."""
        if self.closed:
            raise RuntimeError(f"client {self.core.client_id!r} is closed")
        core, deadline = self.core, time.monotonic() + self.core.timeout
        self._discover(deadline)
        built = core.prepare(observations, rewards, deterministic)
        if not built:
            return Ticket({}, deadline)
        if core.mode == "local":
            return self._act_locally(built, deterministic, deadline)
        if core.cursor is None:  # the shared stream: only what comes after now
            core.cursor = self._retry(lambda: last_id(self.redis, core.replies), deadline, None)
        envs, keys, args = core.publish_steps(built)
        ids = self._retry(lambda: self._publish(keys=keys, args=args, client=self.redis), deadline, envs[0])
        return core.ticket(envs, ids)

    def collect(self, ticket: Ticket, block_ms: int | None = None) -> bool:
        """Read the replies once (blocking at most ``block_ms``); True once every action is in.

        :raises ActionTimeout: past the ticket's deadline
        """
        core = self.core
        if ticket.done:
            return True
        left = ticket.deadline - time.monotonic()
        if left <= 0:
            self._read(ticket, None)  # what came while an outage's backoff slept past the deadline
            if ticket.done:
                return True
            outage = self._outage if self._outage_at > ticket.deadline - core.timeout else None
            raise core.timed_out(ticket, outage) from outage
        self._read(ticket, max(1, int(min(block_ms or self.block_ms, left * 1000))))
        return ticket.done

    def arrived(self, tickets: Sequence[Ticket], block_ms: int | None = None) -> dict[str, Any]:
        """The actions that arrived for any of ``tickets`` since the last call, without waiting for
        a ticket to be complete (ENV_ID -> action, as :meth:`act_many` gives them; each once, see
        :meth:`Ticket.take`): for environments that step each on its own action.

        Reads the replies once, blocking at most ``block_ms`` (and not past the earliest deadline)
        while no action is in yet; ``0``: not at all. Local mode's tickets are complete when sent and
        need no read. A short block is no way to poll: Redis ends a blocking read that times out only
        at its next tick (``hz``: every 100 ms by default) if nothing else wakes it.

        :raises ActionTimeout: a ticket past its deadline with actions missing, as :meth:`collect`
            raises it (the ticket is given up); the actions that did arrive stay in the tickets
        """
        core, held = self.core, [t for t in tickets if not t.done]
        if held:
            first = min(held, key=lambda t: t.deadline)
            left = first.deadline - time.monotonic()
            ready = any(len(t.taken) < len(t.actions) for t in tickets)
            wait = not ready and left > 0 and block_ms != 0
            block = max(1, int(min(block_ms or self.block_ms, left * 1000))) if wait else None
            self._read(first, block)
            now = time.monotonic()
            for ticket in held:
                if not ticket.done and ticket.deadline <= now:
                    outage = self._outage if self._outage_at > ticket.deadline - core.timeout else None
                    raise core.timed_out(ticket, outage) from outage
        actions: dict[str, Any] = {}
        for ticket in tickets:
            actions.update(ticket.take())
        return actions

    def _read(self, ticket: Ticket, block: int | None) -> None:
        """One read of the reply stream (``block`` ms at most; ``None``: no wait), filed by ticket."""
        core = self.core
        reply = self._retry(
            lambda: self.redis.xread({core.replies: core.cursor}, count=1000, block=block),
            ticket.deadline,
            ticket,
        )
        for _, items in reply or []:
            for letter in core.take_replies(items):
                self.redis.xadd(core.streams.dead, letter, maxlen=core.stream_maxlen, approximate=True)

    # ----------------------------------------------------------------- local mode

    def _act_locally(self, built: list, deterministic: bool, deadline: float) -> Ticket:
        core = self.core
        self._keep_up(deadline)
        ticket = core.take_local(built, deterministic, deadline)
        if len(core.local.outbox) >= self.flush_every:  # type: ignore[union-attr]
            self._flush(deadline)
        return ticket

    def _flush(self, deadline: float) -> None:
        """Publish the steps acted on here; refresh the copy if the model published newer weights."""
        core = self.core
        local = core.local
        assert local is not None
        keys, args = core.publish_call(local.outbox)
        reply = self._retry(lambda: self._publish(keys=keys, args=args, client=self.redis), deadline, None)
        if local.flushed(reply):
            self._refresh(deadline)

    def _refresh(self, deadline: float) -> None:
        core, local = self.core, self.core.local
        assert local is not None
        weights = self._retry(lambda: self.redis.hmget(core.policy_key, *REFRESHED), deadline, None)
        local.load_weights(dict(zip(REFRESHED, weights, strict=True)))

    def _keep_up(self, deadline: float) -> None:
        """Wait while the model is more than ``max_lag`` of our steps behind."""
        core, local, waited = self.core, self.core.local, 0.0
        assert local is not None
        while local.lag() > local.max_lag:
            if local.outbox:
                self._flush(deadline)
                continue
            if time.monotonic() > deadline:
                raise core.behind()
            pause = local.poll_pause(waited)
            time.sleep(pause)
            waited += pause
            state = self._retry(lambda: self.redis.hmget(core.policy_key, "updates", "seen"), deadline, None)
            if local.take_state(*state):
                self._refresh(deadline)

    # ----------------------------------------------------------------- plumbing

    def _discover(self, deadline: float) -> None:
        """Learn the spaces (local mode: the policy) from what the models publish, waiting for them."""
        core = self.core
        while not core.discovered:
            found = self._retry(self._look, deadline, None)
            if found:
                return
            if time.monotonic() > deadline:
                raise core.unavailable()
            time.sleep(0.05)

    def _look(self) -> bool:
        core, streams = self.core, self.core.streams
        if core.mode == "local":
            return core.take_policy(self.redis.hgetall(core.policy_key))
        models = [core.model or ""] if core.mode == "direct" else live_models(self.redis, streams)
        with self.redis.pipeline(transaction=False) as pipe:
            for cid in models:
                pipe.hget(streams.model_key(cid, "info"), "spaces")
            return core.take_spaces(dict(zip(models, pipe.execute(), strict=True))) is not None

    def _retry(self, call: Callable[[], T], deadline: float, waiting: Ticket | str | None) -> T:
        """``call`` until it succeeds, riding out outages (logged once each) until ``deadline``."""
        while True:
            try:
                result = call()
            except REDIS_ERRORS as exc:
                if not is_outage(exc):
                    raise
                self._outage, self._outage_at = exc, time.monotonic()
                if time.monotonic() > deadline:
                    raise self._gave_up(waiting, exc) from exc
                self.outages.failed(exc)
                continue
            if self.outages.failures:
                self.outages.ok()
            return result

    def _gave_up(self, waiting: Ticket | str | None, exc: BaseException) -> ActionTimeout:
        if isinstance(waiting, Ticket) and waiting.waiting:
            return self.core.timed_out(waiting, exc)
        return self.core.unreachable(waiting if isinstance(waiting, str) else None, exc)
