"""Describing and running an emulated edge GPU + NDP system, in floors (README "Layout"):

- :mod:`cluster.core`: what the system *is*: specs, config, presets, cost model, faults,
  routing, the numpy reference and its kernels, metrics and typed results. Pure: no Ray, no zmq.
- :mod:`cluster.engines`: how a run is timed: one interface (:mod:`cluster.engines.base`) over the
  analytic engine and the measuring emulation, whose Ray seam is ``emulate``/``launch``/``preflight``.
- :mod:`cluster.studies`: how runs are driven: run, sweep and stress, reproduce, their reports.
- :mod:`cluster.cli`: the command line.

``policies`` (pure) and ``actors`` (the emulated devices, over zmq) sit beside them: policies
see only ``cluster.core``; actors see ``cluster.core`` and ``policies``. ``tests/test_layers.py``
enforces the floors and that no import circle exists.
"""
