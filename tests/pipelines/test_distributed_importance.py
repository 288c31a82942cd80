"""Distributed importance (pipelines/distributed) equals the single-process computation.

The reference is `unlearning.compute_importance_sums(model, split.batches(B, shuffle=False,
normalize=norm), kind, mode)` over `load_dataset(spec).train`. Sums are float64 on both sides,
so the only differences are float32 gradient rounding (thread counts, GEMM shapes) and the
order of float64 additions: well under 1e-6 relative to each tensor's scale.

One local Ray session serves the whole module (a `ray.init` costs ~10 s here); each
distributed run costs ~15-30 s on this 2-core machine (worker group + Ray Data start-up).
The same pieces without Ray: test_distributed_plan.py and tests/unlearning/test_sources.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import unlearning
from pipelines.cli import main
from pipelines.distributed import build_importance_store, compute_importance_on_ray
from pipelines.options import ForgetOptions
from pipelines.request import prepare_request, run_forget
from unlearning.checkpoint import model_meta

pytestmark = pytest.mark.ray

DIGITS_BATCH = 64  # 1438 training rows -> 23 batches, the last one of 30 rows
PARQUET_BATCH = 24  # 160 training rows -> 7 batches, the last one of 16 rows


@pytest.fixture
def digits_checkpoint(untrained_digits_checkpoint):
    return untrained_digits_checkpoint


def single_process(checkpoint, spec, kind, mode, batch_size) -> unlearning.ImportanceSums:
    model = unlearning.load_model(checkpoint)
    split = unlearning.load_dataset(spec).train
    normalize = model_meta(model)["normalize"]
    batches = split.batches(batch_size, shuffle=False, normalize=normalize)
    return unlearning.compute_importance_sums(model, batches, kind, mode)


def assert_sums_match(distributed: unlearning.ImportanceSums, reference: unlearning.ImportanceSums):
    assert distributed.count == reference.count
    assert distributed.num_samples == reference.num_samples
    assert distributed.sums.keys() == reference.sums.keys()
    for name, expected in reference.sums.items():
        assert distributed.sums[name].dtype == torch.float64
        assert float(expected.abs().max()) > 0, f"{name}: a zero reference proves nothing"
        scale = float(expected.abs().max())
        torch.testing.assert_close(distributed.sums[name], expected, rtol=1e-6, atol=1e-6 * scale)


def test_distributed_store_equals_single_process_and_round_trips(ray_session, digits_checkpoint, tmp_path):
    """digits, fisher, batch mode, 2 workers -> a store whose mean is the single-process mean."""
    store = tmp_path / "digits-fisher"
    meta = build_importance_store(
        digits_checkpoint, "digits", store, workers=2, kind="fisher", mode="batch", batch_size=DIGITS_BATCH, progress=False,
        min_rows=0,
    )
    reference = single_process(digits_checkpoint, "digits", "fisher", "batch", DIGITS_BATCH)
    model = unlearning.load_model(digits_checkpoint)
    assert meta["count"] == 23 and meta["num_samples"] == 1438 and meta["batch_size"] == DIGITS_BATCH
    assert (meta["kind"], meta["mode"], meta["workers"]) == ("fisher", "batch", 2)
    assert meta["model_fingerprint"] == unlearning.model_fingerprint(model)
    assert meta["dataset_fingerprint"] == unlearning.load_dataset("digits").fingerprint

    loaded, loaded_meta = unlearning.load_importance(store, model)
    assert loaded_meta == meta
    for name, expected in reference.mean().items():
        torch.testing.assert_close(loaded[name], expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))

    other = unlearning.new_model("small_cnn", 10, (1, 8, 8), model_meta(model)["normalize"], seed=1)
    with pytest.raises(unlearning.UserError, match="computed for model"):
        unlearning.load_importance(store, other)


@pytest.mark.parametrize(
    "source,kind,mode",
    [
        ("digits", "fisher", "per_sample"),
        ("digits", "l2_norm", "batch"),
        ("parquet_file", "fisher", "per_sample"),
        ("parquet_file", "l2_norm", "per_sample"),
    ],
)
def test_distributed_importance_equals_single_process(ray_session, source, kind, mode, request):
    spec = "digits" if source == "digits" else str(request.getfixturevalue(source))
    checkpoint = request.getfixturevalue("digits_checkpoint" if source == "digits" else "parquet_checkpoint")
    batch_size = DIGITS_BATCH if source == "digits" else PARQUET_BATCH
    distributed = compute_importance_on_ray(
        checkpoint, spec, workers=2, kind=kind, mode=mode, batch_size=batch_size, progress=False
    )
    assert distributed.meta["workers"] == 2
    assert_sums_match(distributed, single_process(checkpoint, spec, kind, mode, batch_size))


def test_killed_worker_is_retried_and_batch_mode_still_equals_single_process(
    ray_session, parquet_file, parquet_checkpoint, tmp_path
):
    """The last rank calls os._exit(1) after its first batch (once); the group restarts."""
    marker = str(tmp_path / "crashed-once")

    def kill_last_rank_once(rank, rows_done):  # runs inside the Ray Train workers
        import os

        if rank == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)

    distributed = compute_importance_on_ray(
        parquet_checkpoint, parquet_file, workers=2, kind="fisher", mode="batch", batch_size=PARQUET_BATCH,
        progress=False, fault=kill_last_rank_once,
    )
    assert (tmp_path / "crashed-once").exists(), "the fault did not kill a worker"
    reference = single_process(parquet_checkpoint, parquet_file, "fisher", "batch", PARQUET_BATCH)
    assert reference.count == 7
    assert_sums_match(distributed, reference)


def test_forget_set_importance_of_a_request_on_ray_equals_in_process(ray_session, parquet_file, parquet_checkpoint):
    """Batch mode, a random forget set scattered over the row groups of a single Parquet file."""
    spec = str(parquet_file)
    options = ForgetOptions(mode="batch", batch_size=8, ray_min_rows=0, show_progress=False, track=False)
    prepared = prepare_request(str(parquet_checkpoint), spec, "random:40:1", options)
    task = prepared.task
    on_ray = task.importance("forget", "fisher")
    runs = task.executor.runs
    assert runs == [{**runs[0], "pass": "importance", "rows": 40, "kind": "fisher", "mode": "batch", "workers": 2}]
    model = unlearning.load_model(parquet_checkpoint)
    reference = unlearning.compute_importance_sums(
        model, task.forget_split.batches(8, normalize=task.normalize), "fisher", "batch"
    )
    assert reference.count == 5
    for name, expected in reference.mean().items():
        torch.testing.assert_close(on_ray[name], expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("exact_ids", [1 << 16, 10])
def test_ray_data_reads_exactly_the_split_rows_asked_for_clustered_or_scattered(
        ray_session, parquet_file, exact_ids, monkeypatch):
    """The id filter (`id in ids` within the ids' range, so row groups outside it are skipped)
    returns the rows asked for: a run inside one row group, rows over all four, a single row.
    Beyond `EXACT_FILTER_IDS` ids (10 here) the reader gets only ranges around them, and the
    decoder drops the rows in those ranges that were not asked for."""
    from pipelines.distributed import rows as ray_rows

    monkeypatch.setattr(ray_rows, "EXACT_FILTER_IDS", exact_ids)
    split = unlearning.data.open_dataset(str(parquet_file)).train
    rows = ray_rows.RaySplit.of(split, None)
    for index in (np.arange(45, 60), np.arange(0, len(split), 7), np.array([100])):
        subset = rows.subset(index)
        batches = subset.dataset().iter_batches(batch_size=None, batch_format="pyarrow")
        decoded = [subset.decode(batch) for batch in batches]
        found = np.concatenate([index for index, _, _ in decoded])
        assert sorted(found.tolist()) == index.tolist()
        expected = split.inputs.read(np.sort(found))
        torch.testing.assert_close(torch.cat([x for _, x, _ in decoded])[np.argsort(found)], expected)


def test_id_ranges_leave_out_the_widest_gaps():
    """A worker's interleaved chunks become one range each; one range covers everything."""
    from pipelines.distributed.rows import EXACT_FILTER_IDS, id_ranges

    chunks = np.concatenate([np.arange(start, start + 4096) for start in range(0, 30 * 8192, 8192)])
    assert len(chunks) > EXACT_FILTER_IDS
    assert id_ranges(chunks) == [(start, start + 4095) for start in range(0, 30 * 8192, 8192)]
    assert id_ranges(np.array([3, 9, 400]), most=1) == [(3, 400)]
    assert id_ranges(np.array([3, 4, 5, 9, 400])) == [(3, 5), (9, 9), (400, 400)]
    three = id_ranges(chunks, most=3)  # equal gaps: any two of them left out
    assert len(three) == 3 and three[0][0] == 0 and three[-1][1] == chunks[-1]
    assert all(any(low <= i <= high for low, high in three) for i in chunks[::97])
    scattered = np.arange(0, 3 * (EXACT_FILTER_IDS + 1), 3)  # evenly spread: any 63 cuts, 64 ranges
    ranges = id_ranges(scattered)
    assert len(ranges) == 64 and ranges[0][0] == 0 and ranges[-1][1] == scattered[-1]


def test_an_evaluator_decodes_a_bounded_chunk_whatever_the_row_size(parquet_file):
    """Chunks of at most 8 MiB of decoded inputs and at most 2,048 rows: 256 float features
    (1 KiB a row) -> 2,048 rows; a 32-pixel RGB image (12 KiB) -> 682; a 224-pixel one -> 13."""
    import dataclasses

    from pipelines.distributed.rows import RaySplit

    rows = RaySplit.of(unlearning.data.open_dataset(str(parquet_file)).train, None)
    counts = {}
    for shape in ((256,), (3, 32, 32), (3, 224, 224)):
        shaped = dataclasses.replace(rows, inputs=dataclasses.replace(rows.inputs, row_shape=shape))
        counts[shape] = shaped.chunk_rows()
    assert counts == {(256,): 2048, (3, 32, 32): 682, (3, 224, 224): 13}


def test_rows_kept_in_the_object_store_come_back_equal_in_their_memory_layout(ray_session):
    """An evaluator keeps decoded rows in Ray's object store; they come back as read-only views
    of the store, equal, in the layout they went in (channels-last stays channels-last)."""
    import ray

    from pipelines.distributed.evaluators import Stored

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 32, 32, generator=generator)  # 768 KiB: above Ray's inline size
    for inputs in (images, images.contiguous(memory_format=torch.channels_last), torch.randn(700, 256)):
        stored = Stored.put(inputs)
        back = stored.get()
        assert torch.equal(back, inputs)
        assert back.stride() == inputs.stride()
        assert not ray.get(stored.ref).flags.writeable  # the store's memory, not a copy


