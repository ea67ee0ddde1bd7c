"""The names of every stream and key of one deployment, and what an entry ID means."""

from __future__ import annotations

from dataclasses import dataclass


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

    def replies(self, reply_to: str | None) -> str:
        """Where the answers to an observation go: ``<prefix>:action:<REPLY_TO>``, so each client
        reads only its own; ``<prefix>:action`` (shared by all) for an observation without one."""
        return self.action if reply_to is None else self.key("action", reply_to)

    def inbox(self, component_id: str) -> str:
        """Observations addressed to one model (direct and local clients): it answers them itself."""
        return self.model_key(component_id, "observation")

    def client_key(self, client_id: str) -> str:
        """Hash of a client: per ENV_ID, the step it last published and that entry's ID."""
        return self.key("client", client_id)

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


def split_id(entry_id: str) -> tuple[int, int]:
    """``(milliseconds, sequence)`` of a stream entry ID: its time and its place within that millisecond."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def before(entry_id: str) -> str:
    """The ID just before ``entry_id``: a consumer group made at it delivers ``entry_id`` next."""
    ms, seq = split_id(entry_id)
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2**64 - 1}"
