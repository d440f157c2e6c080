"""deploy/: the cluster recipes carry what Ray and KubeRay require and install ndpmoe as the README does.

Nothing here can be exercised for real in the test run (no cloud, no Kubernetes, no Docker
engine), so the tests read the files: every YAML parses; the cluster launcher configs pass
Ray's own config schema and carry the keys the launcher needs; the KubeRay manifests carry the
keys the operator needs; workers offer the custom resource ``ndp_slot``; every recipe installs
the package with the README's own command; and every ``ndpmoe run`` they or deploy/README.md
show is accepted by the CLI.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import _parser
from cluster.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
LAUNCHER = ["ray-cluster-onprem.yaml", "ray-cluster-aws.yaml"]
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]
IMAGE = "ghcr.io/your-org/ndpmoe:latest"


def load(name: str) -> dict[str, Any]:
    docs = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{name}: one YAML mapping expected"
    return docs[0]


def readme_install() -> str:
    """The install part of the top-level README's run command, e.g.
    ``python3 -m venv .venv && .venv/bin/pip install -q -e .``."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if "pip install" in line and "ndpmoe run" in line)
    install = line.split("&& .venv/bin/ndpmoe run")[0].strip()
    assert re.search(r"pip install -q -e \.$", install), f"unexpected README command: {line}"
    return install


def default_units() -> int:
    return load_config().ndp.num_ndp_units


