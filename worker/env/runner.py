"""The environment runner: gymnasium environments stepped by the actions read from ``<prefix>:action``.

Commands arrive on ``<prefix>:control`` (plain XREAD: every runner obeys every command)::

    {CMD: "RUN", RUN_ID: str, EPISODES: int?, STEPS: int?, DETERMINISTIC: bool?}    {CMD: "STOP"}

A STOP sent during a run aborts it (the runner watches the control stream while it waits for
actions); commands queued before the run started wait their turn.

The runner's key (``<prefix>:runner:<runner_id>``) remembers the last control entry it finished
(``finished``: a RUN once its report is published, in the same script; a STOP once obeyed), so a
runner restarted with the same ID after a crash reads on from there: the RUN it was killed in runs
again (its report is the new attempt's), and commands sent while it was down are obeyed, unless
older than ``--resume-window``. On the first start of an ID only commands sent after it count.

A run asks its :class:`~worker.client.PolicyClient` (``--mode``: the ensemble, one model directly,
or a local copy of one model's policy) for its environments' actions, passing each step's reward and
each episode's end (stable-baselines3's semantics: a time limit is a truncation); the client speaks
the protocol. :mod:`worker.env.stepping` steps them: in lockstep, a round of all of them at a time,
or each as soon as its own action arrives (``--stepping async``).

Every runner obeys every RUN, so several runners (each with its own ``--runner-id``, hence its own
ENV_IDs, reply stream and key) serve one swarm: each plays the run on its own environments and
reports it; control waits for as many reports as it was told runners (``--runners``).

Training environments (``<runner_id>-<k>``) carry over between runs: once a run's target is reached
no new observation is published, but the actions already asked for are applied, and each resulting
message opens the next run, so a model's chain of transitions never breaks. Evaluation environments
(``<runner_id>-eval-<k>``, for DETERMINISTIC runs) are separate instances reset at every run start.
Status entries on ``<prefix>:status``, in the encoding of the command::

    {EVENT: "episode", RUN_ID, RUNNER_ID, ENV_ID, RETURN, LENGTH}
    {EVENT: "run", RUN_ID, RUNNER_ID, EPISODES, STEPS, MEAN_RETURN, RETURNS}
    {EVENT: "run", RUN_ID, RUNNER_ID, ERROR}     (an action timed out, or the runner is stopping)

``EPISODES`` and ``STEPS`` count all that the run did (the steps answering its last observations
too); ``RETURNS`` are the first EPISODES-target returns in order of completion, ``MEAN_RETURN`` their
mean (``null`` if no episode ended).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import redis

from worker.client import PolicyClient
from worker.common import logs, lua
from worker.common.connections import last_id, server_time
from worker.common.metrics import RunnerMetrics
from worker.common.serve import Service
from worker.common.settings import SpacesError
from worker.env.cost import StepCost
from worker.env.episodes import Progress, Slot
from worker.env.settings import EnvSettings
from worker.env.stepping import CONTROL_PEEK, RunAborted, Stepping
from worker.protocol import (
    Encoding,
    ProtocolError,
    Spaces,
    Stop,
    dead_letter,
    decode_entry,
    encode_entry,
    parse_control,
    run_failed,
    run_report,
    split_id,
)

log = logs.get(__name__)

PUBLISH = lua.source(__package__, "publish.lua")  # status reports, at once and once


class EnvRunner(Service):
    """Training and evaluation environments of one runner, and the control loop that runs them.

    :param settings: the runner's settings
    :param client: see :class:`~worker.common.serve.Service`
    """

    def __init__(self, settings: EnvSettings, client: redis.Redis) -> None:
        super().__init__(settings, client, log, runner_id=settings.runner_id)
        self.control_cursor: str | None = None  # the last control entry finished: reading goes on after it
        self.resumed_from: str | None = None  # the command a restart read on after (None: first start)
        self._stale_before_ms: int | None = None  # after a restart: older commands are skipped
        self._publish_script = client.register_script(PUBLISH)
        self._incarnation, self._round = uuid.uuid4().hex[:12], 0  # names each publish, see publish.lua
        self._control_peek = "0-0"  # the last control entry looked at during a run
        self._peeked_at = 0.0
        self._runs_done: deque[str] = deque(maxlen=1000)  # RUN_IDs run: a RUN resent after a lost reply
        self.metrics: RunnerMetrics = RunnerMetrics(settings.runner_id, self.outages)
        s = settings

        def make(name: str, k: int, deterministic: bool) -> Slot:
            env = gym.make(s.gym_env, max_episode_steps=s.max_episode_steps)
            if s.step_cost_ms > 0:
                env = StepCost(env, s.step_cost_ms, s.step_cost_kind)
            return Slot(name, env, deterministic, None if s.seed is None else s.seed + k)

        self.train = [make(f"{s.runner_id}-{k}", k, False) for k in range(s.n_envs)]
        self.eval = [make(f"{s.runner_id}-eval-{k}", s.n_envs + k, True) for k in range(s.n_envs)]
        try:
            spaces = Spaces(self.train[0].env.observation_space, self.train[0].env.action_space)
        except ValueError as exc:
            raise SpacesError(f"{s.gym_env}: {exc}") from None
        self.client = PolicyClient(
            client,
            s.prefix,
            timeout=s.action_timeout,
            mode=s.mode,
            model=s.model,
            client_id=s.runner_id,
            encoding=s.encoding,
            max_lag=s.max_lag,
            flush_every=1,  # a publish is one flush: the model's batch holds the envs published together
            trim_replies=s.trim_replies,
            stream_maxlen=s.stream_maxlen,
            spaces=None if s.mode == "local" else spaces,
            outages=self.outages,  # counted and logged as the runner's own
        )
        stopping = lambda: self.stopping  # noqa: E731
        self.stepping = Stepping(self.client, s.stepping, s.threads, self._peek_control, stopping)

    # ----------------------------------------------------------------- control loop

    def start(self) -> None:
        """Fix where commands are read from, then say so: after the last command this runner ID
        finished (a restart after a crash), or else after the stream's newest entry.

        Retried until both went through: the place is fixed once, before the mark control waits
        for, so a command sent after the mark is read even if the mark's reply was lost.
        """
        s, key = self.settings, self.streams.runner_key(self.settings.runner_id)
        if self.control_cursor is None:
            finished = self.redis.hget(key, "finished")
            if finished is None:
                self.control_cursor = last_id(self.redis, self.streams.control)
            else:
                self.control_cursor = self.resumed_from = finished.decode()
                now = server_time(self.redis, key)  # entry IDs are the server's clock
                self._stale_before_ms = int((now - s.resume_window) * 1000)
        self.redis.hset(key, mapping={"ready": time.time(), "finished": self.control_cursor})  # for control
        resumed = self.resumed_from
        log.info(
            "ready",
            runner_id=s.runner_id,
            env=s.gym_env,
            n_envs=s.n_envs,
            seed=s.seed,
            stepping=s.stepping,
            resumed=resumed,
        )

    def step(self) -> None:
        """Obey the commands sent since the last one finished; a run rides out outages inside it."""
        reply = self.redis.xread({self.streams.control: self.control_cursor}, block=self.settings.block_ms)
        for _, items in reply or []:
            for raw_id, fields in items:
                if self.stopping:
                    return
                entry_id = raw_id.decode()
                if self._stale_before_ms is not None and split_id(entry_id)[0] < self._stale_before_ms:
                    window = self.settings.resume_window
                    log.warning("stale command skipped", id=entry_id, resume_window=window)
                else:
                    self.handle_entry(entry_id, fields or {})
                self._finish(entry_id)

    def _advance(self, entry_id: str | None) -> None:
        """Count the control entry ``entry_id`` as finished here (never going back); the next
        publish records it in the runner's key."""
        if entry_id is not None and (
            self.control_cursor is None or split_id(entry_id) > split_id(self.control_cursor)
        ):
            self.control_cursor = entry_id

    def _finish(self, entry_id: str) -> None:
        """Record ``entry_id`` as finished in the runner's key, where a restarted runner resumes."""
        self._advance(entry_id)
        key = self.streams.runner_key(self.settings.runner_id)
        self.redis.hset(key, "finished", self.control_cursor or entry_id)

    def shutdown(self) -> None:
        self.stepping.close()
        self.client.close()
        log.info("stopped", runner_id=self.settings.runner_id)

    def handle_entry(self, entry_id: str, fields: Mapping[bytes, bytes]) -> dict[str, Any] | None:
        """Decode and obey one control entry; an invalid one goes to the dead stream."""
        try:
            message, encoding = decode_entry(fields, self.settings.max_entry_bytes)
            return self.handle_control(message, encoding, entry_id)
        except ProtocolError as exc:
            self._bury(self.streams.control, entry_id, fields, str(exc))
            return None

    def handle_control(
        self, message: Mapping[str, Any], encoding: Encoding | None = None, command_id: str | None = None
    ) -> dict | None:
        """Obey a decoded command: RUN returns the run report, STOP ``None``.

        :param command_id: the control entry it came in; a RUN's report marks it finished
        :raises ProtocolError: for an invalid command
        """
        command = parse_control(message)
        if isinstance(command, Stop):
            log.info("STOP received")
            self.stop()
            return None
        if command.run_id in self._runs_done:  # control's XADD resent after its reply was lost
            log.warning("RUN already run, skipped", run_id=command.run_id, id=command_id)
            return None
        report = self.run(
            command.run_id,
            episodes=command.episodes,
            steps=command.steps,
            deterministic=command.deterministic,
            encoding=encoding,
            command_id=command_id,
        )
        self._runs_done.append(command.run_id)  # once reported: a run cut short is run again
        return report

    # ----------------------------------------------------------------- one run

    def run(
        self,
        run_id: str,
        episodes: int | None = None,
        steps: int | None = None,
        deterministic: bool = False,
        encoding: Encoding | None = None,
        command_id: str | None = None,
    ) -> dict[str, Any]:
        """Run until ``episodes`` episodes ended or ``steps`` steps were taken; publish and return the report.

        :param deterministic: use the evaluation environments (whose messages ask for greedy actions)
        :param encoding: of the status entries (default: the runner's; observations use the runner's)
        :param command_id: the control entry that asked for the run: the report's script records
            it as finished, so a runner killed before the report runs it again, one killed after not
        """
        if episodes is None and steps is None:
            raise ValueError("give episodes or steps")
        encoding = encoding or Encoding(self.settings.encoding)
        slots = self.eval if deterministic else self.train
        for slot in slots:
            if deterministic or slot.pending is None:
                slot.reset(slot.seed)
                # Training envs are seeded once; evaluation ones at every run, so that evaluations
                # of different weights face the same initial states.
                slot.seed = slot.seed if deterministic else None
        # Evaluation: each env ends at most its share of the episodes (as SB3's evaluate_policy), so
        # that short episodes cannot crowd out long ones and bias the mean return.
        quota = {}
        if deterministic and episodes:
            quota = {s.env_id: (episodes + k) // len(slots) for k, s in enumerate(slots)}
        runner_id = self.settings.runner_id
        progress = Progress(run_id, runner_id, episodes, steps, quota, metrics=self.metrics)
        # A STOP sent from now on aborts the run; commands queued before it wait their turn in serve().
        self._control_peek = self.ride_out(last_id, self.redis, self.streams.control)
        log.info("run", run_id=run_id, episodes=episodes, steps=steps, deterministic=deterministic)
        publish = lambda statuses: self.ride_out(self._publish, statuses, encoding)  # noqa: E731
        try:
            self.stepping.play(progress, slots, deterministic, publish)
        except RunAborted as exc:
            self._break_outstanding(slots)
            log.warning("run aborted", run_id=run_id, error=str(exc))
            report = run_failed(run_id, runner_id, str(exc))
            self._advance(command_id)
            self.ride_out(self._publish, self._unsent() + [report], encoding)
            return report
        except BaseException:  # the serve loop starts the runner again: no chain can continue
            self._break_outstanding(slots)
            self._unsent()  # the run is run again from its start: its episodes are not reported
            raise
        for slot in self.eval:
            slot.pending = None  # evaluation envs never carry over
        kept = progress.returns[:episodes] if episodes else progress.returns
        report = run_report(
            run_id, runner_id, episodes=len(progress.returns), steps=progress.taken, returns=kept
        )
        self._advance(command_id)
        self.ride_out(self._publish, self._unsent() + [report], encoding)
        log.info("run done", **{k.lower(): v for k, v in report.items() if k not in ("EVENT", "RETURNS")})
        return report

    def _publish(self, statuses: list[dict[str, Any]], encoding: Encoding) -> None:
        """Status reports, and the control entry finished, at once (:data:`PUBLISH`)."""
        finished = self.control_cursor or ""  # recorded with them: see publish.lua
        # Counted once published: retried after a lost reply (ride_out), a publish keeps its name.
        args: list[Any] = [f"{self._incarnation}:{self._round + 1}", self.settings.stream_maxlen, finished]
        for message in statuses:
            args += lua.fields(encode_entry(message, encoding))
        keys = [self.streams.status, self.streams.runner_key(self.settings.runner_id)]
        self._publish_script(keys=keys, args=args, client=self.redis)
        self._round += 1

    def _unsent(self) -> list[dict[str, Any]]:
        """The episode reports the run's steps left unpublished (they go with its report)."""
        unsent, self.stepping.unsent = self.stepping.unsent, []
        return unsent

    def _peek_control(self) -> None:
        """A STOP sent during the run stops the runner at once; other commands wait for serve()."""
        if time.monotonic() - self._peeked_at < CONTROL_PEEK:
            return
        self._peeked_at = time.monotonic()
        reply = self.ride_out(self.redis.xread, {self.streams.control: self._control_peek}, count=100)
        for _, items in reply or []:
            for entry_id, fields in items:
                self._control_peek = entry_id.decode()
                self._watch_control(fields or {})

    def _watch_control(self, fields: Mapping[bytes, bytes]) -> None:
        """A STOP stops the runner at once; other commands (and bad entries) are left for serve()."""
        try:
            command = parse_control(decode_entry(fields, self.settings.max_entry_bytes)[0])
        except ProtocolError:
            return
        if isinstance(command, Stop):
            log.info("STOP received during a run")
            self._advance(self._control_peek)  # obeyed: a restart must not stop again for it
            self.stop()

    def _bury(self, stream: str, entry_id: str, fields: Mapping[bytes, bytes], reason: str) -> None:
        log.warning("rejected entry", stream=stream, id=entry_id, reason=reason)
        s = self.settings
        letter = dead_letter(fields, stream, entry_id, reason, s.runner_id, s.max_entry_bytes)
        self.ride_out(self.redis.xadd, self.streams.dead, letter, maxlen=s.stream_maxlen, approximate=True)

    def _break_outstanding(self, slots: list[Slot]) -> None:
        """Envs whose observation went unanswered restart fresh: their chain cannot continue."""
        for slot in slots:
            if slot.waiting:
                slot.pending, slot.waiting, slot.finish = None, False, None
                self.client.forget(slot.env_id)
