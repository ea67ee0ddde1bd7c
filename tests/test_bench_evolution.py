"""``python -m bench.evolution --quick``: every arm trains and evolves through the real loop, and the
table and the picture come out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_bench_evolution_quick_runs_every_arm(redis_server_url: str, tmp_path: Path) -> None:
    picture = tmp_path / "evolution.png"
    done = subprocess.run(
        [sys.executable, "-m", "bench.evolution", "--quick", "--plot", str(picture)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| CartPole-v1 |")]
    arms = [row[2].strip() for row in rows]
    assert arms == [
        "one model",
        "4 models",
        "4 models + PBT",
        "4 models + GA (contribution)",
        "4 models + GA (returns)",
    ]
    assert all(row[4].strip().startswith("2,000") for row in rows)  # equal steps: 2 rounds of 1,000
    assert picture.stat().st_size > 10_000
