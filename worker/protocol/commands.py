"""Commands and their answers: evolution (``GET``/``SET`` weights) and control (``RUN``/``STOP``
environment runners, their status reports)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.protocol import fields
from worker.protocol.encoding import Encoding, ProtocolError


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
        got = "it is missing" if "CMD" not in message else f"got {fields.describe(cmd)}"
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
        vector = fields.array({"WEIGHTS": value}, "WEIGHTS", (n_params,)) if isinstance(value, list) else None
        if vector is None:
            raise ProtocolError(f"WEIGHTS must be a list of {n_params} numbers, got {fields.describe(value)}")
    if not np.isfinite(vector).all():
        raise ProtocolError("WEIGHTS must be finite (no NaN or infinity)")
    return vector.astype(np.float32)
