"""Amnesis' pure-PyTorch core: importance, dampening, methods, metrics, data, checkpoints.

No Ray, no MLflow here: `pipelines/` decides where this runs.
"""

from unlearning.checkpoint import (
    load_importance,
    load_model,
    model_fingerprint,
    model_meta,
    new_model,
    save_importance,
    save_model,
)
from unlearning.dampening import adaptive_alpha, importance_ratios, percentile, ssd
from unlearning.data import Dataset, ForgetSet, Split, load_dataset, parse_forget
from unlearning.errors import UserError
from unlearning.importance import ImportanceSums, compute_importance, compute_importance_sums
from unlearning.methods import METHODS, MethodOutput, UnlearningTask, get_method, run_method
from unlearning.search import PTNConfig, PTNWalk, Step, ptn_schedule, sequential_search

__all__ = [
    "METHODS",
    "Dataset",
    "ForgetSet",
    "ImportanceSums",
    "PTNConfig",
    "MethodOutput",
    "Split",
    "Step",
    "UnlearningTask",
    "UserError",
    "adaptive_alpha",
    "compute_importance",
    "compute_importance_sums",
    "get_method",
    "importance_ratios",
    "load_dataset",
    "load_importance",
    "load_model",
    "model_fingerprint",
    "model_meta",
    "new_model",
    "parse_forget",
    "percentile",
    "PTNWalk",
    "ptn_schedule",
    "run_method",
    "save_importance",
    "save_model",
    "sequential_search",
    "ssd",
]
