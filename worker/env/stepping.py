"""How a run steps its environments on the actions its :class:`~worker.client.PolicyClient` returns.

**Lockstep** (``--stepping lockstep``, the default): a round publishes the observation of every
environment still wanted at once and waits for all their actions before stepping any, so each model
batch holds one step of each environment, and every environment waits for the slowest answer and the
slowest step.

**Asynchronous** (``--stepping async``): every environment's observation stays in flight; the runner
reads the replies as they come (:meth:`PolicyClient.arrived <worker.client.PolicyClient.arrived>`),
steps each environment whose action is in, and publishes the next observations of the environments
stepped since the last publish in one ``send``, so a publish still carries several environments when
several are ready. A slow answer or a dear step holds up its own environment only.

Steps run in the runner's thread, or with ``--step-threads`` above 1 in a pool (:class:`Steps`), so
that steps that wait (a remote game, a robot) overlap; CPU work gains nothing from threads (the GIL
lets one run at a time), more runner processes use more cores. While steps run in the pool and
actions are awaited, the runner alternates reads that do not block with short waits on the pool
(:data:`POLL`): a short blocking read would end late, as Redis times it out only at its next tick
(every 100 ms with the default ``hz`` 10) when nothing else wakes it.

Both keep a run's meaning: a target of steps is never exceeded (an observation is published only
while the steps taken and asked for are fewer), a target of episodes or an evaluation's quotas stop
the publishing, and the actions already asked for are applied before the run ends, so every training
environment's chain carries over to the next run. An action timeout aborts the run, unless Redis was
unavailable for it: then the steps still unanswered are sent again (the same steps: one entry each,
see the client), and those answered are applied.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Literal

from worker.client import ActionTimeout, PolicyClient, Ticket
from worker.common import logs
from worker.common.serve import REDIS_ERRORS, is_outage
from worker.env.episodes import Outcome, Progress, Slot

log = logs.get(__name__)

CONTROL_PEEK = 0.5  # seconds between two looks for a STOP while waiting for actions
POLL = 0.0005  # seconds: while steps run in the pool, how often the replies are looked at

Publish = Callable[[list[dict[str, Any]]], None]


class RunAborted(RuntimeError):
    """A run cannot finish: an action timed out or the runner is stopping."""


class Steps:
    """Environment steps: run in the caller's thread, or in a pool of ``threads`` threads.

    Only :meth:`Slot.advance <worker.env.episodes.Slot.advance>` (the environment) runs in the pool;
    the caller lands each outcome in its slot (:meth:`~worker.env.episodes.Slot.land`) itself.

    :param threads: at most this many steps at once; 1: each step runs when submitted
    """

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="env-step") if threads > 1 else None
        self.running: dict[Future[Outcome], Slot] = {}
        self.done: list[tuple[Slot, Outcome]] = []

    def submit(self, slot: Slot, action: Any) -> None:
        if self.pool is None:
            self.done.append((slot, slot.advance(action)))
        else:
            self.running[self.pool.submit(slot.advance, action)] = slot

    def finished(self, timeout: float | None = 0.0) -> list[tuple[Slot, Outcome]]:
        """The steps done since the last call, in the order submitted; if none is done, wait for one
        at most ``timeout`` seconds (``None``: wait for all that run).

        :raises Exception: what a step raised
        """
        if self.running and not self.done and timeout != 0:
            wait(self.running, timeout, FIRST_COMPLETED if timeout is not None else ALL_COMPLETED)
        for future in [f for f in self.running if f.done()]:
            self.done.append((self.running.pop(future), future.result()))
        done, self.done = self.done, []
        return done

    def settle(self) -> None:
        """Wait for the steps running and forget every outcome not landed (a run cut short): their
        slots still wait, and the runner begins their chains afresh."""
        wait(self.running)
        self.running.clear()
        self.done.clear()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class Stepping:
    """A runner's way of stepping its environments through its client, run after run.

    :param client: the runner's client (one per runner: it numbers each environment's steps)
    :param stepping: ``"lockstep"`` or ``"async"`` (see the module docstring)
    :param threads: threads stepping the environments (1: the runner's own)
    :param look: looks for a STOP on the control stream (at most every :data:`CONTROL_PEEK`)
    :param stopping: whether the runner is stopping (a STOP, SIGTERM): the run is aborted
    """

    def __init__(
        self,
        client: PolicyClient,
        stepping: Literal["lockstep", "async"],
        threads: int,
        look: Callable[[], None],
        stopping: Callable[[], bool],
    ) -> None:
        self.client, self.stepping, self.look, self.stopping = client, stepping, look, stopping
        self.steps = Steps(threads)
        self.unsent: list[dict[str, Any]] = []  # episode reports not yet published

    def play(self, progress: Progress, slots: list[Slot], deterministic: bool, publish: Publish) -> None:
        """Step ``slots`` until ``progress`` reaches its target and every action asked for is applied.
        Episode reports are published before each publish of observations; those of the last steps
        stay in :attr:`unsent`, for the run's report to go with them.

        :param deterministic: the steps ask for greedy actions (evaluation)
        :param publish: publishes status reports (idempotent, ridden through outages)
        :raises RunAborted: an action timed out, or the runner is stopping; the slots still waiting
            for an action were not stepped
        """
        try:
            if self.stepping == "async":
                self._asynchronous(progress, slots, deterministic, publish)
            else:
                self._lockstep(progress, slots, deterministic, publish)
        except BaseException:
            self.steps.settle()
            raise

    def close(self) -> None:
        self.steps.close()

    # ----------------------------------------------------------------- the two ways

    def _lockstep(self, progress: Progress, slots: list[Slot], deterministic: bool, publish: Publish) -> None:
        while ready := progress.ready(slots):
            self.watch()
            self._flush(publish)
            actions = self._round(ready, deterministic)
            for slot in ready:
                self.steps.submit(slot, actions[slot.env_id])
            self._land(progress, self.steps.finished(None))

    def _asynchronous(
        self, progress: Progress, slots: list[Slot], deterministic: bool, publish: Publish
    ) -> None:
        tickets: list[Ticket] = []
        asked: dict[str, Slot] = {}  # ENV_ID -> its env, whose observation is out and action not in
        lost: list[Slot] = []  # asked, to be sent again after an outage
        pause = 0.0  # how long to wait for a step: only while no action is awaited
        while True:
            self.watch()
            self._land(progress, self.steps.finished(pause))
            out = lost + progress.ready(slots)
            lost = []
            try:
                if out:
                    self._flush(publish)
                    asked.update((slot.env_id, slot) for slot in out)
                    tickets.append(self._send(out, deterministic))
                tickets = [t for t in tickets if not t.spent]
                if not asked:
                    if not self.steps.running:
                        return  # the target is reached and every action asked for is applied
                    pause = CONTROL_PEEK
                    continue
                # While steps run in the pool, look at the replies without blocking, and at the pool
                # for POLL seconds: Redis ends a short blocking read late (at its next tick).
                actions = self.client.arrived(tickets, 0 if self.steps.running else int(CONTROL_PEEK * 1000))
                pause = POLL if self.steps.running and not actions else 0.0
            except ActionTimeout as exc:
                self._resend_or_abort(exc)
                actions = {env: action for t in tickets for env, action in t.take().items()}
                lost = [slot for env_id, slot in asked.items() if env_id not in actions]
                tickets = []  # given up or superseded: the steps of all are sent again
            for env_id, action in actions.items():
                self.steps.submit(asked.pop(env_id), action)

    # ----------------------------------------------------------------- plumbing

    def _round(self, ready: list[Slot], deterministic: bool) -> dict[str, Any]:
        """Lockstep: the actions for the pending observations of ``ready``, asked for at once."""
        self.watch()  # between steps too: answered at once, a fast run never waits below
        actions: dict[str, Any] = {}
        while True:
            ticket = None
            try:
                ticket = self._send([s for s in ready if s.env_id not in actions], deterministic)
                while not self.client.collect(ticket, block_ms=int(CONTROL_PEEK * 1000)):
                    self.watch()
                return {**actions, **ticket.result()}
            except ActionTimeout as exc:
                self._resend_or_abort(exc)
                if ticket is not None:  # those answered are applied, not sent again as new steps
                    actions.update(ticket.actions)

    def _send(self, slots: list[Slot], deterministic: bool) -> Ticket:
        """Publish the pending observations of ``slots`` in one ``send`` (with the episode ends
        before them); sent again unchanged, a step is the same step (one entry, one action)."""
        client = self.client
        for slot in slots:
            if slot.finish is not None:
                client.end(slot.env_id, slot.finish[0], slot.finish[1], *slot.finish[2:])
                slot.finish = None
            slot.waiting = True
        observations = {slot.env_id: slot.pending for slot in slots}
        rewards = {slot.env_id: slot.reward for slot in slots if slot.reward is not None}
        return client.send(observations, rewards, deterministic)

    def _resend_or_abort(self, exc: ActionTimeout) -> None:
        """No action in time aborts the run, unless Redis was unavailable: an outage is not the
        models' slowness, so the steps are sent again until it is back."""
        cause = exc.__cause__
        if not (isinstance(cause, REDIS_ERRORS) and is_outage(cause)) or self.stopping():
            raise RunAborted(str(exc)) from None
        log.warning(
            "redis unavailable for the whole action timeout: sending the steps again",
            client_id=self.client.client_id,
        )

    def watch(self) -> None:
        """Look for a STOP; abort the run once the runner is stopping."""
        self.look()
        if self.stopping():
            raise RunAborted("runner stopping")

    def _flush(self, publish: Publish) -> None:
        if self.unsent:
            publish(self.unsent)  # idempotent: by its name
            self.unsent = []

    def _land(self, progress: Progress, done: list[tuple[Slot, Outcome]]) -> None:
        for slot, outcome in done:
            if (report := progress.count(slot, slot.land(outcome))) is not None:
                self.unsent.append(report)
