"""A cluster that declares a GPU CUDA cannot see (a CPU node with `num_gpus=1`, as here).

Workers and trials ask for the GPU, are capped at the one there is, and compute on CPU: no
deadlock, and the same numbers as in one process.
"""

from __future__ import annotations

import pytest

import unlearning
from pipelines.distributed import compute_importance_on_ray
from pipelines.options import ForgetOptions
from pipelines.request import prepare_request
from pipelines.search import SearchConfig, trial_resources
from tests.conftest import assert_parallel_ptn_is_the_sequential_walk
from unlearning.checkpoint import model_meta

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def cluster_with_a_gpu():
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield
    ray.shutdown()


def test_importance_workers_are_capped_at_the_gpu_and_fall_back_to_cpu(untrained_digits_checkpoint):
    distributed = compute_importance_on_ray(
        untrained_digits_checkpoint, "digits", kind="fisher", mode="batch", batch_size=64, progress=False
    )
    assert distributed.meta["workers"] == 1  # the default 2, capped at the one GPU
    model = unlearning.load_model(untrained_digits_checkpoint)
    batches = unlearning.load_dataset("digits").train.batches(64, normalize=model_meta(model)["normalize"])
    reference = unlearning.compute_importance_sums(model, batches, "fisher", "batch")
    assert distributed.count == reference.count == 23
    for name, expected in reference.sums.items():
        scale = float(expected.abs().max())
        assert scale > 0
        assert float((distributed.sums[name] - expected).abs().max()) <= 1e-6 * scale


def test_more_workers_than_gpus_is_refused(untrained_digits_checkpoint):
    with pytest.raises(unlearning.UserError, match="has 1 GPU, so at most 1 workers"):
        compute_importance_on_ray(untrained_digits_checkpoint, "digits", workers=2, progress=False)


def test_ptn_trials_ask_for_the_gpu_and_give_the_sequential_answer(digits_checkpoint):
    prepared = prepare_request(str(digits_checkpoint), "digits", "class:5", ForgetOptions(track=False, device="cpu"))
    task = prepared.task
    config = SearchConfig(chunk_size=4, gpus_per_trial=0.5)
    assert trial_resources(config) == {"cpu": 1, "gpu": 0.5}
    assert_parallel_ptn_is_the_sequential_walk(task, config)
