"""The wire protocol: stream names, the two entry encodings, and validation of every message.

Everything another program (or ``redis-cli``) must know to talk to the workers lives here and in
``docs/protocol.md``. Nothing in this module touches Redis.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack
import numpy as np

DATA_FIELD = b"data"
MAX_ENV_ID_LENGTH = 256


class ProtocolError(ValueError):
    """An entry that breaks the protocol; its message is the reason written to the dead stream."""


class Encoding(str, Enum):
    """How an entry's fields carry the message; a reply uses the encoding of the entry it answers."""

    MSGPACK = "msgpack"  # one field ``data`` holding a msgpack map
    JSON = "json"  # one field per key, each value JSON text


@dataclass(frozen=True)
class Streams:
    """Names of every stream and key of one deployment, all under one prefix.

    A prefix such as ``{rl}`` puts every key in one Redis Cluster hash slot, which the worker's
    commit (one Lua script over several keys) needs there.
    """

    prefix: str = "rl"

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def observation(self) -> str:
        return self.key("observation")

    @property
    def evolution(self) -> str:
        return self.key("evolution")

    @property
    def logits(self) -> str:
        return self.key("logits")

    @property
    def weights(self) -> str:
        return self.key("weights")

    @property
    def dead(self) -> str:
        return self.key("dead")

    @property
    def action(self) -> str:
        """Aggregated actions, aggregator -> environment runners."""
        return self.key("action")

    @property
    def control(self) -> str:
        """Run commands, control -> environment runners."""
        return self.key("control")

    @property
    def status(self) -> str:
        """Episode and run reports, environment runners -> control."""
        return self.key("status")

    @property
    def contribution(self) -> str:
        """Hash: component ID -> accumulated share in the aggregated actions."""
        return self.key("contribution")

    @property
    def decided(self) -> str:
        """Sorted set of the OBS_IDs the aggregator decided last (score: unix ms), to drop late replies."""
        return self.key("decided")

    @property
    def registry(self) -> str:
        """Sorted set of model component IDs scored by their last heartbeat (unix seconds)."""
        return self.key("models")

    def model_key(self, component_id: str, *parts: str) -> str:
        return self.key("model", component_id, *parts)

    def runner_key(self, runner_id: str) -> str:
        """Hash of an environment runner: ``ready`` (unix time it started), its last round published."""
        return self.key("runner", runner_id)

    @staticmethod
    def group(component_id: str) -> str:
        """The consumer group of one model: every model sees every entry."""
        return f"model:{component_id}"


# --------------------------------------------------------------------------- encodings


class NotJson(str):
    """A plain-field value that is not valid JSON, kept as text so string keys need no quotes."""

    error: str = ""


# json.dumps builds a new encoder on every call that passes options; one compact encoder serves all.
_JSON = json.JSONEncoder(separators=(",", ":"))
_JSON_DECODER = json.JSONDecoder()


def _json_value(raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="strict")
    try:  # the common case, one value and no whitespace around it, without json.loads' regexes
        value, end = _JSON_DECODER.raw_decode(text)
        if end == len(text):
            return value
    except (ValueError, RecursionError):
        pass
    try:  # whitespace around the value, or not JSON: then json.loads says why
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        value = NotJson(text)
        value.error = str(exc)
        return value


def decode_entry(fields: Mapping[bytes, bytes], max_bytes: int) -> tuple[dict[str, Any], Encoding]:
    """Turn a stream entry's fields into a message dict, raising :class:`ProtocolError` when it cannot.

    :param fields: the raw field/value pairs as Redis returns them
    :param max_bytes: entries whose fields and values add up to more are rejected unread
    """
    size = sum(len(k) + len(v) for k, v in fields.items())
    if size > max_bytes:
        raise ProtocolError(f"entry of {size} bytes exceeds the limit of {max_bytes} bytes")
    if DATA_FIELD in fields:
        try:
            message = msgpack.unpackb(fields[DATA_FIELD], raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise ProtocolError(f"field 'data' is not valid msgpack: {type(exc).__name__}: {exc}") from None
        if not isinstance(message, dict) or not all(isinstance(k, str) for k in message):
            raise ProtocolError("field 'data' must hold a msgpack map with string keys")
        return message, Encoding.MSGPACK
    try:
        return {k.decode(): _json_value(v) for k, v in fields.items()}, Encoding.JSON
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"plain fields must be UTF-8 text: {exc}") from None


def encode_entry(message: Mapping[str, Any], encoding: Encoding) -> dict[str, bytes]:
    """Fields for XADD carrying ``message`` in ``encoding``."""
    if encoding is Encoding.MSGPACK:
        return {"data": msgpack.packb(message, use_bin_type=True)}
    return {key: _json_text(value) for key, value in message.items()}


