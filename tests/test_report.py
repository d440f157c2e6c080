"""What a run leaves behind, and the command line that makes it (analytic engine, no Ray).

The trace must open in Perfetto (valid trace-event JSON, a track per resource, durations that
are the cost model's), the plots must be real PNGs with labelled axes, ``summary.json`` must
carry the resolved config and the headline metrics, and the CLI must turn bad input into one
readable paragraph and exit status 2.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from cluster.core.config import load_config
from cluster.core.cost import CostModel
from cluster.studies import report, runner

TINY = ("workload.prompt_tokens=8", "workload.output_tokens=4")
POLICIES = ["ep", "monde", "tp", "tp-lb", "paper"]
UNITS = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNGS = ("latency_by_policy.png", "unit_busy.png", "imbalance_over_steps.png")
SUMMARY_KEYS = ("e2e_latency_s", "ttft_s", "tpot_s", "speedup_vs_monde", "max_over_mean",
                "balancedness", "gpu_util", "prefetch_hit_rate")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> runner.RunResult:
    cfg = load_config(model="olmoe-1b-7b", overrides=list(TINY))
    return runner.run(cfg, POLICIES, engine="analytic", out=tmp_path_factory.mktemp("run"),
                      progress=False)


@pytest.fixture(scope="module")
def trace(run) -> dict[str, Any]:
    return json.loads((run.run_dir / "trace.json").read_text())


def _tracks(trace: dict[str, Any]) -> tuple[dict[int, str], dict[tuple[int, int], str],
                                             dict[tuple[int, int], list[dict]]]:
    """(pid -> process name, (pid, tid) -> thread name, (pid, tid) -> its X events)."""
    procs, threads, events = {}, {}, defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "M" and e["name"] == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e["ph"] == "M" and e["name"] == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
        elif e["ph"] == "X":
            events[(e["pid"], e["tid"])].append(e)
    return procs, threads, events


# --- trace ---------------------------------------------------------------------------------

def test_trace_is_trace_event_json_with_complete_events(trace) -> None:
    assert isinstance(trace["traceEvents"], list) and trace["traceEvents"]
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert xs
    for e in xs:
        for key in ("name", "ts", "dur", "pid", "tid"):
            assert key in e, (key, e)
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0
    assert {e["ph"] for e in trace["traceEvents"]} <= {"X", "M"}


def test_trace_has_a_process_per_policy_and_a_named_track_per_resource(trace) -> None:
    procs, threads, events = _tracks(trace)
    assert sorted(procs.values()) == sorted(POLICIES)
    want = {"gpu", "link", *(f"ndp{u}" for u in range(UNITS))}
    for pid, policy in procs.items():
        names = [n for (p, _), n in threads.items() if p == pid]
        assert sorted(names) == sorted(want), policy
    # every event sits on a named track of a named process
    assert set(events) <= set(threads)
    assert {p for p, _ in threads} == set(procs)


def test_trace_tracks_never_overlap_themselves(trace) -> None:
    """A resource does one thing at a time: Perfetto draws overlapping slices as nesting."""
    procs, threads, events = _tracks(trace)
    for key, evs in events.items():
        evs = sorted(evs, key=lambda e: (e["ts"], e["dur"]))
        for a, b in itertools.pairwise(evs):
            assert b["ts"] >= a["ts"] + a["dur"] - 1e-6 * max(1.0, a["dur"]), (
                procs[key[0]], threads[key], a, b)


def test_tp_expert_slices_last_what_the_cost_model_says(run, trace) -> None:
    """tp on 4 units, batch 1: every decode expert is 1 token on a quarter of d_ff per unit."""
    cost = CostModel(load_config(model="olmoe-1b-7b", overrides=list(TINY)))
    procs, threads, events = _tracks(trace)
    pid = next(p for p, n in procs.items() if n == "tp")
    want_us = cost.ndp_expert_s(1, 1 / UNITS) * 1e6
    act_us = cost.transfer_s(cost.activation_bytes(1)) * 1e6
    traced_steps, layers, top_k = 2, 16, 8  # decode steps 1 and 2 are traced
    per_unit = {}
    for (p, tid), evs in events.items():
        if p != pid:
            continue
        name = threads[(p, tid)]
        if name.startswith("ndp"):
            experts = [e for e in evs if e["cat"] == "expert"]
            per_unit[name] = sorted(e["name"] for e in experts)
            for e in experts:
                assert e["dur"] == pytest.approx(want_us, rel=1e-9), (name, e)
        if name == "link":
            acts = [e for e in evs if e["cat"] == "activation"]
            assert len(acts) == traced_steps * layers * UNITS
            for e in acts:
                assert e["dur"] == pytest.approx(act_us, rel=1e-9), e
    assert sorted(per_unit) == [f"ndp{u}" for u in range(UNITS)]
    # each unit ran its slice of the same experts, top-k per layer per traced step
    first = per_unit["ndp0"]
    assert len(first) == traced_steps * layers * top_k
    assert all(v == first for v in per_unit.values())


def test_trace_events_match_the_recorded_intervals(run, trace) -> None:
    procs, threads, events = _tracks(trace)
    for pid, policy in procs.items():
        rec = next(r for r in run.records if r.policy == policy)
        got = sorted((threads[k], e["ts"], e["dur"]) for k, evs in events.items() if k[0] == pid
                     for e in evs)
        want = sorted((iv.resource, iv.start_s * 1e6, max(0.0, (iv.end_s - iv.start_s) * 1e6))
                      for iv in rec.intervals)
        assert len(got) == len(want) > 0, policy
        for g, w in zip(got, want):
            assert g[0] == w[0] and g[1] == pytest.approx(w[1]) and g[2] == pytest.approx(w[2])


# --- plots ---------------------------------------------------------------------------------

def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_are_real_pngs(run) -> None:
    for name in PNGS:
        w, h = _png_size(run.run_dir / name)
        assert w >= 200 and h >= 200, (name, w, h)


def test_every_plot_has_a_title_and_labelled_axes(run, tmp_path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figures: list[Figure] = []
    save = Figure.savefig

    def capture(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    paths = report.write_plots(tmp_path, run.summaries, run.records)
    assert sorted(p.name for p in paths) == sorted(PNGS)
    assert len(figures) == len(PNGS)
    for fig, path in zip(figures, paths):
        axes = fig.get_axes()
        assert axes, path
        for ax in axes:
            assert ax.get_xlabel().strip(), path.name
            assert ax.get_ylabel().strip(), path.name
            assert ax.get_title().strip(), path.name
            assert ax.has_data(), path.name
        assert path.read_bytes()[:8] == PNG_SIGNATURE


# --- summary -------------------------------------------------------------------------------

def test_summary_carries_the_resolved_config_and_the_headline_metrics(run) -> None:
    doc = json.loads((run.run_dir / "summary.json").read_text())
    cfg = load_config(model="olmoe-1b-7b", overrides=list(TINY))
    resolved = json.loads(json.dumps(cfg.to_dict()))
    assert doc["config"] == resolved
    assert json.loads((run.run_dir / "config.json").read_text()) == resolved
    assert doc["engine"] == "analytic" and doc["model"] == "olmoe-1b-7b"
    assert list(doc["policies"]) == POLICIES
    for name, s in doc["policies"].items():
        for key in SUMMARY_KEYS:
            assert key in s, (name, key)
        assert 0 < s["ttft_s"] < s["e2e_latency_s"]
        assert s["max_over_mean"] >= 1.0 and 0 < s["balancedness"] <= 1.0
        assert 0 <= s["gpu_util"] <= 1.0 and 0 <= s["prefetch_hit_rate"] <= 1.0
        assert s["speedup_vs_monde"] == pytest.approx(
            doc["policies"]["monde"]["e2e_latency_s"] / s["e2e_latency_s"], rel=1e-12)
    assert doc["policies"]["monde"]["speedup_vs_monde"] == 1.0


def test_summary_without_monde_has_no_speedup(tmp_path) -> None:
    cfg = load_config(model="olmoe-1b-7b", overrides=list(TINY))
    res = runner.run(cfg, ["tp"], engine="analytic", out=tmp_path, progress=False, plots=False)
    doc = json.loads((res.run_dir / "summary.json").read_text())
    assert doc["policies"]["tp"]["speedup_vs_monde"] is None


def test_csvs_have_a_row_per_token_and_per_step(run) -> None:
    tokens = (run.run_dir / "tokens.csv").read_text().splitlines()
    assert tokens[0] == "policy,index,time_s,latency_s"
    assert len(tokens) - 1 == len(POLICIES) * 4
    steps = (run.run_dir / "steps.csv").read_text().splitlines()
    assert len(steps) - 1 == len(POLICIES) * 4 * 16  # 4 steps (prefill + 3 decode) x 16 layers
    assert "unit_busy_s" in steps[0] and "max_over_mean" in steps[0]


# --- CLI -----------------------------------------------------------------------------------

@pytest.fixture
def cli(monkeypatch):
    """``cli(args)`` -> (status, stdout, stderr) at a standard 80-column terminal width."""
    from cluster.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "25")

    def call(args: list[str], capsys) -> tuple[int, str, str]:
        status = main(args)
        out, err = capsys.readouterr()
        return status, out, err

    return call


def test_cli_run_writes_the_run_directory(cli, capsys, tmp_path) -> None:
    out_dir = tmp_path / "run"
    status, out, _ = cli(["run", "--engine", "analytic", "--set", "workload.prompt_tokens=8",
                          "--set", "workload.output_tokens=4", "--model", "olmoe-1b-7b",
                          "--out", str(out_dir), "--quiet"], capsys)
    assert status == 0
    for f in ("config.json", "summary.json", "steps.csv", "tokens.csv", "trace.json", *PNGS):
        assert (out_dir / f).is_file(), f
    doc = json.loads((out_dir / "summary.json").read_text())
    assert list(doc["policies"]) == POLICIES
    assert doc["config"]["workload"]["prompt_tokens"] == 8
    for name in POLICIES:
        assert name in out  # the final table


@pytest.mark.parametrize(("args", "needles"), [
    (["--set", "link.bw_gbps=-1"], ["link.bw_gbps", "-1"]),
    (["--set", "link.nope=1"], ["link.nope", "bw_gbps"]),
    (["--set", "workload.batch_size=two"], ["workload.batch_size", "two"]),
    (["--policies", "nope"], ["nope", "tp-lb"]),
    (["--policies", "tp+nope"], ["nope", "prefill-freq"]),
    (["--model", "gpt5"], ["gpt5", "olmoe-1b-7b"]),
    (["--system", "nowhere.toml"], ["nowhere.toml"]),
], ids=["negative-bw", "unknown-field", "bad-type", "unknown-policy", "unknown-prefetcher",
        "unknown-model", "missing-file"])
def test_cli_bad_input_exits_2_with_one_paragraph_naming_it(cli, capsys, tmp_path, args,
                                                            needles) -> None:
    out_dir = tmp_path / "out"
    status, _, err = cli(["run", "--engine", "analytic", *args, "--out", str(out_dir), "--quiet"],
                         capsys)
    assert status == 2
    text = err.strip()
    assert text, "no error message"
    assert "Traceback" not in err
    assert "\n\n" not in text, "more than one paragraph"
    flat = " ".join(text.split())
    for needle in needles:
        assert needle in flat, (needle, flat)
    assert not out_dir.exists(), "bad input must fail before any work"


def test_cli_policies_lists_every_scheduler_prefetcher_and_paper(cli, capsys) -> None:
    import policies

    status, out, _ = cli(["policies"], capsys)
    assert status == 0
    listed = {line.split("│")[2].strip() for line in out.splitlines() if line.count("│") >= 3}
    want = {*policies.names("scheduler"), *policies.names("prefetcher"), "paper"}
    assert want <= listed, want - listed


def test_cli_presets_lists_the_five_systems_and_six_models(cli, capsys) -> None:
    from cluster.core import presets

    status, out, _ = cli(["presets"], capsys)
    assert status == 0
    systems = [f"edge-rtx5080-ndp{n}" for n in range(2, 7)]
    models = ["qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite", "olmoe-1b-7b",
              "qwen1.5-moe-a2.7b", "mixtral-8x22b"]
    assert sorted(presets.SYSTEMS) == sorted(systems)
    assert sorted(presets.MODELS) == sorted(models)
    for name in [*systems, *models]:
        assert name in out, f"{name} is not listed (a user at 80 columns cannot see it)"


@pytest.mark.parametrize("name", ["edge-rtx5080-ndp4", "edge-rtx5080-ndp2"])
def test_cli_presets_show_prints_toml_that_loads_as_the_preset(cli, capsys, tmp_path,
                                                               name) -> None:
    status, out, _ = cli(["presets", "--show", name], capsys)
    assert status == 0
    path = tmp_path / "system.toml"
    path.write_text(out)
    assert load_config(system=str(path)) == load_config(system=name)


def test_cli_presets_show_of_a_model_round_trips_its_fields(cli, capsys, tmp_path) -> None:
    status, out, _ = cli(["presets", "--show", "deepseek-v2-lite"], capsys)
    assert status == 0
    path = tmp_path / "model.toml"
    path.write_text(out)
    assert load_config(system=str(path)).model == load_config(model="deepseek-v2-lite").model


def test_cli_presets_show_of_an_unknown_name_exits_2(cli, capsys) -> None:
    status, _, err = cli(["presets", "--show", "nope"], capsys)
    assert status == 2
    flat = " ".join(err.split())
    assert "nope" in flat and "edge-rtx5080-ndp4" in flat and "Traceback" not in err


def test_summary_json_is_the_typed_result_and_reads_back_into_it(run) -> None:
    """summary.json's policies are RunResult's, written once; each reads back into the same
    PolicySummary (what the emulation engine relies on), speed-ups computed over monde."""
    from cluster.core.metrics import PolicySummary

    doc = json.loads((run.run_dir / "summary.json").read_text())
    assert doc["policies"] == json.loads(json.dumps(run.summaries))
    for name, d in doc["policies"].items():
        back = PolicySummary.from_dict(d)
        assert back == run.policies[name] and back.to_dict() == d
        assert d["speedup_vs_monde"] == doc["policies"]["monde"]["e2e_latency_s"] / d["e2e_latency_s"]
    with pytest.raises(ValueError, match="e2e_latency_s"):
        PolicySummary.from_dict({"scheduler": "ep"})
