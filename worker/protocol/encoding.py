"""The two encodings of an entry (msgpack in one ``data`` field, or JSON text per field), and the
dead letter that carries a rejected entry with its reason."""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import Enum
from typing import Any

import msgpack

DATA_FIELD = b"data"


class ProtocolError(ValueError):
    """An entry that breaks the protocol; its message is the reason written to the dead stream."""


class Encoding(str, Enum):
    """How an entry's fields carry the message; a reply uses the encoding of the entry it answers."""

    MSGPACK = "msgpack"  # one field ``data`` holding a msgpack map
    JSON = "json"  # one field per key, each value JSON text


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
