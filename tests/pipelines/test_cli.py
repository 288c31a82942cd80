"""The `unlearn` command line in one process: train, evaluate, forget, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipelines.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--quiet", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_forget_evaluate_round_trip(tmp_path, capsys):
    code, out, _ = run(capsys, "train", "--data", "digits", "--epochs", "20", "--out", tmp_path / "m")
    assert code == 0 and "test acc 0.9" in out
    code, out, err = run(capsys, "forget", "--model", tmp_path / "m", "--data", "digits", "--forget", "class:4", "--out", tmp_path / "run")
    assert code == 0, err
    assert "unlearn importance" in err  # tells the user a store would make the next request cheaper
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["method"] == "ptn" and report["details"]["reached"]
    assert report["metrics"]["test_forget_acc"] <= 0.05
    assert report["original_metrics"]["test_forget_acc"] >= 0.9
    assert report["metrics"]["test_retain_acc"] >= report["original_metrics"]["test_retain_acc"] - 0.02
    assert set(report["seconds"]) == {"importance", "unlearn", "total"}
    assert 0 <= report["metrics"]["mia"] <= 1
    ids = (tmp_path / "run" / "forget_ids.txt").read_text().split()
    assert len(ids) == report["forget"]["size"]
    code, out, _ = run(capsys, "evaluate", "--model", tmp_path / "run", "--data", "digits", "--forget", "class:4", "--out", tmp_path / "eval.json")
    assert code == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["forget_acc"] == report["metrics"]["forget_acc"]
    assert json.loads(out) == evaluated


def test_fixed_alpha_lambda_method_with_zrf(tmp_path, capsys, digits_checkpoint):
    code, out, err = run(
        capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--forget", "class:1",
        "--method", "ssd", "--alpha", "2", "--lambda", "0.5", "--zrf", "--out", tmp_path / "run",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["params"] == {"alpha": 2.0, "lambda": 0.5, "kind": "fisher"}
    # a confident original is far from a random network on D_f; ZRF is a similarity in [0, 1]
    assert 0 <= report["original_metrics"]["zrf"] < 0.5 and 0 <= report["metrics"]["zrf"] <= 1
    assert "ZRF" in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--forget", "class:12"], "class 12 is out of range"),
        (["--forget", "random:0"], "N must be between"),
        (["--forget", "class:1", "--method", "ssd", "--alpha", "0"], "alpha must be a finite number > 0"),
        (["--forget", "class:1", "--method", "ssd", "--lambda", "-1"], "lambda must be a finite number > 0"),
        (["--forget", "class:1", "--method", "nope"], "unknown method 'nope'"),
        (["--forget", "class:1", "--workers", "0"], "--workers must be at least 1, got 0"),
        (["--forget", "class:1", "--ray-min-rows", "-5"], "--ray-min-rows must be 0 or more, got -5"),
    ],
)
def test_bad_requests_fail_with_one_line_and_write_nothing(tmp_path, capsys, digits_checkpoint, extra, message):
    code, _, err = run(capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--out", tmp_path / "run", *extra)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_empty_and_foreign_id_files(tmp_path, capsys, digits_checkpoint):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run(capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--forget", tmp_path / "empty.txt", "--out", tmp_path / "run")
    assert code == 2 and "is empty" in err
    (tmp_path / "foreign.txt").write_text("999999\n")
    code, _, err = run(capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--forget", tmp_path / "foreign.txt", "--out", tmp_path / "run")
    assert code == 2 and "not in the training data: [999999]" in err
    assert not (tmp_path / "run").exists()


def test_output_over_the_input_model_is_refused(capsys, digits_checkpoint):
    before = (digits_checkpoint / "model.safetensors").read_bytes()
    code, _, err = run(capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--forget", "class:1", "--out", digits_checkpoint)
    assert code == 2 and "already exists" in err
    assert (digits_checkpoint / "model.safetensors").read_bytes() == before


def test_truncated_checkpoint_through_the_console_script(tmp_path, digits_checkpoint):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(digits_checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "forget", "--model", str(broken), "--data", "digits",
         "--forget", "class:1", "--out", str(tmp_path / "run")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("unlearn forget: error:")
    assert "corrupt or truncated" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
