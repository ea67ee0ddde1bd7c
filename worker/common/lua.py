"""Lua scripts: loading the one beside its caller, and building its arguments.

Every write that must be atomic is a script rather than a ``MULTI``/``EXEC``, for two reasons. It is
one round trip (a fenced transaction is three: ``WATCH``, a read, ``EXEC``). And it can be made
idempotent: redis-py resends a command whose reply was lost (the connection dropped after Redis
executed it), which for a transaction means applying it twice; each script first checks whether it
was applied already, and then answers as the first copy did, or refuses. Redis does not roll a
script back when a command in it fails, so each script checks what could fail before its first
write. Scripts pass lists as *sections* of ARGV: a count, then the items (``sections.lua``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any


@cache
def source(package: str, name: str, sections: bool = False) -> str:
    """The text of the script ``name`` in ``package`` (beside the module that runs it).

    :param sections: prepend ``sections.lua``, the helper that reads sections of ARGV
    """
    text = resources.files(package).joinpath(name).read_text()
    if sections:
        text = resources.files(__package__).joinpath("sections.lua").read_text() + text
    return text


def section(items: list[Any]) -> list[Any]:
    """A section of a script's arguments: its length, then its items."""
    return [len(items), *items]


def fields(mapping: Mapping[Any, Any]) -> list[Any]:
    """A section of a mapping's field/value pairs, flattened (what ``HSET`` and ``XADD`` take)."""
    return section([x for pair in mapping.items() for x in pair])
