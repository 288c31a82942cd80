"""The registry read back: a model's versions, what each removed, the PTN walk behind one.

Reads only (pipelines.tracking writes): `unlearn history`, the ledger's batches, a rerun looking
for what a killed request registered, and the check that a name holds this model's lineage.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.tracking import (
    CURRENT_ALIAS,
    WALK_KEYS,
    _client,
    _first_line,
    _mlflow,
    check_model_name,
    tracking_uri,
)
from unlearning.errors import UserError
from unlearning.tempdirs import scratch


def walk_history(model_name: str, version: str) -> list[dict]:
    """The PTN walk that made `version`, read back from its run's metric history (step order)."""
    client = _client()
    run_id = client.get_model_version(model_name, version).run_id
    steps: dict[int, dict] = {}
    for name in WALK_KEYS.values():
        for metric in client.get_metric_history(run_id, f"walk/{name}"):
            steps.setdefault(metric.step, {"step": metric.step})[name] = metric.value
    return [steps[index] for index in sorted(steps)]


def history(model_name: str) -> list[dict]:
    """Every version of `model_name`, oldest first, with what each removed."""
    client = _client()
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException as error:
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
                "target_met": tags.get("target_met") != "false",
                "run_id": version.run_id,
            }
        )
    return rows


def removed_ids(model_name: str, version: str) -> list[int]:
    """The ids a version's request removed (its forget manifest artifact)."""
    mlflow = _mlflow()
    client = _client()
    run_id = client.get_model_version(model_name, version).run_id
    with scratch("ids") as target:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="forget_ids.txt",
                                                       dst_path=str(target))
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
            return {"name": model_name, "version": str(version.version), "tags": dict(version.tags),
                    "run_id": version.run_id}
    return None


def resolve_with_removed(model_uri: str) -> tuple[str, dict | None, list[int]]:
    """(checkpoint path, registry version or None, ids removed on the way to that version)."""
    if not str(model_uri).startswith("models:/"):
        return str(model_uri), None, []
    from pipelines.tracking import resolve_model

    model_path, version = resolve_model(str(model_uri))
    return model_path, version, lineage_removed_ids(version["name"], version["version"])


def check_lineage(name: str, root: str) -> None:
    """UserError if registered model `name` holds another lineage than the one whose original
    model has fingerprint `root` (its `role=original` version's fingerprint tag)."""
    client = _client()
    for version in client.search_model_versions(f"name = '{check_model_name(name)}'"):
        tags = version.tags
        if tags.get("role") == "original" and tags.get("fingerprint") not in (None, root):
            raise UserError(f"registered model {name!r} holds the versions of another model (original "
                            f"{tags['fingerprint']}), not of this one (original {root}); give another --model-name")


def find_request_version(request_id: str) -> dict | None:
    """The version registered for a request (by its `request_id` tag), in any registered model."""
    versions = _client().search_model_versions(f"tags.request_id = '{request_id}'")
    if not versions:
        return None
    version = versions[0]
    return {"name": version.name, "version": str(version.version), "tags": dict(version.tags),
            "run_id": version.run_id}
