"""The studies: how runs are driven. ``runner`` (``ndpmoe run``: one run directory), ``sweep``
(``ndpmoe sweep`` and ``stress``: a grid of configurations), ``reproduce`` (the paper's studies,
one module each), ``report`` (summary.json, CSVs, trace, plots) and ``rundir`` (staging a run
directory so that it never mixes two runs). Studies run their policies through
:mod:`cluster.engines.base`.
"""
