"""The suites' building blocks: I^D, the tasks, one method on one request, one request.

Every figure comes from `unlearning/` and `pipelines/`: the task from
`pipelines.request.build_task`, the timing from `run_method_timed`, the metrics from
`unlearning.evaluation`. This module only chooses settings and shapes rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

import unlearning
from benchmarks.common import CACHE, Scale, log
from benchmarks.outcome_cache import OriginalOutcomes
from pipelines.request import build_task, run_method_timed
from unlearning.checkpoint import all_finite, model_meta
from unlearning.errors import UserError
from unlearning.evaluation import evaluate_model
from unlearning.mia import calibrated_mia

# importance kind each method reads (docs/methods.md#importance); the others read none
KIND = {"ssd": "fisher", "lfssd": "l2", "assd": "fisher", "potion_step": "l2_norm", "ptn": "fisher", "potion": "l2_norm",
        "ptn_paper": "fisher", "potion_paper": "l2_norm"}
# One pass over D_r for the fine-tuning baselines (docs/methods.md#baselines; the library
# defaults are 5 and 3): the original model itself trains for only 3 epochs here (8 at --quick
# scale), and a baseline that costs more than retraining says nothing. RESULTS.md states it
# with each table.
FINETUNE_BUDGET = {"finetune": {"epochs": 1}, "amnesiac": {"epochs": 1}}
# Today's baselines default to 10 epochs over D_r (SCRUB: 3): more than retraining this 3-epoch
# model costs. They run at the retrain budget, 3 epochs (SCRUB keeps its own 3); RESULTS.md says so.
FINETUNE_BUDGET.update({name: {"epochs": 3} for name in ("salun", "l1_sparse", "neggrad_plus")})
BASE_METRICS = ("retain_acc", "forget_acc", "test_acc", "mia")  # docs/methods.md#metrics


def mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def first_seed(scale: Scale) -> int:
    return (scale.seeds or [0])[0]


def full_importance(model, dataset, scale: Scale, kind: str, batch_size: int) -> tuple[dict, float]:
    """I^D over the whole training split (computed once per model and kind, cached on disk)."""
    fingerprint = unlearning.model_fingerprint(model)
    name = f"{fingerprint}-{dataset.fingerprint}-{kind}-{scale.importance_mode}{batch_size}"
    path = CACHE / "importance" / name
    if path.exists():
        importance, meta = unlearning.load_importance(path, model)
        return importance, float(meta["seconds"])
    started = time.perf_counter()
    batches = dataset.train.batches(batch_size, shuffle=False, normalize=model_meta(model)["normalize"])
    sums = unlearning.compute_importance_sums(
        model, batches, kind=kind, mode=scale.importance_mode, device=scale.device
    )
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    unlearning.save_importance(sums, path, fingerprint, dataset.fingerprint, {"seconds": seconds})
    log(f"importance over D ({kind}, {scale.importance_mode}, {len(dataset.train)} rows): {seconds:.1f} s")
    return sums.mean(), seconds


def task_settings(scale: Scale, batch_size: int) -> dict:
    """The UnlearningTask settings of every benchmark request (docs/methods.md#importance)."""
    return {
        "importance_mode": scale.importance_mode,
        "batch_size": batch_size,
        "shuffle_batches": False,  # the reference runs' unshuffled loader
        "seed": 0,
        "device": scale.device,
        "inference_precision": scale.inference_precision,
    }


def method_params(name: str, scale: Scale) -> dict:
    params = dict(FINETUNE_BUDGET.get(name, {}))
    if name in ("ptn", "potion", "ptn_paper", "potion_paper") and scale.ptn_start_divisor is not None:
        params["start_divisor"] = scale.ptn_start_divisor
    if name == "retrain" and scale.retrain_epochs is not None:
        params["epochs"] = scale.retrain_epochs
    return {**params, **(scale.method_params or {}).get(name, {})}


def diverged_metrics(dataset, forget) -> dict:
    """The metrics of a model with non-finite weights or logits: all NaN."""
    metrics = {key: float("nan") for key in BASE_METRICS}
    if forget.kind in ("class", "subclass"):
        metrics.update(test_forget_acc=float("nan"), test_retain_acc=float("nan"))
    if dataset.poison is not None:
        metrics.update(attack_success_rate=float("nan"), poisoned_clean_acc=float("nan"))
    return metrics


def evaluate_output(model, task, dataset, forget, references=None) -> tuple[dict, bool]:
    """(metrics, diverged); a diverged model is reported as such rather than stopping the suite.
    With `references`, the calibrated membership test's metrics too."""
    diverged = not all_finite(model)
    try:
        metrics = evaluate_model(model, dataset, forget, task.normalize)
    except ValueError:  # non-finite logits reach the MIA's logistic regression
        diverged = True
    if diverged:
        metrics = diverged_metrics(dataset, forget)
    elif references is not None:
        metrics.update(calibrated_mia([model], references, dataset, forget, task.normalize)[0])
    metrics.pop("per_class_test_acc", None)
    return metrics, diverged


def run_one(name: str, task, dataset, forget, params: dict, references=None) -> dict:
    """One method on one request: unlearning seconds apart from importance seconds. A method that
    refuses (e.g. a search above its ceiling on retained damage) gives a row saying why, all NaN."""
    try:
        output, seconds = run_method_timed(task, name, params)
    except UserError as error:
        log(f"{name} refused: {error}")
        return {"method": name, "params": {}, "details": {"refused": str(error)},
                "metrics": diverged_metrics(dataset, forget), "seconds_importance": math.nan,
                "seconds_unlearn": math.nan, "diverged": False, "refused": True}
    metrics, diverged = evaluate_output(output.model, task, dataset, forget, references)
    details = {k: v for k, v in output.details.items() if k != "path"}
    if "path" in output.details:
        details["search_steps"] = len(output.details["path"])
    return {
        "method": name,
        "params": {k: v for k, v in output.params.items() if isinstance(v, (int, float, str, type(None)))},
        "details": details,
        "metrics": metrics,
        "seconds_importance": seconds["importance"],
        "seconds_unlearn": seconds["unlearn"],
        "diverged": diverged,
    }


def method_row(request: dict, name: str) -> dict:
    return next(row for row in request["rows"] if row["method"] == name)


def answered(requests: list[dict], name: str) -> tuple[list[dict], int]:
    """(the requests `name` answered, how many it refused); summaries average the answered ones
    and say how many were refused, rather than letting a refusal's NaN decide a worst case."""
    kept = [q for q in requests if name == "original" or not method_row(q, name).get("refused")]
    return kept, len(requests) - len(kept)


def shown(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))


