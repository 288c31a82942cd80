"""Models: a checkpoint names how to build its network, and `build_model` builds it.

A checkpoint's `arch` is one of
- a registered name (`mlp`, `small_cnn`, `resnet_small`, `torchvision:resnet18`,
  `torchvision:vit_b_16`; `@register_model("name")` adds one): called as
  `builder(num_classes=, input_shape=, **arch_args)`;
- `torchvision:NAME`, any other torchvision classifier, built with `weights=None`;
- `timm:NAME`, a timm model (the `timm` extra), `pretrained=False`: nothing is downloaded;
- a factory `package.module:callable` the user wrote: imported by name (never unpickled) and
  called with `arch_args`, plus `num_classes` and `input_shape` if its signature names them
  and `arch_args` does not set them. It must be a `torch.nn.Module` subclass or a function
  annotated `-> nn.Module`, so a checkpoint cannot name an arbitrary callable (`shutil:rmtree`
  with arguments of its choosing) and have loading call it.

Models may return a tensor of logits or a dict / `ModelOutput` holding `logits`; every loss
and metric reads them through `logits_of`.
"""

from __future__ import annotations

import importlib
import inspect
import re
import typing
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from unlearning.errors import UserError

MODELS: dict[str, Callable[..., nn.Module]] = {}
ALIASES = {"resnet18": "torchvision:resnet18", "vit_b_16": "torchvision:vit_b_16"}  # names before factories
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_PACKAGED = ("torchvision", "timm")  # factories that name a library's own builder


def register_model(name: str):
    def decorator(builder):
        MODELS[name] = builder
        return builder

    return decorator


def canonical_arch(arch: str) -> str:
    """The name a checkpoint records: older short names map to their factory."""
    return ALIASES.get(arch, arch)


def arch_label(arch: str) -> str:
    """`arch` as it can appear in a registered model's name: `torchvision:resnet18` ->
    `torchvision-resnet18`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", canonical_arch(arch)).strip("-")


def build_model(arch: str, num_classes: int, input_shape: tuple[int, ...], **arch_args) -> nn.Module:
    """The untrained network `arch` names (see the module docstring), on the CPU."""
    arch = canonical_arch(arch)
    input_shape = tuple(int(d) for d in input_shape)
    if not arch:
        raise UserError("the model names no factory, so it cannot be rebuilt or saved (retrain, bad_teacher, "
                        "ZRF and checkpoints need one): give factory='package.module:callable'")
    if arch in MODELS:
        model = _call(MODELS[arch], arch, {"num_classes": num_classes, "input_shape": input_shape, **arch_args})
    elif arch.startswith("timm:"):
        model = _timm(arch.removeprefix("timm:"), num_classes, input_shape, arch_args)
    elif arch.startswith("torchvision:"):
        model = _torchvision(arch.removeprefix("torchvision:"), num_classes, arch_args)
    elif _FACTORY.match(arch):
        factory = import_factory(arch)
        model = _call(factory, arch, _factory_kwargs(factory, num_classes, input_shape, arch_args))
    else:
        known = ", ".join(sorted(MODELS))
        raise UserError(f"unknown architecture {arch!r}; known: {known}, torchvision:NAME, timm:NAME, "
                        "or a factory package.module:callable")
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable `package.module:name` names, imported (a checkpoint can only name code that
    is installed or on the Python path; nothing is unpickled)."""
    module_name, _, attribute = spec.partition(":")
    try:
        target = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or the module failing on import
        raise UserError(f"model factory {spec}: cannot import {module_name} ({type(error).__name__}: {error}); "
                        "is it installed or on PYTHONPATH?") from None
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise UserError(f"model factory {spec}: {module_name} has no {attribute!r}")
    if not _builds_a_module(target):
        raise UserError(f"model factory {spec} must be a torch.nn.Module subclass or a function annotated "
                        "`-> torch.nn.Module`")
    return target


