"""Step 2: each worker's rows as a lazy Ray Dataset — Ray's reader, then decode and normalise.

Worker `rank` reads only the split rows of its chunks (`RaySplit.dataset`); one stage in
long-lived actors decodes them through the library's decoder and tags each row with its
batch, so the worker can regroup the papers' fixed batches whatever order blocks arrive in.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.distributed.plan import DATA_ACTORS_PER_WORKER, DATA_TASK_CPUS, ChunkPlan
from pipelines.distributed.rows import RaySplit


def rank_rows(rank: int, plan: ChunkPlan) -> np.ndarray:
    """Split rows of worker `rank`: its chunks k = rank, rank + N, ... in order."""
    parts = []
    for chunk in range(rank, plan.num_chunks, plan.workers):
        start = chunk * plan.chunk_rows
        parts.append(np.arange(start, min(start + plan.chunk_rows, plan.num_rows), dtype=np.int64))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


class DecodeRows:
    """The one decode stage, in a long-lived actor: raw rows -> normalised inputs and labels.

    An actor, not tasks: on a small machine Ray keeps few idle task processes, so each task
    started a new process that imported torch again (seconds of CPU taken from the workers).
    See docs/implementation-notes.md, "Distributed importance".
    """

    def __init__(self, rows: RaySplit, batch_size: int):
        # One torch thread: this actor has a fraction of a CPU beside the workers, and idle
        # OpenMP threads would spin on the cores they need.
        torch.set_num_threads(1)
        self.rows, self.batch_size = rows, batch_size

    def __call__(self, batch):
        index, inputs, labels = self.rows.decode(batch)
        return {
            "row_index": index,
            "batch_index": index // self.batch_size,
            "label": labels.numpy(),
            "inputs": inputs.contiguous().numpy(),
        }


def rank_dataset(rank: int, rows: RaySplit, plan: ChunkPlan):
    """Worker `rank`'s rows as a lazy, streamed Ray Dataset (read -> decode -> normalise)."""
    import ray

    rows = rows.subset(rank_rows(rank, plan))
    return rows.dataset().map_batches(
        DecodeRows,
        batch_size=plan.block_rows(),
        batch_format="pyarrow",
        num_cpus=DATA_TASK_CPUS,
        compute=ray.data.ActorPoolStrategy(size=DATA_ACTORS_PER_WORKER),
        fn_constructor_kwargs={"rows": rows, "batch_size": plan.batch_size},
    )
