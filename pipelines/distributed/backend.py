"""A request's large splits on Ray: `UnlearningTask.importance_backend` for `pipelines.request`."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from pipelines.distributed.driver import compute_importance_on_ray
from pipelines.ray_session import DEFAULT_RAY_MIN_ROWS


class RayImportanceBackend:
    """A large split's importance on Ray, others in-process.

    A request's splits (D_f, D_r, D) are subsets of the training rows; this maps a split's ids
    to training row numbers and runs `compute_importance_on_ray` over just those rows, reading
    them from the data files again (the driver's copy is not shipped). It declines (returns
    None, so the task computes in-process) below `min_rows`, for shuffled batch-mode batches,
    and for data specs with +modifiers, which are not streamed. `runs` records what ran where.
    """

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        data_spec: str,
        train_ids: torch.Tensor,
        dataset_fingerprint: str,
        workers: int | None = None,
        min_rows: int = DEFAULT_RAY_MIN_ROWS,
        progress: bool = True,
    ):
        self.model, self.data_spec = model, str(data_spec)  # a module goes through the object store
        self.fingerprint, self.workers, self.min_rows, self.progress = dataset_fingerprint, workers, min_rows, progress
        ids = np.asarray(train_ids, dtype=np.int64)
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self.runs: list[dict] = []

    def positions(self, ids: torch.Tensor) -> np.ndarray:
        """Training row numbers of `ids`, in the given order."""
        ids = np.asarray(ids, dtype=np.int64)
        found = np.searchsorted(self._sorted_ids, ids).clip(max=len(self._sorted_ids) - 1)
        if len(ids) and not np.array_equal(self._sorted_ids[found], ids):
            raise RuntimeError("a split holds ids that are not training rows")
        return self._order[found]

    def __call__(self, split, kind: str, mode: str, batch_size: int, shuffled: bool):
        if len(split) < max(self.min_rows, 1) or "+" in self.data_spec or (shuffled and mode == "batch"):
            return None
        positions = self.positions(split.ids)
        if mode == "batch" and np.any(np.diff(positions) <= 0):
            return None  # Ray workers form batches in training-row order; this split is in another
        started = time.monotonic()
        sums = compute_importance_on_ray(
            self.model, self.data_spec, self.workers, kind, mode, batch_size,
            progress=self.progress, positions=np.sort(positions), label=f"importance of {len(split)} rows",
        )
        if sums.meta["dataset_fingerprint"] != self.fingerprint:
            raise RuntimeError(f"{self.data_spec} changed while the request ran (fingerprint differs)")
        self.runs.append({
            "rows": len(split), "kind": kind, "mode": mode, "workers": sums.meta["workers"],
            "seconds": round(time.monotonic() - started, 3),
        })
        return sums
