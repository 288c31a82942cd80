"""Today's baselines (issue #14): SalUn, SCRUB, l1-sparse and NegGrad+ (docs/methods.md#todays-baselines).

Defaults are the authors' (their code and papers) unless docs/methods.md says otherwise; so are
the batch sizes written below (l1-sparse takes the request's, as `finetune` does).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearning.data import Split
from unlearning.errors import UserError
from unlearning.methods.baselines import wrong_labels
from unlearning.methods.registry import MethodOutput, register_method
from unlearning.methods.task import UnlearningTask
from unlearning.models import logits_of
from unlearning.training import TrainConfig, fit


def shuffled(split: Split, batch_size: int, seed: int, task: UnlearningTask):
    """Normalised mini-batches of `split` in a seeded random order, on the task's device."""
    for inputs, labels in split.batches(batch_size, shuffle=True, seed=seed, normalize=task.normalize):
        yield inputs.to(task.device), labels.to(task.device)


def steps_per_epoch(rows: int, batch_size: int) -> int:
    return -(-rows // batch_size)


# ------------------------------------------------------------------------------------ SalUn


def saliency_mask(model: nn.Module, task: UnlearningTask, share: float) -> dict[str, Tensor]:
    """True for the `share` of all trainable scalars with the largest |d/dθ Σ_{x∈D_f} CE(f(x), y)|.

    One ranking over the whole network (not per layer), as in the authors' code; the gradient
    is taken in eval mode. Ties are broken by position (a stable sort), so the mask repeats.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    was_training = model.training
    model.eval()
    for inputs, labels in task.batches(task.forget_split):
        inputs, labels = inputs.to(task.device), labels.to(task.device)
        loss = F.cross_entropy(logits_of(model(inputs)), labels, reduction="sum")
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads):
            if grad is not None:
                total[name] += grad
    model.train(was_training)
    saliency = torch.cat([g.abs().flatten() for g in total.values()])
    keep = torch.zeros(saliency.numel(), dtype=torch.bool, device=saliency.device)
    keep[torch.sort(saliency, descending=True, stable=True).indices[: int(share * saliency.numel())]] = True
    masks, start = {}, 0
    for name, p in params.items():
        masks[name] = keep[start : start + p.numel()].view_as(p)
        start += p.numel()
    return masks


@register_method("salun", own_loop=True, epochs=10, lr=0.013, mask_share=0.5)
def salun_method(task: UnlearningTask, epochs: int, lr: float, mask_share: float) -> MethodOutput:
    """SalUn: random-label fine-tuning on D_f + D_r that moves only the most forget-salient half of the weights."""
    model = copy.deepcopy(task.model).to(task.device)
    mask = saliency_mask(model, task, mask_share)
    original = {name: p.detach().clone() for name, p in model.named_parameters() if name in mask}
    generator = torch.Generator().manual_seed(task.seed)
    batch_size = 256

    def make_batches(epoch: int):
        # Fresh random labels every epoch (the authors draw them per batch), mixed with D_r.
        data = wrong_labels(task.forget_split, task.dataset.num_classes, generator).concat(task.retain_split)
        return data.batches(batch_size, shuffle=True, seed=task.seed * 1000 + epoch, normalize=task.normalize)

    def restore_unsalient(rows: int, loss: float) -> None:
        # After every step, weights outside the mask go back to the original bit for bit
        # (weight decay and momentum would otherwise move them).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in mask:
                    p.copy_(torch.where(mask[name], p, original[name]))

    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.9, weight_decay=5e-4, schedule="constant", seed=task.seed
    )
    steps = steps_per_epoch(len(task.forget_split) + len(task.retain_split), batch_size)
    fit(model, make_batches, steps, config, device=task.device, on_step=restore_unsalient)
    share = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    return MethodOutput(model.cpu(), {"epochs": epochs, "lr": lr, "mask_share": mask_share}, {"masked_share": share})


# ------------------------------------------------------------------------------------ SCRUB


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(p_teacher ‖ p_student) at temperature T, times T², averaged over the batch (Hinton's KD)."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
    ) * temperature**2


@dataclass(frozen=True)
class ScrubSetting:
    """One of the SCRUB authors' two settings (docs/methods.md#scrub)."""

    optimizer: str  # "sgd" (momentum 0.9) or "adam"
    lr: float
    weight_decay: float
    epochs: int  # SCRUB's "sgda epochs"
    max_epochs: int  # "msteps": the first epochs that also make a max-step pass over D_f
    temperature: float  # "kd_T"
    kl_weight: float  # α: weight of the KL to the teacher on D_r
    ce_weight: float  # γ: weight of the cross-entropy on D_r
    forget_batch: int
    retain_batch: int
    lr_decay_epochs: tuple[int, ...]  # lr × 0.1 after each of these epochs (1-based)


SCRUB_SETTINGS = {
    # the authors' large-scale notebook (CIFAR-10 / Lacuna-10, ResNet-18 and All-CNN)
    "large": ScrubSetting("sgd", 5e-4, 5e-4, 3, 2, 4.0, 0.001, 0.99, 512, 256, (3, 5, 9)),
    # the authors' small-scale notebook (CIFAR-5 / Lacuna-5, 125 training images per class)
    "small": ScrubSetting("adam", 5e-4, 0.1, 10, 3, 2.0, 0.5, 1.0, 64, 32, (5, 8, 9)),
}
SMALL_SCALE_ROWS = 5_000  # a training set at most this large gets the small-scale setting


def scrub_setting(task: UnlearningTask, setting: str | None) -> ScrubSetting:
    """The named setting, or by training-set size: small for digits-sized data, large for CIFAR-10."""
    if setting is None:
        setting = "small" if len(task.dataset.train) <= SMALL_SCALE_ROWS else "large"
    if setting not in SCRUB_SETTINGS:
        raise UserError(f"method 'scrub' parameter setting must be one of {', '.join(SCRUB_SETTINGS)}, got {setting!r}")
    return SCRUB_SETTINGS[setting]


@register_method(
    "scrub", own_loop=True, setting=None, epochs=None, max_epochs=None, lr=None, temperature=None,
    kl_weight=None, ce_weight=None,
)
def scrub_method(
    task: UnlearningTask, setting: str | None, epochs: int | None, max_epochs: int | None, lr: float | None,
    temperature: float | None, kl_weight: float | None, ce_weight: float | None,
) -> MethodOutput:
    """SCRUB: a student of the original moves away from it on D_f (max-steps) and stays close on D_r (min-steps)."""
    chosen = scrub_setting(task, setting)
    given = {"epochs": epochs, "max_epochs": max_epochs, "lr": lr, "temperature": temperature,
             "kl_weight": kl_weight, "ce_weight": ce_weight}
    s = replace(chosen, **{k: v for k, v in given.items() if v is not None})
    teacher = copy.deepcopy(task.model).to(task.device).eval()
    student = copy.deepcopy(task.model).to(task.device).train()
    if s.optimizer == "adam":
        optimizer = torch.optim.Adam(student.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    else:
        optimizer = torch.optim.SGD(student.parameters(), lr=s.lr, momentum=0.9, weight_decay=s.weight_decay)

    def step(loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for epoch in range(s.epochs):
        for group in optimizer.param_groups:
            group["lr"] = s.lr * 0.1 ** sum(epoch + 1 > e for e in s.lr_decay_epochs)
        if epoch < s.max_epochs:  # max-step: one pass over D_f, maximising the divergence
            for inputs, _ in shuffled(task.forget_split, s.forget_batch, task.seed * 1000 + epoch, task):
                with torch.no_grad():
                    teacher_logits = logits_of(teacher(inputs))
                step(-distill_kl(logits_of(student(inputs)), teacher_logits, s.temperature))
        for inputs, labels in shuffled(task.retain_split, s.retain_batch, task.seed * 1000 + 500 + epoch, task):
            with torch.no_grad():  # min-step
                teacher_logits = logits_of(teacher(inputs))
            logits = logits_of(student(inputs))
            kl = distill_kl(logits, teacher_logits, s.temperature)
            step(s.ce_weight * F.cross_entropy(logits, labels) + s.kl_weight * kl)
    optimizer.zero_grad(set_to_none=True)
    student.eval()
    name = setting or ("small" if chosen is SCRUB_SETTINGS["small"] else "large")
    return MethodOutput(student.cpu(), {"setting": name, **{k: getattr(s, k) for k in given}})


# ------------------------------------------------------------------------------ l1-sparse


@register_method("l1_sparse", own_loop=True, epochs=10, lr=0.01, gamma=5e-4)
def l1_sparse_method(task: UnlearningTask, epochs: int, lr: float, gamma: float) -> MethodOutput:
    """l1-sparse: fine-tune on D_r with a linearly decaying l1 penalty γ_e·‖θ‖₁ that sparsifies the weights."""
    model = copy.deepcopy(task.model).to(task.device)
    batch_size = task.batch_size  # the request's, as for `finetune` (the authors': 256)
    current = {"gamma": gamma}

    def make_batches(epoch: int):
        # `fit` asks for each epoch's batches before its first step: set that epoch's γ here.
        current["gamma"] = gamma * (1 - epoch / epochs)
        return task.retain_split.batches(batch_size, shuffle=True, seed=task.seed * 1000 + epoch, normalize=task.normalize)

    def loss_fn(logits: Tensor, labels: Tensor) -> Tensor:
        l1 = sum(p.abs().sum() for p in model.parameters() if p.requires_grad)
        return F.cross_entropy(logits, labels) + current["gamma"] * l1

    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.9, weight_decay=5e-4, schedule="constant", seed=task.seed
    )
    fit(model, make_batches, steps_per_epoch(len(task.retain_split), batch_size), config, loss_fn, device=task.device)
    return MethodOutput(model.cpu(), {"epochs": epochs, "lr": lr, "gamma": gamma})


# ------------------------------------------------------------------------------- NegGrad+


def endless(split: Split, batch_size: int, seed: int, task: UnlearningTask):
    """Shuffled mini-batches of `split` forever, a fresh order each pass."""
    for repeat in itertools.count():
        yield from shuffled(split, batch_size, seed + repeat, task)


@register_method("neggrad_plus", own_loop=True, epochs=10, lr=0.01, beta=0.95, target=None)
def neggrad_plus_method(task: UnlearningTask, epochs: int, lr: float, beta: float, target: float | None) -> MethodOutput:
    """NegGrad+: descend β·CE on D_r while ascending (1 - β)·CE on D_f; stops at the forget target."""
    target = task.search_target(target)
    model = copy.deepcopy(task.model).to(task.device)
    model.eval()  # as in the authors' loop: BatchNorm statistics stay, dropout is off
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    forget_batches = endless(task.forget_split, 64, task.seed * 1000 + 500_000, task)
    steps, reached = 0, False
    for epoch in range(epochs):  # an epoch is one pass over D_r; D_f is cycled alongside
        for (retain_x, retain_y), (forget_x, forget_y) in zip(
            shuffled(task.retain_split, 32, task.seed * 1000 + epoch, task), forget_batches
        ):
            forget_logits = logits_of(model(forget_x))
            retain_loss = F.cross_entropy(logits_of(model(retain_x)), retain_y)
            loss = beta * retain_loss - (1 - beta) * F.cross_entropy(forget_logits, forget_y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            # The ascent is unbounded: stop once D_f is forgotten as far as retraining would
            # (a batch at the target triggers the check over all of D_f).
            batch_acc = (forget_logits.argmax(1) == forget_y).double().mean().item()
            if batch_acc <= target and task.forget_accuracy(model, target) <= target:  # stops once past it
                reached = True
                break
        if reached:
            break
    optimizer.zero_grad(set_to_none=True)
    params = {"epochs": epochs, "lr": lr, "beta": beta, "target": target}
    return MethodOutput(model.cpu(), params, {"steps": steps, "reached": reached})
