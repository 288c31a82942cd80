"""Every manifest in cluster/ parses, has the fields its kind requires, and runs real commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
CRON = re.compile(r"^(\S+\s+){4}\S+$")
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes", "container", "image_uri", "config"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def check_unlearn_command(command: str) -> None:
    words = shlex.split(command)
    assert words[0] == "unlearn", command
    build_parser().parse_args(words[1:])  # exits (SystemExit) on an unknown flag or command


def check_pod_template(template: dict, gpu: bool) -> None:
    containers = template["spec"]["containers"]
    assert containers and all(c["image"] for c in containers)
    volumes = {v["name"] for v in template["spec"].get("volumes", [])}
    for container in containers:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes
    limits = containers[0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == gpu


def check_ray_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    check_pod_template(head["template"], gpu=False)
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        check_pod_template(group["template"], gpu=True)


def check_ray_job_spec(spec: dict) -> None:
    check_unlearn_command(spec["entrypoint"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= RUNTIME_ENV_KEYS
    assert "MLFLOW_TRACKING_URI" in runtime_env["env_vars"]
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"])


def test_raycluster():
    manifest = load("kuberay/raycluster.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    assert manifest["metadata"]["name"]
    check_ray_cluster_spec(manifest["spec"])


def test_rayjob():
    manifest = load("kuberay/rayjob-forget.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    check_ray_job_spec(manifest["spec"])


def test_raycronjob():
    manifest = load("kuberay/raycronjob-requests.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCronJob")
    assert CRON.match(manifest["spec"]["schedule"])
    check_ray_job_spec(manifest["spec"]["jobTemplate"])
    assert "requests process" in manifest["spec"]["jobTemplate"]["entrypoint"]
    assert "AMNESIS_LEDGER_URL" in yaml.safe_load(manifest["spec"]["jobTemplate"]["runtimeEnvYAML"])["env_vars"]


def test_cluster_launcher():
    config = load("ray-cluster.yaml")
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers"):
        assert key in config, key
    assert config["provider"]["type"] and config["auth"]["ssh_user"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for node_type in types.values():
        assert {"node_config", "resources", "min_workers", "max_workers"} <= set(node_type)
        assert node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])


def test_runtime_env():
    runtime_env = load("runtime_env.yaml")
    assert set(runtime_env) <= RUNTIME_ENV_KEYS
    assert {"MLFLOW_TRACKING_URI", "AMNESIS_LEDGER_URL"} <= set(runtime_env["env_vars"])


@pytest.mark.parametrize("doc", ["docs/cluster.md", "README.md"])
def test_documented_commands_are_valid(doc):
    text = (ROOT / doc).read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#")[0].strip()
            if " -- unlearn " in line:
                line = "unlearn " + line.split(" -- unlearn ", 1)[1]
            if line.startswith("unlearn "):
                commands.append(line)
    assert commands, f"{doc} shows no unlearn command"
    for command in commands:
        check_unlearn_command(command)
