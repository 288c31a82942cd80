"""MLflow: one run per deletion request, a registered model lineage.

Only the driver writes (Tune trials report metrics back; several processes creating one
fresh SQLite store at once race on its schema). The store defaults to `sqlite:///mlflow.db`
in the working directory; `MLFLOW_TRACKING_URI` overrides it.

A request's run holds its parameters and metrics, the training data and the forget set as
run inputs (digests: the data set's fingerprint and the forget manifest hash), the PTN walk
as metric history (`walk/forget_acc`, `walk/alpha`, ... at `step=` the schedule index), TPE
trials as nested runs, the checkpoint (`checkpoint/`), `forget_ids.txt` and the report.

Registry layout: every version is an MLflow model (pipelines.mlflow_model) logged in the run
that made it, whose `checkpoint/` artifact is what the project loads. The original model is
registered once (tag `role=original`); every request adds a version whose tags name its
`parent_version`, the request's run and id, the forget-set manifest hash and size, and
whether it met its forget-accuracy target (`target_met`); the alias `@current` moves to
each new version that met it (or that --accept-unmet accepts), so the next request can
start from `models:/NAME@current`. The request is logged from its written run directory,
last (pipelines.registration).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipelines.mlflow_model import log_checkpoint_model
from pipelines.report import MlflowEntry, RequestReport
from unlearning.checkpoint import MODEL_META, MODEL_WEIGHTS
from unlearning.errors import UserError
from unlearning.tempdirs import new_scratch

EXPERIMENT = "amnesis"
CURRENT_ALIAS = "current"
DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def _mlflow():
    """Import MLflow with its INFO chatter (schema migrations, experiment creation) muted."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def _client():
    from mlflow import MlflowClient

    _mlflow()
    return MlflowClient()


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check_model_name(name: str) -> str:
    """`name` if it can name a registered model here, else a UserError (it goes into MLflow
    filter strings and URIs, so quotes, slashes, '@' and spaces are refused)."""
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise UserError(f"--model-name {name!r}: use 1 to 100 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return name


def check_store() -> None:
    """Open the MLflow store at tracking_uri() (tracking and registry), or a one-line UserError:
    a corrupt or foreign store is refused before any work, not after it. A SQLite store that
    does not exist yet is left alone (the first request creates it; nothing to check)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return
    try:
        client = _client()
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    except Exception as error:  # MlflowException, SQLAlchemy's errors, unknown schemes
        raise UserError(f"the MLflow store {tracking_uri()} cannot be opened: {_first_line(error)}") from None


def is_registry_uri(text: str) -> bool:
    return str(text).startswith("models:/")


def resolve_model(uri: str) -> tuple[str, dict | None]:
    """A local checkpoint path for `uri` (a path, or models:/NAME@ALIAS / models:/NAME/VERSION).

    Returns (path, version info); the version's `checkpoint/` (safetensors, never the pickle-free
    but foreign MLflow model) is downloaded from its run to a scratch directory that lasts until
    this process exits (unlearning.tempdirs).
    """
    if not is_registry_uri(uri):
        return uri, None
    mlflow = _mlflow()
    client = _client()
    name, _, ref = uri[len("models:/") :].partition("@")
    try:
        if ref:
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
    except Exception as error:  # MlflowException for unknown names/aliases
        raise UserError(f"{uri} is not in the model registry at {tracking_uri()}: {_first_line(error)}") from None
    target = new_scratch("model")  # read until the request ends: removed when this process exits
    path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="checkpoint", dst_path=str(target))
    return path, {"name": version.name, "version": str(version.version), "tags": dict(version.tags)}


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _find_version_by_fingerprint(client, name: str, fingerprint: str):
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get("fingerprint") == fingerprint:
            return version
    return None


def _ensure_registered(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Amnesis: a model and its unlearned versions")


def _register_original(mlflow, client, name: str, checkpoint: str, fingerprint: str, input_example: np.ndarray):
    """Register the request's parent model if the registry does not know it yet."""
    existing = _find_version_by_fingerprint(client, name, fingerprint)
    if existing is not None:
        return existing
    with mlflow.start_run(run_name="original-model") as run:
        mlflow.set_tag("amnesis.role", "original")
        tags = {"role": "original", "fingerprint": fingerprint, "parent_version": ""}
        version = _register_version(mlflow, client, name, Path(checkpoint), input_example, run.info.run_id, tags)
    client.set_registered_model_alias(name, CURRENT_ALIAS, version.version)
    return version


def _parent(mlflow, client, name: str, parent_version: str | None, checkpoint: str, fingerprint: str,
            input_example: np.ndarray):
    """The version a request started from: the one it was loaded as (models:/NAME/V or @ALIAS),
    else the version with the starting model's fingerprint, else that model as the original.

    By version first: two versions may share a fingerprint (a request that changed nothing
    recorded by an older release), and the first of them is not necessarily the parent."""
    if parent_version is not None:
        return client.get_model_version(name, parent_version)
    return _register_original(mlflow, client, name, checkpoint, fingerprint, input_example)


