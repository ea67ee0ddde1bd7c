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

from worker.common.connections import text
from worker.protocol import split_id


@dataclass(frozen=True)
class Claimed:
    """A pending entry now owned by the claiming consumer, with its delivery count (this claim included)."""

    entry_id: str
    fields: dict[bytes, bytes]  # empty if the entry was trimmed from the stream meanwhile
    deliveries: int


def claim(
    client: redis.Redis, stream: str, group: str, consumer: str, min_idle_ms: int, page: int = 1000
) -> list[Claimed]:
    """Claim for ``consumer`` every entry of ``group`` on ``stream`` pending at least ``min_idle_ms``.

    Entries of every consumer qualify, ``consumer``'s own included. Returned in stream-ID order.
    """
    cursor, entries = "0-0", {}
    while True:
        cursor, batch, *_ = client.xautoclaim(stream, group, consumer, min_idle_ms, cursor, count=page)
        entries.update({text(i): f or {} for i, f in batch})
        if text(cursor) == "0-0":
            break
    if not entries:
        return []
    ids = sorted(entries, key=split_id)
    # The consumer may hold younger entries of its own between these bounds: leave room for them.
    pending = client.xpending_range(stream, group, ids[0], ids[-1], 2 * len(ids) + 100, consumer)
    deliveries = {text(info["message_id"]): info["times_delivered"] for info in pending}
    return [Claimed(i, entries[i], deliveries.get(i, 1)) for i in ids]


def triage(entries: list[Claimed], max_deliveries: int) -> tuple[list[Claimed], set[str]]:
    """Split claimed entries into the ones to bury and the IDs of suspects.

    An entry delivered more than ``max_deliveries`` times has likely killed every worker that read
    it: it goes to the dead stream. Entries delivered more than twice (once, if ``max_deliveries``
    < 5) are suspects: read and handled one at a time, so only the entry in hand gains a delivery
    and a killer reaches the limit before its neighbours.
    """
    suspect_after = min(2, max_deliveries - 2)
    buried = [e for e in entries if e.deliveries > max_deliveries]
    suspects = {e.entry_id for e in entries if suspect_after < e.deliveries <= max_deliveries}
    return buried, suspects
