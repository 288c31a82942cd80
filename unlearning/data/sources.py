"""Where rows live: the one reader, decoder and fingerprint of every data source.

A data spec names a source: `digits` (scikit-learn's, built in); a Parquet file with `id`,
`label` and `image` (PNG/JPEG bytes) or `features`; a directory holding `train.parquet` and
`test.parquet`; an image folder with one sub-folder per class. `open_source(spec)` describes
it cheaply (Parquet footers, file lists, file digests; nothing is decoded): its train and test
rows, where each one lives, and the data set's fingerprint. `SplitRows.read` reads chosen rows
(only the Parquet row groups that hold them) and `decode_rows` turns them into tensors.

The in-memory loader (`unlearning.data.load_dataset`) and the Ray Data stage
(`pipelines/distributed`) both read through here, so both see the same rows, decoded the same
way, under the same fingerprint. A single file or folder gets a seeded held-out test split
(`TEST_FRACTION`, `SPLIT_SEED`), which is part of its fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from unlearning.errors import UserError

TEST_FRACTION = 0.2
SPLIT_SEED = 0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
HELD_OUT_TAG = f"{TEST_FRACTION}/{SPLIT_SEED}".encode()


# ---------------------------------------------------------------- fingerprints


def fingerprint_bytes(*parts: bytes) -> str:
    """sha256 over the parts in order, first 16 hex digits."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


# ---------------------------------------------------------------- tables: rows by file row number


@dataclass
class ParquetTable:
    """A Parquet file, described from its footer: rows, row groups, input column."""

    path: str
    num_rows: int
    input_kind: str  # "image" or "features"
    group_starts: np.ndarray  # first file row of each row group

    @classmethod
    def open(cls, path: Path) -> ParquetTable:
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(path)
        except Exception as error:
            raise UserError(f"{path} is not a readable Parquet file ({error})") from None
        columns = set(file.schema_arrow.names)
        for required in ("id", "label"):
            if required not in columns:
                raise UserError(f"{path} has no {required!r} column (columns: {sorted(columns)})")
        if "image" not in columns and "features" not in columns:
            raise UserError(f"{path} needs an 'image' or a 'features' column")
        _check_schema(path, file.schema_arrow)
        sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        kind = "image" if "image" in columns else "features"
        return cls(str(path), int(sum(sizes)), kind, starts)

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """File rows `rows` (increasing): `id`, `label` and `image` (bytes) or `features`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = ["id", "label", self.input_kind]
        file = pq.ParquetFile(self.path)
        if len(rows) == self.num_rows:  # every row: no row-group arithmetic
            table = file.read(columns=columns)
        else:  # only the row groups holding these rows, one at a time, however scattered
            groups = np.searchsorted(self.group_starts, rows, side="right") - 1
            parts = []
            for group in np.unique(groups).tolist():  # at most one row group decoded at once
                local = rows[groups == group] - self.group_starts[group]
                parts.append(file.read_row_group(group, columns=columns).take(pa.array(local)))
            table = pa.concat_tables(parts)
        raw = arrow_inputs(table, self.input_kind, self.path)
        raw["label"] = int64_column(table, "label", self.path)
        return raw

    def keys(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(id, label) of file rows `rows`, only those two columns read; UserError on a null
        or on an id beyond int64."""
        import pyarrow.parquet as pq

        table = pq.ParquetFile(self.path).read(columns=["id", "label"])
        ids, labels = (int64_column(table, name, self.path) for name in ("id", "label"))
        return ids[rows], labels[rows]

    def label_names(self) -> dict[int, str]:
        """label -> label_name, if the file has a `label_name` column."""
        import pyarrow.parquet as pq

        file = pq.ParquetFile(self.path)
        if "label_name" not in file.schema_arrow.names:
            return {}
        table = file.read(columns=["label", "label_name"])
        return {int(k): str(v) for k, v in zip(table.column("label").to_pylist(), table.column("label_name").to_pylist())}

    def fingerprint_parts(self) -> list[bytes]:
        return [file_digest(self.path)]


def _check_schema(path: Path, schema) -> None:
    """Integer `id` and `label`, binary `image` or numeric list `features`, from the footer."""
    import pyarrow as pa

    for name in ("id", "label"):
        kind = schema.field(name).type
        if not pa.types.is_integer(kind):
            raise UserError(f"{path}: the {name!r} column must hold integers, not {kind}")
    if "image" in schema.names:
        kind = schema.field("image").type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise UserError(f"{path}: the 'image' column must hold encoded image bytes, not {kind}")
        return
    kind = schema.field("features").type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) or not (
        pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)
    ):
        raise UserError(f"{path}: the 'features' column must hold lists of numbers, not {kind}")


