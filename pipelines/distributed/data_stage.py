"""Step 2: each worker's rows as a lazy Ray Dataset — read, decode, normalise, streamed.

Rows are read and decoded by `unlearning.data.sources` (the one reader); this stage only
decides which rows each actor reads and in which blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.distributed.plan import DATA_ACTORS_PER_WORKER, DATA_TASK_CPUS, ChunkPlan
from unlearning.data import SplitRows, decode_rows, normalize_batch
from unlearning.errors import UserError


def read_chunks(chunk_ids: dict, rows: SplitRows, plan: ChunkPlan, rank: int):
    """This worker's chunk numbers -> raw rows, in blocks of whole batches."""
    step = plan.block_rows()
    for local in chunk_ids["id"]:
        chunk = int(local) * plan.workers + rank
        chunk_start = chunk * plan.chunk_rows
        chunk_stop = min(chunk_start + plan.chunk_rows, plan.num_rows)
        for start in range(chunk_start, chunk_stop, step):
            stop = min(start + step, chunk_stop)
            row_index = np.arange(start, stop, dtype=np.int64)
            yield row_index, rows.read(start, stop)


def decode_block(row_index: np.ndarray, raw: dict, plan: ChunkPlan, normalize, num_classes: int, where: str):
    """Decode a block to [0, 1], check its labels, apply the checkpoint's mean/std."""
    _, inputs, labels = decode_rows(raw, where)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        low, high = int(labels.min()), int(labels.max())
        raise UserError(f"{where}: labels must be in 0..{num_classes - 1}, found {low}..{high}")
    return {
        "row_index": row_index,
        "batch_index": row_index // plan.batch_size,
        "label": labels.numpy(),
        "inputs": normalize_batch(inputs, normalize).numpy(),
    }


class ReadDecodeNormalise:
    """The one Ray Data stage, in a long-lived actor: read a chunk's rows, decode, normalise.

    An actor, not tasks: on a small machine Ray keeps few idle task processes, so each task
    started a new process that imported torch again (seconds of CPU taken from the workers).
    One fused stage, not two: a second costs an object-store hop per block. See
    docs/implementation-notes.md, "Distributed importance".
    """

    def __init__(self, rows: SplitRows, plan: ChunkPlan, rank: int, normalize, num_classes: int, where: str):
        # One torch thread: this actor has a fraction of a CPU beside the workers, and idle
        # OpenMP threads would spin on the cores they need.
        torch.set_num_threads(1)
        self.rows, self.plan, self.rank = rows, plan, rank
        self.normalize, self.num_classes, self.where = normalize, num_classes, where

    def __call__(self, chunk_ids: dict):
        for row_index, raw in read_chunks(chunk_ids, self.rows, self.plan, self.rank):
            yield decode_block(row_index, raw, self.plan, self.normalize, self.num_classes, self.where)


def rank_dataset(rank: int, rows: SplitRows, plan: ChunkPlan, normalize, num_classes: int, where: str):
    """Worker `rank`'s rows as a lazy, streamed Ray Dataset (read -> decode -> normalise)."""
    import ray

    # from_items, not range: a range's read tasks ask for a whole CPU and starve beside the workers
    chunk_numbers = [{"id": local} for local in range(plan.chunks_of(rank))]
    return ray.data.from_items(chunk_numbers, override_num_blocks=len(chunk_numbers)).map_batches(
        ReadDecodeNormalise,
        batch_size=1,
        num_cpus=DATA_TASK_CPUS,
        compute=ray.data.ActorPoolStrategy(size=DATA_ACTORS_PER_WORKER),
        fn_constructor_kwargs={
            "rows": rows, "plan": plan, "rank": rank, "normalize": normalize,
            "num_classes": num_classes, "where": where,
        },
    )
