"""Step 1 of distributed importance: cut a split's rows into chunks and size the workers.

Chunk k holds whole, fixed batches (batch j = rows [j*B, (j+1)*B), as `Split.batches` forms
them) and belongs to worker k % N, so batch mode gives the single-process numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DATA_TASK_CPUS = 0.25  # Ray Data read/decode actors: fractional so a 2-CPU box never deadlocks
LISTING_CPUS = 1  # Ray Data's ListFiles task asks for a whole CPU; left free for it
DATA_ACTORS_PER_WORKER = 1  # one decodes ~2,800 CIFAR rows/s, several times what a worker computes
CHUNK_TARGET_ROWS = 1024  # rows per read task (rounded to whole batches)
BLOCK_TARGET_ROWS = 256  # rows per Ray Data block (rounded to whole batches)


@dataclass(frozen=True)
class ChunkPlan:
    """Rows cut into chunks of whole batches; chunk k goes to worker k % workers."""

    num_rows: int
    batch_size: int
    chunk_rows: int
    workers: int

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_rows / self.chunk_rows)

    def chunks_of(self, rank: int) -> int:
        return len(range(rank, self.num_chunks, self.workers))

    def batch_rows(self, batch_index: int) -> int:
        return min(self.batch_size, self.num_rows - batch_index * self.batch_size)

    def block_rows(self) -> int:
        """Rows per Ray Data block: about BLOCK_TARGET_ROWS, whole batches."""
        return max(1, BLOCK_TARGET_ROWS // self.batch_size) * self.batch_size


def plan_chunks(num_rows: int, batch_size: int, workers: int) -> ChunkPlan:
    """About 4+ chunks per worker, each at most ~CHUNK_TARGET_ROWS, always whole batches."""
    num_batches = math.ceil(num_rows / batch_size)
    most = max(1, CHUNK_TARGET_ROWS // batch_size)
    batches_per_chunk = min(most, max(1, num_batches // (4 * workers)))
    chunk_rows = batches_per_chunk * batch_size
    workers = min(workers, math.ceil(num_rows / chunk_rows))
    return ChunkPlan(num_rows, batch_size, chunk_rows, workers)


def worker_resources(cluster: dict, workers: int, cuda: bool = True) -> tuple[bool, dict, int]:
    """(use_gpu, resources per worker, torch threads per worker), explicit for small boxes.

    One GPU per worker where the cluster has GPUs and `cuda` (CUDA works on its GPU nodes);
    otherwise fractional CPUs that leave room for every data actor plus one whole CPU: Ray
    Data's file listing (`read_parquet`'s ListFiles) runs as a 1-CPU task that no option lowers.
    A cluster too small for that reserves no CPU at all (Ray would otherwise wait forever).
    """
    if cluster.get("GPU", 0) > 0 and cuda:
        return True, {"CPU": 1, "GPU": 1}, 1
    data_actors = workers * DATA_ACTORS_PER_WORKER * DATA_TASK_CPUS  # each must fit beside the workers
    cpus = cluster.get("CPU", 1)
    spare = cpus - data_actors - LISTING_CPUS
    per_worker = round(spare / workers, 3) if spare >= 0.1 * workers else 0
    return False, {"CPU": per_worker}, max(1, round((cpus - data_actors) / workers))
