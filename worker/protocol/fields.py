"""Validation of single fields, shared by every message: flags, numbers, names (arrays: values.py).

Each raises :class:`~worker.protocol.encoding.ProtocolError` with a reason a person can act on, and
describes a bad value in a bounded number of characters.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from worker.protocol.encoding import NotJson, ProtocolError

_repr = reprlib.Repr()
_repr.maxlist = _repr.maxdict = 8
_repr.maxstring = _repr.maxother = 40
_repr.maxlevel = 3


def describe(value: Any) -> str:
    if isinstance(value, NotJson) and value.lstrip()[:1] in ("[", "{", '"'):
        return f"text that is not JSON ({value.error})"  # meant as JSON: say where it breaks
    if isinstance(value, NotJson):
        value = str(value)  # a bare word: a string, as the protocol reads it
    text = _repr.repr(value)  # bounded work: a multi-megabyte array is not repr'd whole
    return text if len(text) <= 60 else text[:57] + "..."


def flag(message: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = message.get(key, default)
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise ProtocolError(f"{key} must be true or false, got {describe(value)}")


def name(
    message: Mapping[str, Any], key: str, default: str | None = None, max_length: int | None = None
) -> str:
    """An identifier (ENV_ID, OBS_ID, COMPONENT_ID, RUN_ID...): a non-empty string, or an integer
    taken as its decimal text, since ``redis-cli``'s ``RUN_ID 7`` arrives as the JSON integer 7 and
    must name the same thing as ``"7"``.

    :param default: the value when ``key`` is absent; ``None`` makes the key required
    :param max_length: the most characters allowed (``None``: no limit)
    """
    value = message.get(key, default)
    if type(value) is int:
        value = str(value)
    if isinstance(value, str) and value and (max_length is None or len(value) <= max_length):
        return str(value)  # a plain str, not the NotJson text of a plain field
    what = "a non-empty string" if max_length is None else f"a string of 1 to {max_length} characters"
    got = "it is missing" if key not in message else f"got {describe(value)}"
    raise ProtocolError(f"{key} must be {what} (or an integer); {got}")


def choice(message: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``, spelled exactly (``CMD``: ``GET`` but not ``get``)."""
    value = message.get(key)
    if isinstance(value, str) and value in choices:
        return str(value)
    got = "it is missing" if key not in message else f"got {describe(value)}"
    raise ProtocolError(f"{key} must be one of {', '.join(choices)}; {got}")


def integer(message: Mapping[str, Any], key: str, minimum: int = 0, maximum: int | None = None) -> int | None:
    """An integer of at least ``minimum`` and at most ``maximum`` (booleans are not integers), or
    ``None`` when absent or null."""
    value = message.get(key)
    if value is None:
        return None
    if type(value) is not int or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise ProtocolError(f"{key} must be {what}, got {describe(value)}")
    if maximum is not None and value > maximum:
        raise ProtocolError(f"{key} must be at most {maximum}, got a larger integer")
    return value


FLOAT32_MAX = float(np.finfo(np.float32).max)


def number(message: Mapping[str, Any], key: str) -> float:
    value = message[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{key} must be a number, got {describe(value)}")
    try:
        value = float(value)
    except OverflowError:  # a JSON integer beyond the float range
        raise ProtocolError(f"{key} must be finite, got an integer of {len(str(value))} digits") from None
    if not abs(value) <= FLOAT32_MAX:  # NaN fails too; training keeps rewards in float32
        raise ProtocolError(f"{key} must be finite and within float32's range (about ±3.4e38), got {value}")
    return value


def numbers(message: Mapping[str, Any], key: str) -> list[float]:
    """A list of any length, each item a number as :func:`number` checks one."""
    value = message[key]
    if not isinstance(value, list):
        raise ProtocolError(f"{key} must be a list of numbers, got {describe(value)}")
    return [number({key: item}, key) for item in value]


def has_bool(value: Any) -> bool:
    """Whether a nested list holds a boolean anywhere (no numpy: object arrays stop at 32 dimensions)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is bool:
            return True
        if isinstance(item, list):
            stack.extend(item)
    return False
