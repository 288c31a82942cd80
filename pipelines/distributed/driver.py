"""Step 4, on the driver: plan -> Ray Datasets -> TorchTrainer -> collect the all-reduced sums.

The driver describes the split without decoding it (`unlearning.data.open_source`), plans
chunks of whole batches, gives each worker its own streamed Ray Dataset, and runs the worker
group. A worker that dies restarts the group (`FailureConfig`); partials are reduced only at
the end, so a restart simply recomputes. See docs/implementation-notes.md.
"""

from __future__ import annotations

import copy
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

import unlearning
from pipelines.distributed.data_stage import rank_dataset
from pipelines.distributed.plan import plan_chunks, worker_resources
from pipelines.distributed.rows import RaySplit
from pipelines.distributed.worker import RunChannel, importance_worker
from pipelines.ray_session import (
    DEFAULT_RAY_MIN_ROWS,
    ensure_ray,
    fit_off_main_thread,
    resolve_workers,
    run_storage,
)
from unlearning.checkpoint import model_meta
from unlearning.data import Split, open_dataset
from unlearning.data.rows import is_lazy
from unlearning.errors import UserError
from unlearning.importance import KINDS, MODES
from unlearning.models import factory_module
from unlearning.outputs import OutputExists
from unlearning.passes import LocalExecutor

MAX_FAILURES = 3  # worker-group restarts before a run gives up


def training_split(data: str | os.PathLike | Split) -> tuple[Split, str, str]:
    """(the training split, left in its files; the data set's fingerprint; its name for messages)."""
    if isinstance(data, Split):
        return data, "", "the split"
    dataset = open_dataset(data)
    return dataset.train, dataset.fingerprint, str(data)


def check_arguments(workers: int | None, kind: str, mode: str, batch_size: int) -> None:
    if kind not in KINDS:
        raise UserError(f"importance kind {kind!r} is not one of {', '.join(KINDS)}")
    if mode not in MODES:
        raise UserError(f"importance mode {mode!r} is not one of {', '.join(MODES)}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")


def check_first_row(split: Split, model, where: str) -> bool:
    """Decode the first row on the driver, so a wrong model fails in one line.

    Returns whether the library's decoder gives these inputs channels-last (it stacks HWC
    arrays), since a convolution over channels-last memory rounds differently (1e-3 relative
    for resnet_small): workers give their batches the same layout as an in-process pass.
    """
    try:
        inputs = split.inputs.read([0]) if is_lazy(split.inputs) else split.inputs[:1]
    except UserError:
        raise UserError(f"{where}: the first training row cannot be decoded") from None
    meta = model_meta(model)
    expected = tuple(meta["input_shape"])
    if tuple(inputs.shape[1:]) != expected:
        raise UserError(f"{where}: inputs have shape {tuple(inputs.shape[1:])}, the model expects {expected}")
    if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= meta["num_classes"]):
        low, high = int(split.labels.min()), int(split.labels.max())
        raise UserError(f"{where}: labels must be in 0..{meta['num_classes'] - 1}, found {low}..{high}")
    return inputs.dim() == 4 and not inputs.is_contiguous() and inputs.is_contiguous(memory_format=torch.channels_last)


def show_progress(channel, total: int, stop: threading.Event, label: str) -> None:
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
    model: str | os.PathLike | torch.nn.Module,
    data: str | os.PathLike | Split,
    workers: int | None = None,
    kind: str = "fisher",
    mode: str = "per_sample",
    batch_size: int = 64,
    progress: bool = True,
    positions: np.ndarray | None = None,
    label: str = "importance",
    fault=None,
) -> unlearning.ImportanceSums:
    """Importance (sum, count) of `model` (a module, or a checkpoint path read on the driver)
    over the training split of the data spec `data` (or over a `Split` left in its files, from
    `unlearning.data.open_dataset`). Rows are read where the workers are; the model reaches
    them through Ray's object store, never as a path on the driver's disk.

    Equal to `unlearning.compute_importance_sums(model, split.batches(batch_size), kind, mode)`
    in one process, for any number of workers (float64 sums; 1e-6 relative or better).
    `workers=None` runs 2, or fewer if the cluster holds fewer; a count it cannot hold is
    refused (`pipelines.ray_session.resolve_workers`).
    `positions` (increasing row numbers) restricts it to those rows, e.g. a forget set;
    `label` names the progress bar; `fault(rank, rows_done)` runs in every worker after each
    batch (tests kill a worker with it).
    """
    check_arguments(workers, kind, mode, batch_size)
    model = model if isinstance(model, torch.nn.Module) else unlearning.load_model(model)
    split, fingerprint, where = training_split(data)
    if positions is not None:
        if len(positions) == 0:
            raise UserError(f"{where}: no training rows selected")
        split = split.subset(torch.as_tensor(np.asarray(positions, dtype=np.int64)))
    if not is_lazy(split.inputs):
        raise ValueError("distributed importance reads rows from their files: pass a split from open_dataset")
    channels_last = check_first_row(split, model, where)
    config = {"kind": kind, "mode": mode, "fault": fault, "channels_last": channels_last}
    cluster = ensure_ray()
    plan = plan_chunks(len(split), batch_size, resolve_workers(workers, cluster))
    rows = RaySplit.of(split, model_meta(model).get("normalize"))
    result, streaming_seconds = _fit(rows, plan, model, config, cluster, label if progress else None)
    if result is None or result["num_samples"] != len(split):
        raise RuntimeError(f"distributed importance saw {result and result['num_samples']} of {len(split)} rows")
    return unlearning.ImportanceSums(
        sums=result["sums"], count=result["count"], kind=kind, mode=mode,
        num_samples=result["num_samples"], batch_size=batch_size,
        meta={"workers": plan.workers, "dataset_fingerprint": fingerprint, "seconds_streaming": streaming_seconds},
    )


