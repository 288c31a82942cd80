"""Distributed importance without Ray: the chunk plan, resources, and refusals before Ray work."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import unlearning
from pipelines.distributed import RayExecutor, build_importance_store, compute_importance_on_ray
from pipelines.distributed.driver import check_first_row
from pipelines.distributed.plan import (
    DATA_ACTORS_PER_WORKER,
    DATA_TASK_CPUS,
    LISTING_CPUS,
    plan_chunks,
    worker_resources,
)
from pipelines.ray_session import (
    DATA_BLOCK_BYTES,
    PARQUET_TASK_BYTES_ENV,
    data_settings,
    resolve_workers,
)
from tests.conftest import image_table
from unlearning.passes import LocalExecutor


@pytest.mark.parametrize("num_rows,batch_size,workers", [(1438, 64, 2), (160, 24, 2), (10, 64, 3), (5000, 7, 4)])
def test_chunk_plan_gives_every_fixed_batch_to_exactly_one_worker(num_rows, batch_size, workers):
    plan = plan_chunks(num_rows, batch_size, workers)
    assert plan.chunk_rows % batch_size == 0  # chunks start and end on batch boundaries
    owner = {}
    for rank in range(plan.workers):
        for local in range(plan.chunks_of(rank)):
            chunk = local * plan.workers + rank
            start, stop = chunk * plan.chunk_rows, min((chunk + 1) * plan.chunk_rows, num_rows)
            for batch in range(start // batch_size, -(-stop // batch_size)):
                assert batch not in owner
                owner[batch] = rank
    assert sorted(owner) == list(range(-(-num_rows // batch_size)))


@pytest.mark.parametrize("cpus,workers,threads", [(2, 2, 1), (2, 1, 2), (8, 8, 1), (16, 4, 4)])
def test_workers_leave_room_for_every_data_actor(cpus, workers, threads):
    use_gpu, per_worker, torch_threads = worker_resources({"CPU": cpus}, workers)
    actors = workers * DATA_ACTORS_PER_WORKER * DATA_TASK_CPUS
    assert not use_gpu and torch_threads == threads
    # no actor waits for a CPU forever, and Ray Data's 1-CPU listing task always finds one
    assert workers * per_worker["CPU"] + actors + LISTING_CPUS <= cpus + 1e-9


def test_a_cluster_too_small_to_leave_a_whole_cpu_reserves_none():
    _, per_worker, threads = worker_resources({"CPU": 1}, 1)
    assert per_worker == {"CPU": 0} and threads == 1


def test_bad_inputs_are_one_line_user_errors_before_any_ray_work(
    untrained_digits_checkpoint, parquet_checkpoint, tmp_path
):
    with pytest.raises(unlearning.UserError, match="kind"):
        compute_importance_on_ray(untrained_digits_checkpoint, "digits", kind="hessian")
    with pytest.raises(unlearning.UserError, match="neither 'digits' nor an existing path"):
        compute_importance_on_ray(untrained_digits_checkpoint, str(tmp_path / "missing"))
    with pytest.raises(unlearning.UserError, match="expects"):
        compute_importance_on_ray(parquet_checkpoint, "digits")  # 1x8x8 data, 3x8x8 model
    broken = tmp_path / "broken.parquet"
    table = image_table(20, seed=4)
    pq.write_table(table.set_column(2, "image", pa.array([b"not a png"] * 20, type=pa.binary())), broken)
    with pytest.raises(unlearning.UserError, match="cannot be decoded"):
        build_importance_store(parquet_checkpoint, broken, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_existing_store_path_is_refused(untrained_digits_checkpoint, tmp_path):
    (tmp_path / "store").mkdir()
    with pytest.raises(unlearning.UserError, match="already exists"):
        build_importance_store(untrained_digits_checkpoint, "digits", tmp_path / "store")


def test_ray_executor_leaves_small_and_in_memory_splits_and_shuffled_batches_to_this_process(
    untrained_digits_checkpoint,
):
    """Nothing here starts Ray: every pass below is routed to the local executor."""
    model = unlearning.load_model(untrained_digits_checkpoint)
    lazy = unlearning.data.open_dataset("digits").train
    in_memory = unlearning.load_dataset("digits").train
    executor = RayExecutor(LocalExecutor(), min_rows=100)
    assert executor.on_ray(lazy) and not executor.on_ray(lazy.subset(torch.arange(99)))
    assert not executor.on_ray(in_memory)  # rows already in memory stay here
    small = lazy.subset(torch.arange(99))
    [outcomes] = executor.outcomes([model], small, None)
    assert len(outcomes) == 99
    executor.importance(model, small, "fisher", "per_sample", 64, None)
    executor.importance(model, lazy, "fisher", "batch", 64, None, shuffle=True)  # shuffled batches: here
    assert executor.runs == []


@pytest.mark.parametrize("source", ["digits", "parquet_file", "image_folder"])
def test_workers_use_the_memory_layout_load_dataset_uses(
    source, request, untrained_digits_checkpoint, parquet_checkpoint
):
    """Convolutions round differently over channels-last memory (~1e-3 for resnet_small)."""
    spec = "digits" if source == "digits" else str(request.getfixturevalue(source))
    checkpoint = untrained_digits_checkpoint if source == "digits" else parquet_checkpoint
    split = unlearning.data.open_dataset(spec).train
    inputs = unlearning.load_dataset(spec).train.inputs
    expected = not inputs.is_contiguous() and inputs.is_contiguous(memory_format=torch.channels_last)
    assert check_first_row(split, unlearning.load_model(checkpoint), spec) == expected


def test_parquet_read_tasks_get_a_block_of_row_groups_unless_the_user_set_their_own(monkeypatch):
    """Ray's default, 128 MiB of row groups a read task, held ~12 row groups decoded at once."""
    monkeypatch.setenv(PARQUET_TASK_BYTES_ENV, "1")  # restored after the test
    monkeypatch.delenv(PARQUET_TASK_BYTES_ENV)
    data_settings()
    assert os.environ[PARQUET_TASK_BYTES_ENV] == str(DATA_BLOCK_BYTES)
    monkeypatch.setenv(PARQUET_TASK_BYTES_ENV, str(64 << 20))
    data_settings()
    assert os.environ[PARQUET_TASK_BYTES_ENV] == str(64 << 20)


