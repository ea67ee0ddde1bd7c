"""What a model does for clients beyond logits replies: it acts on its inbox, and publishes its weights.

- An observation of the model's inbox (``<prefix>:model:<id>:observation``, a *direct* client's)
  is answered with an action, chosen from the logits the model would otherwise have replied (after
  the batch's update), on the client's reply stream (:func:`replies`).
- A *local* client acts with a copy of the policy: the hash ``<prefix>:model:<id>:policy``
  holds the network's description, its weights and how many updates they are from, and the newest
  inbox entry the model committed (:class:`Publisher`). The loop writes what :meth:`Publisher.fields`
  gives in the batch's commit, so the hash never shows weights the checkpoint does not hold.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from worker.common.distributions import decide
from worker.common.draws import Draws
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


def replies(
    run: list[tuple[Observation, bool]],
    family: Family,
    answers: np.ndarray,
    component_id: str,
    streams: Streams,
    draws: Draws,
) -> list[tuple[str, dict]]:
    """The replies to a run of observations, as (stream, entry fields); none for one that asked for
    none (ANSWER false). The actions of the inbox's observations are drawn at once, for the batch.

    :param run: valid observations, each with whether it came from the model's inbox (answered
        with an action) rather than the shared observation stream (answered with logits)
    :param family: the form of the model's distributions
    :param answers: the distribution for each observation under the weights the batch ends with
    :param component_id: the model's ID
    :param streams: the deployment's names
    :param draws: the model's random numbers
    """
    inbox = [i for i, (obs, from_inbox) in enumerate(run) if from_inbox and obs.answer]
    actions: list = []
    if inbox:
        deterministic = np.array([run[i][0].deterministic for i in inbox])
        params = answers[inbox].astype(np.float64)[:, None, :]
        rows = draws.rows([run[i][0].env_id for i in inbox], [run[i][0].step for i in inbox])
        actions, _ = decide(family, params, deterministic, "prob", rows)
    chosen = dict(zip(inbox, actions, strict=True))
    found = []
    for i, (obs, from_inbox) in enumerate(run):
        if not obs.answer:
            continue
        if from_inbox:
            message = action_message(obs, chosen[i], 1)
            found.append((streams.replies(obs.reply_to), encode_entry(message, obs.encoding)))
        else:
            reply = logits_reply(obs, family.fields(answers[i]), component_id)
            found.append((streams.logits, encode_entry(reply, obs.encoding)))
    return found


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
