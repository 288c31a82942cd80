"""`unlearn hyperforget train`: collect checkpoints on Ray, train DiHyFo, record it in MLflow.

1. Checkpoints: one Ray task per training run (`unlearning.hyperforget.collect_run`), each
   reading the data from its spec and writing its snapshots as one Parquet shard,
   `run-NNNNN.parquet`, atomically, under `--checkpoints` (default `HYPERNET.checkpoints`,
   beside the output). A shard already there for the same model, data and settings is kept, so
   a killed collection goes on where it stopped; one made for anything else is refused.
2. DiHyFo: the basis is fitted on the shards in the driver (an N x N problem), the denoiser
   with Ray Train, data parallel (DDP, gloo on CPU, NCCL on GPU), each worker drawing its share
   of every batch; rank 0 hands back the EMA weights. The hypernetwork directory appears
   atomically at `--out`.
3. MLflow: one run (experiment `amnesis`, tag `kind=hyperforget-train`) with the settings,
   the loss curve and the timings.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

import unlearning
from unlearning.checkpoint import model_fingerprint, model_meta
from unlearning.errors import UserError
from unlearning.hyperforget import (
    HypernetConfig,
    RunPlan,
    collect_run,
    plan_runs,
    probe_rows,
    save_hypernet,
)
from unlearning.hyperforget.hypernet import train_hypernet
from unlearning.training import TrainConfig

SHARD_META = b"amnesis.hyperforget"


def shard_path(directory: Path, plan: RunPlan) -> Path:
    return directory / f"run-{plan.index:05d}.parquet"


def write_shard(path: Path, plan: RunPlan, snapshots: list[dict], settings: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "run": pa.array([plan.index] * len(snapshots), pa.int32()),
        "step": pa.array([s["step"] for s in snapshots], pa.int32()),
        "final": pa.array([i == len(snapshots) - 1 for i in range(len(snapshots))]),
        "params": pa.array([s["params"].numpy() for s in snapshots], pa.list_(pa.float32())),
        "losses": pa.array([s["losses"].numpy() for s in snapshots], pa.list_(pa.float64())),
    })
    meta = {**settings, "run": plan.index, "left_out": list(plan.left_out), "seed": plan.seed}
    table = table.replace_schema_metadata({SHARD_META: json.dumps(meta, sort_keys=True).encode()})
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, staging)
    staging.replace(path)


def shard_settings(path: Path) -> dict | None:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[SHARD_META])
    except (OSError, KeyError, ValueError):
        return None


def _collect_one(model, data_spec: str, plan: RunPlan, config: TrainConfig, every: int, directory: str,
                 settings: dict, threads: int | None = None) -> int:
    """One run, anywhere: its snapshots written as a shard; returns the snapshot count."""
    if threads:
        torch.set_num_threads(threads)
    dataset = unlearning.load_dataset(data_spec)
    probe = dataset.train.subset(dataset.index_of(torch.tensor(settings["probe_ids"])))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    snapshots = collect_run(model, dataset, plan, config, probe, every, device)
    write_shard(shard_path(Path(directory), plan), plan, snapshots, {k: v for k, v in settings.items() if k != "probe_ids"})
    return len(snapshots)


def collect(model, data_spec: str, dataset, directory: Path, runs: int, every: int, config: TrainConfig,
            probe_ids: torch.Tensor, workers: int | None, in_process: bool, seed: int = 0) -> dict:
    """Every planned run's shard in `directory`; returns {"ran", "kept", "seconds"}."""
    settings = {"model_fingerprint": model_fingerprint(model), "data_fingerprint": dataset.fingerprint,
                "every": every, "recipe": config.to_dict()}
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".run-*.parquet.tmp*"):  # a run killed while writing its shard
        stale.unlink(missing_ok=True)
    todo = []
    for plan in plan_runs(dataset.num_classes, runs, seed):
        path = shard_path(directory, plan)
        if path.exists():
            found = shard_settings(path)
            mine = {**settings, "run": plan.index, "left_out": list(plan.left_out), "seed": plan.seed}
            if found != json.loads(json.dumps(mine, sort_keys=True)):
                raise UserError(f"{path} was collected for another model, data set or settings; "
                                f"pass another --checkpoints directory")
            continue
        todo.append(plan)
    started = time.perf_counter()
    settings = {**settings, "probe_ids": probe_ids.tolist()}
    if in_process:
        for plan in todo:
            _collect_one(model, data_spec, plan, config, every, str(directory), settings)
    elif todo:
        _collect_on_ray(model, data_spec, todo, config, every, directory, settings, workers)
    return {"ran": len(todo), "kept": runs - len(todo), "seconds": time.perf_counter() - started}


