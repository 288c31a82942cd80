"""Importance at cluster scale: Ray Data reads and decodes, a Ray Train worker group computes.

The maths is `unlearning.compute_importance_sums`; this package only decides where it runs,
in four steps, one module each:

1. `plan`: cut the rows into chunks of whole, fixed batches; chunk k goes to worker k % N.
2. `data_stage`: each worker's own streamed Ray Dataset — one fused stage reads its rows
   through `unlearning.data.sources`, decodes and normalises, in fractional-CPU actors.
3. `worker`: each Ray Train worker loads the model, regroups its blocks into its batches,
   computes partial (sum, count) in float64, and one `all_reduce` adds them across workers.
4. `driver`: builds the datasets and the `TorchTrainer`, runs it, collects rank 0's total
   (`compute_importance_on_ray`, `build_importance_store`).

`backend.RayImportanceBackend` plugs this into a deletion request for its large splits.
"""

from pipelines.distributed.backend import RayImportanceBackend
from pipelines.distributed.driver import build_importance_store, compute_importance_on_ray

__all__ = ["RayImportanceBackend", "build_importance_store", "compute_importance_on_ray"]