@dataclass
class Bench:
    """What a suite's requests share: the original model, its data and I^D per importance kind."""

    model: torch.nn.Module
    dataset: unlearning.Dataset
    scale: Scale
    methods: list[str]
    batch_size: int
    importances: dict = field(default_factory=dict)
    importance_seconds: dict = field(default_factory=dict)
    references: object = None  # unlearning.mia.References, when the suite runs the calibrated test
    original_outcomes: OriginalOutcomes | None = None  # the original's passes, cached on disk

    @classmethod
    def build(cls, model, dataset, scale: Scale, methods: list[str], batch_size: int) -> Bench:
        """I^D for every kind the methods read, computed (or read from the cache) once."""
        bench = cls(model, dataset, scale, methods, batch_size)
        for kind in sorted({KIND[m] for m in methods if m in KIND}):
            imp, seconds = full_importance(model, dataset, scale, kind, batch_size)
            bench.importances[kind], bench.importance_seconds[kind] = imp, seconds
        return bench

    def original_executor(self) -> OriginalOutcomes:
        """Evaluates the original from its stored outcome passes (benchmarks/outcome_cache.py)."""
        if self.original_outcomes is None:
            self.original_outcomes = OriginalOutcomes(self.model, self.dataset, CACHE / "outcomes", self.scale.device)
        return self.original_outcomes

    def task(self, forget, kind: str | None = None):
        """A task seeded with the stored I^D of `kind` (so I^{D_r} is derived), or with none."""
        store = {"full_importance": self.importances[kind], "full_importance_kind": kind} if kind else {}
        return build_task(self.model, self.dataset, forget, **task_settings(self.scale, self.batch_size), **store)

    def tasks_by_kind(self, forget) -> dict:
        """One task per importance kind; methods that read none get the fisher task's."""
        tasks = {kind: self.task(forget, kind) for kind in self.importances}
        tasks[None] = tasks.get("fisher") or self.task(forget)
        return tasks


def run_request(bench: Bench, forget, tag: str) -> tuple[dict, list]:
    """The original model's metrics and one row per method on one request."""
    normalize = model_meta(bench.model)["normalize"]
    original = evaluate_model(bench.model, bench.dataset, forget, normalize, executor=bench.original_executor())
    original.pop("per_class_test_acc", None)
    if bench.references is not None:
        original.update(calibrated_mia([bench.model], bench.references, bench.dataset, forget, normalize)[0])
    log(f"{tag} {'original':11s} {shown(original)}")
    tasks = bench.tasks_by_kind(forget)
    rows = []
    for name in bench.methods:
        row = run_one(name, tasks[KIND.get(name)], bench.dataset, forget, method_params(name, bench.scale),
                      bench.references)
        seconds = f"imp {row['seconds_importance']:.1f}s  unlearn {row['seconds_unlearn']:.1f}s"
        log(f"{tag} {name:11s} {shown(row['metrics'])}  {seconds}")
        rows.append(row)
    return original, rows
