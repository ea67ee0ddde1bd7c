"""Small helpers the tests share: publish entries as other programs would, read replies back."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np
import redis

from worker.model.loop import ModelWorker


def xadd(
    client: redis.Redis, stream: str, message: dict[str, Any], encoding: str = "json", entry_id: str = "*"
) -> str:
    """Publish ``message`` the way an environment or ``redis-cli`` would (``entry_id``: an explicit ID)."""
    if encoding == "msgpack":
        fields = {"data": msgpack.packb(message, use_bin_type=True)}
    else:
        fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in message.items()}
    return client.xadd(stream, fields, id=entry_id).decode()


def values(value: Any) -> Any:
    """An observation as lists, whether it travelled as lists or as a binary array."""
    if isinstance(value, dict) and set(value) == {"dtype", "shape", "data"}:
        return np.frombuffer(value["data"], np.dtype(value["dtype"])).reshape(value["shape"]).tolist()
    if isinstance(value, dict):
        return {k: values(v) for k, v in value.items()}
    return value


def read(client: redis.Redis, stream: str) -> list[tuple[str, dict[str, Any]]]:
    """Every entry of ``stream``, decoded from either encoding."""
    out = []
    for entry_id, fields in client.xrange(stream):
        if b"data" in fields:
            message = msgpack.unpackb(fields[b"data"], raw=False)
        else:
            message = {}
            for k, v in fields.items():
                try:
                    message[k.decode()] = json.loads(v)
                except ValueError:
                    message[k.decode()] = v.decode(errors="replace")
        out.append((entry_id.decode(), message))
    return out


def drain(worker: ModelWorker, limit: int = 10_000) -> int:
    """Poll until the worker finds nothing more to read; return the entries handled."""
    total = 0
    for _ in range(limit):
        n = worker.poll()
        if n == 0:
            return total
        total += n
    raise AssertionError("worker did not drain")
