"""JiT: zero-shot unlearning by Lipschitz smoothing around the forget samples (SPEC.md s.7)."""

from __future__ import annotations

import copy

import torch

from unlearning.methods import MethodOutput, UnlearningTask, register_method

# SPEC.md section 7 (ViT): full class, sub-class, random.
JIT_DEFAULTS = {"class": (0.8, 1.5), "subclass": (1.5, 0.5), "random": (0.5, 0.1), "ids": (0.5, 0.1)}


@register_method("jit", sigma=None, lr=None, copies=25)
def jit_method(task: UnlearningTask, sigma: float | None, lr: float | None, copies: int) -> MethodOutput:
    """JiT: one SGD pass over D_f that flattens the model around each forget sample."""
    default_sigma, default_lr = JIT_DEFAULTS.get(task.forget.kind, JIT_DEFAULTS["random"])
    sigma = default_sigma if sigma is None else sigma
    lr = default_lr if lr is None else lr
    model = copy.deepcopy(task.model).to(task.device)
    model.eval()  # BatchNorm keeps its running statistics, as in every other method here
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    for inputs, _ in task.batches(task.forget_split):
        inputs = inputs.to(task.device)
        low, high = inputs.min(), inputs.max()
        outputs = model(inputs)
        loss = 0.0
        for _ in range(copies):
            noisy = torch.clamp(inputs + sigma * torch.randn_like(inputs), low, high)
            output_change = (outputs - model(noisy)).flatten(1).norm(dim=1)
            input_change = (inputs - noisy).flatten(1).norm(dim=1).clamp_min(1e-12)
            loss = loss + (output_change / input_change).sum()
        optimizer.zero_grad(set_to_none=True)
        (loss / copies).backward()
        optimizer.step()
    return MethodOutput(model.cpu(), {"sigma": sigma, "lr": lr, "copies": copies})
