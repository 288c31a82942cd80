"""Shared fixtures: one small trained digits model per test session (a few seconds on CPU),
small data sets of every source kind, and the guard that keeps Ray out of unmarked tests."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import unlearning
from unlearning.checkpoint import model_meta
from unlearning.training import DEFAULT_RECIPES, train


@pytest.fixture(scope="session")
def digits():
    return unlearning.load_dataset("digits")


@pytest.fixture(scope="session")
def digits_model(digits):
    """small_cnn trained on digits with the default recipe, seed 0 (~99 % test accuracy)."""
    torch.manual_seed(0)
    normalize = digits.normalization()
    model = unlearning.new_model("small_cnn", 10, digits.input_shape, normalize, seed=0)
    model_meta(model)["train_config"] = DEFAULT_RECIPES["small_cnn"].to_dict()
    train(model, digits.train, DEFAULT_RECIPES["small_cnn"], normalize)
    return model


@pytest.fixture(scope="session")
def poisoned_digits():
    """(data set, model): digits with 5 % of its training rows poisoned (docs/methods.md#poison,
    drawn from every class, so the identified half, 36 rows, holds 4 real zeros), small_cnn
    trained on it with the default recipe, seed 0."""
    dataset = unlearning.load_dataset("digits+poison:rate=0.05,identified=0.5,seed=0")
    normalize = dataset.normalization()
    model = unlearning.new_model("small_cnn", 10, dataset.input_shape, normalize, seed=0)
    model_meta(model)["train_config"] = DEFAULT_RECIPES["small_cnn"].to_dict()
    train(model, dataset.train, DEFAULT_RECIPES["small_cnn"], normalize)
    return dataset, model


@pytest.fixture(scope="session")
def digits_checkpoint(digits_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "digits-cnn"
    unlearning.save_model(digits_model, path)
    return path


@pytest.fixture(scope="session")
def digits_hypernet(digits, digits_model, tmp_path_factory):
    """A tiny HyperForget hypernetwork for `digits_model` (4 runs of 2 epochs, 100 denoiser steps):
    enough for the tests that run every method; tests/unlearning/test_hyperforget.py tests it."""
    from dataclasses import replace

    from unlearning.hyperforget import (
        HypernetConfig,
        collect_run,
        plan_runs,
        probe_rows,
        save_hypernet,
        train_hypernet,
    )
    from unlearning.training import TrainConfig

    config = replace(TrainConfig(**model_meta(digits_model)["train_config"]), epochs=2)
    probe_ids = probe_rows(digits)
    probe = digits.train.subset(digits.index_of(probe_ids))
    snapshots, left_out = [], []
    for plan in plan_runs(10, 4):
        found = collect_run(digits_model, digits, plan, config, probe, every=12)
        snapshots += found
        left_out += [plan.left_out] * len(found)
    final = torch.tensor([i + 1 == len(snapshots) or snapshots[i + 1]["step"] < s["step"]
                          for i, s in enumerate(snapshots)])
    net = train_hypernet(torch.stack([s["params"] for s in snapshots]), torch.stack([s["losses"] for s in snapshots]),
                         final, left_out, probe_ids, HypernetConfig(steps=100),
                         {"arch": "small_cnn", "parameters": snapshots[0]["params"].numel()})
    path = tmp_path_factory.mktemp("hypernet") / "digits-hypernet"
    save_hypernet(net, path)
    return path


def method_params(method: str, request) -> dict:
    """What a method needs besides the task in the tests that run every method: hyperforget its
    hypernetwork."""
    return {"hypernet": str(request.getfixturevalue("digits_hypernet"))} if method == "hyperforget" else {}


def state_copy(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_state_equal(model, state):
    current = model.state_dict()
    assert current.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(current[name], tensor), f"{name} changed"


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch):
    """Each test gets its own MLflow store (never the working directory's mlflow.db)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # the process-wide default too, not only child processes'
    monkeypatch.chdir(tmp_path)  # artifacts of a sqlite store land under ./mlruns
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True)
def no_ray_unless_marked(request, monkeypatch):
    """A test that starts Ray must be in a module marked `ray` (so `-m "not ray"` starts none)."""
    if request.node.get_closest_marker("ray") is not None:
        return
    try:
        import ray
    except ImportError:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts Ray but is not marked `ray`")

    monkeypatch.setattr(ray, "init", refuse)


