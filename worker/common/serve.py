"""The serve loop every long-running component shares, and how it rides out what Redis can do to it.

A component (:class:`Service`) says how to *start* (make its consumer groups, take its lease, load
its state: everything it must establish from Redis) and how to take one *step* (read, handle,
commit, heartbeat). :meth:`Service.serve` runs them until SIGTERM or SIGINT. When Redis cannot
serve a step, the loop backs off and starts the component again, which re-establishes everything
from Redis before the next step; so each failure is handled here once, not in every component.

What counts as an outage (:func:`is_outage`): Redis unreachable, or still loading its data after a
restart (``LOADING``); busy with a long script (``BUSY``); out of memory under ``noeviction``
(``OOM``); a replica that takes no writes (``READONLY``, ``MASTERDOWN``); a cluster resharding or
failing over (``TRYAGAIN``, ``CLUSTERDOWN``); a primary being demoted (``UNBLOCKED``). Redis writes
nothing for a command it refuses so, and the components' writes are all-or-nothing scripts, so
starting again from Redis loses nothing. A consumer group that is gone (``NOGROUP``: its stream
deleted, or Redis came back empty) is not an outage, but mended the same way: ``start`` makes it
again. A component raises :class:`Interrupted` for its own reasons to start again (a model that
lost its lease).

redis-py retries a single failed command on a fresh connection by itself (see
:func:`worker.common.connections.connect`), so a short restart never reaches the loop as an error.
The loop still has to know: a blocking ``XREADGROUP`` whose reply was lost may have delivered
entries that were never seen, and those must be read back before any new entry.
:class:`ConnectionWatch` counts the connections a client makes, so a component can tell.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import EqualJitterBackoff

from worker.common.connections import after_cluster_error
from worker.protocol import Streams

if TYPE_CHECKING:
    from worker.common.metrics import ServiceMetrics

# Errors redis-py raises as their own classes: ConnectionError covers LOADING (BusyLoadingError),
# ClusterDownError covers MASTERDOWN.
OUTAGE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    # No node of a cluster answers; a slot missing from the client's map (redis-py retries both).
    # Older redis-py releases lack the first: their RedisClusterException stands in for it.
    getattr(redis.exceptions, "RedisClusterUnreachableError", redis.exceptions.RedisClusterException),
    redis.exceptions.SlotNotCoveredError,
)
# What a Redis command can raise: redis-py raises a cluster it cannot reach at all as a
# RedisClusterException, which is not a RedisError.
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
# Errors redis-py raises as a plain ResponseError: told by their prefix. MISCONF: a failing RDB
# save stops writes; NOREPLICAS: fewer replicas than min-replicas-to-write.
OUTAGE_PREFIXES = (
    "BUSY ",
    "MISCONF",
    "NOREPLICAS",
    "UNBLOCKED",
    "MASTERDOWN",
    "LOADING",
    "OOM",
    "READONLY",
    "TRYAGAIN",
    "CLUSTERDOWN",
)


def is_outage(error: BaseException) -> bool:
    """Whether Redis refused or failed ``error``'s command for a while, without writing anything.

    Credentials refused (a rotated password, a disabled ACL user) are not an outage, though redis-py
    raises them as connection errors: waiting does not mend them.
    """
    if isinstance(error, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return False
    return isinstance(error, OUTAGE) or (
        isinstance(error, redis.ResponseError) and str(error).startswith(OUTAGE_PREFIXES)
    )


def is_gone_group(error: BaseException) -> bool:
    """A consumer group (or its stream) that vanished: deleted, or Redis came back empty."""
    text = str(error)
    return isinstance(error, redis.ResponseError) and (
        text.startswith("NOGROUP") or text.startswith("UNBLOCKED the stream key no longer exists")
    )


class Interrupted(RuntimeError):
    """A component must start again from what Redis holds (e.g. a model that lost its lease)."""

    event = "interrupted, starting again"  # the log line


class ConnectionWatch:
    """Counts (re)connections of a client's pooled connection.

    A component is single-threaded, so its client uses one pooled connection, which redis-py
    reconnects in place after an error (a cluster client: one per node, and a new node's first
    connection counts too, as after a failover). :meth:`attach` registers a connect callback on it (public
    redis-py API); the first connection is not a reconnection. If the client offers no such hook
    (fakeredis, exotic pools), :attr:`available` is False and only errors that escape redis-py's
    retries are noticed, by the serve loop.

    :param client: the component's client
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.connects = 0  # successful connections since attach
        self.available = False
        self._seen = 0
        self._attached: list[Any] = []  # keep the connections we hooked, so we hook each once

    def attach(self) -> None:
        if isinstance(self.client, redis.RedisCluster):
            self._attach_cluster()
            return
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

    def _attach_cluster(self) -> None:
        """A cluster client has a pool per node; its hook for every new connection is public."""
        cluster: Any = self.client
        previous = cluster.user_on_connect_func

        def counted(connection: Any) -> None:
            self._on_connect(connection)
            if previous is not None:
                previous(connection)

        cluster.user_on_connect_func = counted
        self.available = True

    def _on_connect(self, _connection: Any) -> None:
        self.connects += 1

    def reconnected(self) -> int:
        """How many reconnections happened since the last call (0 if none)."""
        new, self._seen = self.connects - self._seen, self.connects
        return new


