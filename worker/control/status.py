"""``python -m worker control status``: live models, stream lengths, consumer-group lag, pending and
dead entries of one swarm (its prefix); with ``--swarms``, a row for every swarm (see swarms.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Literal

import redis
from pydantic import Field

from worker.common.connections import text
from worker.common.registry import live_models
from worker.common.settings import CommonSettings
from worker.protocol import Streams


def status(client: redis.Redis, streams: Streams) -> dict[str, Any]:
    """Live models, stream lengths, and per consumer group its lag and pending entries."""
    report: dict[str, Any] = {"models": {}, "streams": {}, "groups": {}}
    for cid in live_models(client, streams):
        info = client.hgetall(streams.model_key(cid, "info"))
        report["models"][cid] = {k.decode(): _counter(k.decode(), v.decode()) for k, v in info.items()}
    names = [
        streams.observation,
        streams.evolution,
        streams.logits,
        streams.weights,
        streams.action,
        streams.control,
        streams.status,
        streams.dead,
    ]
    for name in names:
        report["streams"][name] = client.xlen(name)
    for name in (streams.observation, streams.evolution, streams.logits):
        if not client.exists(name):
            continue
        for group in client.xinfo_groups(name):
            group_name = text(group["name"])
            key = f"{name} {group_name}"
            report["groups"][key] = {"pending": group["pending"], "lag": group.get("lag")}
            if name != streams.logits and group_name.removeprefix("model:") not in report["models"]:
                report["groups"][key]["stale"] = True  # its model is not live: `control forget` it?
    report["dead"] = report["streams"][streams.dead]
    return report


def _counter(key: str, value: str) -> int | str | dict:
    """The info hash's counters and flags as numbers, the policy lag as its summary; the rest (the
    consumer's name) as text."""
    numbers = ("version", "updates", "paused", "envs", "reconnects", "unreplicated")
    if key == "policy_lag":
        return json.loads(value)
    return int(value) if key in numbers else value


def print_status(report: dict[str, Any]) -> None:
    """``status`` as three small tables a person can read at a glance."""
    if "redis" in report:
        print(f"redis: {report['redis']}")
    print(f"live models: {len(report['models'])}")
    for cid, info in report["models"].items():
        details = ", ".join(f"{k}={v}" for k, v in sorted(info.items()))
        print(f"  {cid}: {details}")
    print("streams (entries):")
    for name, length in report["streams"].items():
        print(f"  {name:<30} {length}")
    print("consumer groups:")
    for name, group in report["groups"].items():
        stale = "  (model not live)" if group.get("stale") else ""
        print(f"  {name:<45} pending={group['pending']} lag={group['lag']}{stale}")
    print(f"dead entries: {report['dead']}")


class StatusSettings(CommonSettings):
    """``python -m worker control status``: what is running and how far behind it is."""

    output: Literal["text", "json"] = Field("text", description="print tables, or JSON for scripts")
    swarms: bool = Field(
        False,
        description="every swarm found on this Redis (every primary of a cluster), one row each: its prefix,"
        " live models, observations, lag, pending and dead entries (--prefix is not used)",
    )


def run_status(settings: StatusSettings) -> int:
    from worker.common.connections import redacted

    if settings.swarms:
        return run_swarms(settings)
    found = status(settings.connect(), Streams(settings.prefix))
    report = {"redis": redacted(settings.redis_url), **found}
    if settings.output == "json":
        print(json.dumps(report, indent=2, default=str))
    else:
        print_status(report)
    return 0


def run_swarms(settings: StatusSettings) -> int:
    """``--swarms``: one row per swarm; in JSON, each with ``live`` (its count of live models)."""
    from worker.common.connections import redacted
    from worker.control.swarms import print_swarms, swarms

    rows = swarms(settings.connect())
    if settings.output == "json":
        found = [{**asdict(row), "live": len(row.models)} for row in rows]
        print(json.dumps({"redis": redacted(settings.redis_url), "swarms": found}, indent=2, default=str))
    else:
        print(f"redis: {redacted(settings.redis_url)}")
        print_swarms(rows)
    return 0
