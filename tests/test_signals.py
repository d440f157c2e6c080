"""Ctrl-C or SIGTERM on a running emulation: it stops, writes what it has, exits 130 and
leaves no process behind (ray.init installs its own SIGTERM handler: ours must survive it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _no_constant(name: str):
    raise ValueError(f"summary.json holds {name}: not strict JSON")


def _pids() -> set[int]:
    return {int(d) for d in os.listdir("/proc") if d.isdigit()}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tagged(pid: int, tag: bytes) -> bool:
    """Whether ``pid``'s environment holds ``tag`` (children inherit it, Ray's included)."""
    try:
        return tag in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _descendants(root: int) -> set[int]:
    """Every process whose ancestry leads to ``root`` (walks /proc once)."""
    parent: dict[int, int] = {}
    for pid in _pids():
        try:
            parent[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out = set()
    for pid in parent:
        p, seen = pid, 0
        while p in parent and p not in (0, 1) and seen < 64:
            if parent[p] == root:
                out.add(pid)
                break
            p, seen = parent[p], seen + 1
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_the_run_and_leaves_no_ray_or_actor_process(tmp_path, sig):
    # the run and everything it starts carry a tag in their environment, so that processes of
    # other runs on the machine (a second copy of the suite, another user's Ray) are not its
    tag_value = uuid.uuid4().hex
    tag = f"NDPMOE_SIGNAL_TEST={tag_value}".encode()
    before = _pids()
    cmd = [sys.executable, "-m", "cluster.cli", "run", "--model", "olmoe-1b-7b",
           "--policies", "tp", "paper", "--set", "workload.prompt_tokens=8",
           "--set", "workload.output_tokens=64", "--set", "emulate.dilation=400",
           "--set", "weights.memory_budget_bytes=67108864", "--out", str(tmp_path / "run"), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "NDPMOE_SIGNAL_TEST": tag_value})
    lines: list[str] = []
    seen: set[int] = set()
    deadline = time.monotonic() + 150
    try:
        assert proc.stdout is not None
        # wait for the line printed once calibration is over, just before the paced runs: a
        # fixed wait after "cluster up" may, on a loaded machine, still be in calibration
        for line in proc.stdout:
            lines.append(line)
            if "dilation D =" in line:
                break
            assert time.monotonic() < deadline, "".join(lines)
        else:
            pytest.fail("the run ended before its cluster came up:\n" + "".join(lines))
        time.sleep(3.0)  # inside the first paced policy: D = 400 makes it last minutes
        seen = _descendants(proc.pid)
        assert any("ray" in _cmdline(p) for p in seen), "no Ray process was started"
        assert any("ray" in _cmdline(p) and _tagged(p, tag) for p in seen), "tag not inherited"
        proc.send_signal(sig)  # to the process this test started, by its pid
        out, _ = proc.communicate(timeout=60)
        lines.append(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert proc.returncode == 130, text
    assert "interrupted" in text.lower(), text
    assert "Traceback" not in text and "SIGTERM received" not in text, text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(),  # partial results
                         parse_constant=_no_constant)
    assert summary["status"] == "failed" and "interrupted" in summary["error"]
    assert summary["policies"]["tp"]["status"] == "failed"
    # every process the run started is gone (Ray's daemons, workers and actors included)
    end = time.monotonic() + 20
    left = {p for p in seen | (_pids() - before) if _alive(p) and _tagged(p, tag)}
    while left and time.monotonic() < end:
        time.sleep(0.5)
        left = {p for p in left if _alive(p)}
    assert not left, {p: _cmdline(p)[:120] for p in left}
