"""HyperForget (Lara Rangel, Schoepf, Foster, Krueger, Anwar, 2024): a diffusion hypernetwork
trained on checkpoints of many training runs samples unlearned models
(docs/methods.md#hyperforget)."""

from unlearning.hyperforget.collection import (
    RunPlan,
    class_losses,
    collect_run,
    flatten,
    plan_runs,
    probe_rows,
    with_parameters,
)
from unlearning.hyperforget.diffusion import HypernetConfig
from unlearning.hyperforget.hypernet import Hypernet, load_hypernet, save_hypernet, train_hypernet

__all__ = [
    "Hypernet",
    "HypernetConfig",
    "RunPlan",
    "class_losses",
    "collect_run",
    "flatten",
    "load_hypernet",
    "plan_runs",
    "probe_rows",
    "save_hypernet",
    "train_hypernet",
    "with_parameters",
]
