"""What a client raises beside ``ValueError`` (a bad observation or reward, naming the environment)."""

from __future__ import annotations


class ActionTimeout(TimeoutError):
    """No action came in time: names the environment and the observation (its entry ID).

    :param env_id: the environment waiting
    :param obs_id: the observation's entry ID (``None`` if it could not even be published)
    """

    def __init__(self, message: str, env_id: str | None = None, obs_id: str | None = None) -> None:
        super().__init__(message)
        self.env_id, self.obs_id = env_id, obs_id


class ModelsUnavailable(TimeoutError):
    """No model to ask: none live (ensemble), or the named one never published its spaces or weights."""
