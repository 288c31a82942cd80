"""The loaders: a data spec -> a `Dataset`, every row read through `sources`.

`load_dataset` decodes every row into memory; `open_dataset` leaves inputs in their files
(`unlearning.data.rows.RowInputs`, read by the block), which is what a deletion request uses.

`load_dataset("digits")`, a Parquet file, a directory with train/test Parquet, or an image
folder, optionally followed by benchmark-task modifiers (`+poison:...`, `+coarse:...`,
see `unlearning.data.tasks`).
"""

from __future__ import annotations

import os

import torch

from unlearning.data.containers import Dataset, Split
from unlearning.data.rows import RowInputs
from unlearning.data.sources import (
    SPLIT_SEED,
    TEST_FRACTION,
    ParquetTable,
    RowSource,
    SplitRows,
    decode_rows,
    open_source,
)
from unlearning.data.tasks import apply_modifier
from unlearning.errors import UserError

MAX_CLASSES = 100_000  # a label beyond this is an id or a mistake, not a class (ImageNet-21k: 21,841)


def load_dataset(spec: str | os.PathLike) -> Dataset:
    """`digits`, a Parquet file, a directory with train/test Parquet, or an image folder,
    optionally followed by `+poison:...` or `+coarse:...` modifiers."""
    base, *modifiers = str(spec).split("+")
    dataset = load_source(open_source(base))
    for modifier in modifiers:
        dataset = apply_modifier(dataset, modifier, str(spec))
    return dataset


def load_split(rows: SplitRows, where: str) -> Split:
    """Every row of a split, decoded into memory."""
    return Split(*decode_rows(rows.read(), where))


def load_source(source: RowSource) -> Dataset:
    where = source.spec
    if source.held_out:  # both splits live in one table: read and decode it once
        whole = load_split(SplitRows(source.train.table), where)
        train, test = (whole.subset(torch.from_numpy(rows.file_rows())) for rows in (source.train, source.test))
    else:
        train, test = load_split(source.train, where), load_split(source.test, where)
    check_source_keys(source, train, test)
    return source_dataset(source, train, test)


def check_source_keys(source: RowSource, train: Split, test: Split) -> None:
    """Ids unique and non-negative, labels class indices (0 <= label < MAX_CLASSES), at least
    two classes to train on: what every loader checks before anything else."""
    _check_ids(source, train, test)
    for split in (train, test):
        if len(split) and int(split.labels.min()) < 0:
            raise UserError(f"{source.spec}: labels must be non-negative integers")
        if len(split) and int(split.labels.max()) >= MAX_CLASSES:
            raise UserError(f"{source.spec}: label {int(split.labels.max())} is not a class index "
                            f"(labels are 0 ... number of classes - 1, at most {MAX_CLASSES - 1})")
    classes = len(source.train.table.classes) if hasattr(source.train.table, "classes") else (
        len(torch.unique(train.labels)))
    if classes < 2:
        raise UserError(f"{source.spec}: the training data has {classes} class; a classifier needs at least 2")


def source_dataset(source: RowSource, train: Split, test: Split) -> Dataset:
    """The `Dataset` of a source's two splits (in memory or left in place)."""
    num_classes, names = _classes(source, train, test)
    return Dataset(
        name=source.name,
        train=train,
        test=test,
        num_classes=num_classes,
        input_kind=source.input_kind,
        class_names=names,
        fingerprint=source.fingerprint,
        notes={"held_out_test": {"fraction": TEST_FRACTION, "seed": SPLIT_SEED}} if source.held_out else {},
    )


def _check_ids(source: RowSource, train: Split, test: Split) -> None:
    """Ids are unique within each file (train and test of a held-out source share one)."""
    groups = [torch.cat([train.ids, test.ids])] if source.held_out else [train.ids, test.ids]
    for ids in groups:
        if len(torch.unique(ids)) != len(ids):
            raise UserError(f"{source.spec}: the 'id' column has duplicates")
        if len(ids) and int(ids.min()) < 0:
            raise UserError(f"{source.spec}: ids must be non-negative integers, found {int(ids.min())}")


def _classes(source: RowSource, train: Split, test: Split) -> tuple[int, list[str]]:
    """(number of classes, their names): the folder's or digits' classes, else max label + 1."""
    table = source.train.table
    if not isinstance(table, ParquetTable):
        return len(table.classes), list(table.classes)
    labels = torch.cat([train.labels, test.labels])
    num_classes = int(labels.max()) + 1
    pairs = table.label_names()
    return num_classes, [str(pairs.get(k, k)) for k in range(num_classes)]


def open_dataset(spec: str | os.PathLike) -> Dataset:
    """`load_dataset(spec)` with every input left in its file: same ids, labels, fingerprint."""
    base, *modifiers = str(spec).split("+")
    source = open_source(base)
    train, test = (_lazy_split(rows, source.spec) for rows in (source.train, source.test))
    check_source_keys(source, train, test)
    dataset = source_dataset(source, train, test)
    for modifier in modifiers:
        dataset = apply_modifier(dataset, modifier, str(spec))
    return dataset


def _lazy_split(rows: SplitRows, where: str) -> Split:
    ids, labels = rows.table.keys(rows.file_rows())
    first = rows.read(0, 1) if len(rows) else None
    shape = tuple(decode_rows(first, where)[1].shape[1:]) if first is not None else ()
    return Split(torch.from_numpy(ids), RowInputs(rows, shape, where), torch.from_numpy(labels))
