"""Importance at cluster scale: Ray Data reads and decodes, a Ray Train worker group computes.

The maths is `unlearning.compute_importance_sums`; this file only decides where it runs.

1. The driver describes the training split without decoding it (`TrainingRows`: row count,
   where each row lives, the data set's fingerprint) and cuts it into chunks of whole,
   fixed batches (batch j = training rows [j*B, (j+1)*B), as `Split.batches` forms them).
2. Chunk k belongs to worker k % N. Each worker gets its own Ray Data pipeline over its
   chunks (`get_dataset_shard(f"rank{r}")`): one fused stage reads rows, decodes images and
   normalises with the checkpoint's mean/std, in fractional-CPU tasks, streamed.
3. Each worker loads the model once, regroups the rows of each batch (blocks may cut a batch,
   workers never do), computes partial (sum, count) in float64, and one `all_reduce` adds
   them across workers. Rank 0 hands the total to the driver through a small actor, which
   also carries progress. A worker that dies restarts the group (`FailureConfig`); partials
   are reduced only at the end, so a restart simply recomputes.

See docs/implementation-notes.md, "Distributed importance", for why it is built this way.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import unlearning
from pipelines.ray_session import DEFAULT_RAY_MIN_ROWS, ensure_ray
from unlearning.data import (
    IMAGE_SUFFIXES,
    SPLIT_SEED,
    TEST_FRACTION,
    decode_image,
    decode_images,
    file_digest,
    fingerprint_bytes,
    normalize_batch,
)
from unlearning.errors import UserError
from unlearning.importance import KINDS, MODES

DATA_TASK_CPUS = 0.25  # Ray Data read/decode actors: fractional so a 2-CPU box never deadlocks
DATA_ACTORS_PER_WORKER = 1  # one decodes ~2,800 CIFAR rows/s, several times what a worker computes
CHUNK_TARGET_ROWS = 1024  # rows per read task (rounded to whole batches)
BLOCK_TARGET_ROWS = 256  # rows per Ray Data block (rounded to whole batches)
MAX_FAILURES = 3  # worker-group restarts before a run gives up
CRASH_HOOK_ENV = "AMNESIS_TEST_CRASH_WORKER_ONCE"  # test only: marker path; last rank exits once


# ---------------------------------------------------------------- the training rows


@dataclass
class TrainingRows:
    """The training split of a data spec, described without decoding it.

    Row i here is row i of `unlearning.load_dataset(spec).train`. Memory is O(1) in the
    rows for a directory with train.parquet; a single file or folder carries its held-out
    permutation (8 bytes a row), an image folder its file list, `digits` its pixels.
    """

    spec: str
    num_rows: int
    input_kind: str  # "image" or "features", as in unlearning.data
    fingerprint: str
    parquet: str | None = None
    group_starts: np.ndarray | None = None  # first file row of each Parquet row group
    positions: np.ndarray | None = None  # file row of each training row; None = identity
    files: list[str] | None = None  # image folder: one file per training row
    labels: np.ndarray | None = None  # image folder and digits
    pixels: np.ndarray | None = None  # digits: images already scaled to [0, 1]

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Training rows [start, stop): `label` plus `image` (bytes), `features` or `pixels`."""
        if self.pixels is not None:
            return {"label": self.labels[start:stop], "pixels": self.pixels[start:stop]}
        if self.files is not None:
            images = np.empty(stop - start, dtype=object)
            images[:] = [Path(f).read_bytes() for f in self.files[start:stop]]
            return {"label": self.labels[start:stop], "image": images}
        return self._read_parquet(start, stop)

    def select(self, positions: np.ndarray) -> TrainingRows:
        """Only training rows `positions` (increasing), renumbered 0..len-1; same fingerprint."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            raise UserError(f"{self.spec}: no training rows selected")
        if positions[0] < 0 or positions[-1] >= self.num_rows or np.any(np.diff(positions) <= 0):
            raise ValueError("positions must be increasing training row numbers")
        if self.pixels is not None:
            return replace(self, num_rows=len(positions), labels=self.labels[positions], pixels=self.pixels[positions])
        if self.files is not None:
            files = [self.files[i] for i in positions]
            return replace(self, num_rows=len(positions), files=files, labels=self.labels[positions])
        file_rows = self.positions[positions] if self.positions is not None else positions
        return replace(self, num_rows=len(positions), positions=file_rows)

    def _read_parquet(self, start: int, stop: int) -> dict[str, np.ndarray]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = self.positions[start:stop] if self.positions is not None else np.arange(start, stop)
        groups = np.searchsorted(self.group_starts, rows, side="right") - 1
        needed = np.unique(groups)  # only the row groups holding these rows, however scattered
        column = "image" if self.input_kind == "image" else "features"
        file = pq.ParquetFile(self.parquet)
        table = file.read_row_groups(needed.tolist(), columns=["label", column])
        sizes = np.array([file.metadata.row_group(int(g)).num_rows for g in needed], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # where each group starts in `table`
        table = table.take(pa.array(offsets[np.searchsorted(needed, groups)] + rows - self.group_starts[groups]))
        labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
        if column == "image":
            images = np.empty(len(table), dtype=object)
            images[:] = table.column("image").to_pylist()
            return {"label": labels, "image": images}
        features = np.asarray(table.column("features").to_pylist(), dtype=np.float32)
        return {"label": labels, "features": features}


def _held_out_train_positions(n: int) -> np.ndarray:
    """Training rows of a single source: `unlearning.data._held_out`'s split, recomputed."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = max(1, int(round(n * TEST_FRACTION)))
    return order[n_test:].sort().values.numpy()


