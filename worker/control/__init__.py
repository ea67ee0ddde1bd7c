"""Control of a running swarm, one module per command of ``python -m worker control``, and the demo.

- ``train.py``: rounds of training runs, evaluation and evolution, with a learning curve;
- ``status.py``: live models, stream lengths, consumer-group lag;
- ``forget.py``: delete what a stopped model left in Redis;
- ``export.py``: a model's checkpoint as a stable-baselines3 ``A2C`` zip (``--init-from`` reads one:
  :mod:`worker.model.sb3zip`);
- ``swarms.py``: every swarm on a Redis or a cluster (``status --swarms``);
- ``demo.py``: start every component and train until CartPole-v1 is solved.
"""
