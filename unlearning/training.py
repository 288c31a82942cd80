"""Seeded training: original models, the `retrain` baseline and the fine-tuning baselines."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

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
    label_smoothing: float = 0.0
    precision: str = "fp32"  # "fp32", or "bf16": autocast matmuls and convolutions to bfloat16
    channels_last: bool = False  # NHWC memory layout for convolutions while training

    def __post_init__(self):
        check_precision(self.precision)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")

    def to_dict(self) -> dict:
        """The recipe as JSON; the fields added after the first release are written only when
        they differ from their defaults, so that older recipes keep their fingerprints."""
        data = asdict(self)
        for field in fields(self):
            if field.name in LATER_FIELDS and data[field.name] == field.default:
                del data[field.name]
        return data


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    """`precision` if it is one of `PRECISIONS`, else a ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


LATER_FIELDS = ("label_smoothing", "precision", "channels_last")


# A sensible recipe per architecture; `unlearn train` starts from these.
DEFAULT_RECIPES = {
    "mlp": TrainConfig(epochs=30, lr=0.05),
    "small_cnn": TrainConfig(epochs=30, lr=0.05),
    "resnet_small": TrainConfig(epochs=8, batch_size=128, lr=0.2, augment=True),
    "torchvision:resnet18": TrainConfig(epochs=30, batch_size=128, lr=0.1, augment=True, label_smoothing=0.1),
    "torchvision:vit_b_16": TrainConfig(epochs=10, batch_size=64, lr=1e-4, optimizer="adam", weight_decay=0.05),
}


def fresh_like(model: nn.Module, seed: int) -> nn.Module:
    """A freshly initialised network of `model`'s architecture (same classes, input, normalisation)."""
    from unlearning.checkpoint import model_meta, new_model

    meta = model_meta(model)
    return new_model(meta["arch"], meta["num_classes"], tuple(meta["input_shape"]), meta.get("normalize"),
                     seed=seed, **meta.get("arch_args", {}))


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


def autocast(config: TrainConfig, device: torch.device | str):
    """bfloat16 autocast when the recipe asks for it (CPUs with AMX/AVX-512 BF16 and GPUs run
    convolutions 2-3x faster); the weights and the optimiser stay in float32."""
    return autocast_for(config.precision, device)


def autocast_for(precision: str, device: torch.device | str):
    """The autocast context of `precision` ("fp32": none) on `device`'s type."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fit(
    model: nn.Module,
    make_batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    steps_per_epoch: int,
    config: TrainConfig,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    resume: str | os.PathLike | None = None,
    rng: torch.Generator | None = None,
) -> nn.Module:
    """Train `model` in place over `config.epochs` epochs of `make_batches(epoch)`.

    With `resume`, the training state (weights, optimiser, schedule, `rng` and torch's RNG)
    is written there after every epoch and read back on the next call, so a killed run goes
    on from its last finished epoch to the same weights; the file is removed at the end."""
    loss_fn = loss_fn or functools.partial(F.cross_entropy, label_smoothing=config.label_smoothing)
    torch.manual_seed(config.seed)
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device).train()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(model, config, config.epochs * steps_per_epoch)
    first = load_training_state(resume, model, optimizer, scheduler, rng) if resume else 0
    for epoch in range(first, config.epochs):
        for inputs, labels in make_batches(epoch):
            inputs, labels = inputs.to(device), labels.to(device)
            if config.channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=layout)
            with autocast(config, device):
                loss = loss_fn(logits_of(model(inputs)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None and scheduler.last_epoch < scheduler.total_steps:
                scheduler.step()
            if on_step is not None:
                on_step(len(inputs), loss.item())
        if resume and epoch + 1 < config.epochs:
            save_training_state(resume, epoch + 1, model, optimizer, scheduler, rng)
    optimizer.zero_grad(set_to_none=True)  # a trained model carries no stale .grad
    model.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
    model.eval()
    if resume:
        Path(resume).unlink(missing_ok=True)
    return model


def save_training_state(path, epochs_done: int, model, optimizer, scheduler, rng) -> None:
    state = {
        "epochs_done": epochs_done,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "torch_rng": torch.get_rng_state(),
        "rng": rng.get_state() if rng is not None else torch.empty(0, dtype=torch.uint8),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(state, staging)
    staging.replace(path)


def load_training_state(path, model, optimizer, scheduler, rng) -> int:
    """The number of epochs already done (0 without a saved state), with the state restored."""
    if not Path(path).exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if rng is not None:
        rng.set_state(state["rng"])
    return int(state["epochs_done"])


def train(
    model: nn.Module,
    split: Split,
    config: TrainConfig,
    normalize: dict | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    resume: str | os.PathLike | None = None,
) -> nn.Module:
    """Supervised training on `split`, seeded: same seed, same data -> same weights (also
    across a kill and a restart with the same `resume` file; see `fit`)."""
    generator = torch.Generator().manual_seed(config.seed)
    use_augment = config.augment and split.inputs.dim() == 4 and split.inputs.shape[-1] >= 16

    def make_batches(epoch: int):
        return split.batches(
            config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch, normalize=normalize,
            augment=(lambda inputs: augment_batch(inputs, generator)) if use_augment else None,
        )

    steps = -(-len(split) // config.batch_size)
    return fit(model, make_batches, steps, config, device=device, on_step=on_step, resume=resume, rng=generator)
