"""In-memory data: a `Dataset` of two `Split`s, and the poison `Trigger` a split may carry.

A `Split` holds int64 `ids`, float32 `inputs` (images scaled to [0, 1] as CxHxW, or feature
vectors as they are) and int64 `labels`. Its inputs are a tensor, or a `RowInputs` that reads
them from their files by the block (`unlearning.data.rows`); everything here works on both. Normalisation is the model's business (its
checkpoint records mean and std) and is applied per batch by `Split.batches(...,
normalize=...)`. Where the rows come from is `unlearning.data.sources`' business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from unlearning.data.rows import READ_BLOCK_ROWS, add_trigger, channel_moments, is_lazy
from unlearning.errors import UserError

if TYPE_CHECKING:
    from unlearning.data.tasks import PoisonTask


@dataclass
class Trigger:
    """The poison task's patch (docs/methods.md#poison) on some rows of a split, re-stamped after augmentation.

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

    def clean_rows(self, slots: Tensor) -> Tensor:
        return take_inputs(self.clean, slots)

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

        if first is not None and second is not None and first.clean is second.clean:
            return Trigger(torch.cat([first.slot, second.slot]), first.clean, template.value, template.size)
        (slot_a, clean_a), (slot_b, clean_b) = parts(first, n_first), parts(second, n_second)
        slot_b = torch.where(slot_b >= 0, slot_b + len(clean_a), slot_b)
        return Trigger(torch.cat([slot_a, slot_b]), cat_inputs(clean_a, clean_b), template.value, template.size)


def seeded_sample(n: int, size: int, seed: int) -> Tensor:
    """At most `size` of range(n), drawn with `seed`, in ascending order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=generator)[:size]).values


@dataclass
class Split:
    ids: Tensor
    inputs: Tensor
    labels: Tensor
    fine_labels: Tensor | None = None
    trigger: Trigger | None = None  # set on a poisoned training split (docs/methods.md#poison)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Tensor) -> Split:
        fine = self.fine_labels[index] if self.fine_labels is not None else None
        trigger = self.trigger.subset(index) if self.trigger is not None else None
        inputs = self.inputs.view(index) if is_lazy(self.inputs) else self.inputs[index]
        return Split(self.ids[index], inputs, self.labels[index], fine, trigger)

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
            cat_inputs(self.inputs, other.inputs),
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
        for index, raw in self._row_batches(order, batch_size):
            if augment is None:
                yield normalize_batch(raw, normalize), self.labels[index]
                continue
            triggered = None
            if trigger is not None:
                slot = trigger.slot[index]
                if bool((slot >= 0).any()):
                    triggered = slot >= 0
                    raw = raw.clone()
                    raw[triggered] = trigger.clean_rows(slot[triggered])
            inputs = augment(normalize_batch(raw, normalize))
            if triggered is not None:
                inputs[triggered] = add_trigger(inputs[triggered], stamp, trigger.size)
            yield inputs, self.labels[index]

    def _row_batches(self, order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(row index, inputs) per batch; inputs in files are read a block of batches at a time."""
        step = batch_size * max(1, READ_BLOCK_ROWS // batch_size) if is_lazy(self.inputs) else batch_size
        for block_start in range(0, len(order), step):
            block = order[block_start : block_start + step]
            inputs = take_inputs(self.inputs, block)
            for start in range(0, len(block), batch_size):
                yield block[start : start + batch_size], inputs[start : start + batch_size]


def take_inputs(inputs, index: Tensor) -> Tensor:
    """Rows `index` of a tensor, or read from their files."""
    return inputs.read(index.numpy()) if is_lazy(inputs) else inputs[index]


def cat_inputs(first, second):
    if is_lazy(first) and is_lazy(second):
        return first.concat(second)
    if is_lazy(first) or is_lazy(second):
        return torch.cat([take_inputs(x, torch.arange(len(x))) for x in (first, second)])
    return torch.cat([first, second])


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
        if is_lazy(self.train.inputs):  # streamed over blocks of rows
            mean, std = channel_moments(self.train.inputs)
        else:
            dims = [0] + list(range(2, self.train.inputs.dim()))
            mean, std = self.train.inputs.mean(dim=dims), self.train.inputs.std(dim=dims)
        std = std.clamp_min(1e-6)
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
