"""Run directories that never lie about which run they hold or whether it finished.

A run writes into a hidden staging directory next to its destination
(``.NAME.partial-PID``) and :meth:`Staging.commit` renames it into place when the run ends,
finished or failed; so the destination holds one whole run or nothing. A run that is killed
outright (SIGKILL, power loss) leaves only the hidden staging directory.

``--out DIR`` must be a directory that is missing or empty, unless ``overwrite`` is given;
then an old *run directory* (one holding ``summary.json`` or ``config.json``) is removed
before the run starts, so its results can never pass for the new run's. Anything else that
already exists at ``DIR`` is refused with the reason.

``check_out`` only inspects (no side effects); :meth:`Staging.create` makes the staging
directory and is called once every input has been checked, just before the work starts.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.core.errors import ConfigError

RUN_MARKERS = ("summary.json", "config.json")


def check_out(out: str | Path, overwrite: bool = False, flag: str = "--out",
              must_be_empty: bool = True) -> Path:
    """Refuses an ``out`` that is not, or cannot become, a fresh directory of this run.

    ``must_be_empty=False`` (sweeps, reproduce) accepts any existing writable directory."""
    p = Path(out)
    where = f"{flag} {str(p)!r}"
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise ConfigError(f"{where} is not allowed: it exists and is not a directory; "
                              "give a new or empty directory")
        entries = sorted(e.name for e in p.iterdir()) if must_be_empty else []
        if entries and not overwrite:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ConfigError(f"{where} is not allowed: the directory is not empty ({len(entries)} "
                              f"entries: {shown}); give a new directory, or --overwrite to replace "
                              "an earlier run directory")
        if entries and not any((p / m).is_file() for m in RUN_MARKERS):
            raise ConfigError(f"{where} is not allowed: --overwrite replaces only an earlier run "
                              f"directory (one with {' or '.join(RUN_MARKERS)}), and this one has "
                              "neither; give a new directory")
        if not os.access(p, os.W_OK | os.X_OK) or not os.access(p.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{where} is not allowed: it is not writable")
        return p
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{where} is not allowed: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} is not allowed: {str(parent)!r} is not writable")
    return p


def _fresh_default(base: Path, engine: str) -> Path:
    """``runs/YYYYmmdd-HHMMSS-ENGINE[-n]``, a name nothing holds yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = base / (f"{stamp}-{engine}" + (f"-{i}" if i else ""))
        if not d.exists():
            return d
    raise ConfigError(f"could not find a fresh run directory name under {str(base)!r}")  # pragma: no cover


@dataclass
class Staging:
    """A run's staging directory (``path``) and where it goes when the run ends."""

    path: Path
    out: Path | None  # the user's --out, or None for a fresh one under ``base``
    base: Path
    engine: str
    final: Path | None = None

    @classmethod
    def create(cls, out: str | Path | None, engine: str, overwrite: bool = False,
               base: str | Path = "runs") -> Staging:
        """Checks ``out`` again, removes an old run directory there when ``overwrite``, and
        makes the staging directory beside it. Failures are ConfigErrors naming ``--out``."""
        target = check_out(out, overwrite) if out is not None else None
        parent = target.parent if target is not None else Path(base)
        name = target.name if target is not None else engine
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if target is not None and target.exists() and any(target.iterdir()):
                shutil.rmtree(target)  # --overwrite, checked above to be an old run directory
            path = parent / f".{name}.partial-{os.getpid()}"
            if path.exists():
                shutil.rmtree(path)
            path.mkdir()
        except OSError as exc:
            raise ConfigError(f"--out {str(out if out is not None else parent)!r} is not a "
                              f"writable directory: {exc.strerror or exc}") from exc
        return cls(path, target, Path(base), engine)

    def commit(self) -> Path:
        """Moves the staging directory into place; returns where the run directory now is."""
        if self.final is not None:
            return self.final
        dest = self.out if self.out is not None else _fresh_default(self.base, self.engine)
        try:
            if dest.is_dir() and not any(dest.iterdir()):
                dest.rmdir()  # an empty --out given by the user
            os.rename(self.path, dest)
        except OSError:
            # something appeared at dest while the run ran: keep the results where they are
            dest = self.path
        self.final = dest
        return dest
