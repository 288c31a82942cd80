"""Reference models for the calibrated membership test (`unlearning.mia`), trained on Ray.

`unlearn references` trains K networks of the original's architecture and recipe, in pairs on
complementary seeded halves of the training split, one Ray task each (one CPU, or one GPU when
the cluster has them); each task reads the data from its spec itself, so no rows pass through
the driver. The driver then picks RMIA's `a` on a seeded sample and writes the directory
atomically. `unlearn evaluate --references DIR --forget ...` reports `rmia_auc` and
`rmia_flagged` beside the loss-threshold MIA.
"""

from __future__ import annotations

import time

import unlearning
from unlearning.checkpoint import model_fingerprint, model_meta
from unlearning.errors import UserError
from unlearning.mia import (
    References,
    choose_a,
    load_references,
    member_halves,
    save_references,
    train_reference,
)
from unlearning.training import TrainConfig


def recipe_of(model, epochs: int | None) -> TrainConfig:
    recipe = model_meta(model).get("train_config")
    if not recipe:
        raise UserError("reference models follow the original's training recipe; this checkpoint has none "
                        "(train it with `unlearn train`, or import it with a recipe)")
    config = TrainConfig(**recipe)
    if epochs is not None:
        if epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {epochs}")
        config.epochs = epochs
    return config


def _train_remote(model, data_spec: str, members, config: TrainConfig, seed: int, threads: int):
    """One reference in a Ray task: its own read of the data, its own device; weights back."""
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dataset = unlearning.load_dataset(data_spec)
    normalize = model_meta(model).get("normalize")
    return train_reference(model, dataset.train, members, config, normalize, seed, device).state_dict()


def build_references(model_path: str, data_spec: str, out: str, count: int = 4, seed: int = 0,
                     epochs: int | None = None, workers: int | None = None, in_process: bool = False) -> dict:
    """Train and write a reference directory; returns its references.json contents."""
    import copy

    from unlearning.outputs import check_output_path

    check_output_path(out)
    model = unlearning.load_model(model_path)
    config = recipe_of(model, epochs)
    dataset = unlearning.load_dataset(data_spec)
    meta = model_meta(model)
    if tuple(meta["input_shape"]) != dataset.input_shape or meta["num_classes"] != dataset.num_classes:
        raise UserError(f"{model_path} takes {tuple(meta['input_shape'])} inputs in {meta['num_classes']} classes; "
                        f"{data_spec} has {dataset.input_shape} in {dataset.num_classes}")
    members = member_halves(len(dataset.train), count, seed)
    seeds = [seed * 1000 + k for k in range(count)]
    started = time.perf_counter()
    if in_process:
        normalize = meta.get("normalize")
        models = [train_reference(model, dataset.train, members[k], config, normalize, seeds[k]) for k in range(count)]
        where = "in this process"
    else:
        states, where = _train_on_ray(model, data_spec, members, config, seeds, workers)
        models = []
        for state in states:
            reference = copy.deepcopy(model)
            reference.load_state_dict(state)
            models.append(reference)
    seconds = time.perf_counter() - started
    references = References(models, dataset.train.ids.clone(), members, 0.3)
    references.a, aucs = choose_a(references, dataset, meta.get("normalize"), seed)
    info = {
        "model": str(model_path), "model_fingerprint": model_fingerprint(model), "data": str(data_spec),
        "data_fingerprint": dataset.fingerprint, "seed": seed, "recipe": config.to_dict(),
        "a_auc": {str(a): value for a, value in aucs.items()}, "train_seconds": seconds, "where": where,
    }
    save_references(references, out, info)
    return {**info, "count": count, "a": references.a}


def _train_on_ray(model, data_spec: str, members, config: TrainConfig, seeds: list[int], workers: int | None):
    import ray

    from pipelines.ray_session import ensure_ray, run_tasks

    ensure_ray()  # before ray.put, whose auto-init would join (or hang on) another cluster
    model_ref = ray.put(model)
    states, parallel = run_tasks(_train_remote, [(model_ref, data_spec, members[k], config, seed)
                                                 for k, seed in enumerate(seeds)], workers)
    return states, f"on Ray, {parallel} at a time"


def references_for(path: str, dataset) -> References:
    """A reference directory checked against the data set it is asked about."""
    import json
    from pathlib import Path

    references = load_references(path)
    info = json.loads((Path(path) / "references.json").read_text())
    if info.get("data_fingerprint") != dataset.fingerprint:
        raise UserError(f"{path} was built on {info.get('data')}, not on this data set (fingerprints differ)")
    return references
