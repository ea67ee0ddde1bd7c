"""Chaos driver: the whole loop (model workers, the aggregator, an environment runner, rounds of
training, evaluation and evolution) while every kind of component is SIGKILLed at random moments
and restarted with the same ID, and Redis is restarted; then the figures that show every observation
got exactly one action, nothing was lost or done twice, no model was left paused, and training
went on.

    python -m tests.faults.chaos --kills 50 --redis-restarts 5 --aggregator-kills 10 \\
        --runner-kills 10 --evolution-kills 10 [--models 2 --envs 8] [--json out.json]

What runs:

- a private ``redis-server`` (AOF, ``appendfsync always``) on a free loopback port, unless
  ``--redis-url`` names one (then Redis is not restarted);
- as processes, each logging JSON lines: ``--models`` model workers (``python -m worker model
  --component-id chaos-<i>``), the aggregator, and one environment runner (``--runner-id chaos``)
  of ``--envs`` CartPole-v1 environments (:mod:`.processes`);
- the rounds, in a thread of this process, as ``control train`` runs them (:mod:`.rounds`): a
  training RUN of ``round_steps`` steps and an evaluation RUN (``run_episodes``), then one generation
  of ``python -m worker evolution`` (PBT on returns) as a process;
- the fault loop (:mod:`.run`, seeded): at random moments it SIGKILLs a model worker, the aggregator
  or the runner and starts it again with the same ID, stops Redis (SIGKILL or SHUTDOWN) and starts it
  again after a random outage, or owes the rounds an evolution kill, which they do to the next
  evolution process after its GET, after its SET or at a random moment, and start it again.

What is checked once the faults stop and the backlog is answered (:mod:`.checks`):

- every observation on ``<prefix>:observation`` got exactly one action (by ``OBS_ID``) on the
  runner's reply stream ``<prefix>:action:chaos``, and exactly one reply from every model on
  ``<prefix>:logits``;
- the counters in each model's committed checkpoint equal what the observations on the stream
  imply (:func:`.checks.expected_counters`, an independent re-implementation of the memory's
  rules; segments trained and discarded while paused together), and its evolution commands the
  GETs and the SETs naming it on ``<prefix>:evolution``;
- each restarted model worker resumed from the checkpoint committed before it (digests of what it
  logged it loaded = digests of the blobs read from Redis right after the kill);
- one SET per GET (a killed evolution's generation finished by the next, never begun twice or left
  without a SET), and no model paused at the end;
- every RUN got its report (a runner killed mid-run runs it again), no process exited on its own,
  each stopped cleanly on SIGTERM, nothing pending or dead;
- the mean return of the last fifth of the training episodes beats the first fifth.
"""

from tests.faults.chaos.config import ChaosConfig, Figures
from tests.faults.chaos.processes import Incarnation, RedisServer, spawn, worker_command
from tests.faults.chaos.run import run

__all__ = ["ChaosConfig", "Figures", "Incarnation", "RedisServer", "run", "spawn", "worker_command"]
