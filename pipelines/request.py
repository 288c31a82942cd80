"""One deletion request, start to finish: load, unlearn, evaluate, write the run directory.

    run_forget -> prepare_request (model, data, forget set, UnlearningTask)
               -> the method, or a search on Ray Tune (pipelines.search)
               -> check_changed (a model the method did not change goes no further)
               -> build_report (RequestReport, with the target and whether it was met)
               -> write_run (checkpoint, report.json, forget_ids.txt, report.md)
               -> record_run (MLflow and the registry, last: pipelines.registration)

The run directory (docs/requests.md) appears atomically and never replaces an existing path,
except that a rerun adopts the unrecorded run directory of the same request (adopt_run).
The smaller functions here (`build_task`, `run_method_timed`, `poison_outcome`) are the request API the CLI, the ledger and the benchmarks share.
"""

from __future__ import annotations

import errno
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import unlearning
from pipelines.lineage import resolve_with_removed
from pipelines.options import ForgetOptions
from pipelines.registration import (
    complete_recorded,
    lineage_root,
    record_run,
    registered_name,
    unrecorded_run,
)
from pipelines.report import ForgetSummary, ImportanceSummary, RequestReport
from unlearning.checkpoint import model_meta, write_model_files
from unlearning.data import Dataset, ForgetSet, open_dataset, split_forget
from unlearning.errors import UserError
from unlearning.evaluation import evaluate_model, evaluate_models
from unlearning.methods import MethodOutput, UnlearningTask
from unlearning.metrics import healed_fraction
from unlearning.outputs import OutputExists, atomic_directory, check_output_path, write_json
from unlearning.training import TrainConfig

log = logging.getLogger(__name__)

FaultPoint = Callable[[str], None]  # called with a step's name; tests kill the process there
TARGET_TOLERANCE = 1e-9  # forget accuracy <= target, up to float rounding


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
    options.check()  # unknown methods and bad values fail before any loading
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
        inference_precision=options.inference_precision,
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
    elif forget.kind == "poison":  # ids declared poisoned, trigger unknown: the drop is still known
        metrics["accuracy_drop"] = original_metrics["test_acc"] - metrics["test_acc"]
    target = float(output.params["target"] if output.params.get("target") is not None else task.search_target())
    return RequestReport(
        method=method, params=output.params, details=output.details,
        metrics=metrics, original_metrics=original_metrics,
        seconds={**seconds, "total": seconds["importance"] + seconds["unlearn"]},
        forget=ForgetSummary(forget.spec, forget.kind, len(forget.ids), forget.classes,
                             forget.manifest_hash(), task.forget_fraction),
        importance=ImportanceSummary(task.importance_mode, task.batch_size, prepared.store_meta,
                                     _ray_runs(task.executor, "importance")),
        data={"spec": data_spec, "fingerprint": prepared.dataset.fingerprint},
        seed=task.seed, removed_before=removed_before, inference_precision=task.inference_precision,
        parent_fingerprint=model_meta(task.model).get("parent_fingerprint"),
        passes_on_ray=_ray_runs(task.executor, "outcomes"),
        method_on_ray=(_ray_runs(task.executor, "method") or [None])[-1],
        target=target, target_met=metrics["forget_acc"] <= target + TARGET_TOLERANCE,
    )


