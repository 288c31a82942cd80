"""A split's rows as a Ray Dataset: Ray Data's own readers, then one decode step.

Rows enter through Ray Data's readers: `read_parquet` (only the `id` and input columns, and
only the split's ids: a projection and an `id` filter Ray pushes down into the reader, which
skips row groups outside the ids' ranges; read tasks of about one row group each, as
`ray_session.data_settings` sets), `read_binary_files` for an image folder's files,
`from_items` of row numbers for the built-in digits. `RaySplit`
then turns a raw block into decoded, normalised rows through `unlearning.data.RowInputs.decode`
(the library's one decoder, the poison trigger included), tagged with their row numbers in
the split, dropping the rows a filter of ranges let through (`EXACT_FILTER_IDS`); labels come
from the split, so `+coarse` and `+poison` relabelling hold on Ray too.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.distributed.plan import DATA_TASK_CPUS
from pipelines.ray_session import data_settings
from unlearning.data import RowInputs, Split, normalize_batch
from unlearning.data.rows import READ_BLOCK_ROWS
from unlearning.data.sources import DigitsTable, ImageFolderTable, ParquetTable, arrow_inputs

CHUNK_BYTES = 8 << 20  # decoded inputs an evaluator decodes and predicts at once
# The most ids an `is_in` filter pushed down to the Parquet reader holds: every read task
# rebuilds it as a Python list (~36 bytes an id; 240,000 ids made read tasks peak ~12 % higher).
# Beyond this the reader gets the ids' range only, and `decode` drops the rows outside the split.
EXACT_FILTER_IDS = 1 << 16
ID_RANGES = 64  # id ranges a filter of more ids than that is cut into


@dataclass
class RaySplit:
    """What a Ray stage needs to read and decode rows of one split (picklable, a few bytes a row)."""

    inputs: RowInputs
    ids: np.ndarray  # split row i has id ids[i]
    labels: np.ndarray  # the split's labels (after any relabelling)
    normalize: dict | None
    channels_last: bool = False
    # the ids' sorting order and the sorted ids (Parquet): built where the split is shipped from,
    # so that every actor reads one shared copy out of the object store instead of building its own
    id_lookup: tuple[np.ndarray, np.ndarray] | None = None
    only: np.ndarray | None = None  # the split rows this stage reads, increasing (None: all)
    _file_row: dict | None = None  # an image folder's path -> file row, built on first use
    _file_rows_lookup: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def of(cls, split: Split, normalize: dict | None, channels_last: bool = False) -> RaySplit:
        ids = split.ids.numpy()
        lookup = _lookup(ids) if isinstance(split.inputs.rows.table, ParquetTable) else None
        return cls(split.inputs, ids, split.labels.numpy(), normalize, channels_last, lookup)

    def subset(self, index: np.ndarray) -> RaySplit:
        """The same split, reading (and decoding) only split rows `index`."""
        return dataclasses.replace(self, only=np.unique(np.asarray(index, dtype=np.int64)))

    @property
    def table(self):
        return self.inputs.rows.table

    def dataset(self, readers: int = 1):
        """Raw rows of the split (or of its `subset`) through Ray Data's readers, lazily. From a
        Parquet file it may hold rows of the file outside them, which `decode` drops.

        At most `readers` read tasks run at once, one per consumer: a task of one row group
        outpaces what decodes its rows, and more at once only start more worker processes.
        """
        import ray

        data_settings()  # block and read-task sizes, also in an actor that builds its own
        index = np.arange(len(self.ids)) if self.only is None else self.only
        table = self.table
        read = {"num_cpus": DATA_TASK_CPUS, "concurrency": readers, "file_extensions": None}
        if isinstance(table, ParquetTable):  # projection and id filter, pushed down to the reader
            return (
                ray.data.read_parquet(table.path, **read)
                .select_columns(["id", table.input_kind], num_cpus=DATA_TASK_CPUS)
                .filter(expr=_id_filter(np.sort(self.ids[index])), num_cpus=DATA_TASK_CPUS)
            )
        if isinstance(table, ImageFolderTable):
            files = [table.files[row] for row in self.inputs.file_rows()[index]]
            return ray.data.read_binary_files(files, include_paths=True, **read)
        if isinstance(table, DigitsTable):  # built into the driver: its row numbers, in blocks
            # from_items builds blocks here; from_numpy would start 1-CPU tasks a busy cluster may not have
            blocks = max(1, min(len(index) // 256, 64))
            return ray.data.from_items([{"data": int(i)} for i in index], override_num_blocks=blocks)
        raise TypeError(f"no Ray reader for {type(table).__name__}")

    def chunk_rows(self) -> int:
        """Rows a consumer decodes at once: at most `CHUNK_BYTES` of decoded inputs, so what a
        consumer allocates per chunk does not follow the file's row groups or Ray's blocks."""
        row_bytes = int(np.prod(self.inputs.row_shape)) * self.inputs.dtype.itemsize
        return max(1, min(READ_BLOCK_ROWS, CHUNK_BYTES // max(row_bytes, 1)))

    def streams(self, consumers: int) -> list:
        """Every row of the split read once and streamed out to `consumers` (e.g. evaluator
        actors), each getting a share as it comes: one reader per consumer."""
        return self.dataset(readers=consumers).streaming_split(consumers, equal=False)

    def split_rows(self, batch) -> np.ndarray:
        """Which split rows a raw block (an Arrow table from `dataset`) holds; -1 for a row of
        a Parquet file this split (or subset) does not read."""
        table = self.table
        if isinstance(table, ParquetTable):
            if self.id_lookup is None:
                self.id_lookup = _lookup(self.ids)
            rows = _find(self.id_lookup, np.asarray(batch.column("id").to_numpy(), dtype=np.int64))
            if self.only is not None:
                rows[~_among(self.only, rows)] = -1
            return rows
        if isinstance(table, ImageFolderTable):
            if self._file_row is None:  # built once per stage, not per block
                self._file_row = {os.path.abspath(f): i for i, f in enumerate(table.files)}
            paths = batch.column("path").to_pylist()
            rows = np.asarray([self._file_row[os.path.abspath(p)] for p in paths], dtype=np.int64)
            if self._file_rows_lookup is None:
                self._file_rows_lookup = _lookup(self.inputs.file_rows())
            rows = _find(self._file_rows_lookup, rows)
            if (rows < 0).any():
                raise RuntimeError("a Ray reader returned files outside the split")
            return rows
        return np.asarray(batch.column("data").to_numpy(), dtype=np.int64)

    def decode(self, batch) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """A raw block -> (split row numbers, normalised inputs, labels), its rows outside the
        split (or subset) dropped."""
        rows = self.split_rows(batch)
        if (rows < 0).any():
            import pyarrow as pa

            batch, rows = batch.filter(pa.array(rows >= 0)), rows[rows >= 0]
        table = self.table
        file_rows = self.inputs.file_rows()[rows]
        if isinstance(table, ParquetTable):
            raw = arrow_inputs(batch, table.input_kind, table.path)
            raw["label"] = self.labels[rows]
            inputs = self.inputs.decode(raw, file_rows)
        elif isinstance(table, ImageFolderTable):
            images = np.empty(len(rows), dtype=object)
            images[:] = batch.column("bytes").to_pylist()
            inputs = self.inputs.decode({"id": file_rows, "label": self.labels[rows], "image": images}, file_rows)
        else:
            inputs = self.inputs.read(rows)
        inputs = normalize_batch(inputs, self.normalize)
        if self.channels_last:  # the in-process decoder's memory layout, hence its rounding
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return rows, inputs, torch.from_numpy(self.labels[rows])


def _lookup(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    return order, keys[order]


def _find(lookup: tuple[np.ndarray, np.ndarray], wanted: np.ndarray) -> np.ndarray:
    """The positions of keys `wanted` in the keys `lookup` was built from (-1: not there)."""
    order, ordered = lookup
    if not len(ordered):
        return np.full(len(wanted), -1, dtype=np.int64)
    found = np.searchsorted(ordered, wanted).clip(max=len(ordered) - 1)
    return np.where(ordered[found] == wanted, order[found], -1)


def _among(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which of `values` are in the sorted array `ordered`."""
    if not len(ordered):
        return np.zeros(len(values), dtype=bool)
    return ordered[np.searchsorted(ordered, values).clip(max=len(ordered) - 1)] == values


