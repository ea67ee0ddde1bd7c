"""The registry of live models: a sorted set of component IDs scored by their last heartbeat."""

from __future__ import annotations

import time

import redis

from worker.protocol import Streams

LIVE_MAX_AGE = 5.0  # seconds: a model whose last heartbeat is older is not live


def live_models(client: redis.Redis, streams: Streams, max_age: float = LIVE_MAX_AGE) -> list[str]:
    """Component IDs whose last heartbeat is at most ``max_age`` seconds old."""
    members = client.zrangebyscore(streams.registry, time.time() - max_age, "+inf")
    return sorted(m.decode() if isinstance(m, bytes) else m for m in members)
