"""Riding out Redis outages: notice every reconnection, and back off between failed attempts.

redis-py retries a failed command on a fresh connection by itself (see
:func:`worker.connections.connect`), so a short Redis restart never reaches the worker as an error.
The worker still has to know: a blocking ``XREADGROUP`` whose reply was lost may have delivered
entries to its consumer that it never saw, and those must be read back (``XREADGROUP ... 0``)
before any new entry, or an environment's steps would be handled out of order.
:class:`ConnectionWatch` counts the connections a client makes, so the worker can tell.
"""

from __future__ import annotations

import random
import time
from typing import Any

import redis

# What a server rides out by backing off and trying again: Redis unreachable (also while it loads
# its data after a restart), or a replica that does not take writes (yet): during a failover, until
# it is promoted. Nothing was written by a command refused so.
OUTAGE = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)


def is_outage(error: BaseException) -> bool:
    """An :data:`OUTAGE`, or UNBLOCKED: Redis ends the blocked reads of a primary being demoted."""
    return isinstance(error, OUTAGE) or (
        isinstance(error, redis.ResponseError) and str(error).startswith("UNBLOCKED")
    )


class ConnectionWatch:
    """Counts (re)connections of a client's pooled connection.

    The worker is single-threaded, so its client uses one pooled connection, which redis-py
    reconnects in place after an error. :meth:`attach` registers a connect callback on it (public
    redis-py API); the first connection is not a reconnection. If the client offers no such hook
    (fakeredis, exotic pools), :attr:`available` is False and only errors that escape redis-py's
    retries are noticed, by the worker loop.

    :param client: the worker's client
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.connects = 0  # successful connections since attach
        self.available = False
        self._seen = 0
        self._attached: list[Any] = []  # keep the connections we hooked, so we hook each once

    def attach(self) -> None:
        pool = self.client.connection_pool
        try:
            try:
                connection = pool.get_connection()
            except TypeError:  # redis-py 5 wants a command name
                connection = pool.get_connection("PING")
        except (AttributeError, redis.RedisError):
            return
        try:
            if any(c is connection for c in self._attached):
                return
            connection.register_connect_callback(self._on_connect)
            self._attached.append(connection)
            self.available = True
        except AttributeError:
            pass
        finally:
            pool.release(connection)

    def _on_connect(self, _connection: Any) -> None:
        self.connects += 1

    def reconnected(self) -> int:
        """How many reconnections happened since the last call (0 if none)."""
        new, self._seen = self.connects - self._seen, self.connects
        return new


class Backoff:
    """Exponential backoff with jitter: attempt n sleeps between half of and ``min(cap, base * 2**n)``."""

    def __init__(self, base: float = 0.1, cap: float = 5.0, rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self.rng = rng or random.Random()

    def delay(self, attempt: int) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(attempt, 30))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)


class Outages:
    """One worker's view of its connection: failed attempts, backoff, reconnections, all logged.

    The worker calls :meth:`failed` when Redis is unreachable (it sleeps the backoff), :meth:`ok`
    after an iteration that worked, and :meth:`reconnected` before it reads: True means pending
    entries must be read back first.

    :param client: the worker's client
    :param log: where ``redis unreachable, retrying`` and ``reconnected`` go
    :param context: fields of every line (e.g. ``component_id``)
    """

    def __init__(self, client: redis.Redis, log: Any, **context: Any) -> None:
        self.watch = ConnectionWatch(client)
        self.backoff = Backoff(base=0.1, cap=5.0)
        self.log, self.context = log, context
        self.failures = 0  # consecutive failed attempts
        self.reconnects = 0  # reconnections noticed (by the connect hook, or the loop without one)

    def attach(self) -> None:
        """Hook the client's connection; what it did so far is not a reconnection."""
        self.watch.attach()
        self.watch.reconnected()

    def failed(self, error: Exception) -> None:
        if isinstance(error, redis.ReadOnlyError) or "replica" in str(error):
            # A server that is a replica now: connect again, to whatever the URL names by then (a
            # DNS name or virtual IP that moved to the new primary), not to the old server. Only
            # idle connections: another thread's command in flight is left alone.
            self.watch.client.connection_pool.disconnect(inuse_connections=False)
        self.failures += 1
        sleep = self.backoff.delay(self.failures - 1)
        self.log.warning(
            "redis unreachable, retrying", error=str(error), attempt=self.failures, sleep=round(sleep, 3)
        )
        time.sleep(sleep)

    def ok(self) -> None:
        if self.failures:
            self.reconnected()
            self.failures = 0

    def reconnected(self) -> bool:
        """Log and count reconnections since the last call; True if there were any."""
        new = self.watch.reconnected()
        if not new and not (self.failures and not self.watch.available):
            return False
        self.reconnects += max(new, 1)
        self.log.info(
            "reconnected", reconnects=self.reconnects, failed_attempts=self.failures, **self.context
        )
        return True
