"""A real multi-node Ray cluster on this machine: a head with no CPU and two 1-CPU nodes.

`unlearn forget --ray-min-rows 0` and `unlearn search` run against it (RAY_ADDRESS) from a
separate process, starting from `models:/NAME/VERSION`, and give what one process gives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main

pytestmark = pytest.mark.ray

REQUEST = ["--data", "digits", "--forget", "class:4", "--mode", "batch"]


@pytest.fixture(scope="module")
def cluster_address():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster.address
    finally:
        cluster.shutdown()
        Path("/tmp/ray/ray_current_cluster").unlink(missing_ok=True)  # Cluster leaves it behind


def on_cluster(address: str, *argv: str) -> dict:
    """An `unlearn` command in its own process, joined to the cluster; returns its report."""
    env = {**os.environ, "RAY_ADDRESS": address}
    command = [sys.executable, "-m", "pipelines.cli", "--quiet", *argv]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "report.json").read_text())


def locally(capsys, *argv: str) -> dict:
    code = main(["--quiet", *argv])
    assert code == 0, capsys.readouterr().err
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "report.json").read_text())


def assert_same_metrics(remote: dict, local: dict) -> None:
    for key in ("retain_acc", "forget_acc", "test_acc", "mia"):
        assert abs(remote["metrics"][key] - local["metrics"][key]) <= 1e-6, key


def test_forget_on_a_multi_node_cluster_equals_the_local_run(cluster_address, digits_checkpoint, tmp_path, capsys):
    local = locally(capsys, "forget", "--model", str(digits_checkpoint), *REQUEST, "--method", "ssd",
                    "--alpha", "10", "--lambda", "1", "--model-name", "multi", "--out", str(tmp_path / "local"))
    assert local["mlflow"]["parent_version"] == "1"  # the original, registered as version 1
    remote = on_cluster(cluster_address, "forget", "--model", "models:/multi/1", *REQUEST, "--method", "ssd",
                        "--alpha", "10", "--lambda", "1", "--ray-min-rows", "0", "--no-track",
                        "--out", str(tmp_path / "remote"))
    runs = remote["importance"]["on_ray"]
    assert sorted(run["rows"] for run in runs) == [remote["forget"]["size"], 1438]  # D_f and D, on Ray
    assert all(run["workers"] == 2 for run in runs)
    assert_same_metrics(remote, local)


def test_search_on_a_multi_node_cluster_finds_the_local_walks_answer(
    cluster_address, digits_checkpoint, tmp_path, capsys
):
    local = locally(capsys, "forget", "--model", str(digits_checkpoint), *REQUEST, "--method", "ptn",
                    "--no-track", "--out", str(tmp_path / "local"))
    main(["--quiet", "forget", "--model", str(digits_checkpoint), *REQUEST, "--method", "ssd",
          "--model-name", "multi-search", "--out", str(tmp_path / "register")])
    remote = on_cluster(cluster_address, "search", "--model", "models:/multi-search/1", *REQUEST,
                        "--search", "ptn", "--ray-min-rows", "0", "--no-track", "--out", str(tmp_path / "remote"))
    assert (remote["params"]["alpha"], remote["params"]["lambda"]) == (local["params"]["alpha"], local["params"]["lambda"])
    assert remote["params"]["step"] == local["params"]["step"]
    assert_same_metrics(remote, local)
