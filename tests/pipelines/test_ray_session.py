"""Starting Ray: a command without RAY_ADDRESS starts its own local cluster, whatever else runs.

Each test starts Ray in a child process (a Ray session belongs to its process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where `ray start` records its address
START = "from pipelines.ray_session import ensure_ray; print(int(ensure_ray()['CPU']))"


def test_a_stale_current_cluster_file_neither_crashes_nor_is_joined():
    """`ray.init()` would join the recorded (dead) cluster and refuse num_cpus; ours starts anew."""
    saved = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
    CURRENT_CLUSTER.parent.mkdir(parents=True, exist_ok=True)
    CURRENT_CLUSTER.write_text("127.0.0.1:1\n")  # nobody listens on port 1
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        result = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True, env=env, timeout=180)
    finally:
        if saved is None:
            CURRENT_CLUSTER.unlink(missing_ok=True)
        else:
            CURRENT_CLUSTER.write_text(saved)
    assert result.returncode == 0, result.stderr[-1500:]
    assert int(result.stdout.split()[-1]) >= 1


def test_an_impossible_worker_count_is_refused_in_one_line(untrained_digits_checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "pipelines.cli", "--quiet", "importance", "--model",
               str(untrained_digits_checkpoint), "--data", "digits", "--out", str(tmp_path / "store"),
               "--workers", "1000", "--ray-min-rows", "0"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unlearn importance: error: --workers 1000: the Ray cluster has")
    assert lines[0].endswith("workers can run")
    assert not (tmp_path / "store").exists()
