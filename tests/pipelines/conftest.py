"""Fixtures of the pipeline tests: one local Ray session per module that asks for it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray cluster shared by the module's tests (a `ray.init` costs ~10 s here)."""
    import ray

    from pipelines.ray_session import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()
