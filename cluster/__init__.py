"""Describing and running an emulated edge GPU + NDP system.

Pure modules (importable without Ray or zmq): ``errors``, ``spec``, ``presets``, ``cost``,
``routing``, ``analytic``, ``metrics``. Ray appears only in ``launch``; the CLI imports it lazily.
"""
