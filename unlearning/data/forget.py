"""Forget sets: which training rows a deletion request names.

`class:K[,K2]`, `subclass:K` (a fine class of a coarse task), `random:N[:SEED]`,
`poison:identified` / `poison:all` (a `+poison` task), `poison:FILE` (ids declared poisoned),
or a file of ids (one per line, or Parquet with an `id` column).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from unlearning.data.containers import Dataset, Split
from unlearning.data.sources import fingerprint_bytes
from unlearning.errors import UserError


@dataclass
class ForgetSet:
    """Which training rows to forget, and what kind of request it is."""

    spec: str
    kind: str  # "class", "subclass", "ids", "random", "poison"
    ids: Tensor
    classes: list[int] = field(default_factory=list)

    def manifest_hash(self) -> str:
        return fingerprint_bytes(np.sort(self.ids.numpy()).astype(np.int64).tobytes())


def _class_index(text: str, what: str, limit: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"forget spec {what}: {text!r} is not a class index") from None
    if not 0 <= value < limit:
        raise UserError(f"forget spec {what}: class {value} is out of range 0..{limit - 1}")
    return value


def parse_forget(spec: str, dataset: Dataset, seed: int = 0) -> ForgetSet:
    """`class:K[,K2]`, `subclass:K` (a fine class), `random:N[:SEED]`, `poison:identified`,
    `poison:all`, `poison:FILE`, or a file of ids."""
    spec = str(spec).strip()
    train = dataset.train
    if spec.startswith("poison:"):
        forget = ForgetSet(spec, "poison", _poison_ids(spec, spec[7:], dataset))
    elif spec.startswith("class:"):
        classes = [_class_index(t, spec, dataset.num_classes) for t in spec[6:].split(",")]
        ids = train.ids[torch.isin(train.labels, torch.tensor(classes))]
        forget = ForgetSet(spec, "class", ids, classes)
    elif spec.startswith("subclass:"):
        if train.fine_labels is None:
            raise UserError(f"forget spec {spec}: the data set has no fine labels (use a sub-class task)")
        limit = int(train.fine_labels.max()) + 1
        fine = _class_index(spec[9:], spec, limit)
        ids = train.ids[train.fine_labels == fine]
        forget = ForgetSet(spec, "subclass", ids, [fine])
    elif spec.startswith("random:"):
        parts = spec[7:].split(":")
        try:
            count = int(parts[0])
            seed = int(parts[1]) if len(parts) > 1 else seed
        except ValueError:
            raise UserError(f"forget spec {spec!r}: expected random:N or random:N:SEED") from None
        if not 0 < count < len(train):
            raise UserError(f"forget spec {spec!r}: N must be between 1 and {len(train) - 1}")
        chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
        forget = ForgetSet(spec, "random", train.ids[chosen.sort().values])
    else:
        forget = ForgetSet(spec, "ids", read_id_file(Path(spec)))
    return checked_forget(forget, dataset)


def _poison_ids(spec: str, which: str, dataset: Dataset) -> Tensor:
    """`poison:identified` / `poison:all` of a `+poison` task, or `poison:FILE`: any id list
    declared poisoned (its rows keep their labels in the data, the poison labels)."""
    if which in ("identified", "all"):
        if dataset.poison is None:
            raise UserError(f"forget spec {spec}: the data set has no poison (use DATA+poison:rate=... "
                            "or poison:FILE with the ids found to be poisoned)")
        return dataset.poison.identified.ids if which == "identified" else dataset.poison.poisoned_ids
    if not Path(which).is_file():
        raise UserError(f"forget spec {spec}: {which!r} is not an id file (poison:FILE, poison:identified "
                        "or poison:all)")
    return read_id_file(Path(which))


def forget_ids(ids, dataset: Dataset, spec: str = "ids") -> ForgetSet:
    """A forget set of explicit training ids (any integer sequence, array or tensor)."""
    try:
        values = torch.as_tensor(np.asarray(ids)).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"forget ids must be integers, got {type(ids).__name__}") from None
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise UserError(f"forget ids must be integers, got {values.dtype}")
    return checked_forget(ForgetSet(spec, "ids", torch.unique(values.to(torch.int64))), dataset)


def checked_forget(forget: ForgetSet, dataset: Dataset) -> ForgetSet:
    """`forget`, once it is known to name some, but not all, of the training rows."""
    spec, train = forget.spec, dataset.train
    if len(forget.ids) == 0:
        raise UserError(f"forget set {spec!r} is empty")
    dataset.index_of(forget.ids)  # raises on ids not in the data
    if len(forget.ids) >= len(train):
        raise UserError(f"forget set {spec!r} covers the whole training set; nothing would remain")
    return forget


def read_id_file(path: Path) -> Tensor:
    if not path.is_file():
        raise UserError(f"forget spec {str(path)!r} is not class:K, random:N or an existing id file")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            column = pq.read_table(path, columns=["id"]).column("id")
        except Exception as error:  # not Parquet, or no such column
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{path}: cannot read an 'id' column ({first})") from None
        if not pa.types.is_integer(column.type) or column.null_count:
            raise UserError(f"{path}: the 'id' column must hold integers without nulls, not {column.type}")
        values = column.to_numpy()
        if len(values) and (values.min() < 0 or values.max() > np.iinfo(np.int64).max):
            raise UserError(f"{path}: ids must be integers from 0 to 2^63 - 1")
        values = np.asarray(values, dtype=np.int64)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"{path} is not UTF-8 text (byte {error.start}); an id file holds one integer id per line") from None
        values = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            values.append(parse_id(line, f"{path}:{number}"))
        values = np.asarray(values, dtype=np.int64)
    return torch.unique(torch.tensor(values, dtype=torch.int64))


def parse_id(text: str, where: str) -> int:
    """One sample id: a non-negative integer that fits int64, or a UserError naming it."""
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not an integer id") from None
    if not 0 <= value <= np.iinfo(np.int64).max:
        raise UserError(f"{where}: id {text} is out of range (ids are integers from 0 to 2^63 - 1)")
    return value


def split_forget(dataset: Dataset, forget: ForgetSet) -> tuple[Split, Split]:
    """(retain, forget) rows of the training split, each in the data's row order."""
    mask = torch.isin(dataset.train.ids, forget.ids)
    return dataset.train.where(~mask), dataset.train.where(mask)
