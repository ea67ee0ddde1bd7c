"""What a client knows and decides, without I/O: shared by :class:`~worker.client.PolicyClient`
(redis-py) and :class:`~worker.client.AsyncPolicyClient` (redis.asyncio), which only move bytes.

Per environment the client keeps a chain: the step number it sent last, the action it returned (a
reward passed with the next observation is that action's), the end of an episode reported by
``end()`` (sent with the next observation, as the protocol carries it) and a step sent but not
answered (sent again unchanged, under the same STEP, if the caller repeats it). Steps are published
by one script (``publish.lua``) that turns a step sent twice into one entry, and the models do not
learn a STEP twice, so a resend never double-counts.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.client.checks import applied, env_name, number, wire
from worker.client.errors import ActionTimeout, ModelsUnavailable
from worker.client.local import LocalCopy, text
from worker.common import lua
from worker.protocol import (
    Encoding,
    ProtocolError,
    Spaces,
    Streams,
    dead_letter,
    decode_entry,
    encode_entry,
    parse_action,
    parse_observation,
)

PUBLISH = lua.source(__package__, "publish.lua")

MODES = ("ensemble", "direct", "local")
MAX_ENTRY_BYTES = 1 << 20  # larger action entries are dead-lettered unread
MAX_REMEMBERED = 10_000  # timed-out steps whose late actions are kept


Built = tuple[str, tuple, dict[str, Any]]  # (ENV_ID, the call, the message)


@dataclass
class Chain:
    """One environment's place in its chain of steps."""

    step: int = 0  # the STEP last sent
    action: int | list | None = None  # the action sampled last: a reward passed next is its reward
    ended: dict[str, Any] | None = None  # end(): sent with the next observation
    unanswered: tuple[tuple, dict[str, Any]] | None = None  # (call, message) sent but not answered


@dataclass
class Ticket:
    """Observations published together and the actions that arrived for them."""

    waiting: dict[str, str]  # OBS_ID -> ENV_ID, still unanswered
    deadline: float  # monotonic
    actions: dict[str, Any] = field(default_factory=dict)  # ENV_ID -> the action to apply
    order: list[str] = field(default_factory=list)  # ENV_IDs as asked
    taken: set[str] = field(default_factory=set)  # ENV_IDs whose action take() handed out

    @property
    def done(self) -> bool:
        return not self.waiting

    @property
    def spent(self) -> bool:
        """Every action arrived and was handed out by :meth:`take`."""
        return not self.waiting and len(self.taken) == len(self.actions)

    def result(self) -> dict[str, Any]:
        return {env: self.actions[env] for env in self.order}

    def take(self) -> dict[str, Any]:
        """The actions that arrived since the last take (ENV_ID -> action, as :meth:`result` gives
        them), each handed out once: an environment may step on its own action before the others'
        arrive. :meth:`result` is not changed by it."""
        new = {env: action for env, action in self.actions.items() if env not in self.taken}
        self.taken.update(new)
        return new


