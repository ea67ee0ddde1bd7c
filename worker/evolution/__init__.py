"""``python -m worker evolution``: one generation of evolution over the live model workers.

- ``generation.py``: a generation through the wire (GET, fitness, vary, SET), resumable, with its
  scripts ``request.lua`` and ``set.lua``;
- ``operators.py``: PBT's exploit/explore and the tutorial's DEAP GA (pure);
- ``fitness.py``: each weight vector's mean deterministic return (pure);
- ``settings.py``: the options.

One generation, through the wire protocol of ``docs/protocol.md``:

1. **Collect.** ``XADD <prefix>:evolution {CMD: GET}`` (msgpack); every model replies on
   ``<prefix>:weights`` with ``{WEIGHTS, COMPONENT_ID, REQUEST_ID}`` and pauses training. We read
   replies carrying our ``REQUEST_ID`` until every live model (registry heartbeat) answered or
   ``--timeout`` passed, then go on with the models that did answer.
2. **Fitness.** ``returns``: each weight vector is loaded into a local copy of the policy and plays
   ``--eval-episodes`` deterministic episodes of ``--gym-env`` (the same seeds for every model);
   fitness = mean return. ``contribution``: the aggregator's share of each model in the ensemble's
   actions, taken (renamed away) from ``<prefix>:contribution`` in the GET's own script
   (``request.lua``), so each generation sees the decisions since the previous GET
   (models without an entry get 0).
3. **Vary.** ``pbt`` (exploit/explore): every model of the bottom ``--pbt-quantile`` whose fitness is
   below a randomly picked top-quantile model gets that model's weights plus N(0, --pbt-sigma) noise;
   the rest keep theirs. ``ga`` (the tutorial's DEAP loop): the best ``--elitism`` models are kept
   unchanged; the others get offspring of ``tools.selTournament``, ``tools.cxTwoPoint`` (probability
   ``--cxpb``) and ``tools.mutGaussian`` (probability ``--mutpb``, per-weight ``--indpb``).
4. **Set.** ONE ``{CMD: SET, WEIGHTS: {id: float32 bytes}}`` naming every model that answered the GET,
   unchanged ones with their own vector, so every paused model resumes at once (loading its own
   vector changes nothing but the pause: a model keeps its optimizer state on every SET). We wait
   for each ``{ACK: SET}`` with ``--timeout``. Models that never answered are not named: they resume
   after their own ``--evolution-timeout``.

Randomness comes from ``--seed`` mixed with the generation number (``INCR <prefix>:generation``), so
a seeded run is reproducible and successive generations differ. Run one evolution per prefix.

**Resuming.** From its GET until its SET is acknowledged, a generation lives in the hash
``<prefix>:evolving`` (:func:`~worker.evolution.generation.generation_key`): its number, the GET's
ID, the live models it asked, the seed of its randomness (``--seed``, or one drawn for it), the
shares it took and, once sent, the SET's ID and what it carried out. An evolution killed mid-
generation leaves the models paused; the next ``python -m worker evolution`` finds the hash and
finishes that generation instead of beginning another: before the SET, it reads the GET's replies
back from ``<prefix>:weights`` and decides again (the same seed and replies give the same SET);
after it, it only waits for the acknowledgements. It deletes the hash when done. A generation older
than ``--evolution-timeout`` seconds is not resumed (the hash expires): its models train on after
their own ``--evolution-timeout``, and its SET would overwrite what they learned since.
"""
