"""A forget request sent to a real local Ray head with `ray job submit`.

The module starts its own head on loopback (`ray start --head --block`) and stops only that
head (SIGINT to its process), never `ray stop`, which would end every Ray process here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.pipelines.process_groups import group_gone, stop_group

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env() -> dict:
    # the job supervisor inherits the head's environment: `unlearn` must be on its PATH
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on loopback in a `ray start --block` process of its own; SIGINT stops just it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    dashboard = free_port()
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               # the job agent's HTTP port too: its default (52365) is taken by any other Ray on the machine
               "--dashboard-agent-listen-port", str(free_port()),
               "--num-cpus", "2", "--disable-usage-stats"]
    log = open(tmp_path_factory.mktemp("ray-head") / "ray-start.log", "w")
    head = subprocess.Popen(command, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_dashboard(head, dashboard)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_head(head)
        log.close()


def stop_head(head: subprocess.Popen) -> None:
    """SIGINT: `ray start --block` stops the processes it started. After jobs ran that shutdown
    has hung for minutes (120 s in a CI run), so after 15 s what is left of the head's own
    process group (raylet, GCS, dashboard, workers) is stopped as a group."""
    head.send_signal(signal.SIGINT)
    if not group_gone(head, 15):
        stop_group(head, 10)


def wait_for_dashboard(head: subprocess.Popen, port: int, timeout: float = 180) -> None:
    """Until the head's dashboard (the job server) accepts connections on loopback."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head ended early"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            time.sleep(1)
    raise AssertionError("the Ray head's dashboard never answered")


def ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=ray_env(), capture_output=True, text=True, timeout=timeout)


def submit(address: str, working_dir: Path, env_vars: dict, entrypoint: list[str]) -> str:
    """`ray job submit --no-wait`; returns the submission id."""
    args = ["job", "submit", "--no-wait", "--address", address, "--working-dir", str(working_dir),
            "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", *entrypoint]
    for _ in range(24):  # the job agent registers some seconds after `ray start` returns
        result = ray_cli(*args)
        if result.returncode == 0:
            return re.search(r"raysubmit_\w+", result.stdout + result.stderr).group(0)
        assert "No available agent" in result.stdout + result.stderr, result.stdout[-2000:] + result.stderr[-2000:]
        time.sleep(5)
    raise AssertionError("the job agent never came up")


def wait_for(address: str, job_id: str, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = ray_cli("job", "status", "--address", address, job_id).stdout.upper()
        for state in ("SUCCEEDED", "FAILED", "STOPPED"):
            if state in text:
                return state
        time.sleep(3)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_forget_job_submitted_to_a_ray_head_succeeds_and_is_recorded(ray_head, tmp_path, digits_checkpoint):
    working_dir = tmp_path / "job"
    (working_dir / "requests").mkdir(parents=True)
    (working_dir / "requests" / "ids.txt").write_text("0\n1\n2\n3\n4\n")  # ships with the job
    uri = f"sqlite:///{tmp_path / 'job-mlflow.db'}"
    out = tmp_path / "job-run"
    job_id = submit(
        ray_head, working_dir, {"MLFLOW_TRACKING_URI": uri},
        ["unlearn", "--quiet", "forget", "--model", str(digits_checkpoint), "--data", "digits",
         "--forget", "requests/ids.txt", "--model-name", "job-model", "--out", str(out)],
    )
    state = wait_for(ray_head, job_id)
    logs = ray_cli("job", "logs", "--address", ray_head, job_id).stdout
    assert state == "SUCCEEDED", logs[-3000:]
    assert "forgot 5 samples" in logs

    report = json.loads((out / "report.json").read_text())
    assert report["forget"]["size"] == 5 and report["method"] == "ptn"
    assert (out / "model.safetensors").exists() and (out / "report.md").exists()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["forget_size"] == "5"
    assert run.data.metrics["forget_acc"] == report["metrics"]["forget_acc"]
    version = client.get_model_version_by_alias("job-model", "current")
    assert str(version.version) == report["mlflow"]["model_version"] == "2"


WORKER_SCRIPT = """
import logging

import ray

from pipelines.ray_session import ensure_ray


@ray.remote(num_cpus=0.1)
def speak():
    print("printed by a worker")
    logging.getLogger("pipelines.worker").warning("logged by a worker")


ensure_ray()  # joins the job's cluster (RAY_ADDRESS is set for every job driver)
ray.get(speak.remote())
"""


def test_what_workers_print_or_log_shows_in_ray_job_logs(ray_head, tmp_path):
    working_dir = tmp_path / "job"
    working_dir.mkdir()
    (working_dir / "speak.py").write_text(WORKER_SCRIPT)
    job_id = submit(ray_head, working_dir, {}, ["python", "speak.py"])
    state = wait_for(ray_head, job_id, timeout=300)
    logs = ray_cli("job", "logs", "--address", ray_head, job_id).stdout
    assert state == "SUCCEEDED", logs[-3000:]
    assert "printed by a worker" in logs and "logged by a worker" in logs
