"""Short form of the chaos run (the long form: ``python -m tests.faults.chaos --kills 50``).

Two model workers answer eight CartPole environments while a seeded fault loop SIGKILLs a random one
at random moments and starts it again with the same COMPONENT_ID. See tests/faults/chaos.py for what
runs and how each figure is measured. What must hold:

- every observation answered by every model exactly once (by OBS_ID: none lost, none twice);
- the counters committed with each model's checkpoint equal what the published input implies:
  observations, transitions, dropped transitions and segments exactly, none discarded or dead. A
  segment trained twice or lost would show in ``segments``, a transition in ``transitions``;
- updates are not a function of the input alone (one batch is one A2C update, and a restarted
  worker replays its backlog in bigger batches), so for them the invariant is
  ``ceil(segments / batch_size) <= updates <= segments``: each update trains at least one segment,
  and a batch of B entries completes at most B;
- every restart that came up loaded exactly the checkpoint committed before the kill (digests of
  the state it loaded, as it logged them, equal those of the blobs in Redis read after the kill);
- no worker crashed, each stopped cleanly, nothing pending or dead at the end;
- the return went up: the last fifth of the episodes beats the first fifth.
"""

from __future__ import annotations

import pytest

from tests.faults.chaos import ChaosConfig, run

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]


def test_workers_killed_at_random_lose_nothing_and_resume_from_their_checkpoint(tmp_path) -> None:
    config = ChaosConfig(
        kills=6,
        redis_restarts=0,
        models=2,
        envs=8,
        seed=1,
        gap=(1.0, 3.0),
        min_steps=6000,
        learning_rate=2e-3,
        workdir=str(tmp_path),
    )
    figures = run(config)
    print(figures.table())

    assert figures.kills == 6
    assert figures.replies == figures.replies_expected > 0
    assert figures.lost == 0 and figures.duplicates == 0
    assert figures.counters_exact, figures.counter_mismatches
    assert not figures.resume_mismatches
    assert figures.resumes_verified == figures.kills - figures.killed_before_ready
    assert not figures.crashes and not figures.unclean_stops
    assert figures.pending == 0 and figures.dead == 0
    assert figures.return_last_fifth > figures.return_first_fifth, figures.table()
