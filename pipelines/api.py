"""A whole deletion request from Python, no CLI: `pipelines.forget(...)`.

    model, report = pipelines.forget(net, train=(x, y), forget=[3, 17, 42], test=(x_test, y_test),
                                     method="ptn", track=True)

The same request `unlearn forget` makes (`pipelines.request`), on what a Python user has at hand:

- `model`: an `nn.Module` (built by `unlearning.new_model`/`load_model`, or any module with
  `factory=` naming how to rebuild it), a checkpoint directory, or `models:/NAME@current`.
- `train`: a data spec or path (`digits`, a Parquet directory, ...: rows stay in their files
  and are read where the work runs; the cluster-scale form), or in-memory data: an
  `(inputs, labels[, ids])` pair of tensors or arrays, a `DataLoader`, a map-style torch
  `Dataset`, or a Ray Dataset with `label` and `image`/`features` columns (and optionally
  `id`). In-memory data are collected into this process; ids default to row numbers.
- `forget`: a forget spec (`class:3`, `random:100`, an id file) or the ids themselves; or,
  with `retain=` instead of `train=`, the forget rows as data.
- `test`: the test data, for in-memory `train` (a spec brings its own).
- everything else is a `pipelines.options.ForgetOptions` field (method, params, search,
  importance_store, track, model_name, seed, device, workers, ray_min_rows, rho, ...).

Returns `ForgetResult(model, report)`: the unlearned model and the typed `RequestReport`. With
`out=`, the run directory is written there as by the CLI; without it, nothing is written, except
for `track=True`, which writes it to a temporary directory (MLflow copies what it keeps).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

import unlearning
from pipelines.options import ForgetOptions
from pipelines.report import RequestReport
from pipelines.request import (
    check_model_fits,
    prepare_loaded,
    run_prepared,
    search_config_of,
)
from unlearning import tempdirs
from unlearning.checkpoint import attach_meta, describe_model, model_meta, output_classes
from unlearning.data import (
    Dataset,
    Split,
    fingerprint_bytes,
    forget_ids,
    open_dataset,
    parse_forget,
)
from unlearning.errors import UserError
from unlearning.outputs import check_output_path

INPUT_COLUMNS = ("image", "features", "inputs", "input", "x")  # a batch's or Ray Dataset's input column
LABEL_COLUMNS = ("label", "labels", "y", "target")


class ForgetResult(NamedTuple):
    model: nn.Module
    report: RequestReport


def forget(
    model: nn.Module | str | os.PathLike,
    train=None,
    forget=None,
    test=None,
    *,
    retain=None,
    out: str | os.PathLike | None = None,
    factory: str | None = None,
    factory_kwargs: dict | None = None,
    normalize: dict | None = None,
    data_name: str = "data",
    **options,
) -> ForgetResult:
    """One deletion request; see the module docstring for what each argument takes."""
    if out is not None:
        check_output_path(out)
    settings = _options(options, out)
    search_config = search_config_of(settings)
    settings.check()  # unknown methods and bad values fail before any loading
    model_path, version, removed = _resolve_model(model)
    dataset, forget_set, data_label = _data(train, retain, forget, test, data_name, settings.seed)
    if removed:
        gone = torch.isin(dataset.train.ids, torch.tensor(removed, dtype=torch.int64))
        dataset = dataclasses.replace(dataset, train=dataset.train.where(~gone))
    net = model if isinstance(model, nn.Module) else unlearning.load_model(model_path)
    _describe(net, dataset, factory, factory_kwargs, normalize)
    with tempdirs.scratch("api") as scratch:
        if settings.track and model_path is None:  # the lineage's original, registered from a checkpoint
            model_path = str(Path(scratch) / "original")
            unlearning.save_model(net, model_path)
        prepared = prepare_loaded(net, dataset, forget_set, settings, data_label)
        try:
            run_dir = out or (Path(scratch) / "run" if settings.track else None)
            report, unlearned = run_prepared(prepared, model_path, version, data_label,
                                             None if run_dir is None else str(run_dir), settings, search_config,
                                             len(removed))
        finally:
            prepared.task.executor.close()
    return ForgetResult(unlearned, report)


def _options(options: dict, out) -> ForgetOptions:
    known = {f.name for f in dataclasses.fields(ForgetOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"forget() got unknown options {unknown}; options are {sorted(known)}")
    options.setdefault("plots", out is not None)  # report pages only where someone will look
    options.setdefault("show_progress", False)
    return ForgetOptions(**options)


def _resolve_model(model) -> tuple[str | None, dict | None, list[int]]:
    """(checkpoint path or None, registry version or None, ids removed on the way to it)."""
    if isinstance(model, nn.Module):
        return None, None, []
    if not isinstance(model, (str, os.PathLike)):
        raise UserError(f"model must be an nn.Module, a checkpoint directory or models:/NAME@ALIAS, "
                        f"not {type(model).__name__}")
    from pipelines.lineage import resolve_with_removed

    return resolve_with_removed(str(model))


def _describe(model: nn.Module, dataset: Dataset, factory, factory_kwargs, normalize) -> None:
    """Make sure `model` carries what a request and its checkpoint need (amnesis_meta)."""
    meta = getattr(model, "amnesis_meta", None)
    if meta is not None:
        if factory is not None:
            raise UserError(f"the model already names its factory ({meta['arch']}); drop factory=")
        check_model_fits(_widen(dataset, meta), dataset, "given", "given")
        return
    shape = dataset.input_shape
    if factory is not None:
        describe_model(model, factory, factory_kwargs, shape, normalize, None)
    else:  # usable for methods that never rebuild the network; saving it needs a factory
        attach_meta(model, "", output_classes(model, shape), shape, normalize)
    check_model_fits(_widen(dataset, model_meta(model)), dataset, "given", "given")


def _widen(dataset: Dataset, meta: dict) -> dict:
    """In-memory data count classes up to their largest label; the model may know more."""
    if dataset.notes.get("in_memory") and meta["num_classes"] > dataset.num_classes:
        dataset.num_classes = meta["num_classes"]
        dataset.class_names = [str(k) for k in range(dataset.num_classes)]
    return meta


# ---------------------------------------------------------------- data in any form -> Dataset, ForgetSet


def _data(train, retain, forget, test, name: str, seed: int):
    """(Dataset, ForgetSet, a label of the data for the report)."""
    if (train is None) == (retain is None):
        raise UserError("give either train= (all training rows, with forget= naming some) "
                        "or retain= (with forget= as the rows to forget)")
    if forget is None:
        raise UserError("forget= is required: a forget spec (class:K, random:N, an id file), ids, or rows")
    if isinstance(train, (str, os.PathLike)):
        if test is not None:
            raise UserError("a data spec brings its own test split; drop test=")
        dataset = open_dataset(train)
        return dataset, _forget_set(forget, dataset, seed), str(train)
    if test is None:
        raise UserError("in-memory training data need test= data too (the metrics are measured on it)")
    if retain is not None:
        if isinstance(forget, (str, os.PathLike)) or _is_ids(forget):
            raise UserError("with retain=, forget= must be the rows to forget (data), not a spec or ids")
        kept, dropped = to_split(retain, "retain"), to_split(forget, "forget")
        if _explicit_ids(retain) != _explicit_ids(forget):
            raise UserError("give ids for both retain= and forget= rows, or for neither")
        if not _explicit_ids(forget):
            dropped.ids = dropped.ids + len(kept)
        dataset = in_memory_dataset(name, kept.concat(dropped), to_split(test, "test"))
        return dataset, forget_ids(dropped.ids, dataset, spec=f"{len(dropped)} rows given"), f"{name} (in memory)"
    dataset = in_memory_dataset(name, to_split(train, "train"), to_split(test, "test"))
    return dataset, _forget_set(forget, dataset, seed), f"{name} (in memory)"


def _forget_set(forget, dataset: Dataset, seed: int):
    if isinstance(forget, (str, os.PathLike)):
        return parse_forget(str(forget), dataset, seed=seed)
    if _is_ids(forget):
        return forget_ids(forget, dataset)
    raise UserError("forget= with train= is a forget spec or ids; to pass the forget rows as data, "
                    "use retain= instead of train=")


def _is_ids(value) -> bool:
    if isinstance(value, (Tensor, np.ndarray)):
        return value.ndim == 1
    return isinstance(value, (list, range)) and all(isinstance(v, (int, float, np.number)) for v in value)


def _explicit_ids(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 3


def in_memory_dataset(name: str, train: Split, test: Split) -> Dataset:
    """A Dataset of two in-memory splits; its fingerprint is over every id, input and label."""
    if train.inputs.shape[1:] != test.inputs.shape[1:]:
        raise UserError(f"train rows have shape {tuple(train.inputs.shape[1:])}, test rows "
                        f"{tuple(test.inputs.shape[1:])}")
    if len(torch.unique(train.ids)) != len(train.ids):
        raise UserError("the training ids have duplicates")
    parts = []
    for split in (train, test):
        parts += [split.ids.numpy().tobytes(), split.inputs.numpy().tobytes(), split.labels.numpy().tobytes()]
    num_classes = int(torch.cat([train.labels, test.labels]).max()) + 1
    return Dataset(
        name=name, train=train, test=test, num_classes=num_classes,
        input_kind="image" if train.inputs.dim() == 4 else "features",
        class_names=[str(k) for k in range(num_classes)],
        fingerprint=fingerprint_bytes(*parts), notes={"in_memory": True},
    )


def to_split(data, what: str) -> Split:
    """In-memory rows from (inputs, labels[, ids]), a DataLoader, a torch Dataset or a Ray Dataset."""
    ids = None
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and not _is_ids(data):
        inputs, labels = data[0], data[1]
        ids = data[2] if len(data) == 3 else None
    elif type(data).__module__.startswith("ray.data"):
        inputs, labels, ids = _collect_ray(data, what)
    elif isinstance(data, torch.utils.data.DataLoader):
        inputs, labels, ids = _collect(iter(data), what)
    elif isinstance(data, torch.utils.data.Dataset):
        inputs, labels, ids = _collect(iter(torch.utils.data.DataLoader(data, batch_size=256)), what)
    else:
        raise UserError(f"{what}= takes a data spec, (inputs, labels[, ids]), a DataLoader, a torch Dataset "
                        f"or a Ray Dataset, not {type(data).__name__}")
    inputs, labels = _tensor(inputs, what, "inputs"), _tensor(labels, what, "labels")
    if inputs.is_floating_point() is False or inputs.dim() < 2:
        raise UserError(f"{what} inputs must be floating point with a batch dimension, got "
                        f"{inputs.dtype} of shape {tuple(inputs.shape)}")
    if labels.is_floating_point() or labels.dim() != 1 or len(labels) != len(inputs):
        raise UserError(f"{what} labels must be {len(inputs)} integers, got {labels.dtype} of shape "
                        f"{tuple(labels.shape)}")
    if not bool(torch.isfinite(inputs).all()):
        raise UserError(f"{what} inputs have NaN or infinite values")
    if len(labels) == 0 or int(labels.min()) < 0:
        raise UserError(f"{what} needs rows with non-negative integer labels")
    if ids is None:
        ids = torch.arange(len(labels))
    ids = _tensor(ids, what, "ids")
    if ids.is_floating_point() or ids.shape != labels.shape:
        raise UserError(f"{what} ids must be {len(labels)} integers")
    return Split(ids.to(torch.int64), inputs.to(torch.float32).contiguous(), labels.to(torch.int64))


def _tensor(value, what: str, part: str) -> Tensor:
    try:
        return torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{what} {part} are not numeric: {error}") from None


def _collect_ray(data, what: str):
    """A Ray Dataset's rows in its order (Ray Data may otherwise yield blocks as they finish)."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    preserved, options.preserve_order = options.preserve_order, True
    try:
        return _collect(data.iter_batches(batch_format="numpy"), what)
    finally:
        options.preserve_order = preserved


