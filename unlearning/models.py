"""Model registry: architecture name -> builder(num_classes, input_shape, **arch_args).

Add an architecture with `@register_model("name")`; checkpoints record the name and its
arguments, so `load_model` can rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from unlearning.errors import UserError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def decorator(builder):
        MODELS[name] = builder
        return builder

    return decorator


def build_model(arch: str, num_classes: int, input_shape: tuple[int, ...], **arch_args) -> nn.Module:
    if arch not in MODELS:
        raise UserError(f"unknown architecture {arch!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[arch](num_classes=num_classes, input_shape=tuple(input_shape), **arch_args)


@register_model("mlp")
def mlp(num_classes: int, input_shape: tuple[int, ...], hidden: int = 128) -> nn.Module:
    size = 1
    for dim in input_shape:
        size *= dim
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register_model("small_cnn")
def small_cnn(num_classes: int, input_shape: tuple[int, ...], width: int = 16) -> nn.Module:
    """Two conv blocks and a small head: ~25k parameters for 1x8x8 digits."""
    channels, height, width_px = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (height // 2) * (width_px // 2), 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def _conv_bn(in_channels: int, out_channels: int, pool: bool = False) -> nn.Sequential:
    layers = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@register_model("resnet_small")
def resnet_small(num_classes: int, input_shape: tuple[int, ...], width: int = 16) -> nn.Module:
    """A CPU-friendly ResNet-9 (the DAWNBench layout) for 32x32 images; width 64 is ResNet-9."""
    channels = input_shape[0]
    w = width
    return nn.Sequential(
        _conv_bn(channels, w),
        _conv_bn(w, 2 * w, pool=True),
        _Residual(2 * w),
        _conv_bn(2 * w, 4 * w, pool=True),
        _conv_bn(4 * w, 8 * w, pool=True),
        _Residual(8 * w),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, num_classes),
    )


@register_model("resnet18")
def resnet18(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem (3x3 stride-1 first conv, no max-pool)."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model("vit_b_16")
def vit_b_16(num_classes: int, input_shape: tuple[int, ...], image_size: int | None = None) -> nn.Module:
    """torchvision ViT-B/16; images must be image_size x image_size (a multiple of 16)."""
    from torchvision.models import VisionTransformer

    size = image_size or input_shape[-1]
    if size % 16:
        raise UserError(f"vit_b_16 needs an image size that is a multiple of 16, got {size}")
    return VisionTransformer(
        image_size=size,
        patch_size=16,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        mlp_dim=3072,
        num_classes=num_classes,
    )