def _fit(rows: RaySplit, plan, model, config: dict, cluster: dict, label: str | None):
    """Run the worker group; returns (rank 0's all-reduced result, streaming seconds)."""
    import ray

    use_gpu, per_worker, threads = worker_resources(cluster, plan.workers, cuda_on_gpu_nodes(cluster))
    channel = ray.remote(num_cpus=0)(RunChannel).remote()
    datasets = {f"rank{rank}": rank_dataset(rank, rows, plan) for rank in range(plan.workers)}
    storage, temporary = run_storage("importance")
    model_ref = ray.put(cpu_model(model))
    trainer = _trainer({**config, "model": model_ref, "channel": channel, "plan": plan, "threads": threads},
                       datasets, plan.workers, use_gpu, per_worker, storage)
    stop, display = threading.Event(), None
    if label is not None:
        display = threading.Thread(target=show_progress, args=(channel, plan.num_rows, stop, label), daemon=True)
        display.start()
    try:
        fit_off_main_thread(trainer.fit)  # Ctrl-C stays a KeyboardInterrupt (ray_session)
        return ray.get(channel.get_result.remote()), ray.get(channel.streaming_seconds.remote())
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
        if temporary:
            shutil.rmtree(storage, ignore_errors=True)


def cpu_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model as it goes into the object store: itself if on CPU, else a CPU copy (the
    caller's model stays on its device). A user's model class travels with it (`ship_code`)."""
    ship_code(model)
    if all(t.device.type == "cpu" for t in model.state_dict().values()):
        return model
    return copy.deepcopy(model).cpu()


def ship_code(model: torch.nn.Module) -> None:
    """Pickle a user factory's module by value, so that workers rebuild the model's classes
    without that module being installed or on their PYTHONPATH (a file outside the project,
    a notebook's module). Registered, torchvision and timm models travel by reference."""
    import sys

    from ray import cloudpickle

    name = factory_module(getattr(model, "amnesis_meta", {}).get("arch", ""))
    module = sys.modules.get(name) if name else None
    if module is not None and getattr(module, "__file__", None):
        cloudpickle.register_pickle_by_value(module)


def cuda_on_gpu_nodes(cluster: dict) -> bool:
    """Whether CUDA works where the cluster's GPUs are (a task asks for one and looks)."""
    import ray

    if cluster.get("GPU", 0) <= 0:
        return False
    probe = ray.remote(num_gpus=1, num_cpus=0)(torch.cuda.is_available)
    return bool(ray.get(probe.remote(), timeout=300))


def _trainer(config: dict, datasets: dict, workers: int, use_gpu: bool, per_worker: dict, storage: str):
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        importance_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=f"importance-{uuid.uuid4().hex[:8]}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # each worker reads only its own chunks
    )


def build_importance_store(model_path: str | os.PathLike, data_spec: str | os.PathLike, out: str | os.PathLike,
                           workers: int | None = None, kind: str = "fisher", mode: str = "per_sample", batch_size: int = 64,
                           progress: bool = True, min_rows: int | None = DEFAULT_RAY_MIN_ROWS, device: str = "cpu") -> dict:
    """Compute importance and write it as an importance store at `out`; returns its meta.

    On Ray when the training split has at least `min_rows` rows (0: always; None: never),
    else in this process on `device` (Ray's start-up would cost more than it saves); the
    numbers are the same. Nothing is written unless the run finishes (`out` appears
    atomically, or not at all).
    """
    if Path(out).exists():
        raise OutputExists(out)
    check_arguments(workers, kind, mode, batch_size)
    started = time.monotonic()
    model = unlearning.load_model(model_path)
    dataset = open_dataset(data_spec)
    if min_rows is not None and len(dataset.train) >= min_rows:
        sums = compute_importance_on_ray(model, dataset.train, workers, kind, mode, batch_size, progress)
        where = sums.meta["workers"]
    else:
        check_first_row(dataset.train, model, str(data_spec))
        sums = LocalExecutor(device).importance(model.to(device), dataset.train, kind, mode, batch_size,
                                                model_meta(model).get("normalize"))
        where = 0  # in this process
    return unlearning.save_importance(
        sums,
        out,
        model_fingerprint=unlearning.model_fingerprint(model),
        dataset_fingerprint=dataset.fingerprint,
        extra={
            "data": str(data_spec),
            "model": str(model_path),
            "workers": where,
            "seconds": round(time.monotonic() - started, 3),
        },
    )
