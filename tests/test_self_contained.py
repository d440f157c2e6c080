"""The repository is self-contained: no code, test or benchmark reaches for a file outside it.

A fresh clone with nothing beside it must run every test (`.ci/run` proves it end to end);
this is the cheap guard that fails at once, naming the line, when someone writes a path to
the ``shared`` folder next to the development checkout or to one machine's directories.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("cluster", "actors", "policies", "tests", "bench", ".ci")
# source and configuration; recorded outputs (bench/results/*.json) may quote the temporary
# paths a run happened to use, and nothing reads paths back from them
SCANNED_SUFFIXES = {".py", ".toml", ".cfg", ".ini", ".sh", ".yaml", ".yml", ""}

# Built from pieces so that this file does not match its own patterns. What they catch:
# the up-level path to the shared folder, with either slash; a quoted shared/ prefix;
# Path(<shared>) and <dir> / <shared>; an absolute path under a directory that exists on
# one machine and not the next; a Windows drive path opening a string (not ``e:\n`` in code).
_UP, _SHARED = re.escape(".."), "shar" "ed"
_Q = "[\"']"
_ROOTS = ("ho" "me", "Us" "ers", "wo" "rk", "ro" "ot", "tm" "p", "mn" "t", "me" "dia", "op" "t",
          "sr" "v", "scr" "atch", "da" "ta", "nf" "s", "va" "r", "priv" "ate", "Vol" "umes",
          "gp" "fs", "lus" "tre")
_OUTSIDE_PATTERNS = {
    "a path to the shared folder beside the checkout": re.compile(
        rf"{_UP}[/\\]+{_SHARED}\b|{_Q}{_SHARED}[/\\]|Path\(\s*{_Q}{_SHARED}{_Q}"
        rf"|/\s*{_Q}{_SHARED}{_Q}"),
    "an absolute path on one machine": re.compile(
        rf"(?<![\w.:/])/(?:{'|'.join(_ROOTS)})(?:/|\b)|(?<=[\"'])[A-Za-z]:" + "\\\\" + "{1,2}[A-Za-z]"),
}


def scanned_files() -> list[Path]:
    files = [p for d in SCANNED_DIRS if (ROOT / d).is_dir()
             for p in sorted((ROOT / d).rglob("*"))
             if p.is_file() and p.suffix in SCANNED_SUFFIXES
             and "__pycache__" not in p.parts and "results" not in p.relative_to(ROOT).parts]
    return files


def offending_lines(text: str) -> list[tuple[int, str, str]]:
    return [(n, why, line.strip())
            for n, line in enumerate(text.splitlines(), 1)
            for why, pattern in _OUTSIDE_PATTERNS.items() if pattern.search(line)]


def test_nothing_reads_files_outside_the_repository() -> None:
    files = scanned_files()
    assert any(p.name == "conftest.py" for p in files) and any(p.parent.name == "bench"
                                                               for p in files)
    found = [f"{p.relative_to(ROOT)}:{n}: {why}: {line}"
             for p in files for n, why, line in offending_lines(p.read_text(errors="replace"))]
    assert not found, "\n".join(found)


def test_the_patterns_catch_what_they_are_for() -> None:
    up = ".." + "/"
    caught = [up + _SHARED + "/sub/x.npz", up + up + _SHARED, f"ROOT.parent / {_SHARED!r}",
              f"Path({_SHARED!r}) / 'data'", f"'{_SHARED}/sub/x.npz'", "'/" + "home/me/x.npz'",
              "p = '/" + "work/x'", "open('/" + "tmp/x')", "'C:" + "\\\\Users\\\\x'",
              "r'C:" + "\\Users'", "'/" + "Users/me'"]
    for line in caught:
        assert offending_lines(line), line
    # kernel interfaces are the same on every Linux; made-up paths that are only parsed,
    # shared-memory words and URLs are not files on one machine
    fine = ["open('/proc/self/task')", "'workload.trace_path=/x/y.npz'", "shared_experts",
            "'https://ui.perfetto.dev/home'", "tests/data/flame.npz", "x = a / b  # shared",
            "'except Exception as e:" + "\\n    raise'"]
    for line in fine:
        assert not offending_lines(line), line


def test_the_routing_recording_ships_with_its_readme() -> None:
    data = ROOT / "tests" / "data"
    assert (data / "flame-moe-290m-routing.npz").stat().st_size > 100_000
    readme = (data / "README.md").read_text()
    assert "FLAME-MoE" in readme and "Apache-2.0" in readme
