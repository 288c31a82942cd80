"""Benchmark tasks as data-spec modifiers, all seeded and reproducible.

`DATA+poison:rate=0.01,identified=0.2,seed=0,target=0` poisons a share of the training rows
(docs/methods.md#benchmark-tasks); `DATA+coarse:0,1,8,9/2,3,4,5,6,7` relabels to coarse
classes and keeps the fine labels for `subclass:K` requests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from unlearning.data.containers import Dataset, Split, Trigger, add_trigger
from unlearning.data.forget import ForgetSet
from unlearning.data.rows import Stamp, channel_extremes, is_lazy
from unlearning.data.sources import fingerprint_bytes
from unlearning.errors import UserError


def apply_modifier(dataset: Dataset, modifier: str, spec: str) -> Dataset:
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
    """docs/methods.md#poison: a poisoned training set, the identified part, a triggered test set."""

    dataset: Dataset  # train split poisoned (trigger + target label)
    poisoned_ids: Tensor
    identified: ForgetSet
    triggered_test: Split  # test images whose true class != target, with the trigger
    clean_labels: Tensor  # true labels of the poisoned rows, in poisoned_ids order
    target: int


def poison_task(
    dataset: Dataset,
    rate: float = 0.01,
    identified_fraction: float = 1.0,
    target: int = 0,
    seed: int = 0,
    patch: int = 3,
) -> PoisonTask:
    """Poison `rate` of the training rows (label -> target, trigger patch), all seeded.

    Training stamps the patch after augmentation (`Trigger`), as docs/methods.md#poison says. The
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
    clean_labels = train.labels[rows].clone()
    labels = train.labels.clone()
    labels[rows] = target
    if is_lazy(train.inputs):  # stamped as rows are decoded, wherever that happens
        channel_max = channel_extremes(train.inputs)
        value = tuple(channel_max.tolist())
        poisoned_rows = np.sort(train.inputs.file_rows()[rows.numpy()])
        inputs = replace(train.inputs, stamp=Stamp(value, patch, poisoned_rows))
        clean = train.inputs.view(rows)
    else:
        channel_max = train.inputs.amax(dim=[0] + list(range(2, train.inputs.dim())))
        inputs = train.inputs.clone()
        inputs[rows] = add_trigger(inputs[rows], channel_max, patch)
        clean = train.inputs[rows].clone()
    n_identified = max(1, int(round(identified_fraction * n_poison)))
    identified_rows = rows[torch.randperm(n_poison, generator=generator)[:n_identified]].sort().values
    slot = torch.full((len(train),), -1, dtype=torch.int64)
    slot[rows] = torch.arange(n_poison)
    trigger = Trigger(slot, clean, channel_max, patch)
    poisoned = replace(
        dataset,
        train=Split(train.ids, inputs, labels, train.fine_labels, trigger),
        fingerprint=fingerprint_bytes(  # "stamped-last": the trigger follows augmentation
            dataset.fingerprint.encode(), f"poison/{rate}/{target}/{seed}/{patch}/stamped-last".encode()
        ),
        notes={**dataset.notes, "poison": {"rate": rate, "target": target, "seed": seed}},
    )
    test = dataset.test.where(dataset.test.labels != target)
    if is_lazy(test.inputs):
        triggered_inputs = replace(test.inputs, stamp=Stamp(tuple(channel_max.tolist()), patch))
    else:
        triggered_inputs = add_trigger(test.inputs, channel_max, patch)
    triggered = Split(test.ids, triggered_inputs, test.labels)
    identified = ForgetSet("poison:identified", "poison", train.ids[identified_rows])
    task = PoisonTask(poisoned, train.ids[rows], identified, triggered, clean_labels, target)
    poisoned.poison = task
    poisoned.notes["poison"].update(
        {"identified_fraction": identified_fraction, "poisoned": n_poison, "identified": n_identified}
    )
    return task
