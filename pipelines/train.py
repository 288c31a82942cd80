"""Training an original model and evaluating a checkpoint: the `train` and `evaluate` API.

The maths is `unlearning.training`; this module picks the architecture and recipe, writes the
checkpoint atomically and says what it did in one line.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import unlearning
from unlearning.checkpoint import model_meta
from unlearning.errors import UserError
from unlearning.models import canonical_arch
from unlearning.outputs import OutputExists


def default_arch(dataset) -> str:
    if dataset.input_kind != "image":
        return "mlp"
    return "small_cnn" if dataset.input_shape[-1] < 16 else "resnet_small"


def train_checkpoint(
    data_spec: str, out: str, arch: str | None = None, epochs: int | None = None, lr: float | None = None,
    seed: int = 0, progress: bool = True, device: str | None = None, arch_args: dict | None = None,
    precision: str | None = None,
) -> str:
    """Train an original model (seeded) and write its checkpoint at `out`; returns a summary line."""
    import torch
    from tqdm import tqdm

    from pipelines.options import default_device
    from unlearning.evaluation import evaluate_model
    from unlearning.training import DEFAULT_RECIPES, TrainConfig, train

    dataset = unlearning.load_dataset(data_spec)
    arch = arch or default_arch(dataset)
    recipe = DEFAULT_RECIPES.get(canonical_arch(arch), TrainConfig())
    config = replace(recipe, epochs=recipe.epochs if epochs is None else epochs, seed=seed,
                     lr=recipe.lr if lr is None else lr, precision=precision or recipe.precision)
    if config.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {config.epochs}")
    if os.path.exists(out):
        raise OutputExists(out)
    normalize = dataset.normalization()
    model = unlearning.new_model(arch, dataset.num_classes, dataset.input_shape, normalize, seed=seed,
                                 **(arch_args or {}))
    started = time.perf_counter()
    total = config.epochs * len(dataset.train)
    with tqdm(total=total, desc=f"train {arch}", unit="sample", disable=not progress, leave=False) as bar:
        train(model, dataset.train, config, normalize, device=device or default_device(),
              on_step=lambda n, _: bar.update(n))
    seconds = time.perf_counter() - started
    meta = model_meta(model)
    meta["train_config"] = config.to_dict()
    meta["dataset"] = {"spec": str(data_spec), "fingerprint": dataset.fingerprint}
    with torch.no_grad():
        metrics = evaluate_model(model, dataset, None, normalize)
    fingerprint = unlearning.save_model(model.cpu(), out)
    return (
        f"trained {arch} on {dataset.name} ({len(dataset.train)} samples, {config.epochs} epochs, "
        f"{seconds:.1f} s): train acc {metrics['train_acc']:.3f}, test acc {metrics['test_acc']:.3f} "
        f"-> {out} ({fingerprint})"
    )


def import_checkpoint(
    factory: str, factory_kwargs: dict, weights: str, input_shape: list[int], out: str,
    normalize: dict | None = None, num_classes: int | None = None, data_spec: str | None = None,
) -> str:
    """A checkpoint at `out` from weights trained elsewhere; returns a summary line.

    With `data_spec`, the model must fit that data set and its test accuracy is reported.
    """
    from pipelines.request import check_model_fits
    from unlearning.checkpoint import import_model
    from unlearning.evaluation import evaluate_model

    if os.path.exists(out):
        raise OutputExists(out)
    if normalize is not None and len(normalize["mean"]) != len(normalize["std"]):
        raise UserError("--mean and --std need one value per channel each")
    model = import_model(factory, factory_kwargs, weights, input_shape, normalize, num_classes)
    meta = model_meta(model)
    accuracy = ""
    if data_spec:
        dataset = unlearning.data.open_dataset(data_spec)
        check_model_fits(meta, dataset, f"from {weights}", data_spec)
        metrics = evaluate_model(model, dataset, None, normalize)
        meta["dataset"] = {"spec": str(data_spec), "fingerprint": dataset.fingerprint}
        accuracy = f", test acc {metrics['test_acc']:.3f} on {dataset.name}"
    fingerprint = unlearning.save_model(model, out)
    return (f"imported {meta['arch']} ({meta['num_classes']} classes, input {meta['input_shape']}) from "
            f"{weights}{accuracy} -> {out} ({fingerprint})")


def evaluate_checkpoint(model_path: str, data_spec: str, forget_spec: str | None, seed: int = 0,
                        zrf: bool = False, references: str | None = None) -> dict:
    """A checkpoint's metrics on a data set (and a forget set, if given; with `references`, the
    calibrated membership test's too)."""
    from pipelines.request import random_reference
    from unlearning.evaluation import evaluate_model

    model = unlearning.load_model(model_path)
    dataset = unlearning.data.open_dataset(data_spec)  # rows streamed from their files
    forget = unlearning.parse_forget(forget_spec, dataset, seed=seed) if forget_spec else None
    reference = random_reference(model, seed) if zrf and forget else None
    normalize = model_meta(model).get("normalize")
    metrics = evaluate_model(model, dataset, forget, normalize, random_model=reference)
    if references and forget is not None:
        from pipelines.references import references_for
        from unlearning.mia import calibrated_mia

        [found] = calibrated_mia([model], references_for(references, dataset), dataset, forget, normalize, seed)
        metrics.update(found)
    return metrics


def store_summary(meta: dict, out: str) -> str:
    """One line about a freshly built importance store."""
    return (
        f"importance store {out}: {meta['kind']}/{meta['mode']} over {meta['num_samples']} rows "
        f"({meta['count']} terms) {where_it_ran(meta['workers'])} in {meta['seconds']:.1f} s"
    )


def where_it_ran(workers: int) -> str:
    return f"with {workers} Ray workers" if workers else "in this process (fewer rows than --ray-min-rows)"
