"""The environment side: gymnasium environments stepped on the actions the aggregator publishes.

- ``runner.py``: :class:`~worker.env.runner.EnvRunner`, obeying RUN/STOP and publishing rounds
  (``publish.lua``);
- ``episodes.py``: one environment's message chain and a run's progress (no Redis).
"""
