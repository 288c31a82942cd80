"""Nothing registered that did not unlearn, and registration last and once (issue #15): a
method that changed no weight writes nothing; a version that misses its forget-accuracy target
is recorded but `@current` stays (exit 3) unless --accept-unmet; a real SIGKILL at each step of
registration, then the same command again, gives one version and a complete run directory; a
full disk leaves nothing. (`requests process` under SIGKILL: tests/pipelines/test_ledger.py.)
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipelines.cli import main
from tests.pipelines.paused_process import start_paused

MODEL = "faults"
RUN_FILES = {"model.json", "model.safetensors", "forget_ids.txt", "report.json", "report.md", "per_class.png"}

pytestmark = pytest.mark.usefixtures("mlflow_store_made_once")


def forget_argv(checkpoint, out, *extra) -> list[str]:
    return ["--quiet", "forget", "--model", str(checkpoint), "--data", "digits", "--model-name", MODEL,
            "--out", str(out), *map(str, extra)]


# ssd with alpha 2, lambda 0.5 forgets class 1 (forget accuracy 0 %, target 1 %) in a second
FORGETS = ["--forget", "class:1", "--method", "ssd", "--alpha", "2", "--lambda", "0.5"]


def run(capsys, argv) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr's lines other than warnings) of `unlearn ARGV` in this process."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if ": warning: " not in line]


def recorded() -> tuple[list, list]:
    """(every MLflow run, every registered version) in this test's store."""
    client = MlflowClient()
    runs = [run for e in client.search_experiments() for run in client.search_runs([e.experiment_id])]
    return runs, client.search_model_versions()


def current_version() -> str:
    return str(MlflowClient().get_model_version_by_alias(MODEL, "current").version)


def leftovers(directory: Path) -> list[str]:
    """Staging files and directories a write left behind (hidden names)."""
    return sorted(p.name for p in directory.rglob(".*"))


# ---------------------------------------------------------------------- nothing that did not unlearn


def test_a_method_that_changes_no_weight_writes_and_registers_nothing(tmp_path, capsys, digits_checkpoint):
    """SSD at its defaults (alpha 10) selects no parameter of the digits model for class 3."""
    code, out, err = run(capsys, forget_argv(digits_checkpoint, tmp_path / "run", "--forget", "class:3", "--method", "ssd"))
    assert code == 2 and out == ""
    assert err == ["unlearn forget: error: ssd (alpha=10, lambda=1) changed no weight of the model; nothing was "
                   "written or registered (a smaller --alpha dampens more; the default method ptn searches for one)"]
    assert not (tmp_path / "run").exists() and leftovers(tmp_path) == []
    assert recorded() == ([], [])


def test_a_search_whose_target_the_rows_already_meet_writes_nothing_and_says_why(tmp_path, capsys, digits_checkpoint):
    """The digits model gets these 20 rows all right; at a target of 100 % PTN has nothing to
    do, its answer dampens no weight, and the request says so instead of registering a copy."""
    code, out, err = run(capsys, forget_argv(digits_checkpoint, tmp_path / "run", "--forget", "random:20",
                                             "--param", "target=1.0"))
    assert code == 2 and out == "" and len(err) == 1
    assert err[0].startswith("unlearn forget: error: ptn (") and "changed no weight of the model" in err[0]
    assert "(the forget set's accuracy is already at the target, 100.0 %, what a model that never saw " in err[0]
    assert not (tmp_path / "run").exists() and leftovers(tmp_path) == []
    assert recorded() == ([], [])


def test_a_version_that_misses_its_target_is_recorded_but_current_stays_unless_accepted(
    tmp_path, capsys, digits_checkpoint
):
    """SSD at its defaults changes the model on random:20 but leaves their accuracy at 100 %,
    above what retraining would give (the test accuracy on their classes)."""
    misses = ["--forget", "random:20", "--method", "ssd"]
    code, out, err = run(capsys, forget_argv(digits_checkpoint, tmp_path / "missed", *misses))
    assert code == 3 and err == []
    report = json.loads((tmp_path / "missed" / "report.json").read_text())
    assert report["target_met"] is False and report["metrics"]["forget_acc"] > report["target"] > 0.9
    assert (f"target NOT met: forget accuracy 100.0 % > target {100 * report['target']:.1f} %; registered as "
            "version 2 but @current stays at version 1 (--accept-unmet moves it)") in out
    client = MlflowClient()
    version = client.get_model_version(MODEL, "2")
    assert version.tags["target_met"] == "false" and version.tags["request_id"] == report["request_id"]
    run_data = client.get_run(version.run_id).data
    assert run_data.tags["amnesis.target_met"] == "false" and run_data.metrics["target_met"] == 0.0
    assert float(run_data.params["target"]) == pytest.approx(report["target"])
    assert current_version() == "1" and report["mlflow"]["current_version"] == "1"
    assert main(["--quiet", "history", "--model-name", MODEL]) == 0
    assert "random:20 (target NOT met)" in capsys.readouterr().out

    code, out, err = run(capsys, forget_argv(digits_checkpoint, tmp_path / "accepted", *misses, "--accept-unmet"))
    assert code == 0 and err == []
    assert "registered as version 3, @current moved to it (--accept-unmet)" in out
    assert current_version() == "3" and client.get_model_version(MODEL, "3").tags["parent_version"] == "1"

    code, out, _ = run(capsys, forget_argv(digits_checkpoint, tmp_path / "met", *FORGETS))
    assert code == 0 and "target met: forget accuracy 0.0 % <= target 1.0 %" in out
    assert current_version() == "4"


