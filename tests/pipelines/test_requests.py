"""Deletion requests end to end: MLflow records and lineage, parallel PTN on Ray.

One local Ray session serves the whole module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

import unlearning
from pipelines.cli import main
from pipelines.options import ForgetOptions
from pipelines.ray_session import ensure_ray
from pipelines.request import prepare_request
from pipelines.search import SearchConfig
from tests.conftest import assert_parallel_ptn_is_the_sequential_walk
from unlearning.settling import AtLeast

PTN_CONFIG = Path(__file__).resolve().parents[2] / "tune_configs" / "ptn.yaml"

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


def cli(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_forget_is_recorded_in_mlflow_with_a_registered_version(tmp_path, capsys, digits_checkpoint):
    cli(capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--forget", "class:6",
        "--model-name", "digits-cnn", "--out", tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    entry = report["mlflow"]
    assert entry["model_name"] == "digits-cnn" and entry["model_version"] == "2" and entry["parent_version"] == "1"

    client = MlflowClient()
    run = client.get_run(entry["run_id"])
    assert run.data.params["method"] == "ptn"
    assert run.data.params["forget_size"] == str(report["forget"]["size"])
    assert run.data.params["forget_manifest_hash"] == report["forget"]["manifest_hash"]
    assert float(run.data.params["alpha"]) == pytest.approx(report["params"]["alpha"])
    assert run.data.metrics["forget_acc"] == report["metrics"]["forget_acc"]
    assert run.data.metrics["original_forget_acc"] == 1.0
    assert {"mia", "test_acc", "retain_acc", "seconds_importance", "seconds_unlearn"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(entry["run_id"])}
    assert {"checkpoint", "forget_ids.txt", "report.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(entry["run_id"], "checkpoint")} == {
        "checkpoint/model.json", "checkpoint/model.safetensors"}

    versions = {str(v.version): v for v in client.search_model_versions("name = 'digits-cnn'")}
    assert versions["1"].tags["role"] == "original"
    assert versions["1"].tags["fingerprint"] == unlearning.model_fingerprint(unlearning.load_model(digits_checkpoint))
    assert versions["2"].tags["parent_version"] == "1"
    assert versions["2"].tags["fingerprint"] == report["fingerprint"]
    assert str(client.get_model_version_by_alias("digits-cnn", "current").version) == "2"


def test_two_requests_in_a_row_give_a_lineage_of_two_versions(tmp_path, capsys, digits_checkpoint):
    cli(capsys, "forget", "--model", digits_checkpoint, "--data", "digits", "--forget", "class:1",
        "--model-name", "chain", "--out", tmp_path / "first")
    cli(capsys, "forget", "--model", "models:/chain@current", "--data", "digits", "--forget", "random:20",
        "--out", tmp_path / "second")
    first = json.loads((tmp_path / "first" / "report.json").read_text())
    second = json.loads((tmp_path / "second" / "report.json").read_text())
    assert second["mlflow"]["parent_version"] == first["mlflow"]["model_version"] == "2"
    assert second["mlflow"]["model_version"] == "3"
    assert second["removed_before"] == first["forget"]["size"]  # class 1 rows are gone from D_r

    history = json.loads(cli(capsys, "history", "--model-name", "chain", "--json"))
    assert [(r["version"], r["parent_version"], r["role"]) for r in history] == [
        ("1", "", "original"), ("2", "1", "unlearned"), ("3", "2", "unlearned")]
    assert history[-1]["current"] and history[2]["forget_spec"] == "random:20"
    text = cli(capsys, "history", "--model-name", "chain", "--ids")
    second_ids = (tmp_path / "second" / "forget_ids.txt").read_text().split()
    assert f"version 3 removed: {' '.join(second_ids)}" in text


@pytest.mark.parametrize("spec, ray_min_rows, start_divisor, precision", [
    ("class:5", 0, 25.0, "bf16"), ("random:40", 10_000, 25.0, "fp32"), ("class:5", 10_000, 0.2, "fp32")])
def test_parallel_ptn_equals_the_sequential_loop(digits_checkpoint, spec, ray_min_rows, start_divisor, precision):
    """D_f read through Ray Data and evened out across the actors (class:5), or decoded here;
    a start that already forgets (start_divisor 0.2: s_0 five times D_f's share; at 1 the
    digits model trained on this machine did not forget) walks back the same way on both; the
    actors predict in the request's inference precision (bf16), as this process does."""
    options = ForgetOptions(track=False, device="cpu", ray_min_rows=ray_min_rows, inference_precision=precision)
    prepared = prepare_request(str(digits_checkpoint), "digits", spec, options)
    config = SearchConfig(chunk_size=3, parallel=2, start_divisor=start_divisor)
    trials, parallel = assert_parallel_ptn_is_the_sequential_walk(prepared.task, config)
    assert (min(int(t["params"]["step"]) for t in trials) < 0) == (start_divisor < 1)
    # a class's ~90 rows a shard are two forwards: a step far from the target stops after the first
    assert any(isinstance(acc, AtLeast) for _, acc in parallel.path) == spec.startswith("class")


def test_ray_workers_run_at_the_drivers_priority():
    """Ray nices its workers to 15; the search's actors then lost to anything else running
    (ray_session.WORKER_NICENESS_ENV), so a local cluster's workers run at 0."""
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("a cluster's own environment sets its workers' niceness")
    assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == 0


