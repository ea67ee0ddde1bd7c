"""Values of a space on the wire: observations and actions, checked against the model's spaces.

A Box value is a (nested) list of numbers, or, in msgpack entries, a binary array: a map
``{"dtype": "uint8", "shape": [84, 84, 3], "data": <bin>}`` whose ``data`` holds the values in C
order, little-endian (an 84x84x3 image costs 21 KB instead of about 60 KB of JSON). A Discrete
value is an integer; MultiDiscrete and MultiBinary values are lists of integers; a Dict value is a
map with exactly the space's keys. Errors name the key, down to a Dict's own (``OBSERVATION.speed``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from worker.protocol import fields
from worker.protocol.encoding import ProtocolError

BINARY_KEYS = frozenset(("dtype", "shape", "data"))
MAX_DIMENSIONS = 8

Value = np.ndarray | dict[str, np.ndarray]  # what a parsed observation is


def binary(array: np.ndarray) -> dict[str, Any]:
    """The binary form of ``array`` (msgpack entries only: JSON has no bytes)."""
    shape = list(np.shape(array))  # before ascontiguousarray, which makes a 0-d array 1-d
    little = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
    return {"dtype": array.dtype.name, "shape": shape, "data": little.tobytes()}


def _from_binary(value: Mapping[str, Any], key: str) -> np.ndarray:
    if set(value) != BINARY_KEYS:
        raise ProtocolError(
            f"{key}: a binary array is a map of dtype, shape and data; got keys {sorted(value)}"
        )
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    try:
        dt = np.dtype(dtype) if isinstance(dtype, str) else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in "biuf" or dt.byteorder == ">":
        raise ProtocolError(
            f"{key}: dtype must name a little-endian number type (e.g. uint8, float32),"
            f" got {fields.describe(dtype)}"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMENSIONS
        or any(type(n) is not int or n < 0 for n in shape)
    ):
        raise ProtocolError(f"{key}: shape must be a list of sizes, got {fields.describe(shape)}")
    if not isinstance(data, bytes):
        raise ProtocolError(f"{key}: data must be msgpack bin, got {fields.describe(data)}")
    expected = int(np.prod(shape)) * dt.itemsize
    if len(data) != expected:
        raise ProtocolError(f"{key}: data has {len(data)} bytes, shape {shape} of {dt.name} needs {expected}")
    return np.frombuffer(data, dt.newbyteorder("<")).reshape(shape)


def _numbers(value: Any, key: str) -> np.ndarray:
    """A rectangular array of numbers from a nested list or a binary array."""
    if isinstance(value, Mapping):
        return _from_binary(value, key)
    if isinstance(value, fields.NotJson | str | bytes) or not isinstance(value, list | int | float):
        raise ProtocolError(f"{key} must be an array of numbers, got {fields.describe(value)}")
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError) as exc:
        raise ProtocolError(f"{key} is not a rectangular array of numbers: {exc}") from None
    if array.dtype.kind not in "iuf" or fields.has_bool(value):  # numpy turns [1, true] into [1, 1]
        raise ProtocolError(f"{key} must hold only numbers, got {fields.describe(value)}")
    return array


def _shaped(array: np.ndarray, shape: tuple[int, ...], key: str, flat_ok: bool = False) -> np.ndarray:
    if array.shape != shape:
        if flat_ok and array.size == int(np.prod(shape)) and array.ndim <= 1:
            return array.reshape(shape)
        raise ProtocolError(f"{key} must have shape {list(shape)}, got {list(array.shape)}")
    return array


def _as_dtype(array: np.ndarray, dtype: np.dtype, key: str) -> np.ndarray:
    """``array`` in ``dtype``: floats must stay finite, integers must be whole and in range."""
    if dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            cast = array.astype(dtype)
        if not np.isfinite(cast).all():
            raise ProtocolError(f"{key} must be finite and within {dtype.name}'s range")
        return cast
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    low, high = (info.min, info.max) if info is not None else (0, 1)
    if array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()):
        raise ProtocolError(
            f"{key} must hold whole numbers ({dtype.name}), got fractions or non-finite values"
        )
    if array.size and (array.min() < low or array.max() > high):
        raise ProtocolError(f"{key} must hold {dtype.name} values in [{low}, {high}]")
    return array.astype(dtype)


def _integers(value: Any, key: str, shape: tuple[int, ...], below: np.ndarray | int, what: str) -> np.ndarray:
    array = _shaped(_numbers(value, key), shape, key)
    array = _as_dtype(array, np.dtype(np.int64), key)
    if array.size and ((array < 0).any() or (array >= below).any()):
        raise ProtocolError(f"{key} must hold {what}, got {fields.describe(array.tolist())}")
    return array


def array(value: Any, shape: tuple[int, ...], dtype: np.dtype, key: str, flat_ok: bool = False) -> np.ndarray:
    """A Box's value (a nested list or a binary array) of exactly ``shape`` in ``dtype`` (see
    :func:`_as_dtype`); ``flat_ok``: also a flat list of all its values.

    :raises ProtocolError: naming the key and what is wrong
    """
    if (
        type(value) is list
        and dtype == np.float32
        and len(shape) == 1
        and len(value) == shape[0]
        and all(
            (type(x) is float or type(x) is int) and -fields.FLOAT32_MAX < x < fields.FLOAT32_MAX
            for x in value
        )
    ):  # the common case in one pass: a flat list of finite numbers that fit float32
        return np.array(value, dtype=np.float32)
    return _as_dtype(_shaped(_numbers(value, key), shape, key, flat_ok), dtype, key)


def parse_value(value: Any, space: gym.Space, key: str) -> Value:
    """``value`` checked against ``space``, as the array the policy takes (a dict of them for a Dict).

    :param value: the decoded field
    :param space: the space it must belong to (bounds of a Box are not checked, as SB3 does not)
    :param key: its name, for the reasons of errors
    :raises ProtocolError: naming the key and what is wrong
    """
    if isinstance(space, gym.spaces.Box):
        return array(value, space.shape, space.dtype, key)
    if isinstance(space, gym.spaces.Discrete):
        item = value[0] if isinstance(value, list) and len(value) == 1 else value  # as from a vector env
        if type(item) is not int or not 0 <= item < space.n:
            raise ProtocolError(f"{key} must be an integer in [0, {space.n}), got {fields.describe(value)}")
        return np.array(item, dtype=np.int64)
    if isinstance(space, gym.spaces.MultiDiscrete):
        nvec = space.nvec
        return _integers(value, key, nvec.shape, nvec, f"integers in [0, n) for n in {nvec.tolist()}")
    if isinstance(space, gym.spaces.MultiBinary):
        return _integers(value, key, (int(space.n),), 2, f"{space.n} values of 0 or 1").astype(np.int8)
    assert isinstance(space, gym.spaces.Dict)
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ProtocolError(f"{key} must be a map of {', '.join(space.spaces)}, got {fields.describe(value)}")
    if missing := [k for k in space.spaces if k not in value]:
        raise ProtocolError(f"{key} is missing key {missing[0]!r} (it needs {', '.join(space.spaces)})")
    if extra := [k for k in value if k not in space.spaces]:
        raise ProtocolError(f"{key} has key {fields.describe(extra[0])}, which the space has not")
    return {k: parse_value(value[k], sub, f"{key}.{k}") for k, sub in space.spaces.items()}  # type: ignore[misc]


def parse_action_value(value: Any, space: gym.Space, key: str = "ACTION") -> int | np.ndarray:
    """An action of ``space``: an integer for Discrete, else an array of the space's shape (a Box's
    may also come flat, as a list of all its values). A Box action is not checked against the bounds:
    the models learn from the action sampled, before clipping (as SB3).

    :raises ProtocolError: naming the key and what is wrong
    """
    if isinstance(space, gym.spaces.Discrete):
        return int(parse_value(value, space, key))
    if isinstance(space, gym.spaces.Box):
        return array(value, space.shape, np.dtype(np.float32), key, flat_ok=True)
    return parse_value(value, space, key)  # type: ignore[return-value]


def _in_type(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` in the Box's own type where that loses nothing a model would accept (floats to its
    float type; integers that fit to its integer type), else as it is, for the model to judge."""
    if dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):  # too large: the model's check says so
            return array.astype(dtype)
    if array.dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype) if dtype.kind in "iu" else None
        if info is not None and info.min <= array.min() and array.max() <= info.max:
            return array.astype(dtype)
    return array


def wire_value(value: Any, space: gym.Space, binary_arrays: bool) -> Any:
    """``value`` (as an environment gives it) in the form a message carries for ``space``.

    :param binary_arrays: Box values as binary arrays (msgpack entries) rather than lists
    """
    if isinstance(space, gym.spaces.Dict):
        if not isinstance(value, Mapping):
            raise ValueError(f"a Dict space's value must be a mapping, got {type(value).__name__}")
        return {k: wire_value(value[k], sub, binary_arrays) for k, sub in space.spaces.items() if k in value}
    if isinstance(space, gym.spaces.Discrete):
        return int(np.asarray(value).reshape(-1)[0]) if np.ndim(value) else int(value)
    array = np.asarray(value)
    if isinstance(space, gym.spaces.Box):
        if binary_arrays and array.dtype.kind in "biuf":
            return binary(_in_type(array, space.dtype))
        return array.tolist()
    return array.astype(np.int64).tolist()
