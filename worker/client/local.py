"""What a local client keeps besides its chains: the copy of the model's policy, the steps it acted
on and has not sent yet, and how far the model has learned from the ones it sent."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from typing import Any

from worker.protocol import Spaces, split_id

REFRESHED = (b"weights", b"updates", b"normalization")  # the policy hash's fields a refresh reads


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LocalCopy:
    """A local client's copy of one model and its bookkeeping (no I/O).

    :param model: the model's ``COMPONENT_ID``
    :param max_lag: the most of our steps the model may not have learned from before acting waits
    """

    def __init__(self, model: str, max_lag: int) -> None:
        self.model, self.max_lag = model, max_lag
        self.policy: Any = None  # a replica.LocalPolicy once the model's policy hash was read
        self.outbox: list[tuple[str, int, dict[str, Any]]] = []  # steps acted on, not yet published
        self.unseen: deque[str] = deque()  # entry IDs of our steps the model has not committed
        self.seen = ""  # the newest inbox entry the model committed
        self.published_updates = -1  # the update count of the weights the copy holds

    def take_policy(self, fields: Mapping[bytes, bytes]) -> Spaces | None:
        """Build the copy from the model's policy hash; its spaces, or ``None`` while there is none."""
        if b"weights" not in fields or b"spec" not in fields:
            return None
        from worker.client.replica import LocalPolicy  # torch only for local clients

        self.policy = LocalPolicy(json.loads(fields[b"spec"]))
        self.load_weights(fields)
        return self.policy.spaces

    def load_weights(self, fields: Mapping[bytes, bytes | None]) -> None:
        if weights := fields.get(b"weights"):
            self.policy.set_weights(weights, fields.get(b"normalization"))
            self.published_updates = int(fields.get(b"updates") or 0)

    def act(self, messages: list[dict[str, Any]], deterministic: bool) -> list[Any]:
        """Actions for the steps' messages (checked already)."""
        keys = [(m["ENV_ID"], m["STEP"]) for m in messages]
        return self.policy.act([m["OBSERVATION"] for m in messages], deterministic, keys)

    def flushed(self, reply: list[Any]) -> bool:
        """The outbox is published (``reply``: the publish script's); True if the model has newer
        weights than the copy."""
        self.unseen.extend(text(i) for i in reply[:-2])
        self.outbox.clear()
        return self.take_state(*reply[-2:])

    def take_state(self, updates: Any, seen: Any) -> bool:
        """Note how far the model is; True when it published newer weights than the copy's."""
        if seen:
            self.seen = text(seen)
        return bool(updates) and int(updates) > self.published_updates

    def lag(self) -> int:
        """How many of our steps the model has not committed yet."""
        while self.unseen and self.seen and split_id(self.unseen[0]) <= split_id(self.seen):
            self.unseen.popleft()
        return len(self.unseen) + len(self.outbox)

    @staticmethod
    def poll_pause(waited: float) -> float:
        """Seconds to sleep before looking again how far the model is: it commits every few
        milliseconds while busy, so look often at first, then less."""
        return 0.0005 if waited < 0.02 else min(0.01, waited / 4)