@pytest.mark.parametrize(
    "requested,cluster,expected",
    [(None, {"CPU": 8}, 2), (None, {"CPU": 1}, 1), (None, {"CPU": 8, "GPU": 1}, 1), (3, {"CPU": 4}, 3),
     (2, {"CPU": 2, "GPU": 2}, 2)],
)
def test_the_default_worker_count_fits_the_cluster(requested, cluster, expected):
    assert resolve_workers(requested, cluster) == expected


@pytest.mark.parametrize(
    "requested,cluster,message",
    [(1000, {"CPU": 2}, "has 2 CPUs, so at most 2 workers"), (2, {"CPU": 16, "GPU": 1}, "has 1 GPU,"),
     (0, {"CPU": 2}, "at least 1")],
)
def test_a_worker_count_the_cluster_cannot_hold_is_refused(requested, cluster, message):
    with pytest.raises(unlearning.UserError, match=message):
        resolve_workers(requested, cluster)


def test_a_store_of_fewer_rows_than_the_threshold_is_built_in_this_process(untrained_digits_checkpoint, tmp_path):
    """1,438 digits rows < --ray-min-rows: no Ray start (this module refuses one), same maths."""
    meta = build_importance_store(untrained_digits_checkpoint, "digits", tmp_path / "store", kind="fisher",
                                  mode="batch", batch_size=64)
    assert meta["workers"] == 0 and meta["num_samples"] == 1438 and meta["count"] == 23
    model = unlearning.load_model(untrained_digits_checkpoint)
    stored, _ = unlearning.load_importance(tmp_path / "store", model)
    dataset = unlearning.load_dataset("digits")
    normalize = unlearning.model_meta(model)["normalize"]
    reference = unlearning.compute_importance(model, dataset.train.batches(64, normalize=normalize), "fisher", "batch")
    for name, expected in reference.items():
        torch.testing.assert_close(stored[name], expected, rtol=1e-6, atol=0)
