"""One way to get a Ray session: connect to `RAY_ADDRESS` if it is set, else start a local one.

Every pipeline calls `ensure_ray()` first; calling it again is free. Without `RAY_ADDRESS` a
new local cluster is started (`address="local"`, node address 127.0.0.1, no dashboard), so a
command never joins another cluster on the machine by accident, nor trips over a stale
`ray_current_cluster` file; with it, the command joins that cluster without passing
resources. Ray's own log lines stay out of the user's terminal (`logging_level="ERROR"`) and
Ray Data's per-operator progress bars are off: pipelines draw their own progress. On a cluster
(`RAY_ADDRESS` set, as it is for every `ray job submit` driver) what workers print or log is
forwarded to the driver's stderr (`log_to_driver`), so `ray job logs` shows it; a local run
keeps it in Ray's log files (Ray Train's workers log every start-up step at INFO).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Importances of splits with fewer rows are computed in-process: Ray's start-up (~20 s on a
# 2-core machine) outweighs what 2 workers save below about this size (implementation-notes).
DEFAULT_RAY_MIN_ROWS = 10_000
DEFAULT_WORKERS = 2  # when the user names no worker count (capped at what the cluster holds)
DATA_BLOCK_BYTES = 16 << 20  # Ray Data's largest block, and its Parquet read tasks' bytes
# Ray's knob for the bytes of row groups one Parquet read task gets (its default: 128 MiB). Read
# by `read_parquet` in the process that calls it, so `data_settings` sets it there.
PARQUET_TASK_BYTES_ENV = "RAY_DATA_PARQUET_BIN_PACKING_BYTES"
# pyarrow's allocator, mimalloc, returns a freed page to the OS only after a delay, checked when
# the freeing thread next allocates: a worker that had run Parquet read tasks (pyarrow reads on
# ~160 threads) kept up to ~90 MiB that way. 0 returns pages at once; a local cluster's workers
# inherit it from the driver (set it in a cluster's own environment to the same end).
ARROW_FREED_PAGES_ENV = "MIMALLOC_PURGE_DELAY"
# Ray starts its workers at niceness 15 (its `worker_niceness`), below the driver. Here the
# workers do a request's work (evaluators, the parallel PTN walk, importance workers): at 15
# they got a small share of a CPU anything else used, and lost to the same walk run in the
# driver (docs/implementation-notes.md, "Search without Tune's fixed cost"). A local cluster's
# workers run at 0 (a user's own value wins; set it in a cluster's own environment likewise).
WORKER_NICENESS_ENV = "RAY_worker_niceness"
STORAGE_ENV = "AMNESIS_RAY_STORAGE"  # Ray Train/Tune storage: shared on multi-node clusters


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 quota if any."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            count = min(count, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def ensure_ray(num_cpus: int | None = None) -> dict:
    """Initialise Ray once (cluster at `RAY_ADDRESS`, or local); return the cluster's resources."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        quiet = {"log_to_driver": bool(address), "logging_level": logging.ERROR, "configure_logging": True}
        if address:
            ray.init(address=address, **quiet)
        else:
            os.environ.setdefault(ARROW_FREED_PAGES_ENV, "0")  # a user's own value wins
            os.environ.setdefault(WORKER_NICENESS_ENV, "0")
            ray.init(
                address="local",
                num_cpus=num_cpus or available_cpus(),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                **quiet,
            )
    data_settings()
    return dict(ray.cluster_resources())