def _id_filter(ids: np.ndarray):
    """A filter Ray pushes down to the Parquet reader, which skips the row groups whose id
    statistics it excludes (Arrow never does for an `is_in` of more than a few values):
    `id in ids` (sorted) bounded by their range, or beyond `EXACT_FILTER_IDS` ids the union
    of at most `ID_RANGES` ranges that covers them (cut at their widest gaps: a worker's
    interleaved chunks, say)."""
    from ray.data.expressions import col

    if not len(ids):
        return col("id").is_in([])
    exact = len(ids) <= EXACT_FILTER_IDS
    bounds = id_ranges(ids, 1 if exact else ID_RANGES)
    ranges = [(col("id") >= int(low)) & (col("id") <= int(high)) for low, high in bounds]
    if exact:
        return ranges[0] & col("id").is_in(ids.tolist())
    return functools.reduce(operator.or_, ranges)


def id_ranges(ids: np.ndarray, most: int = ID_RANGES) -> list[tuple[int, int]]:
    """At most `most` ranges [low, high] that cover the sorted `ids`, leaving out their
    `most - 1` widest gaps."""
    gaps = np.diff(ids)
    widest = np.argsort(gaps, kind="stable")[::-1][: max(most - 1, 0)]
    cuts = np.sort(widest)
    cuts = cuts[gaps[cuts] > 1]  # a gap of 1 leaves nothing out
    starts, ends = np.concatenate([[0], cuts + 1]), np.concatenate([cuts, [len(ids) - 1]])
    return [(int(ids[a]), int(ids[b])) for a, b in zip(starts, ends)]
