"""One deletion request, start to finish: load, unlearn, evaluate, write the run directory.

    run_forget -> prepare_request (model, data, forget set, UnlearningTask)
               -> the method, or a search on Ray Tune (pipelines.search)
               -> build_report (RequestReport) -> write_run (checkpoint, report.json,
                  forget_ids.txt, report.md; MLflow inside, before the directory appears)

The run directory (docs/requests.md) appears atomically and never replaces an existing path.
The smaller functions here (`build_task`, `run_method_timed`, `poison_outcome`,
`parse_param`) are the request API the CLI, the ledger and the benchmarks share.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import unlearning
from pipelines.ray_session import DEFAULT_RAY_MIN_ROWS
from pipelines.report import ForgetSummary, ImportanceSummary, RequestReport
from unlearning.checkpoint import atomic_directory, model_meta, write_json, write_model_files
from unlearning.data import Dataset, ForgetSet, open_dataset, split_forget
from unlearning.errors import UserError
from unlearning.evaluation import evaluate_model, evaluate_models
from unlearning.methods import MethodOutput, UnlearningTask
from unlearning.metrics import healed_fraction
from unlearning.models import arch_label
from unlearning.training import TrainConfig

FaultPoint = Callable[[str], None]  # called with a step's name; tests kill the process there
DEFAULT_METHOD = "ptn"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str | None) -> str:
    """A torch device for in-process work (`cpu`, `cuda`, `cuda:1`); None = the default one."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return str(device)


@dataclass
class ForgetOptions:
    """How to process a request (the CLI's `forget`/`search` options)."""

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
    workers: int | None = None  # Ray workers for a large split's importance (None: 2, or what fits)
    ray_min_rows: int | None = DEFAULT_RAY_MIN_ROWS  # splits this large go to Ray; None: never
    show_progress: bool = True  # progress bars of importance runs on Ray