def _collect_on_ray(model, data_spec, todo, config, every, directory, settings, workers) -> None:
    """The runs as Ray tasks, at most `workers` at a time; each shard lands as its run ends."""
    import ray

    from pipelines.ray_session import ensure_ray, run_tasks

    ensure_ray()  # before ray.put, whose auto-init would join (or hang on) another cluster
    model_ref = ray.put(model)
    run_tasks(_collect_one, [(model_ref, data_spec, plan, config, every, str(directory), settings) for plan in todo],
              workers)


def read_shards(directory: Path, runs: int, num_classes: int, seed: int = 0):
    """(params [N, D], losses [N, C], final [N], left_out per row) of the planned runs' shards."""
    import pyarrow.parquet as pq

    params, losses, final, left_out = [], [], [], []
    for plan in plan_runs(num_classes, runs, seed):
        table = pq.read_table(shard_path(directory, plan))
        params.append(torch.tensor(table.column("params").to_pylist(), dtype=torch.float32))
        losses.append(torch.tensor(table.column("losses").to_pylist(), dtype=torch.float64))
        final.append(torch.tensor(table.column("final").to_pylist()))
        left_out += [plan.left_out] * table.num_rows
    return torch.cat(params), torch.cat(losses), torch.cat(final), left_out


def train_hyperforget(model_path: str, data_spec: str, out: str, runs: int = 22, every: int | None = None,
                      epochs: int | None = None, workers: int | None = None, checkpoints: str | None = None,
                      config: HypernetConfig | None = None, in_process: bool = False, track: bool = True) -> dict:
    """Collect, train, save, record; returns the hypernetwork's info (its hypernet.json)."""
    from unlearning.outputs import check_output_path

    check_output_path(out)
    config = config or HypernetConfig()
    if runs < 2:
        raise UserError(f"--runs must be at least 2 (a run on every class and one leaving one out), got {runs}")
    model = unlearning.load_model(model_path)
    meta = model_meta(model)
    recipe = meta.get("train_config")
    if not recipe:
        raise UserError("HyperForget's runs follow the original's training recipe; this checkpoint has none "
                        "(train it with `unlearn train`)")
    recipe = TrainConfig(**recipe)
    recipe = replace(recipe, epochs=epochs) if epochs else recipe
    dataset = unlearning.load_dataset(data_spec)
    if tuple(meta["input_shape"]) != dataset.input_shape or meta["num_classes"] != dataset.num_classes:
        raise UserError(f"{model_path} does not fit {data_spec} (input shape or class count differ)")
    steps_per_epoch = -(-len(dataset.train) // recipe.batch_size)
    every = every or steps_per_epoch  # a snapshot per epoch by default
    directory = Path(checkpoints or f"{out}.checkpoints")
    probe_ids = probe_rows(dataset)
    collected = collect(model, data_spec, dataset, directory, runs, every, recipe, probe_ids, workers, in_process)
    params, losses, final, left_out = read_shards(directory, runs, dataset.num_classes)
    curve: list[tuple[int, float]] = []
    started = time.perf_counter()
    info = {"arch": meta["arch"], "model_fingerprint": model_fingerprint(model), "data": str(data_spec),
            "data_fingerprint": dataset.fingerprint, "runs": runs, "every": every, "recipe": recipe.to_dict(),
            "checkpoints_dir": str(directory), "collect_seconds": collected["seconds"], "runs_kept": collected["kept"]}
    ran: dict = {"denoiser_workers": 0}  # 0: trained in this process
    fit = None if in_process else (lambda z, condition, cfg: fit_denoiser_on_ray(z, condition, cfg, workers, curve, ran))
    net = train_hypernet(params, losses, final, left_out, probe_ids, config, info,
                         on_step=lambda step, loss: curve.append((step, loss)) if step % 50 == 0 else None,
                         fit_denoiser=fit)
    net.info["train_seconds"] = time.perf_counter() - started
    net.info.update(ran)
    net.info["final_loss"] = sum(loss for _, loss in curve[-10:]) / max(1, len(curve[-10:]))
    save_hypernet(net, out)
    if track:
        _track(out, net, curve)
    return {**net.info, "config": config.to_dict()}


def _track(out: str, net, curve) -> None:
    from pipelines.tracking import EXPERIMENT, _mlflow

    mlflow = _mlflow()
    mlflow.set_experiment(EXPERIMENT)
    numbers = {k: v for k, v in net.info.items() if isinstance(v, (int, float))}
    with mlflow.start_run(run_name=f"hyperforget-train {Path(out).name}", tags={"kind": "hyperforget-train"}):
        mlflow.log_params({"arch": net.info["arch"], "data": net.info["data"], **net.config.to_dict(),
                           "runs": net.info["runs"], "every": net.info["every"]})
        mlflow.log_metrics({k: float(v) for k, v in numbers.items() if k not in ("runs", "every")})
        for step, loss in curve:
            mlflow.log_metric("denoiser_loss", loss, step=step)
        mlflow.log_artifacts(out, artifact_path="hypernet")


class DenoiserChannel:
    """Driver-owned actor: rank 0 leaves the trained EMA weights and its loss curve here."""

    def __init__(self):
        self.found = None

    def put(self, state: dict, curve: list) -> None:
        self.found = (state, curve)

    def get(self):
        return self.found


def _denoiser_worker(loop: dict) -> None:
    """One Ray Train worker: its share of every batch, DDP-averaged gradients."""
    import ray
    import ray.train
    from ray.train.torch import get_device, prepare_model

    from unlearning.hyperforget.diffusion import train_denoiser

    torch.set_num_threads(loop["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    curve: list = []
    ema = train_denoiser(loop["z"], loop["condition"], loop["config"], device=get_device(), rank=rank, world=world,
                         wrap=prepare_model,
                         on_step=lambda step, loss: curve.append((step, loss)) if rank == 0 and step % 50 == 0 else None)
    if rank == 0:
        ray.get(loop["channel"].put.remote(ema.state_dict(), curve))


def fit_denoiser_on_ray(z, condition, config: HypernetConfig, workers: int | None, curve: list, ran: dict):
    """The denoiser trained by a TorchTrainer of `workers` (default 2, capped by the cluster)."""
    import shutil
    import uuid

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.distributed.plan import worker_resources
    from pipelines.ray_session import ensure_ray, fit_off_main_thread, resolve_workers, run_storage
    from unlearning.hyperforget.diffusion import Denoiser

    cluster = ensure_ray()
    count = resolve_workers(workers, cluster)
    ran["denoiser_workers"] = count
    use_gpu, per_worker, threads = worker_resources(cluster, count)
    channel = ray.remote(num_cpus=0)(DenoiserChannel).remote()
    storage, temporary = run_storage("hyperforget")
    trainer = TorchTrainer(
        _denoiser_worker,
        train_loop_config={"z": z, "condition": condition, "config": config, "channel": channel, "threads": threads},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=count, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=f"hyperforget-{uuid.uuid4().hex[:8]}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=0)),
    )
    try:
        fit_off_main_thread(trainer.fit)
        found = ray.get(channel.get.remote())
    finally:
        ray.kill(channel)
        if temporary:
            shutil.rmtree(storage, ignore_errors=True)
    if found is None:
        raise RuntimeError("the denoiser's Ray Train run ended without rank 0's weights")
    state, rank0_curve = found
    curve.extend(rank0_curve)
    denoiser = Denoiser(z.shape[1], condition.shape[1], config.hidden, config.blocks)
    denoiser.load_state_dict(state)
    return denoiser.eval()
