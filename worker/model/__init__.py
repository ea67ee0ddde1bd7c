"""The model worker: one model answers observations with logits and learns online (A2C).

- ``loop.py``: :class:`~worker.model.loop.ModelWorker`, from ``XREADGROUP`` to the commit;
- the learning core, pure (no Redis): ``learner.py`` (policy, memories, counters), ``memory.py``
  (one environment's transitions), ``a2c.py`` (the update), ``policy.py`` (SB3's policy, its weight
  vector and state codec);
- its state in Redis: ``store.py`` with ``commit.lua`` (the one transaction per batch), and
  ``reclaim.py`` (entries a dead consumer left pending);
- ``clients.py``: the actions answering the model's inbox, and the weights it publishes for local
  clients;
- ``settings.py``: the A2C hyper-parameters and the worker's options.
"""
