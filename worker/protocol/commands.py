"""Commands and their answers: evolution (``GET``/``SET`` weights) and control (``RUN``/``STOP``
environment runners, their status reports)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.protocol import fields, values
from worker.protocol.encoding import Encoding, ProtocolError


@dataclass(slots=True)
class Command:
    """An evolution command from ``<prefix>:evolution``: ``GET`` the weights, or ``SET`` new ones."""

    entry_id: str
    cmd: str
    weights: Mapping[str, Any] | None
    encoding: Encoding


COMMANDS = ("GET", "SET")


def get_command() -> dict[str, Any]:
    """The message of a GET: every model publishes its weights and pauses training."""
    return {"CMD": "GET"}


def set_command(weights: Mapping[str, bytes | list[float]]) -> dict[str, Any]:
    """The message of a SET: component ID -> its new weight vector (float32 bytes, or numbers)."""
    return {"CMD": "SET", "WEIGHTS": dict(weights)}


def parse_command(message: Mapping[str, Any], entry_id: str, encoding: Encoding) -> Command:
    cmd = fields.choice(message, "CMD", COMMANDS)
    weights = None
    if cmd == "SET":
        weights = message.get("WEIGHTS")
        if not isinstance(weights, dict) or not all(isinstance(k, str) for k in weights):
            raise ProtocolError("SET needs WEIGHTS, a map from component ID to a weight vector")
    return Command(entry_id=entry_id, cmd=cmd, weights=weights, encoding=encoding)


def parse_weight_vector(value: Any, n_params: int) -> np.ndarray:
    """A flat weight vector: a list of ``n_params`` finite numbers, or their float32 bytes (msgpack)."""
    if isinstance(value, bytes):
        if len(value) != 4 * n_params:
            raise ProtocolError(f"WEIGHTS must hold {n_params} float32 values, got {len(value)} bytes")
        vector = np.frombuffer(value, dtype="<f4")
    else:
        vector = (
            values.array(value, (n_params,), np.dtype(np.float32), "WEIGHTS")
            if isinstance(value, list)
            else None
        )
        if vector is None:
            raise ProtocolError(f"WEIGHTS must be a list of {n_params} numbers, got {fields.describe(value)}")
    if not np.isfinite(vector).all():
        raise ProtocolError("WEIGHTS must be finite (no NaN or infinity)")
    return vector.astype(np.float32)


# --------------------------------------------------------------------------- answers on <prefix>:weights


def weights_reply(command: Command, weights: list[float], component_id: str) -> dict[str, Any]:
    """A model's answer to a GET: its flat weight vector (see ``docs/protocol.md``)."""
    return {"WEIGHTS": weights, "COMPONENT_ID": component_id, "REQUEST_ID": command.entry_id}


def set_ack(command: Command, component_id: str) -> dict[str, Any]:
    """A model's answer to a SET that named it and that it loaded."""
    return {"ACK": "SET", "COMPONENT_ID": component_id, "REQUEST_ID": command.entry_id}


@dataclass(slots=True)
class Answer:
    """A model's answer to the command whose entry ID is ``request_id``: weights (GET) or an ACK (SET)."""

    component_id: str
    request_id: str
    weights: Any  # WEIGHTS as sent (a GET's answer), read with parse_reply_weights; None otherwise
    acknowledged: bool  # ACK: SET


def parse_answer(message: Mapping[str, Any]) -> Answer:
    """Who answered which command; what the answer holds is read by whoever asked."""
    return Answer(
        component_id=fields.name(message, "COMPONENT_ID"),
        request_id=fields.name(message, "REQUEST_ID"),
        weights=message.get("WEIGHTS"),
        acknowledged=message.get("ACK") == "SET",
    )


def parse_reply_weights(value: Any) -> np.ndarray:
    """The WEIGHTS of an answer to a GET: a flat, non-empty list of numbers, as float32.

    Unlike :func:`parse_weight_vector` (a SET's vector for one model) its length is not known in
    advance, and values that are not finite pass: evolution leaves such a model out itself, and says so.
    """
    if not isinstance(value, list) or not value or not all(type(x) is float or type(x) is int for x in value):
        got = fields.describe(value)
        raise ProtocolError(f"WEIGHTS must be a flat, non-empty list of numbers, got {got}")
    try:
        vector = np.asarray(value, dtype=np.float64)
    except OverflowError:  # a JSON integer beyond the float range
        raise ProtocolError("WEIGHTS holds an integer beyond the float range") from None
    with np.errstate(over="ignore"):  # beyond float32's range: infinite, as any value not finite
        return vector.astype(np.float32)