def _collect(batches, what: str):
    """(inputs, labels, ids or None) from batches of (x, y[, ids]) or of dicts of columns."""
    inputs, labels, ids = [], [], []
    for batch in batches:
        if isinstance(batch, dict):
            x = next((batch[c] for c in INPUT_COLUMNS if c in batch), None)
            y = next((batch[c] for c in LABEL_COLUMNS if c in batch), None)
            if x is None or y is None:
                raise UserError(f"{what}: batches need an input column ({', '.join(INPUT_COLUMNS)}) and a label "
                                f"column ({', '.join(LABEL_COLUMNS)}); got {sorted(batch)}")
            batch = (x, y, batch["id"]) if "id" in batch else (x, y)
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise UserError(f"{what}: each batch must be (inputs, labels[, ids]) or a dict of columns")
        inputs.append(_tensor(batch[0], what, "inputs"))
        labels.append(_tensor(batch[1], what, "labels"))
        if len(batch) == 3:
            ids.append(_tensor(batch[2], what, "ids"))
    if not inputs:
        raise UserError(f"{what} has no rows")
    if ids and len(ids) != len(inputs):
        raise UserError(f"{what}: some batches have ids and some do not")
    return torch.cat(inputs), torch.cat(labels), torch.cat(ids) if ids else None


