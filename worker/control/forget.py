"""``python -m worker control forget``: delete what stopped models left in Redis."""

from __future__ import annotations

import contextlib
import sys

import redis
from pydantic import Field

from worker.common.registry import live_models
from worker.common.settings import CommonSettings
from worker.protocol import Streams


class ForgetSettings(CommonSettings):
    """``python -m worker control forget``: delete what stopped models left in Redis."""

    component_id: list[str] = Field(description="a model to forget; repeat the flag for more")
    registry_max_age: float = Field(5.0, gt=0, description="a model with a heartbeat this recent is live")


def forget(client: redis.Redis, streams: Streams, component_id: str) -> list[str]:
    """Delete a model's consumer groups, state (checkpoint, memory, lease, info), inbox, published
    policy, registry entry and contribution; what was there to delete. Its replies on the output
    streams stay."""
    removed = []
    group = Streams.group(component_id)
    for stream in (streams.observation, streams.evolution):
        with contextlib.suppress(redis.ResponseError):  # no such stream
            if client.xgroup_destroy(stream, group):
                removed.append(f"group {group} of {stream}")
    parts = ("checkpoint", "memory", "lease", "info", "observation", "policy")
    keys = [streams.model_key(component_id, part) for part in parts]
    removed += [key for key in keys if client.delete(key)]
    if client.zrem(streams.registry, component_id):
        removed.append(f"{component_id} in {streams.registry}")
    if client.hdel(streams.contribution, component_id):
        removed.append(f"{component_id} in {streams.contribution}")
    return removed


def run_forget(settings: ForgetSettings) -> int:
    """Forget each model that is not live: a live one (a recent heartbeat, or a lease held) would
    only write its state again, so it is refused; stop it first."""

    client, streams = settings.connect(), Streams(settings.prefix)
    live = set(live_models(client, streams, settings.registry_max_age))
    busy = [c for c in settings.component_id if c in live or client.exists(streams.model_key(c, "lease"))]
    if busy:
        print(f"error: live, not forgotten (stop them first): {', '.join(busy)}", file=sys.stderr)
        return 1
    for component_id in settings.component_id:
        removed = forget(client, streams, component_id)
        print(f"{component_id}: " + ("; ".join(removed) if removed else "nothing to forget"))
    return 0