def _register_version(mlflow, client, name: str, checkpoint: Path, input_example: np.ndarray, run_id: str,
                      tags: dict):
    """Inside the run `run_id`: the checkpoint files as `checkpoint/`, the same model as an
    MLflow model, and a registered version of it with `tags` (`@current` is the caller's).

    The version is created with its tags in one call (a ledger batch's version is found by its
    `batch_id` tag, so a version must never exist without it).
    """
    staging = new_scratch("log")
    try:
        for file in (MODEL_WEIGHTS, MODEL_META):  # only the checkpoint, not a run directory's other files
            shutil.copy2(checkpoint / file, staging / file)
        mlflow.log_artifacts(str(staging), artifact_path="checkpoint")
        model = log_checkpoint_model(staging, input_example)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return client.create_model_version(name, source=model.model_uri, run_id=run_id, tags=tags,
                                       model_id=model.model_id)


def flat_params(report: RequestReport) -> dict:
    forget = report.forget
    params = {
        "method": report.method,
        "importance_mode": report.importance.mode,
        "batch_size": report.importance.batch_size,
        "forget_spec": forget.spec,
        "forget_kind": forget.kind,
        "forget_size": forget.size,
        "forget_manifest_hash": forget.manifest_hash,
        "forget_fraction": forget.forget_fraction,
        "seed": report.seed,
        "inference_precision": report.inference_precision,
        "data_fingerprint": report.data["fingerprint"],
        "target": report.target,
        **report.params,
    }
    path = report.details.get("path", [])
    chosen = (report.params.get("step"), report.params.get("lambda"))
    step = next((p for p in path + report.details.get("refinement", []) if (p["index"], p["lam"]) == chosen), None)
    if step is not None and step.get("s") is not None:
        params["s"] = step["s"]
    return {k: ("" if v is None else v) for k, v in params.items()}


def flat_metrics(report: RequestReport) -> dict:
    metrics = {}
    for prefix, values in (("", report.metrics), ("original_", report.original_metrics)):
        for key, value in values.items():
            if isinstance(value, (int, float)) and value == value:  # skip NaN and lists
                metrics[f"{prefix}{key}"] = float(value)
    for key, value in report.seconds.items():
        metrics[f"seconds_{key}"] = float(value)
    if report.target_met is not None:
        metrics["target_met"] = float(report.target_met)
    return metrics


def log_request(
    report: RequestReport,
    run_dir: str | Path,
    model_name: str,
    parent_checkpoint: str,
    parent_fingerprint: str,
    trials: list[dict] | None = None,
    report_files: list[Path] | None = None,
    extra_tags: dict | None = None,
    *,
    input_example: np.ndarray,
    parent_version: str | None = None,
    move_current: bool = True,
    fault_point=None,
) -> MlflowEntry:
    """Log one finished request (its written run directory `run_dir`) and register its model;
    returns where it is recorded.

    `input_example`: a few rows as the model takes them (pipelines.mlflow_model.example_rows),
    the registered MLflow models' input example. `parent_version`: the version the request
    started from, if it was loaded from the registry. `@current` moves to the new version only
    if `move_current`. `fault_point(step)` is called once the run exists ("run_created") and
    once the version does ("version_registered"), see pipelines.registration.
    """
    pause = fault_point or (lambda step: None)
    mlflow = _mlflow()
    client = _client()
    experiment = mlflow.set_experiment(EXPERIMENT)
    _ensure_registered(client, model_name)
    parent = _parent(mlflow, client, model_name, parent_version, parent_checkpoint, parent_fingerprint, input_example)
    _end_interrupted_runs(client, experiment.experiment_id, report.request_id)
    with mlflow.start_run(run_name=f"forget {report.forget.spec} ({report.method})") as run:
        mlflow.set_tags({"amnesis.role": "request", "amnesis.parent_version": str(parent.version),
                         "amnesis.request_id": report.request_id or "",
                         "amnesis.target_met": _flag(report.target_met)})
        pause("run_created")
        mlflow.log_params(flat_params(report))
        mlflow.log_metrics(flat_metrics(report))
        _log_inputs(mlflow, report)
        walk_path = report.details.get("path") or []
        _log_walk(client, run.info.run_id, walk_path)
        if not walk_path:  # a PTN search's trials are the walk's steps, already its metric history
            for trial in trials or []:
                with mlflow.start_run(run_name=f"trial {trial['name']}", nested=True):
                    mlflow.log_params(trial["params"])
                    mlflow.log_metrics(trial["metrics"])
        _log_files(mlflow, Path(run_dir), report_files or [])
        entry = MlflowEntry(run.info.run_id, model_name, str(parent.version))
        tags = {**version_tags(report, entry), **(extra_tags or {})}
        version = _register_version(mlflow, client, model_name, Path(run_dir), input_example, run.info.run_id, tags)
        entry.model_version = str(version.version)
        pause("version_registered")
        if move_current:
            client.set_registered_model_alias(model_name, CURRENT_ALIAS, version.version)
        entry.current_version = _current_version(client, model_name)
        mlflow.log_text(_report_text(report, entry), "report.json")
    return entry