def _builds_a_module(target) -> bool:
    """Whether `target` is an nn.Module class, or a function whose return annotation is one."""
    if inspect.isclass(target):
        return issubclass(target, nn.Module)
    if not callable(target):
        return False
    try:
        returns = typing.get_type_hints(target).get("return")
    except Exception:  # an annotation that does not resolve
        return False
    return inspect.isclass(returns) and issubclass(returns, nn.Module)


def factory_module(arch: str) -> str | None:
    """The module a user factory lives in (None for registered, torchvision and timm models)."""
    arch = canonical_arch(arch)
    if arch in MODELS or arch.split(":")[0] in _PACKAGED or not _FACTORY.match(arch):
        return None
    return arch.partition(":")[0]


def _factory_kwargs(factory, num_classes: int, input_shape: tuple[int, ...], arch_args: dict) -> dict:
    """`arch_args`, plus num_classes and input_shape where the factory's signature names them."""
    try:
        names = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins)
        names = {}
    kwargs = dict(arch_args)
    for key, value in (("num_classes", num_classes), ("input_shape", input_shape)):
        if key in names and key not in kwargs:
            kwargs[key] = value
    return kwargs


def _call(factory, arch: str, kwargs: dict) -> nn.Module:
    try:
        return factory(**kwargs)
    except TypeError as error:
        raise UserError(f"model factory {arch} does not take arguments {sorted(kwargs)}: {error}") from None


def _torchvision(name: str, num_classes: int, arch_args: dict) -> nn.Module:
    from torchvision import models

    if name not in models.list_models(module=models):
        raise UserError(f"torchvision has no classification model {name!r}")
    return _call(lambda **kw: models.get_model(name, **kw), f"torchvision:{name}",
                 {"weights": None, "num_classes": num_classes, **arch_args})


def _timm(name: str, num_classes: int, input_shape: tuple[int, ...], arch_args: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError(f"timm:{name} needs timm: pip install 'amnesis[timm]'") from None
    if not timm.is_model(name):
        raise UserError(f"timm has no model {name!r}")
    kwargs = {"pretrained": False, "num_classes": num_classes, "in_chans": input_shape[0], **arch_args}
    return _call(lambda **kw: timm.create_model(name, **kw), f"timm:{name}", kwargs)


def logits_of(output) -> Tensor:
    """The logits of a model's output: the tensor itself, or a dict's / ModelOutput's `logits`."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise UserError(f"the model returned a {type(output).__name__}; it must return logits: a tensor, "
                    "or a dict or ModelOutput with a 'logits' tensor")


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


@register_model("torchvision:resnet18")
def resnet18(num_classes: int, input_shape: tuple[int, ...], small_stem: bool | None = None) -> nn.Module:
    """torchvision's ResNet-18. For small images (32-pixel CIFAR, up to 64 pixels; or
    `small_stem=True`) the stem is the papers': a 3x3 stride-1 first conv and no max-pool."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    if small_stem is None:
        small_stem = max(input_shape[-2:]) <= 64
    if small_stem:
        model.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif input_shape[0] != 3:
        model.conv1 = nn.Conv2d(input_shape[0], 64, 7, stride=2, padding=3, bias=False)
    return model


@register_model("torchvision:vit_b_16")
def vit_b_16(num_classes: int, input_shape: tuple[int, ...], image_size: int | None = None,
             patch_size: int = 16) -> nn.Module:
    """torchvision's ViT-B (12 layers, 12 heads, width 768); images image_size x image_size
    (default: the data's), cut into patch_size x patch_size patches (16 in the paper)."""
    from torchvision.models import VisionTransformer

    size = image_size or input_shape[-1]
    if input_shape[0] != 3:
        raise UserError(f"vit_b_16 takes 3-channel images, not {input_shape[0]}")
    if size % patch_size or tuple(input_shape[-2:]) != (size, size):
        raise UserError(f"vit_b_16 needs {size}x{size} images (a multiple of patch_size={patch_size}), "
                        f"got {tuple(input_shape[-2:])}")
    return VisionTransformer(
        image_size=size,
        patch_size=patch_size,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        mlp_dim=3072,
        num_classes=num_classes,
    )
