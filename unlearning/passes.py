"""The passes over data a deletion request makes, and an executor that runs them here.

A request reads its rows in two kinds of pass, and in no other way:
- importance: `compute_importance_sums` over a split's batches -> `ImportanceSums`;
- outcomes: for each of several models, every row's predicted class and softmax entropy
  (`Outcomes`), from which accuracies, per-class accuracies, the MIA, the attack success rate
  and the healed share all follow (`unlearning.evaluation`).

An executor runs them. `LocalExecutor` runs them in this process, rows streamed a block at a
time from where they live; `pipelines.distributed.RayExecutor` runs the same functions on Ray
workers for large splits. Both give the same numbers, so a request's answer does not depend on
where it ran (docs/implementation-notes.md, "One code path, two executors").

Outcome passes run in the request's inference precision: float32 by default, or bfloat16
autocast (`precision="bf16"`, ~2x faster for convolutions on CPUs with BF16 units and on GPUs);
importance passes are float32 always (docs/implementation-notes.md, "Inference precision").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from unlearning.data import Split
from unlearning.data.rows import is_lazy
from unlearning.heap import rows_per_forward
from unlearning.importance import ImportanceSums, compute_importance_sums
from unlearning.metrics import EVAL_BATCH, accuracy_of, entropy
from unlearning.models import logits_of
from unlearning.training import autocast_for, check_precision

LOCAL_CACHE_BYTES = 256 << 20  # decoded rows of small splits kept between passes, per process
SETTLE_ROWS = 64  # rows per forward of a pass that may stop early (`rows_right`): how soon it can stop


@dataclass
class Outcomes:
    """One model's result on each row of a split: predicted class and softmax entropy."""

    pred: Tensor  # int64
    entropy: Tensor  # float64; NaN where the logits are not finite

    def __len__(self) -> int:
        return len(self.pred)

    def select(self, index) -> Outcomes:
        return Outcomes(self.pred[index], self.entropy[index])

    def accuracy(self, labels: Tensor) -> float:
        return accuracy_of(self.pred, labels)

    @staticmethod
    def concat(parts: Sequence[Outcomes]) -> Outcomes:
        if not parts:
            return Outcomes(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float64))
        return Outcomes(torch.cat([p.pred for p in parts]), torch.cat([p.entropy for p in parts]))


def outcomes_of_logits(logits: Tensor) -> Outcomes:
    logits = logits.float()
    scores = entropy(logits)
    finite = torch.isfinite(logits).all(dim=1)
    return Outcomes(logits.argmax(dim=1).cpu(), torch.where(finite, scores, torch.nan).cpu())


@contextmanager
def _evaluating(models: Sequence[nn.Module]):
    """The models in eval mode, their training flags restored afterwards."""
    flags = [m.training for m in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, flag in zip(models, flags):
            model.train(flag)


def _forwards(model: nn.Module, rows: Tensor, size: int, precision: str):
    """`model`'s logits over `rows`, `size` rows a forward, each forward in `precision`."""
    for part in rows.split(size):
        with autocast_for(precision, rows.device):
            yield logits_of(model(part))


@torch.no_grad()
def predict_outcomes(models: Sequence[nn.Module], batches: Iterable[tuple[Tensor, Tensor]], device=None,
                     precision: str = "fp32") -> list[Outcomes]:
    """Each model's `Outcomes` over `batches` (eval mode; training flags restored), its forward
    passes in `precision` (`PRECISIONS`); entropies are computed from float32 logits either way."""
    parts: list[list[Outcomes]] = [[] for _ in models]
    sizes: dict[int, int] = {}  # rows per forward, per model, measured on its first rows
    with _evaluating(models):
        for inputs, _ in batches:
            for i, (model, found) in enumerate(zip(models, parts)):
                rows = inputs.to(device or next(model.parameters()).device)
                if i not in sizes and len(rows):
                    sizes[i] = rows_per_forward(model, rows, EVAL_BATCH)
                found.extend(outcomes_of_logits(logits) for logits in _forwards(model, rows, sizes.get(i, EVAL_BATCH),
                                                                                  precision))
    return [Outcomes.concat(found) for found in parts]


@torch.no_grad()
def rows_right(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], allowed: int | None = None, device=None,
               precision: str = "fp32") -> tuple[int, int]:
    """(rows of `batches` that `model` predicts right, rows read): with `allowed`, the pass stops
    after the forward (of at most `SETTLE_ROWS` rows) that brings the count past `allowed`, the
    count then a lower bound if rows were left. A PTN step that misses its target is settled
    this way without reading the rest of D_f. Predictions as in `predict_outcomes`."""
    right, read, size = 0, 0, None
    with _evaluating([model]):
        for inputs, labels in batches:
            rows = inputs.to(device or next(model.parameters()).device)
            if size is None and len(rows):
                size = min(SETTLE_ROWS, rows_per_forward(model, rows, EVAL_BATCH))
            for logits, truth in zip(_forwards(model, rows, size or SETTLE_ROWS, precision),
                                     labels.split(size or SETTLE_ROWS)):
                right += int((logits.float().argmax(dim=1).cpu() == truth.cpu()).sum())
                read += len(truth)
                if allowed is not None and right > allowed:
                    return right, read
    return right, read


class LocalExecutor:
    """Every pass in this process; rows stream from where they live a block at a time.

    The decoded rows of a split kept in files are cached between passes while they fit in
    `cache_bytes` (a search evaluates the forget set once per step); larger splits are read
    again each time, so this process never holds more than that many bytes of rows.
    Outcome passes run in `precision` (module docstring).
    """

    def __init__(self, device: str | torch.device = "cpu", cache_bytes: int = LOCAL_CACHE_BYTES,
                 precision: str = "fp32"):
        self.device = torch.device(device)
        self.cache_bytes = cache_bytes
        self.precision = check_precision(precision)
        self._cached: dict[int, tuple] = {}  # id(inputs) -> (split, batches, normalize, bytes)

    def outcomes(self, models: Sequence[nn.Module], split: Split, normalize: dict | None) -> list[Outcomes]:
        return predict_outcomes(models, self._eval_batches(split, normalize), self.device, self.precision)

    def rows_right(self, model: nn.Module, split: Split, normalize: dict | None,
                   allowed: int | None = None) -> tuple[int, int]:
        """(`model`'s rows right on `split`, rows read), stopping once past `allowed` (`rows_right`)."""
        return rows_right(model, self._eval_batches(split, normalize), allowed, self.device, self.precision)

    def importance(self, model: nn.Module, split: Split, kind: str, mode: str, batch_size: int,
                   normalize: dict | None, shuffle: bool = False, seed: int = 0) -> ImportanceSums:
        batches = split.batches(batch_size, shuffle=shuffle, seed=seed, normalize=normalize)
        return compute_importance_sums(model, batches, kind=kind, mode=mode, device=self.device)

    def _eval_batches(self, split: Split, normalize: dict | None):
        if not is_lazy(split.inputs):
            return split.batches(EVAL_BATCH, normalize=normalize)
        key = id(split.inputs)
        cached = self._cached.get(key)
        if cached is not None and cached[0] is split and cached[2] == normalize:
            return cached[1]
        batches = split.batches(EVAL_BATCH, normalize=normalize)
        size = len(split) * int(np.prod(split.inputs.row_shape)) * 4
        if size <= self.cache_bytes - sum(c[3] for c in self._cached.values()):
            batches = list(batches)
            self._cached[key] = (split, batches, normalize, size)
        return batches

    def close(self) -> None:
        self._cached.clear()