def _json_text(value: Any) -> bytes:
    if value is True or value is False:  # the encoder's slow path; flags are in every reply
        return b"true" if value else b"false"
    return _JSON.encode(value).encode()


# --------------------------------------------------------------------------- field validation


_repr = reprlib.Repr()
_repr.maxlist = _repr.maxdict = 8
_repr.maxstring = _repr.maxother = 40
_repr.maxlevel = 3


def _describe(value: Any) -> str:
    if isinstance(value, NotJson) and value.lstrip()[:1] in ("[", "{", '"'):
        return f"text that is not JSON ({value.error})"  # meant as JSON: say where it breaks
    if isinstance(value, NotJson):
        value = str(value)  # a bare word: a string, as the protocol reads it
    text = _repr.repr(value)  # bounded work: a multi-megabyte array is not repr'd whole
    return text if len(text) <= 60 else text[:57] + "..."


def _flag(message: Mapping[str, Any], key: str) -> bool:
    value = message.get(key, False)
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise ProtocolError(f"{key} must be true or false, got {_describe(value)}")


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number(message: Mapping[str, Any], key: str) -> float:
    value = message[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{key} must be a number, got {_describe(value)}")
    try:
        value = float(value)
    except OverflowError:  # a JSON integer beyond the float range
        raise ProtocolError(f"{key} must be finite, got an integer of {len(str(value))} digits") from None
    if not abs(value) <= _FLOAT32_MAX:  # NaN fails too; training keeps rewards in float32
        raise ProtocolError(f"{key} must be finite and within float32's range (about ±3.4e38), got {value}")
    return value


def _has_bool(value: Any) -> bool:
    """Whether a nested list holds a boolean anywhere (no numpy: object arrays stop at 32 dimensions)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is bool:
            return True
        if isinstance(item, list):
            stack.extend(item)
    return False


def _array(message: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    value = message[key]
    # The common case in one pass: a flat list of finite numbers that fit float32 (a NaN fails the
    # comparisons). Anything else takes the checks below, which also say what is wrong.
    if (
        type(value) is list
        and len(shape) == 1
        and len(value) == shape[0]
        and all((type(x) is float or type(x) is int) and -_FLOAT32_MAX < x < _FLOAT32_MAX for x in value)
    ):
        return np.array(value, dtype=np.float32)
    if isinstance(value, NotJson | str | bytes) or not isinstance(value, list | int | float):
        raise ProtocolError(f"{key} must be an array of numbers, got {_describe(value)}")
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError) as exc:
        raise ProtocolError(f"{key} is not a rectangular array of numbers: {exc}") from None
    if array.dtype.kind not in "iuf" or _has_bool(value):  # numpy turns [1, true] into [1, 1]
        raise ProtocolError(f"{key} must hold only numbers, got {_describe(value)}")
    if array.shape != shape:
        raise ProtocolError(f"{key} must have shape {list(shape)}, got {list(array.shape)}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, rejected just below
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ProtocolError(f"{key} must be finite and within float32's range (about ±3.4e38)")
    return array


# --------------------------------------------------------------------------- messages


@dataclass(slots=True)
class Observation:
    """One step of one environment, as published on ``<prefix>:observation``.

    ``reward`` and ``action`` belong to this environment's previous observation; ``done`` says that
    previous step ended the episode, so this observation starts a new one.
    """

    entry_id: str
    env_id: str
    observation: np.ndarray
    reward: float | None
    action: int | None
    done: bool
    truncated: bool
    terminal_observation: np.ndarray | None
    deterministic: bool
    encoding: Encoding


def parse_observation(
    message: Mapping[str, Any], entry_id: str, encoding: Encoding, obs_shape: tuple[int, ...], n_actions: int
) -> Observation:
    """Validate an observation message against the model's spaces."""
    if "OBSERVATION" not in message:
        raise ProtocolError("missing OBSERVATION")
    observation = _array(message, "OBSERVATION", obs_shape)
    env_id = message.get("ENV_ID", "default")
    if isinstance(env_id, int) and not isinstance(env_id, bool):
        env_id = str(env_id)
    if not isinstance(env_id, str) or not 0 < len(env_id) <= MAX_ENV_ID_LENGTH:
        raise ProtocolError(
            f"ENV_ID must be a string of 1 to {MAX_ENV_ID_LENGTH} characters (or an integer),"
            f" got {_describe(env_id)}"
        )
    env_id = str(env_id)  # a plain str, not the NotJson text of a plain field
    if ("REWARD" in message) != ("ACTION" in message):
        raise ProtocolError("REWARD and ACTION come together (both describe the previous step)")
    reward = action = None
    if "REWARD" in message:
        reward = _number(message, "REWARD")
        action = given = message["ACTION"]
        if isinstance(action, list) and len(action) == 1:  # a one-element array, as from a vector env
            action = action[0]
        if isinstance(action, bool) or not isinstance(action, int) or not 0 <= action < n_actions:
            raise ProtocolError(f"ACTION must be an integer in [0, {n_actions}), got {_describe(given)}")
    truncated = _flag(message, "TRUNCATED")
    done = _flag(message, "DONE") or truncated  # a truncation ends the episode too
    terminal = None
    if truncated:
        if reward is None:
            raise ProtocolError("TRUNCATED needs the REWARD and ACTION of the step it ends")
        if "TERMINAL_OBSERVATION" not in message:
            raise ProtocolError("TRUNCATED needs TERMINAL_OBSERVATION to bootstrap its value")
        terminal = _array(message, "TERMINAL_OBSERVATION", obs_shape)
    return Observation(
        entry_id=entry_id,
        env_id=env_id,
        observation=observation,
        reward=reward,
        action=action,
        done=done,
        truncated=truncated,
        terminal_observation=terminal,
        deterministic=_flag(message, "DETERMINISTIC"),
        encoding=encoding,
    )


@dataclass(slots=True)
class Command:
    """An evolution command from ``<prefix>:evolution``: ``GET`` the weights, or ``SET`` new ones."""

    entry_id: str
    cmd: str
    weights: Mapping[str, Any] | None
    encoding: Encoding


COMMANDS = ("GET", "SET")


def parse_command(message: Mapping[str, Any], entry_id: str, encoding: Encoding) -> Command:
    cmd = message.get("CMD")
    if cmd not in COMMANDS:
        got = "it is missing" if "CMD" not in message else f"got {_describe(cmd)}"
        raise ProtocolError(f"CMD must be one of {', '.join(COMMANDS)}; {got}")
    weights = None
    if cmd == "SET":
        weights = message.get("WEIGHTS")
        if not isinstance(weights, dict) or not all(isinstance(k, str) for k in weights):
            raise ProtocolError("SET needs WEIGHTS, a map from component ID to a weight vector")
    return Command(entry_id=entry_id, cmd=str(cmd), weights=weights, encoding=encoding)


def parse_weight_vector(value: Any, n_params: int) -> np.ndarray:
    """A flat weight vector: a list of ``n_params`` finite numbers, or their float32 bytes (msgpack)."""
    if isinstance(value, bytes):
        if len(value) != 4 * n_params:
            raise ProtocolError(f"WEIGHTS must hold {n_params} float32 values, got {len(value)} bytes")
        vector = np.frombuffer(value, dtype="<f4")
    else:
        vector = _array({"WEIGHTS": value}, "WEIGHTS", (n_params,)) if isinstance(value, list) else None
        if vector is None:
            raise ProtocolError(f"WEIGHTS must be a list of {n_params} numbers, got {_describe(value)}")
    if not np.isfinite(vector).all():
        raise ProtocolError("WEIGHTS must be finite (no NaN or infinity)")
    return vector.astype(np.float32)


def logits_reply(obs: Observation, logits: list[float], component_id: str) -> dict[str, Any]:
    return {
        "LOGITS": logits,
        "COMPONENT_ID": component_id,
        "DETERMINISTIC": obs.deterministic,
        "ENV_ID": obs.env_id,
        "OBS_ID": obs.entry_id,
    }


MAX_DEAD_FIELDS = 256  # an entry with more fields is dead-lettered without them


def dead_letter(
    fields: Mapping[bytes, bytes], stream: str, entry_id: str, reason: str, component_id: str, max_bytes: int
) -> dict[bytes | str, bytes | str]:
    """Fields of a dead-stream entry: why, where from, who rejected it, then the original fields.

    Original fields are copied verbatim (binary-safe) unless the entry was oversized or had more
    than :data:`MAX_DEAD_FIELDS` fields, in which case only its size and field count are kept, so
    the dead stream cannot become the next memory problem.
    """
    size = sum(len(k) + len(v) for k, v in fields.items())
    entry: dict[bytes | str, bytes | str] = {}
    if size > max_bytes or len(fields) > MAX_DEAD_FIELDS:
        entry[b"dead:size"] = str(size).encode()
        entry[b"dead:fields"] = str(len(fields)).encode()
    else:
        entry.update({k.encode() if isinstance(k, str) else k: v for k, v in fields.items()})
    # Bytes keys, so these replace (rather than duplicate) same-named fields of a re-published letter.
    for key, value in (
        ("reason", reason),
        ("stream", stream),
        ("id", entry_id),
        ("component_id", component_id),
    ):
        entry[f"dead:{key}".encode()] = value.encode()
    return entry
