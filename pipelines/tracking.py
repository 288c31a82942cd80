"""MLflow: one run per deletion request, trials as nested runs, a registered model lineage.

Only the driver writes (Tune trials report metrics back; several processes creating one
fresh SQLite store at once race on its schema). The store defaults to `sqlite:///mlflow.db`
in the working directory; `MLFLOW_TRACKING_URI` overrides it.

Registry layout: the original model is registered once (tag `role=original`); every request
adds a version whose tags name its `parent_version`, the request's run, the forget-set
manifest hash and size; the alias `@current` moves to the newest version, so the next
request can start from `models:/NAME@current`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from pipelines.report import MlflowEntry, RequestReport

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

    Returns (path, version info); registry checkpoints are downloaded to a temporary folder.
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
    path = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=target)
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


def _register_original(mlflow, client, name: str, checkpoint: str, fingerprint: str):
    """Register the request's parent model if the registry does not know it yet."""
    existing = _find_version_by_fingerprint(client, name, fingerprint)
    if existing is not None:
        return existing
    with mlflow.start_run(run_name="original-model") as run:
        mlflow.set_tag("amnesis.role", "original")
        mlflow.log_artifacts(checkpoint, artifact_path="checkpoint")
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/checkpoint",
        run_id=run.info.run_id,
        tags={"role": "original", "fingerprint": fingerprint, "parent_version": ""},
    )
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
) -> MlflowEntry:
    """Log one finished request and register its model; returns where it is recorded."""
    mlflow = _mlflow()
    client = _client()
    mlflow.set_experiment(EXPERIMENT)
    _ensure_registered(client, model_name)
    parent = _register_original(mlflow, client, model_name, parent_checkpoint, parent_fingerprint)
    with mlflow.start_run(run_name=f"forget {report.forget.spec} ({report.method})") as run:
        mlflow.set_tags({"amnesis.role": "request", "amnesis.parent_version": str(parent.version)})
        mlflow.log_params(flat_params(report))
        mlflow.log_metrics(flat_metrics(report))
        for trial in trials or []:
            with mlflow.start_run(run_name=f"trial {trial['name']}", nested=True):
                mlflow.log_params(trial["params"])
                mlflow.log_metrics(trial["metrics"])
        _log_files(mlflow, Path(run_dir), report_files or [])
        entry = MlflowEntry(run.info.run_id, model_name, str(parent.version))
        version = client.create_model_version(
            model_name,
            source=f"{run.info.artifact_uri}/checkpoint",
            run_id=run.info.run_id,
            tags={**version_tags(report, entry), **(extra_tags or {})},
        )
        client.set_registered_model_alias(model_name, CURRENT_ALIAS, version.version)
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


def _log_files(mlflow, run_dir: Path, report_files: list[Path]) -> None:
    """The checkpoint (as `checkpoint/`), the forget manifest and the report page."""
    staging = Path(tempfile.mkdtemp(prefix="amnesis-log-"))
    try:
        checkpoint = staging / "checkpoint"
        checkpoint.mkdir()
        for file in ("model.safetensors", "model.json"):
            shutil.copy2(run_dir / file, checkpoint / file)
        mlflow.log_artifacts(str(checkpoint), artifact_path="checkpoint")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