def int64_column(table, name: str, where) -> np.ndarray:
    """An integer column of an Arrow table as int64; UserError on a null or a value beyond int64."""
    column = table.column(name)
    if column.null_count:
        raise UserError(f"{where}: the {name!r} column has {column.null_count} empty (null) values")
    values = column.to_numpy()
    if values.dtype == np.uint64 and len(values) and values.max() > np.iinfo(np.int64).max:
        raise UserError(f"{where}: the {name!r} column holds values beyond int64 ({values.max()})")
    return np.asarray(values, dtype=np.int64)


def arrow_inputs(table, input_kind: str, where="a Parquet block") -> dict[str, np.ndarray]:
    """`id` and the input column of an Arrow table (a Parquet read, or a Ray Data block), raw."""
    raw = {"id": int64_column(table, "id", where)}
    if input_kind == "image":
        values = table.column("image").to_pylist()
        raw["image"] = np.empty(len(values), dtype=object)
        raw["image"][:] = values
    else:
        raw["features"] = _feature_rows(table.column("features"))
    return raw


def _feature_rows(column):
    """A list column as a 2-D array when every row has the same length (fast), else a list."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) and column.null_count == 0 and len(column):
        lengths = pc.list_value_length(column).to_numpy()
        if (lengths == lengths[0]).all() and not pa.types.is_nested(column.type.value_type):
            values = column.flatten().to_numpy(zero_copy_only=False)
            return np.asarray(values, dtype=np.float32).reshape(len(column), int(lengths[0]))
    return column.to_pylist()


@dataclass
class ImageFolderTable:
    """An image folder: file row i is `files[i]`, class sub-folders in sorted order."""

    root: str
    files: list[str]
    labels: np.ndarray
    classes: list[str]
    input_kind: str = "image"

    @classmethod
    def open(cls, root: Path) -> ImageFolderTable:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        files, labels = [], []
        for label, name in enumerate(classes):
            for file in sorted((root / name).iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(str(file))
                    labels.append(label)
        if not files:
            raise UserError(f"{root}: no images found in its class sub-folders")
        return cls(str(root), files, np.asarray(labels, dtype=np.int64), classes)

    @property
    def num_rows(self) -> int:
        return len(self.files)

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        images = np.empty(len(rows), dtype=object)
        images[:] = [Path(self.files[i]).read_bytes() for i in rows]
        return {"id": np.asarray(rows, dtype=np.int64), "label": self.labels[rows], "image": images}

    def keys(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(rows, dtype=np.int64), self.labels[rows]

    def fingerprint_parts(self) -> list[bytes]:
        digest = hashlib.sha256()
        for file in self.files:
            digest.update(str(Path(file).relative_to(self.root)).encode())
            digest.update(file_digest(file))
        return [digest.digest()]


@dataclass
class DigitsTable:
    """scikit-learn's 8x8 digits, images scaled to [0, 1]; ids are row numbers."""

    pixels: np.ndarray  # float32, N x 1 x 8 x 8
    labels: np.ndarray
    input_kind: str = "image"
    classes: tuple[str, ...] = tuple(str(d) for d in range(10))

    @classmethod
    def open(cls) -> DigitsTable:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = (torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0).numpy()
        return cls(pixels, np.asarray(digits.target, dtype=np.int64))

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"id": np.asarray(rows, dtype=np.int64), "label": self.labels[rows], "pixels": self.pixels[rows]}

    def keys(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(rows, dtype=np.int64), self.labels[rows]

    def fingerprint_parts(self) -> list[bytes]:
        return [b"digits", self.pixels.tobytes(), self.labels.tobytes()]


Table = ParquetTable | ImageFolderTable | DigitsTable


# ---------------------------------------------------------------- splits and sources


@dataclass
class SplitRows:
    """One split's rows: split row i is file row `positions[i]` of `table` (None: the identity)."""

    table: Table
    positions: np.ndarray | None = None

    def __len__(self) -> int:
        return self.table.num_rows if self.positions is None else len(self.positions)

    def file_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = len(self) if stop is None else stop
        return np.arange(start, stop, dtype=np.int64) if self.positions is None else self.positions[start:stop]

    def read(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Split rows [start, stop), raw (see the tables' `read`)."""
        return self.table.read(self.file_rows(start, stop))

    def select(self, index: np.ndarray) -> SplitRows:
        """Only split rows `index` (increasing), renumbered 0..len-1."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index[0] < 0 or index[-1] >= len(self) or np.any(np.diff(index) <= 0)):
            raise ValueError("index must be increasing row numbers of this split")
        return replace(self, positions=self.file_rows()[index])


@dataclass
class RowSource:
    """A data set described without decoding it: where its train and test rows live."""

    spec: str
    name: str
    train: SplitRows
    test: SplitRows
    fingerprint: str
    held_out: bool  # the test split is a seeded share of one file or folder

    @property
    def input_kind(self) -> str:
        return self.train.table.input_kind


def held_out_positions(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) file rows of a single source: a seeded TEST_FRACTION held out, each sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = max(1, int(round(n * TEST_FRACTION)))
    return order[n_test:].sort().values.numpy(), order[:n_test].sort().values.numpy()


def _single(spec: str, name: str, table: Table, tag: bool) -> RowSource:
    """A source of one table, with a held-out test split (`tag`: the split is in the fingerprint)."""
    if table.num_rows < 2:
        raise UserError(f"{spec}: {table.num_rows} rows; a data set needs rows to train on and to test on")
    train, test = held_out_positions(table.num_rows)
    parts = table.fingerprint_parts() + ([HELD_OUT_TAG] if tag else [])
    return RowSource(spec, name, SplitRows(table, train), SplitRows(table, test), fingerprint_bytes(*parts), True)


def open_source(spec: str | os.PathLike) -> RowSource:
    """Describe the source `spec` names (no `+modifiers`; see `unlearning.data.load_dataset`)."""
    spec = str(spec)
    if spec == "digits":  # its fingerprint predates the held-out tag; kept so stores still match
        return _single(spec, "digits", DigitsTable.open(), tag=False)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"data set {spec!r} is neither 'digits' nor an existing path")
    if path.is_file():
        source = _single(spec, path.stem, ParquetTable.open(path), tag=True)
    elif (path / "train.parquet").exists():
        train_path, test_path = path / "train.parquet", path / "test.parquet"
        if not test_path.exists():
            raise UserError(f"{path} has train.parquet but no test.parquet")
        train, test = ParquetTable.open(train_path), ParquetTable.open(test_path)
        fingerprint = fingerprint_bytes(*train.fingerprint_parts(), *test.fingerprint_parts())
        source = RowSource(spec, path.name, SplitRows(train), SplitRows(test), fingerprint, False)
    else:
        source = _single(spec, path.name, ImageFolderTable.open(path), tag=True)
    if len(source.train) == 0:
        raise UserError(f"{spec}: the training split is empty")
    return source


# ---------------------------------------------------------------- decoding


def decode_image(data: bytes) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> float32 CxHxW in [0, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        array = np.asarray(image, dtype=np.float32) / 255.0
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_images(column, where: str) -> Tensor:
    """A column of encoded images -> one float32 NxCxHxW tensor (all the same shape)."""
    arrays = []
    for i, data in enumerate(column):
        try:
            arrays.append(decode_image(data))
        except Exception as error:  # PIL raises many kinds for bad bytes
            raise UserError(f"{where}: row {i} has an image that cannot be decoded ({error})") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"{where}: images have different shapes {sorted(shapes)[:3]}; resize them first")
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0)


def decode_rows(raw: dict, where: str) -> tuple[Tensor, Tensor, Tensor]:
    """Raw rows from `SplitRows.read` -> (ids int64, inputs float32, labels int64)."""
    if "image" in raw:
        inputs = decode_images(raw["image"], where)
    elif "pixels" in raw:
        inputs = torch.from_numpy(np.ascontiguousarray(raw["pixels"], dtype=np.float32))
    else:
        inputs = _feature_tensor(raw["features"], where)
    ids = torch.tensor(np.asarray(raw["id"], dtype=np.int64))
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        row = int((~torch.isfinite(inputs.reshape(len(inputs), -1))).any(1).nonzero()[0])
        raise UserError(f"{where}: the row with id {int(ids[row])} has inputs that are not finite (NaN or inf)")
    return ids, inputs, torch.tensor(np.asarray(raw["label"], dtype=np.int64))


def _feature_tensor(features, where: str) -> Tensor:
    """Feature rows (a 2-D array, or a list when rows differ in length) -> float32 N x D."""
    if isinstance(features, np.ndarray) and features.dtype != object:
        return torch.tensor(np.asarray(features, dtype=np.float32))  # a copy: Arrow's buffers are read-only
    lengths = {len(row) if row is not None else 0 for row in features}
    if len(lengths) > 1 or 0 in lengths:
        raise UserError(f"{where}: the 'features' rows differ in length ({sorted(lengths)[:4]}) or are empty; "
                        "every row needs the same number of features")
    return torch.tensor(np.asarray(list(features), dtype=np.float32))
