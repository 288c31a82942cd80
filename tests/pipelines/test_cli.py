"""The `unlearn` command line in one process: train, evaluate, forget, bad input, and its
conventions (--version, global flags anywhere, help on every option, logging, plotting)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest

import unlearning
from pipelines.cli import build_parser, command_parsers, main
from unlearning.checkpoint import model_meta
from unlearning.methods import METHODS


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--quiet", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_forget_evaluate_round_trip(tmp_path, capsys):
    code, out, _ = run(capsys, "train", "--data", "digits", "--epochs", "20", "--out", tmp_path / "m")
    assert code == 0 and "test acc 0.9" in out
    code, out, err = run(capsys, "forget", "--model", tmp_path / "m", "--data", "digits", "--forget", "class:4", "--out", tmp_path / "run")
    assert code == 0, err
    # a logged warning tells the user a store would make the next request cheaper
    assert "unlearn forget: warning: no --importance store given" in err and "`unlearn importance`" in err
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


def test_train_in_bf16_records_its_recipe(tmp_path, capsys):
    code, out, err = run(capsys, "train", "--data", "digits", "--epochs", "20", "--precision", "bf16",
                         "--out", tmp_path / "m")
    assert code == 0 and "test acc 0.9" in out, err  # bf16 autocast learns digits as fp32 does
    meta = model_meta(unlearning.load_model(tmp_path / "m"))
    assert meta["train_config"]["precision"] == "bf16"  # retrain in a request follows the same recipe


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


def test_a_bf16_request_predicts_in_bf16_and_says_so(tmp_path, capsys, digits_checkpoint):
    """Every accuracy of the report comes from bf16 outcome passes, recorded in report.json and MLflow."""
    from mlflow import MlflowClient

    from unlearning.data import split_forget
    from unlearning.passes import LocalExecutor

    code, _, err = run(capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--forget", "class:2",
                       "--inference-precision", "bf16", "--out", tmp_path / "run")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["inference_precision"] == "bf16"
    model = unlearning.load_model(tmp_path / "run")
    dataset = unlearning.load_dataset("digits")
    _, forget = split_forget(dataset, unlearning.parse_forget("class:2", dataset))
    normalize = model_meta(model)["normalize"]
    [bf16] = LocalExecutor(precision="bf16").outcomes([model], forget, normalize)
    assert report["metrics"]["forget_acc"] == bf16.accuracy(forget.labels)
    run_id = report["mlflow"]["run_id"]
    assert MlflowClient().get_run(run_id).data.params["inference_precision"] == "bf16"


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
    lines = [line for line in err.strip().splitlines() if ": warning: " not in line]
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_an_unknown_inference_precision_is_one_line_from_argparse(tmp_path, capsys, digits_checkpoint):
    with pytest.raises(SystemExit) as stopped:
        main(["--quiet", "forget", "--model", str(digits_checkpoint), "--data", "digits", "--forget", "class:1",
              "--inference-precision", "fp16", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1
    assert "argument --inference-precision: invalid choice: 'fp16'" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_empty_and_foreign_id_files(tmp_path, capsys, digits_checkpoint):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run(capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--forget", tmp_path / "empty.txt", "--out", tmp_path / "run")
    assert code == 2 and "is empty" in err
    (tmp_path / "foreign.txt").write_text("999999\n")
    code, _, err = run(capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--forget", tmp_path / "foreign.txt", "--out", tmp_path / "run")
    assert code == 2 and "not in the training data: [999999]" in err
    assert not (tmp_path / "run").exists()


def test_import_of_weights_trained_elsewhere(tmp_path, capsys, digits_model):
    """`unlearn import` gives the checkpoint save_model gives; bad weights are one line."""
    import torch

    torch.save({"state_dict": digits_model.state_dict()}, tmp_path / "w.pt")
    normalize = digits_model.amnesis_meta["normalize"]
    base = ["import", "--factory", "small_cnn", "--weights", tmp_path / "w.pt", "--input-shape", "1,8,8",
            "--mean", normalize["mean"][0], "--std", normalize["std"][0]]
    code, out, err = run(capsys, *base, "--data", "digits", "--out", tmp_path / "ck")
    assert code == 0, err
    assert "10 classes" in out and "test acc 0.9" in out
    imported = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert imported["fingerprint"] == __import__("unlearning").model_fingerprint(digits_model)
    assert imported["normalize"] == normalize

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"state_dict": digits_model.state_dict(), "extra": Payload()}, tmp_path / "pickled.pt")
    for argv, message in [
        ([*base[:4], tmp_path / "pickled.pt", *base[5:]], "weights_only=True"),
        ([*base[:2], "small_cnn", "--factory-arg", "width=4", *base[3:]], "does not fit the network small_cnn"),
        ([*base[:2], "shutil:rmtree", *base[3:]], "must be a torch.nn.Module subclass"),
        ([*base, "--data", "digits+coarse:0,1/2,3,4,5,6,7,8,9"], "has 2 of shape"),
        ([*base[:-2]], "--mean and --std go together"),
    ]:
        code, _, err = run(capsys, *argv, "--out", tmp_path / "bad")
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
        assert not (tmp_path / "bad").exists()


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


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"unlearn {version('amnesis')}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--quiet", "--verbose", "history", "--model-name", "m"],
        ["history", "--model-name", "m", "--quiet", "--verbose"],
        ["-q", "history", "--model-name", "m", "-v"],
        ["requests", "list", "--quiet", "--verbose"],
        ["requests", "--quiet", "list", "--verbose"],
    ],
)
def test_global_flags_are_accepted_before_and_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.verbose is True


def test_global_flags_default_to_off_wherever_they_could_be_given():
    for argv in (["history", "--model-name", "m"], ["requests", "list"]):
        args = build_parser().parse_args(argv)
        assert args.quiet is False and args.verbose is False


def test_every_option_of_every_command_has_help():
    parsers = [build_parser(), *command_parsers(build_parser())]
    assert len(parsers) > 12  # the top, every command and every `requests` action were walked
    missing = []
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{parser.prog} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


@pytest.mark.parametrize("command", [["forget"], ["search"], ["requests", "process"]])
def test_method_help_lists_every_registered_method_with_its_summary(command):
    parser = next(p for p in command_parsers(build_parser()) if p.prog == " ".join(["unlearn", *command]))
    text = " ".join(parser.format_help().split())  # wrapping undone
    assert "--method METHOD a registered method (default: ptn" in text
    listing = text.split("methods (--method):", 1)[1]
    for name, method in METHODS.items():
        assert f" {name} {' '.join(method.summary.split())}" in listing, name


def test_diagnostics_are_logged_to_stderr_and_verbose_shows_the_projects_info_lines(tmp_path, capsys):
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert main(["requests", "list", "--ledger", ledger]) == 0
    assert capsys.readouterr().err == ""
    assert main(["requests", "list", "--ledger", ledger, "--verbose"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"unlearn requests: info: [pipelines.ledger] request ledger: {ledger}"]


def test_a_library_call_that_draws_plots_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """The report's plots are drawn without pyplot; only the CLI picks a backend (MPLBACKEND)."""
    script = f"""
import matplotlib, sys
matplotlib.use("svg")  # the caller's choice, e.g. a notebook's
from pipelines.report_page import plot_search_path
curve = [{{"index": i, "alpha": 1.0, "lam": 1.0, "forget_acc": 1 - i / 4, "retain_acc": 0.9, "chosen": i == 3}}
         for i in range(5)]
plot_search_path(curve, 0.01, {str(tmp_path / "path.png")!r})
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["svg", "False"]
    assert (tmp_path / "path.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_walk_back_is_recorded_at_the_step_it_chose(tmp_path, capsys, digits_checkpoint):
    """start_divisor 0.2 over-forgets at step 0, so the walk goes back below it: the report,
    the MLflow run's parameters (alpha, lambda, s of the chosen step) and the walk's metric
    history (at negative ladder steps) all say where it landed."""
    from mlflow.tracking import MlflowClient

    code, _, err = run(capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--forget", "class:3",
                       "--param", "start_divisor=0.2", "--out", tmp_path / "run")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    chosen = next(c for c in report["details"]["candidates"] if c["chosen"])
    assert report["params"]["step"] == chosen["index"] < 0 and report["params"]["lambda"] == chosen["lam"]
    client = MlflowClient()
    params = client.get_run(report["mlflow"]["run_id"]).data.params
    assert float(params["s"]) == pytest.approx(chosen["s"]) and float(params["alpha"]) == pytest.approx(chosen["alpha"])
    history = client.get_metric_history(report["mlflow"]["run_id"], "walk/forget_acc")
    assert sorted(m.step for m in history) == sorted(p["index"] for p in report["details"]["path"])
