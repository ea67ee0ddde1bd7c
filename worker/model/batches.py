"""A batch's entries: read from the model's input streams, put in one order, lingered for; and
what handling them produced (:class:`Outbox`), for the commit.

The model reads its three input streams (observations, its inbox, evolution commands) with one
``XREADGROUP``; their entries form one batch, in one order across the streams, so that a command
applies between the observations around it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.common.connections import text
from worker.protocol import split_id

LINGER_POLL = 0.00025  # seconds between two looks for more entries while a batch lingers

Entry = tuple[str, str, dict[bytes, bytes]]  # (stream, entry ID, fields)


def _order(entry: Entry, command_stream: str) -> tuple[int, bool, int]:
    """Order entries of both streams by time; within one millisecond, commands first.

    Sequence numbers count within one stream only, so across streams the millisecond is all
    the order there is.
    """
    ms, seq = split_id(entry[1])
    return ms, entry[0] != command_stream, seq


def entries_of(reply: Any, command_stream: str) -> list[Entry]:
    """The entries of an ``XREADGROUP`` reply, in one order across the streams (see :func:`_order`).

    :param reply: redis-py's reply (``None`` when nothing came)
    :param command_stream: the evolution stream, whose entries go first within a millisecond
    """
    entries: list[Entry] = []
    for stream, items in reply or []:
        name = text(stream)
        for entry_id, fields in items:
            entries.append((name, text(entry_id), fields or {}))  # None if the entry was trimmed
    entries.sort(key=lambda entry: _order(entry, command_stream))
    return entries


def linger(
    entries: list[Entry],
    sizes: tuple[int, int],
    linger_ms: float,
    read: Callable[[int], list[Entry]],
    command_stream: str,
) -> list[Entry]:
    """``entries`` and those that came within ``linger_ms`` after, until there are ``min_batch``.

    With environments that step on their own (asynchronous runners) entries come one by one, and a
    batch of one pays a whole read, forward pass, update and commit for one step. The looks are
    reads that do not block, between short sleeps: Redis would end a short blocking read late, at
    its next tick (every 100 ms with the default ``hz`` 10) when nothing else wakes it.

    :param sizes: ``(min_batch, batch_size)``: the fewest entries worth a batch, and the most (the
        settings refuse a ``min_batch`` above ``batch_size``)
    :param read: reads at most the given number of new entries, without blocking
    :param command_stream: the evolution stream (see :func:`entries_of`)
    """
    min_batch, batch_size = sizes
    if not entries or len(entries) >= min_batch or linger_ms <= 0:
        return entries
    deadline = time.monotonic() + linger_ms / 1000
    while len(entries) < min_batch and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, LINGER_POLL))
        entries += read(batch_size - len(entries))
    entries.sort(key=lambda entry: _order(entry, command_stream))
    return entries


@dataclass
class Outbox:
    """What handling a batch of entries produced, which the model worker's commit makes a
    :class:`~worker.model.store.Batch`."""

    messages: list[tuple[str, dict]] = field(default_factory=list)
    acks: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    touched_envs: set[str] = field(default_factory=set)
    forgotten_envs: list[str] = field(default_factory=list)
    weights_changed: bool = False
    weights_loaded: bool = False  # by a SET
    answered: list[str] = field(default_factory=list)  # entry IDs of the observations replied to
    rejected: list[str] = field(default_factory=list)  # the reasons of the dead letters