def test_shard_moves_even_out_the_shards_a_streaming_split_dealt():
    """A streaming split deals whole blocks (e.g. 3,000 and 2,000 rows of a 5,000-row D_f);
    every search step waits for the largest shard, so rows move until shards differ by one at most."""
    from pipelines.search import shard_moves

    for counts in ([3000, 2000], [0, 181], [10, 0, 0], [0, 0, 10, 1], [2500, 2500]):
        after = list(counts)
        for giver, taker, rows in shard_moves(counts):
            assert rows > 0 and counts[giver] > after[giver] - rows >= 0
            after[giver], after[taker] = after[giver] - rows, after[taker] + rows
        assert sum(after) == sum(counts) and max(after) - min(after) <= 1
    assert shard_moves([2500, 2500]) == []


def test_search_command_with_tpe_logs_each_trial_as_a_nested_run(tmp_path, capsys, digits_checkpoint):
    config = tmp_path / "tpe.yaml"
    config.write_text("search: tpe\nnum_samples: 6\nparallel: 2\nretain_sample: 300\n")
    # six trials rarely find a setting that meets the target: the version is accepted anyway
    cli(capsys, "search", "--model", digits_checkpoint, "--data", "digits", "--forget", "class:2",
        "--search", config, "--model-name", "tpe", "--out", tmp_path / "run", "--accept-unmet")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["method"] == "tpe" and report["details"]["trials"] == 6
    assert 0.1 <= report["params"]["alpha"] <= 100 and 0.1 <= report["params"]["lambda"] <= 5
    client = MlflowClient()
    run = client.get_run(report["mlflow"]["run_id"])
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert len(children) == 6
    assert all("retain_acc" in child.data.metrics for child in children)


@pytest.mark.parametrize("text, message", [
    ("search: ptn\nchunks: 3\n", "unknown setting 'chunks'"),
    ("search: ptn\nrefine: 2\n", "refine must be true or false, got 2"),
    ("search: ptn\nsettle_early: sometimes\n", "settle_early must be true or false, got 'sometimes'"),
    ("search: ptn\nmax_retain_drop: 2\n", "max_retain_drop must be in [0, 1], got 2"),
])
def test_bad_search_config_is_refused(tmp_path, capsys, digits_checkpoint, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code = main(["--quiet", "search", "--model", str(digits_checkpoint), "--data", "digits", "--forget", "class:2",
                 "--search", str(config), "--out", str(tmp_path / "run")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_search_that_would_wreck_the_model_writes_nothing_and_says_what_it_would_cost(
    tmp_path, capsys, digits_checkpoint
):
    config = tmp_path / "harsh.yaml"
    config.write_text("search: ptn\ntarget: 0.5\n")  # unseen digits score ~98 %: 50 % needs a wrecked model
    code = main(["--quiet", "search", "--model", str(digits_checkpoint), "--data", "digits", "--forget", "random:200",
                 "--search", str(config), "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the "no --importance store" warning
    assert code == 2 and "points of retained accuracy" in error and "more than max_retain_drop=0.1;" in error
    assert not (tmp_path / "run").exists()


def test_a_rho_targets_slack_is_the_same_on_tune_as_in_process(poisoned_digits):
    """A poison request whose strict target breaks real target-class rows (tests/unlearning/
    test_rho_slack.py) takes the same looser target, and the same step, on the actors."""
    from pipelines.search import run_search
    from tests.unlearning.test_methods import make_task

    dataset, model = poisoned_digits
    in_process = unlearning.run_method("potion", make_task(dataset, model, "poison:identified"))
    config = SearchConfig(importance_kind="l2_norm", reference="retain", parallel=2, chunk_size=2)
    _, on_tune, trials = run_search(make_task(dataset, model, "poison:identified"), config)
    assert on_tune.params["target"] == in_process.params["target"] > in_process.details["slack"]["tried"][0]["target"]
    for key in ("alpha", "lambda", "step"):
        assert on_tune.params[key] == in_process.params[key]
    assert on_tune.details["slack"] == in_process.details["slack"]
    assert len(trials) > len(in_process.details["path"])  # every search's steps are recorded


def test_a_sub_class_search_reads_the_label_free_importance_on_tune_as_in_process():
    """Without importance_kind, `unlearn search` reads the request's kind, as `ptn` does:
    l2 for a sub-class (docs/methods.md#ptn-search), and takes the same answer."""
    from pipelines.search import run_search
    from tests.unlearning.test_methods import make_task
    from unlearning.checkpoint import model_meta
    from unlearning.training import TrainConfig, train

    dataset = unlearning.load_dataset("digits+coarse:0,1,2,3,4/5,6,7,8,9")
    model = unlearning.new_model("small_cnn", 2, dataset.input_shape, dataset.normalization(), seed=0)
    model_meta(model)["train_config"] = TrainConfig(epochs=5).to_dict()
    train(model, dataset.train, TrainConfig(epochs=5), dataset.normalization())
    in_process = unlearning.run_method("ptn", make_task(dataset, model, "subclass:7"))
    _, on_tune, _ = run_search(make_task(dataset, model, "subclass:7"), SearchConfig(parallel=2))
    assert on_tune.params["kind"] == in_process.params["kind"] == "l2"
    for key in ("alpha", "lambda", "step", "target"):
        assert on_tune.params[key] == in_process.params[key]
