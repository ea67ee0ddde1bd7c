"""The inference path's messages: observations (environments -> models), logits replies (models ->
aggregator) and actions (aggregator -> environments)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.protocol import fields
from worker.protocol.encoding import Encoding, ProtocolError

MAX_ENV_ID_LENGTH = 256


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
    observation = fields.array(message, "OBSERVATION", obs_shape)
    env_id = message.get("ENV_ID", "default")
    if isinstance(env_id, int) and not isinstance(env_id, bool):
        env_id = str(env_id)
    if not isinstance(env_id, str) or not 0 < len(env_id) <= MAX_ENV_ID_LENGTH:
        raise ProtocolError(
            f"ENV_ID must be a string of 1 to {MAX_ENV_ID_LENGTH} characters (or an integer),"
            f" got {fields.describe(env_id)}"
        )
    env_id = str(env_id)  # a plain str, not the NotJson text of a plain field
    if ("REWARD" in message) != ("ACTION" in message):
        raise ProtocolError("REWARD and ACTION come together (both describe the previous step)")
    reward = action = None
    if "REWARD" in message:
        reward = fields.number(message, "REWARD")
        action = given = message["ACTION"]
        if isinstance(action, list) and len(action) == 1:  # a one-element array, as from a vector env
            action = action[0]
        if isinstance(action, bool) or not isinstance(action, int) or not 0 <= action < n_actions:
            got = fields.describe(given)
            raise ProtocolError(f"ACTION must be an integer in [0, {n_actions}), got {got}")
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
    )


def logits_reply(obs: Observation, logits: list[float], component_id: str) -> dict[str, Any]:
    return {
        "LOGITS": logits,
        "COMPONENT_ID": component_id,
        "DETERMINISTIC": obs.deterministic,
        "ENV_ID": obs.env_id,
        "OBS_ID": obs.entry_id,
    }