def _parquet_layout(path: Path) -> tuple[int, np.ndarray, str]:
    """(rows, first row of each row group, input kind), from the footer only."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as error:
        raise UserError(f"{path} is not a readable Parquet file ({error})") from None
    columns = set(file.schema_arrow.names)
    for required in ("id", "label"):
        if required not in columns:
            raise UserError(f"{path} has no {required!r} column (columns: {sorted(columns)})")
    if "image" not in columns and "features" not in columns:
        raise UserError(f"{path} needs an 'image' or a 'features' column")
    sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return int(sum(sizes)), starts, "image" if "image" in columns else "features"


def dataset_fingerprint(spec: str | os.PathLike) -> str:
    """`unlearning.load_dataset(spec).fingerprint`, from file bytes only (nothing decoded)."""
    return describe_training_rows(spec).fingerprint


def describe_training_rows(spec: str | os.PathLike) -> TrainingRows:
    """Where each training row of `spec` lives; cheap (footers, file lists, digests)."""
    spec = str(spec)
    if "+" in spec:  # load_dataset's task modifiers rewrite rows; they are not streamed (yet)
        raise UserError(f"data spec {spec!r}: modifiers such as +poison/+coarse are not supported on Ray")
    if spec == "digits":
        train = unlearning.load_dataset("digits")
        return TrainingRows(
            spec=spec,
            num_rows=len(train.train),
            input_kind="image",
            fingerprint=train.fingerprint,
            labels=train.train.labels.numpy(),
            pixels=train.train.inputs.numpy(),
        )
    path = Path(spec)
    if not path.exists():
        raise UserError(f"data set {spec!r} is neither 'digits' nor an existing path")
    if path.is_dir() and (path / "train.parquet").exists():
        train_path, test_path = path / "train.parquet", path / "test.parquet"
        if not test_path.exists():
            raise UserError(f"{path} has train.parquet but no test.parquet")
        num_rows, starts, kind = _parquet_layout(train_path)
        fingerprint = fingerprint_bytes(file_digest(train_path), file_digest(test_path))
        return TrainingRows(spec, num_rows, kind, fingerprint, str(train_path), starts)
    if path.is_file():
        total, starts, kind = _parquet_layout(path)
        if total < 2:
            raise UserError(f"{path}: the training split is empty")
        positions = _held_out_train_positions(total)
        fingerprint = fingerprint_bytes(file_digest(path), f"{TEST_FRACTION}/{SPLIT_SEED}".encode())
        return TrainingRows(spec, len(positions), kind, fingerprint, str(path), starts, positions)
    return _describe_image_folder(path)


def _describe_image_folder(path: Path) -> TrainingRows:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    files, labels = [], []
    digest = hashlib.sha256()
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(str(file))
                labels.append(label)
                digest.update(str(file.relative_to(path)).encode())
                digest.update(file_digest(file))
    if not files:
        raise UserError(f"{path}: no images found in its class sub-folders")
    fingerprint = fingerprint_bytes(digest.digest(), f"{TEST_FRACTION}/{SPLIT_SEED}".encode())
    positions = _held_out_train_positions(len(files))
    return TrainingRows(
        spec=str(path),
        num_rows=len(positions),
        input_kind="image",
        fingerprint=fingerprint,
        files=[files[i] for i in positions],
        labels=np.asarray(labels, dtype=np.int64)[positions],
    )


# ---------------------------------------------------------------- Ray Data stages


@dataclass(frozen=True)
class ChunkPlan:
    """Training rows cut into chunks of whole batches; chunk k goes to worker k % workers."""

    num_rows: int
    batch_size: int
    chunk_rows: int
    workers: int

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_rows / self.chunk_rows)

    def chunks_of(self, rank: int) -> int:
        return len(range(rank, self.num_chunks, self.workers))

    def batch_rows(self, batch_index: int) -> int:
        return min(self.batch_size, self.num_rows - batch_index * self.batch_size)


def plan_chunks(num_rows: int, batch_size: int, workers: int) -> ChunkPlan:
    """About 4+ chunks per worker, each at most ~CHUNK_TARGET_ROWS, always whole batches."""
    num_batches = math.ceil(num_rows / batch_size)
    most = max(1, CHUNK_TARGET_ROWS // batch_size)
    batches_per_chunk = min(most, max(1, num_batches // (4 * workers)))
    chunk_rows = batches_per_chunk * batch_size
    workers = min(workers, math.ceil(num_rows / chunk_rows))
    return ChunkPlan(num_rows, batch_size, chunk_rows, workers)


def _read_chunks(chunk_ids: dict, rows: TrainingRows, plan: ChunkPlan, rank: int):
    """This worker's chunk numbers -> raw rows, in blocks of whole batches."""
    step = max(1, BLOCK_TARGET_ROWS // plan.batch_size) * plan.batch_size
    for local in chunk_ids["id"]:
        chunk = int(local) * plan.workers + rank
        chunk_start = chunk * plan.chunk_rows
        chunk_stop = min(chunk_start + plan.chunk_rows, plan.num_rows)
        for start in range(chunk_start, chunk_stop, step):
            stop = min(start + step, chunk_stop)
            row_index = np.arange(start, stop, dtype=np.int64)
            yield {"row_index": row_index, "batch_index": row_index // plan.batch_size, **rows.read(start, stop)}


def _decode_normalise(block: dict, normalize: dict | None, num_classes: int, where: str) -> dict:
    """Decode images to [0, 1], apply the checkpoint's mean/std."""
    if "image" in block:
        try:
            arrays = [decode_image(data) for data in block["image"]]
        except Exception as error:  # PIL raises many kinds for bad bytes
            raise UserError(f"{where}: an image cannot be decoded ({error})") from None
        if len({a.shape for a in arrays}) > 1:
            raise UserError(f"{where}: images have different shapes; resize them first")
        inputs = torch.from_numpy(np.stack(arrays))
    else:
        inputs = torch.from_numpy(np.array(block.get("pixels", block.get("features")), dtype=np.float32))
    labels = block["label"].astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{where}: labels must be in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return {
        "row_index": block["row_index"],
        "batch_index": block["batch_index"],
        "label": labels,
        "inputs": normalize_batch(inputs, normalize).numpy(),
    }


def _rank_dataset(rank: int, rows, plan: ChunkPlan, normalize: dict | None, num_classes: int):
    """Worker `rank`'s rows as a lazy, streamed Ray Dataset (read -> decode -> normalise)."""
    import ray

    # from_items, not range: a range's read tasks ask for a whole CPU and starve beside the workers
    chunk_numbers = [{"id": local} for local in range(plan.chunks_of(rank))]
    return ray.data.from_items(chunk_numbers, override_num_blocks=len(chunk_numbers)).map_batches(
        _ReadDecodeNormalise,
        batch_size=1,
        num_cpus=DATA_TASK_CPUS,
        compute=ray.data.ActorPoolStrategy(size=DATA_ACTORS_PER_WORKER),
        fn_constructor_kwargs={
            "rows": rows, "plan": plan, "rank": rank, "normalize": normalize, "num_classes": num_classes
        },
    )


class _ReadDecodeNormalise:
    """The one Ray Data stage, in a long-lived actor: read a chunk's rows, decode, normalise.

    An actor, not tasks: on a small machine Ray keeps few idle task processes, so each task
    started a new process that imported torch again (seconds of CPU taken from the workers).
    One fused stage, not two: a second costs an object-store hop per block. See
    implementation-notes, "Distributed importance".
    """

    def __init__(self, rows: TrainingRows, plan: ChunkPlan, rank: int, normalize: dict | None, num_classes: int):
        # One torch thread: this actor has a fraction of a CPU beside the workers, and idle
        # OpenMP threads would spin on the cores they need.
        torch.set_num_threads(1)
        self.rows, self.plan, self.rank = rows, plan, rank
        self.normalize, self.num_classes = normalize, num_classes

    def __call__(self, chunk_ids: dict):
        for block in _read_chunks(chunk_ids, self.rows, self.plan, self.rank):
            yield _decode_normalise(block, self.normalize, self.num_classes, self.rows.spec)


# ---------------------------------------------------------------- the worker group


class _RunChannel:
    """Driver-owned actor: workers report progress and user errors; rank 0 leaves the result."""

    def __init__(self):
        self.rows: dict[int, int] = {}
        self.windows: dict[int, tuple[float, float]] = {}  # rank -> (first batch ready, done)
        self.result = None
        self.user_error: str | None = None

    def progress(self, rank: int, rows: int) -> None:
        self.rows[rank] = rows

    def rows_done(self) -> int:
        return sum(self.rows.values())

    def finished(self, rank: int, first_batch: float, done: float) -> None:
        self.windows[rank] = (first_batch, done)

    def streaming_seconds(self) -> float | None:
        """From the first batch ready on any worker to the last worker done (startup excluded)."""
        if not self.windows:
            return None
        return max(d for _, d in self.windows.values()) - min(f for f, _ in self.windows.values())

    def fail(self, message: str) -> None:
        self.user_error = self.user_error or message

    def get_user_error(self) -> str | None:
        return self.user_error

    def put_result(self, result: dict) -> None:
        self.result = result

    def get_result(self) -> dict | None:
        return self.result


def _whole_batches(shard, plan: ChunkPlan):
    """(inputs, labels) for each fixed batch of this worker, regrouped from Ray Data blocks."""
    pending: dict[int, list[dict]] = {}
    for block in shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        for batch_index in np.unique(block["batch_index"]).tolist():
            rows = block["batch_index"] == batch_index
            pending.setdefault(batch_index, []).append({k: block[k][rows] for k in ("row_index", "inputs", "label")})
            if sum(len(p["row_index"]) for p in pending[batch_index]) == plan.batch_rows(batch_index):
                yield _stack_in_row_order(pending.pop(batch_index))
    if pending:  # chunks hold whole batches, so this is a bug, never a data problem
        raise RuntimeError(f"batches {sorted(pending)[:5]} reached this worker incomplete")


def _stack_in_row_order(parts: list[dict]):
    row_index = np.concatenate([p["row_index"] for p in parts])
    order = np.argsort(row_index, kind="stable")
    inputs = np.concatenate([p["inputs"] for p in parts])[order]
    labels = np.concatenate([p["label"] for p in parts])[order]
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(labels))


def _any_batches(shard, batch_size: int):
    for block in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
        yield torch.from_numpy(np.array(block["inputs"])), torch.from_numpy(np.array(block["label"]))


def _user_error_message(error: BaseException) -> str | None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
            return str(error).strip().splitlines()[-1]
        error = error.__cause__ or error.__context__
    return None


class _WorkerProgress:
    """Counts this worker's rows, tells the driver now and then, and times the streaming part."""

    def __init__(self, channel, rank: int, crash_marker: str | None, last_rank: bool):
        self.channel, self.rank, self.rows = channel, rank, 0
        self.first_batch: float | None = None  # when the first batch was ready (startup done)
        self.last_report = 0.0
        self.crash_marker = crash_marker if last_rank else None
        channel.progress.remote(rank, 0)

    def timed(self, batches):
        for batch in batches:
            if self.first_batch is None:
                self.first_batch = time.time()
            yield batch

    def on_batch(self, size: int) -> None:
        self.rows += size
        if self.crash_marker and not os.path.exists(self.crash_marker):
            Path(self.crash_marker).touch()  # test hook: die once, mid-run, like a killed process
            os._exit(1)
        if time.monotonic() - self.last_report > 0.5:
            self.channel.progress.remote(self.rank, self.rows)
            self.last_report = time.monotonic()

    def done(self) -> None:
        self.channel.progress.remote(self.rank, self.rows)
        self.channel.finished.remote(self.rank, self.first_batch or time.time(), time.time())


def _importance_worker(config: dict) -> None:
    """Runs in each Ray Train worker: partial sums over this worker's batches, then all-reduce."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    channel, plan = config["channel"], config["plan"]
    if ray.get(channel.get_user_error.remote()):
        raise UserError("an earlier attempt already failed on the input")  # do not retry input errors
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config["threads"])
    model = unlearning.load_model(config["model_path"], map_location=device)
    shard = ray.train.get_dataset_shard(f"rank{rank}")
    batches = _whole_batches(shard, plan) if config["mode"] == "batch" else _any_batches(shard, plan.batch_size)
    if config["channels_last"]:  # the same memory layout as load_dataset's, hence the same rounding
        batches = ((x.contiguous(memory_format=torch.channels_last), y) for x, y in batches)
    progress = _WorkerProgress(channel, rank, config.get("crash_marker"), rank == world - 1)
    try:
        partial = unlearning.compute_importance_sums(
            model,
            progress.timed(batches),
            kind=config["kind"],
            mode=config["mode"],
            device=device,
            on_batch=progress.on_batch,
        )
    except Exception as error:
        message = _user_error_message(error)
        if message:
            ray.get(channel.fail.remote(message))
        raise
    progress.done()

    # One all-reduce of [every sum, flattened | count | samples], all float64: exact to ~1e-16.
    names = sorted(partial.sums)
    flat = torch.cat(
        [partial.sums[name].flatten() for name in names]
        + [torch.tensor([partial.count, partial.num_samples], dtype=torch.float64)]
    ).to(device)
    if world > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    if rank == 0:
        sums, offset = {}, 0
        for name in names:
            size = partial.sums[name].numel()
            sums[name] = flat[offset : offset + size].view_as(partial.sums[name]).clone()
            offset += size
        count, samples = (int(round(v)) for v in flat[offset:].tolist())
        ray.get(channel.put_result.remote({"sums": sums, "count": count, "num_samples": samples}))


# ---------------------------------------------------------------- the driver


def _check_arguments(workers: int, kind: str, mode: str, batch_size: int) -> None:
    if kind not in KINDS:
        raise UserError(f"importance kind {kind!r} is not one of {', '.join(KINDS)}")
    if mode not in MODES:
        raise UserError(f"importance mode {mode!r} is not one of {', '.join(MODES)}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")


def _check_first_row(rows: TrainingRows, model) -> bool:
    """Decode the first training row on the driver, so a wrong model fails in one line.

    Returns whether `unlearning.load_dataset` would hold these inputs channels-last: its image
    decoder stacks HWC arrays, and a convolution over channels-last memory rounds differently
    (1e-3 relative for resnet_small), so workers give their batches the same layout.
    """
    first = rows.read(0, 1)
    if "image" in first:
        try:
            inputs = decode_images([first["image"][0]], rows.spec)
        except UserError:
            raise UserError(f"{rows.spec}: the first training image cannot be decoded") from None
    else:
        inputs = torch.as_tensor(np.asarray(first.get("pixels", first.get("features"))))
    expected = tuple(model.amnesis_meta["input_shape"])
    if tuple(inputs.shape[1:]) != expected:
        raise UserError(f"{rows.spec}: inputs have shape {tuple(inputs.shape[1:])}, the model expects {expected}")
    return inputs.dim() == 4 and not inputs.is_contiguous() and inputs.is_contiguous(memory_format=torch.channels_last)


def _worker_resources(cluster: dict, workers: int) -> tuple[bool, dict, int]:
    """(use_gpu, resources per worker, torch threads per worker), explicit for small boxes."""
    if cluster.get("GPU", 0) > 0:
        return True, {"CPU": 1, "GPU": 1}, 1
    data_actors = workers * DATA_ACTORS_PER_WORKER * DATA_TASK_CPUS  # each must fit beside the workers
    spare = max(cluster.get("CPU", 1) - data_actors, 0.1 * workers)
    cpus = round(spare / workers, 3)
    return False, {"CPU": cpus}, max(1, round(cpus))


def _show_progress(channel, total: int, stop: threading.Event, label: str) -> None:
    import ray
    from tqdm import tqdm

    with tqdm(total=total, unit="rows", desc=label, dynamic_ncols=True) as bar:
        while True:
            stopped = stop.wait(0.5)
            try:
                done = min(total, ray.get(channel.rows_done.remote(), timeout=5))
            except Exception:  # progress is best effort
                done = bar.n
            if done != bar.n:  # may go down: a restarted worker group starts again
                bar.n = done
                bar.refresh()
            if stopped:
                return


def compute_importance_on_ray(
    model_path: str | os.PathLike,
    data_spec: str | os.PathLike,
    workers: int = 2,
    kind: str = "fisher",
    mode: str = "per_sample",
    batch_size: int = 64,
    progress: bool = True,
    positions: np.ndarray | None = None,
    label: str = "importance",
) -> unlearning.ImportanceSums:
    """Importance (sum, count) of the model at `model_path` over the training split of `data_spec`.

    Equal to `unlearning.compute_importance_sums(model, split.batches(batch_size), kind, mode)`
    in one process, for any number of workers (float64 sums; 1e-6 relative or better).
    `positions` (increasing training row numbers) restricts it to those rows, e.g. a forget set;
    `label` names the progress bar.
    """
    import ray
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    _check_arguments(workers, kind, mode, batch_size)
    model = unlearning.load_model(model_path)
    rows = describe_training_rows(data_spec)
    if positions is not None:
        rows = rows.select(positions)
    channels_last = _check_first_row(rows, model)
    meta = model.amnesis_meta
    plan = plan_chunks(rows.num_rows, batch_size, workers)

    cluster = ensure_ray()
    use_gpu, per_worker, threads = _worker_resources(cluster, plan.workers)
    channel = ray.remote(num_cpus=0)(_RunChannel).remote()
    datasets = {
        f"rank{rank}": _rank_dataset(rank, rows, plan, meta.get("normalize"), meta["num_classes"])
        for rank in range(plan.workers)
    }
    config = {
        "channel": channel,
        "plan": plan,
        "model_path": str(Path(model_path).resolve()),
        "kind": kind,
        "mode": mode,
        "threads": threads,
        "channels_last": channels_last,
        "crash_marker": os.environ.get(CRASH_HOOK_ENV),
    }
    storage = tempfile.mkdtemp(prefix="amnesis-importance-")
    trainer = TorchTrainer(
        _importance_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=plan.workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=f"importance-{uuid.uuid4().hex[:8]}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # each worker reads only its own chunks
    )
    stop = threading.Event()
    display = None
    if progress:
        display = threading.Thread(target=_show_progress, args=(channel, rows.num_rows, stop, label), daemon=True)
        display.start()
    try:
        trainer.fit()
        result = ray.get(channel.get_result.remote())
        streaming_seconds = ray.get(channel.streaming_seconds.remote())
    except Exception as error:
        message = ray.get(channel.get_user_error.remote())
        if message:
            raise UserError(message) from None
        raise RuntimeError(f"distributed importance failed: {str(error).splitlines()[0]}") from error
    finally:
        stop.set()
        if display is not None:
            display.join()
        ray.kill(channel)
        shutil.rmtree(storage, ignore_errors=True)
    if result is None or result["num_samples"] != rows.num_rows:
        raise RuntimeError(f"distributed importance saw {result and result['num_samples']} of {rows.num_rows} rows")
    return unlearning.ImportanceSums(
        sums=result["sums"],
        count=result["count"],
        kind=kind,
        mode=mode,
        num_samples=result["num_samples"],
        batch_size=batch_size,
        meta={
            "workers": plan.workers,
            "dataset_fingerprint": rows.fingerprint,
            "seconds_streaming": streaming_seconds,
        },
    )


def build_importance_store(
    model_path: str | os.PathLike,
    data_spec: str | os.PathLike,
    out: str | os.PathLike,
    workers: int = 2,
    kind: str = "fisher",
    mode: str = "per_sample",
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Compute importance on Ray and write it as an importance store at `out`; returns its meta.

    Nothing is written unless the run finishes (`out` appears atomically, or not at all).
    """
    if Path(out).exists():
        raise UserError(f"{out} already exists; choose a new output path (nothing is overwritten)")
    started = time.monotonic()
    sums = compute_importance_on_ray(model_path, data_spec, workers, kind, mode, batch_size, progress)
    model = unlearning.load_model(model_path)
    return unlearning.save_importance(
        sums,
        out,
        model_fingerprint=unlearning.model_fingerprint(model),
        dataset_fingerprint=sums.meta["dataset_fingerprint"],
        extra={
            "data": str(data_spec),
            "model": str(model_path),
            "workers": sums.meta["workers"],
            "seconds": round(time.monotonic() - started, 3),
        },
    )


# ---------------------------------------------------------------- requests: large splits on Ray

class RayImportanceBackend:
    """`UnlearningTask.importance_backend`: a large split's importance on Ray, others in-process.

    A request's splits (D_f, D_r, D) are subsets of the training rows; this maps a split's ids
    to training row numbers and runs `compute_importance_on_ray` over just those rows, reading
    them from the data files again (the driver's copy is not shipped). It declines (returns
    None, so the task computes in-process) below `min_rows`, for shuffled batch-mode batches,
    and for data specs with +modifiers, which are not streamed. `runs` records what ran where.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        data_spec: str,
        train_ids: torch.Tensor,
        dataset_fingerprint: str,
        workers: int = 2,
        min_rows: int = DEFAULT_RAY_MIN_ROWS,
        progress: bool = True,
    ):
        self.model_path, self.data_spec = str(model_path), str(data_spec)
        self.fingerprint, self.workers, self.min_rows, self.progress = dataset_fingerprint, workers, min_rows, progress
        ids = np.asarray(train_ids, dtype=np.int64)
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self.runs: list[dict] = []

    def positions(self, ids: torch.Tensor) -> np.ndarray:
        """Training row numbers of `ids`, in the given order."""
        ids = np.asarray(ids, dtype=np.int64)
        found = np.searchsorted(self._sorted_ids, ids).clip(max=len(self._sorted_ids) - 1)
        if len(ids) and not np.array_equal(self._sorted_ids[found], ids):
            raise RuntimeError("a split holds ids that are not training rows")
        return self._order[found]

    def __call__(self, split, kind: str, mode: str, batch_size: int, shuffled: bool):
        if len(split) < max(self.min_rows, 1) or "+" in self.data_spec or (shuffled and mode == "batch"):
            return None
        positions = self.positions(split.ids)
        if mode == "batch" and np.any(np.diff(positions) <= 0):
            return None  # Ray workers form batches in training-row order; this split is in another
        started = time.monotonic()
        sums = compute_importance_on_ray(
            self.model_path, self.data_spec, self.workers, kind, mode, batch_size,
            progress=self.progress, positions=np.sort(positions), label=f"importance of {len(split)} rows",
        )
        if sums.meta["dataset_fingerprint"] != self.fingerprint:
            raise RuntimeError(f"{self.data_spec} changed while the request ran (fingerprint differs)")
        self.runs.append({
            "rows": len(split), "kind": kind, "mode": mode, "workers": sums.meta["workers"],
            "seconds": round(time.monotonic() - started, 3),
        })
        return sums


# ---------------------------------------------------------------- command line


def add_importance_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `unlearn importance`."""
    parser.add_argument("--model", required=True, help="model checkpoint directory")
    parser.add_argument("--data", required=True, help="digits, a Parquet file, a train/test directory, or an image folder")
    parser.add_argument("--out", required=True, help="importance store directory to create")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--kind", choices=KINDS, default="fisher", help="importance kind (default fisher)")
    parser.add_argument("--mode", choices=MODES, default="per_sample", help="per_sample (exact) or batch (the papers')")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    return parser


def run_importance_command(args: argparse.Namespace) -> int:
    """`unlearn importance`: build the store, print one summary line; UserError on bad input."""
    meta = build_importance_store(
        args.model,
        args.data,
        args.out,
        workers=args.workers,
        kind=args.kind,
        mode=args.mode,
        batch_size=args.batch_size,
        progress=not getattr(args, "quiet", False),  # the CLI's global --quiet
    )
    print(
        f"importance store {args.out}: {meta['kind']}/{meta['mode']} over {meta['num_samples']} rows "
        f"({meta['count']} terms) with {meta['workers']} workers in {meta['seconds']:.1f} s"
    )
    return 0
