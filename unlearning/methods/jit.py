"""JiT: zero-shot unlearning by Lipschitz smoothing around the forget samples (docs/methods.md#jit)."""

from __future__ import annotations

import copy
import math

import torch

from unlearning.checkpoint import model_meta
from unlearning.methods.registry import MethodOutput, register_method
from unlearning.methods.task import UnlearningTask
from unlearning.models import logits_of

# (sigma, lr) per request kind. The JiT paper gives the ViT values. For convolutional
# networks we take the JiT authors' own CNN settings (their VGG runs): at the ViT step sizes
# a BatchNorm CNN diverges to NaN weights (benchmarks/HISTORY.md). On the full-scale
# resnet_small even these diverge (benchmarks/RESULTS.md, "JiT's step size"; docs/implementation-notes.md).
JIT_DEFAULTS_VIT = {"class": (0.8, 1.5), "subclass": (1.5, 0.5), "random": (0.5, 0.1)}
JIT_DEFAULTS_CNN = {"class": (0.5, 3e-4), "subclass": (0.01, 3e-4), "random": (0.01, 3e-4)}


def jit_defaults(arch: str, kind: str) -> tuple[float, float]:
    """The paper's ViT defaults for ViTs, the authors' CNN ones otherwise; `ids` is `random`."""
    table = JIT_DEFAULTS_VIT if arch.rpartition(":")[2].startswith("vit") else JIT_DEFAULTS_CNN
    return table.get(kind, table["random"])


def lipschitz_ratio(outputs: torch.Tensor, noisy_outputs: torch.Tensor, inputs: torch.Tensor, noisy: torch.Tensor):
    """Per sample ||f(x) - f(x~)|| / ||x - x~|| (docs/methods.md#jit)."""
    output_change = (outputs - noisy_outputs).flatten(1).norm(dim=1)
    input_change = (inputs - noisy).flatten(1).norm(dim=1).clamp_min(1e-12)
    return output_change / input_change


@register_method("jit", own_loop=True, sigma=None, lr=None, copies=25, accumulate=True, trust=0.005)
def jit_method(
    task: UnlearningTask, sigma: float | None, lr: float | None, copies: int, accumulate: bool, trust: float
) -> MethodOutput:
    """JiT: one SGD pass over D_f that flattens the model around each forget sample.

    As in the authors' code, gradients accumulate across batches (`accumulate`; false zeroes
    them per batch). The whole pass moves the weights by at most `trust` x their norm: each of
    its B updates is capped at trust x ||theta_0|| / B (docs/methods.md#jit).
    """
    default_sigma, default_lr = jit_defaults(model_meta(task.model)["arch"], task.forget.kind)
    sigma = default_sigma if sigma is None else sigma
    lr = default_lr if lr is None else lr
    model = copy.deepcopy(task.model).to(task.device)
    model.eval()  # BatchNorm keeps its running statistics, as in the importance passes
    params = [p for p in model.parameters() if p.requires_grad]
    batches = math.ceil(len(task.forget_split) / task.batch_size)
    with torch.no_grad():
        budget = trust * float(torch.linalg.vector_norm(torch.stack([p.double().norm() for p in params]))) / batches
    generator = torch.Generator(device=task.device).manual_seed(task.seed)
    capped = steps = 0
    for inputs, _ in task.batches(task.forget_split):
        inputs = inputs.to(task.device)
        low, high = inputs.min(), inputs.max()
        outputs = logits_of(model(inputs))
        loss = 0.0
        for _ in range(copies):
            noise = torch.randn(inputs.shape, generator=generator, device=task.device, dtype=inputs.dtype)
            noisy = torch.clamp(inputs + sigma * noise, low, high)
            with torch.no_grad():  # the gradient flows through f(x) only, as in the authors' code
                noisy_outputs = logits_of(model(noisy))
            loss = loss + lipschitz_ratio(outputs, noisy_outputs, inputs, noisy).sum()
        if not accumulate:
            model.zero_grad(set_to_none=True)
        (loss / copies).backward()
        steps += 1
        capped += capped_step_(params, lr, budget)
    return MethodOutput(model.cpu(), {"sigma": sigma, "lr": lr, "copies": copies, "accumulate": accumulate,
                                      "trust": trust}, {"steps": steps, "capped_steps": capped})


@torch.no_grad()
def capped_step_(params: list[torch.Tensor], lr: float, max_norm: float) -> bool:
    """theta <- theta - eta' g with eta' = min(eta, max_norm / ||g||) (global norm): the update's
    norm is at most `max_norm`. True if the cap applied. A non-finite gradient changes nothing.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return False
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
    if not torch.isfinite(grad_norm) or grad_norm == 0:
        return False
    step = min(lr, max_norm / float(grad_norm))
    for p in params:
        if p.grad is not None:
            p.add_(p.grad, alpha=-step)
    return step < lr
