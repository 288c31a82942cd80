"""The papers' experiments and the speed figures: `python -m benchmarks.run SUITE [--quick]`.

Suites: fullclass, subclass, random, poison, speed, all. Each writes
benchmarks/results/SUITE[-quick].json (every figure, the command, the machine and its load)
and SUITE[-quick].png, and prints markdown tables. Original models and importances over D are
cached under benchmarks/cache/ (git-ignored), keyed by data, architecture, recipe and seed.

All maths comes from `unlearning/` and `pipelines/`: this file picks the scale, builds the
tasks, times the calls and tabulates. See benchmarks/README.md for the flags.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import unlearning
from benchmarks.common import (
    CACHE,
    CIFAR10,
    RESULTS,
    Scale,
    load,
    machine,
    original_model,
    write_json,
)
from pipelines.ray_session import available_cpus
from unlearning.checkpoint import all_finite
from unlearning.data import split_forget
from unlearning.evaluation import evaluate_model
from unlearning.metrics import healed_fraction

SUITES = ("fullclass", "subclass", "random", "poison", "speed")
CLASS_METHODS = ["ssd", "lfssd", "assd", "potion", "ptn", "jit", "retrain", "finetune", "amnesiac", "bad_teacher"]
POISON_METHODS = ["potion_ptn", "ssd", "retrain", "finetune"]
# importance kind each method reads (SPEC.md sections 2-5); the others read none
KIND = {"ssd": "fisher", "lfssd": "l2", "assd": "fisher", "potion": "l2_norm", "ptn": "fisher", "potion_ptn": "l2_norm"}
COARSE = "0,1,8,9/2,3,4,5,6,7"  # CIFAR-10 vehicles vs animals, fine labels kept
# One pass over D_r for the fine-tuning baselines (the library defaults are 5 and 3): the
# original model itself trains for only 3 epochs here (8 at --quick scale), and a baseline
# that costs more than retraining says nothing. RESULTS.md states it with each table.
FINETUNE_BUDGET = {"finetune": {"epochs": 1}, "amnesiac": {"epochs": 1}}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------ building blocks


def full_importance(model, dataset, scale: Scale, kind: str, batch_size: int) -> tuple[dict, float]:
    """I^D over the whole training split (computed once per model and kind, cached on disk)."""
    fingerprint = unlearning.model_fingerprint(model)
    path = CACHE / "importance" / f"{fingerprint}-{dataset.fingerprint}-{kind}-{scale.importance_mode}{batch_size}"
    if path.exists():
        importance, meta = unlearning.load_importance(path, model)
        return importance, float(meta["seconds"])
    started = time.perf_counter()
    sums = unlearning.compute_importance_sums(
        model,
        dataset.train.batches(batch_size, shuffle=False, normalize=model.amnesis_meta["normalize"]),
        kind=kind,
        mode=scale.importance_mode,
        device=scale.device,
    )
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    unlearning.save_importance(sums, path, fingerprint, dataset.fingerprint, {"seconds": seconds})
    log(f"importance over D ({kind}, {scale.importance_mode}, {len(dataset.train)} rows): {seconds:.1f} s")
    return sums.mean(), seconds


def make_task(model, dataset, forget, scale: Scale, batch_size: int, full=None, kind=None):
    retain_split, forget_split = split_forget(dataset, forget)
    return unlearning.UnlearningTask(
        model=model,
        dataset=dataset,
        forget=forget,
        retain_split=retain_split,
        forget_split=forget_split,
        normalize=model.amnesis_meta["normalize"],
        importance_mode=scale.importance_mode,
        batch_size=batch_size,
        shuffle_batches=False,  # the reference runs' unshuffled loader (SPEC.md section 1)
        seed=0,
        device=scale.device,
        train_config=unlearning.training.TrainConfig(**model.amnesis_meta["train_config"]),
        full_importance=full,
        full_importance_kind=kind,
    )


def method_params(name: str, scale: Scale) -> dict:
    params = dict(FINETUNE_BUDGET.get(name, {}))
    if name in ("ptn", "potion_ptn") and scale.ptn_start_divisor is not None:
        params["start_divisor"] = scale.ptn_start_divisor
    if name == "retrain" and scale.retrain_epochs is not None:
        params["epochs"] = scale.retrain_epochs
    return {**params, **(scale.method_params or {}).get(name, {})}


def parse_method_param(text: str) -> tuple[str, str, object]:
    """`METHOD:KEY=VALUE` (VALUE as JSON, else a string) -> (method, key, value)."""
    method, sep, assignment = text.partition(":")
    key, eq, value = assignment.partition("=")
    if not (sep and eq and method and key):
        raise argparse.ArgumentTypeError(f"--param takes METHOD:KEY=VALUE, got {text!r}")
    try:
        return method, key, json.loads(value)
    except json.JSONDecodeError:
        return method, key, value


def run_one(name: str, task, dataset, forget, params: dict) -> dict:
    """One method on one request: unlearning seconds apart from importance seconds."""
    before = task.importance_seconds
    started = time.perf_counter()
    output = unlearning.run_method(name, task, **params)
    total = time.perf_counter() - started
    importance = task.importance_seconds - before
    diverged = not all_finite(output.model)
    try:
        metrics = evaluate_model(output.model, dataset, forget, task.normalize)
    except ValueError:  # non-finite logits reach the MIA's logistic regression
        diverged = True
    if diverged:  # reported as such rather than stopping the suite (see RESULTS.md)
        metrics = {key: float("nan") for key in ("retain_acc", "forget_acc", "test_acc", "mia")}
        if forget.kind in ("class", "subclass"):
            metrics.update(test_forget_acc=float("nan"), test_retain_acc=float("nan"))
        if dataset.poison is not None:
            metrics.update(attack_success_rate=float("nan"), poisoned_clean_acc=float("nan"))
    metrics.pop("per_class_test_acc", None)
    details = {k: v for k, v in output.details.items() if k != "path"}
    if "path" in output.details:
        details["search_steps"] = len(output.details["path"])
    return {
        "method": name,
        "params": {k: v for k, v in output.params.items() if isinstance(v, (int, float, str, type(None)))},
        "details": details,
        "metrics": metrics,
        "seconds_importance": importance,
        "seconds_unlearn": total - importance,
        "diverged": diverged,
    }


def tasks_by_kind(model, dataset, forget, scale, batch_size, importances) -> dict:
    """One task per importance kind, each seeded with its stored I^D (so I^{D_r} is derived)."""
    tasks = {kind: make_task(model, dataset, forget, scale, batch_size, imp, kind) for kind, imp in importances.items()}
    tasks[None] = tasks.get("fisher") or make_task(model, dataset, forget, scale, batch_size)
    return tasks


def run_request(model, dataset, forget, scale, batch_size, importances, methods, tag: str) -> tuple[dict, list]:
    original = evaluate_model(model, dataset, forget, model.amnesis_meta["normalize"])
    original.pop("per_class_test_acc", None)
    log(f"{tag} {'original':11s} " + "  ".join(f"{k} {v:.3f}" for k, v in original.items() if isinstance(v, float)))
    tasks = tasks_by_kind(model, dataset, forget, scale, batch_size, importances)
    rows = []
    for name in methods:
        row = run_one(name, tasks[KIND.get(name)], dataset, forget, method_params(name, scale))
        m = row["metrics"]
        shown = "  ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float))
        log(f"{tag} {name:11s} {shown}  imp {row['seconds_importance']:.1f}s  unlearn {row['seconds_unlearn']:.1f}s")
        rows.append(row)
    return original, rows


def mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------ suites


def class_like_suite(args, scale: Scale, kind: str) -> dict:
    """fullclass (forget class K) or subclass (coarse model, forget fine class K)."""
    dataset, spec = load(scale, f"+coarse:{args.coarse}" if kind == "subclass" else "")
    seed = (scale.seeds or [0])[0]
    model, info = original_model(scale, dataset, seed, log)
    importances, importance_seconds = {}, {}
    for k in sorted({KIND[m] for m in args.methods if m in KIND}):
        importances[k], importance_seconds[k] = full_importance(model, dataset, scale, k, scale.importance_batch)
    fine_names = fine_class_names(scale) if kind == "subclass" else dataset.class_names
    classes = scale.classes if scale.classes is not None else list(range(len(fine_names)))
    requests = []
    for k in classes:
        forget = unlearning.parse_forget(f"{kind}:{k}", dataset)
        original, rows = run_request(
            model, dataset, forget, scale, scale.importance_batch, importances, args.methods, f"{kind}:{k}"
        )
        requests.append({"forget": f"{kind}:{k}", "class_name": fine_names[k], "original": original, "rows": rows})
    return {
        "data": spec,
        "original_model": info,
        "importance_over_D_seconds": importance_seconds,
        "requests": requests,
        "summary": summarise_classes(requests, args.methods),
    }


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


def summarise_classes(requests, methods) -> list[dict]:
    summary = []
    for name in ["original", *methods]:
        per = []
        for request in requests:
            if name == "original":
                metrics, seconds = request["original"], (0.0, 0.0)
            else:
                row = next(r for r in request["rows"] if r["method"] == name)
                metrics, seconds = row["metrics"], (row["seconds_importance"], row["seconds_unlearn"])
            drop = request["original"]["test_retain_acc"] - metrics["test_retain_acc"]
            per.append((request["forget"], metrics, drop, seconds))
        worst = max(per, key=lambda p: p[1]["test_forget_acc"])
        summary.append({
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
        })
    return summary


def random_suite(args, scale: Scale) -> dict:
    dataset, spec = load(scale)
    model, info = original_model(scale, dataset, (scale.seeds or [0])[0], log)
    batch = 128  # the reference's batch for random forgetting (SPEC.md section 1)
    importances, importance_seconds = {}, {}
    for k in sorted({KIND[m] for m in args.methods if m in KIND}):
        importances[k], importance_seconds[k] = full_importance(model, dataset, scale, k, batch)
    requests = []
    for forget_seed in args.forget_seeds:
        forget = unlearning.parse_forget(f"random:{args.random_count}:{forget_seed}", dataset)
        original, rows = run_request(model, dataset, forget, scale, batch, importances, args.methods, forget.spec)
        requests.append({"forget": forget.spec, "original": original, "rows": rows})
    summary = []
    for name in ["original", *args.methods]:
        metrics = [r["original"] if name == "original" else next(x for x in r["rows"] if x["method"] == name)["metrics"] for r in requests]
        rows = [] if name == "original" else [next(x for x in r["rows"] if x["method"] == name) for r in requests]
        summary.append({
            "method": name,
            **{k: mean(m[k] for m in metrics) for k in ("retain_acc", "forget_acc", "test_acc", "mia")},
            "seconds_importance": mean(r["seconds_importance"] for r in rows) if rows else 0.0,
            "seconds_unlearn": mean(r["seconds_unlearn"] for r in rows) if rows else 0.0,
        })
    return {"data": spec, "original_model": info, "importance_over_D_seconds": importance_seconds,
            "requests": requests, "summary": summary}


def poison_suite(args, scale: Scale) -> dict:
    requests = []
    for seed in scale.seeds or [0]:
        for identified in args.identified:
            modifier = f"+poison:rate={args.poison_rate},identified={identified},seed={seed},target=0"
            dataset, spec = load(scale, modifier)
            model, info = original_model(scale, dataset, seed, log)
            importances = {}
            for k in sorted({KIND[m] for m in args.methods if m in KIND}):
                importances[k], _ = full_importance(model, dataset, scale, k, scale.importance_batch)
            forget = unlearning.parse_forget("poison:identified", dataset)
            original, rows = run_request(
                model, dataset, forget, scale, scale.importance_batch, importances, args.methods,
                f"seed {seed} identified {identified}",
            )
            for row in rows:
                m = row["metrics"]
                m["healed"] = healed_fraction(original["attack_success_rate"], m["attack_success_rate"])
                m["accuracy_drop"] = original["test_acc"] - m["test_acc"]
            requests.append({
                "seed": seed, "identified": identified, "data": spec, "original_model": info,
                "poisoned": dataset.notes["poison"]["poisoned"], "identified_count": len(forget.ids),
                "original": original, "rows": rows,
            })
    summary = []
    for identified in args.identified:
        for name in args.methods:
            rows = [next(r for r in q["rows"] if r["method"] == name) for q in requests if q["identified"] == identified]
            summary.append({
                "identified": identified,
                "method": name,
                "healed": mean(r["metrics"]["healed"] for r in rows),
                "healed_min": min(r["metrics"]["healed"] for r in rows),
                "accuracy_drop": mean(r["metrics"]["accuracy_drop"] for r in rows),
                "accuracy_drop_max": max(r["metrics"]["accuracy_drop"] for r in rows),
                "seconds": mean(r["seconds_importance"] + r["seconds_unlearn"] for r in rows),
                "seeds": len(rows),
            })
    return {"requests": requests, "summary": summary}


def speed_suite(args, scale: Scale) -> dict:
    from benchmarks.importance_throughput import measure
    from pipelines.ray_session import ensure_ray

    result: dict = {}
    # 1. importance throughput: Ray pipeline vs a bare loop, 1 and 2 workers
    threads = torch.get_num_threads()
    parts = set(args.speed_parts)
    if args.throughput_rows > 0 and "throughput" in parts:
        log(f"importance throughput over {args.throughput_rows} rows")
        ensure_ray(num_cpus=2)
        result["importance_throughput"] = measure(rows=args.throughput_rows, workers=[1, 2], print_fn=log)
        torch.set_num_threads(threads)
    else:
        result["importance_throughput"] = []  # --throughput-rows 0: skipped

    # 2. unlearning wall time vs retrain's, on one full-class request
    dataset, spec = load(scale)
    model, info = original_model(scale, dataset, (scale.seeds or [0])[0], log)
    k = (scale.classes or [0])[0]
    forget = unlearning.parse_forget(f"class:{k}", dataset)
    fisher, fisher_seconds = full_importance(model, dataset, scale, "fisher", scale.importance_batch)
    task = make_task(model, dataset, forget, scale, scale.importance_batch, fisher, "fisher")
    if "retrain" in parts:
        unlearn_vs_retrain(result, task, dataset, forget, scale, spec, fisher_seconds)
    if "ptn" in parts:
        if args.ptn_forget:  # a request whose search takes more than one step
            forget = unlearning.parse_forget(args.ptn_forget, dataset)
            task = make_task(model, dataset, forget, scale, scale.importance_batch, fisher, "fisher")
        ptn_speed(result, task, args, scale, fisher)
    return result


def unlearn_vs_retrain(result, task, dataset, forget, scale, spec, fisher_seconds) -> None:
    ssd_row = run_one("ssd", task, dataset, forget, {})
    retrain_row = run_one("retrain", task, dataset, forget, method_params("retrain", scale))
    result["unlearn_vs_retrain"] = {
        "data": spec, "forget": forget.spec,
        "ssd_unlearn_seconds": ssd_row["seconds_unlearn"],
        "ssd_forget_importance_seconds": ssd_row["seconds_importance"],
        "importance_over_D_seconds": fisher_seconds,
        "retrain_seconds": retrain_row["seconds_unlearn"],
        "retrain_epochs": retrain_row["params"].get("epochs"),
        "ssd_metrics": ssd_row["metrics"], "retrain_metrics": retrain_row["metrics"],
    }
    log(f"ssd {ssd_row['seconds_unlearn']:.2f} s (+ {ssd_row['seconds_importance']:.1f} s forget importance) "
        f"vs retrain {retrain_row['seconds_unlearn']:.1f} s")


def ptn_speed(result, task, args, scale, fisher) -> None:
    from pipelines.search import SearchConfig, parallel_ptn
    from unlearning.search import forget_target, ptn_schedule, sequential_search

    # 3. PTN: 2 parallel Tune trials vs the sequential loop, on the same importances
    forget_importance = task.importance("forget", "fisher")
    schedule = ptn_schedule(fisher, forget_importance, task.forget_fraction)
    target = forget_target(
        task.forget.kind, original_test_acc=task.original_accuracy("test") if task.forget.kind != "class" else None
    )
    started = time.perf_counter()
    sequential = sequential_search(task.model, fisher, forget_importance, schedule, task.forget_accuracy, target)
    sequential_seconds = time.perf_counter() - started
    log(f"sequential PTN: {len(sequential.path)} steps in {sequential_seconds:.1f} s")
    ptn = {"sequential_seconds": sequential_seconds, "steps_to_answer": len(sequential.path),
           "answer_step": sequential.step.index if sequential.step else None,
           "step_seconds": sequential_seconds / len(sequential.path), "forget_rows": len(task.forget_split)}
    for parallel in (2,) if scale.quick else (1, 2):
        started = time.perf_counter()
        found, trials = parallel_ptn(task, SearchConfig(parallel=parallel, chunk_size=args.chunk_size), target)
        seconds = time.perf_counter() - started
        same = found.step == sequential.step and [a for _, a in found.path] == [a for _, a in sequential.path]
        ptn[f"tune_{parallel}_seconds"] = seconds
        ptn[f"tune_{parallel}_steps_evaluated"] = len(trials)
        ptn[f"tune_{parallel}_same_answer"] = same
        log(f"Tune PTN, {parallel} parallel trial(s), chunk {args.chunk_size}: {seconds:.1f} s, "
            f"{len(trials)} steps evaluated, same answer as sequential: {same}")
    ptn["chunk_size"] = args.chunk_size
    ptn["forget"] = task.forget.spec
    ptn["target"] = target
    result["ptn_parallel"] = ptn


# ------------------------------------------------------------------ tables and plots


def pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def class_table(summary) -> str:
    lines = [
        "| method | retain acc | forget acc | forget acc (train rows) | test acc | MIA | retain drop (pts) | worst forget acc (request) | worst retain drop | importance s | unlearn s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {pct(s['retain_acc'])} | {pct(s['forget_acc'])} | {pct(s['train_forget_acc'])} | "
            f"{pct(s['test_acc'])} | {pct(s['mia'])} | {100 * s['retain_drop']:.1f} | "
            f"{pct(s['worst_forget_acc'])} ({s['worst_forget_class']}) | {100 * s['worst_retain_drop']:.1f} | "
            f"{s['seconds_importance']:.1f} | {s['seconds_unlearn']:.1f} |"
        )
    return "\n".join(lines)


def random_table(summary) -> str:
    lines = ["| method | retain acc (train) | forget acc | test acc | MIA | importance s | unlearn s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['method']} | {pct(s['retain_acc'])} | {pct(s['forget_acc'])} | {pct(s['test_acc'])} | "
                     f"{pct(s['mia'])} | {s['seconds_importance']:.1f} | {s['seconds_unlearn']:.1f} |")
    return "\n".join(lines)


def poison_table(result) -> str:
    lines = ["| seed | identified | method | ASR before → after | healed % | clean acc before → after | drop (pts) | seconds |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for q in result["requests"]:
        o = q["original"]
        for r in q["rows"]:
            m = r["metrics"]
            lines.append(
                f"| {q['seed']} | {q['identified_count']}/{q['poisoned']} | {r['method']} | "
                f"{pct(o['attack_success_rate'])} → {pct(m['attack_success_rate'])} | {pct(m['healed'])} | "
                f"{pct(o['test_acc'])} → {pct(m['test_acc'])} | {100 * m['accuracy_drop']:.2f} | "
                f"{r['seconds_importance'] + r['seconds_unlearn']:.1f} |"
            )
    lines += ["", "| identified | method | healed % mean (min) | drop pts mean (max) | seconds | seeds |",
              "|---:|---|---:|---:|---:|---:|"]
    for s in result["summary"]:
        lines.append(f"| {s['identified']:.0%} | {s['method']} | {pct(s['healed'])} ({pct(s['healed_min'])}) | "
                     f"{100 * s['accuracy_drop']:.2f} ({100 * s['accuracy_drop_max']:.2f}) | {s['seconds']:.1f} | {s['seeds']} |")
    return "\n".join(lines)


def speed_table(result) -> str:
    lines = ["| figure | value |", "|---|---:|"]
    for row in result["importance_throughput"]:
        lines.append(f"| importance, {row['variant']}: end-to-end rows/s (streaming rows/s) | "
                     f"{row['rows_per_s']:.0f} ({row.get('streaming_rows_per_s') or float('nan'):.0f}) |")
    u = result.get("unlearn_vs_retrain")
    if u:
        lines.extend(retrain_lines(u))
    p = result.get("ptn_parallel")
    if p:
        lines.extend(ptn_lines(p))
    return "\n".join(lines)


def retrain_lines(u) -> list[str]:
    lines = []
    lines.append(f"| SSD unlearning step, s ({u['forget']}) | {u['ssd_unlearn_seconds']:.2f} |")
    lines.append(f"| SSD forget-set importance, s | {u['ssd_forget_importance_seconds']:.1f} |")
    lines.append(f"| importance over D (once per model), s | {u['importance_over_D_seconds']:.1f} |")
    lines.append(f"| retrain ({u['retrain_epochs']} epochs), s | {u['retrain_seconds']:.1f} |")
    lines.append(f"| **retrain / SSD step** | **{u['retrain_seconds'] / u['ssd_unlearn_seconds']:.0f}×** |")
    lines.append(f"| **retrain / (SSD step + forget importance)** | "
                 f"**{u['retrain_seconds'] / (u['ssd_unlearn_seconds'] + u['ssd_forget_importance_seconds']):.1f}×** |")
    return lines


def ptn_lines(p) -> list[str]:
    lines = [f"| PTN request, target | {p.get('forget', '')}, forget acc ≤ {p.get('target', float('nan')):.3f} |"]
    lines.append(f"| PTN sequential loop: steps to the answer, s per step, total s | "
                 f"{p['steps_to_answer']}, {p['step_seconds']:.2f}, {p['sequential_seconds']:.1f} |")
    for k in [k for k in (1, 2) if f"tune_{k}_seconds" in p]:
        lines.append(f"| PTN on Tune, {k} trial(s): s (steps evaluated; same answer) | "
                     f"{p[f'tune_{k}_seconds']:.1f} ({p[f'tune_{k}_steps_evaluated']}; {p[f'tune_{k}_same_answer']}) |")
    lines.append(f"| **sequential / Tune with 2 trials** | **{p['sequential_seconds'] / p['tune_2_seconds']:.2f}×** |")
    if "tune_1_seconds" in p:
        lines.append(f"| **Tune 1 trial / Tune 2 trials** | **{p['tune_1_seconds'] / p['tune_2_seconds']:.2f}×** |")
    return lines


def plot(suite: str, result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if suite in ("fullclass", "subclass", "random"):
        summary = result["summary"]
        names = [s["method"] for s in summary]
        keys = ([("retain_acc", "retain acc"), ("forget_acc", "forget acc"), ("mia", "MIA")]
                if suite != "random" else [("test_acc", "test acc"), ("forget_acc", "forget acc"), ("mia", "MIA")])
        fig, ax = plt.subplots(figsize=(11, 4.5))
        width = 0.27
        for i, (key, label) in enumerate(keys):
            ax.bar([x + (i - 1) * width for x in range(len(names))], [100 * s[key] for s in summary], width, label=label)
        if suite != "random":
            ax.scatter(range(len(names)), [100 * s["worst_forget_acc"] for s in summary], marker="v", color="black",
                       zorder=3, label="worst request's forget acc")
        else:
            retrain = next((s for s in summary if s["method"] == "retrain"), None)
            if retrain:
                ax.axhline(100 * retrain["mia"], color="black", linestyle="--", label="retrain MIA (reference)")
        for i, s in enumerate(summary):
            if math.isnan(s[keys[0][0]]):
                ax.text(i, 3, "diverged\n(non-finite)", ha="center", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylabel("percent (mean over requests)")
        ax.set_ylim(0, 105)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    elif suite == "poison":
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        for name in dict.fromkeys(s["method"] for s in result["summary"]):
            rows = [s for s in result["summary"] if s["method"] == name]
            xs = [100 * s["identified"] for s in rows]
            left.plot(xs, [100 * s["healed"] for s in rows], marker="o", label=name)
            right.plot(xs, [100 * s["accuracy_drop"] for s in rows], marker="o", label=name)
        left.axhline(90, color="grey", linestyle=":", label="goal 90 %")
        left.axhline(93.72, color="black", linestyle="--", label="paper: Potion+PTN 93.72 %")
        right.axhline(2, color="grey", linestyle=":", label="limit 2 pts")
        right.axhline(1.41, color="black", linestyle="--", label="paper: 1.41 pts")
        left.set_xlabel("identified share of the poison (%)")
        right.set_xlabel("identified share of the poison (%)")
        left.set_ylabel("attack healed (%), mean over seeds")
        right.set_ylabel("clean test accuracy drop (points)")
        left.legend(fontsize=8)
        right.legend(fontsize=8)
    else:  # speed
        u, p = result.get("unlearn_vs_retrain"), result.get("ptn_parallel")
        bare = next((r for r in result["importance_throughput"] if r["baseline"]), None)
        labels, values = [], []
        for row in result["importance_throughput"]:
            if row["variant"].startswith("ray"):
                labels.append(f"importance {row['variant']}\nstreaming / bare")
                values.append(row["streaming_rows_per_s"] / bare["rows_per_s"])
                labels.append(f"importance {row['variant']}\nend-to-end / bare")
                values.append(row["rows_per_s"] / bare["rows_per_s"])
        if p:
            labels.append("PTN: sequential /\nTune 2 trials")
            values.append(p["sequential_seconds"] / p["tune_2_seconds"])
            if "tune_1_seconds" in p:
                labels.append("PTN: Tune 1 trial /\nTune 2 trials")
                values.append(p["tune_1_seconds"] / p["tune_2_seconds"])
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
        if values:
            left.bar(range(len(values)), values, color="tab:blue")
            left.axhline(1, color="black", linewidth=0.8)
            left.set_xticks(range(len(values)), labels, fontsize=7)
            left.set_ylabel("speed ratio (higher = faster)")
            for i, v in enumerate(values):
                left.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        else:  # --speed-parts left out the throughput and PTN parts
            left.axis("off")
            left.text(0.5, 0.5, "throughput and PTN parts not run (--speed-parts)", ha="center", va="center")
        if u:
            right.bar(["SSD step", "SSD + forget\nimportance", f"retrain\n({u['retrain_epochs']} epoch(s))"],
                      [u["ssd_unlearn_seconds"], u["ssd_unlearn_seconds"] + u["ssd_forget_importance_seconds"],
                       u["retrain_seconds"]], color=["tab:green", "tab:olive", "tab:red"])
            right.set_yscale("log")
            right.set_ylabel("wall seconds (log)")
        else:
            right.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ entry point


def method_param_table(triples) -> dict:
    table: dict = {}
    for method, key, value in triples:
        table.setdefault(method, {})[key] = value
    return table


def scale_from(args) -> Scale:
    scale = Scale(
        data=Path(args.data), arch=args.arch, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, augment=not args.no_augment, train_rows=args.train_rows, test_rows=args.test_rows,
        classes=args.classes, retrain_epochs=args.retrain_epochs, importance_mode=args.importance_mode,
        device=args.device, seeds=args.seeds, quick=args.quick, ptn_start_divisor=args.ptn_start_divisor,
        method_params=method_param_table(args.param),
    )
    if args.quick:  # same code paths, smaller: a class-balanced subset, fewer epochs and requests
        scale = replace(
            scale,
            train_rows=args.train_rows or 2000,
            test_rows=args.test_rows or 500,
            classes=args.classes if args.classes is not None else [3],
            retrain_epochs=args.retrain_epochs or 4,
            seeds=args.seeds or [0],
        )
    return scale


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=[*SUITES, "all"])
    parser.add_argument("--quick", action="store_true", help="the same code paths at reduced scale")
    parser.add_argument("--data", default=str(CIFAR10), help="a directory with train.parquet and test.parquet")
    parser.add_argument("--arch", default="resnet_small")
    parser.add_argument("--width", type=int, default=16, help="resnet_small / small_cnn width (ignored otherwise)")
    parser.add_argument("--epochs", type=int, default=None, help="original model's epochs (default 3; quick 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (quick 32)")
    parser.add_argument("--lr", type=float, default=None, help="default 0.2 (quick 0.05)")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--train-rows", type=int, default=None, help="use the first N training rows")
    parser.add_argument("--test-rows", type=int, default=None, help="use the first N test rows")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="classes (fine classes) to forget")
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--coarse", default=COARSE, help="subclass: coarse groups of fine classes, a/b/...")
    parser.add_argument("--retrain-epochs", type=int, default=None, help="retrain baseline epochs (default: recipe)")
    parser.add_argument("--importance-mode", default="batch", choices=["batch", "per_sample"])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="original-model seeds (poison: one model each)")
    parser.add_argument("--identified", type=float, nargs="+", default=None, help="poison: identified shares")
    parser.add_argument("--poison-rate", type=float, default=0.01)
    parser.add_argument("--random-count", type=int, default=100)
    parser.add_argument("--forget-seeds", type=int, nargs="+", default=None, help="random: forget-set seeds")
    parser.add_argument("--throughput-rows", type=int, default=None, help="0 skips the throughput part")
    parser.add_argument("--chunk-size", type=int, default=8, help="PTN steps per Tune trial (tune_configs/ptn.yaml's)")
    parser.add_argument("--speed-parts", nargs="+", default=["throughput", "retrain", "ptn"])
    parser.add_argument("--ptn-start-divisor", type=float, default=None,
                        help="ptn / potion_ptn: s_0 = |D_f| / N / this (default: SPEC.md's 25)")
    parser.add_argument("--ptn-forget", default=None, help="speed: the request the PTN timing uses (default class:K)")
    parser.add_argument("--param", type=parse_method_param, action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="a method parameter for this run, e.g. jit:lr=3e-5 (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all cores; on a loaded 2-core box 1 is faster)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    args = parser.parse_args(argv)
    for method, _, _ in args.param:
        if method not in unlearning.METHODS:
            parser.error(f"--param: unknown method {method!r}")
    # full scale: 3 epochs of 391 steps; quick: fewer rows, so smaller batches for enough steps
    defaults = {"epochs": 8, "batch_size": 32, "lr": 0.05} if args.quick else {"epochs": 3, "batch_size": 128, "lr": 0.2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run_suite(suite: str, args, command: str) -> dict:
    scale = scale_from(args)
    methods_given = args.methods
    if suite == "poison":
        if args.quick and args.data == str(CIFAR10) and args.arch == "resnet_small":
            # Quick poison runs on the built-in digits, whose model learns the backdoor in
            # seconds. Session 1's quick CIFAR-10 runs learnt none (the trigger was then written
            # before augmentation); CIFAR-10 poison runs at full scale (RESULTS.md, 44 min).
            scale = replace(scale, data=Path("digits"), arch="small_cnn", train_rows=None, test_rows=None,
                            epochs=30, batch_size=64, lr=0.05, retrain_epochs=None)
        args.methods = methods_given or POISON_METHODS
        args.identified = args.identified or ([0.2, 1.0] if args.quick else [0.1, 0.2, 0.5, 1.0])
    else:
        args.methods = methods_given or CLASS_METHODS
    args.forget_seeds = args.forget_seeds or ([0] if args.quick else [0, 1, 2])
    if args.throughput_rows is None:
        args.throughput_rows = 500 if args.quick else 6000
    started = time.perf_counter()
    load_before = machine()
    log(f"suite {suite}{' (quick)' if args.quick else ''}: {scale}")
    if suite in ("fullclass", "subclass"):
        result = class_like_suite(args, scale, "class" if suite == "fullclass" else "subclass")
        table = class_table(result["summary"])
    elif suite == "random":
        result = random_suite(args, scale)
        table = random_table(result["summary"])
    elif suite == "poison":
        result = poison_suite(args, scale)
        table = poison_table(result)
    else:
        result = speed_suite(args, scale)
        table = speed_table(result)
    seconds = time.perf_counter() - started
    name = f"{suite}{'-quick' if args.quick else ''}{args.tag}"
    result.update({
        "suite": suite, "quick": args.quick, "command": command, "scale": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(scale).items()},
        "machine_at_start": load_before, "machine_at_end": machine(), "wall_seconds": seconds, "table": table,
    })
    out = Path(args.out)
    write_json(out / f"{name}.json", result)
    plot(suite, result, out / f"{name}.png",
         f"{suite}{' --quick' if args.quick else ''}: {scale.arch} w{scale.width}, "
         f"{scale.train_rows or 'all'} training rows of {Path(scale.data).name}")
    print(f"\n## {name} ({seconds:.0f} s)\n\n{table}\n", flush=True)
    args.methods = methods_given
    return result


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads or available_cpus())
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    for suite in SUITES if args.suite == "all" else [args.suite]:
        run_suite(suite, args, command)
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