def parse_param(text: str) -> tuple[str, object]:
    """`KEY=VALUE` -> (key, value), the value read as JSON if it is JSON, else as a string."""
    if "=" not in text:
        raise UserError(f"a method parameter takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


@dataclass
class PreparedRequest:
    model: torch.nn.Module
    dataset: Dataset
    forget: ForgetSet
    task: UnlearningTask
    store_meta: dict | None = field(default=None)


def build_task(model: torch.nn.Module, dataset: Dataset, forget: ForgetSet, **settings) -> UnlearningTask:
    """The UnlearningTask of one request on an in-memory model and data set.

    `settings` are UnlearningTask fields (importance_mode, batch_size, seed, device,
    full_importance, ...); the normalisation and the training recipe come from the model.
    """
    meta = model_meta(model)
    retain_split, forget_split = split_forget(dataset, forget)
    recipe = meta.get("train_config")
    device = settings.pop("device", "cpu")
    return UnlearningTask(
        model=model.to(device),
        dataset=dataset,
        forget=forget,
        retain_split=retain_split,
        forget_split=forget_split,
        normalize=meta.get("normalize"),
        device=device,
        train_config=TrainConfig(**recipe) if recipe else None,
        **settings,
    )


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
    dataset = open_dataset(data_spec)  # ids and labels only: rows stay in their files
    if removed_before:
        gone = torch.isin(dataset.train.ids, torch.tensor(removed_before, dtype=torch.int64))
        dataset = replace(dataset, train=dataset.train.where(~gone))
    check_model_fits(model_meta(model), dataset, model_path, data_spec)
    forget = unlearning.parse_forget(forget_spec, dataset, seed=options.seed)
    return prepare_loaded(model, dataset, forget, options, data_spec)


def prepare_loaded(model: torch.nn.Module, dataset: Dataset, forget: ForgetSet, options: ForgetOptions,
                   data_spec: str) -> PreparedRequest:
    """The request on a model and data set already at hand (the Python API starts here)."""
    full_importance, store_meta = _load_store(options.importance_store, model, dataset, data_spec)
    task = build_task(
        model, dataset, forget,
        importance_mode=options.mode, batch_size=options.batch_size, seed=options.seed, device=options.device,
        full_importance=full_importance, full_importance_kind=(store_meta or {}).get("kind"),
        full_importance_mode=(store_meta or {}).get("mode"), rho=options.rho,
    )
    if options.ray_min_rows is not None:
        from pipelines.distributed import RayExecutor

        task.executor = RayExecutor(task.executor, options.workers, options.ray_min_rows, options.show_progress)
    return PreparedRequest(model, dataset, forget, task, store_meta)


def check_model_fits(meta: dict, dataset: Dataset, model_path: str, data_spec: str) -> None:
    """UserError unless the model takes the data set's input shape and number of classes."""
    if meta["num_classes"] != dataset.num_classes or tuple(meta["input_shape"]) != dataset.input_shape:
        raise UserError(
            f"model {model_path} expects {meta['num_classes']} classes of shape {tuple(meta['input_shape'])}, "
            f"data {data_spec} has {dataset.num_classes} of shape {dataset.input_shape}"
        )


def _load_store(path: str | None, model, dataset: Dataset, data_spec: str) -> tuple[dict | None, dict | None]:
    """(I^D, the store's meta) from an importance store made for this model and data, or Nones."""
    if not path:
        return None, None
    importance, meta = unlearning.load_importance(path, model)
    if meta.get("dataset_fingerprint") not in (None, dataset.fingerprint):
        raise UserError(
            f"importance store {path} was computed on another data set "
            f"({meta.get('dataset_fingerprint')}), not {data_spec} ({dataset.fingerprint})"
        )
    return importance, meta


def run_method_timed(task: UnlearningTask, method: str, params: dict) -> tuple[MethodOutput, dict]:
    """Run a registered method; seconds split into `importance` and `unlearn`."""
    from pipelines.distributed import RayExecutor

    before = task.importance_seconds
    started = time.perf_counter()
    executor = task.executor
    if unlearning.get_method(method).own_loop and isinstance(executor, RayExecutor) and executor.method_on_ray(task):
        output = executor.run_method(task, method, params)
    else:
        output = unlearning.run_method(method, task, **params)
    total = time.perf_counter() - started
    importance = task.importance_seconds - before
    return output, {"importance": importance, "unlearn": total - importance}


def poison_outcome(original_metrics: dict, metrics: dict) -> dict:
    """A poison request's healed share of the attack and its clean accuracy drop."""
    return {
        "healed": healed_fraction(original_metrics["attack_success_rate"], metrics["attack_success_rate"]),
        "accuracy_drop": original_metrics["test_acc"] - metrics["test_acc"],
    }


def random_reference(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A randomly initialised model of the same architecture (ZRF's reference)."""
    meta = model_meta(model)
    return unlearning.new_model(
        meta["arch"], meta["num_classes"], tuple(meta["input_shape"]), seed=seed + 1, **meta.get("arch_args", {})
    ).to(next(model.parameters()).device)


def build_report(
    prepared: PreparedRequest, method: str, output: MethodOutput, seconds: dict, data_spec: str,
    removed_before: int = 0, zrf: bool = False,
) -> RequestReport:
    """Evaluate the original and the unlearned model; the request's report, built once."""
    task, forget = prepared.task, prepared.forget
    reference = random_reference(task.model, task.seed) if zrf else None

    metrics, original_metrics = evaluate_models(
        [output.model.to(task.device), task.model], prepared.dataset, forget, task.normalize,
        random_model=reference, executor=task.executor,
    )
    if "attack_success_rate" in metrics:
        metrics.update(poison_outcome(original_metrics, metrics))
    return RequestReport(
        method=method, params=output.params, details=output.details,
        metrics=metrics, original_metrics=original_metrics,
        seconds={**seconds, "total": seconds["importance"] + seconds["unlearn"]},
        forget=ForgetSummary(forget.spec, forget.kind, len(forget.ids), forget.classes,
                             forget.manifest_hash(), task.forget_fraction),
        importance=ImportanceSummary(task.importance_mode, task.batch_size, prepared.store_meta,
                                     _ray_runs(task.executor, "importance")),
        data={"spec": data_spec, "fingerprint": prepared.dataset.fingerprint},
        seed=task.seed, removed_before=removed_before,
        parent_fingerprint=model_meta(task.model).get("parent_fingerprint"),
        passes_on_ray=_ray_runs(task.executor, "outcomes"),
        method_on_ray=(_ray_runs(task.executor, "method") or [None])[-1],
    )


def _ray_runs(executor, which: str) -> list[dict]:
    """What ran on Ray, by pass ("importance" or "outcomes")."""
    runs = getattr(executor, "runs", [])
    return [{k: v for k, v in run.items() if k != "pass"} for run in runs if run["pass"] == which]


def write_run(out: str | Path, model: torch.nn.Module, report: RequestReport, forget: ForgetSet,
              before_publish=None) -> Path:
    """The run directory: checkpoint + report.json + forget_ids.txt, all or nothing.

    `before_publish(staging)` runs with the files in place but not yet visible at `out` (the
    report page and the MLflow logging); if it fails, nothing appears.
    """
    parent = model_meta(model)
    extra = {
        "lineage_root": parent.get("lineage_root") or parent.get("parent_fingerprint"),
        "parent": parent.get("parent_fingerprint"),
        "unlearning": {
            "method": report.method,
            "forget_manifest_hash": report.forget.manifest_hash,
            "forget_size": report.forget.size,
        },
    }
    with atomic_directory(out) as staging:
        report.fingerprint = write_model_files(model.cpu(), staging, extra)
        (staging / "forget_ids.txt").write_text("".join(f"{i}\n" for i in forget.ids.tolist()))
        if before_publish is not None:
            before_publish(staging)
        write_json(staging / "report.json", report.to_json())
    return Path(out)


def run_forget(
    model_uri: str, data_spec: str, forget_spec: str, out: str, options: ForgetOptions,
    progress=None, fault_point: FaultPoint | None = None,
) -> RequestReport:
    """One deletion request: returns the report written to `out/report.json`.

    `model_uri` is a checkpoint directory or `models:/NAME@current` (the registry's newest
    version, so that requests chain). `fault_point(step)` is called after the MLflow logging
    ("logged"); tests kill the process there.
    """
    if Path(out).exists():
        raise UserError(f"{out} already exists; choose a new output path (nothing is overwritten)")
    search_config = search_config_of(options)
    model_path, version, removed_before = _resolve(model_uri)
    prepared = prepare_request(model_path, data_spec, forget_spec, options, removed_before)
    try:
        report, _ = run_prepared(prepared, model_path, version, data_spec, out, options, search_config,
                                 len(removed_before), progress, fault_point)
        return report
    finally:
        prepared.task.executor.close()  # Ray evaluators, cached rows


def run_prepared(prepared: PreparedRequest, model_path: str | None, version: dict | None, data_spec: str,
                 out: str | None,
                 options: ForgetOptions, search_config, removed_before: int = 0, progress=None,
                 fault_point: FaultPoint | None = None) -> tuple[RequestReport, torch.nn.Module]:
    """Unlearn, evaluate, write the run directory at `out` (MLflow inside); (report, new model).

    `model_path` is the starting model's checkpoint (registered as the lineage's original if
    the registry does not know it yet). `out=None` writes nothing (and then `options.track`
    and `options.plots` must be off)."""
    if out is None and (options.track or options.plots):
        raise ValueError("a request tracked in MLflow or with a report page needs a run directory")
    prepared.task.progress = progress
    method, output, seconds, trials = _unlearn(prepared, options, search_config, progress)
    report = build_report(prepared, method, output, seconds, data_spec, removed_before, options.zrf)
    if options.compare_retrain:
        retrained, retrain_seconds = run_method_timed(prepared.task, "retrain", {})
        task = prepared.task
        report.retrain_metrics = evaluate_model(
            retrained.model.to(task.device), prepared.dataset, prepared.forget, task.normalize, executor=task.executor
        )
        report.retrain_seconds = retrain_seconds["unlearn"]
    name = None
    if options.track:
        meta = model_meta(prepared.model)
        name = (version or {}).get("name") or options.model_name or f"{arch_label(meta['arch'])}-{prepared.dataset.name}"

    def publish(staging: Path) -> None:
        files = []
        if options.plots:
            from pipelines.report_page import write_report_files

            files = write_report_files(prepared.task, report, prepared.dataset.class_names, staging)
            report.has_plots = True
        if options.track:
            from pipelines.mlflow_model import example_rows
            from pipelines.tracking import log_request

            report.mlflow = log_request(
                report, staging, name, model_path, unlearning.model_fingerprint(prepared.model), trials, files,
                extra_tags={"batch_id": options.batch_tag} if options.batch_tag else None,
                input_example=example_rows(prepared.dataset.test, prepared.task.normalize),
            )
            if fault_point is not None:
                fault_point("logged")  # registered in MLflow, run directory not yet in place

    if out is None:  # the Python API without a run directory: nothing to publish or record
        report.fingerprint = unlearning.model_fingerprint(output.model)
    else:
        write_run(out, output.model, report, prepared.forget, publish)
    return report, output.model


def search_config_of(options: ForgetOptions):
    if not options.search:
        return None
    from pipelines.search import load_search_config

    return load_search_config(options.search)


def _resolve(model_uri: str) -> tuple[str, dict | None, list[int]]:
    """(checkpoint path, registry version or None, ids removed on the way to that version)."""
    if not str(model_uri).startswith("models:/"):
        return model_uri, None, []
    from pipelines.tracking import lineage_removed_ids, resolve_model

    model_path, version = resolve_model(model_uri)
    return model_path, version, lineage_removed_ids(version["name"], version["version"])


def _unlearn(prepared: PreparedRequest, options: ForgetOptions, search_config, progress):
    """(method name, output, seconds, trials): the method, or the search on Ray Tune."""
    if search_config is None:
        output, seconds = run_method_timed(prepared.task, options.method, options.params)
        return options.method, output, seconds, []
    from pipelines.search import run_search

    task = prepared.task
    started = time.perf_counter()
    method, output, trials = run_search(task, search_config, progress)
    total = time.perf_counter() - started
    return method, output, {"importance": task.importance_seconds, "unlearn": total - task.importance_seconds}, trials

