"""``python -m worker control status --swarms``: every swarm on one Redis or a Redis Cluster, one row each.

A swarm is the set of keys under one prefix. Nothing lists the prefixes, so they are found by their
marks: a registry of models (``<prefix>:models``, a sorted set, written by every model's heartbeat)
or an observation stream (``<prefix>:observation``, made by the first model or the first
environment, and left behind when every model has stopped and left the registry). Both are searched
with ``SCAN ... MATCH ... TYPE``, never ``KEYS``, which would block the server for the whole keyspace;
on a cluster the client scans every primary. A model's inbox, ``<prefix>:model:<id>:observation``,
is a stream with the same ending: it is told apart because its prefix would sit under another swarm's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from worker.common.connections import text
from worker.common.registry import live_models
from worker.protocol import Streams

# The endings of the two marks, taken from the protocol's names (an empty prefix leaves ":<name>").
REGISTRY = Streams("").registry
OBSERVATION = Streams("").observation


@dataclass
class Swarm:
    """One swarm at a glance.

    :param prefix: the prefix of its keys (``rl``; ``{rl}`` on a cluster)
    :param models: IDs of its live models
    :param observations: entries in ``<prefix>:observation``
    :param lag: the largest lag of a live model's consumer group on the observation stream (entries
        not yet delivered to it); None if no live model has a group whose lag Redis knows
    :param pending: entries delivered to live models' groups but not yet committed, all groups summed
    :param stale: consumer groups on the observation stream whose model is not live (``control forget``)
    :param dead: entries in ``<prefix>:dead``
    :param primary: on a cluster, ``host:port`` of the primary serving the swarm's slot
    :param groups: per model consumer group on the observation stream: ``pending``, ``lag``, ``stale``
    """

    prefix: str
    models: list[str]
    observations: int
    lag: int | None
    pending: int
    stale: int
    dead: int
    primary: str | None = None
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)


def prefixes(client: redis.Redis) -> list[str]:
    """The prefixes of every swarm ``client`` can see (every primary of a cluster), sorted.

    :param client: a ``redis.Redis`` or a ``redis.RedisCluster``
    """
    streams = _marked(client, OBSERVATION, "stream")
    candidates = _marked(client, REGISTRY, "zset") | streams
    # "<p>:model:<id>:observation" is the inbox of a model of swarm <p>, not a swarm "<p>:model:<id>".
    inboxes = {s for s in streams if any(s.startswith(Streams(p).model_key("")) for p in candidates)}
    return sorted(candidates - inboxes)


def _marked(client: redis.Redis, ending: str, kind: str) -> set[str]:
    """What comes before ``ending`` in the name of every key of type ``kind`` that ends so."""
    return {text(key).removesuffix(ending) for key in client.scan_iter(match=f"*{ending}", _type=kind)}


def swarm(client: redis.Redis, prefix: str) -> Swarm:
    """The row of the swarm under ``prefix``: its live models, their lag and pending entries.

    :param client: a ``redis.Redis`` or a ``redis.RedisCluster`` (every key read is in one slot)
    :param prefix: the swarm's prefix, as :func:`prefixes` finds it
    """
    streams = Streams(prefix)
    models = live_models(client, streams)
    groups: dict[str, dict[str, Any]] = {}
    try:
        infos = client.xinfo_groups(streams.observation)
    except redis.ResponseError as exc:
        if "no such key" not in str(exc):
            raise
        infos = []  # a swarm known by its registry alone: no observation yet
    for info in infos:
        name = text(info["name"])
        component_id = name.removeprefix(Streams.group(""))
        if name == component_id:
            continue  # not a model's group (another reader of the stream): not the models' lag
        stale = component_id not in models
        groups[name] = {"pending": info["pending"], "lag": info.get("lag"), "stale": stale}
    live = [g for g in groups.values() if not g["stale"]]
    # Redis cannot always tell a group's lag (after XDEL, or a group made at an arbitrary ID): None.
    lags = [g["lag"] for g in live if g["lag"] is not None]
    row = Swarm(
        prefix=prefix,
        models=models,
        observations=client.xlen(streams.observation),
        lag=max(lags) if lags else None,
        pending=sum(g["pending"] for g in live),
        stale=len(groups) - len(live),
        dead=client.xlen(streams.dead),
        groups=groups,
    )
    if isinstance(client, redis.RedisCluster):
        # Asked after the reads above: had the slot moved, their MOVED replies updated this map.
        node = client.get_node_from_key(streams.registry)
        row.primary = f"{node.host}:{node.port}"
    return row


def swarms(client: redis.Redis) -> list[Swarm]:
    """Every swarm ``client`` can see, one :class:`Swarm` each, sorted by prefix.

    :param client: a ``redis.Redis`` or a ``redis.RedisCluster``
    """
    return [swarm(client, prefix) for prefix in prefixes(client)]


def print_swarms(rows: list[Swarm]) -> None:
    """One line per swarm, in columns; a cluster's rows name the primary serving each swarm."""
    print(f"swarms: {len(rows)}")
    if not rows:
        return
    cluster = any(row.primary for row in rows)
    width = max(len("prefix"), *(len(row.prefix) for row in rows))
    head = f"  {'prefix':<{width}} {'models':>6} {'observations':>12} {'lag':>6} {'pending':>7}"
    head += f" {'stale':>5} {'dead':>6}" + (f" {'primary':<21}" if cluster else "") + " live model IDs"
    print(head)
    for row in rows:
        lag = "?" if row.lag is None else row.lag
        line = f"  {row.prefix:<{width}} {len(row.models):>6} {row.observations:>12} {lag:>6}"
        line += f" {row.pending:>7} {row.stale:>5} {row.dead:>6}"
        line += (f" {row.primary or '-':<21}" if cluster else "") + " " + (", ".join(row.models) or "-")
        print(line)
