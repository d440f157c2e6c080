"""The studies ``ndpmoe reproduce`` runs, in order: the order of their cases, of their CSV files
and of their sections in ``report.md``.

A study module ends in ``STUDY = Study(...)``; adding it to :data:`STUDIES` below registers it
for good. :func:`register` and :func:`unregister` do the same at run time (tests, experiments).
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.core.errors import ConfigError
from cluster.studies.reproduce import (
    ablation,
    beyond,
    budget,
    headline,
    prefetchers,
    routing,
    sensitivity,
    spot_check,
)
from cluster.studies.reproduce.common import Study

STUDIES: list[Study] = [
    headline.STUDY,  # 1
    ablation.STUDY,  # 2 (reads the headline's rows)
    budget.STUDY,  # 3
    prefetchers.STUDY,  # 4
    sensitivity.STUDY,  # 5
    beyond.STUDY,  # 6
    routing.STUDY,  # issue 14
    spot_check.STUDY,  # 7 (--spot-check; runs after the report is first written)
]


def register(study: Study) -> Study:
    """Appends ``study`` to :data:`STUDIES`; its name must be new."""
    if any(s.name == study.name for s in STUDIES):
        raise ValueError(f"a study named {study.name!r} is already registered")
    STUDIES.append(study)
    return study


def unregister(name: str) -> None:
    """Removes the study ``name`` (no error if it is not registered)."""
    STUDIES[:] = [s for s in STUDIES if s.name != name]


def names() -> tuple[str, ...]:
    return tuple(s.name for s in STUDIES)


def selected(only: Sequence[str] | None = None) -> list[Study]:
    """The registered studies (``only``: just those, still in registration order)."""
    if only is None:
        return list(STUDIES)
    if isinstance(only, str):
        only = [only]
    unknown = sorted(set(only) - set(names()))
    if unknown:
        raise ConfigError(f"no reproduce study named {', '.join(unknown)}: studies are "
                          f"{', '.join(names())}")
    return [s for s in STUDIES if s.name in only]
