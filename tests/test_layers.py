"""The code's floors, enforced: nothing imports upward, nothing imports in a circle.

Floors, bottom to top (README "Layout"):

0. ``cluster.core``: what the system *is* (specs, config, presets, cost, faults, routing, the
   numpy reference and its kernels, metrics, errors). Pure: no Ray, no zmq.
1. ``policies``: the scheduling and prefetch policies. Pure; they see only ``cluster.core``.
2. ``actors``: the emulated devices, the link and the scheduler core (zmq, no Ray).
3. ``cluster.engines``: how a run is timed: the analytic engine and the measuring emulation.
4. ``cluster.studies``: how runs are driven: run, sweep, stress, reproduce, their reports.
5. ``cluster.cli``: the command line.

A module may import its own floor or the floors below it, with one declared exception: the
emulation's Ray seam. Only the modules in ``SEAM`` may import ``actors`` from the engines floor
(they place actors on Ray); no other engine or study reaches the devices. Every import counts,
including those inside functions (a lazy import that hides a circle is still a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "actors", "policies")
FLOORS = [("cluster.core", 0), ("policies", 1), ("actors", 2), ("cluster.engines", 3),
          ("cluster.studies", 4), ("cluster.cli", 5), ("cluster", 5)]
SEAM = {"cluster.engines.emulate", "cluster.engines.launch", "cluster.engines.preflight",
        "cluster.engines.ray_actors"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(p)] = p
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its body, resolved to modules (``from
    pkg import mod`` is the module ``pkg.mod`` when it is one, else the package ``pkg``)."""
    got: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t.split(".")[0] in PACKAGES and t != name:
                got.add(t)
    return got


def floor(name: str) -> int:
    for prefix, f in FLOORS:
        if name == prefix or name.startswith(prefix + "."):
            return f
    raise AssertionError(f"{name} is on no floor; add it to FLOORS")


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def test_every_module_is_on_a_floor() -> None:
    for m in modules():
        floor(m)


def test_nothing_imports_upward_and_only_the_seam_reaches_the_devices() -> None:
    bad = []
    for m, deps in sorted(graph().items()):
        for d in sorted(deps):
            if m.startswith("cluster.") and d == "cluster":
                continue  # the package's own __init__ (a docstring)
            if floor(d) > floor(m):
                bad.append(f"{m} (floor {floor(m)}) imports {d} (floor {floor(d)})")
            elif floor(d) == 2 and floor(m) > 2 and m not in SEAM:
                bad.append(f"{m} reaches the devices ({d}) outside the Ray seam {sorted(SEAM)}")
    assert not bad, "\n".join(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    g = {m: {d for d in deps if d not in PACKAGES and d != "cluster"} for m, deps in graph().items()}
    assert cycles(g) == []


def test_the_checker_sees_circles_and_upward_imports(tmp_path: Path) -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    p = tmp_path / "m.py"
    p.write_text("import x\n\ndef f():\n    from cluster.engines import analytic\n"
                 "    from cluster.core.spec import Config\n")
    known = {"cluster.engines.analytic", "cluster.core.spec", "cluster.engines", "cluster.core"}
    assert imports_of("policies.m", p, known) == {"cluster.engines.analytic", "cluster.core.spec"}
    assert floor("cluster.engines.analytic") > floor("policies.m")
