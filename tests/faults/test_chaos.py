"""Short form of the chaos run (the long form: ``python -m tests.faults.chaos --kills 50 ...``).

The whole loop (two model workers, the aggregator, a runner of eight CartPole environments, rounds
of training, evaluation and one evolution generation) while a seeded fault loop SIGKILLs each kind
of component at random moments and starts it again with the same ID; the evolution process is
killed mid-generation. See tests/faults/chaos/ for what runs and how each figure is measured. What
must hold:

- every observation got exactly one action from the aggregator and one reply from every model (by
  OBS_ID: none lost, none twice), and nothing is pending or dead at the end;
- the counters committed with each model's checkpoint equal what the observations on the stream
  imply: observations, transitions, dropped transitions and segments (trained, or discarded while
  evolution paused training) exactly, and one evolution command per GET and per SET naming it. For
  updates the invariant is ``ceil(segments / batch_size) <= updates <= segments`` (a restarted
  worker replays its backlog in bigger batches);
- every model restart loaded exactly the checkpoint committed before the kill (digests);
- the runner restarted mid-run read on after the last command it finished, so every RUN got its
  report; the killed evolution's generation was finished by the next process, with one SET per GET;
  no model is left paused;
- no process crashed, each stopped cleanly, and the return went up.
"""

from __future__ import annotations

import pytest

from tests.faults.chaos import ChaosConfig, run

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]


def test_every_component_killed_at_random_loses_nothing_and_training_goes_on(tmp_path) -> None:
    config = ChaosConfig(
        kills=3,
        redis_restarts=0,  # tests/faults/test_redis_restart.py
        aggregator_kills=1,
        runner_kills=1,
        evolution_kills=1,
        models=2,
        envs=8,
        seed=0,
        gap=(1.0, 3.0),
        min_steps=10_000,
        learning_rate=2e-3,
        evolution_timeout=15.0,  # a model that answered a GET too late waits this long at the end
        workdir=str(tmp_path),
    )
    figures = run(config)
    print(figures.table())

    assert (figures.kills, figures.aggregator_kills, figures.runner_kills, figures.evolution_kills) == (
        3,
        1,
        1,
        1,
    )
    assert figures.observations > 0 and figures.actions == figures.observations
    assert figures.actions_missing == 0 and figures.actions_duplicate == 0
    assert figures.replies == figures.replies_expected and figures.lost == 0 and figures.duplicates == 0
    assert figures.counters_exact, figures.counter_mismatches
    assert not figures.resume_mismatches
    assert figures.resumes_verified == figures.kills - figures.killed_before_ready
    # The evolution was killed with a generation in hand, and the next process took it over.
    assert "outside a generation" not in figures.evolution_kill_phases, figures.evolution_kill_phases
    assert sum(figures.takeovers.values()) >= 1 and figures.generations_resumed >= 1
    assert figures.gets == figures.sets == figures.generations and figures.sets_not_one_per_get == 0
    assert not figures.generations_failed and not figures.paused_at_end
    assert figures.runner_resumed == figures.runner_restarts_ready
    assert not figures.run_failures and figures.rounds >= 2
    assert not figures.crashes and not figures.unclean_stops
    assert figures.pending == 0 and figures.dead == 0
    assert figures.return_last_fifth > figures.return_first_fifth, figures.table()
