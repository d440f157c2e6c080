"""Policies and the pure cluster modules stay free of Ray and zmq (DESIGN.md section 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE = ["policies", "cluster.core.spec", "cluster.core.config", "cluster.core.cost", "cluster.core.routing",
        "cluster.engines.analytic", "cluster.core.metrics", "cluster.core.presets", "cluster.core.errors"]


def loaded_after_importing(modules: list[str]) -> set[str]:
    """Top-level package names in ``sys.modules`` of a fresh interpreter after the imports."""
    code = (f"import importlib, json, sys\n"
            f"for m in {modules!r}:\n"
            f"    importlib.import_module(m)\n"
            f"print(json.dumps(sorted({{n.split('.')[0] for n in sys.modules}})))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_pure_modules_import_neither_ray_nor_zmq() -> None:
    loaded = loaded_after_importing(PURE)
    assert {"policies", "cluster", "numpy"} <= loaded  # the imports really happened
    assert "ray" not in loaded
    assert "zmq" not in loaded
    assert "msgpack" not in loaded


def test_a_pure_analytic_run_stays_free_of_ray_and_zmq() -> None:
    code = ("from cluster.core.config import load_config\n"
            "from cluster.core.routing import build_routing\n"
            "from cluster.engines.analytic import run_policy\n"
            "from cluster.core.metrics import summarize\n"
            "import sys\n"
            "cfg = load_config(model='olmoe-1b-7b', overrides=['workload.prompt_tokens=4',"
            " 'workload.output_tokens=2'])\n"
            "r = build_routing(cfg)\n"
            "for p in ('ep', 'monde', 'tp', 'tp-lb', 'eplb', 'paper'):\n"
            "    summarize(run_policy(cfg, r, p), 4)\n"
            "print(sorted(m for m in ('ray', 'zmq') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
