"""The analytic engine and the policies reproduce the golden summaries exactly (1e-12 relative).

Speed-ups must not change one number; a deliberate change of the analytic semantics
regenerates ``tests/golden/*.json`` with ``tests/golden/regen.py`` (and says why in the
commit message).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("golden_regen", Path(__file__).parent / "golden" / "regen.py")
regen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regen)


def _check(name: str, case) -> None:
    want = json.loads(regen.path_of(name).read_text())
    got = regen._normalise(regen.compute(case))
    diffs = regen.differences(want, got)
    assert not diffs, f"{name}: {len(diffs)} numbers moved (first: {diffs[:5]}); if the analytic " \
                      "semantics changed on purpose, run tests/golden/regen.py and say why in the commit"


@pytest.mark.parametrize("name", sorted(regen.CASES))
def test_small_cases_match_golden(name: str) -> None:
    _check(name, regen.CASES[name])


@pytest.mark.slow
def test_default_run_matches_golden() -> None:
    """The paper's workload, 512 in / 512 out, five policies (what `ndpmoe run --engine analytic` runs)."""
    _check(*regen.DEFAULT_RUN)


def test_differences_catch_a_moved_number() -> None:
    assert regen.differences({"a": [1.0, 2.0]}, {"a": [1.0, 2.0 * (1 + 1e-13)]}) == []
    assert regen.differences({"a": [1.0, 2.0]}, {"a": [1.0, 2.0 * (1 + 1e-11)]})
    assert regen.differences({"a": 1}, {"a": 1, "b": 2})
