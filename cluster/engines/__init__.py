"""The engines: how a run is timed. ``base`` is the one interface (``engine.run(cfg, routing,
policies) -> RunResult``); ``analytic`` predicts on a virtual clock and ``fanout`` spreads its
policies over local worker processes; ``emulate`` measures on the emulation cluster, placed on
Ray by ``launch`` (its actors' bodies in ``ray_actors``) after ``preflight`` estimates its
cost. Only ``emulate``, ``launch``, ``ray_actors`` and ``preflight`` import ``actors`` (the Ray
seam).
"""
