"""The baselines of the SSD paper's comparisons (docs/methods.md#baselines)."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn.functional as F

from unlearning.checkpoint import model_meta, new_model
from unlearning.data import Split
from unlearning.errors import UserError
from unlearning.methods.registry import MethodOutput, register_method
from unlearning.methods.task import UnlearningTask
from unlearning.models import logits_of
from unlearning.training import TrainConfig, fresh_like, train


def wrong_labels(split: Split, num_classes: int, generator: torch.Generator) -> Split:
    """`split` with every label replaced by a uniformly random *other* class: (y + u) mod C."""
    shift = torch.randint(1, num_classes, (len(split),), generator=generator)
    return replace(split, labels=(split.labels + shift) % num_classes)


@register_method("retrain", own_loop=True, epochs=None)
def retrain_method(task: UnlearningTask, epochs: int | None) -> MethodOutput:
    """Retrain from scratch on D_r with the original recipe (the gold standard)."""
    if task.train_config is None:
        raise UserError("retrain needs the original training recipe; the checkpoint has none")
    config = task.train_config if epochs is None else replace(task.train_config, epochs=epochs)
    model = fresh_like(task.model, config.seed)
    train(model, task.retain_split, config, task.normalize, device=task.device)
    return MethodOutput(model.cpu(), {"epochs": config.epochs, "seed": config.seed})


@register_method("finetune", own_loop=True, epochs=5, lr=0.02)
def finetune_method(task: UnlearningTask, epochs: int, lr: float) -> MethodOutput:
    """Fine-tune on D_r only (SGD, momentum 0.9) and let the forget set fade."""
    model = copy.deepcopy(task.model)
    config = TrainConfig(epochs=epochs, batch_size=task.batch_size, lr=lr, schedule="constant", seed=task.seed)
    train(model, task.retain_split, config, task.normalize, device=task.device)
    return MethodOutput(model.cpu(), {"epochs": epochs, "lr": lr})


@register_method("amnesiac", own_loop=True, epochs=3, lr=1e-4)
def amnesiac_method(task: UnlearningTask, epochs: int, lr: float) -> MethodOutput:
    """Relabel D_f with random wrong labels, train on it mixed with D_r (Adam)."""
    generator = torch.Generator().manual_seed(task.seed)
    wrong = wrong_labels(task.forget_split, task.dataset.num_classes, generator)
    mixed = task.retain_split.concat(wrong)
    model = copy.deepcopy(task.model)
    config = TrainConfig(
        epochs=epochs, batch_size=128, lr=lr, optimizer="adam", weight_decay=0.0,
        schedule="constant", seed=task.seed,
    )
    train(model, mixed, config, task.normalize, device=task.device)
    return MethodOutput(model.cpu(), {"epochs": epochs, "lr": lr})


@register_method("bad_teacher", own_loop=True, epochs=1, lr=1e-4, retain_share=0.3, temperature=1.0)
def bad_teacher_method(
    task: UnlearningTask, epochs: int, lr: float, retain_share: float, temperature: float
) -> MethodOutput:
    """Distil from the original on 30 % of D_r and from a random network on D_f (KL, Adam)."""
    meta = model_meta(task.model)
    generator = torch.Generator().manual_seed(task.seed)
    competent = copy.deepcopy(task.model).to(task.device).eval()
    incompetent = new_model(
        meta["arch"], meta["num_classes"], tuple(meta["input_shape"]), seed=task.seed + 1,
        **meta.get("arch_args", {}),
    ).to(task.device).eval()
    retain = task.retain_split
    chosen = torch.randperm(len(retain), generator=generator)[: int(retain_share * len(retain))]
    kept = retain.subset(chosen)
    forget = task.forget_split
    # label 1 = "forget": follow the incompetent teacher; 0 = "retain": the competent one.
    data = replace(kept, labels=torch.zeros(len(kept), dtype=torch.int64)).concat(
        replace(forget, labels=torch.ones(len(forget), dtype=torch.int64)))  # rows in memory or in files
    student = copy.deepcopy(task.model).to(task.device).train()
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    for epoch in range(epochs):
        batches = data.batches(256, shuffle=True, seed=task.seed + epoch, normalize=task.normalize)
        for inputs, is_forget in batches:
            inputs, is_forget = inputs.to(task.device), is_forget.to(task.device).bool()
            with torch.no_grad():
                teacher = torch.where(is_forget.view(-1, 1), logits_of(incompetent(inputs)), logits_of(competent(inputs)))
            loss = F.kl_div(
                F.log_softmax(logits_of(student(inputs)) / temperature, dim=1),
                F.softmax(teacher / temperature, dim=1),
                reduction="batchmean",
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    student.eval()
    return MethodOutput(student.cpu(), {"epochs": epochs, "lr": lr, "retain_share": retain_share})
