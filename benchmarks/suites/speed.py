"""The speed suite, in three parts (`--speed-parts`):

1. throughput: importance on the Ray pipeline (1 and 2 workers) vs a bare loop
   (`benchmarks/importance_throughput.py`);
2. retrain: SSD's unlearning step vs `retrain` on one class request;
3. ptn: the PTN search (docs/methods.md#ptn-search), the sequential in-process loop vs
   `unlearn search`'s parallel walk on Ray evaluator actors with 1 and 2 trials, on the same
   importances (answers checked equal; the actors' start and D_f's shipping included).
"""

from __future__ import annotations

import time

import torch

import unlearning
from benchmarks.common import Scale, load, log, original_model
from benchmarks.suites.blocks import (
    first_seed,
    full_importance,
    method_params,
    run_one,
    task_settings,
)
from pipelines.request import build_task


def speed_suite(args, scale: Scale) -> dict:
    result: dict = {"importance_throughput": throughput(args, scale)}
    dataset, spec = load(scale)
    model, info = original_model(scale, dataset, first_seed(scale), log)
    k = (scale.classes or [0])[0]
    forget = unlearning.parse_forget(f"class:{k}", dataset)
    fisher, fisher_seconds = full_importance(model, dataset, scale, "fisher", scale.importance_batch)

    def fisher_task(forget):
        settings = task_settings(scale, scale.importance_batch)
        return build_task(model, dataset, forget, **settings, full_importance=fisher, full_importance_kind="fisher")

    task = fisher_task(forget)
    if "retrain" in args.speed_parts:
        unlearn_vs_retrain(result, task, dataset, forget, scale, spec, fisher_seconds)
    if "ptn" in args.speed_parts:
        if args.ptn_forget:  # a request whose search takes more than one step
            task = fisher_task(unlearning.parse_forget(args.ptn_forget, dataset))
        ptn_speed(result, task, args, scale, fisher)
    return result


def throughput(args, scale: Scale) -> list[dict]:
    """Part 1: importance throughput, Ray pipeline vs a bare loop, 1 and 2 workers."""
    if args.throughput_rows <= 0 or "throughput" not in args.speed_parts:
        return []  # --throughput-rows 0: skipped
    from benchmarks.importance_throughput import measure
    from pipelines.ray_session import ensure_ray

    threads = torch.get_num_threads()
    log(f"importance throughput over {args.throughput_rows} rows")
    ensure_ray(num_cpus=2)
    rows = measure(rows=args.throughput_rows, workers=[1, 2], print_fn=log, data=scale.data)
    torch.set_num_threads(threads)
    return rows


def unlearn_vs_retrain(result, task, dataset, forget, scale, spec, fisher_seconds) -> None:
    """Part 2: SSD's unlearning wall time vs retrain's, on one full-class request."""
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
    """Part 3: PTN, the sequential loop vs the parallel walk on Ray, on the same importances."""
    from pipelines.ray_session import ensure_ray

    ensure_ray()  # the request's session: started before the timings, as a request has it
    from pipelines.search import SearchConfig

    config = SearchConfig(chunk_size=args.chunk_size, refine=False)  # the walk alone, both ways
    if args.ptn_start_divisor is not None:
        config.start_divisor = args.ptn_start_divisor
    ptn, sequential, target = sequential_ptn(task, fisher, config)
    for parallel in (2,) if scale.quick else (1, 2):
        config.parallel = parallel
        ptn.update(ray_ptn(task, config, target, sequential))
    ptn["start_divisor"] = config.start_divisor
    ptn["chunk_size"] = args.chunk_size
    ptn["forget"] = task.forget.spec
    ptn["target"] = target
    result["ptn_parallel"] = ptn


def sequential_ptn(task, fisher, config) -> tuple[dict, object, float]:
    """(figures, the search result, the target) of the sequential in-process walk."""
    from unlearning.search import PTNWalk, sequential_search
    from unlearning.settling import search_ceiling

    forget_importance = task.importance("forget", "fisher")
    target = task.search_target()  # the request kind's (docs/methods.md#forget-targets)
    started = time.perf_counter()
    walk = PTNWalk(fisher, forget_importance, task.forget_fraction, target, config.walk())
    ceiling = search_ceiling([target], config.settle_early)  # as the request's walk: a missed step's pass may stop
    found = sequential_search(task.model, fisher, forget_importance, walk,
                              lambda model: task.forget_accuracy(model, ceiling))
    seconds = time.perf_counter() - started
    log(f"sequential PTN: {len(found.path)} steps in {seconds:.1f} s")
    figures = {"sequential_seconds": seconds, "steps_to_answer": len(found.path),
               "answer_step": found.step.index if found.step else None,
               "step_seconds": seconds / len(found.path), "forget_rows": len(task.forget_split)}
    return figures, found, target


def ray_ptn(task, config, target: float, sequential) -> dict:
    """The walk on `config.parallel` Ray evaluator actors (started inside the timing); checked
    against the sequential answer."""
    from pipelines.search import parallel_ptn

    parallel, chunk_size = config.parallel, config.chunk_size
    started = time.perf_counter()
    _, found, _, _, trials = parallel_ptn(task, config, [target])  # no slack: the walk alone
    seconds = time.perf_counter() - started
    task.executor.close()  # the next timing starts its actors afresh
    # the same steps and verdicts (a pass that stopped early stops at another row on each executor)
    same = found.step == sequential.step and [(s.index, a <= target) for s, a in found.path] == [
        (s.index, a <= target) for s, a in sequential.path]
    log(f"PTN on Ray, {parallel} parallel trial(s), chunk {chunk_size}: {seconds:.1f} s, "
        f"{len(trials)} steps evaluated, same answer as sequential: {same}")
    return {f"ray_{parallel}_seconds": seconds, f"ray_{parallel}_steps_evaluated": len(trials),
            f"ray_{parallel}_same_answer": same}
