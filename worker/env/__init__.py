"""The environment side: gymnasium environments stepped on the actions the aggregator publishes.

- ``runner.py``: :class:`~worker.env.runner.EnvRunner`, obeying RUN/STOP and publishing the status
  reports (``publish.lua``); ``settings.py``: its flags;
- ``stepping.py``: how a run steps its environments, in lockstep or each on its own action;
- ``episodes.py``: one environment's message chain and a run's progress (no Redis);
- ``cost.py``: :class:`StepCost`, a fixed cost per step (CPU work or a wait), for the runner and
  for benchmarks that wrap stable-baselines3's environments with it.
"""

from worker.env.cost import StepCost

__all__ = ["StepCost"]