# ---------------------------------------------------------------- small data sets of every kind


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def image_table(n: int, seed: int) -> pa.Table:
    """n rows of random 3x8x8 PNGs with ids 1000*seed + i and labels 0..9."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64) + 1000 * seed),
            "label": pa.array(rng.integers(0, 10, size=n).astype(np.int64)),
            "image": pa.array([png(image) for image in images], type=pa.binary()),
        }
    )


@pytest.fixture(scope="session")
def parquet_file(tmp_path_factory):
    """200 rows of 3x8x8 PNGs in row groups of 50; its training split is 160 rows."""
    path = tmp_path_factory.mktemp("parquet") / "images.parquet"
    pq.write_table(image_table(200, seed=0), path, row_group_size=50)
    return path


@pytest.fixture(scope="session")
def parquet_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parquet-dir")
    pq.write_table(image_table(120, seed=1), path / "train.parquet", row_group_size=40)
    pq.write_table(image_table(30, seed=2), path / "test.parquet")
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(3)
    for label in ("cat", "dog"):
        (path / label).mkdir()
        for i in range(6):
            (path / label / f"{i}.png").write_bytes(png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    return path


PARQUET_NORMALIZE = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


@pytest.fixture(scope="session")
def untrained_digits_checkpoint(tmp_path_factory):
    digits = unlearning.load_dataset("digits")
    model = unlearning.new_model("small_cnn", 10, digits.input_shape, digits.normalization(), seed=0)
    path = tmp_path_factory.mktemp("models") / "digits-cnn-untrained"
    unlearning.save_model(model, path)
    return path


@pytest.fixture(scope="session")
def parquet_checkpoint(tmp_path_factory):
    model = unlearning.new_model("small_cnn", 10, (3, 8, 8), PARQUET_NORMALIZE, seed=0)
    path = tmp_path_factory.mktemp("models") / "parquet-cnn"
    unlearning.save_model(model, path)
    return path


def assert_same_walk(path: list[dict], reference: list[dict], target: float) -> None:
    """Two walks' path entries (unlearning.search.path_entry): the same steps with the same
    verdicts, and the same accuracy wherever both passes read all of D_f. A pass that stopped
    early (each executor stops at its own row) must be past the target."""
    assert [{k: v for k, v in e.items() if k not in ("forget_acc", "stopped_early")} for e in path] == [
        {k: v for k, v in e.items() if k not in ("forget_acc", "stopped_early")} for e in reference]
    for entry, other in zip(path, reference):
        assert (entry["forget_acc"] <= target) == (other["forget_acc"] <= target)
        if entry.get("stopped_early") or other.get("stopped_early"):
            assert min(entry["forget_acc"], other["forget_acc"]) > target
        else:
            assert entry["forget_acc"] == other["forget_acc"]


def assert_parallel_ptn_is_the_sequential_walk(task, config) -> tuple[list, object]:
    """The parallel PTN search on Ray (walk and refinement) reaches the in-process answer by the
    same path: (its trials, its walk's result)."""
    from pipelines.search import parallel_ptn
    from unlearning.search import PTNWalk, dampened_copy, path_entry, ptn_search

    target = task.search_target(config.target, config.rho)
    full, forget = task.importance("full", "fisher"), task.importance("forget", "fisher")
    walk = PTNWalk(full, forget, task.forget_fraction, target, config.walk())
    sample = task.retain_sample(walk.config.retain_sample)
    ceiling = target if config.settle_early else None
    sequential, chosen, details = ptn_search(
        walk, lambda steps: [task.forget_accuracy(dampened_copy(task.model, full, forget, s), ceiling) for s in steps],
        lambda step: task.accuracy(dampened_copy(task.model, full, forget, step), sample),
    )
    used, parallel, parallel_chosen, parallel_details, trials = parallel_ptn(task, config, [target])
    assert sequential.reached and parallel.step == sequential.step and parallel_chosen == chosen
    assert_same_walk([path_entry(*pair) for pair in parallel.path], [path_entry(*pair) for pair in sequential.path],
                     target)
    assert used == target and parallel_details.pop("slack")["tried"][0]["target"] == target
    before, after = parallel_details.pop("retain_sample_acc_before"), parallel_details.pop("retain_sample_acc")
    assert before - after <= config.max_retain_drop  # the ceiling's scores, checked in the search
    assert_same_walk(parallel_details.pop("refinement"), details["refinement"], target)
    assert parallel_details == {key: value for key, value in details.items() if key != "refinement"}
    assert len(details["candidates"]) >= 2 if sequential.step.s is not None else details["candidates"] == []
    evaluated = len(sequential.path) + len(details["refinement"])
    assert evaluated <= len(trials) < evaluated + config.chunk_size  # no step past the answer's chunk
    return trials, parallel
