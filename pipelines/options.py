"""How to process a deletion request: ForgetOptions, checked before anything is loaded.

The CLI's `forget`/`search`/`requests process` options, `pipelines.forget(**options)` and the
ledger's batches all build one ForgetOptions; `check()` turns a setting that cannot work into
one UserError line before a model or data set is opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

import unlearning
from pipelines.ray_session import DEFAULT_RAY_MIN_ROWS, check_workers
from unlearning.errors import UserError
from unlearning.training import PRECISIONS

DEFAULT_METHOD = "ptn"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str | None) -> str:
    """A torch device for in-process work (`cpu`, `cuda`, `cuda:1`); None = the default one."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return str(device)


@dataclass
class ForgetOptions:
    """How to process a request (the CLI's `forget`/`search` options)."""

    method: str = DEFAULT_METHOD
    params: dict = field(default_factory=dict)
    importance_store: str | None = None
    mode: str = "per_sample"
    batch_size: int = 64
    seed: int = 0
    device: str = field(default_factory=default_device)
    inference_precision: str = "fp32"  # outcome passes (accuracies, search steps): fp32 or bf16 autocast
    rho: float | None = None
    search: str | None = None  # a tune_configs/*.yaml file: search on Ray Tune instead
    compare_retrain: bool = False  # also retrain from scratch and report it alongside
    zrf: bool = False  # also report ZRF against a randomly initialised model of the same architecture
    plots: bool = True  # report.md and PNGs in the run directory
    batch_tag: str | None = None  # the ledger batch this request belongs to (a registry tag)
    track: bool = True  # record the request in MLflow
    model_name: str | None = None  # registered model name (default: pipelines.registration.registered_name)
    workers: int | None = None  # Ray workers for a large split's importance (None: 2, or what fits)
    ray_min_rows: int | None = DEFAULT_RAY_MIN_ROWS  # splits this large go to Ray; None: never
    show_progress: bool = True  # progress bars of importance runs on Ray
    accept_unmet: bool = False  # move @current to a version that missed its forget-accuracy target

    def check(self) -> ForgetOptions:
        """These options, or a UserError naming the first one that cannot work (before any loading)."""
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        if self.rho is not None and not (isinstance(self.rho, (int, float)) and 0 < self.rho <= 1):
            raise UserError(f"--rho must be a number in (0, 1], got {self.rho!r}")
        if self.workers is not None:
            check_workers(self.workers)
        if self.ray_min_rows is not None and self.ray_min_rows < 0:
            raise UserError(f"--ray-min-rows must be 0 or more, got {self.ray_min_rows}")
        if self.inference_precision not in PRECISIONS:
            raise UserError(f"--inference-precision must be one of {', '.join(PRECISIONS)}, "
                            f"got {self.inference_precision!r}")
        if self.mode not in ("per_sample", "batch"):
            raise UserError(f"--mode must be per_sample or batch, got {self.mode!r}")
        if self.model_name is not None:
            from pipelines.tracking import check_model_name

            check_model_name(self.model_name)
        if self.track:
            from pipelines.tracking import check_store

            check_store()
        if not self.search:
            unlearning.methods.check_params(self.method, self.params)
            self.method = unlearning.methods.canonical_name(self.method)  # reports name what ran
        return self


def parse_param(text: str) -> tuple[str, object]:
    """`KEY=VALUE` -> (key, value), the value read as JSON if it is JSON, else as a string."""
    if "=" not in text:
        raise UserError(f"a method parameter takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