def fit_off_main_thread(fit: Callable[[], T]) -> T:
    """`fit()` (a TorchTrainer's or a Tuner's) in a helper thread while the main thread waits,
    so that Ctrl-C stays a KeyboardInterrupt in the main thread.

    Called from the main thread, Ray Train's `fit` replaces the SIGINT handler with a graceful
    abort that waits for its controller and then ends the process with status 1 and no message
    (the handler stays after `fit`); Ray Tune's first waits to save the experiment's state. From
    another thread they install none. After Ctrl-C the run goes on until the Ray session ends,
    which the CLI ends at once (`stop_ray`).
    """
    if threading.current_thread() is not threading.main_thread():
        return fit()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as error:  # raised again in the waiting thread
            outcome["error"] = error

    helper = threading.Thread(target=run, name="ray-fit", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def stop_ray() -> None:
    """End this process's Ray session now, if it has one (after Ctrl-C: not at interpreter exit).

    A local cluster the process started stops with all its processes; on a cluster it joined,
    the tasks and actors of this driver end. A second Ctrl-C meanwhile ends the process at once
    (a local cluster's processes die with it) rather than interrupting the shutdown.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    if threading.current_thread() is not threading.main_thread():
        ray.shutdown()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)


def data_settings() -> None:
    """Ray Data in this process: blocks, and Parquet read tasks, of about DATA_BLOCK_BYTES.

    Not Ray's 128 MiB for either: pyarrow decodes a read task's row groups ahead of what the
    task has handed on, so a task given ~12 row groups held most of them at once. A read task
    now gets one row group (or a few small ones), and a reader, a decoder or an evaluator holds
    a few blocks at a time, whatever the data set's size (benchmarks/RESULTS.md). A Dataset
    takes these when it is built, so whatever builds one calls this first (free to repeat).
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    context.target_max_block_size = DATA_BLOCK_BYTES
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    os.environ.setdefault(PARQUET_TASK_BYTES_ENV, str(DATA_BLOCK_BYTES))  # a user's own value wins


def resolve_workers(requested: int | None, cluster: dict) -> int:
    """The worker count to run: `requested`, or DEFAULT_WORKERS capped at what fits.

    One worker per GPU on a cluster with GPUs, at most one per CPU otherwise. A count the
    cluster can never hold is refused in one line (Ray would wait for it forever).
    """
    from unlearning.errors import UserError

    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 0))
    most, unit = (gpus, "GPU") if gpus else (max(1, cpus), "CPU")
    if requested is None:
        return min(DEFAULT_WORKERS, most)
    if requested < 1:
        raise UserError(f"--workers must be at least 1, got {requested}")
    if requested > most:
        raise UserError(
            f"--workers {requested}: the Ray cluster has {most} {unit}{'s' if most > 1 else ''}, "
            f"so at most {most} workers can run"
        )
    return requested


def check_workers(requested: int | None) -> None:
    """Refuse a worker count the cluster can never hold before Ray starts, when the cluster is
    the local one a command starts itself (no RAY_ADDRESS): its CPUs and GPUs are this machine's."""
    if requested is None or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    resolve_workers(requested, {"CPU": available_cpus(), "GPU": torch.cuda.device_count()})


def run_storage(what: str) -> tuple[str, bool]:
    """(storage path for a Ray Train or Tune run, whether it is a temporary directory to delete).

    `AMNESIS_RAY_STORAGE` (or `--storage`) names a directory every node can reach, a shared
    file system or an object-store URI such as s3://bucket/amnesis, as Ray requires on
    multi-node clusters; without it, a scratch directory (`amnesis-<pid>-<what>-...`,
    unlearning.tempdirs) does for a one-node cluster.
    """
    from unlearning.tempdirs import new_scratch

    configured = os.environ.get(STORAGE_ENV)
    if configured:
        return configured, False
    return str(new_scratch(what)), True


def set_storage(path: str | None) -> None:
    """`--storage PATH`: this process's Ray runs keep their state under PATH."""
    if path:
        os.environ[STORAGE_ENV] = path


def run_tasks(fn: Callable, calls: list[tuple], workers: int | None) -> tuple[list, int]:
    """`fn(*call, threads)` for each call as Ray tasks, at most `workers` (resolved against the
    cluster: one GPU each where there are GPUs, else a share of the CPUs) at a time; returns
    (the results in call order, how many ran at once). An ObjectRef in a call is passed as its
    value. No retries: a failed task raises here."""
    import ray

    cluster = ensure_ray()
    parallel = resolve_workers(workers, cluster)
    gpus = int(cluster.get("GPU", 0))
    threads = 1 if gpus else max(1, int(cluster.get("CPU", 1)) // parallel)
    task = ray.remote(fn).options(num_cpus=threads, num_gpus=1 if gpus else 0, max_retries=0)
    pending: dict = {}
    results: list = [None] * len(calls)
    for index, call in enumerate(calls):
        if len(pending) >= parallel:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
        pending[task.remote(*call, threads)] = index
    for ref, index in pending.items():
        results[index] = ray.get(ref)
    return results, parallel
