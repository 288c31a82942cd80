"""Distributed importance (pipelines/importance.py) equals the single-process computation.

The reference is `unlearning.compute_importance_sums(model, split.batches(B, shuffle=False,
normalize=norm), kind, mode)` over `load_dataset(spec).train`. Sums are float64 on both sides,
so the only differences are float32 gradient rounding (thread counts, GEMM shapes) and the
order of float64 additions: well under 1e-6 relative to each tensor's scale.

One local Ray session serves the whole module (a `ray.init` costs ~10 s here); each
distributed run costs ~15-30 s on this 2-core machine (worker group + Ray Data start-up).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import unlearning
from pipelines import importance as pipeline

DIGITS_BATCH = 64  # 1438 training rows -> 23 batches, the last one of 30 rows
PARQUET_BATCH = 24  # 160 training rows -> 7 batches, the last one of 16 rows
PARQUET_NORMALIZE = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


# ---------------------------------------------------------------- fixtures


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _image_table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64) + 1000 * seed),
            "label": pa.array(rng.integers(0, 10, size=n).astype(np.int64)),
            "image": pa.array([_png(image) for image in images], type=pa.binary()),
        }
    )


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory):
    """200 rows of 3x8x8 PNGs in row groups of 50; its training split is 160 rows."""
    path = tmp_path_factory.mktemp("parquet") / "images.parquet"
    pq.write_table(_image_table(200, seed=0), path, row_group_size=50)
    return path


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parquet-dir")
    pq.write_table(_image_table(120, seed=1), path / "train.parquet", row_group_size=40)
    pq.write_table(_image_table(30, seed=2), path / "test.parquet")
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(3)
    for label in ("cat", "dog"):
        (path / label).mkdir()
        for i in range(6):
            (path / label / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    return path


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    digits = unlearning.load_dataset("digits")
    model = unlearning.new_model("small_cnn", 10, digits.input_shape, digits.normalization(), seed=0)
    path = tmp_path_factory.mktemp("models") / "digits-cnn"
    unlearning.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def parquet_checkpoint(tmp_path_factory):
    model = unlearning.new_model("small_cnn", 10, (3, 8, 8), PARQUET_NORMALIZE, seed=0)
    path = tmp_path_factory.mktemp("models") / "parquet-cnn"
    unlearning.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from pipelines.ray_session import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


def single_process(checkpoint, spec, kind, mode, batch_size) -> unlearning.ImportanceSums:
    model = unlearning.load_model(checkpoint)
    split = unlearning.load_dataset(spec).train
    normalize = model.amnesis_meta["normalize"]
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


# ---------------------------------------------------------------- without Ray


@pytest.mark.parametrize("source", ["digits", "parquet_file", "parquet_dir", "image_folder"])
def test_dataset_fingerprint_without_decoding_equals_load_dataset(source, request):
    spec = "digits" if source == "digits" else str(request.getfixturevalue(source))
    assert pipeline.dataset_fingerprint(spec) == unlearning.load_dataset(spec).fingerprint


@pytest.mark.parametrize("source", ["parquet_file", "parquet_dir", "image_folder"])
def test_training_rows_are_load_dataset_train_rows_in_order(source, request):
    spec = str(request.getfixturevalue(source))
    rows = pipeline.describe_training_rows(spec)
    train = unlearning.load_dataset(spec).train
    assert rows.num_rows == len(train)
    # read in two uneven pieces that cross row groups, then decode like a worker would
    pieces = [rows.read(0, 7), rows.read(7, rows.num_rows)]
    labels = np.concatenate([p["label"] for p in pieces])
    images = np.stack([pipeline.decode_image(b) for p in pieces for b in p["image"]])
    assert np.array_equal(labels, train.labels.numpy())
    assert np.array_equal(images, train.inputs.numpy())


@pytest.mark.parametrize("num_rows,batch_size,workers", [(1438, 64, 2), (160, 24, 2), (10, 64, 3), (5000, 7, 4)])
def test_chunk_plan_gives_every_fixed_batch_to_exactly_one_worker(num_rows, batch_size, workers):
    plan = pipeline.plan_chunks(num_rows, batch_size, workers)
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
    use_gpu, per_worker, torch_threads = pipeline._worker_resources({"CPU": cpus}, workers)
    actors = workers * pipeline.DATA_ACTORS_PER_WORKER * pipeline.DATA_TASK_CPUS
    assert not use_gpu and torch_threads == threads
    assert workers * per_worker["CPU"] + actors <= cpus + 1e-9  # no actor waits for a CPU forever


def test_bad_inputs_are_one_line_user_errors_before_any_ray_work(digits_checkpoint, parquet_checkpoint, tmp_path):
    with pytest.raises(unlearning.UserError, match="kind"):
        pipeline.compute_importance_on_ray(digits_checkpoint, "digits", kind="hessian")
    with pytest.raises(unlearning.UserError, match="neither 'digits' nor an existing path"):
        pipeline.compute_importance_on_ray(digits_checkpoint, str(tmp_path / "missing"))
    with pytest.raises(unlearning.UserError, match="expects"):
        pipeline.compute_importance_on_ray(parquet_checkpoint, "digits")  # 1x8x8 data, 3x8x8 model
    broken = tmp_path / "broken.parquet"
    table = _image_table(20, seed=4)
    pq.write_table(table.set_column(2, "image", pa.array([b"not a png"] * 20, type=pa.binary())), broken)
    with pytest.raises(unlearning.UserError, match="cannot be decoded"):
        pipeline.build_importance_store(parquet_checkpoint, broken, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_existing_store_path_is_refused(digits_checkpoint, tmp_path):
    (tmp_path / "store").mkdir()
    with pytest.raises(unlearning.UserError, match="already exists"):
        pipeline.build_importance_store(digits_checkpoint, "digits", tmp_path / "store")


@pytest.mark.parametrize("source", ["digits", "parquet_file", "parquet_dir", "image_folder"])
def test_selected_rows_are_those_training_rows_however_scattered(source, request):
    """A forget set's rows: scattered over row groups, read back exactly, in order."""
    spec = "digits" if source == "digits" else str(request.getfixturevalue(source))
    rows = pipeline.describe_training_rows(spec)
    train = unlearning.load_dataset(spec).train
    positions = np.sort(np.random.default_rng(5).choice(rows.num_rows, size=rows.num_rows // 3, replace=False))
    chosen = rows.select(positions)
    assert chosen.num_rows == len(positions) and chosen.fingerprint == rows.fingerprint
    pieces = [chosen.read(0, 3), chosen.read(3, chosen.num_rows)]
    labels = np.concatenate([p["label"] for p in pieces])
    if source == "digits":
        inputs = np.concatenate([p["pixels"] for p in pieces])
    else:
        inputs = np.stack([pipeline.decode_image(b) for p in pieces for b in p["image"]])
    assert np.array_equal(labels, train.labels.numpy()[positions])
    assert np.array_equal(inputs, train.inputs.numpy()[positions])


def test_request_backend_maps_ids_to_training_rows_and_declines_small_or_unstreamable_splits(digits_checkpoint):
    train = unlearning.load_dataset("digits").train
    backend = pipeline.RayImportanceBackend(digits_checkpoint, "digits", train.ids, "fp", min_rows=100)
    some = torch.tensor([7, 1200, 3])
    assert backend.positions(train.ids[some]).tolist() == [7, 1200, 3]
    with pytest.raises(RuntimeError, match="not training rows"):
        backend.positions(torch.tensor([10**9]))
    small = train.subset(torch.arange(99))
    assert backend(small, "fisher", "per_sample", 64, False) is None  # below min_rows: in-process
    assert backend(train, "fisher", "batch", 64, True) is None  # shuffled batches: in-process
    modified = pipeline.RayImportanceBackend(digits_checkpoint, "digits+coarse:0,1,2,3,4/5,6,7,8,9", train.ids, "fp")
    assert modified(train, "fisher", "per_sample", 64, False) is None  # +modifiers are not streamed
    assert backend.runs == [] and modified.runs == []


# ---------------------------------------------------------------- on Ray


@pytest.mark.ray
def test_distributed_store_equals_single_process_and_round_trips(ray_session, digits_checkpoint, tmp_path):
    """digits, fisher, batch mode, 2 workers -> a store whose mean is the single-process mean."""
    store = tmp_path / "digits-fisher"
    meta = pipeline.build_importance_store(
        digits_checkpoint, "digits", store, workers=2, kind="fisher", mode="batch", batch_size=DIGITS_BATCH, progress=False
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

    other = unlearning.new_model("small_cnn", 10, (1, 8, 8), model.amnesis_meta["normalize"], seed=1)
    with pytest.raises(unlearning.UserError, match="computed for model"):
        unlearning.load_importance(store, other)


@pytest.mark.ray
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
    distributed = pipeline.compute_importance_on_ray(
        checkpoint, spec, workers=2, kind=kind, mode=mode, batch_size=batch_size, progress=False
    )
    assert distributed.meta["workers"] == 2
    assert_sums_match(distributed, single_process(checkpoint, spec, kind, mode, batch_size))


@pytest.mark.ray
def test_killed_worker_is_retried_and_batch_mode_still_equals_single_process(
    ray_session, parquet_file, parquet_checkpoint, tmp_path, monkeypatch
):
    """The last rank calls os._exit(1) after its first batch (once); the group restarts."""
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(pipeline.CRASH_HOOK_ENV, str(marker))
    distributed = pipeline.compute_importance_on_ray(
        parquet_checkpoint, parquet_file, workers=2, kind="fisher", mode="batch", batch_size=PARQUET_BATCH, progress=False
    )
    assert marker.exists(), "the test hook did not kill a worker"
    reference = single_process(parquet_checkpoint, parquet_file, "fisher", "batch", PARQUET_BATCH)
    assert reference.count == 7
    assert_sums_match(distributed, reference)


@pytest.mark.parametrize("source", ["digits", "parquet_file", "image_folder"])
def test_workers_use_the_memory_layout_load_dataset_uses(source, request, digits_checkpoint, parquet_checkpoint):
    """Convolutions round differently over channels-last memory (~1e-3 for resnet_small)."""
    spec = "digits" if source == "digits" else str(request.getfixturevalue(source))
    checkpoint = digits_checkpoint if source == "digits" else parquet_checkpoint
    rows = pipeline.describe_training_rows(spec)
    inputs = unlearning.load_dataset(spec).train.inputs
    expected = not inputs.is_contiguous() and inputs.is_contiguous(memory_format=torch.channels_last)
    assert pipeline._check_first_row(rows, unlearning.load_model(checkpoint)) == expected


@pytest.mark.ray
def test_forget_set_importance_of_a_request_on_ray_equals_in_process(ray_session, parquet_file, parquet_checkpoint):
    """Batch mode, a random forget set scattered over the row groups of a single Parquet file."""
    from pipelines.request import ForgetOptions, prepare_request

    spec = str(parquet_file)
    options = ForgetOptions(mode="batch", batch_size=8, ray_min_rows=0, show_progress=False, track=False)
    prepared = prepare_request(str(parquet_checkpoint), spec, "random:40:1", options)
    task = prepared.task
    on_ray = task.importance("forget", "fisher")
    assert task.importance_backend.runs == [
        {**task.importance_backend.runs[0], "rows": 40, "kind": "fisher", "mode": "batch", "workers": 2}
    ]
    model = unlearning.load_model(parquet_checkpoint)
    reference = unlearning.compute_importance_sums(
        model, task.forget_split.batches(8, normalize=task.normalize), "fisher", "batch"
    )
    assert reference.count == 5
    for name, expected in reference.mean().items():
        torch.testing.assert_close(on_ray[name], expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.ray
def test_request_after_earlier_removals_computes_retained_importance_on_ray(ray_session, digits_checkpoint):
    """per_sample, digits: D_r = training rows minus rows removed before minus the forget set."""
    from pipelines.request import ForgetOptions, prepare_request

    train = unlearning.load_dataset("digits").train
    removed = train.ids[train.labels == 2].tolist()
    options = ForgetOptions(mode="per_sample", ray_min_rows=1000, show_progress=False, track=False)
    prepared = prepare_request(str(digits_checkpoint), "digits", "class:4", options, removed_before=removed)
    task = prepared.task
    assert len(task.retain_split) == len(train) - len(removed) - len(task.forget_split)
    on_ray = task.importance("retain", "fisher")
    task.importance("forget", "fisher")  # under 1000 rows: in this process
    runs = task.importance_backend.runs
    assert [(r["rows"], r["mode"]) for r in runs] == [(len(task.retain_split), "per_sample")]
    model = unlearning.load_model(digits_checkpoint)
    reference = unlearning.compute_importance_sums(
        model, task.retain_split.batches(64, normalize=task.normalize), "fisher", "per_sample"
    )
    for name, expected in reference.mean().items():
        torch.testing.assert_close(on_ray[name], expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.ray
def test_forget_command_without_a_store_computes_the_full_importance_on_ray(ray_session, digits_checkpoint, tmp_path, capsys):
    """`unlearn forget --ray-min-rows 1000`: D (1,438 rows) on Ray, D_f (class 4) in-process."""
    import json

    from pipelines.cli import main

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
