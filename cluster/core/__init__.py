"""The pure bottom: what the system is. Nothing here imports Ray, zmq or any floor above.

``errors``; ``checks`` (field checks); ``spec`` (system, model, workload, weights and emulation
sections), ``knobs`` (the policy section and each policy's own knobs) and ``config``
(presets, TOML files, Hugging Face ``config.json``, ``--set`` overrides into a frozen Config);
``presets`` (shipped systems and models; ``register_system`` adds a device model); ``faults``
(the ``emulate.inject`` grammar, parsed once into ``Config.faults``); ``cost`` (the roofline
cost model); ``selection`` (the Routing record, expert popularity), ``routing`` (where a
routing comes from) and ``routing_stats`` (measuring and fitting captures); ``kernels`` and
``reference`` (the numpy forward pass both engines check against); ``metrics`` (run records,
``PolicySummary``, ``RunResult``).
"""