def check_changed(original: torch.nn.Module, output: MethodOutput, method: str) -> None:
    """UserError if the method left every weight as it was: such a model is never written,
    registered or counted as having forgotten anything."""
    if unlearning.model_fingerprint(output.model) != unlearning.model_fingerprint(original):
        return
    numbers = {k: v for k, v in output.params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    settings = ", ".join(f"{k}={v:.4g}" for k, v in numbers.items())
    if "target" in output.params and output.details.get("reached") is not False:
        # A search that met its target without changing a weight: the original already meets it.
        hint = (f"the forget set's accuracy is already at the target, {100 * output.params['target']:.1f} %, what a "
                "model that never saw these rows would score: nothing to forget by accuracy; a lower "
                "--param target=... forces dampening")
    elif "target" in output.params:  # a search: even its most aggressive step dampened nothing
        hint = "the forget set's importances are zero, the model is saturated on it; a method that trains, e.g. jit, changes it"
    elif "alpha" in output.params:
        hint = "a smaller --alpha dampens more; the default method ptn searches for one"
    else:
        hint = "stronger settings, or the default method ptn, may change it"
    raise UserError(f"{method} ({settings}) changed no weight of the model; nothing was written or registered ({hint})")


def _ray_runs(executor, which: str) -> list[dict]:
    """What ran on Ray, by pass ("importance" or "outcomes")."""
    runs = getattr(executor, "runs", [])
    return [{k: v for k, v in run.items() if k != "pass"} for run in runs if run["pass"] == which]


def write_run(out: str | Path, model: torch.nn.Module, report: RequestReport, forget: ForgetSet,
              before_publish=None) -> Path:
    """The run directory: checkpoint + report.json + forget_ids.txt, all or nothing.

    `before_publish(staging)` runs with the files in place but not yet visible at `out` (the
    report page); if it fails, nothing appears. A full disk is a one-line UserError.
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
    try:
        with atomic_directory(out) as staging:
            report.fingerprint = write_model_files(model.cpu(), staging, extra)
            (staging / "forget_ids.txt").write_text("".join(f"{i}\n" for i in forget.ids.tolist()))
            if before_publish is not None:
                before_publish(staging)
            write_json(staging / "report.json", report.to_json())
    except Exception as error:
        if not _disk_full(error):
            raise
        raise UserError(f"no space left on the device for {out} (the disk is full); "
                        "nothing was written or registered") from None
    return Path(out)


def _disk_full(error: Exception) -> bool:
    """ENOSPC, as an OSError or as safetensors' own error (which is not an OSError)."""
    return getattr(error, "errno", None) == errno.ENOSPC or f"(os error {errno.ENOSPC})" in str(error)


def run_forget(
    model_uri: str, data_spec: str, forget_spec: str, out: str, options: ForgetOptions,
    progress=None, fault_point: FaultPoint | None = None,
) -> RequestReport:
    """One deletion request: returns the report written to `out/report.json`.

    `model_uri` is a checkpoint directory or `models:/NAME@current` (the registry's newest
    version, so that requests chain). If `out` holds this request's complete run directory
    that was never recorded in MLflow (a killed run wrote it), it is adopted, not recomputed.
    `fault_point(step)` is called after each step of registration (pipelines.registration);
    tests kill the process there.
    """
    earlier = unrecorded_run(out, options.track)
    if earlier is not None:
        return adopt_run(earlier, model_uri, data_spec, forget_spec, Path(out), options, fault_point)
    check_output_path(out)
    search_config = search_config_of(options)
    model_path, version, removed_before = resolve_with_removed(model_uri)
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
    """Unlearn, evaluate, write the run directory at `out`, then record it in MLflow; (report,
    new model).

    `model_path` is the starting model's checkpoint (registered as the lineage's original if
    the registry does not know it yet). `out=None` writes nothing (and then `options.track`
    and `options.plots` must be off)."""
    if out is None and (options.track or options.plots):
        raise ValueError("a request tracked in MLflow or with a report page needs a run directory")
    prepared.task.progress = progress
    if options.track:  # a name holding another model's lineage is refused before the work
        from pipelines.lineage import check_lineage

        check_lineage(registered_name(prepared, version, options), lineage_root(prepared.model))
    method, output, seconds, trials = _unlearn(prepared, options, search_config, progress)
    check_changed(prepared.model, output, method)
    report = build_report(prepared, method, output, seconds, data_spec, removed_before, options.zrf)
    report.request_id = uuid.uuid4().hex
    if options.compare_retrain:
        retrained, retrain_seconds = run_method_timed(prepared.task, "retrain", {})
        task = prepared.task
        report.retrain_metrics = evaluate_model(
            retrained.model.to(task.device), prepared.dataset, prepared.forget, task.normalize, executor=task.executor
        )
        report.retrain_seconds = retrain_seconds["unlearn"]
    if out is None:  # the Python API without a run directory: nothing to publish or record
        report.fingerprint = unlearning.model_fingerprint(output.model)
        return report, output.model

    def plots(staging: Path) -> None:
        from pipelines.report_page import write_report_files

        write_report_files(prepared.task, report, prepared.dataset.class_names, staging)
        report.has_plots = True

    write_run(out, output.model, report, prepared.forget, plots if options.plots else None)
    if fault_point is not None:
        fault_point("written")  # the run directory is in place; nothing in MLflow yet
    if options.track:
        record_run(Path(out), report, prepared, model_path, version, options, trials, fault_point)
    return report, output.model


def adopt_run(earlier: RequestReport, model_uri: str, data_spec: str, forget_spec: str, out: Path,
              options: ForgetOptions, fault_point: FaultPoint | None = None) -> RequestReport:
    """Record the run directory an interrupted run of this same request wrote at `out`.

    The same request: the same method, forget spec and data, and (checked on the loaded inputs
    unless a version of it is registered already) the same starting model and forget manifest.
    A version tagged with its request id is adopted; otherwise the directory's model is
    registered. Nothing is recomputed; anything else at `out` is refused (OutputExists)."""
    from pipelines.lineage import find_request_version

    method = search_config_of(options).search if options.search else options.method
    if (earlier.method, earlier.forget.spec, earlier.data.get("spec")) != (method, forget_spec, data_spec):
        raise OutputExists(out)
    recorded = find_request_version(earlier.request_id)
    if recorded is not None:  # killed after registering: finish what that run did not
        log.info("%s: version %s of %s was registered for this request; adopted", out, recorded["version"],
                 recorded["name"])
        complete_recorded(out, earlier, recorded, options.accept_unmet)
        return earlier
    model_path, version, removed_before = resolve_with_removed(model_uri)
    prepared = prepare_request(model_path, data_spec, forget_spec, options, removed_before)
    try:
        starting = model_meta(prepared.model).get("parent_fingerprint")
        if (starting, prepared.forget.manifest_hash()) != (earlier.parent_fingerprint, earlier.forget.manifest_hash):
            raise OutputExists(out)
        log.info("%s: written for this request but not recorded; recording it", out)
        record_run(out, earlier, prepared, model_path, version, options, None, fault_point, adopted=True)
    finally:
        prepared.task.executor.close()
    return earlier


def search_config_of(options: ForgetOptions):
    if not options.search:
        return None
    from pipelines.search import load_search_config

    return load_search_config(options.search)


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