class Outages:
    """One component's view of Redis: failed attempts, backoff, reconnections, each outage logged once.

    The serve loop calls :meth:`failed` when a step could not run (it sleeps the backoff, redis-py's
    :class:`~redis.backoff.EqualJitterBackoff`), :meth:`ok` after a step that ran; a component calls
    :meth:`reconnected` before it reads: True means entries a lost reply delivered must be read back.

    :param client: the component's client
    :param log: where ``redis unavailable, retrying`` and ``reconnected`` go
    :param context: fields of every line (e.g. ``component_id``)
    """

    def __init__(self, client: redis.Redis, log: Any, **context: Any) -> None:
        self.watch = ConnectionWatch(client)
        self.backoff = EqualJitterBackoff(cap=5.0, base=0.1)
        self.log, self.context = log, context
        self.failures = 0  # consecutive failed attempts
        self.attempts = 0  # failed attempts in this outage, relapses included
        self.reconnects = 0  # reconnections noticed (by the connect hook, or the loop without one)
        self.interruptions = 0  # consecutive Interrupted
        # A refusal within this many seconds of Redis serving again is a relapse of the same outage:
        # at its memory limit Redis takes one write and refuses the next.
        self.settle = 2.0
        self.remind = 60.0  # seconds between two warnings of one long outage
        self._since = 0.0  # monotonic time the outage began
        self._served = -math.inf  # monotonic time Redis served again after the last outage
        self._announced = False  # its end was logged (as a reconnection, or available again)
        self._warned = -math.inf  # monotonic time of the outage's last warning

    def attach(self) -> None:
        """Hook the client's connection once; what it did before is not a reconnection."""
        if not self.watch.available:
            self.watch.attach()
            self.watch.reconnected()

    def failed(self, error: Exception) -> None:
        """Redis could not serve a step: log the first failure of an outage, then back off."""
        after_cluster_error(self.watch.client, error)
        if isinstance(error, redis.exceptions.ReadOnlyError) or "replica" in str(error):
            # A server that is a replica now: connect again, to whatever the URL names by then (a
            # DNS name or virtual IP that moved to the new primary), not to the old server. Only
            # idle connections: another thread's command in flight is left alone.
            pool = getattr(self.watch.client, "connection_pool", None)  # a cluster client follows by itself
            if pool is not None:
                pool.disconnect(inuse_connections=False)
        now = time.monotonic()
        if not self.failures and now - self._served >= self.settle:  # not a relapse
            self._since, self.attempts, self._warned = now, 0, -math.inf
        self.failures += 1
        self.attempts += 1
        sleep = self.backoff.compute(self.failures - 1)
        warn = now - self._warned >= self.remind  # the first failure, or a reminder
        if warn:
            self._warned, self._announced = now, False  # each warning gets its end told
        (self.log.warning if warn else self.log.debug)(
            "redis unavailable, retrying",
            error=str(error),
            attempt=self.attempts,
            sleep=round(sleep, 3),
            **self.context,
        )
        time.sleep(sleep)

    def interrupted(self, error: Exception) -> None:
        """The component must start again: at once the first time (a takeover), then backing off,
        as repeated interruptions are not takeovers (a key of the wrong type, a checkpoint changed
        by hand)."""
        self.interruptions += 1
        pause = self.backoff.compute(self.interruptions - 2) if self.interruptions > 1 else 0.0
        (self.log.warning if self.interruptions == 1 else self.log.error)(
            getattr(error, "event", "interrupted, starting again"),
            reason=str(error),
            sleep=round(pause, 3),
            **self.context,
        )
        time.sleep(pause)

    def ok(self) -> None:
        """A step ran: an outage (if any) is over."""
        self.interruptions = 0
        if self.failures:
            self._served = time.monotonic()
            if not self.reconnected(force=not self.watch.available) and not self._announced:
                self.log.info("redis available again", **self._outage(), **self.context)
                self._announced = True
            self.failures = 0

    def _outage(self) -> dict[str, Any]:
        seconds = round(time.monotonic() - self._since, 3) if self.failures else 0.0
        return {"failed_attempts": self.attempts, "outage_seconds": seconds}

    def reconnected(self, force: bool = False) -> bool:
        """Log and count reconnections since the last call; True if there were any."""
        new = self.watch.reconnected()
        if not new and not force:
            return False
        self.reconnects += max(new, 1)
        self._announced = True
        self.log.info("reconnected", reconnects=self.reconnects, **self._outage(), **self.context)
        return True


