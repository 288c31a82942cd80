"""The fullclass, subclass and random suites (docs/methods.md#benchmark-tasks).

fullclass forgets class K; subclass trains on coarse labels and forgets fine class K; random
forgets `--random-count` random training rows, one request per `--forget-seeds`.
"""

from __future__ import annotations

import math
from pathlib import Path

import unlearning
from benchmarks.common import Scale, load, log, original_model, reference_models
from benchmarks.suites.blocks import (
    BASE_METRICS,
    Bench,
    answered,
    first_seed,
    mean,
    method_row,
    run_request,
)

COARSE = "0,1,8,9/2,3,4,5,6,7"  # CIFAR-10 vehicles vs animals, fine labels kept
RMIA_METRICS = ("rmia_auc", "rmia_flagged")  # with --references (unlearning.mia)
RANDOM_BATCH = 128  # the reference's batch for random forgetting (docs/methods.md#importance)


def class_like_suite(args, scale: Scale, kind: str) -> dict:
    """fullclass (forget class K) or subclass (coarse model, forget fine class K)."""
    dataset, spec = load(scale, f"+coarse:{args.coarse}" if kind == "subclass" else "")
    model, info = original_model(scale, dataset, first_seed(scale), log)
    bench = Bench.build(model, dataset, scale, args.methods, scale.importance_batch)
    names = fine_class_names(scale) if kind == "subclass" else dataset.class_names
    classes = scale.classes if scale.classes is not None else list(range(len(names)))
    requests = [class_request(bench, f"{kind}:{k}", names[k]) for k in classes]
    return {
        "data": spec,
        "original_model": info,
        "importance_over_D_seconds": bench.importance_seconds,
        "requests": requests,
        "summary": summarise_classes(requests, args.methods),
    }


def class_request(bench: Bench, spec: str, class_name: str) -> dict:
    forget = unlearning.parse_forget(spec, bench.dataset)
    original, rows = run_request(bench, forget, spec)
    return {"forget": spec, "class_name": class_name, "original": original, "rows": rows}


def fine_class_names(scale: Scale) -> list[str]:
    """Class names of the source data (the coarse data set names its coarse groups instead)."""
    import pyarrow.parquet as pq

    path = Path(scale.data) / "train.parquet"
    columns = pq.read_schema(path).names
    table = pq.read_table(path, columns=[c for c in ("label", "label_name") if c in columns])
    labels = table.column("label").to_pylist()
    names = table.column("label_name").to_pylist() if "label_name" in columns else [str(k) for k in labels]
    pairs = dict(zip(labels, names))
    return [str(pairs.get(k, k)) for k in range(max(labels) + 1)]


def request_outcome(request: dict, name: str) -> tuple[dict, tuple[float, float]]:
    """(metrics, (importance s, unlearning s)) of one method, or of the original model, on a request."""
    if name == "original":
        return request["original"], (0.0, 0.0)
    row = method_row(request, name)
    return row["metrics"], (row["seconds_importance"], row["seconds_unlearn"])


def summarise_classes(requests: list[dict], methods: list[str]) -> list[dict]:
    return [class_summary(name, requests) for name in ["original", *methods]]


def class_summary(name: str, requests: list[dict]) -> dict:
    """Means over the requests and the worst request (highest forget accuracy) of one method."""
    per = []  # (forget spec, metrics, retained test accuracy drop, seconds)
    requests, refused = answered(requests, name)
    if not requests:
        return {"method": name, "refused": refused, **dict.fromkeys(CLASS_FIGURES, math.nan), "worst_forget_class": "–"}
    for request in requests:
        metrics, seconds = request_outcome(request, name)
        drop = request["original"]["test_retain_acc"] - metrics["test_retain_acc"]
        per.append((request["forget"], metrics, drop, seconds))
    worst = max(per, key=lambda p: p[1]["test_forget_acc"])
    return {
        "method": name,
        "retain_acc": mean(p[1]["test_retain_acc"] for p in per),
        "forget_acc": mean(p[1]["test_forget_acc"] for p in per),
        "train_forget_acc": mean(p[1]["forget_acc"] for p in per),
        "test_acc": mean(p[1]["test_acc"] for p in per),
        "mia": mean(p[1]["mia"] for p in per),
        "retain_drop": mean(p[2] for p in per),
        "worst_forget_acc": worst[1]["test_forget_acc"],
        "worst_forget_class": worst[0],
        "worst_retain_drop": max(p[2] for p in per),
        "seconds_importance": mean(p[3][0] for p in per),
        "seconds_unlearn": mean(p[3][1] for p in per),
        "refused": refused,
    }


CLASS_FIGURES = ("retain_acc", "forget_acc", "train_forget_acc", "test_acc", "mia", "retain_drop", "worst_forget_acc",
                 "worst_retain_drop", "seconds_importance", "seconds_unlearn")


def random_suite(args, scale: Scale) -> dict:
    dataset, spec = load(scale)
    model, info = original_model(scale, dataset, first_seed(scale), log)
    bench = Bench.build(model, dataset, scale, args.methods, RANDOM_BATCH)
    if scale.references:
        bench.references = reference_models(scale, model, dataset, first_seed(scale), log)
    requests = []
    for forget_seed in args.forget_seeds:
        forget = unlearning.parse_forget(f"random:{args.random_count}:{forget_seed}", dataset)
        original, rows = run_request(bench, forget, forget.spec)
        requests.append({"forget": forget.spec, "original": original, "rows": rows})
    summary = [random_summary(name, requests) for name in ["original", *args.methods]]
    return {"data": spec, "original_model": info, "importance_over_D_seconds": bench.importance_seconds,
            "requests": requests, "summary": summary}


def random_summary(name: str, requests: list[dict]) -> dict:
    kept, refused = answered(requests, name)
    per = [request_outcome(request, name) for request in kept]
    if not per:
        return {"method": name, "refused": refused,
                **dict.fromkeys((*BASE_METRICS, "seconds_importance", "seconds_unlearn"), math.nan)}
    return {
        "method": name,
        "refused": refused,
        **{key: mean(metrics[key] for metrics, _ in per) for key in BASE_METRICS},
        **{key: mean(metrics[key] for metrics, _ in per) for key in RMIA_METRICS if key in per[0][0]},
        "seconds_importance": mean(seconds[0] for _, seconds in per),
        "seconds_unlearn": mean(seconds[1] for _, seconds in per),
    }