def _flag(value: bool | None) -> str:
    return "" if value is None else str(bool(value)).lower()


def _report_text(report: RequestReport, entry: MlflowEntry) -> str:
    return json.dumps({**report.to_json(), "mlflow": asdict(entry)}, indent=2)


def _current_version(client, model_name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, CURRENT_ALIAS).version)
    except MlflowException:
        return None


def _end_interrupted_runs(client, experiment_id: str, request_id: str | None) -> None:
    """Runs of this request that a kill left RUNNING, before it registered a version, are KILLED."""
    if not request_id:
        return
    query = f"tags.`amnesis.request_id` = '{request_id}' and attributes.status = 'RUNNING'"
    for run in client.search_runs([experiment_id], filter_string=query):
        client.set_terminated(run.info.run_id, "KILLED")


def finish_request(recorded: dict, report: RequestReport | None, move_current: bool) -> MlflowEntry:
    """Finish recording a version an interrupted run registered: `@current` moves as that run
    would have moved it (if it still points to the version's parent), the run ends, and the
    run gets `report` (the run directory's) as report.json."""
    client = _client()
    name, number = recorded["name"], recorded["version"]
    entry = MlflowEntry(recorded["run_id"], name, recorded["tags"].get("parent_version", ""), number, adopted=True)
    if move_current and _current_version(client, name) in (None, entry.parent_version):
        client.set_registered_model_alias(name, CURRENT_ALIAS, number)
    entry.current_version = _current_version(client, name)
    if report is not None:
        client.log_text(entry.run_id, _report_text(report, entry), "report.json")
    if client.get_run(entry.run_id).info.status == "RUNNING":
        client.set_terminated(entry.run_id, "FINISHED")
    return entry


def log_report(report: RequestReport) -> None:
    """The request's run gets `report` (with its MLflow entry) as report.json again."""
    _client().log_text(report.mlflow.run_id, _report_text(report, report.mlflow), "report.json")


def version_tags(report: RequestReport, entry: MlflowEntry) -> dict:
    """The registered version's lineage tags: its parent, its run, what it removed."""
    return {
        "role": "unlearned",
        "fingerprint": report.fingerprint,
        "parent_version": entry.parent_version,
        "request_run_id": entry.run_id,
        "forget_spec": report.forget.spec,
        "forget_size": str(report.forget.size),
        "forget_manifest_hash": report.forget.manifest_hash,
        "method": report.method,
        "request_id": report.request_id or "",
        "target_met": _flag(report.target_met),
    }


def _log_inputs(mlflow, report: RequestReport) -> None:
    """The training data and the forget set as the run's inputs, identified by their digests."""
    from mlflow.data.meta_dataset import MetaDataset

    spec = report.data["spec"]
    source = _data_source(spec)
    mlflow.log_input(MetaDataset(source, name=spec, digest=report.data["fingerprint"]), context="training")
    forget = MetaDataset(source, name=f"{spec} forget {report.forget.spec}", digest=report.forget.manifest_hash)
    mlflow.log_input(forget, context="forget")


def _data_source(spec: str):
    """Where a data set lives: its file or folder, or (built-in data) the data spec itself."""
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    base = Path(spec.split("+")[0])
    if not base.exists():
        return CodeDatasetSource({"amnesis.data": spec})
    with warnings.catch_warnings():  # MLflow registers its local source under two names and says so
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(base.resolve().as_uri())


WALK_KEYS = {"forget_acc": "forget_acc", "alpha": "alpha", "lam": "lambda", "s": "s", "percentile": "percentile",
             "stopped_early": "stopped_early"}  # 1 where forget_acc is a lower bound (unlearning.search.AtLeast)


def _log_walk(client, run_id: str, path: list[dict]) -> None:
    """A PTN walk as metric history: `walk/<key>` at step = the schedule index, one batch."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"walk/{name}", float(step[key]), now, int(step["index"]))
        for step in path
        for key, name in WALK_KEYS.items()
        if step.get(key) is not None
    ]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def _log_files(mlflow, run_dir: Path, report_files: list[Path]) -> None:
    """The forget manifest and the report page (the checkpoint goes with the model version)."""
    mlflow.log_artifact(str(run_dir / "forget_ids.txt"))
    for plot in report_files:
        mlflow.log_artifact(str(plot), artifact_path="report")
