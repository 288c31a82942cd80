"""`RequestReport`: what one deletion request did, built once and read by everything after.

Tracking (MLflow params, metrics and tags), the console summary, `report.md` and the ledger
all read this object; `to_json()` is the run directory's `report.json` (a stable contract,
docs/requests.md) and `from_json` reads one back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class ForgetSummary:
    """The forget set of a request."""

    spec: str
    kind: str  # "class", "subclass", "random", "ids", "poison"
    size: int
    classes: list[int]
    manifest_hash: str  # hash of the sorted ids (docs/requests.md)
    forget_fraction: float  # |D_f| / (|D_f| + |D_r|)


@dataclass
class ImportanceSummary:
    """How the request's importances were computed."""

    mode: str
    batch_size: int
    store: dict | None  # the importance store's meta, if one was given
    on_ray: list[dict] = field(default_factory=list)  # splits computed on Ray: rows, workers, seconds


@dataclass
class MlflowEntry:
    """Where the request is recorded: its run and the registered version."""

    run_id: str
    model_name: str
    parent_version: str
    model_version: str | None = None
    current_version: str | None = None  # where @current pointed once the request was recorded
    adopted: bool = False  # recorded by a rerun, from the run directory an interrupted run wrote


@dataclass
class RequestReport:
    method: str
    params: dict  # the parameters used, e.g. the alpha and lambda a search chose
    details: dict  # method-specific: the search path, whether the target was reached
    metrics: dict  # of the unlearned model: retain_acc, forget_acc, test_acc, mia, ...
    original_metrics: dict  # the same metrics of the model the request started from
    seconds: dict  # importance, unlearn, total
    forget: ForgetSummary
    importance: ImportanceSummary
    data: dict  # spec, fingerprint
    seed: int
    removed_before: int  # ids removed by earlier versions in the lineage
    parent_fingerprint: str | None = None
    retrain_metrics: dict | None = None  # --compare-retrain
    retrain_seconds: float | None = None
    fingerprint: str | None = None  # of the new model, once written
    mlflow: MlflowEntry | None = None  # once recorded
    has_plots: bool = False
    passes_on_ray: list[dict] = field(default_factory=list)  # outcome passes on Ray: rows, workers, seconds
    method_on_ray: dict | None = None  # a method with its own loop run as a Ray task: device, threads, seconds
    target: float | None = None  # the forget-accuracy target: what retraining would give (docs/methods.md)
    target_met: bool | None = None  # forget accuracy <= target; if not, @current stays (unless --accept-unmet)
    inference_precision: str = "fp32"  # of the outcome passes behind every accuracy here
    request_id: str | None = None  # names the run directory, its MLflow run and version (a rerun adopts by it)

    @property
    def reached(self) -> bool:
        """False when a search ended without meeting its target."""
        return self.details.get("reached") is not False

    def to_json(self) -> dict:
        data = asdict(self)
        data["parent"] = {"fingerprint": data.pop("parent_fingerprint")}
        for optional in ("retrain_metrics", "retrain_seconds", "method_on_ray"):
            if data[optional] is None:
                del data[optional]
        if not self.has_plots:
            del data["has_plots"]
        return data

    @classmethod
    def from_json(cls, data: dict) -> RequestReport:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["forget"] = ForgetSummary(**data["forget"])
        values["importance"] = ImportanceSummary(**data["importance"])
        values["parent_fingerprint"] = (data.get("parent") or {}).get("fingerprint")
        values["mlflow"] = MlflowEntry(**data["mlflow"]) if data.get("mlflow") else None
        return cls(**values)
