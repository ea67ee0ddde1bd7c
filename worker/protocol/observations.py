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
    observation: np.ndarray
    reward: float | None
    action: int | None
    done: bool
    truncated: bool
    terminal_observation: np.ndarray | None
    deterministic: bool
    encoding: Encoding
    step: int | None = None
    reply_to: str | None = None
    answer: bool = True


def parse_observation(
    message: Mapping[str, Any], entry_id: str, encoding: Encoding, obs_shape: tuple[int, ...], n_actions: int
) -> Observation:
    """Validate an observation message against the model's spaces."""
    if "OBSERVATION" not in message:
        raise ProtocolError("missing OBSERVATION")
    observation = fields.array(message, "OBSERVATION", obs_shape)
    env_id = fields.name(message, "ENV_ID", default="default", max_length=MAX_ENV_ID_LENGTH)
    if ("REWARD" in message) != ("ACTION" in message):
        raise ProtocolError("REWARD and ACTION come together (both describe the previous step)")
    reward = action = None
    if "REWARD" in message:
        reward = fields.number(message, "REWARD")
        action = _action(message, n_actions)
    truncated = fields.flag(message, "TRUNCATED")
    done = fields.flag(message, "DONE") or truncated  # a truncation ends the episode too
    terminal = None
    if truncated:
        if reward is None:
            raise ProtocolError("TRUNCATED needs the REWARD and ACTION of the step it ends")
        if "TERMINAL_OBSERVATION" not in message:
            raise ProtocolError("TRUNCATED needs TERMINAL_OBSERVATION to bootstrap its value")
        terminal = fields.array(message, "TERMINAL_OBSERVATION", obs_shape)
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


def _action(message: Mapping[str, Any], n_actions: int) -> int:
    """ACTION: an integer in ``[0, n_actions)``, or a one-element array of one (as from a vector env)."""
    action = given = message.get("ACTION")
    if isinstance(action, list) and len(action) == 1:
        action = action[0]
    if type(action) is not int or not 0 <= action < n_actions:
        raise ProtocolError(f"ACTION must be an integer in [0, {n_actions}), got {fields.describe(given)}")
    return action


def _echo(obs: Observation | LogitsReply) -> dict[str, Any]:
    """What an answer copies from its observation, beside OBS_ID: the optional keys it was given."""
    echo: dict[str, Any] = {}
    if obs.step is not None:
        echo["STEP"] = obs.step
    if obs.reply_to is not None:
        echo["REPLY_TO"] = obs.reply_to
    return echo


def logits_reply(obs: Observation, logits: list[float], component_id: str) -> dict[str, Any]:
    return {
        "LOGITS": logits,
        "COMPONENT_ID": component_id,
        "DETERMINISTIC": obs.deterministic,
        "ENV_ID": obs.env_id,
        "OBS_ID": obs.entry_id,
        **_echo(obs),
    }


@dataclass(slots=True)
class LogitsReply:
    """One model's logits for one observation, as read from ``<prefix>:logits``."""

    obs_id: str
    component_id: str
    env_id: str
    logits: np.ndarray  # float64: softmax and sampling in double precision
    deterministic: bool
    encoding: Encoding
    step: int | None = None
    reply_to: str | None = None


def parse_logits_reply(message: Mapping[str, Any], encoding: Encoding) -> LogitsReply:
    """Validate a logits reply ``{LOGITS, COMPONENT_ID, ENV_ID, OBS_ID, DETERMINISTIC}``."""
    logits = message.get("LOGITS")
    if not isinstance(logits, list) or not logits or any(type(x) not in (int, float) for x in logits):
        raise ProtocolError(f"LOGITS must be a non-empty list of numbers, got {fields.describe(logits)}")
    try:
        array = np.asarray(logits, dtype=np.float64)
    except OverflowError:  # a JSON integer beyond the float range
        array = np.array([math.inf])
    if not np.isfinite(array).all():
        raise ProtocolError("LOGITS must be finite (no NaN or infinity)")
    return LogitsReply(
        obs_id=fields.name(message, "OBS_ID"),
        component_id=fields.name(message, "COMPONENT_ID"),
        env_id=fields.name(message, "ENV_ID", default="default", max_length=MAX_ENV_ID_LENGTH),
        logits=array,
        deterministic=fields.flag(message, "DETERMINISTIC"),
        encoding=encoding,
        step=fields.integer(message, "STEP", maximum=MAX_STEP),
        reply_to=_reply_to(message),
    )


def action_message(reply: LogitsReply | Observation, action: int, models: int) -> dict[str, Any]:
    """The action for an observation: the aggregator's (``reply`` one of its logits replies,
    ``models`` how many were combined) or a model's own for an observation of its inbox (``models``
    1). It goes to ``Streams.replies(reply_to)``."""
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
    message: Mapping[str, Any], n_actions: int, waiting: Container[str]
) -> tuple[str, int] | None:
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
    return obs_id, _action(message, n_actions)
