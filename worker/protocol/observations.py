"""The inference path's messages: observations (environments -> models), logits replies (models ->
aggregator) and actions (aggregator -> environments)."""

from __future__ import annotations

import math
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.protocol import fields
from worker.protocol.encoding import Encoding, ProtocolError
from worker.protocol.spaces import Family, Spaces
from worker.protocol.values import Value, parse_action_value, parse_value

MAX_ENV_ID_LENGTH = 256
MAX_REPLY_TO_LENGTH = 128
MAX_STEP = 2**63 - 1  # the largest STEP a model's memory holds (msgpack integers end at 64 bits)


@dataclass(slots=True)
class Observation:
    """One step of one environment, as published on ``<prefix>:observation``.

    ``reward`` and ``action`` belong to this environment's previous observation; ``done`` says that
    previous step ended the episode, so this observation starts a new one. ``step`` numbers the
    environment's steps (a repeat is not learned twice), ``reply_to`` names where the answer goes
    (:meth:`Streams.replies <worker.protocol.streams.Streams.replies>`), and ``answer`` false asks
    for none (a local client reports a step it acted on itself).
    """

    entry_id: str
    env_id: str
    observation: Value
    reward: float | None
    action: int | np.ndarray | None  # an integer for a Discrete space, else an array of the space's
    done: bool
    truncated: bool
    terminal_observation: Value | None
    deterministic: bool
    encoding: Encoding
    step: int | None = None
    reply_to: str | None = None
    answer: bool = True


def parse_observation(
    message: Mapping[str, Any], entry_id: str, encoding: Encoding, spaces: Spaces
) -> Observation:
    """Validate an observation message against the model's spaces."""
    if "OBSERVATION" not in message:
        raise ProtocolError("missing OBSERVATION")
    observation = parse_value(message["OBSERVATION"], spaces.observation, "OBSERVATION")
    env_id = fields.name(message, "ENV_ID", default="default", max_length=MAX_ENV_ID_LENGTH)
    if ("REWARD" in message) != ("ACTION" in message):
        raise ProtocolError("REWARD and ACTION come together (both describe the previous step)")
    reward = action = None
    if "REWARD" in message:
        reward = fields.number(message, "REWARD")
        action = parse_action_value(message["ACTION"], spaces.action)
    truncated = fields.flag(message, "TRUNCATED")
    done = fields.flag(message, "DONE") or truncated  # a truncation ends the episode too
    terminal = None
    if truncated:
        if reward is None:
            raise ProtocolError("TRUNCATED needs the REWARD and ACTION of the step it ends")
        if "TERMINAL_OBSERVATION" not in message:
            raise ProtocolError("TRUNCATED needs TERMINAL_OBSERVATION to bootstrap its value")
        terminal = parse_value(message["TERMINAL_OBSERVATION"], spaces.observation, "TERMINAL_OBSERVATION")
    return Observation(
        entry_id=entry_id,
        env_id=env_id,
        observation=observation,
        reward=reward,
        action=action,
        done=done,
        truncated=truncated,
        terminal_observation=terminal,
        deterministic=fields.flag(message, "DETERMINISTIC"),
        encoding=encoding,
        step=fields.integer(message, "STEP", maximum=MAX_STEP),
        reply_to=_reply_to(message),
        answer=fields.flag(message, "ANSWER", default=True),
    )


def _reply_to(message: Mapping[str, Any]) -> str | None:
    if "REPLY_TO" not in message:
        return None
    return fields.name(message, "REPLY_TO", max_length=MAX_REPLY_TO_LENGTH)


def _echo(obs: Observation | LogitsReply) -> dict[str, Any]:
    """What an answer copies from its observation, beside OBS_ID: the optional keys it was given."""
    echo: dict[str, Any] = {}
    if obs.step is not None:
        echo["STEP"] = obs.step
    if obs.reply_to is not None:
        echo["REPLY_TO"] = obs.reply_to
    return echo


def logits_reply(obs: Observation, distribution: dict[str, Any], component_id: str) -> dict[str, Any]:
    """A model's reply to ``obs``: ``distribution`` is :meth:`Family.fields
    <worker.protocol.spaces.Family.fields>` of its answer (``LOGITS``, or ``MEAN`` and ``LOG_STD``)."""
    return {
        **distribution,
        "COMPONENT_ID": component_id,
        "DETERMINISTIC": obs.deterministic,
        "ENV_ID": obs.env_id,
        "OBS_ID": obs.entry_id,
        **_echo(obs),
    }


