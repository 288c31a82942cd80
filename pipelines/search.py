"""Searches on Ray: the parallel PTN walk on the request's evaluators, alpha/lambda TPE on Tune.

Importances are computed once on the driver and shared through the object store. Trials only
report metrics; MLflow is written by the driver.

Parallel PTN runs on the request's long-lived evaluator actors (`pipelines.distributed`), not
on Tune, with no per-trial process start or torch import (docs/implementation-notes.md,
"Search without Tune's fixed cost"). A D_f the request's executor reads on Ray (at least
`--ray-min-rows` rows) is read once through Ray Data and streamed out in one shard per actor,
which the actor keeps decoded; the shards are then evened out to within a row (a streaming
split deals whole blocks), since every step waits for the largest. A smaller D_f is decoded
here, as the in-process walk would, and each actor is sent its shard. The
walk goes in lockstep: every actor evaluates the steps `unlearning.search.PTNWalk` asks for
(`chunk_size` consecutive forward steps, default one; one step at a time when walking back) on
its shard, and the driver adds up the rows each got right, so a step's forget accuracy is
exactly the one over the whole of D_f (or, once an actor's own shard is past every target, a
lower bound: unlearning.settling). The walk then takes its next decision from these
accuracies exactly as the in-process loop does: the same steps, the same answer.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from pipelines.distributed.driver import check_first_row, cpu_model
from pipelines.distributed.rows import RaySplit
from pipelines.ray_session import ensure_ray, fit_off_main_thread, run_storage
from unlearning.errors import UserError
from unlearning.methods import MethodOutput, UnlearningTask
from unlearning.retained import search_with_slack
from unlearning.search import (
    PTN_DEFAULTS,
    PTNConfig,
    PTNWalk,
    SearchResult,
    Step,
    path_entry,
    ptn_search,
)
from unlearning.settling import AtLeast, rows_allowed, search_ceiling

PTN_METRIC = "forget_acc"


@dataclass
class SearchConfig:
    """A search space from tune_configs/*.yaml (unknown keys are refused)."""

    search: str = "ptn"  # "ptn" or "tpe"
    importance_kind: str | None = None  # None: the request's (UnlearningTask.search_kind), as for `ptn`
    reference: str = "full"  # I^D over the full data ("full") or the retained data ("retain")
    target: float | None = None  # forget-accuracy target; None = the request kind's default
    rho: float | None = None
    parallel: int | None = None  # concurrent trials; None = one per CPU (or per GPU share)
    gpus_per_trial: float | None = None  # on GPU clusters; None = 1, a fraction shares a GPU
    # ptn: the walk's settings, defaults from unlearning.search.PTNConfig
    growth: float = PTN_DEFAULTS.growth
    max_steps: int = PTN_DEFAULTS.max_steps
    start_divisor: float = PTN_DEFAULTS.start_divisor
    walk_back: bool = PTN_DEFAULTS.walk_back
    refine: bool = PTN_DEFAULTS.refine
    chunk_size: int = PTN_DEFAULTS.chunk_size
    max_retain_drop: float = PTN_DEFAULTS.max_retain_drop  # ptn: the answer's ceiling on retained damage
    relax_after_drop: float = PTN_DEFAULTS.relax_after_drop  # ptn: a rho target's answer dearer than this takes slack
    settle_early: bool = PTN_DEFAULTS.settle_early  # ptn: a missed step's pass stops once past every target
    # tpe
    num_samples: int = 50
    alpha: list = field(default_factory=lambda: [0.1, 100.0])  # log-uniform range
    lam: list = field(default_factory=lambda: [0.1, 5.0])  # uniform range
    retain_sample: int = 2000  # retained rows scored per TPE trial
    seed: int = 0

    def walk(self) -> PTNConfig:
        return PTNConfig(
            growth=self.growth, max_steps=self.max_steps, start_divisor=self.start_divisor, chunk_size=self.chunk_size,
            walk_back=self.walk_back, refine=self.refine, max_retain_drop=self.max_retain_drop,
            relax_after_drop=self.relax_after_drop, settle_early=self.settle_early,
        )


CONFIG_DIR = Path(__file__).resolve().parent.parent / "tune_configs"


def load_search_config(path: str | Path) -> SearchConfig:
    """A YAML file, or the name of one in tune_configs/ (`ptn`, `potion`, `tpe`)."""
    import yaml

    from unlearning.methods import canonical_name

    path = Path(path)
    if not path.is_file():  # a name; an earlier one (potion_ptn) means what it became
        path = Path(canonical_name(str(path)))
    if not path.is_file() and (CONFIG_DIR / f"{path}.yaml").is_file():
        path = CONFIG_DIR / f"{path}.yaml"
    if not path.is_file():
        raise UserError(f"search config {path} does not exist (nor tune_configs/{path}.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"search config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"search config {path} must be a mapping of settings")
    known = {f.name for f in fields(SearchConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"search config {path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    config = SearchConfig(**data)
    for key in ("walk_back", "refine", "settle_early"):
        if not isinstance(getattr(config, key), bool):
            raise UserError(f"search config {path}: {key} must be true or false, got {getattr(config, key)!r}")
    if config.search not in ("ptn", "tpe"):
        raise UserError(f"search config {path}: search must be 'ptn' or 'tpe', got {config.search!r}")
    try:
        config.walk().check()
    except UserError as error:
        raise UserError(f"search config {path}: {error}") from None
    return config


def trial_resources(config: SearchConfig) -> dict:
    """One CPU per trial, plus `gpus_per_trial` (default 1; a fraction shares a GPU) where the
    cluster has GPUs; a trial whose GPU CUDA cannot see computes on CPU."""
    import ray

    if not ray.cluster_resources().get("GPU", 0):
        return {"cpu": 1}
    return {"cpu": 1, "gpu": config.gpus_per_trial if config.gpus_per_trial is not None else 1}


def default_parallel(config: SearchConfig) -> int:
    """Concurrent trials: as many as the cluster's GPUs hold, else one per CPU."""
    import ray

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if gpus:
        return max(1, int(gpus / trial_resources(config)["gpu"]))
    return max(1, int(resources.get("CPU", 1)))


def trial_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_tuner(trainable, tune_config, name: str, resources: dict):
    # Tune's console reporter (configuration box, result tables) stays out of the user's way.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune

    storage, temporary = run_storage("tune")
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            tune_config=tune_config,
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
        )
        results = fit_off_main_thread(tuner.fit)  # Ctrl-C stays a KeyboardInterrupt (ray_session)
        rows = []
        for result in results:
            if result.error:
                raise RuntimeError(f"a search trial failed: {result.error}")
            frame = result.metrics_dataframe
            if frame is not None:
                rows.extend(frame.to_dict("records"))
        return rows
    finally:
        if temporary:
            shutil.rmtree(storage, ignore_errors=True)


def parallel_ptn(
    task: UnlearningTask, config: SearchConfig, targets: list[float], progress=None
) -> tuple[float, SearchResult, Step, dict, list[dict]]:
    """The PTN walk and its refinement on the request's evaluator actors, each holding a shard
    of D_f: (the target used, the walk's result, the step to apply, details, trials for MLflow).

    Drives the same unlearning.search.ptn_search as the in-process method: the same steps, the
    same answer. Retained accuracies of the refinement's candidates are scored by the task's
    executor (on Ray when the sample has at least --ray-min-rows rows).
    """
    import ray

    kind = config.importance_kind or task.search_kind()
    full, forget = task.importance(config.reference, kind), task.importance("forget", kind)
    executor = search_executor(task)
    split = task.forget_split
    parallel = min(config.parallel or default_parallel(config), len(split))
    pool = executor.evaluators(parallel, trial_resources(config).get("gpu", 0.0))
    key, shards = f"search-{id(task)}", np.array_split(np.arange(len(split)), len(pool))
    if executor.on_ray(split):  # one Ray Data read of D_f, streamed out: each actor keeps what it gets
        rows = RaySplit.of(split, task.normalize, check_first_row(split, task.model, "the forget set"))
        counts = ray.get([actor.load_shard.remote(key, stream, rows) for actor, stream in zip(pool, rows.streams(len(pool)))])
        moves = shard_moves(counts)  # a few rows from actor to actor, through the object store
        ray.get([pool[taker].keep.remote(key, pool[giver].give.remote(key, n)) for giver, taker, n in moves])
    else:  # rows in memory, or a D_f the request reads in-process (< --ray-min-rows): decoded here, dealt out
        inputs = torch.cat([x for x, _ in split.batches(512, normalize=task.normalize)])
        ray.get([actor.keep.remote(key, [(shard, inputs[shard])]) for actor, shard in zip(pool, shards)])
    # nested references: each actor fetches them once per search, not at every call
    state = [ray.put(cpu_model(task.model)), ray.put((full, forget)), ray.put(split.labels.numpy())]
    trials = []
    walk_config = config.walk()
    # a pass past every target settles its step: each actor stops once its shard alone is past D_f's budget
    ceiling = search_ceiling(targets, walk_config.settle_early)
    allowed = None if ceiling is None else rows_allowed(ceiling, len(split))

    def evaluate(steps: list[Step]) -> list[float]:
        answers = ray.get([actor.walk.remote(key, state, steps, allowed) for actor in pool])
        accuracies = []
        for i in range(len(steps)):
            right, rows = sum(answer[i][1] for answer in answers), sum(answer[i][2] for answer in answers)
            stopped = any(answer[i][3] < answer[i][2] for answer in answers)  # an actor left rows unread
            accuracies.append(AtLeast(right / rows) if stopped else right / rows)
        for step, acc in zip(steps, accuracies):
            trials.append({"name": f"step {step.index} lambda {step.lam:g}", "metrics": {PTN_METRIC: float(acc)},
                           "params": {"alpha": step.alpha, "lambda": step.lam, "step": step.index}})
            if progress is not None:
                progress({"step": step.index, "alpha": step.alpha, "lam": step.lam, PTN_METRIC: acc})
        return accuracies

    retain_accuracy = task.retained_scorer(full, forget, walk_config.retain_sample)
    sample = task.retain_sample(walk_config.retain_sample)

    def search(goal: float):
        return ptn_search(PTNWalk(full, forget, task.forget_fraction, goal, walk_config), evaluate,
                          retain_accuracy, config.chunk_size)

    try:  # the in-process method's choice of target, and its ceiling (unlearning.retained)
        found = search_with_slack(search, targets, retain_accuracy, task.accuracy(task.model, sample), len(sample),
                                  walk_config)
    finally:
        ray.get([actor.drop.remote(key) for actor in pool])
    return (*found, trials)


def shard_moves(counts: list[int]) -> list[tuple[int, int, int]]:
    """(giver, taker, rows) moves that even out shards of `counts` rows to within one row."""
    targets = [len(part) for part in np.array_split(np.arange(sum(counts)), len(counts))]
    order = sorted(range(len(counts)), key=lambda i: counts[i] - targets[i])  # most wanting first
    surplus = {i: counts[i] - targets[i] for i in order}
    moves, takers = [], [i for i in order if surplus[i] < 0]
    for giver in reversed(order):
        while surplus[giver] > 0 and takers:
            taker = takers[0]
            count = min(surplus[giver], -surplus[taker])
            moves.append((giver, taker, count))
            surplus[giver] -= count
            surplus[taker] += count
            if surplus[taker] == 0:
                takers.pop(0)
    return moves


def search_executor(task: UnlearningTask):
    """The request's Ray executor; a request whose splits all run in-process gets one for its search."""
    from pipelines.distributed import RayExecutor

    if not isinstance(task.executor, RayExecutor):
        task.executor = RayExecutor(task.executor, min_rows=2**62)
    ensure_ray()
    return task.executor


def _tpe_trial(config, model, full, forget, forget_split, retain_split, normalize, target, precision):
    import copy

    from ray import tune

    from unlearning.dampening import dampen_
    from unlearning.metrics import accuracy

    torch.set_num_threads(1)
    dampened = copy.deepcopy(model).to(trial_device())
    dampen_(dampened, full, forget, config["alpha"], config["lam"])
    forget_acc = accuracy(dampened, forget_split, normalize, precision)
    retain_acc = accuracy(dampened, retain_split, normalize, precision)
    # best retained accuracy subject to forget accuracy <= target; infeasible trials rank below
    score = retain_acc if forget_acc <= target else -forget_acc
    tune.report({"forget_acc": forget_acc, "retain_acc": retain_acc, "score": score, "feasible": forget_acc <= target})


def tpe_search(task: UnlearningTask, config: SearchConfig, target: float) -> tuple[dict, list[dict]]:
    """alpha/lambda TPE (Optuna through Tune): best retained accuracy with forget acc <= target."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    ensure_ray()
    full = task.importance(config.reference, config.importance_kind)
    forget = task.importance("forget", config.importance_kind)
    trainable = tune.with_parameters(
        _tpe_trial, model=cpu_model(task.model), full=full, forget=forget, forget_split=task.forget_split,
        retain_split=task.retain_sample(config.retain_sample, config.seed), normalize=task.normalize, target=target,
        precision=task.inference_precision,
    )
    space = {"alpha": tune.loguniform(*config.alpha), "lam": tune.uniform(*config.lam)}
    tune_config = tune.TuneConfig(
        search_alg=OptunaSearch(space=space, metric="score", mode="max", seed=config.seed),
        num_samples=config.num_samples,
        max_concurrent_trials=config.parallel or default_parallel(config),
        reuse_actors=True,
    )
    rows = _run_tuner(trainable, tune_config, "tpe", trial_resources(config))
    best = max(rows, key=lambda r: r["score"])
    trials = [
        {"name": f"{i}", "params": {"alpha": r["config/alpha"], "lambda": r["config/lam"]},
         "metrics": {k: float(r[k]) for k in ("forget_acc", "retain_acc", "score")}}
        for i, r in enumerate(rows)
    ]
    return {"alpha": best["config/alpha"], "lam": best["config/lam"], "feasible": bool(best["feasible"])}, trials


def run_search(task: UnlearningTask, config: SearchConfig, progress=None) -> tuple[str, MethodOutput, list[dict]]:
    """Search, then apply the chosen dampening: (method name, output, trials for MLflow)."""
    from unlearning.dampening import ssd

    config = replace(config, importance_kind=config.importance_kind or task.search_kind())
    target = task.search_target(config.target, config.rho)
    if config.search == "ptn":
        targets = task.search_targets(target, config.target, task.search_rho(config.rho))
        target, result, chosen, refinement, trials = parallel_ptn(task, config, targets, progress)
        alpha, lam = chosen.alpha, chosen.lam
        details = {
            "reached": result.reached,
            "path": [path_entry(step, acc) for step, acc in result.path],
            "evaluated_steps": len(trials),
            **refinement,
        }
        extra = {"step": chosen.index}
    else:
        best, trials = tpe_search(task, config, target)
        alpha, lam = best["alpha"], best["lam"]
        details = {"reached": best["feasible"], "trials": len(trials)}
        extra = {}
    full = task.importance(config.reference, config.importance_kind)
    forget = task.importance("forget", config.importance_kind)
    model = ssd(task.model, full, forget, alpha, lam)  # PTN's cost is checked in the search; TPE scores its own
    rho = task.search_rho(config.rho)
    params = {"alpha": alpha, "lambda": lam, "kind": config.importance_kind, "target": target,
              "rho": rho, "reference": config.reference, **extra}
    return config.search, MethodOutput(model, params, details), trials