def assert_cli_accepts(command: str, where: str) -> None:
    """``ndpmoe run ...`` parses with the real command line parser."""
    args = shlex.split(command)
    assert args[:2] == ["ndpmoe", "run"], f"{where}: {command!r}"
    try:
        ns = _parser().parse_args(args[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: the CLI rejects {command!r} (exit {exc.code})")
    assert ns.cmd == "run"


def kuberay_resources(params: dict[str, Any]) -> dict[str, float]:
    """KubeRay's ``rayStartParams.resources`` is a quoted JSON string: '"{\\"ndp_slot\\": 4}"'."""
    raw = params.get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def start_resources(commands: list[str]) -> dict[str, float]:
    """``--resources='{...}'`` of a ``ray start`` command line."""
    for cmd in commands:
        m = re.search(r"--resources='([^']*)'", cmd)
        if m:
            return json.loads(m.group(1))
    return {}


# --- container recipe ------------------------------------------------------------------------


def test_dockerfile_installs_with_the_readme_command_and_runs_ndpmoe() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(line.startswith("COPY . ") for line in lines)
    assert f"RUN {readme_install()}" in lines, "the image must install with the README's command"
    assert re.search(r"^ENV PATH=\S*\.venv/bin:\$PATH", text, re.M), "the venv must be on PATH"
    cmd = next(line for line in reversed(lines) if line.startswith(("CMD", "ENTRYPOINT")))
    argv = json.loads(cmd.split(None, 1)[1])
    assert argv == ["ndpmoe", "run", "--engine", "analytic"]
    assert_cli_accepts(shlex.join(argv), "Dockerfile CMD")
    assert "rayproject/ray" in text, "say that Ray's images can be the base instead"


# --- Ray cluster launcher ---------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_has_the_keys_ray_up_needs(name: str) -> None:
    cfg = load(name)
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] in ("local", "aws")
    assert isinstance(cfg["max_workers"], int) and cfg["max_workers"] >= 1
    assert cfg["auth"]["ssh_user"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    assert cfg["file_mounts"] == {"~/ndpmoe": "."}, "the checkout is synced to ~/ndpmoe"
    install = readme_install()
    assert any(c == f"cd ~/ndpmoe && {install}" for c in cfg["setup_commands"]), (
        f"{name}: setup_commands must install with the README's command {install!r}")


def test_onprem_config_names_its_machines_and_offers_ndp_slots_on_workers() -> None:
    cfg = load("ray-cluster-onprem.yaml")
    provider = cfg["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] and provider["worker_ips"]
    assert cfg["max_workers"] <= len(provider["worker_ips"])
    assert "available_node_types" not in cfg, "the local provider refuses node types"
    slots = start_resources(cfg["worker_start_ray_commands"]).get("ndp_slot", 0)
    assert slots >= 1
    assert slots * len(provider["worker_ips"]) >= default_units()
    assert "ndp_slot" not in start_resources(cfg["head_start_ray_commands"])


def test_aws_config_declares_head_and_worker_node_types() -> None:
    cfg = load("ray-cluster-aws.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, spec in types.items():
        assert spec["node_config"]["InstanceType"], name
        assert isinstance(spec.get("resources", {}), dict), name
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= cfg["max_workers"], name
        assert spec["resources"].get("ndp_slot", 0) >= 1, f"{name}: workers offer ndp_slot"
    assert sum(s["resources"]["ndp_slot"] * s["min_workers"] for s in workers.values()) >= default_units()
    assert "ndp_slot" not in types[cfg["head_node_type"]].get("resources", {})


def _ray_autoscaler_dir() -> Path:
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "autoscaler"


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_own_schema(name: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((_ray_autoscaler_dir() / "ray-schema.json").read_text())
    jsonschema.validate(load(name), schema)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_survives_rays_preparation(name: str) -> None:
    """What ``ray up`` does first: fill defaults, prepare the provider, validate."""
    try:
        from ray.autoscaler._private.commands import prepare_config
        from ray.autoscaler._private.util import validate_config
    except ImportError as exc:  # a private API; other Ray versions may move it
        pytest.skip(f"Ray's config preparation not importable: {exc}")
    prepared = prepare_config(copy.deepcopy(load(name)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _ray_start_cli():
    try:
        from ray.scripts.scripts import start
    except ImportError as exc:  # Ray's CLI module; other Ray versions may move it
        pytest.skip(f"Ray's CLI not importable: {exc}")
    return start


def parse_ray_start(args: list[str]) -> dict[str, Any]:
    """Parses ``ray start`` options with Ray's own command line (nothing is started)."""
    return _ray_start_cli().make_context("start", args).params


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_ray_start_lines_parse_with_rays_cli(name: str) -> None:
    cfg = load(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [part.strip() for c in cfg[key] for part in c.split(";")
                  if part.strip().startswith("ray start")]
        assert len(starts) == 1, f"{name}: {key}"
        params = parse_ray_start(shlex.split(starts[0].replace("$RAY_HEAD_IP", "10.0.0.1"))[2:])
        assert params["head"] == (key == "head_start_ray_commands")
        if key == "worker_start_ray_commands" and cfg["provider"]["type"] == "local":
            assert json.loads(params["resources"])["ndp_slot"] >= 1


# --- KubeRay ----------------------------------------------------------------------------------


def assert_ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert isinstance(params, dict), f"{where}: headGroupSpec.rayStartParams"
    assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams are strings"
    assert "ndp_slot" not in kuberay_resources(params)
    container = head["template"]["spec"]["containers"][0]
    assert container["image"] == IMAGE, f"{where}: head image"
    assert {p["containerPort"] for p in container["ports"]} >= {6379, 8265, 10001}
    assert container["resources"]["limits"]
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: workerGroupSpecs"
    slots = 0
    for g in groups:
        assert g["groupName"], where
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: {g['groupName']}"
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), where
        per_pod = kuberay_resources(g["rayStartParams"]).get("ndp_slot", 0)
        assert per_pod >= 1, f"{where}: group {g['groupName']} offers no ndp_slot"
        assert g["template"]["spec"]["containers"][0]["image"] == IMAGE, where
        slots += per_pod * g["replicas"]
    assert slots >= default_units(), f"{where}: {slots} ndp_slot for {default_units()} units"


def test_kuberay_raycluster_has_the_keys_the_operator_needs() -> None:
    doc = load("kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    assert_ray_cluster_spec(doc["spec"], "RayCluster")


def test_kuberay_rayjob_runs_ndpmoe_on_its_own_cluster() -> None:
    doc = load("kuberay-rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("ndpmoe")
    assert "--address auto" in spec["entrypoint"]
    assert_cli_accepts(spec["entrypoint"], "RayJob entrypoint")
    assert isinstance(spec["shutdownAfterJobFinishes"], bool)
    assert_ray_cluster_spec(spec["rayClusterSpec"], "RayJob")


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_ray_start_params_parse_with_rays_cli(name: str) -> None:
    """KubeRay turns rayStartParams into ``ray start --key=value`` under bash."""
    doc = load(name)
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    groups = [(["--head"], spec["headGroupSpec"])]
    groups += [(["--address=ndpmoe-head-svc:6379"], g) for g in spec["workerGroupSpecs"]]
    for extra, group in groups:
        args = extra + [f"--{k}={shlex.split(v)[0]}" for k, v in group["rayStartParams"].items()]
        params = parse_ray_start(args)
        if "--head" not in extra:
            assert json.loads(params["resources"])["ndp_slot"] >= 1


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_worker_resources_quote_their_json_like_kuberay_expects(name: str) -> None:
    """KubeRay passes the value to ``ray start --resources=...`` verbatim, quotes included."""
    text = (DEPLOY / name).read_text()
    assert """resources: '"{\\"ndp_slot\\": 4}"'""" in text


# --- the how-to -------------------------------------------------------------------------------


def test_readme_commands_match_the_cli_and_the_files() -> None:
    text = (DEPLOY / "README.md").read_text()
    # code in the how-to (fenced blocks, inline spans) and usage lines in the files' headers
    code = re.findall(r"```.*?```", text, re.S) + re.findall(r"`[^`\n]+`", text)
    for name in ["Dockerfile", *LAUNCHER, *KUBERAY]:
        code += re.findall(r"^#\s{2,}(.*)$", (DEPLOY / name).read_text(), re.M)
    runs = [m.group(0) for s in code
            for m in re.finditer(r"ndpmoe run(?:[ \t]+[^\s`\"'#|()]+)*", s)]
    assert any("--address auto" in r for r in runs)
    for command in runs:
        assert_cli_accepts(command, "deploy/")
    for ref in re.findall(r"deploy/[\w.-]+", text):
        assert (ROOT / ref).exists(), f"deploy/README.md names {ref}, which does not exist"
    for needed in ("ray up deploy/ray-cluster-onprem.yaml", "ray up deploy/ray-cluster-aws.yaml",
                   "kubectl apply -f deploy/kuberay-raycluster.yaml",
                   "kubectl apply -f deploy/kuberay-rayjob.yaml", "ray attach", "ray submit",
                   "ndp_slot", "placement group", "ndpmoe sweep", "ndpmoe stress", IMAGE):
        assert needed in " ".join(text.split()), f"deploy/README.md should cover {needed!r}"
