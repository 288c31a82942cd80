"""The one place that builds data sets, forget sets and the benchmark tasks.

A `Dataset` holds two `Split`s (train, test) in memory: int64 `ids`, float32 `inputs`
(images scaled to [0, 1] as CxHxW, or feature vectors as they are) and int64 `labels`.
Normalisation is the model's business (its checkpoint records mean and std) and is applied
per batch by `Split.batches(..., normalize=...)`.

Sources (DESIGN.md, files): `digits` (scikit-learn's, built in); a Parquet file with `id`,
`label` and `image` (PNG/JPEG bytes) or `features`; a directory holding `train.parquet` and
`test.parquet`; an image folder with one sub-folder per class. A single file or folder gets a
seeded held-out test split (`TEST_FRACTION`, `SPLIT_SEED`), recorded in `Dataset.notes`.

Benchmark tasks are modifiers appended to any source, all seeded and reproducible:
`digits+poison:rate=0.01,identified=0.2,seed=0,target=0` (SPEC.md section 6) and
`DIR+coarse:0,1,8,9/2,3,4,5,6,7` (coarse classes, fine labels kept for `subclass:K`).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from unlearning.errors import UserError

TEST_FRACTION = 0.2
SPLIT_SEED = 0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass
class Trigger:
    """SPEC.md section 6's patch on some rows of a split, re-stamped after augmentation.

    The split's stored inputs already carry the patch (importance and evaluation see it as
    is); a training batch that is augmented takes `clean` (the rows' pixels without it),
    augments them and stamps the patch last, so crops and flips never move or cut it.
    `slot[i]` is row i's index into `clean`, or -1 for a row without the trigger.
    """

    slot: Tensor
    clean: Tensor
    value: Tensor  # per channel, on the stored (unnormalised) pixel scale
    size: int = 3

    def subset(self, index: Tensor) -> Trigger:
        return Trigger(self.slot[index], self.clean, self.value, self.size)

    def stamp_value(self, normalize: dict | None, dim: int) -> Tensor:
        """The patch value per channel on the normalised scale the augmented batches use."""
        return normalize_batch(self.value.view(1, -1, *([1] * (dim - 2))), normalize).flatten()

    @staticmethod
    def concat(first: Trigger | None, n_first: int, second: Trigger | None, n_second: int) -> Trigger | None:
        """The trigger of two splits' rows joined; a split without one adds untriggered rows."""
        if first is None and second is None:
            return None
        template = first if first is not None else second

        def parts(trigger: Trigger | None, n: int) -> tuple[Tensor, Tensor]:
            if trigger is None:
                return torch.full((n,), -1, dtype=torch.int64), template.clean[:0]
            return trigger.slot, trigger.clean

        (slot_a, clean_a), (slot_b, clean_b) = parts(first, n_first), parts(second, n_second)
        slot_b = torch.where(slot_b >= 0, slot_b + len(clean_a), slot_b)
        return Trigger(torch.cat([slot_a, slot_b]), torch.cat([clean_a, clean_b]), template.value, template.size)


@dataclass
class Split:
    ids: Tensor
    inputs: Tensor
    labels: Tensor
    fine_labels: Tensor | None = None
    trigger: Trigger | None = None  # set on a poisoned training split (SPEC.md section 6)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Tensor) -> Split:
        fine = self.fine_labels[index] if self.fine_labels is not None else None
        trigger = self.trigger.subset(index) if self.trigger is not None else None
        return Split(self.ids[index], self.inputs[index], self.labels[index], fine, trigger)

    def where(self, mask: Tensor) -> Split:
        return self.subset(torch.nonzero(mask, as_tuple=True)[0])

    def concat(self, other: Split) -> Split:
        """This split's rows, then `other`'s (fine labels kept only if both have them)."""
        fine = (
            torch.cat([self.fine_labels, other.fine_labels])
            if self.fine_labels is not None and other.fine_labels is not None
            else None
        )
        return Split(
            torch.cat([self.ids, other.ids]),
            torch.cat([self.inputs, other.inputs]),
            torch.cat([self.labels, other.labels]),
            fine,
            Trigger.concat(self.trigger, len(self), other.trigger, len(other)),
        )

    def batches(
        self,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        normalize: dict | None = None,
        augment: Callable[[Tensor], Tensor] | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(inputs, labels) mini-batches in row order, or in a seeded shuffled order.

        `augment` runs on each normalised batch; rows with a trigger get it stamped after.
        """
        order = (
            torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
            if shuffle
            else torch.arange(len(self))
        )
        trigger = self.trigger if augment is not None else None
        stamp = trigger.stamp_value(normalize, self.inputs.dim()) if trigger is not None else None
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            if augment is None:
                yield normalize_batch(self.inputs[index], normalize), self.labels[index]
                continue
            raw, triggered = self.inputs[index], None
            if trigger is not None:
                slot = trigger.slot[index]
                if bool((slot >= 0).any()):
                    triggered = slot >= 0
                    raw = raw.clone()
                    raw[triggered] = trigger.clean[slot[triggered]]
            inputs = augment(normalize_batch(raw, normalize))
            if triggered is not None:
                inputs[triggered] = add_trigger(inputs[triggered], stamp, trigger.size)
            yield inputs, self.labels[index]


def normalize_batch(inputs: Tensor, normalize: dict | None) -> Tensor:
    if not normalize:
        return inputs
    shape = (1, -1) + (1,) * (inputs.dim() - 2)
    mean = torch.tensor(normalize["mean"], dtype=inputs.dtype, device=inputs.device).view(shape)
    std = torch.tensor(normalize["std"], dtype=inputs.dtype, device=inputs.device).view(shape)
    return (inputs - mean) / std


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    input_kind: str  # "image" or "features"
    class_names: list[str]
    fingerprint: str
    notes: dict = field(default_factory=dict)
    poison: PoisonTask | None = None  # set by the `+poison:` modifier

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.inputs.shape[1:])

    def normalization(self) -> dict | None:
        """Per-channel mean and std of the training images (None for feature vectors)."""
        if self.input_kind != "image":
            return None
        dims = [0] + list(range(2, self.train.inputs.dim()))
        mean = self.train.inputs.mean(dim=dims)
        std = self.train.inputs.std(dim=dims).clamp_min(1e-6)
        return {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}

    def index_of(self, ids: Tensor) -> Tensor:
        """Row positions in `train` of the given ids (all must be present)."""
        order = torch.argsort(self.train.ids)
        sorted_ids = self.train.ids[order]
        position = torch.searchsorted(sorted_ids, ids).clamp(max=len(sorted_ids) - 1)
        found = sorted_ids[position] == ids
        if not bool(found.all()):
            missing = ids[~found][:3].tolist()
            raise UserError(f"forget ids not in the training data: {missing}")
        return order[position]


def fingerprint_bytes(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


def _held_out(ids, inputs, labels, name, num_classes, input_kind, class_names, fp) -> Dataset:
    """Seeded held-out test split of a single source (recorded in notes)."""
    n = len(ids)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = max(1, int(round(n * TEST_FRACTION)))
    test_index, train_index = order[:n_test].sort().values, order[n_test:].sort().values
    full = Split(ids, inputs, labels)
    return Dataset(
        name=name,
        train=full.subset(train_index),
        test=full.subset(test_index),
        num_classes=num_classes,
        input_kind=input_kind,
        class_names=class_names,
        fingerprint=fp,
        notes={"held_out_test": {"fraction": TEST_FRACTION, "seed": SPLIT_SEED}},
    )


def load_digits_dataset() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    ids = torch.arange(len(labels), dtype=torch.int64)
    fp = fingerprint_bytes(b"digits", images.numpy().tobytes(), labels.numpy().tobytes())
    return _held_out(ids, images, labels, "digits", 10, "image", [str(d) for d in range(10)], fp)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> float32 CxHxW in [0, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        array = np.asarray(image, dtype=np.float32) / 255.0
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_images(column: list[bytes], where: str) -> Tensor:
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


def read_parquet_split(path: Path) -> tuple[Tensor, Tensor, Tensor, str, list[str] | None]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:
        raise UserError(f"{path} is not a readable Parquet file ({error})") from None
    columns = set(table.column_names)
    for required in ("id", "label"):
        if required not in columns:
            raise UserError(f"{path} has no {required!r} column (columns: {sorted(columns)})")
    if "image" not in columns and "features" not in columns:
        raise UserError(f"{path} needs an 'image' or a 'features' column")
    ids = torch.tensor(np.asarray(table.column("id").to_numpy(), dtype=np.int64))
    if len(torch.unique(ids)) != len(ids):
        raise UserError(f"{path}: the 'id' column has duplicates")
    labels = torch.tensor(np.asarray(table.column("label").to_numpy(), dtype=np.int64))
    if "image" in columns:
        inputs, kind = decode_images(table.column("image").to_pylist(), str(path)), "image"
    else:
        inputs = torch.tensor(np.asarray(table.column("features").to_pylist(), dtype=np.float32))
        kind = "features"
    names = None
    if "label_name" in columns:
        pairs = dict(zip(labels.tolist(), table.column("label_name").to_pylist()))
        names = [str(pairs.get(k, k)) for k in range(int(labels.max()) + 1)] if len(labels) else None
    return ids, inputs, labels, kind, names


def load_parquet_dataset(path: Path) -> Dataset:
    if path.is_dir():
        train_path, test_path = path / "train.parquet", path / "test.parquet"
        train_ids, train_x, train_y, kind, names = read_parquet_split(train_path)
        test_ids, test_x, test_y, _, _ = read_parquet_split(test_path)
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        fp = fingerprint_bytes(file_digest(train_path), file_digest(test_path))
        dataset = Dataset(
            name=path.name,
            train=Split(train_ids, train_x, train_y),
            test=Split(test_ids, test_x, test_y),
            num_classes=num_classes,
            input_kind=kind,
            class_names=names or [str(k) for k in range(num_classes)],
            fingerprint=fp,
        )
    else:
        ids, inputs, labels, kind, names = read_parquet_split(path)
        num_classes = int(labels.max()) + 1
        fp = fingerprint_bytes(file_digest(path), f"{TEST_FRACTION}/{SPLIT_SEED}".encode())
        names = names or [str(k) for k in range(num_classes)]
        dataset = _held_out(ids, inputs, labels, path.stem, num_classes, kind, names, fp)
    _check_labels(dataset, str(path))
    return dataset


def load_image_folder(path: Path) -> Dataset:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(file)
                labels.append(label)
    if not files:
        raise UserError(f"{path}: no images found in its class sub-folders")
    inputs = decode_images([f.read_bytes() for f in files], str(path))
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file_digest(file))
    fp = fingerprint_bytes(digest.digest(), f"{TEST_FRACTION}/{SPLIT_SEED}".encode())
    ids = torch.arange(len(files), dtype=torch.int64)
    return _held_out(ids, inputs, torch.tensor(labels), path.name, len(classes), "image", classes, fp)


def _check_labels(dataset: Dataset, where: str) -> None:
    for split in (dataset.train, dataset.test):
        if len(split) and int(split.labels.min()) < 0:
            raise UserError(f"{where}: labels must be non-negative integers")
    if len(dataset.train) == 0:
        raise UserError(f"{where}: the training split is empty")


def load_dataset(spec: str | os.PathLike) -> Dataset:
    """`digits`, a Parquet file, a directory with train/test Parquet, or an image folder,
    optionally followed by `+poison:...` or `+coarse:...` modifiers."""
    base, *modifiers = str(spec).split("+")
    dataset = _load_source(base)
    for modifier in modifiers:
        dataset = _apply_modifier(dataset, modifier, str(spec))
    return dataset


def _apply_modifier(dataset: Dataset, modifier: str, spec: str) -> Dataset:
    name, _, arguments = modifier.partition(":")
    if name == "coarse":
        try:
            groups = [[int(k) for k in group.split(",")] for group in arguments.split("/")]
        except ValueError:
            raise UserError(f"data spec {spec!r}: coarse groups look like 0,1,8,9/2,3,4,5,6,7") from None
        return coarse_task(dataset, groups)
    if name == "poison":
        allowed = {"rate": float, "identified": float, "seed": int, "target": int, "patch": int}
        options = {}
        for item in filter(None, arguments.split(",")):
            key, _, value = item.partition("=")
            if key not in allowed:
                raise UserError(f"data spec {spec!r}: unknown poison option {key!r} (known: {', '.join(allowed)})")
            try:
                options[key] = allowed[key](value)
            except ValueError:
                raise UserError(f"data spec {spec!r}: poison option {key}={value!r} is not a number") from None
        if "identified" in options:
            options["identified_fraction"] = options.pop("identified")
        return poison_task(dataset, **options).dataset
    raise UserError(f"data spec {spec!r}: unknown modifier {name!r} (known: poison, coarse)")


def _load_source(spec: str) -> Dataset:
    if spec == "digits":
        return load_digits_dataset()
    path = Path(spec)
    if not path.exists():
        raise UserError(f"data set {spec!r} is neither 'digits' nor an existing path")
    if path.is_file():
        return load_parquet_dataset(path)
    if (path / "train.parquet").exists():
        return load_parquet_dataset(path)
    return load_image_folder(path)


# ---------------------------------------------------------------- forget sets


@dataclass
class ForgetSet:
    """Which training rows to forget, and what kind of request it is."""

    spec: str
    kind: str  # "class", "subclass", "ids", "random"
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
    `poison:all`, or a file of ids."""
    spec = str(spec).strip()
    train = dataset.train
    if spec.startswith("poison:"):
        if dataset.poison is None:
            raise UserError(f"forget spec {spec}: the data set has no poison (use DATA+poison:rate=...)")
        which = spec[7:]
        if which not in ("identified", "all"):
            raise UserError(f"forget spec {spec}: expected poison:identified or poison:all")
        ids = dataset.poison.identified.ids if which == "identified" else dataset.poison.poisoned_ids
        forget = ForgetSet(spec, "poison", ids)
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
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=["id"])
        except Exception as error:
            raise UserError(f"{path}: cannot read an 'id' column ({error})") from None
        values = np.asarray(table.column("id").to_numpy(), dtype=np.int64)
    else:
        values = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                values.append(int(line))
            except ValueError:
                raise UserError(f"{path}:{number}: {line!r} is not an integer id") from None
        values = np.asarray(values, dtype=np.int64)
    return torch.unique(torch.tensor(values, dtype=torch.int64))


def split_forget(dataset: Dataset, forget: ForgetSet) -> tuple[Split, Split]:
    """(retain, forget) rows of the training split, each in the data's row order."""
    mask = torch.isin(dataset.train.ids, forget.ids)
    return dataset.train.where(~mask), dataset.train.where(mask)


# ---------------------------------------------------------------- benchmark tasks


def coarse_task(dataset: Dataset, groups: list[list[int]]) -> Dataset:
    """Relabel to coarse classes (`groups[k]` = fine classes of coarse class k); keep fine labels.

    CIFAR-10 vehicles vs animals is `[[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]]`.
    """
    mapping = torch.full((dataset.num_classes,), -1, dtype=torch.int64)
    for coarse, fines in enumerate(groups):
        mapping[torch.tensor(fines)] = coarse
    if bool((mapping < 0).any()):
        raise UserError(f"coarse groups leave classes {torch.nonzero(mapping < 0).flatten().tolist()} out")

    def relabel(split: Split) -> Split:
        return Split(split.ids, split.inputs, mapping[split.labels], split.labels.clone())

    return replace(
        dataset,
        train=relabel(dataset.train),
        test=relabel(dataset.test),
        num_classes=len(groups),
        class_names=["+".join(dataset.class_names[f] for f in g) for g in groups],
        fingerprint=fingerprint_bytes(dataset.fingerprint.encode(), repr(groups).encode()),
        notes={**dataset.notes, "coarse_groups": groups},
    )


@dataclass
class PoisonTask:
    """SPEC.md section 6: a poisoned training set, the identified part, a triggered test set."""

    dataset: Dataset  # train split poisoned (trigger + target label)
    poisoned_ids: Tensor
    identified: ForgetSet
    triggered_test: Split  # test images whose true class != target, with the trigger
    clean_labels: Tensor  # true labels of the poisoned rows, in poisoned_ids order
    target: int


def add_trigger(inputs: Tensor, value: Tensor, size: int = 3) -> Tensor:
    """A size x size patch in the bottom-right corner set to `value` (per channel)."""
    out = inputs.clone()
    out[..., -size:, -size:] = value.view(-1, 1, 1)
    return out


def poison_task(
    dataset: Dataset,
    rate: float = 0.01,
    identified_fraction: float = 1.0,
    target: int = 0,
    seed: int = 0,
    patch: int = 3,
) -> PoisonTask:
    """Poison `rate` of the training rows (label -> target, trigger patch), all seeded.

    Training stamps the patch after augmentation (`Trigger`), as SPEC.md section 6 says. The
    trigger takes each channel's maximum pixel value; since normalisation is a per-channel
    increasing affine map, that is the maximum normalised value the papers use.
    """
    if dataset.input_kind != "image":
        raise UserError("the poison task needs image data")
    if not 0 < rate < 1:
        raise UserError(f"poison rate must be in (0, 1), got {rate}")
    if not 0 < identified_fraction <= 1:
        raise UserError(f"identified fraction must be in (0, 1], got {identified_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train = dataset.train
    n_poison = max(1, int(round(rate * len(train))))
    rows = torch.randperm(len(train), generator=generator)[:n_poison].sort().values
    channel_max = train.inputs.amax(dim=[0] + list(range(2, train.inputs.dim())))
    inputs, labels = train.inputs.clone(), train.labels.clone()
    clean_labels = labels[rows].clone()
    inputs[rows] = add_trigger(inputs[rows], channel_max, patch)
    labels[rows] = target
    n_identified = max(1, int(round(identified_fraction * n_poison)))
    identified_rows = rows[torch.randperm(n_poison, generator=generator)[:n_identified]].sort().values
    slot = torch.full((len(train),), -1, dtype=torch.int64)
    slot[rows] = torch.arange(n_poison)
    trigger = Trigger(slot, train.inputs[rows].clone(), channel_max, patch)
    poisoned = replace(
        dataset,
        train=Split(train.ids, inputs, labels, train.fine_labels, trigger),
        fingerprint=fingerprint_bytes(  # "stamped-last": the trigger follows augmentation
            dataset.fingerprint.encode(), f"poison/{rate}/{target}/{seed}/{patch}/stamped-last".encode()
        ),
        notes={**dataset.notes, "poison": {"rate": rate, "target": target, "seed": seed}},
    )
    test = dataset.test.where(dataset.test.labels != target)
    triggered = Split(test.ids, add_trigger(test.inputs, channel_max, patch), test.labels)
    identified = ForgetSet("poison:identified", "poison", train.ids[identified_rows])
    task = PoisonTask(poisoned, train.ids[rows], identified, triggered, clean_labels, target)
    poisoned.poison = task
    poisoned.notes["poison"].update(
        {"identified_fraction": identified_fraction, "poisoned": n_poison, "identified": n_identified}
    )
    return task
