"""One deletion request, start to finish: load, unlearn, evaluate, write the run directory.

The run directory (DESIGN.md, files) holds the new checkpoint, `report.json` and the forget
manifest `forget_ids.txt`; it appears atomically and never replaces an existing path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import unlearning
from pipelines.importance import RayImportanceBackend
from pipelines.ray_session import DEFAULT_RAY_MIN_ROWS
from unlearning.checkpoint import atomic_directory, model_meta, write_json, write_model_files
from unlearning.data import Dataset, ForgetSet, split_forget
from unlearning.errors import UserError
from unlearning.evaluation import evaluate_model
from unlearning.methods import MethodOutput, UnlearningTask
from unlearning.training import TrainConfig

DEFAULT_METHOD = "ptn"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ForgetOptions:
    method: str = DEFAULT_METHOD
    params: dict = field(default_factory=dict)
    importance_store: str | None = None
    mode: str = "per_sample"
    batch_size: int = 64
    seed: int = 0
    device: str = field(default_factory=default_device)
    rho: float | None = None
    search: str | None = None  # a tune_configs/*.yaml file: search on Ray Tune instead
    compare_retrain: bool = False  # also retrain from scratch and report it alongside
    zrf: bool = False  # also report ZRF against a randomly initialised model of the same architecture
    plots: bool = True  # report.md and PNGs in the run directory
    batch_tag: str | None = None  # the ledger batch this request belongs to (a registry tag)
    track: bool = True  # record the request in MLflow
    model_name: str | None = None  # registered model name (default: <arch>-<data set>)
    workers: int = 2  # Ray workers for a large split's importance
    ray_min_rows: int | None = DEFAULT_RAY_MIN_ROWS  # splits this large go to Ray; None: never
    show_progress: bool = True  # progress bars of importance runs on Ray


@dataclass
class PreparedRequest:
    model: torch.nn.Module
    dataset: Dataset
    forget: ForgetSet
    task: UnlearningTask
    store_meta: dict | None


def prepare_request(
    model_path: str,
    data_spec: str,
    forget_spec: str,
    options: ForgetOptions,
    removed_before: list[int] | None = None,
) -> PreparedRequest:
    """Load everything a request needs. Rows removed by earlier requests are dropped first."""
    if not options.search:
        unlearning.get_method(options.method)  # unknown names fail before any loading
    model = unlearning.load_model(model_path)
    dataset = unlearning.load_dataset(data_spec)
    training_ids = dataset.train.ids  # before earlier removals: row i is training row i on disk
    if removed_before:
        gone = torch.isin(dataset.train.ids, torch.tensor(removed_before, dtype=torch.int64))
        dataset = replace(dataset, train=dataset.train.where(~gone))
    meta = model_meta(model)
    if meta["num_classes"] != dataset.num_classes or tuple(meta["input_shape"]) != dataset.input_shape:
        raise UserError(
            f"model {model_path} expects {meta['num_classes']} classes of shape {tuple(meta['input_shape'])}, "
            f"data {data_spec} has {dataset.num_classes} of shape {dataset.input_shape}"
        )
    forget = unlearning.parse_forget(forget_spec, dataset, seed=options.seed)
    retain_split, forget_split = split_forget(dataset, forget)
    full_importance, store_meta, store_kind = None, None, None
    if options.importance_store:
        full_importance, store_meta = unlearning.load_importance(options.importance_store, model)
        store_kind = store_meta.get("kind")
        if store_meta.get("dataset_fingerprint") not in (None, dataset.fingerprint):
            raise UserError(
                f"importance store {options.importance_store} was computed on another data set "
                f"({store_meta.get('dataset_fingerprint')}), not {data_spec} ({dataset.fingerprint})"
            )
    recipe = meta.get("train_config")
    task = UnlearningTask(
        model=model.to(options.device),
        dataset=dataset,
        forget=forget,
        retain_split=retain_split,
        forget_split=forget_split,
        normalize=meta.get("normalize"),
        importance_mode=options.mode,
        batch_size=options.batch_size,
        seed=options.seed,
        device=options.device,
        train_config=TrainConfig(**recipe) if recipe else None,
        full_importance=full_importance,
        full_importance_kind=store_kind,
        full_importance_mode=(store_meta or {}).get("mode"),
        rho=options.rho,
    )
    if options.ray_min_rows is not None:
        task.importance_backend = RayImportanceBackend(
            model_path, data_spec, training_ids, dataset.fingerprint, options.workers,
            options.ray_min_rows, options.show_progress,
        )
    return PreparedRequest(model, dataset, forget, task, store_meta)


def run_method_timed(prepared: PreparedRequest, method: str, params: dict) -> tuple[MethodOutput, dict]:
    task = prepared.task
    before = task.importance_seconds
    started = time.perf_counter()
    output = unlearning.run_method(method, task, **params)
    total = time.perf_counter() - started
    importance = task.importance_seconds - before
    return output, {"importance": importance, "unlearn": total - importance}


def random_reference(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A randomly initialised model of the same architecture (ZRF's reference)."""
    meta = model_meta(model)
    return unlearning.new_model(
        meta["arch"], meta["num_classes"], tuple(meta["input_shape"]), seed=seed + 1, **meta.get("arch_args", {})
    ).to(next(model.parameters()).device)


