"""Parameter importance: the diagonal Fisher and its label-free cousins (docs/methods.md#importance).

Importance is carried as a sum plus a count (`ImportanceSums`) so that partial results from
shards, workers or halves of a data set combine exactly by addition; the mean is taken only
at the end. Sums are accumulated in float64 so that the order of additions (one process vs
several workers) changes the result by far less than 1e-6 relative.

kind      per-batch loss L_b                 accumulated per batch (or per sample)
fisher    mean CE(f(x), y)                   (dL_b/dtheta)^2
l2        mean ||f(x)||_2^2                  |dL_b/dtheta|
l2_norm   mean ||f(x)||_2                    |dL_b/dtheta|

mode `batch` is the papers' reference: one gradient per mini-batch, mean over batches.
mode `per_sample` is exact: one gradient per sample, mean over samples. For models made of
Linear, Conv1d/2d and normalisation layers they come from one hooked batch backward
(per_sample.py, about a batch backward's cost); any other model goes through torch.func.vmap.

Per-sample gradients are tens of MB a chunk; `heap.keep_freed_memory` keeps glibc from handing them
back to the OS after every chunk (docs/implementation-notes.md#per-sample-gradients-and-the-allocator).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from unlearning.errors import UserError
from unlearning.heap import HEAP_BLOCK_BYTES, keep_freed_memory
from unlearning.models import logits_of
from unlearning.per_sample import LayerwisePerSample

KINDS = ("fisher", "l2", "l2_norm")
MODES = ("batch", "per_sample")


def _loss(kind: str, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """The batch loss of `kind`: the mean of the per-sample losses, or their sum."""
    if kind == "fisher":
        return F.cross_entropy(logits, labels, reduction=reduction)
    per_sample = logits.pow(2).sum(dim=1) if kind == "l2" else logits.norm(p=2, dim=1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def _accumulate(kind: str, gradient: Tensor, in_place: bool = False) -> Tensor:
    if kind == "fisher":
        return gradient.square_() if in_place else gradient.pow(2)
    return gradient.abs_() if in_place else gradient.abs()


@dataclass
class ImportanceSums:
    """Sum of per-batch (or per-sample) importance and how many terms it holds."""

    sums: dict[str, Tensor]
    count: int
    kind: str
    mode: str
    num_samples: int = 0
    batch_size: int | None = None
    meta: dict = field(default_factory=dict)

    def __add__(self, other: ImportanceSums) -> ImportanceSums:
        if (self.kind, self.mode) != (other.kind, other.mode):
            raise ValueError("cannot add importances of different kind or mode")
        if self.sums.keys() != other.sums.keys():
            raise ValueError("cannot add importances over different parameters")
        return ImportanceSums(
            sums={name: self.sums[name] + other.sums[name] for name in self.sums},
            count=self.count + other.count,
            kind=self.kind,
            mode=self.mode,
            num_samples=self.num_samples + other.num_samples,
            batch_size=self.batch_size,
        )

    def mean(self) -> dict[str, Tensor]:
        """The importance itself: sums divided by the count, as float32."""
        if self.count == 0:
            raise UserError("importance over an empty data set: no batches were seen")
        return {name: (total / self.count).float() for name, total in self.sums.items()}


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def empty_sums(model: nn.Module, kind: str, mode: str, batch_size: int | None = None) -> ImportanceSums:
    sums = {
        name: torch.zeros_like(p, dtype=torch.float64)
        for name, p in trainable_parameters(model).items()
    }
    return ImportanceSums(sums=sums, count=0, kind=kind, mode=mode, batch_size=batch_size)


def _check(kind: str, mode: str) -> None:
    if kind not in KINDS:
        raise UserError(f"importance kind {kind!r} is not one of {', '.join(KINDS)}")
    if mode not in MODES:
        raise UserError(f"importance mode {mode!r} is not one of {', '.join(MODES)}")


def compute_importance_sums(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    kind: str = "fisher",
    mode: str = "batch",
    device: torch.device | str | None = None,
    per_sample_chunk: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ImportanceSums:
    """Partial importance over `batches` as (sum, count); the model is left as it was.

    `per_sample_chunk` samples share one vmap call in per_sample mode when the model needs vmap
    (None: as many as both `per_sample_chunk_size` and `heap_chunk_size` allow for this model);
    the layer-wise path sizes its own chunks, per layer.

    The model is put in eval mode for the pass (BatchNorm uses running statistics) and its
    training flag is restored afterwards; gradients are taken with autograd.grad / torch.func,
    so no `.grad` attribute of the model is touched.
    """
    _check(kind, mode)
    keep_freed_memory()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        result = empty_sums(model, kind, mode)
        result.sums = {name: s.to(device) for name, s in result.sums.items()}
        step = _batch_step if mode == "batch" else _per_sample_stepper(model)
        per_sample_chunk = per_sample_chunk or min(per_sample_chunk_size(model), heap_chunk_size(model))
        for inputs, labels in batches:
            inputs, labels = inputs.to(device), labels.to(device).long()
            if len(inputs) == 0:
                continue
            step(model, kind, inputs, labels, result, per_sample_chunk)
            result.num_samples += len(inputs)
            if result.batch_size is None:
                result.batch_size = len(inputs)
            if on_batch is not None:
                on_batch(len(inputs))
        result.sums = {name: s.cpu() for name, s in result.sums.items()}
        return result
    finally:
        model.train(was_training)


PER_SAMPLE_BUDGET_BYTES = 1 << 30  # per-sample gradients held at once, per process
MAX_PER_SAMPLE_CHUNK = 64


def per_sample_chunk_size(model: nn.Module, budget_bytes: int = PER_SAMPLE_BUDGET_BYTES) -> int:
    """Samples per vmap call whose gradients fit in `budget_bytes`: each holds a float32 copy
    of every trainable parameter, and vmap's intermediates about two more; at most 64.

    64 for the small CNNs here; 1 for ViT-B/16 (86 M parameters: 64 would need ~22 GB).
    """
    parameters = sum(p.numel() for p in trainable_parameters(model).values())
    return max(1, min(MAX_PER_SAMPLE_CHUNK, budget_bytes // (3 * 4 * max(parameters, 1))))


def heap_chunk_size(model: nn.Module) -> int:
    """Samples per vmap call whose largest block (the `.double()` copy of the largest
    parameter's per-sample terms: chunk x its size x 8 bytes) stays below `HEAP_BLOCK_BYTES`,
    so that malloc serves every block of a chunk from a heap it keeps; at least 1.

    28 for resnet_small width 16 (largest parameter 128x128x3x3); 127 for small_cnn on digits.
    """
    largest = max((p.numel() for p in trainable_parameters(model).values()), default=1)
    return max(1, (HEAP_BLOCK_BYTES - 1) // (8 * largest))


def _batch_step(model, kind, inputs, labels, result, _chunk) -> None:
    params = trainable_parameters(model)
    loss = _loss(kind, logits_of(model(inputs)), labels)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    for name, gradient in zip(params, grads):
        if gradient is not None:
            result.sums[name] += _accumulate(kind, gradient).double()
    result.count += 1


def _per_sample_stepper(model: nn.Module):
    """The per-sample step for `model` (in eval mode): layer-wise when its layers allow it, else
    vmap; decided once per pass, and for the rest of it as soon as a batch needs vmap (a layer
    ran twice in the forward pass)."""
    layerwise = LayerwisePerSample.of(model)

    def step(model, kind, inputs, labels, result, chunk) -> None:
        nonlocal layerwise
        if layerwise is not None and layerwise.step(
            inputs, lambda logits: _loss(kind, logits, labels, "sum"),
            lambda g: _accumulate(kind, g, in_place=True), result.sums,
        ):
            result.count += len(inputs)
            return
        layerwise = None
        _vmap_per_sample_step(model, kind, inputs, labels, result, chunk)

    return step


def _vmap_per_sample_step(model, kind, inputs, labels, result, chunk) -> None:
    params = {name: p.detach() for name, p in trainable_parameters(model).items()}
    buffers = dict(model.named_buffers())

    def one_sample_loss(parameters, x, y):
        logits = logits_of(functional_call(model, (parameters, buffers), (x.unsqueeze(0),)))
        return _loss(kind, logits, y.unsqueeze(0))

    per_sample_grad = vmap(grad(one_sample_loss), in_dims=(None, 0, 0))
    for start in range(0, len(inputs), chunk):
        grads = per_sample_grad(params, inputs[start : start + chunk], labels[start : start + chunk])
        for name, gradient in grads.items():
            result.sums[name] += _accumulate(kind, gradient).double().sum(dim=0)
    result.count += len(inputs)


def compute_importance(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], kind: str = "fisher",
                       mode: str = "batch", device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Importance of every trainable parameter over `batches`: {parameter name: tensor}."""
    return compute_importance_sums(model, batches, kind=kind, mode=mode, device=device).mean()