def test_request_after_earlier_removals_computes_retained_importance_on_ray(ray_session, digits_checkpoint):
    """per_sample, digits: D_r = training rows minus rows removed before minus the forget set."""
    train = unlearning.load_dataset("digits").train
    removed = train.ids[train.labels == 2].tolist()
    options = ForgetOptions(mode="per_sample", ray_min_rows=1000, show_progress=False, track=False)
    prepared = prepare_request(str(digits_checkpoint), "digits", "class:4", options, removed_before=removed)
    task = prepared.task
    assert len(task.retain_split) == len(train) - len(removed) - len(task.forget_split)
    on_ray = task.importance("retain", "fisher")
    task.importance("forget", "fisher")  # under 1000 rows: in this process
    runs = task.executor.runs
    assert [(r["rows"], r["mode"]) for r in runs] == [(len(task.retain_split), "per_sample")]
    model = unlearning.load_model(digits_checkpoint)
    reference = unlearning.compute_importance_sums(
        model, task.retain_split.batches(64, normalize=task.normalize), "fisher", "per_sample"
    )
    for name, expected in reference.mean().items():
        torch.testing.assert_close(on_ray[name], expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_forget_command_without_a_store_computes_the_full_importance_on_ray(ray_session, digits_checkpoint, tmp_path, capsys):
    """`unlearn forget --ray-min-rows 1000`: D (1,438 rows) on Ray, D_f (class 4) in-process."""
    def forget(out, min_rows):
        code = main(["--quiet", "forget", "--model", str(digits_checkpoint), "--data", "digits", "--forget", "class:4",
                     "--method", "ssd", "--alpha", "10", "--lambda", "1", "--mode", "batch", "--no-track",
                     "--ray-min-rows", str(min_rows), "--out", str(out)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads((out / "report.json").read_text()), captured.out

    on_ray, printed = forget(tmp_path / "on-ray", 1000)
    in_process, _ = forget(tmp_path / "in-process", 10**9)
    runs = on_ray["importance"]["on_ray"]
    assert [(r["rows"], r["kind"], r["mode"], r["workers"]) for r in runs] == [(1438, "fisher", "batch", 2)]
    assert "importance (fisher/batch) of 1438 rows ran on Ray: 2 workers" in printed
    assert in_process["importance"]["on_ray"] == []
    for name in ("forget_acc", "retain_acc", "test_acc"):  # the same dampening, up to float rounding
        assert on_ray["metrics"][name] == pytest.approx(in_process["metrics"][name], abs=1 / 300)


def test_the_model_reaches_workers_through_the_object_store_and_storage_is_kept(
    ray_session, digits_checkpoint, tmp_path, monkeypatch
):
    """The checkpoint is gone before the run starts; the Ray Train state lands in the storage."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(digits_checkpoint, copy)
    model = unlearning.load_model(copy)
    shutil.rmtree(copy)  # a worker that looked for a path on the driver's disk would fail
    storage = tmp_path / "storage"
    monkeypatch.setenv("AMNESIS_RAY_STORAGE", str(storage))
    distributed = compute_importance_on_ray(
        model, "digits", kind="fisher", mode="batch", batch_size=DIGITS_BATCH, progress=False
    )
    assert_sums_match(distributed, single_process(digits_checkpoint, "digits", "fisher", "batch", DIGITS_BATCH))
    assert [p.name.startswith("importance-") for p in storage.iterdir()] == [True]


def test_a_whole_poison_request_on_ray_equals_the_same_request_in_process(ray_session, digits_checkpoint, tmp_path):
    """`--ray-min-rows 0`: importances, every PTN step's forget accuracy and the final metrics
    (MIA, attack success on triggered test images) pass over rows on Ray, the trigger stamped
    there as rows are decoded; the report equals the in-process one."""
    spec = "digits+poison:rate=0.05,identified=0.5"
    reports = {}
    for name, min_rows in (("here", None), ("on-ray", 0)):
        options = ForgetOptions(method="ptn", rho=0.5, track=False, plots=False, ray_min_rows=min_rows,
                                show_progress=False)
        reports[name] = run_forget(str(digits_checkpoint), spec, "poison:identified", str(tmp_path / name), options)
    here, on_ray = reports["here"], reports["on-ray"]
    assert here.passes_on_ray == [] and here.importance.on_ray == []
    assert [(r["rows"], r["kind"]) for r in on_ray.importance.on_ray] == [(1438, "fisher"), (36, "fisher")]
    steps = len(on_ray.details["path"])
    assert len(on_ray.passes_on_ray) >= steps + 3  # each step, the target, train + test + triggered test
    assert (on_ray.params["alpha"], on_ray.params["lambda"]) == (here.params["alpha"], here.params["lambda"])
    for which in ("metrics", "original_metrics"):
        expected, got = getattr(here, which), getattr(on_ray, which)
        assert expected.keys() == got.keys() and "attack_success_rate" in got
        for key, value in expected.items():
            if isinstance(value, float) and value == value:
                assert got[key] == pytest.approx(value, abs=1e-6), (which, key)


@pytest.mark.parametrize("method, params", [("finetune", {"epochs": 1}), ("jit", {})])
def test_a_method_with_its_own_loop_runs_as_a_ray_task_and_equals_the_in_process_run(
        ray_session, digits_checkpoint, tmp_path, method, params):
    """`--ray-min-rows 0` with a training method: the whole method runs in one Ray task that reads
    its rows there, seeded as in-process; same metrics to training's float rounding."""
    reports = {}
    for name, min_rows in (("here", None), ("on-ray", 0)):
        options = ForgetOptions(method=method, params=params, track=False, plots=False, ray_min_rows=min_rows,
                                show_progress=False)
        reports[name] = run_forget(str(digits_checkpoint), "digits", "class:2", str(tmp_path / name), options)
    here, on_ray = reports["here"], reports["on-ray"]
    assert here.method_on_ray is None
    assert on_ray.method_on_ray["method"] == method and on_ray.method_on_ray["device"] == "cpu"
    assert on_ray.params == here.params
    assert here.metrics != here.original_metrics  # the method changed the model
    for key, value in here.metrics.items():
        if isinstance(value, float) and value == value:  # thread counts differ: float sums may too
            assert on_ray.metrics[key] == pytest.approx(value, abs=0.01), key
