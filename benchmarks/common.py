"""Shared pieces of the benchmark suites: the scale, data subsets, cached original models,
machine info and logging.

Nothing here computes unlearning maths: training, importance, methods and metrics all come
from `unlearning/` (docs/methods.md). This module only decides scale, caching and bookkeeping.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import unlearning
from unlearning.checkpoint import model_meta
from unlearning.data import fingerprint_bytes
from unlearning.evaluation import evaluate_model
from unlearning.models import arch_label
from unlearning.training import TrainConfig, train

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RESULTS = HERE / "results"
# The shared data lives next to the repository: ../shared/data/cifar10 (`--data` overrides it).
CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


@dataclass
class Scale:
    """Everything a suite's size depends on; `--quick` and the GPU-scale command change it."""

    data: Path = CIFAR10
    arch: str = "resnet_small"
    width: int | None = 16  # resnet_small / small_cnn only
    epochs: int = 3  # the original model's (and retrain's) recipe
    batch_size: int = 128
    lr: float = 0.2
    augment: bool = True
    label_smoothing: float = 0.0
    precision: str = "fp32"  # "bf16": autocast while training (2-3x faster on AMX CPUs and GPUs)
    channels_last: bool = False
    train_rows: int | None = None  # None = the whole training split
    test_rows: int | None = None
    classes: list[int] | None = None  # fullclass: which classes to forget (None = all)
    retrain_epochs: int | None = None  # None = the original recipe's epochs
    importance_mode: str = "batch"
    importance_batch: int = 64
    device: str = "cpu"
    inference_precision: str = "fp32"  # the requests' search passes; reported metrics are fp32 always
    seeds: list[int] | None = None
    quick: bool = False
    ptn_start_divisor: float | None = None  # None = unlearning.search.PTNConfig's default
    method_params: dict | None = None  # {method: {key: value}} from --param, over the defaults
    references: int = 0  # reference models of the calibrated membership test (RMIA); 0 = not run

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, augment=self.augment, seed=seed,
            label_smoothing=self.label_smoothing, precision=self.precision, channels_last=self.channels_last,
        )

    def arch_args(self) -> dict:
        return {"width": self.width} if self.width is not None and self.arch in ("resnet_small", "small_cnn") else {}


def data_dir(scale: Scale) -> Path:
    """The data directory at this scale: the source, or a cached subset of its first rows
    (CIFAR-10's rows are interleaved by class, so the first rows are class-balanced)."""
    if scale.train_rows is None and scale.test_rows is None:
        return scale.data
    import pyarrow.parquet as pq

    name = f"{scale.data.name}-train{scale.train_rows or 'all'}-test{scale.test_rows or 'all'}"
    target = CACHE / "data" / name
    if not (target / "test.parquet").exists():
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        staging.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", scale.train_rows), ("test", scale.test_rows)):
            table = pq.read_table(scale.data / f"{split}.parquet")
            if rows is not None:
                table = table.slice(0, rows)
            pq.write_table(table, staging / f"{split}.parquet", row_group_size=1000)
        try:
            staging.rename(target)
        except OSError:  # another process made it first
            pass
    return target


def load(scale: Scale, modifiers: str = "") -> tuple[unlearning.Dataset, str]:
    spec = str(data_dir(scale)) + modifiers
    return unlearning.load_dataset(spec), spec


def original_model(scale: Scale, dataset: unlearning.Dataset, seed: int, log=print) -> tuple[torch.nn.Module, dict]:
    """The original model, trained with `scale.recipe(seed)` on `dataset.train`, cached by
    (data fingerprint, architecture, recipe, seed) under benchmarks/cache/models/."""
    recipe = scale.recipe(seed)
    normalize = dataset.normalization()
    key = fingerprint_bytes(
        json.dumps([dataset.fingerprint, scale.arch, scale.arch_args(), recipe.to_dict()], sort_keys=True).encode()
    )
    path = CACHE / "models" / f"{dataset.name}-{arch_label(scale.arch)}-seed{seed}-{key}"
    info_path = path / "benchmark.json"
    if info_path.exists():
        model = unlearning.load_model(path)
        return model, json.loads(info_path.read_text())
    log(f"training the original {scale.arch} {scale.arch_args()} on {len(dataset.train)} rows, {recipe}")
    model = unlearning.new_model(
        scale.arch, dataset.num_classes, dataset.input_shape, normalize, seed=seed, **scale.arch_args()
    )
    started = time.perf_counter()
    # a long run (ResNet-18 to 90 %) goes on after a kill from its last finished epoch
    resume = path.with_name(path.name + ".partial.pt")
    resumed = resume.exists()  # then train_seconds counts only this process's share
    train(model, dataset.train, recipe, normalize, device=scale.device, resume=resume,
          on_step=epoch_logger(len(dataset.train), log))
    seconds = time.perf_counter() - started
    model.cpu()
    model_meta(model)["train_config"] = recipe.to_dict()
    metrics = evaluate_model(model, dataset, None, normalize)
    info = {
        "train_seconds": seconds,
        "resumed": resumed,
        "test_acc": metrics["test_acc"],
        "train_acc": metrics["train_acc"],
        "recipe": recipe.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    unlearning.save_model(model, path)
    (path / "benchmark.json").write_text(json.dumps(info, indent=1))
    log(f"trained in {seconds:.0f} s: test acc {metrics['test_acc']:.4f}, train acc {metrics['train_acc']:.4f}")
    return model, info


def epoch_logger(rows: int, log):
    """An `on_step` callback that logs the mean training loss of every finished epoch."""
    seen = {"rows": 0, "loss": 0.0, "started": time.perf_counter()}

    def on_step(n: int, loss: float) -> None:
        seen["rows"] += n
        seen["loss"] += loss * n
        if seen["rows"] >= rows:
            log(f"epoch done: mean loss {seen['loss'] / seen['rows']:.4f}, "
                f"{time.perf_counter() - seen['started']:.0f} s")
            seen.update(rows=0, loss=0.0, started=time.perf_counter())

    return on_step


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), load average {load}"
    )


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)


def reference_models(scale: Scale, model, dataset, seed: int = 0, log=print):
    """The RMIA reference models of the original (`unlearning.mia`), trained with the original's
    recipe on paired halves once, cached by (model, data, count, seed)."""
    from unlearning.mia import load_references, save_references, train_references

    fingerprint = unlearning.model_fingerprint(model)
    path = CACHE / "references" / f"{fingerprint}-{dataset.fingerprint}-k{scale.references}-seed{seed}"
    if path.exists():
        return load_references(path)
    recipe = scale.recipe(seed)
    log(f"training {scale.references} reference models on halves of {len(dataset.train)} rows, {recipe}")
    started = time.perf_counter()
    references = train_references(model, dataset, recipe, scale.references, seed, scale.device)
    seconds = time.perf_counter() - started
    save_references(references, path, {"data_fingerprint": dataset.fingerprint, "train_seconds": seconds})
    log(f"reference models in {seconds:.0f} s, RMIA a = {references.a:g}")
    return references