def build_report(
    prepared: PreparedRequest,
    method: str,
    output: MethodOutput,
    seconds: dict,
    data_spec: str,
    original_metrics: dict | None = None,
    zrf: bool = False,
) -> dict:
    task = prepared.task
    model = output.model.to(task.device)
    reference = random_reference(task.model, task.seed) if zrf else None
    metrics = evaluate_model(model, prepared.dataset, prepared.forget, task.normalize, random_model=reference)
    if original_metrics is None:
        original_metrics = evaluate_model(
            task.model, prepared.dataset, prepared.forget, task.normalize, random_model=reference
        )
    if "attack_success_rate" in metrics:
        from unlearning.metrics import healed_fraction

        metrics["healed"] = healed_fraction(original_metrics["attack_success_rate"], metrics["attack_success_rate"])
        metrics["accuracy_drop"] = original_metrics["test_acc"] - metrics["test_acc"]
    parent = model_meta(task.model)
    return {
        "method": method,
        "params": output.params,
        "details": output.details,
        "metrics": metrics,
        "original_metrics": original_metrics,
        "seconds": {**seconds, "total": seconds["importance"] + seconds["unlearn"]},
        "forget": {
            "spec": prepared.forget.spec,
            "kind": prepared.forget.kind,
            "size": len(prepared.forget.ids),
            "classes": prepared.forget.classes,
            "manifest_hash": prepared.forget.manifest_hash(),
            "forget_fraction": task.forget_fraction,
        },
        "importance": {
            "mode": task.importance_mode,
            "batch_size": task.batch_size,
            "store": prepared.store_meta,
            "on_ray": list(getattr(task.importance_backend, "runs", [])),  # splits computed on Ray
        },
        "data": {"spec": data_spec, "fingerprint": prepared.dataset.fingerprint},
        "parent": {"fingerprint": parent.get("parent_fingerprint")},
        "mlflow": None,
    }


def write_run(out: str | Path, model: torch.nn.Module, report: dict, forget: ForgetSet, before_publish=None) -> Path:
    """The run directory: checkpoint + report.json + forget_ids.txt, all or nothing.

    `before_publish(staging)` runs with the files in place but not yet visible at `out` (the
    MLflow logging); if it fails, nothing appears.
    """
    parent = model_meta(model)
    lineage_root = parent.get("lineage_root") or parent.get("parent_fingerprint")
    extra = {
        "lineage_root": lineage_root,
        "parent": parent.get("parent_fingerprint"),
        "unlearning": {
            "method": report["method"],
            "forget_manifest_hash": report["forget"]["manifest_hash"],
            "forget_size": report["forget"]["size"],
        },
    }
    with atomic_directory(out) as staging:
        report["fingerprint"] = write_model_files(model.cpu(), staging, extra)
        (staging / "forget_ids.txt").write_text("".join(f"{i}\n" for i in forget.ids.tolist()))
        if before_publish is not None:
            report["mlflow"] = before_publish(staging)
        write_json(staging / "report.json", report)
    return Path(out)


def run_forget(
    model_uri: str, data_spec: str, forget_spec: str, out: str, options: ForgetOptions, progress=None
) -> dict:
    """One deletion request: returns the report written to `out/report.json`.

    `model_uri` is a checkpoint directory or `models:/NAME@current` (the registry's newest
    version, so that requests chain).
    """
    if Path(out).exists():
        raise UserError(f"{out} already exists; choose a new output path (nothing is overwritten)")
    search_config = None
    if options.search:
        from pipelines.search import load_search_config

        search_config = load_search_config(options.search)
    model_path, version, removed_before = model_uri, None, []
    if str(model_uri).startswith("models:/"):
        from pipelines.tracking import lineage_removed_ids, resolve_model

        model_path, version = resolve_model(model_uri)
        removed_before = lineage_removed_ids(version["name"], version["version"])
    prepared = prepare_request(model_path, data_spec, forget_spec, options, removed_before)
    prepared.task.progress = progress
    trials: list[dict] = []
    if search_config is not None:
        from pipelines.search import run_search

        started = time.perf_counter()
        method, output, trials = run_search(prepared.task, search_config, progress)
        total = time.perf_counter() - started
        seconds = {"importance": prepared.task.importance_seconds, "unlearn": total - prepared.task.importance_seconds}
    else:
        method = options.method
        output, seconds = run_method_timed(prepared, method, options.params)
    report = build_report(prepared, method, output, seconds, data_spec, zrf=options.zrf)
    report["seed"] = options.seed
    report["removed_before"] = len(removed_before)
    if options.compare_retrain:
        retrained, retrain_seconds = run_method_timed(prepared, "retrain", {})
        report["retrain_metrics"] = evaluate_model(
            retrained.model.to(prepared.task.device), prepared.dataset, prepared.forget, prepared.task.normalize
        )
        report["retrain_seconds"] = retrain_seconds["unlearn"]
    name = None
    if options.track:
        meta = model_meta(prepared.model)
        name = (version or {}).get("name") or options.model_name or f"{meta['arch']}-{prepared.dataset.name}"

    def publish(staging: Path) -> dict | None:
        files = []
        if options.plots:
            from pipelines.report import write_report_files

            files = write_report_files(prepared.task, report, prepared.dataset.class_names, staging)
            report["has_plots"] = True
        if not options.track:
            return None
        from pipelines.faults import pause_point
        from pipelines.tracking import log_request

        entry = log_request(
            report, staging, name, model_path, unlearning.model_fingerprint(prepared.model), trials, files,
            extra_tags={"batch_id": options.batch_tag} if options.batch_tag else None,
        )
        pause_point("logged")  # registered in MLflow, run directory not yet in place
        return entry

    write_run(out, output.model, report, prepared.forget, publish)
    return report
