"""What a model does for clients beyond logits replies: it acts on its inbox, and publishes its weights.

- An observation of the model's inbox (``<prefix>:model:<id>:observation``, a *direct* client's)
  is answered with an action, chosen from the logits the model would otherwise have replied (after
  the batch's update), on the client's reply stream (:func:`answer`).
- A *local* client acts with a copy of the policy: the hash ``<prefix>:model:<id>:policy``
  holds the network's description, its weights and how many updates they are from, and the newest
  inbox entry the model committed (:class:`Publisher`). The loop writes what :meth:`Publisher.fields`
  gives in the batch's commit, so the hash never shows weights the checkpoint does not hold.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from worker.common.distributions import choose
from worker.model.learner import Learner
from worker.model.policy import policy_spec
from worker.model.settings import ModelSettings
from worker.protocol import (
    Family,
    Observation,
    Streams,
    action_message,
    encode_entry,
    logits_reply,
    split_id,
)

POLICY_FORMAT = 1  # the layout of the policy hash: its ``format`` field


def answer(
    obs: Observation,
    family: Family,
    params: np.ndarray,
    from_inbox: bool,
    component_id: str,
    streams: Streams,
    rng: np.random.Generator,
) -> tuple[str, dict] | None:
    """The reply to ``obs`` as (stream, entry fields), or ``None`` when it asked for none (ANSWER false).

    :param obs: a valid observation
    :param family: the form of the model's distributions
    :param params: the distribution for ``obs`` under the weights the batch ends with
    :param from_inbox: it came from the model's inbox, not the shared observation stream
    :param component_id: the model's ID
    :param streams: the deployment's names
    :param rng: the model's generator of samples
    """
    if not obs.answer:
        return None
    if not from_inbox:
        reply = logits_reply(obs, family.fields(params), component_id)
        return streams.logits, encode_entry(reply, obs.encoding)
    action = choose(family, params.astype(np.float64), obs.deterministic, rng)
    return streams.replies(obs.reply_to), encode_entry(action_message(obs, action, 1), obs.encoding)


class Publisher:
    """Decides what a commit writes into the policy hash: ``format``, ``spec`` and ``weights`` with
    the ``updates`` they are from (after every start, every ``--publish-weights-every`` updates and
    after a SET), and ``seen`` (with every commit that acknowledged inbox entries).

    :param settings: the model's settings
    :param learner: the model's learner (its spaces, weights and update count)
    :param inbox: the name of the model's inbox
    """

    def __init__(self, settings: ModelSettings, learner: Learner, inbox: str) -> None:
        self.every = settings.publish_weights_every
        self.learner, self.inbox = learner, inbox
        spec = policy_spec(settings, learner.spaces)
        self.spec = json.dumps(spec, separators=(",", ":"))
        self.due = True  # publish with the next commit, whatever the update count
        self.updates = 0  # the update count of the weights published last
        self.seen: str | None = None  # the newest inbox entry ID written as ``seen``

    def restart(self) -> None:
        """The hash may be gone or behind (Redis came back empty, a model of an older version): the
        next commit publishes the weights again."""
        self.due = True

    def fields(self, acks: Mapping[str, list[str]], weights_loaded: bool) -> dict[str, bytes | str] | None:
        """The fields of the policy hash a commit sets; ``None`` for none.

        :param acks: stream -> the entry IDs the commit acknowledges
        :param weights_loaded: the commit holds weights a SET loaded
        """
        if not self.every:
            return None
        published: dict[str, bytes | str] = {}
        if ids := acks.get(self.inbox):
            newest = max(ids if self.seen is None else [*ids, self.seen], key=split_id)
            published["seen"] = newest
        updates = self.learner.counters.updates
        if self.due or weights_loaded or updates - self.updates >= self.every:
            published |= {
                "format": str(POLICY_FORMAT),
                "spec": self.spec,
                "weights": self.learner.weights().astype("<f4").tobytes(),
                "updates": str(updates),
            }
            if self.learner.inputs.obs_rms:  # the copy normalizes as the model did for these weights
                published["normalization"] = self.learner.inputs.pack()
        return published or None

    def committed(self, published: Mapping[str, bytes | str] | None) -> None:
        """A commit wrote ``published`` (what :meth:`fields` gave)."""
        if not published:
            return
        if "updates" in published:
            self.due, self.updates = False, int(published["updates"])
        if "seen" in published:
            self.seen = str(published["seen"])