@dataclass(slots=True)
class LogitsReply:
    """One model's distribution for one observation, as read from ``<prefix>:logits``."""

    obs_id: str
    component_id: str
    env_id: str
    family: Family  # the form of the distribution, as the reply's fields tell it
    params: np.ndarray  # its flat parameters, float64: combining and sampling in double precision
    deterministic: bool
    encoding: Encoding
    step: int | None = None
    reply_to: str | None = None


def _finite(values: list[Any], key: str) -> np.ndarray:
    if any(type(x) not in (int, float) for x in values):
        raise ProtocolError(f"{key} must hold only numbers, got {fields.describe(values)}")
    try:
        array = np.asarray(values, dtype=np.float64)
    except OverflowError:  # a JSON integer beyond the float range
        array = np.array([math.inf])
    if not np.isfinite(array).all():
        raise ProtocolError(f"{key} must be finite (no NaN or infinity)")
    return array


def _distribution(message: Mapping[str, Any]) -> tuple[Family, np.ndarray]:
    """The family and flat parameters of a reply: ``LOGITS`` (a list of numbers, or one non-empty
    list per dimension), or ``MEAN`` and ``LOG_STD`` of the same length."""
    if "MEAN" in message or "LOG_STD" in message:
        mean, log_std = message.get("MEAN"), message.get("LOG_STD")
        if (
            not isinstance(mean, list)
            or not mean
            or not isinstance(log_std, list)
            or len(log_std) != len(mean)
        ):
            got = f"{fields.describe(mean)} and {fields.describe(log_std)}"
            raise ProtocolError(f"MEAN and LOG_STD must be lists of numbers of one length, got {got}")
        params = np.concatenate([_finite(mean, "MEAN"), _finite(log_std, "LOG_STD")])
        return Family("gaussian", (len(mean),)), params
    logits = message.get("LOGITS")
    if isinstance(logits, list) and logits and all(isinstance(row, list) and row for row in logits):
        sizes = tuple(len(row) for row in logits)
        return Family("multi", sizes), _finite([x for row in logits for x in row], "LOGITS")
    if not isinstance(logits, list) or not logits:
        raise ProtocolError(
            "a reply carries LOGITS (a non-empty list of numbers, or one per dimension) or MEAN and"
            f" LOG_STD; got LOGITS {fields.describe(logits)}"
        )
    return Family("categorical", (len(logits),)), _finite(logits, "LOGITS")


def parse_logits_reply(message: Mapping[str, Any], encoding: Encoding) -> LogitsReply:
    """Validate a reply ``{LOGITS | MEAN, LOG_STD; COMPONENT_ID, ENV_ID, OBS_ID, DETERMINISTIC}``."""
    family, params = _distribution(message)
    return LogitsReply(
        obs_id=fields.name(message, "OBS_ID"),
        component_id=fields.name(message, "COMPONENT_ID"),
        env_id=fields.name(message, "ENV_ID", default="default", max_length=MAX_ENV_ID_LENGTH),
        family=family,
        params=params,
        deterministic=fields.flag(message, "DETERMINISTIC"),
        encoding=encoding,
        step=fields.integer(message, "STEP", maximum=MAX_STEP),
        reply_to=_reply_to(message),
    )


def action_message(reply: LogitsReply | Observation, action: Any, models: int) -> dict[str, Any]:
    """The action for an observation: the aggregator's (``reply`` one of its logits replies,
    ``models`` how many were combined) or a model's own for an observation of its inbox (``models``
    1). It goes to ``Streams.replies(reply_to)``.

    :param action: an integer (Discrete), a list of integers (MultiDiscrete, MultiBinary) or of
        numbers (Box, flattened)
    """
    obs_id = reply.obs_id if isinstance(reply, LogitsReply) else reply.entry_id
    return {
        "ACTION": action,
        "ENV_ID": reply.env_id,
        "OBS_ID": obs_id,
        "MODELS": models,
        "DETERMINISTIC": reply.deterministic,
        **({"STEP": reply.step} if reply.step is not None else {}),
    }


def parse_action(
    message: Mapping[str, Any], spaces: Spaces, waiting: Container[str]
) -> tuple[str, int | np.ndarray] | None:
    """``(OBS_ID, ACTION)`` of an action answering one of the observations in ``waiting``.

    An action for another observation (another runner's), or for none, is not this reader's to
    judge: ``None``. One for an observation in ``waiting`` with an invalid ACTION raises
    :class:`ProtocolError`.
    """
    try:
        obs_id = fields.name(message, "OBS_ID")
    except ProtocolError:
        return None
    if obs_id not in waiting:
        return None
    if "ACTION" not in message:
        raise ProtocolError("missing ACTION")
    return obs_id, parse_action_value(message["ACTION"], spaces.action)