def warn_if_evicting(client: redis.Redis, log: Any) -> None:
    """Warn unless Redis runs ``maxmemory-policy noeviction``: an evicting Redis may drop a
    checkpoint, a lease or a pending entry at any moment, and nothing here could notice. Read from
    ``INFO memory``, as job queues on Redis do (``CONFIG`` is often denied, and reveals more)."""
    try:
        policy = client.info("memory").get("maxmemory_policy")
    except redis.ResponseError as exc:
        if is_outage(exc):  # BUSY, ...: asked again once Redis serves
            raise
        log.info("cannot read maxmemory_policy; make sure it is noeviction", error=str(exc))  # ACL
        return
    if policy is not None and policy != "noeviction":
        log.warning(
            "Redis may evict keys: set maxmemory-policy to noeviction, or a checkpoint, a lease or"
            " a pending entry may vanish",
            maxmemory_policy=policy,
        )


class Service:
    """A long-running component: :meth:`start` (again after every outage), then :meth:`step` until
    stopped, then :meth:`shutdown`.

    :param settings: the component's settings (``prefix`` names its deployment's streams)
    :param client: a redis-py client with ``decode_responses`` off
    :param log: the component's logger
    :param context: fields of every outage line (e.g. ``component_id``)
    """

    metrics: ServiceMetrics | None = None  # the component's own; served with --metrics-port

    def __init__(self, settings: Any, client: redis.Redis, log: Any, **context: Any) -> None:
        self.settings = settings
        self.streams = Streams(settings.prefix)
        self.redis = client
        self.log = log
        self.outages = Outages(client, log, **context)
        self._stopping = False
        self._checked_policy = False

    def start(self) -> None:
        """Establish everything the component needs from Redis; called again after each outage."""

    def step(self) -> None:
        """One turn of the loop: read, handle, commit."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """After the last step (SIGTERM, SIGINT, or :meth:`stop`)."""

    def stop(self, *_: Any) -> None:
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def serve(self) -> None:
        """Start and step until stopped, riding out outages (see the module docstring); the
        component's metrics are served meanwhile if ``--metrics-port`` is given."""
        exporter = self.metrics.expose(self.settings) if self.metrics is not None else None
        try:
            self._serve()
        finally:
            if exporter is not None:
                exporter.close()

    def _serve(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self.stop)
        started = False
        while not self._stopping:
            try:
                if not self._checked_policy:
                    warn_if_evicting(self.redis, self.log)
                    self._checked_policy = True
                if not started:
                    self.outages.attach()
                    self.start()
                    started = True
                self.step()
                self.outages.ok()
            except Interrupted as exc:
                started = False
                self.outages.interrupted(exc)
            except REDIS_ERRORS as exc:
                started = False
                if is_gone_group(exc):  # start() makes it again, after the last entry read
                    self.log.warning("consumer group gone, making it again", error=str(exc))
                elif is_outage(exc):
                    self.outages.failed(exc)
                else:
                    raise
        self.shutdown()

    def ride_out(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """:func:`ride_out` until the component stops, inside a step that must not start over."""
        return ride_out(self.outages, call, *args, stopping=lambda: self._stopping, **kwargs)


def ride_out(outages: Outages, call: Any, *args: Any, stopping: Any = None, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, retried through outages (backing off, each outage logged once by
    ``outages``) until it runs or ``stopping()``; for a call that is safe to repeat."""
    while True:
        try:
            result = call(*args, **kwargs)
            outages.ok()
            return result
        except REDIS_ERRORS as exc:
            if not is_outage(exc) or (stopping is not None and stopping()):
                raise
            outages.failed(exc)
