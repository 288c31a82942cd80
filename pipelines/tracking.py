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
`parent_version`, the request's run, the forget-set manifest hash and size; the alias
`@current` moves to the newest version, so the next request can start from
`models:/NAME@current`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipelines.mlflow_model import log_checkpoint_model
from pipelines.report import MlflowEntry, RequestReport
from unlearning.checkpoint import MODEL_META, MODEL_WEIGHTS

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


def is_registry_uri(text: str) -> bool:
    return str(text).startswith("models:/")


def resolve_model(uri: str) -> tuple[str, dict | None]:
    """A local checkpoint path for `uri` (a path, or models:/NAME@ALIAS / models:/NAME/VERSION).

    Returns (path, version info); the version's `checkpoint/` (safetensors, never the pickle-free
    but foreign MLflow model) is downloaded from its run to a temporary folder.
    """
    if not is_registry_uri(uri):
        return uri, None
    from unlearning.errors import UserError

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
    target = tempfile.mkdtemp(prefix="amnesis-model-")
    path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="checkpoint", dst_path=target)
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
        return _register_version(mlflow, client, name, Path(checkpoint), input_example, run.info.run_id, tags)


def _register_version(mlflow, client, name: str, checkpoint: Path, input_example: np.ndarray, run_id: str,
                      tags: dict):
    """Inside the run `run_id`: the checkpoint files as `checkpoint/`, the same model as an
    MLflow model, and a registered version of it with `tags`; `@current` moves to it.

    The version is created with its tags in one call (a ledger batch's version is found by its
    `batch_id` tag, so a version must never exist without it).
    """
    staging = Path(tempfile.mkdtemp(prefix="amnesis-log-"))
    try:
        for file in (MODEL_WEIGHTS, MODEL_META):  # only the checkpoint, not a run directory's other files
            shutil.copy2(checkpoint / file, staging / file)
        mlflow.log_artifacts(str(staging), artifact_path="checkpoint")
        model = log_checkpoint_model(staging, input_example)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    version = client.create_model_version(name, source=model.model_uri, run_id=run_id, tags=tags,
                                          model_id=model.model_id)
    client.set_registered_model_alias(name, CURRENT_ALIAS, version.version)
    return version


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
        "data_fingerprint": report.data["fingerprint"],
        **report.params,
    }
    path = report.details.get("path", [])
    step = next((p for p in path if p["index"] == report.params.get("step")), None)
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
) -> MlflowEntry:
    """Log one finished request and register its model; returns where it is recorded.

    `input_example`: a few rows as the model takes them (pipelines.mlflow_model.example_rows),
    the registered MLflow models' input example.
    """
    mlflow = _mlflow()
    client = _client()
    mlflow.set_experiment(EXPERIMENT)
    _ensure_registered(client, model_name)
    parent = _register_original(mlflow, client, model_name, parent_checkpoint, parent_fingerprint, input_example)
    with mlflow.start_run(run_name=f"forget {report.forget.spec} ({report.method})") as run:
        mlflow.set_tags({"amnesis.role": "request", "amnesis.parent_version": str(parent.version)})
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
        mlflow.log_text(json.dumps({**report.to_json(), "mlflow": asdict(entry)}, indent=2), "report.json")
    return entry


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


WALK_KEYS = {"forget_acc": "forget_acc", "alpha": "alpha", "lam": "lambda", "s": "s", "percentile": "percentile"}


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


def walk_history(model_name: str, version: str) -> list[dict]:
    """The PTN walk that made `version`, read back from its run's metric history (step order)."""
    client = _client()
    run_id = client.get_model_version(model_name, version).run_id
    steps: dict[int, dict] = {}
    for name in WALK_KEYS.values():
        for metric in client.get_metric_history(run_id, f"walk/{name}"):
            steps.setdefault(metric.step, {"step": metric.step})[name] = metric.value
    return [steps[index] for index in sorted(steps)]


def _log_files(mlflow, run_dir: Path, report_files: list[Path]) -> None:
    """The forget manifest and the report page (the checkpoint goes with the model version)."""
    mlflow.log_artifact(str(run_dir / "forget_ids.txt"))
    for plot in report_files:
        mlflow.log_artifact(str(plot), artifact_path="report")


def history(model_name: str) -> list[dict]:
    """Every version of `model_name`, oldest first, with what each removed."""
    client = _client()
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException as error:
        from unlearning.errors import UserError

        raise UserError(f"cannot read model {model_name!r} at {tracking_uri()}: {_first_line(error)}") from None
    try:
        current = str(client.get_model_version_by_alias(model_name, CURRENT_ALIAS).version)
    except MlflowException:
        current = None
    rows = []
    for version in sorted(versions, key=lambda v: int(v.version)):
        tags = dict(version.tags)
        rows.append(
            {
                "version": str(version.version),
                "current": str(version.version) == current,
                "role": tags.get("role", ""),
                "parent_version": tags.get("parent_version", ""),
                "method": tags.get("method", ""),
                "forget_spec": tags.get("forget_spec", ""),
                "forget_size": int(tags.get("forget_size", 0) or 0),
                "forget_manifest_hash": tags.get("forget_manifest_hash", ""),
                "run_id": version.run_id,
            }
        )
    return rows


def removed_ids(model_name: str, version: str) -> list[int]:
    """The ids a version's request removed (its forget manifest artifact)."""
    mlflow = _mlflow()
    client = _client()
    run_id = client.get_model_version(model_name, version).run_id
    target = tempfile.mkdtemp(prefix="amnesis-ids-")
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="forget_ids.txt", dst_path=target)
    except Exception:
        return []
    return [int(line) for line in Path(path).read_text().split()]


def lineage_removed_ids(model_name: str, version: str) -> list[int]:
    """All ids removed on the way from the original model to `version` (walking parents)."""
    client = _client()
    removed: list[int] = []
    current = str(version)
    seen = set()
    while current and current not in seen:
        seen.add(current)
        tags = dict(client.get_model_version(model_name, current).tags)
        if tags.get("role") == "unlearned":
            removed.extend(removed_ids(model_name, current))
        current = tags.get("parent_version", "")
    return sorted(set(removed))


def version_info(model_name: str, alias: str = CURRENT_ALIAS) -> dict | None:
    """The version an alias points to, or None if the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None
    return {"version": str(version.version), "tags": dict(version.tags), "run_id": version.run_id}


def find_batch_version(model_name: str, batch_tag: str) -> dict | None:
    """A version already registered for a ledger batch (an interrupted run got that far)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return None
    for version in versions:
        if version.tags.get("batch_id") == batch_tag:
            return {"version": str(version.version), "tags": dict(version.tags), "run_id": version.run_id}
    return None


def register_alias(model_name: str, version: str, alias: str = CURRENT_ALIAS) -> None:
    _client().set_registered_model_alias(model_name, alias, version)
