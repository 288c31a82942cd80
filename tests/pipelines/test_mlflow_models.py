"""Registered versions are MLflow models: both flavors load them and predict what the checkpoint
predicts, `mlflow models serve` answers on loopback, and the request's run carries its data as
inputs and the PTN walk as metric history.

One request (`unlearn forget` on digits, in-process: no Ray) serves the whole module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import unlearning
from pipelines.cli import main
from tests.pipelines.process_groups import stop_group

MODEL = "digits-served"
CURRENT = f"models:/{MODEL}@current"


@pytest.fixture(scope="module")
def request_store(tmp_path_factory, digits_checkpoint):
    """A store holding the original (version 1) and one request forgetting class 3 (version 2)."""
    root = tmp_path_factory.mktemp("mlflow-models")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)
        mlflow.set_tracking_uri(uri)
        code = main(["--quiet", "forget", "--model", str(digits_checkpoint), "--data", "digits", "--forget",
                     "class:3", "--model-name", MODEL, "--out", str(root / "run")])
        mlflow.set_tracking_uri(None)
    assert code == 0
    return root, uri


@pytest.fixture
def store(request_store, monkeypatch):
    """Point this test (after conftest's own isolated store) at the module's store."""
    root, uri = request_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(root)
    mlflow.set_tracking_uri(uri)
    return root


def checkpoint_logits(checkpoint, digits) -> tuple[torch.Tensor, torch.Tensor]:
    """(every normalised digits test row, the checkpoint's logits on them)."""
    model = unlearning.load_model(checkpoint).eval()
    normalize = model.amnesis_meta["normalize"]
    rows = torch.cat([x for x, _ in digits.test.batches(512, normalize=normalize)])
    with torch.no_grad():
        return rows, model(rows)


@pytest.mark.parametrize("version", ["1", "@current"])
def test_every_registered_version_loads_in_both_flavors_and_predicts_what_its_checkpoint_predicts(
    store, digits, digits_checkpoint, version
):
    uri = CURRENT if version == "@current" else f"models:/{MODEL}/{version}"
    checkpoint = store / "run" if version == "@current" else digits_checkpoint
    rows, expected = checkpoint_logits(checkpoint, digits)
    assert len(rows) == len(digits.test) > 300

    with torch.no_grad():
        assert torch.equal(mlflow.pytorch.load_model(uri)(rows), expected)
    predicted = mlflow.pyfunc.load_model(uri).predict(rows.numpy())
    assert predicted.dtype == np.float32 and np.array_equal(predicted, expected.numpy())

    info = mlflow.models.get_model_info(uri)
    assert {"pytorch", "python_function"} <= set(info.flavors)
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 8, 8)
    assert info.signature.outputs.inputs[0].shape == (-1, 10)
    assert info.saved_input_example_info["type"] == "ndarray"
    meta = json.loads((Path(checkpoint) / "model.json").read_text())
    assert info.metadata["amnesis"]["fingerprint"] == meta["fingerprint"]
    assert info.metadata["amnesis"]["normalize"] == meta["normalize"]


def test_input_example_is_real_test_rows_normalised_as_the_model_expects(store, digits):
    local = mlflow.artifacts.download_artifacts(CURRENT)
    example = mlflow.models.Model.load(local).load_input_example(local)
    rows, _ = checkpoint_logits(store / "run", digits)
    assert example.dtype == np.float32 and example.shape[1:] == (1, 8, 8) and len(example) > 1
    assert np.array_equal(example, rows[: len(example)].numpy())


def test_registered_version_keeps_its_checkpoint_and_lineage_tags(store):
    from pipelines.tracking import resolve_model

    client = MlflowClient()
    version = client.get_model_version_by_alias(MODEL, "current")
    assert version.source.startswith("models:/m-")  # the logged model, not a plain folder
    assert {a.path for a in client.list_artifacts(version.run_id, "checkpoint")} == {
        "checkpoint/model.json", "checkpoint/model.safetensors"}
    report = json.loads((store / "run" / "report.json").read_text())
    assert version.tags["parent_version"] == "1" and version.tags["request_run_id"] == version.run_id
    assert version.tags["fingerprint"] == report["fingerprint"]
    assert version.tags["forget_manifest_hash"] == report["forget"]["manifest_hash"]
    path, info = resolve_model(CURRENT)
    assert info["version"] == "2"
    assert unlearning.model_fingerprint(unlearning.load_model(path)) == report["fingerprint"]


def test_a_version_registered_as_a_plain_checkpoint_folder_still_resolves(digits_checkpoint):
    """Stores written before versions were MLflow models: source = the run's checkpoint folder."""
    from pipelines.tracking import resolve_model

    client = MlflowClient()
    mlflow.set_experiment("legacy")  # this test's own store (conftest), not the module's
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(digits_checkpoint), artifact_path="checkpoint")
    client.create_registered_model("legacy")
    client.create_model_version("legacy", source=f"{run.info.artifact_uri}/checkpoint", run_id=run.info.run_id)
    path, info = resolve_model("models:/legacy/1")
    assert info["version"] == "1"
    assert unlearning.model_fingerprint(unlearning.load_model(path)) == unlearning.model_fingerprint(
        unlearning.load_model(digits_checkpoint))


def test_training_data_and_forget_set_are_run_inputs_with_their_digests(store):
    report = json.loads((store / "run" / "report.json").read_text())
    run = MlflowClient().get_run(report["mlflow"]["run_id"])
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert inputs["training"].digest == report["data"]["fingerprint"] and inputs["training"].name == "digits"
    assert inputs["forget"].digest == report["forget"]["manifest_hash"]


def test_ptn_walk_is_metric_history_on_the_request_run_and_history_reads_it_back(store, capsys):
    report = json.loads((store / "run" / "report.json").read_text())
    path = report["details"]["path"]
    assert len(path) > 3 and report["details"]["reached"]
    client = MlflowClient()
    run = client.get_run(report["mlflow"]["run_id"])
    history = client.get_metric_history(run.info.run_id, "walk/forget_acc")
    assert [(m.step, m.value) for m in history] == [(p["index"], p["forget_acc"]) for p in path]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "walk/alpha")] == [p["alpha"] for p in path]
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert children == []  # no nested run per step

    assert main(["--quiet", "history", "--model-name", MODEL, "--walk", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["walk"] == []
    assert [(s["step"], s["alpha"], s["lambda"], s["forget_acc"]) for s in rows[1]["walk"]] == [
        (p["index"], p["alpha"], p["lam"], p["forget_acc"]) for p in path]
    assert main(["--quiet", "history", "--model-name", MODEL, "--walk"]) == 0
    assert "version 2 walk:" in capsys.readouterr().out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_mlflow_models_serve_answers_an_http_request_on_loopback(store, digits):
    rows, expected = checkpoint_logits(store / "run", digits)
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # `mlflow` and the `uvicorn` it starts
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = store / "serve.log"
    command = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", CURRENT, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "w") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"the server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no answer on /ping: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": rows.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = np.array(json.loads(answer.read())["predictions"], dtype=np.float32)
    finally:
        stop_group(server, 30)  # the server and the uvicorn worker it started
    assert predictions.shape == tuple(expected.shape)
    np.testing.assert_allclose(predictions, expected.numpy(), rtol=0, atol=1e-5)
    assert np.array_equal(predictions.argmax(1), expected.argmax(1).numpy())
