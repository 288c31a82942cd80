"""Fixtures of the pipeline tests: one local Ray session per module that asks for it, and
MLflow stores made once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray cluster shared by the module's tests (a `ray.init` costs ~10 s here)."""
    import ray

    from pipelines.ray_session import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made, once (MLflow takes seconds to make them)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store_made_once(isolated_mlflow, empty_mlflow_store):
    """Each test's own MLflow store (conftest's `isolated_mlflow`) starts as a copy of the empty
    one, not from nothing: the runs log to the `amnesis` experiment, made in each test. Modules
    that make many stores use it (`pytestmark = pytest.mark.usefixtures(...)`)."""
    shutil.copy(empty_mlflow_store, os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
