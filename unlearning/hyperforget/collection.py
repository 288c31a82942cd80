"""HyperForget's training data: checkpoints of many training runs of the target network, some
leaving classes out, each labelled with its per-class losses (docs/methods.md#hyperforget).

Every run starts from the original's initialisation (its recipe's seed) and follows its recipe
with its own batch order; run i leaves out `plan_runs`'s classes. A snapshot (all parameters,
flattened, and the mean cross-entropy of each class on a fixed probe of training rows) is taken
every `every` optimiser steps and at the end. Pure PyTorch: pipelines.hyperforget runs the runs
as Ray tasks and writes them as Parquet shards.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearning.data import Dataset, Split
from unlearning.metrics import predict_logits

PROBE_PER_CLASS = 64


@dataclass(frozen=True)
class RunPlan:
    index: int
    seed: int  # the batch order's; the initialisation is the original's
    left_out: tuple[int, ...]


def plan_runs(num_classes: int, runs: int, seed: int = 0) -> list[RunPlan]:
    """Runs on every class and runs leaving out one class, in turn; from the second round on,
    the leave-out runs drop a second class too, so the collection also covers requests for
    several classes."""
    plans = []
    for index in range(runs):
        round_, slot = divmod(index, num_classes + 1)
        if slot == 0:
            left: tuple[int, ...] = ()
        elif round_ % 2 == 0:
            left = (slot - 1,)
        else:
            left = tuple(sorted({slot - 1, (slot - 1 + round_) % num_classes}))
        plans.append(RunPlan(index, seed * 100_003 + index, left))
    return plans


def flatten(model: nn.Module) -> Tensor:
    """All parameters, in `named_parameters` order, as one float32 vector."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def with_parameters(model: nn.Module, vector: Tensor) -> nn.Module:
    """A copy of `model` whose parameters are `vector` (buffers stay the model's)."""
    import copy

    clone = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(vector.to(next(clone.parameters()).dtype), clone.parameters())
    return clone


def probe_rows(dataset: Dataset, per_class: int = PROBE_PER_CLASS, seed: int = 0) -> Tensor:
    """Ids of up to `per_class` seeded training rows of each class: every snapshot's losses are
    measured on these rows."""
    generator = torch.Generator().manual_seed(seed)
    labels = dataset.train.labels
    picked = []
    for k in range(dataset.num_classes):
        rows = torch.nonzero(labels == k, as_tuple=True)[0]
        picked.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    return dataset.train.ids[torch.sort(torch.cat(picked)).values]


def class_losses(model: nn.Module, probe: Split, normalize: dict | None, num_classes: int) -> Tensor:
    """Mean cross-entropy of each class's probe rows (NaN for a class without rows), float64."""
    losses = F.cross_entropy(predict_logits(model, probe, normalize).double(), probe.labels, reduction="none")
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, probe.labels, losses)
    counts = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, probe.labels, torch.ones_like(losses))
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)


def collect_run(original: nn.Module, dataset: Dataset, plan: RunPlan, config, probe: Split, every: int,
                device: str | torch.device = "cpu") -> list[dict]:
    """One run's snapshots: [{"step", "params" (float32), "losses" (per class, float64)}]."""
    from unlearning.checkpoint import model_meta
    from unlearning.training import fresh_like, train

    normalize = model_meta(original).get("normalize")
    model = fresh_like(original, config.seed)  # the original's initialisation
    kept = ~torch.isin(dataset.train.labels, torch.tensor(plan.left_out, dtype=torch.int64))
    snapshots: list[dict] = []
    steps = {"done": 0}

    def snapshot() -> None:
        snapshots.append({"step": steps["done"], "params": flatten(model),
                          "losses": class_losses(model, probe, normalize, dataset.num_classes)})

    def on_step(_rows: int, _loss: float) -> None:
        steps["done"] += 1
        if steps["done"] % every == 0:
            snapshot()

    # batch order from the run's seed; the initialisation above from the original's
    train(model, dataset.train.where(kept), replace(config, seed=plan.seed), normalize, device=device,
          on_step=on_step)
    if not snapshots or snapshots[-1]["step"] != steps["done"]:
        snapshot()
    model.eval()
    return snapshots