def default_client_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ClientCore:
    """The client's state and decisions; see :class:`~worker.client.PolicyClient` for the parameters."""

    def __init__(
        self,
        prefix: str,
        timeout: float,
        mode: str,
        model: str | None,
        client_id: str | None,
        encoding: str,
        max_lag: int,
        shared_replies: bool,
        trim_replies: bool,
        stream_maxlen: int,
        reply_ttl: float,
        spaces: Spaces | None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode != "ensemble" and not model:
            raise ValueError(f"mode {mode!r} needs model=<the COMPONENT_ID of the model to ask>")
        if mode == "ensemble" and model:
            raise ValueError("mode 'ensemble' asks every live model: give no model, or use mode 'direct'")
        if timeout <= 0 or max_lag < 0:
            raise ValueError("timeout must be positive and max_lag not negative")
        self.streams = Streams(prefix)
        self.timeout, self.mode, self.model = timeout, mode, model
        self.client_id = client_id or default_client_id()
        self.encoding = Encoding(encoding)
        self.stream_maxlen, self.reply_ttl_ms = stream_maxlen, int(reply_ttl * 1000)
        self.session = uuid.uuid4().hex[:12]  # names this client's steps: see publish.lua
        self.target = self.streams.observation if model is None else self.streams.inbox(model)
        self.reply_to = None if shared_replies or mode == "local" else self.client_id
        self.replies = self.streams.replies(self.reply_to)
        self.trim_replies = trim_replies and self.reply_to is not None
        self.client_key = self.streams.client_key(self.client_id)
        self.policy_key = self.streams.model_key(model, "policy") if model else ""
        self.spaces = spaces
        self.cursor: str | None = None if shared_replies else "0-0"  # the reply stream, read up to here
        self.chains: dict[str, Chain] = {}
        self.tickets: dict[str, Ticket] = {}  # OBS_ID -> the ticket waiting for its action
        # Steps that timed out: a late action is kept, for the same step sent again (one entry).
        self.dropped: OrderedDict[str, None] = OrderedDict()
        self.late: OrderedDict[str, Any] = OrderedDict()
        self.local = LocalCopy(model, max_lag) if mode == "local" and model else None

    # ----------------------------------------------------------------- discovery

    def take_spaces(self, found: Mapping[str, bytes | None]) -> Spaces | None:
        """The spaces every model in ``found`` (component ID -> its ``spaces``) agrees on; ``None``
        while none has published them.

        :raises RuntimeError: the models disagree
        """
        known = {cid: Spaces.from_json(spec) for cid, spec in found.items() if spec}
        if not known:
            return None
        if len(set(known.values())) > 1:
            detail = "; ".join(f"{cid}: {s}" for cid, s in sorted(known.items()))
            raise RuntimeError(f"the live models disagree on their spaces ({detail})")
        self.spaces = next(iter(known.values()))
        return self.spaces

    def take_policy(self, fields: Mapping[bytes, bytes]) -> bool:
        """Local mode: build the copy from the model's policy hash; False while there is none."""
        assert self.local is not None
        if (spaces := self.local.take_policy(fields)) is not None:
            self.spaces = spaces
        return spaces is not None

    def unavailable(self) -> ModelsUnavailable:
        if self.mode == "ensemble":
            what = f"no live model in {self.streams.registry} that published its spaces"
        elif self.mode == "direct":
            info = self.streams.model_key(self.model or "", "info")
            what = f"model {self.model!r} has not published its spaces ({info})"
        else:
            what = (
                f"model {self.model!r} publishes no weights in {self.policy_key} (is it running, with"
                " --publish-weights-every of at least 1, the default?)"
            )
        return ModelsUnavailable(f"{what} within {self.timeout}s")

    # ----------------------------------------------------------------- messages

    def message(self, env_id: str, observation: Any, reward: Any, deterministic: bool) -> tuple[tuple, dict]:
        """``(call, message)``: the next step of ``env_id``, checked as a model will check it; the
        chain is not changed until :meth:`sent` (with ``call``, which tells a repeat).

        :raises ValueError: naming the environment and the problem
        """
        assert self.spaces is not None
        chain = self.chains.get(env_id) or Chain()
        call = (self.wire(env_id, observation), reward, bool(deterministic))
        if chain.unanswered is not None and chain.unanswered[0] == call:
            return call, chain.unanswered[1]  # the same step once more: same STEP, one entry, one action
        message: dict[str, Any] = {"OBSERVATION": call[0], "ENV_ID": env_id, "STEP": chain.step + 1}
        if deterministic:
            message["DETERMINISTIC"] = True
        if chain.ended is not None:
            if reward is not None:
                raise ValueError(
                    f"{env_id!r}: end() gave the last reward of the episode; the first observation of"
                    " the next one takes none"
                )
            message.update(chain.ended)
        elif reward is not None and chain.unanswered is None:
            if chain.action is None:
                raise ValueError(
                    f"{env_id!r}: a reward is for the previous action, but this environment has none"
                    " (the first observation of an episode takes no reward)"
                )
            message.update(REWARD=number(env_id, "REWARD", reward), ACTION=chain.action)
        # else: a step went unanswered and this is not it: its action was never taken, the chain restarts
        if self.reply_to is not None:
            message["REPLY_TO"] = self.reply_to
        if self.mode == "local":
            message["ANSWER"] = False  # acted on here: the model only learns from it
        self.check(env_id, message)
        return call, message

    def end(self, env_id: Any, observation: Any, reward: Any, terminated: bool, truncated: bool) -> None:
        """Record the end of ``env_id``'s episode: sent with its next observation."""
        env_id = env_name(env_id)
        if not (terminated or truncated):
            raise ValueError(f"{env_id!r}: end() needs terminated=True or truncated=True")
        chain = self.chains.get(env_id)
        if chain is None or chain.action is None:
            raise ValueError(f"{env_id!r}: end() reports the reward of the last action, but none was taken")
        ended: dict[str, Any] = {
            "REWARD": number(env_id, "REWARD", reward),
            "ACTION": chain.action,
            "DONE": True,
        }
        if truncated and not terminated:  # a time limit: the model bootstraps from the last observation
            ended.update(TRUNCATED=True, TERMINAL_OBSERVATION=self.wire(env_id, observation))
        self.check(env_id, {"OBSERVATION": self.wire(env_id, observation), **ended})
        chain.ended, chain.action = ended, None

    def check(self, env_id: str, message: dict[str, Any]) -> None:
        """Validate ``message`` with the parser the models use (:func:`parse_observation`)."""
        assert self.spaces is not None
        try:
            parse_observation(message, "0-0", self.encoding, self.spaces)
        except ProtocolError as exc:
            raise ValueError(f"{env_id!r}: {exc}") from None

    def sent(self, env_id: str, call: tuple, message: dict[str, Any]) -> None:
        """``message`` is published (or about to be, in local mode): the chain moves on."""
        chain = self.chains.setdefault(env_id, Chain())
        chain.step, chain.ended, chain.action = message["STEP"], None, None
        chain.unanswered = (call, message)

    def wire(self, env_id: str, observation: Any) -> Any:
        assert self.spaces is not None
        return wire(env_id, observation, self.spaces.observation, self.encoding is Encoding.MSGPACK)

    def answered(self, ticket: Ticket, env_id: str, action: Any) -> None:
        """``action`` (as sampled) answers ``env_id``'s step; the caller gets it :func:`applied`."""
        chain = self.chains[env_id]
        chain.action = action if isinstance(action, int) else np.asarray(action).reshape(-1).tolist()
        chain.unanswered = None
        assert self.spaces is not None
        ticket.actions[env_id] = applied(self.spaces.action, action)

    def forget(self, env_id: Any) -> None:
        """Start ``env_id``'s next observation as a new chain (its last step is abandoned)."""
        env_id = env_name(env_id)
        if (chain := self.chains.get(env_id)) is not None:
            chain.action, chain.ended, chain.unanswered = None, None, None

    # ----------------------------------------------------------------- publishing and replies

    def prepare(
        self, observations: Mapping[Any, Any], rewards: Mapping[Any, Any] | None, deterministic: bool
    ) -> list[Built]:
        """``(ENV_ID, call, message)`` of each observation, checked (see :meth:`message`)."""
        rewards = rewards or {}
        if extra := set(rewards) - set(observations):
            raise ValueError(f"rewards for environments without an observation: {sorted(map(str, extra))}")
        named = {env_name(env): env for env in observations}
        if len(named) < len(observations):
            raise ValueError("two keys name the same environment (an integer ENV_ID is its decimal text)")
        return [
            (name, *self.message(name, observations[env], rewards.get(env), deterministic))
            for name, env in named.items()
        ]

    def publish_steps(self, built: list[Built]) -> tuple[list[str], list[str], list[Any]]:
        """The steps are sent: ``(ENV_IDs, KEYS, ARGV)`` of the :data:`PUBLISH` that sends them."""
        for env, call, message in built:
            self.sent(env, call, message)
        keys, args = self.publish_call([(env, m["STEP"], m) for env, _, m in built])
        return [env for env, _, _ in built], keys, args

    def publish_call(self, batch: list[tuple[str, int, dict[str, Any]]]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of :data:`PUBLISH` for ``batch`` ((ENV_ID, STEP, message) each)."""
        trim = self.cursor if self.trim_replies and self.cursor not in (None, "0-0") else ""
        args: list[Any] = [self.session, self.stream_maxlen, self.reply_ttl_ms, trim]
        for env_id, step, message in batch:
            args += [env_id, step, *lua.fields(encode_entry(message, self.encoding))]
        # Only a reply stream the script trims is its key: a script's keys need write access (ACL).
        keys = [self.target, self.client_key, self.replies if self.trim_replies else self.client_key]
        if self.mode == "local":
            keys.append(self.policy_key)
        return keys, args

    def ticket(self, envs: list[str], ids: list[Any]) -> Ticket:
        """A ticket for the observations of ``envs``, published as ``ids``; filed until answered."""
        ticket = Ticket({}, time.monotonic() + self.timeout, order=envs)
        for env_id, raw_id in zip(envs, ids, strict=False):
            obs_id = text(raw_id)
            if obs_id in self.late:  # a resent step whose late action came meanwhile
                self.answered(ticket, env_id, self.late.pop(obs_id))
                continue
            self.dropped.pop(obs_id, None)
            ticket.waiting[obs_id] = env_id
            self.tickets[obs_id] = ticket
        return ticket

    def take_replies(self, items: list[tuple[Any, Any]]) -> list[dict[bytes, bytes]]:
        """File the actions of ``items`` (entries of the reply stream) under the tickets waiting for
        them; others' (or late ones') are skipped.

        :return: dead letters for actions of ours that are not valid actions
        """
        assert self.spaces is not None
        dead = []
        for raw_id, fields in items:
            entry_id = self.cursor = text(raw_id)
            try:
                message, _ = decode_entry(fields or {}, MAX_ENTRY_BYTES)
                found = parse_action(message, self.spaces, self.tickets)
                if found is None and (late := parse_action(message, self.spaces, self.dropped)):
                    self.late[late[0]] = late[1]
                    while len(self.late) > MAX_REMEMBERED:
                        self.late.popitem(last=False)
            except ProtocolError as exc:
                if _answers(fields or {}, self.tickets):
                    letter = dead_letter(
                        fields or {}, self.replies, entry_id, str(exc), self.client_id, MAX_ENTRY_BYTES
                    )
                    dead.append(letter)
                continue
            if found is not None:
                ticket = self.tickets.pop(found[0])
                self.answered(ticket, ticket.waiting.pop(found[0]), found[1])
        return dead

    def drop(self, ticket: Ticket) -> None:
        """Stop waiting for ``ticket``'s actions (it timed out): late ones are kept aside, for the
        same steps sent again."""
        for obs_id in ticket.waiting:
            self.tickets.pop(obs_id, None)
            self.dropped[obs_id] = None
        while len(self.dropped) > MAX_REMEMBERED:
            self.dropped.popitem(last=False)

    def unreachable(self, env_id: str | None, outage: BaseException) -> ActionTimeout:
        """Redis stayed unavailable for the whole timeout (for a step of ``env_id``, if named)."""
        where = f" for {env_id!r}" if env_id else ""
        return ActionTimeout(f"Redis unavailable{where} for {self.timeout}s: {outage}", env_id)

    def timed_out(self, ticket: Ticket, outage: BaseException | None = None) -> ActionTimeout:
        self.drop(ticket)
        obs_id, env_id = next(iter(ticket.waiting.items()))
        hint = {
            "ensemble": "is an aggregator running, and a model?",
            "direct": f"is model {self.model!r} running?",
            "local": "",
        }[self.mode]
        why = f" (Redis unavailable: {outage})" if outage is not None else f" ({hint})"
        more = f" and {len(ticket.waiting) - 1} more" if len(ticket.waiting) > 1 else ""
        return ActionTimeout(
            f"no action for observation {obs_id} of {env_id!r}{more} within {self.timeout}s{why}",
            env_id,
            obs_id,
        )

    # ----------------------------------------------------------------- local mode

    def take_local(self, built: list[Built], deterministic: bool, deadline: float) -> Ticket:
        """Act on ``built`` with the local copy; the steps join its outbox. A ticket already done."""
        assert self.local is not None
        ticket = Ticket({}, deadline, order=[env for env, _, _ in built])
        actions = self.local.act([m for _, _, m in built], deterministic)
        for (env, call, message), action in zip(built, actions, strict=True):
            self.sent(env, call, message)
            self.answered(ticket, env, action)
            self.local.outbox.append((env, message["STEP"], message))
        return ticket

    def behind(self) -> ActionTimeout:
        lag = self.local.lag() if self.local else 0
        return ActionTimeout(
            f"model {self.model!r} has not learned from {lag} steps of this client within"
            f" {self.timeout}s (is it running?)"
        )

    @property
    def discovered(self) -> bool:
        """The spaces are known, and in local mode the copy is built."""
        return self.spaces is not None and (self.local is None or self.local.policy is not None)


def _answers(fields: Mapping[bytes, bytes], waiting: Mapping[str, str]) -> bool:
    """Whether an undecodable or invalid entry names one of our observations."""
    try:
        message, _ = decode_entry(fields, MAX_ENTRY_BYTES)
    except ProtocolError:
        return False
    return isinstance(message.get("OBS_ID"), str) and message["OBS_ID"] in waiting
