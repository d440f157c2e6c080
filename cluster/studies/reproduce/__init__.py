"""``ndpmoe reproduce``: the paper's studies on the analytic engine, into one run directory.

Each study is one module holding its cases, its rows and tables, its figure and its section of
``report.md``: :mod:`.headline` (1), :mod:`.ablation` (2), :mod:`.budget` (3),
:mod:`.prefetchers` (4), :mod:`.sensitivity` (5), :mod:`.beyond` (6), :mod:`.routing`
(issue 14) and :mod:`.spot_check` (7, ``--spot-check``). :mod:`.common` holds what they share
(options, cases, the :class:`~.common.Study` record, formatting and plotting helpers),
:mod:`.run` runs the jobs, :mod:`.registry` lists the studies in order and :mod:`.driver` runs
them and writes the CSVs, figures, ``results.json`` and ``report.md``.

How to add a study:

1. Write ``cluster/studies/reproduce/<name>.py``: ``cases(opts, load)`` returning
   :class:`~.common.Case` rows (``Case(table, labels, load(units, model, *overrides), policy)``),
   and as needed ``derive(tables, opts)``, its CSV columns, ``figures(o, opts)`` and
   ``section(o, opts, cfg)``; end it with ``STUDY = Study("<name>", cases=..., ...)``
   (:mod:`.budget` is a short example).
2. Register it: add ``<name>.STUDY`` to ``STUDIES`` in :mod:`.registry` (at run time:
   ``registry.register(STUDY)``, undone by ``registry.unregister("<name>")``).
3. ``ndpmoe reproduce`` now runs its cases with the others (equal configs run once), writes
   ``<table>.csv``, its figure and its section, and puts its rows in ``results.json``;
   ``reproduce(opts, out, studies=["<name>"])`` runs it alone. ``tests/test_add_a_study.py``
   follows these steps with a toy study.
"""

from cluster.studies.reproduce.common import QUICK, Options, Outcome, options
from cluster.studies.reproduce.driver import all_cases, reproduce
from cluster.studies.reproduce.headline import PAPER_AVG_SPEEDUP, PAPER_MAX_SPEEDUP

__all__ = ["PAPER_AVG_SPEEDUP", "PAPER_MAX_SPEEDUP", "QUICK", "Options", "Outcome", "all_cases",
           "options", "reproduce"]
