"""One way to get a Ray session: connect to `RAY_ADDRESS` if it is set, else start a local one.

Every pipeline calls `ensure_ray()` first; calling it again is free. Ray's own log lines stay
out of the user's terminal (`log_to_driver=False`, `logging_level="ERROR"`) and Ray Data's
per-operator progress bars are off: pipelines draw their own progress.
"""

from __future__ import annotations

import logging
import os

# Importances of splits with fewer rows are computed in-process: Ray's start-up (~20 s on a
# 2-core machine) outweighs what 2 workers save below about this size (implementation-notes).
DEFAULT_RAY_MIN_ROWS = 10_000


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
    from ray.data import DataContext

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(
                num_cpus=num_cpus or available_cpus(),
                include_dashboard=False,
                **quiet,
            )
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return dict(ray.cluster_resources())