# ---------------------------------------------------------------------- a real SIGKILL at each step


def start_paused_cli(argv: list[str], step: str, tmp_path: Path) -> subprocess.Popen:
    """`unlearn ARGV` in a child process, stopped at `step` (see paused_process.py)."""
    marker = tmp_path / f"paused-{step}"
    return start_paused(["--cli", step, str(marker), *map(str, argv)], step, marker)


STEPS = ["written", "run_created", "version_registered", "recorded"]


@pytest.mark.parametrize("step", STEPS)
def test_forget_killed_at_any_step_of_registration_then_rerun_adopts_one_version(
    tmp_path, capsys, digits_checkpoint, step
):
    out = tmp_path / "run"
    argv = forget_argv(digits_checkpoint, out, *FORGETS)
    child = start_paused_cli(argv, step, tmp_path)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    written = json.loads((out / "report.json").read_text())  # the directory is in place at every step
    assert written["mlflow"] is None and written["target_met"] is True
    weights_written = (out / "model.safetensors").stat().st_mtime_ns

    code, _, err = run(capsys, forget_argv(digits_checkpoint, out, "--forget", "class:2", "--method", "ssd"))
    assert code == 2 and err == [f"unlearn forget: error: {out} already exists; choose a new output path "
                                 "(nothing is overwritten)"]  # another request is never adopted
    code, stdout, err = run(capsys, argv)
    assert code == 0 and err == []
    assert f"adopted {out}, written by an interrupted run of this request: recorded, not recomputed" in stdout

    report = json.loads((out / "report.json").read_text())
    assert report["request_id"] == written["request_id"] and report["fingerprint"] == written["fingerprint"]
    assert (out / "model.safetensors").stat().st_mtime_ns == weights_written  # not recomputed
    assert set(p.name for p in out.iterdir()) >= RUN_FILES and leftovers(tmp_path) == []
    runs, versions = recorded()
    unlearned = [v for v in versions if v.tags.get("role") == "unlearned"]
    assert len(unlearned) == 1, "one request, one version"
    (version,) = unlearned
    assert version.tags["request_id"] == report["request_id"] and version.tags["parent_version"] == "1"
    entry = report["mlflow"]
    assert (entry["model_version"], entry["current_version"], entry["adopted"]) == (str(version.version),) * 2 + (True,)
    assert current_version() == str(version.version) == "2"
    statuses = {run.info.run_id: run.info.status for run in runs if run.data.tags.get("amnesis.role") == "request"}
    assert statuses[version.run_id] == "FINISHED" and entry["run_id"] == version.run_id
    assert sorted(statuses.values()) == (["FINISHED", "KILLED"] if step == "run_created" else ["FINISHED"])
    artifact = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="report.json",
                                                   dst_path=str(tmp_path / "artifact"))
    assert json.loads(Path(artifact).read_text())["request_id"] == report["request_id"]

    code, _, err = run(capsys, argv)  # recorded now: the same command again is refused
    assert code == 2 and "already exists" in err[0] and len(recorded()[1]) == 2


# ---------------------------------------------------------------------- a full disk


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A directory on a 64 KiB tmpfs (the checkpoint alone is 150 KiB); where this process may
    not mount one, a directory where writing the checkpoint raises ENOSPC."""
    directory = tmp_path / "small-disk"
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)],
                             capture_output=True).returncode == 0
    if not mounted:
        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("unlearning.checkpoint.save_file", disk_full)
    try:
        yield directory
    finally:
        if mounted:
            subprocess.run(["umount", str(directory)], check=True)


def test_a_full_disk_leaves_nothing_written_or_registered(tmp_path, capsys, digits_checkpoint, full_disk):
    out = full_disk / "run"
    code, stdout, err = run(capsys, forget_argv(digits_checkpoint, out, *FORGETS))
    assert code == 2 and stdout == ""
    assert err == [f"unlearn forget: error: no space left on the device for {out} (the disk is full); "
                   "nothing was written or registered"]
    assert list(full_disk.iterdir()) == []  # no run directory, no staging directory
    assert recorded() == ([], [])
