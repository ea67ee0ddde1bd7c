"""``AsyncPolicyClient``: :class:`~worker.client.PolicyClient` for asyncio applications, on
redis.asyncio, with the same API, each call awaited.

One client serves many environments at once, one task each: every task publishes its own steps,
and a single reader task reads the client's reply stream while any task waits, handing each action
to the task that asked for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.backoff import EqualJitterBackoff, ExponentialBackoff
from redis.retry import Retry

from worker.client.checks import env_name
from worker.client.core import PUBLISH, ClientCore, Ticket
from worker.client.errors import ActionTimeout
from worker.client.local import REFRESHED
from worker.common import logs
from worker.common.connections import after_cluster_error, swarm_prefix
from worker.common.registry import LIVE_MAX_AGE
from worker.common.serve import REDIS_ERRORS, is_outage
from worker.protocol import Spaces

T = TypeVar("T")
log = logs.get(__name__)


def _connect(url: str, cluster: bool) -> aioredis.Redis:
    """A client with few, short retries inside redis-py: the client rides out outages itself."""
    options: dict[str, Any] = {
        "retry": Retry(ExponentialBackoff(cap=0.25, base=0.02), retries=2),
        "socket_connect_timeout": 2,
        "socket_timeout": 60,
    }
    if cluster:
        return aioredis.RedisCluster.from_url(url, **options)  # type: ignore[return-value]
    return aioredis.Redis.from_url(url, retry_on_error=[redis.ConnectionError, redis.TimeoutError], **options)


class AsyncPolicyClient:
    """Actions for your environments from the models, for asyncio code.

    ::

        async with AsyncPolicyClient("redis://localhost:6379/0", prefix="rl") as client:
            a = await client.act("robot-1", obs)
            a = await client.act("robot-1", obs, reward=r)
            await client.end("robot-1", obs, reward=r, terminated=True)

    The parameters are :class:`~worker.client.PolicyClient`'s (``url`` may be a redis.asyncio client,
    a ``redis.asyncio.RedisCluster`` among them).
    """

    def __init__(
        self,
        url: str | aioredis.Redis = "redis://localhost:6379/0",
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
    ) -> None:
        cluster = cluster or isinstance(url, aioredis.RedisCluster)
        self.core = ClientCore(
            swarm_prefix(prefix, cluster), timeout, mode, model, client_id, encoding, max_lag,
            shared_replies, trim_replies, stream_maxlen, reply_ttl, spaces,
        )  # fmt: skip
        self.flush_every, self.block_ms = max(1, flush_every), block_ms
        self._owned = isinstance(url, str)
        self.redis = url if not isinstance(url, str) else _connect(url, cluster)
        self._publish = self.redis.register_script(PUBLISH)
        self.closed = False
        self._backoff = EqualJitterBackoff(cap=1.0, base=0.02)
        self._failing = False  # in an outage: logged once when it begins, once when it ends
        self._outage: BaseException | None = None
        self._reader: asyncio.Task | None = None
        self._arrived = asyncio.Condition()
        self._local = asyncio.Lock()  # local mode: one flush at a time

    # ----------------------------------------------------------------- the API

    @property
    def client_id(self) -> str:
        return self.core.client_id

    async def spaces(self) -> Spaces:
        """The models' spaces (read from Redis on first use)."""
        await self._discover(time.monotonic() + self.core.timeout)
        assert self.core.spaces is not None
        return self.core.spaces

    async def act(
        self, env_id: str, observation: Any, reward: float | None = None, deterministic: bool = False
    ) -> int:
        """See :meth:`PolicyClient.act <worker.client.PolicyClient.act>`."""
        rewards = None if reward is None else {env_id: reward}
        return (await self.act_many({env_id: observation}, rewards, deterministic))[env_id]

    async def act_many(
        self,
        observations: Mapping[str, Any],
        rewards: Mapping[str, float] | None = None,
        deterministic: bool = False,
    ) -> dict[str, int]:
        """See :meth:`PolicyClient.act_many <worker.client.PolicyClient.act_many>`."""
        ticket = await self.send(observations, rewards, deterministic)
        await self.collect(ticket)
        actions = ticket.result()
        return {env: actions[env_name(env)] for env in observations}  # keyed as asked

    async def end(
        self, env_id: str, observation: Any, reward: float, terminated: bool = False, truncated: bool = False
    ) -> None:
        """See :meth:`PolicyClient.end <worker.client.PolicyClient.end>`."""
        await self._discover(time.monotonic() + self.core.timeout)
        self.core.end(env_id, observation, reward, terminated, truncated)

    def forget(self, env_id: str) -> None:
        self.core.forget(env_id)

    async def close(self) -> None:
        """Send what local mode still holds, delete this client's reply stream and key, disconnect."""
        if self._reader is not None:
            self._reader.cancel()
        self.closed = True
        try:
            if self.core.local and self.core.local.outbox:
                await self._flush(time.monotonic() + self.core.timeout)
            kept = () if not self.core.trim_replies else (self.core.replies,)  # kept for auditing
            await self.redis.delete(self.core.client_key, *kept)
        except (*REDIS_ERRORS, ActionTimeout):
            pass  # the stream and the key expire by themselves
        finally:
            if self._owned:
                await self.redis.aclose()

    async def __aenter__(self) -> AsyncPolicyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- two halves of act_many

    async def send(
        self,
        observations: Mapping[str, Any],
        rewards: Mapping[str, float] | None = None,
        deterministic: bool = False,
    ) -> Ticket:
        if self.closed:
            raise RuntimeError(f"client {self.core.client_id!r} is closed")
        core, deadline = self.core, time.monotonic() + self.core.timeout
        await self._discover(deadline)
        built = core.prepare(observations, rewards, deterministic)
        if not built:
            return Ticket({}, deadline)
        if core.mode == "local":
            return await self._act_locally(built, deterministic, deadline)
        if core.cursor is None:
            last = await self._retry(lambda: self.redis.xrevrange(core.replies, count=1), deadline, None)
            core.cursor = core.cursor or (last[0][0].decode() if last else "0-0")
        envs, keys, args = core.publish_steps(built)
        ids = await self._retry(
            lambda: self._publish(keys=keys, args=args, client=self.redis), deadline, envs[0]
        )
        return core.ticket(envs, ids)

    async def collect(self, ticket: Ticket) -> None:
        """Wait until every action of ``ticket`` arrived.

        :raises ActionTimeout: past the ticket's deadline
        """
        if ticket.done:  # local mode: acted in-process; no reader task, no yield to the loop
            return
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read())
        async with self._arrived:
            try:
                left = ticket.deadline - time.monotonic()
                await asyncio.wait_for(self._arrived.wait_for(lambda: ticket.done), max(left, 0))
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise self.core.timed_out(ticket, self._outage) from self._outage

    async def _read(self) -> None:
        """Read the reply stream while any ticket waits; wake the waiting tasks after each read."""
        core, failures = self.core, 0
        while core.tickets:
            try:
                reply = await self.redis.xread({core.replies: core.cursor}, count=1000, block=self.block_ms)
                failures, self._outage = 0, None
                self._served()
            except REDIS_ERRORS as exc:
                if not is_outage(exc):
                    raise
                failures, self._outage = failures + 1, exc
                self._failed(exc)
                await asyncio.sleep(self._backoff.compute(failures))
                continue
            for _, items in reply or []:
                for letter in core.take_replies(items):
                    await self.redis.xadd(
                        core.streams.dead, letter, maxlen=core.stream_maxlen, approximate=True
                    )
            async with self._arrived:
                self._arrived.notify_all()

    # ----------------------------------------------------------------- local mode

    async def _act_locally(self, built: list, deterministic: bool, deadline: float) -> Ticket:
        core = self.core
        async with self._local:
            await self._keep_up(deadline)
            ticket = core.take_local(built, deterministic, deadline)
            if len(core.local.outbox) >= self.flush_every:  # type: ignore[union-attr]
                await self._flush(deadline)
        return ticket

    async def _flush(self, deadline: float) -> None:
        core = self.core
        local = core.local
        assert local is not None
        keys, args = core.publish_call(local.outbox)
        reply = await self._retry(
            lambda: self._publish(keys=keys, args=args, client=self.redis), deadline, None
        )
        if local.flushed(reply):
            await self._refresh(deadline)

    async def _refresh(self, deadline: float) -> None:
        core, local = self.core, self.core.local
        assert local is not None
        weights = await self._retry(lambda: self.redis.hmget(core.policy_key, *REFRESHED), deadline, None)
        local.load_weights(dict(zip(REFRESHED, weights, strict=True)))

    async def _keep_up(self, deadline: float) -> None:
        core, local, waited = self.core, self.core.local, 0.0
        assert local is not None
        while local.lag() > local.max_lag:
            if local.outbox:
                await self._flush(deadline)
                continue
            if time.monotonic() > deadline:
                raise core.behind()
            pause = local.poll_pause(waited)
            await asyncio.sleep(pause)
            waited += pause
            state = await self._retry(
                lambda: self.redis.hmget(core.policy_key, "updates", "seen"), deadline, None
            )
            if local.take_state(*state):
                await self._refresh(deadline)

    # ----------------------------------------------------------------- plumbing

    async def _discover(self, deadline: float) -> None:
        core = self.core
        while not core.discovered:
            if await self._retry(self._look, deadline, None):
                return
            if time.monotonic() > deadline:
                raise core.unavailable()
            await asyncio.sleep(0.05)

    async def _look(self) -> bool:
        core, streams = self.core, self.core.streams
        if core.mode == "local":
            return core.take_policy(await self.redis.hgetall(core.policy_key))
        if core.mode == "direct":
            models = [core.model or ""]
        else:
            members = await self.redis.zrangebyscore(streams.registry, time.time() - LIVE_MAX_AGE, "+inf")
            models = [m.decode() for m in members]
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in models:
                pipe.hget(streams.model_key(cid, "info"), "spaces")
            found = await pipe.execute()
        return core.take_spaces(dict(zip(models, found, strict=True))) is not None

    async def _retry(self, call: Callable[[], Awaitable[T]], deadline: float, env: str | None) -> T:
        """``call`` until it succeeds, riding out outages until ``deadline``."""
        failures = 0
        while True:
            try:
                result = await call()
            except REDIS_ERRORS as exc:
                if not is_outage(exc):
                    raise
                failures += 1
                if time.monotonic() + self._backoff.compute(failures) > deadline:
                    raise self.core.unreachable(env, exc) from exc
                self._failed(exc)
                await asyncio.sleep(self._backoff.compute(failures))
                continue
            self._served()
            return result

    def _failed(self, exc: BaseException) -> None:
        after_cluster_error(self.redis, exc)
        if not self._failing:
            self._failing = True
            log.warning("redis unavailable, retrying", error=str(exc), client_id=self.core.client_id)

    def _served(self) -> None:
        if self._failing:
            self._failing = False
            log.info("redis available again", client_id=self.core.client_id)
