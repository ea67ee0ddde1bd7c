"""Redis connections: clients from a URL (one server or a Redis Cluster), consumer groups."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import key_slot
from redis.retry import Retry
from redis.utils import str_if_bytes


class RedisAccessError(SystemExit):
    """Redis refuses this client for good (credentials, TLS certificate): retrying cannot help.

    A ``SystemExit``, so a command started from the CLI stops with this one line on stderr and exit
    status 1 instead of a traceback or an endless retry loop.
    """


def text(value: bytes | str) -> str:
    """A Redis reply's name or ID as ``str`` (clients without ``decode_responses`` give ``bytes``)."""
    return value.decode() if isinstance(value, bytes) else value


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def stream_read_slot(args: tuple[Any, ...], encoder: Any) -> int | None:
    """The slot of an ``XREAD``/``XREADGROUP`` command's streams (None for any other command, or
    streams in several slots).

    Their keys follow the keyword ``STREAMS``, where redis-py does not look for them: it asks its
    default node (``COMMAND GETKEYS``), one more round trip per read, all on the node of the URL.
    """
    if str_if_bytes(args[0]).upper() not in ("XREAD", "XREADGROUP"):
        return None
    words = [str_if_bytes(a).upper() if isinstance(a, str | bytes) else a for a in args]
    if "STREAMS" not in words:
        return None
    rest = args[words.index("STREAMS") + 1 :]
    slots = {key_slot(encoder.encode(key)) for key in rest[: len(rest) // 2]}
    return slots.pop() if len(slots) == 1 else None


class Cluster(redis.RedisCluster):
    """redis-py's cluster client, routing stream reads by their keys (:func:`stream_read_slot`)."""

    def determine_slot(self, *args: Any) -> int | None:
        slot = stream_read_slot(args, self.encoder)
        return super().determine_slot(*args) if slot is None else slot


def connect(url: str, cluster: bool = False, **kwargs: Any) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` for TLS, ``unix://``; AUTH in the URL).

    TLS options are query parameters of the URL, passed to redis-py's ``SSLConnection``:
    ``rediss://host:6380/0?ssl_ca_certs=/path/ca.crt`` (a private CA), plus ``ssl_certfile`` and
    ``ssl_keyfile`` for a client certificate (``tls-auth-clients yes``). See docs/security.md.

    Single commands retry with exponential backoff on connection errors, so a short Redis restart
    is ridden out; the worker loop handles longer outages itself. Wrong credentials or a server
    certificate that does not verify raise :class:`RedisAccessError` here, at once: they are not
    outages. An unreachable server is not an error yet (the caller's retries deal with it).

    :param cluster: ``url`` names one node of a Redis Cluster: the client (a :class:`Cluster`, typed
        as its ``redis.Redis`` API) discovers the others, follows
        ``MOVED`` and ``ASK``, and refreshes its map of the slots when a node fails (its retries
        cover ``TRYAGAIN`` and ``CLUSTERDOWN`` too)
    """
    kwargs.setdefault("retry", Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5))
    kwargs.setdefault("health_check_interval", 30)
    # A frozen server or a half-open connection must not block a "timed" wait forever; every
    # blocking read here blocks for at most 30 s (the block_ms settings' bound).
    kwargs.setdefault("socket_timeout", 60)
    check_access(url, **kwargs)
    if cluster:
        try:
            return Cluster.from_url(url, **kwargs)  # type: ignore[return-value]
        except redis.exceptions.NoPermissionError as exc:  # COMMAND, read once to route commands
            refused = f"error: Redis at {redacted(url)} refused {exc} (see docs/security.md)"
            raise RedisAccessError(refused) from None
        except redis.exceptions.RedisClusterException as exc:
            if "not enabled" in str(exc):  # redis-py says so of any error CLUSTER SLOTS answers
                raise RedisAccessError(_not_a_cluster(url, **kwargs)) from None
            unreachable = f"no node of the Redis Cluster at {redacted(url)} answers: {exc}"
            raise redis.ConnectionError(unreachable) from exc
    kwargs.setdefault("retry_on_error", [redis.ConnectionError, redis.TimeoutError])
    return redis.Redis.from_url(url, **kwargs)


def _not_a_cluster(url: str, **kwargs: Any) -> str:
    """Why ``CLUSTER SLOTS`` failed at ``url``: not a cluster node, or an ACL user without it."""
    kwargs = {**kwargs, "retry": Retry(NoBackoff(), 0), "socket_connect_timeout": 5}
    with redis.Redis.from_url(url, **kwargs) as probe:
        try:
            probe.execute_command("CLUSTER", "SLOTS")
        except redis.exceptions.NoPermissionError as exc:
            where = f"error: Redis at {redacted(url)} refused CLUSTER SLOTS"
            return f"{where}: {exc} (grant +cluster|slots, see docs/security.md)"
        except redis.RedisError:
            pass
    return f"error: Redis at {redacted(url)} is not a cluster node: drop --cluster (REDIS_CLUSTER)"


def hash_tagged(prefix: str) -> bool:
    """Whether every key under ``prefix`` hashes to one Redis Cluster slot: it holds a ``{tag}``.

    Redis hashes only the text between a key's first ``{`` and the next ``}`` when it is not empty;
    a swarm's keys all begin with its prefix, so a tag there puts them all in the tag's slot.
    """
    start = prefix.find("{")
    end = prefix.find("}", start + 1)
    return start >= 0 and end > start + 1  # an empty tag ("{}") counts for nothing: Redis hashes the key


def swarm_prefix(prefix: str | None, cluster: bool) -> str:
    """The prefix a swarm's keys get: ``prefix``, or by default ``rl`` (``{rl}`` on a cluster).

    :raises ValueError: on a cluster, a prefix without a hash tag (one line saying what to use)
    """
    if prefix is None:
        return "{rl}" if cluster else "rl"
    if cluster and not hash_tagged(prefix):
        tag = prefix.strip("{}") or "rl"
        raise ValueError(
            f"in cluster mode the prefix must hold a hash tag, so that a swarm's keys share one slot"
            f" (its scripts touch several at once): use --prefix '{{{tag}}}' (STREAM_PREFIX), not {prefix!r}"
        )
    return prefix


def check_access(url: str, **kwargs) -> None:
    """One PING without retries: raise :class:`RedisAccessError` if Redis refuses us for good."""
    kwargs = {**kwargs, "retry": Retry(NoBackoff(), 0), "socket_connect_timeout": 5}
    probe = redis.Redis.from_url(url, **kwargs)
    try:
        probe.ping()
    except redis.AuthenticationError as exc:  # WRONGPASS, NOAUTH (no or wrong credentials in the URL)
        raise RedisAccessError(f"error: Redis at {redacted(url)} refused the credentials: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        if isinstance(exc.__context__, ssl.SSLCertVerificationError):
            raise RedisAccessError(
                f"error: the TLS certificate of Redis at {redacted(url)} does not verify: {exc.__context__}"
                " (give the CA with ?ssl_ca_certs=/path/ca.crt)"
            ) from None
        # not reachable (yet): the caller's retries and loop handle outages
    except redis.ResponseError:
        pass  # e.g. NOPERM for PING: the user may run without it; its own commands will tell
    finally:
        probe.close()


def after_cluster_error(client: Any, error: BaseException) -> None:
    """What a cluster client needs after ``error``: another node to ask where keys lie.

    redis-py asks its *default node* (``COMMAND GETKEYS``) where the keys of a command with movable
    keys lie (``XREAD`` of the asyncio client; :class:`Cluster` routes stream reads itself) before
    routing it. With that node dead, such a command fails before redis-py would refresh its slot
    map, and keeps failing for as long as the node is down: a client that only reads would never
    see the replica promoted in its place. Any other primary answers ``COMMAND GETKEYS`` as well.

    :param client: a ``redis.Redis``, ``redis.RedisCluster`` or their asyncio twins (only a cluster
        client is changed)
    """
    lost_node = isinstance(error, redis.ConnectionError | redis.TimeoutError)
    if lost_node and hasattr(client, "replace_default_node"):
        client.replace_default_node()


# TIME of the server holding KEYS[1]. A cluster client sends a TIME without a key to any node, not
# the one whose clock stamps the swarm's entry IDs.
_CLOCK = "return redis.call('TIME')"


def server_time(client: redis.Redis, key: str) -> float:
    """Seconds since the epoch on the clock of the server holding ``key`` (its entry IDs' clock)."""
    seconds, micros = client.eval(_CLOCK, 1, key)
    return int(seconds) + int(micros) / 1e6


def ensure_group(client: redis.Redis, stream: str, group: str, start: str = "$") -> bool:
    """Create ``group`` on ``stream``, making the stream if needed; True if it was new.

    :param start: the group reads the entries after this ID; ``$``, the stream's end, for a group
        never made before (a component that made it before passes the last entry it read, so a
        group that vanished, as in a Redis that came back empty, misses nothing published since)
    """
    try:
        client.xgroup_create(stream, group, id=start, mkstream=True)
        return True
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False


def last_id(client: redis.Redis, stream: str) -> str:
    """What ``$`` means now, as a concrete ID: reading after it later misses nothing in between."""
    try:
        value = client.xinfo_stream(stream)["last-generated-id"]
    except redis.ResponseError as exc:
        if "no such key" not in str(exc):
            raise  # BUSY, TRYAGAIN, ...: an outage, not a stream that does not exist
        return "0-0"  # no such stream yet: everything added later is new
    return text(value)
