"""A request's passes over data at cluster scale: rows are read where the work runs.

The maths is `unlearning` (`compute_importance_sums`, `predict_outcomes`); this package only
decides where it runs:

1. `rows`: a split as a Ray Dataset, through Ray Data's own readers (`read_parquet` with an
   id filter, `read_binary_files`, `from_numpy`), and the one decode step (the library's).
2. `plan`: cut the rows into chunks of whole, fixed batches; chunk k goes to worker k % N.
3. `data_stage`: each importance worker's own streamed Ray Dataset, decoded in actors.
4. `worker`: each Ray Train worker loads the model, regroups its blocks into its batches,
   computes partial (sum, count) in float64, and one `all_reduce` adds them across workers.
5. `driver`: builds the datasets and the `TorchTrainer`, runs it, collects rank 0's total
   (`compute_importance_on_ray`, `build_importance_store`).
6. `evaluators`: long-lived actors for outcome passes (accuracies, MIA, attack success).
7. `executor.RayExecutor`: a request's executor; large splits on Ray, small ones in-process.
"""

from pipelines.distributed.driver import build_importance_store, compute_importance_on_ray
from pipelines.distributed.executor import RayExecutor

__all__ = ["RayExecutor", "build_importance_store", "compute_importance_on_ray"]
