"""HyperForget: sample unlearned models from a diffusion hypernetwork (docs/methods.md#hyperforget)."""

from __future__ import annotations

import torch

from unlearning.checkpoint import model_meta
from unlearning.errors import UserError
from unlearning.methods.registry import MethodOutput, register_method
from unlearning.methods.task import UnlearningTask


def prompt_alignment(achieved: torch.Tensor, wanted: torch.Tensor) -> float:
    """G.pt's prompt alignment, R² of the achieved against the asked-for values, here over the
    classes' log-losses (a forgotten class's loss is orders of magnitude above the others')."""
    achieved, wanted = torch.log(achieved.double().clamp(min=1e-4)), torch.log(wanted.double().clamp(min=1e-4))
    spread = ((wanted - wanted.mean()) ** 2).sum()
    if float(spread) == 0.0:
        return float("nan")
    return float(1 - ((achieved - wanted) ** 2).sum() / spread)


def check_hypernet_fits(hypernet, model, path: str) -> None:
    meta = model_meta(model)
    count = sum(p.numel() for p in model.parameters())
    if hypernet.info.get("arch") != meta["arch"] or hypernet.info.get("parameters") != count:
        raise UserError(f"hypernetwork {path} samples {hypernet.info.get('arch')} networks of "
                        f"{hypernet.info.get('parameters')} parameters; the model is {meta['arch']} with {count}")
    if hypernet.num_classes != meta["num_classes"]:
        raise UserError(f"hypernetwork {path} knows {hypernet.num_classes} classes; the model has {meta['num_classes']}")


@register_method("hyperforget", hypernet=None, samples=4, retain_rows=2000, sample_steps=20, target=None)
def hyperforget_method(
    task: UnlearningTask, hypernet: str | None, samples: int, retain_rows: int, sample_steps: int,
    target: float | None,
) -> MethodOutput:
    """HyperForget: K models sampled for a high loss on the forgotten classes; the best one.

    The prompt asks for the loss the collection's runs without a class ended at on that class,
    and for the original's loss on every other class (both on the hypernetwork's probe rows).
    Each sample is scored on D_f and on `retain_rows` seeded retained rows; the least damaging
    one that meets the forget target wins (else the one that forgets most)."""
    from unlearning.hyperforget import class_losses, load_hypernet, with_parameters

    if hypernet is None:
        raise UserError("hyperforget needs a hypernetwork: --hypernet DIR (made by `unlearn hyperforget train`)")
    if task.forget.kind != "class":
        raise UserError(f"hyperforget forgets whole classes (class:K); this request is {task.forget.kind}")
    net = load_hypernet(hypernet)
    net.config.sample_steps = sample_steps  # DDIM steps: a request-time choice (20 = 50 on digits)
    check_hypernet_fits(net, task.model, hypernet)
    dataset = task.dataset
    probe = dataset.train.subset(torch.nonzero(torch.isin(dataset.train.ids, net.probe_ids), as_tuple=True)[0])
    classes = list(task.forget.classes)
    original_losses = class_losses(task.model, probe, task.normalize, net.num_classes)
    known = torch.isfinite(original_losses)
    original_losses = torch.where(known, original_losses, torch.exp(net.feature_mean.double()))
    wanted = net.prompt(original_losses, classes)
    seeds = [task.seed * 1000 + i for i in range(samples)]
    vectors = net.sample(wanted, seeds)
    goal = task.search_target(target)
    retain = task.retain_sample(retain_rows)
    finite = [(index, with_parameters(task.model, vector)) for index, vector in enumerate(vectors)]
    finite = [(index, model) for index, model in finite if all(bool(torch.isfinite(p).all()) for p in model.parameters())]
    models = [model for _, model in finite]
    # all samples in one outcome pass per split, wherever the executor runs it (Ray for large splits)
    on_forget = task.executor.outcomes(models, task.forget_split, task.normalize) if models else []
    on_retain = task.executor.outcomes(models, retain, task.normalize) if models else []
    candidates = [
        {"index": index, "model": model, "forget_acc": found_f.accuracy(task.forget_split.labels),
         "retain_acc": found_r.accuracy(retain.labels)}
        for (index, model), found_f, found_r in zip(finite, on_forget, on_retain)
    ]
    if not candidates:
        raise UserError(f"every sample of {hypernet} has non-finite weights; retrain the hypernetwork")
    meeting = [c for c in candidates if c["forget_acc"] <= goal + 1e-9]
    best = max(meeting, key=lambda c: c["retain_acc"]) if meeting else min(candidates, key=lambda c: c["forget_acc"])
    achieved = class_losses(best["model"], probe, task.normalize, net.num_classes)
    forget_accs = [c["forget_acc"] for c in candidates]
    retain_accs = [c["retain_acc"] for c in candidates]
    details = {
        "reached": bool(meeting), "chosen": best["index"], "samples": samples, "finite_samples": len(candidates),
        "prompt_losses": [float(x) for x in wanted], "achieved_losses": [float(x) for x in achieved],
        "prompt_alignment": prompt_alignment(achieved[known], wanted[known]),
        "sample_forget_acc": forget_accs, "sample_retain_acc": retain_accs,
        "spread": {"forget_acc": [min(forget_accs), max(forget_accs)], "retain_acc": [min(retain_accs), max(retain_accs)]},
    }
    return MethodOutput(best["model"].cpu(), {"hypernet": hypernet, "samples": samples, "target": goal}, details)
