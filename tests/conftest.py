"""Shared fixtures: one small trained digits model per test session (a few seconds on CPU)."""

from __future__ import annotations

import pytest
import torch

import unlearning
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
    model.amnesis_meta["train_config"] = DEFAULT_RECIPES["small_cnn"].to_dict()
    train(model, digits.train, DEFAULT_RECIPES["small_cnn"], normalize)
    return model


@pytest.fixture(scope="session")
def digits_checkpoint(digits_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "digits-cnn"
    unlearning.save_model(digits_model, path)
    return path


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