# --------------------------------------------------------------------------- <prefix>:control


@dataclass(slots=True)
class Run:
    """A RUN command: play until ``episodes`` episodes ended or ``steps`` steps were taken (at least
    one of them is set); greedy actions on the evaluation environments if ``deterministic``."""

    run_id: str
    episodes: int | None = None
    steps: int | None = None
    deterministic: bool = False


@dataclass(frozen=True, slots=True)
class Stop:
    """A STOP command: the runner exits, aborting the run in progress."""


CONTROL_COMMANDS = ("RUN", "STOP")


def parse_control(message: Mapping[str, Any]) -> Run | Stop:
    """A command for the environment runners, or :class:`ProtocolError` with what is wrong."""
    if fields.choice(message, "CMD", CONTROL_COMMANDS) == "STOP":
        return Stop()
    run = Run(
        run_id=fields.name(message, "RUN_ID"),
        episodes=fields.integer(message, "EPISODES", minimum=1),
        steps=fields.integer(message, "STEPS", minimum=1),
        deterministic=fields.flag(message, "DETERMINISTIC"),
    )
    if run.episodes is None and run.steps is None:
        raise ProtocolError("RUN needs EPISODES or STEPS (or both)")
    return run


def run_command(run: Run) -> dict[str, Any]:
    """The message of a RUN command; a target that is ``None`` is left out."""
    message: dict[str, Any] = {"CMD": "RUN", "RUN_ID": run.run_id, "DETERMINISTIC": run.deterministic}
    if run.episodes is not None:
        message["EPISODES"] = run.episodes
    if run.steps is not None:
        message["STEPS"] = run.steps
    return message


def stop_command() -> dict[str, Any]:
    """The message of a STOP command."""
    return {"CMD": "STOP"}


# --------------------------------------------------------------------------- <prefix>:status


def episode_report(run_id: str, runner_id: str, env_id: str, ret: float, length: int) -> dict[str, Any]:
    """``{EVENT: episode}``: an episode of ``env_id`` ended with return ``ret`` after ``length`` steps."""
    return {
        "EVENT": "episode",
        "RUN_ID": run_id,
        "RUNNER_ID": runner_id,
        "ENV_ID": env_id,
        "RETURN": ret,
        "LENGTH": length,
    }


def run_report(
    run_id: str, runner_id: str, *, episodes: int, steps: int, returns: list[float]
) -> dict[str, Any]:
    """``{EVENT: run}`` of a finished run on one runner.

    :param episodes: the episodes that ended during the run, beyond its target too
    :param steps: the steps it took
    :param returns: the returns that count (the first ``EPISODES``-target ones): ``MEAN_RETURN`` is
        their mean, ``None`` if there are none
    """
    return {
        "EVENT": "run",
        "RUN_ID": run_id,
        "RUNNER_ID": runner_id,
        "EPISODES": episodes,
        "STEPS": steps,
        "MEAN_RETURN": float(np.mean(returns)) if returns else None,
        "RETURNS": returns,
    }


def run_failed(run_id: str, runner_id: str, error: str) -> dict[str, Any]:
    """``{EVENT: run}`` of a run that could not finish, and why."""
    return {"EVENT": "run", "RUN_ID": run_id, "RUNNER_ID": runner_id, "ERROR": error}


@dataclass(slots=True)
class RunReport:
    """What one run did on one runner (``episodes``, ``steps``, ``returns``), or why it failed (``error``)."""

    run_id: str
    runner_id: str | None = None  # None: a program standing in for a runner may leave it out
    episodes: int = 0
    steps: int = 0
    returns: list[float] = field(default_factory=list)
    error: str | None = None


def parse_run_report(message: Mapping[str, Any]) -> RunReport | None:
    """The run report a status message carries; ``None`` for another event (an episode's).

    A failed run's report (``ERROR``) is read for its RUN_ID and error alone.
    """
    if message.get("EVENT") != "run":
        return None
    run_id = fields.name(message, "RUN_ID")
    runner_id = fields.name(message, "RUNNER_ID") if "RUNNER_ID" in message else None
    if "ERROR" in message:
        return RunReport(run_id, runner_id, error=str(message["ERROR"]))
    return RunReport(
        run_id,
        runner_id,
        episodes=fields.integer(message, "EPISODES") or 0,
        steps=fields.integer(message, "STEPS") or 0,
        returns=fields.numbers(message, "RETURNS") if "RETURNS" in message else [],
    )
