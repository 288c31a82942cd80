"""`RayExecutor`: a request's passes over large splits on Ray, small ones in this process.

The same two passes as `unlearning.passes.LocalExecutor` (importance, outcomes), chosen per
split by a row threshold (`--ray-min-rows`; 0 = every split on Ray): below it the local
executor runs them here, at or above it importance runs on a Ray Train worker group
(`compute_importance_on_ray`) and outcomes on long-lived evaluator actors
(`evaluators.RowEvaluator`). Either way the rows are read where the pass runs; this process
holds only ids, labels and what the passes return. `runs` records what ran where.

Methods that read rows in their own training loop (retrain, finetune, amnesiac, bad_teacher,
JiT: `Method.own_loop`) have no pass to hand over; when the request's splits are on Ray the
whole method runs as one Ray task (`run_method`), which reads its rows there through the
library's streaming reader, on a GPU where the cluster has one.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from pipelines.distributed.driver import (
    check_first_row,
    compute_importance_on_ray,
    cpu_model,
    cuda_on_gpu_nodes,
)
from pipelines.distributed.evaluators import RowEvaluator
from pipelines.distributed.plan import worker_resources
from pipelines.distributed.rows import RaySplit
from pipelines.ray_session import DEFAULT_RAY_MIN_ROWS, ensure_ray, resolve_workers
from unlearning.data import Split
from unlearning.data.rows import is_lazy
from unlearning.errors import UserError
from unlearning.passes import LocalExecutor, Outcomes


class RayExecutor:
    """Passes over splits of at least `min_rows` rows on Ray, the rest in `local`."""

    def __init__(self, local: LocalExecutor, workers: int | None = None, min_rows: int = DEFAULT_RAY_MIN_ROWS,
                 progress: bool = True):
        self.local, self.workers, self.min_rows, self.progress = local, workers, min_rows, progress
        self.runs: list[dict] = []
        self._pool: list | None = None
        self._share: float | None = None  # the pool's GPU share per actor (a search's), or None
        # (split, normalize) -> (the split, held so its id is not reused; whether evaluators keep its rows)
        self._seen: dict[tuple, tuple[Split, bool]] = {}

    @property
    def precision(self) -> str:
        """The outcome passes' inference precision, on Ray as here."""
        return self.local.precision

    def on_ray(self, split: Split) -> bool:
        return is_lazy(split.inputs) and len(split) >= max(self.min_rows, 1)

    def importance(self, model, split: Split, kind: str, mode: str, batch_size: int, normalize,
                   shuffle: bool = False, seed: int = 0):
        if not self.on_ray(split) or (shuffle and mode == "batch"):
            return self.local.importance(model, split, kind, mode, batch_size, normalize, shuffle, seed)
        self.close()  # the worker group needs the evaluators' resources
        started = time.monotonic()
        sums = compute_importance_on_ray(model, split, self.workers, kind, mode, batch_size,
                                         progress=self.progress, label=f"importance of {len(split)} rows")
        self._record("importance", split, sums.meta["workers"], started, kind=kind, mode=mode)
        return sums

    def method_on_ray(self, task) -> bool:
        """Whether a method with its own loop runs on Ray: when either split it may read is."""
        return self.on_ray(task.retain_split) or self.on_ray(task.forget_split)

    def run_method(self, task, method: str, params: dict):
        """Run a registered method as one Ray task where the data is read: a GPU where the
        cluster has one (and CUDA works there), else the CPUs one importance worker would get."""
        import ray

        self.close()  # the task needs the evaluators' resources
        cluster = ensure_ray()
        use_gpu, resources, threads = worker_resources(cluster, 1, cuda_on_gpu_nodes(cluster))
        started = time.monotonic()
        shipped = dataclasses.replace(task, model=cpu_model(task.model), progress=None,
                                      executor=LocalExecutor("cpu", precision=self.precision))
        remote = ray.remote(_run_method_here).options(
            num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0), max_retries=0)
        try:
            output, device = ray.get(remote.remote(shipped, method, params, threads, use_gpu))
        except ray.exceptions.RayTaskError as error:  # a refusal stays one line, as in-process
            if isinstance(error.cause, UserError):
                raise error.cause from None
            raise
        self.runs.append({"pass": "method", "method": method, "device": device, "threads": threads,
                          "seconds": round(time.monotonic() - started, 3)})
        output.model = output.model.to(task.device)
        return output

    def outcomes(self, models, split: Split, normalize) -> list[Outcomes]:
        if not self.on_ray(split):
            return self.local.outcomes(models, split, normalize)
        import ray

        started = time.monotonic()
        pool = self._evaluators()
        key = (id(split.inputs), id(split), repr(normalize))
        refs = [ray.put(cpu_model(model)) for model in models]
        name = f"{key[0]}-{key[1]}-{abs(hash(key[2]))}"
        if self._seen.get(key, (None, False))[1]:
            results = ray.get([actor.again.remote(name, refs) for actor in pool])
        else:
            rows = RaySplit.of(split, normalize, check_first_row(split, models[0], "the split"))
            shards = rows.streams(len(pool))
            keep = key in self._seen  # a second pass over a split: keep its rows for the next ones
            answers = ray.get([actor.stream.remote(name, shard, rows, refs, keep) for actor, shard in zip(pool, shards)])
            results = [answer for answer, _ in answers]
            self._seen[key] = (split, keep and all(kept for _, kept in answers))
        self._record("outcomes", split, len(pool), started, models=len(models))
        return _in_split_order(results, len(split), len(models))

    def rows_right(self, model, split: Split, normalize, allowed: int | None = None) -> tuple[int, int]:
        """(`model`'s rows right on `split`, rows read) (LocalExecutor.rows_right); a split read
        on Ray is passed over whole (its rows stream to every evaluator at once): no early stop."""
        if not self.on_ray(split):
            return self.local.rows_right(model, split, normalize, allowed)
        [outcomes] = self.outcomes([model], split, normalize)
        return int((outcomes.pred == split.labels).sum()), len(split)

    def evaluators(self, count: int | None = None, gpu_share: float | None = None) -> list:
        """The evaluator actors: `count` of them (default: the executor's worker count).

        With `gpu_share` (a search's trials) there are exactly `count`, each with that share of
        a GPU where CUDA works on the cluster's GPUs (0: none), else a fraction of the CPUs.
        """
        same_share = (gpu_share or 0) == (self._share or 0)  # on CPUs a search's pool is the request's
        if self._pool is not None and (count is not None and len(self._pool) != count or not same_share):
            self.close()
        if self._pool is None:
            self._pool = self._start(count, gpu_share)
            self._share = gpu_share
        return self._pool

    def _evaluators(self) -> list:
        return self._pool if self._pool is not None else self.evaluators()

    def _start(self, count: int | None, gpu_share: float | None) -> list:
        import ray

        cluster = ensure_ray()
        cuda = cuda_on_gpu_nodes(cluster)
        if gpu_share is None:
            count = resolve_workers(count or self.workers, cluster)
            _, resources, threads = worker_resources(cluster, count, cuda)
            options = {"num_cpus": resources.get("CPU", 1), "num_gpus": resources.get("GPU", 0)}
        elif cuda and gpu_share > 0:
            options, threads = {"num_cpus": 0, "num_gpus": gpu_share}, 1
        else:
            _, resources, threads = worker_resources({"CPU": cluster.get("CPU", 1)}, count, False)
            options = {"num_cpus": resources["CPU"]}
        actor = ray.remote(RowEvaluator).options(**options)
        pool = [actor.remote(threads, self.precision) for _ in range(count)]
        ray.get([a.ready.remote() for a in pool])
        self._seen.clear()
        return pool

    def close(self) -> None:
        """Stop the evaluators (and forget what they kept); the next outcome pass starts new ones."""
        if self._pool is not None:
            import ray

            for actor in self._pool:
                ray.kill(actor)
            self._pool, self._share = None, None
        self._seen.clear()
        self.local.close()

    def _record(self, what: str, split: Split, workers: int, started: float, **extra) -> None:
        self.runs.append({"pass": what, "rows": len(split), "workers": workers,
                          "seconds": round(time.monotonic() - started, 3), **extra})


def _run_method_here(task, method: str, params: dict, threads: int, use_gpu: bool):
    """In the Ray task: the method with its rows read here, on this worker's device."""
    import unlearning

    torch.set_num_threads(threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    executor = LocalExecutor(device, precision=task.executor.precision)
    task.device, task.model, task.executor = device, task.model.to(device), executor
    output = unlearning.run_method(method, task, **params)
    output.model = cpu_model(output.model)
    return output, device


def _in_split_order(results, n_rows: int, n_models: int) -> list[Outcomes]:
    index = np.concatenate([r[0] for r in results])
    if len(index) != n_rows or len(np.unique(index)) != n_rows:
        raise RuntimeError(f"evaluators returned {len(index)} rows ({len(np.unique(index))} distinct) of {n_rows}")
    order = torch.from_numpy(np.argsort(index, kind="stable"))
    return [Outcomes.concat([r[1][m] for r in results]).select(order) for m in range(n_models)]
