"""A failover under a running loop: the primary holding the swarm's slot is killed with SIGKILL while
the model trains; its replica is promoted; every component rides it out and training goes on, and
the model's committed counters are exactly what the surviving observations imply.

What the failover lost and repeated is counted and printed (``-s`` shows it). The long form, 5
failovers with and without ``--wait-replicas``, is ``python -m bench.failover``; its table is in
the README.
"""

from __future__ import annotations

import pytest

from bench.failover import failover_case, table
from worker.common.servers import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]


@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_the_loop_rides_out_the_kill_of_its_primary(cluster: LocalCluster, wait_replicas: int) -> None:
    """The replica is 3 s behind when its primary dies (paused, as over a congested network): without
    waiting, the commits of those seconds vanish (the model rolls back to the checkpoint that
    survived and learns their transitions again); waiting for the replica, none does."""
    figures = failover_case(cluster, wait_replicas, 1, 4, replica_lag_ms=3000, wait_timeout_ms=5000)
    print("\n" + table([figures]))

    assert figures.failovers == 1 and figures.crashed == []  # nobody crashed
    assert figures.updates_after > 0  # training went on after the failover
    assert figures.counters_exact, figures.counter_mismatch  # nothing learned twice, nothing skipped
    assert figures.observations > 0 and len(figures.downtime) == 1
    if wait_replicas:  # every commit the model made was on the replica: none rolled back
        assert figures.commits_rolled_back == 0 and figures.transitions_redone == 0
    # Without the wait, how much vanishes depends on what the sockets' buffers held: printed only.
