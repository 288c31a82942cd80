"""`unlearn hyperforget train` on Ray (runs as tasks, Parquet shards kept across a kill, MLflow
record) and `unlearn forget --method hyperforget` end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from pipelines.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_on_ray_resume_and_forget(tmp_path, capsys, digits_checkpoint):
    small = ["--runs", "4", "--epochs", "3", "--steps", "200"]
    code, out, err = run(capsys, "hyperforget", "train", "--model", digits_checkpoint, "--data", "digits",
                         "--out", tmp_path / "hn", *small)
    assert code == 0, err
    assert "of 4 runs (0 found from before)" in out and "38282 parameters" in out
    shards = sorted((tmp_path / "hn.checkpoints").glob("run-*.parquet"))
    assert [s.name for s in shards] == [f"run-0000{i}.parquet" for i in range(4)]
    info = json.loads((tmp_path / "hn" / "hypernet.json").read_text())
    assert info["checkpoints"] == 4 * 3 and info["runs"] == 4  # a snapshot per epoch
    assert info["denoiser_workers"] == 2  # Ray Train, data parallel
    [found] = mlflow.search_runs(experiment_names=["amnesis"], filter_string="tags.kind = 'hyperforget-train'",
                                 output_format="list")
    assert found.data.params["runs"] == "4" and "train_seconds" in found.data.metrics

    # a kill after three runs: their shards stay, the fourth is run again
    shards[3].unlink()
    code, out, err = run(capsys, "hyperforget", "train", "--model", digits_checkpoint, "--data", "digits",
                         "--out", tmp_path / "hn2", "--checkpoints", tmp_path / "hn.checkpoints", "--no-track", *small)
    assert code == 0, err
    assert "of 4 runs (3 found from before)" in out

    code, out, err = run(capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--forget", "class:1",
                         "--method", "hyperforget", "--hypernet", tmp_path / "hn", "--out", tmp_path / "run",
                         "--ray-min-rows", "0")  # the samples are scored by the Ray evaluators
    assert code == 0, err
    assert "no --importance store" not in err  # hyperforget reads no importance
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["method"] == "hyperforget" and report["target_met"]
    assert report["metrics"]["test_forget_acc"] <= 0.05
    details = report["details"]
    assert details["samples"] == 4 and len(details["sample_retain_acc"]) == 4 and details["reached"]
    assert -10 < details["prompt_alignment"] <= 1 and len(details["achieved_losses"]) == 10
    assert report["params"]["hypernet"] == str(tmp_path / "hn")
    assert report["passes_on_ray"]  # D_f and the retained sample were read on Ray


def test_bad_hyperforget_requests(tmp_path, capsys, digits_checkpoint, untrained_digits_checkpoint):
    code, _, err = run(capsys, "hyperforget", "train", "--model", digits_checkpoint, "--data", "digits",
                       "--out", tmp_path / "hn", "--runs", "1")
    assert code == 2 and "--runs must be at least 2" in err and not (tmp_path / "hn").exists()
    code, _, err = run(capsys, "hyperforget", "train", "--model", untrained_digits_checkpoint, "--data", "digits",
                       "--out", tmp_path / "hn")
    assert code == 2 and "has none" in err
    code, _, err = run(capsys, "hyperforget", "train", "--model", digits_checkpoint, "--data", "digits",
                       "--out", tmp_path / "hn", "--workers", "1000")
    assert code == 2 and "--workers 1000" in err
    code, _, err = run(capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--forget", "class:1",
                       "--method", "hyperforget", "--out", tmp_path / "run", "--no-track")
    assert code == 2 and "needs a hypernetwork" in err and not (tmp_path / "run").exists()


def test_a_collection_killed_mid_way_goes_on_where_it_stopped(tmp_path, capsys, digits_checkpoint):
    """A real SIGKILL once two runs' shards have landed; the same command again runs the rest."""
    argv = ["hyperforget", "train", "--model", str(digits_checkpoint), "--data", "digits", "--out", str(tmp_path / "hn"),
            "--runs", "6", "--epochs", "3", "--steps", "50", "--in-process", "--no-track"]
    child = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    shards = tmp_path / "hn.checkpoints"
    deadline = time.monotonic() + 120
    while len(list(shards.glob("run-*.parquet"))) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = len(list(shards.glob("run-*.parquet")))
    assert child.returncode == -signal.SIGKILL and 2 <= done < 6 and not (tmp_path / "hn").exists()
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert f"of 6 runs ({done} found from before)" in out
    assert sorted(p.name for p in shards.iterdir()) == [f"run-0000{i}.parquet" for i in range(6)]  # no leftovers
