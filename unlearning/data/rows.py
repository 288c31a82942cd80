"""A data set left where it lives: ids and labels in memory, inputs read by the block.

`unlearning.data.open_dataset(spec)` is `load_dataset` without decoding any input: each split
holds its ids, labels (and fine labels) and a `RowInputs` that reads and decodes the rows a batch needs,
through `unlearning.data.sources` (the one reader). A deletion request works on such a data
set, so the process that runs it holds a few bytes per row (id and label), never the rows;
passes over the rows run where an executor puts them (`unlearning.passes`).

Benchmark modifiers work the same way: `+coarse` only relabels, and `+poison` stamps its
trigger on the poisoned rows as they are decoded (`Stamp`), so both run wherever rows are read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from unlearning.data.sources import SplitRows, decode_rows

READ_BLOCK_ROWS = 2048  # rows read and decoded at once when batches stream from a source


@dataclass(frozen=True, eq=False)
class Stamp:
    """The poison trigger, stamped on rows as they are decoded (docs/methods.md#poison).

    `file_rows` are the (sorted) file rows that carry it; None stamps every row read.
    """

    value: tuple[float, ...]
    size: int
    file_rows: np.ndarray | None = None

    def __call__(self, file_rows: np.ndarray, inputs: Tensor) -> Tensor:
        hit = np.ones(len(file_rows), dtype=bool) if self.file_rows is None else np.isin(file_rows, self.file_rows)
        if not hit.any():
            return inputs
        inputs = inputs.clone()
        index = torch.from_numpy(np.nonzero(hit)[0])
        inputs[index] = add_trigger(inputs[index], torch.tensor(self.value, dtype=inputs.dtype), self.size)
        return inputs


@dataclass
class RowInputs:
    """A split's inputs, not in memory: split row i is file row `rows.file_rows()[i]`.

    Stands in for a `Split`'s input tensor: `view(index)` selects rows without reading them,
    `read(index)` reads and decodes them (only the Parquet row groups that hold them), and
    `shape`/`dim()` describe them. Picklable, so a Ray stage reads exactly what this reads.
    """

    rows: SplitRows
    row_shape: tuple[int, ...]
    where: str
    stamp: Stamp | None = None
    dtype: torch.dtype = torch.float32

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.row_shape))

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    def file_rows(self) -> np.ndarray:
        return self.rows.file_rows()

    def view(self, index) -> RowInputs:
        """Split rows `index` (any order), renumbered 0..len-1; nothing is read."""
        positions = self.file_rows()[np.asarray(index, dtype=np.int64)]
        return replace(self, rows=SplitRows(self.rows.table, positions))

    def concat(self, other: RowInputs) -> RowInputs:
        if other.rows.table is not self.rows.table or other.stamp is not self.stamp:
            raise ValueError("only rows of the same table and trigger can be joined unread")
        positions = np.concatenate([self.file_rows(), other.file_rows()])
        return replace(self, rows=SplitRows(self.rows.table, positions))

    def read(self, index=None) -> Tensor:
        """Split rows `index` (default: all), decoded, in the order asked."""
        wanted = self.file_rows() if index is None else self.file_rows()[np.asarray(index, dtype=np.int64)]
        unique = np.unique(wanted)
        inputs = self.decode(self.rows.table.read(unique), unique)
        if len(unique) == len(wanted) and np.array_equal(unique, wanted):
            return inputs  # sequential reads keep the decoder's memory layout
        return inputs[torch.from_numpy(np.searchsorted(unique, wanted))]

    def decode(self, raw: dict, file_rows: np.ndarray) -> Tensor:
        """Raw rows of `file_rows` -> float32 inputs, the trigger stamped (the Ray stage uses this too)."""
        _, inputs, _ = decode_rows(raw, self.where)
        return self.stamp(file_rows, inputs) if self.stamp is not None else inputs


def is_lazy(inputs) -> bool:
    return isinstance(inputs, RowInputs)


def add_trigger(inputs: Tensor, value: Tensor, size: int = 3) -> Tensor:
    """A size x size patch in the bottom-right corner set to `value` (per channel)."""
    out = inputs.clone()
    out[..., -size:, -size:] = value.view(-1, 1, 1)
    return out


def channel_extremes(inputs, which: str = "max") -> Tensor:
    """Per-channel max (or min) over every row, read a block at a time."""
    reduce = torch.amax if which == "max" else torch.amin
    result = None
    for start in range(0, len(inputs), READ_BLOCK_ROWS):
        block = inputs.read(np.arange(start, min(start + READ_BLOCK_ROWS, len(inputs))))
        value = reduce(block, dim=[0] + list(range(2, block.dim())))
        result = value if result is None else reduce(torch.stack([result, value]), dim=0)
    return result


def channel_moments(inputs) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (unbiased) std over every row, read a block at a time (float64 sums)."""
    total = squares = None
    count = 0
    for start in range(0, len(inputs), READ_BLOCK_ROWS):
        block = inputs.read(np.arange(start, min(start + READ_BLOCK_ROWS, len(inputs)))).double()
        dims = [0] + list(range(2, block.dim()))
        total = block.sum(dim=dims) + (0 if total is None else total)
        squares = block.pow(2).sum(dim=dims) + (0 if squares is None else squares)
        count += block.numel() // block.shape[1]
    mean = total / count
    variance = (squares - count * mean.pow(2)) / max(count - 1, 1)
    return mean.float(), variance.clamp_min(0).sqrt().float()
