"""Seeded training: original models, the `retrain` baseline and the fine-tuning baselines."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearning.data import Split
from unlearning.models import logits_of


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"  # "sgd" or "adam"
    schedule: str = "onecycle"  # "onecycle" or "constant"
    augment: bool = False  # random crop (pad 4) and horizontal flip, for 32x32 images
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# A sensible recipe per architecture; `unlearn train` starts from these.
DEFAULT_RECIPES = {
    "mlp": TrainConfig(epochs=30, lr=0.05),
    "small_cnn": TrainConfig(epochs=30, lr=0.05),
    "resnet_small": TrainConfig(epochs=8, batch_size=128, lr=0.2, augment=True),
    "torchvision:resnet18": TrainConfig(epochs=30, batch_size=128, lr=0.1, augment=True),
    "torchvision:vit_b_16": TrainConfig(epochs=10, batch_size=64, lr=1e-4, optimizer="adam", weight_decay=0.05),
}


def augment_batch(inputs: Tensor, generator: torch.Generator) -> Tensor:
    """Random 4-pixel-padded crop and horizontal flip, per sample."""
    n, _, height, width = inputs.shape
    padded = F.pad(inputs, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(height).view(1, height)).view(n, 1, height, 1)
    cols = (dx.view(n, 1) + torch.arange(width).view(1, width)).view(n, 1, 1, width)
    batch = torch.arange(n).view(n, 1, 1, 1)
    channels = torch.arange(inputs.shape[1]).view(1, -1, 1, 1)
    cropped = padded[batch, channels, rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(-1)
    return cropped


def make_optimizer(model: nn.Module, config: TrainConfig, steps: int):
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.momentum > 0,
        )
    if config.schedule == "onecycle" and steps > 0:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    else:
        scheduler = None
    return optimizer, scheduler


def fit(
    model: nn.Module,
    make_batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    steps_per_epoch: int,
    config: TrainConfig,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train `model` in place over `config.epochs` epochs of `make_batches(epoch)`."""
    torch.manual_seed(config.seed)
    model.to(device).train()
    optimizer, scheduler = make_optimizer(model, config, config.epochs * steps_per_epoch)
    for epoch in range(config.epochs):
        for inputs, labels in make_batches(epoch):
            inputs, labels = inputs.to(device), labels.to(device)
            loss = loss_fn(logits_of(model(inputs)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None and scheduler.last_epoch < scheduler.total_steps:
                scheduler.step()
            if on_step is not None:
                on_step(len(inputs), loss.item())
    optimizer.zero_grad(set_to_none=True)  # a trained model carries no stale .grad
    model.eval()
    return model


def train(
    model: nn.Module,
    split: Split,
    config: TrainConfig,
    normalize: dict | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Supervised training on `split`, seeded: same seed, same data -> same weights."""
    generator = torch.Generator().manual_seed(config.seed)
    use_augment = config.augment and split.inputs.dim() == 4 and split.inputs.shape[-1] >= 16

    def make_batches(epoch: int):
        return split.batches(
            config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch, normalize=normalize,
            augment=(lambda inputs: augment_batch(inputs, generator)) if use_augment else None,
        )

    steps = -(-len(split) // config.batch_size)
    return fit(model, make_batches, steps, config, device=device, on_step=on_step)
