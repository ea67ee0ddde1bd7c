"""Taking over entries that a dead or stale consumer of a model's group read but never committed.

A worker acknowledges an entry only in the commit of the batch that handled it, so an entry read
by a worker that died (or froze and lost the lease) stays pending on that worker's consumer. The
lease holder claims such entries (``XAUTOCLAIM``): all of them when it starts, and periodically
those pending for ``--claim-idle-ms`` on any consumer. Each claim counts as a delivery; the worker
buries an entry delivered more than ``--max-deliveries`` times (see ``ModelWorker._claim_pending``).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis


@dataclass(frozen=True)
class Claimed:
    """A pending entry now owned by the claiming consumer, with its delivery count (this claim included)."""

    entry_id: str
    fields: dict[bytes, bytes]  # empty if the entry was trimmed from the stream meanwhile
    deliveries: int


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def claim(
    client: redis.Redis, stream: str, group: str, consumer: str, min_idle_ms: int, page: int = 1000
) -> list[Claimed]:
    """Claim for ``consumer`` every entry of ``group`` on ``stream`` pending at least ``min_idle_ms``.

    Entries of every consumer qualify, ``consumer``'s own included. Returned in stream-ID order.
    """
    cursor, entries = "0-0", {}
    while True:
        cursor, batch, *_ = client.xautoclaim(stream, group, consumer, min_idle_ms, cursor, count=page)
        entries.update({_text(i): f or {} for i, f in batch})
        if _text(cursor) == "0-0":
            break
    if not entries:
        return []
    ids = sorted(entries, key=_order)
    # The consumer may hold younger entries of its own between these bounds: leave room for them.
    pending = client.xpending_range(stream, group, ids[0], ids[-1], 2 * len(ids) + 100, consumer)
    deliveries = {_text(info["message_id"]): info["times_delivered"] for info in pending}
    return [Claimed(i, entries[i], deliveries.get(i, 1)) for i in ids]


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
