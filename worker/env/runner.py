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

A run publishes ``{OBSERVATION, ENV_ID, DETERMINISTIC}`` per environment on ``<prefix>:observation``
and steps each environment with the action whose ``OBS_ID`` is that observation's entry ID. Later
messages also carry ``REWARD`` and ``ACTION`` of the step that led to them; ``DONE: true`` when that
step ended the episode (the observation is then the reset one) and, for a time-limit truncation,
``TRUNCATED: true`` and ``TERMINAL_OBSERVATION`` (stable-baselines3's semantics).

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
from typing import Any, Literal

import gymnasium as gym
import redis
from pydantic import Field

from worker.common import logs, lua
from worker.common.connections import last_id
from worker.common.serve import Service
from worker.common.settings import CommonSettings, SpacesError
from worker.env.episodes import Progress, Slot
from worker.protocol import (
    Encoding,
    ProtocolError,
    Stop,
    dead_letter,
    decode_entry,
    encode_entry,
    parse_action,
    parse_control,
    run_failed,
    run_report,
    split_id,
)

log = logs.get(__name__)

PUBLISH = lua.source(__package__, "publish.lua")  # a round's entries, at once and once


class EnvSettings(CommonSettings):
    """``python -m worker env``: one environment runner."""

    gym_env: str = Field("CartPole-v1", description="gymnasium env id (discrete actions)")
    n_envs: int = Field(4, gt=0, description="training environments (and as many evaluation ones)")
    runner_id: str = Field("env", min_length=1, description="prefix of this runner's ENV_IDs")
    seed: int | None = Field(None, description="seed of the environments' first reset")
    max_episode_steps: int | None = Field(None, gt=0, description="time limit (default: the env's own)")
    action_timeout: float = Field(30.0, gt=0, description="seconds to wait for an action before aborting")
    encoding: Literal["msgpack", "json"] = Field("msgpack", description="encoding of the observations")
    block_ms: int = Field(1000, gt=0, le=30_000, description="longest blocking XREAD")
    max_entry_bytes: int = Field(1 << 20, gt=0, description="larger control entries are dead-lettered")
    stream_maxlen: int = Field(100_000, gt=0, description="approximate MAXLEN of the streams written")
    resume_window: float = Field(
        600.0,
        gt=0,
        description="after a restart, commands older than this many seconds are skipped, not obeyed:"
        " their sender has given up (control's --run-timeout)",
    )


class RunAborted(RuntimeError):
    """A run cannot finish: an action timed out or the runner is stopping."""


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
        self._runs_done: deque[str] = deque(maxlen=1000)  # RUN_IDs run: a RUN resent after a lost reply
        s = settings

        def make(name: str, k: int, deterministic: bool) -> Slot:
            env = gym.make(s.gym_env, max_episode_steps=s.max_episode_steps)
            return Slot(name, env, deterministic, None if s.seed is None else s.seed + k)

        self.train = [make(f"{s.runner_id}-{k}", k, False) for k in range(s.n_envs)]
        self.eval = [make(f"{s.runner_id}-eval-{k}", s.n_envs + k, True) for k in range(s.n_envs)]
        space = self.train[0].env.action_space
        if not isinstance(space, gym.spaces.Discrete):
            raise SpacesError(f"{s.gym_env} has {space}; only discrete actions are supported")
        self.n_actions = int(space.n)

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
                seconds, micros = self.redis.time()  # entry IDs are the server's clock
                self._stale_before_ms = int((seconds + micros / 1e6 - s.resume_window) * 1000)
        self.redis.hset(key, mapping={"ready": time.time(), "finished": self.control_cursor})  # for control
        resumed = self.resumed_from
        log.info("ready", runner_id=s.runner_id, env=s.gym_env, n_envs=s.n_envs, seed=s.seed, resumed=resumed)

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
        progress = Progress(run_id, runner_id, episodes, steps, quota)
        cursor = self.ride_out(last_id, self.redis, self.streams.action)  # before publishing: none missed
        # A STOP sent from now on aborts the run; commands queued before it wait their turn in serve().
        self._control_peek = self.ride_out(last_id, self.redis, self.streams.control)
        statuses: list[dict[str, Any]] = []
        log.info("run", run_id=run_id, episodes=episodes, steps=steps, deterministic=deterministic)
        try:
            # Lockstep: a round publishes every env's observation at once and waits for all the
            # actions, so each model batch holds one step of each env.
            while ready := progress.ready(slots):
                if self.stopping:
                    raise RunAborted("runner stopping")
                self.ride_out(self._publish, statuses, ready, encoding)  # idempotent: by its name
                statuses = []
                cursor, actions = self._read_actions(cursor, ready)
                statuses = [e for slot, action in actions if (e := progress.record(slot, action)) is not None]
        except RunAborted as exc:
            self._break_outstanding(slots)
            log.warning("run aborted", run_id=run_id, error=str(exc))
            report = run_failed(run_id, runner_id, str(exc))
            self._advance(command_id)
            self.ride_out(self._publish, statuses + [report], [], encoding)
            return report
        except BaseException:  # the serve loop starts the runner again: no chain can continue
            self._break_outstanding(slots)
            raise
        for slot in self.eval:
            slot.pending = None  # evaluation envs never carry over
        kept = progress.returns[:episodes] if episodes else progress.returns
        report = run_report(
            run_id, runner_id, episodes=len(progress.returns), steps=progress.taken, returns=kept
        )
        self._advance(command_id)
        self.ride_out(self._publish, statuses + [report], [], encoding)
        log.info("run done", **{k.lower(): v for k, v in report.items() if k not in ("EVENT", "RETURNS")})
        return report

    def _publish(self, statuses: list[dict[str, Any]], ready: list[Slot], encoding: Encoding) -> None:
        """Statuses and the next observation of every ready env, at once (:data:`PUBLISH`)."""
        if not statuses and not ready:
            return
        maxlen, obs_encoding = self.settings.stream_maxlen, Encoding(self.settings.encoding)
        finished = self.control_cursor or ""  # recorded with the round: see publish.lua
        # Counted once published: retried after a lost reply (ride_out), a round keeps its name.
        args: list[Any] = [f"{self._incarnation}:{self._round + 1}", maxlen, finished, len(statuses)]
        for message in statuses:
            args += lua.fields(encode_entry(message, encoding))
        args.append(len(ready))
        for slot in ready:
            assert slot.pending is not None
            args += lua.fields(encode_entry(slot.pending, obs_encoding))
        keys = [
            self.streams.status,
            self.streams.observation,
            self.streams.runner_key(self.settings.runner_id),
        ]
        ids = self._publish_script(keys=keys, args=args, client=self.redis)[len(statuses) :]
        self._round += 1
        for slot, obs_id in zip(ready, ids, strict=True):
            slot.obs_id = obs_id.decode()

    def _read_actions(self, cursor: str, ready: list[Slot]) -> tuple[str, list[tuple[Slot, int]]]:
        """Block until the observations of ``ready`` are all answered; others' actions are skipped.
        A STOP on the control stream wakes it and aborts the run. Redis being unavailable does not
        count against the action timeout: the read is retried (it is safe to repeat) until it is back.

        :param cursor: the action stream's last ID read (or seen before these were published)
        """
        deadline = time.monotonic() + self.settings.action_timeout
        waiting = {s.obs_id: s for s in ready if s.obs_id is not None}
        found: list[tuple[Slot, int]] = []
        while True:
            if self.stopping:
                raise RunAborted("runner stopping")
            left = deadline - time.monotonic()
            if left <= 0:
                late = next(iter(waiting.values()))
                timeout = self.settings.action_timeout
                raise RunAborted(f"no action for observation {late.obs_id} of {late.env_id} in {timeout}s")
            block = max(1, min(self.settings.block_ms, int(left * 1000)))
            watched = {self.streams.action: cursor, self.streams.control: self._control_peek}
            read_at = time.monotonic()
            reply = self.ride_out(self.redis.xread, watched, count=1000, block=block)
            deadline += max(0.0, time.monotonic() - read_at - block / 1000)  # the outage's time, if any
            for stream, items in reply or []:
                for entry_id, fields in items:
                    if stream.decode() == self.streams.control:
                        self._control_peek = entry_id.decode()
                        self._watch_control(fields or {})
                        continue
                    cursor = entry_id.decode()
                    if (match := self._match(cursor, fields or {}, waiting)) is not None:
                        found.append((waiting.pop(match[0]), match[1]))
            if not waiting:
                return cursor, found

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

    def _match(
        self, entry_id: str, fields: Mapping[bytes, bytes], waiting: Mapping
    ) -> tuple[str, int] | None:
        """``(OBS_ID, ACTION)`` of an entry answering one of ours; a bad answer is dead-lettered."""
        try:
            message, _ = decode_entry(fields, self.settings.max_entry_bytes)
        except ProtocolError:
            return None  # undecodable: cannot be told apart from another runner's
        try:
            return parse_action(message, self.n_actions, waiting)
        except ProtocolError as exc:
            self._bury(self.streams.action, entry_id, fields, str(exc))
            return None

    def _bury(self, stream: str, entry_id: str, fields: Mapping[bytes, bytes], reason: str) -> None:
        log.warning("rejected entry", stream=stream, id=entry_id, reason=reason)
        s = self.settings
        letter = dead_letter(fields, stream, entry_id, reason, s.runner_id, s.max_entry_bytes)
        self.ride_out(self.redis.xadd, self.streams.dead, letter, maxlen=s.stream_maxlen, approximate=True)

    def _break_outstanding(self, slots: list[Slot]) -> None:
        """Envs whose observation went unanswered restart fresh: their chain cannot continue."""
        for slot in slots:
            if slot.obs_id is not None:
                slot.pending, slot.obs_id = None, None
