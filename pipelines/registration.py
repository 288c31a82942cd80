"""Registration: the last step of a request, done once (docs/requests.md, "Registration").

    write_run (pipelines.request): the run directory, complete, renamed into place; its
        report.json has a fresh `request_id` and `mlflow: null`          -> fault point "written"
    record_run: an MLflow run tagged with the request id                 -> "run_created"
        its registered version, tagged with it too                      -> "version_registered"
        `@current` moves to it if it met its target (or --accept-unmet)  -> "recorded"
    then report.json is rewritten in place (a temporary sibling, os.replace) with the entry.

A kill or a full disk between two steps leaves nothing (before the rename) or a complete run
directory whose report has no MLflow entry. A rerun of the same request into the same
directory adopts it (`pipelines.request.adopt_run`): it finds the version tagged with the
request id (a kill after registering) or registers the directory's model (a kill before);
nothing is recomputed and no second version is made.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import unlearning
from pipelines.report import RequestReport
from unlearning.checkpoint import MODEL_META, MODEL_WEIGHTS, model_meta
from unlearning.errors import UserError
from unlearning.models import arch_label
from unlearning.outputs import OutputExists, write_json

if TYPE_CHECKING:
    from pipelines.options import ForgetOptions
    from pipelines.request import FaultPoint, PreparedRequest

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex
RUN_FILES = ("report.json", "forget_ids.txt", MODEL_META, MODEL_WEIGHTS)


def unrecorded_run(out: str | Path, track: bool) -> RequestReport | None:
    """The report of a complete run directory at `out` that was never recorded in MLflow (a
    killed request wrote it), to be adopted; None if `out` does not exist.

    Anything else at `out` (a recorded or untracked request's directory, or not a run directory
    at all) raises OutputExists: nothing is overwritten."""
    out = Path(out)
    if not os.path.lexists(out):
        return None
    report = read_run(out) if track else None
    if report is None or report.mlflow is not None:
        raise OutputExists(out)
    return report


def read_run(out: Path) -> RequestReport | None:
    """The report of the complete run directory at `out` (one with a request id), else None."""
    if not out.is_dir() or not all((out / name).is_file() for name in RUN_FILES):
        return None
    try:
        report = RequestReport.from_json(json.loads((out / "report.json").read_text()))
        written = json.loads((out / MODEL_META).read_text()).get("fingerprint")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # not a run directory's files
        return None
    if not REQUEST_ID.match(str(report.request_id)) or written != report.fingerprint:
        return None
    return report


def registered_name(prepared: PreparedRequest, version: dict | None, options: ForgetOptions) -> str:
    """The registered model a request adds a version to: its starting version's, the option's,
    or <arch>-<data set>-<first 8 hex digits of the lineage's original fingerprint>, so that
    two unrelated models trained on the same data never share a name (and `@current`)."""
    start = (version or {}).get("name")
    if start and options.model_name and options.model_name != start:
        raise UserError(f"--model-name {options.model_name} differs from the registered model the request "
                        f"starts from ({start}); a version joins its parent's model")
    if start or options.model_name:
        return start or options.model_name
    meta = model_meta(prepared.model)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{arch_label(meta['arch'])}-{prepared.dataset.name}").strip("-.")
    return f"{base[:90] or 'model'}-{lineage_root(prepared.model)[:8]}"


def lineage_root(model) -> str:
    """The fingerprint of the original model `model` descends from (itself if it is one)."""
    meta = model_meta(model)
    return meta.get("lineage_root") or meta.get("parent_fingerprint") or unlearning.model_fingerprint(model)


def record_run(out: Path, report: RequestReport, prepared: PreparedRequest, model_path: str | None,
               version: dict | None, options: ForgetOptions, trials: list[dict] | None = None,
               fault_point: FaultPoint | None = None, adopted: bool = False) -> None:
    """Log the written run directory at `out` to MLflow and register its model, then put the
    MLflow entry into its report.json (`report.mlflow` is set)."""
    from pipelines.mlflow_model import example_rows
    from pipelines.tracking import log_report, log_request

    name = registered_name(prepared, version, options)
    report.mlflow = log_request(
        report, out, name, model_path, unlearning.model_fingerprint(prepared.model), trials, report_files(out),
        extra_tags={"batch_id": options.batch_tag} if options.batch_tag else None,
        input_example=example_rows(prepared.dataset.test, prepared.task.normalize),
        parent_version=(version or {}).get("version") if (version or {}).get("name") == name else None,
        move_current=bool(report.target_met) or options.accept_unmet, fault_point=fault_point,
    )
    if adopted:
        report.mlflow.adopted = True
        log_report(report)
    if fault_point is not None:
        fault_point("recorded")  # in MLflow, @current moved; report.json not yet updated
    rewrite_report(out, report)


def complete_recorded(out: Path | None, report: RequestReport | None, recorded: dict, accept_unmet: bool):
    """A version an interrupted run registered (`recorded`, from lineage.find_request_version
    or find_batch_version): finish what that run did not (`@current`, its run, report.json).
    Returns the MLflow entry; `report` (the run directory's, if there is one) gets it too."""
    from pipelines.tracking import finish_request

    met = recorded["tags"].get("target_met") != "false"
    entry = finish_request(recorded, report, move_current=met or accept_unmet)
    if report is not None and out is not None:
        report.mlflow = entry
        rewrite_report(out, report)
    return entry


def report_files(out: Path) -> list[Path]:
    """The report page and its plots in a run directory (none without --plots)."""
    page = out / "report.md"
    return [page, *sorted(out.glob("*.png"))] if page.is_file() else []


def rewrite_report(out: Path, report: RequestReport) -> None:
    """report.json again, in place and atomically: a hidden sibling, then os.replace (one name:
    a request has one writer, and a sibling a kill left behind is simply written over)."""
    staging = out / ".report.json.partial"
    try:
        write_json(staging, report.to_json())
        os.replace(staging, out / "report.json")
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
