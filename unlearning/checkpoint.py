"""Checkpoints and importance stores: safetensors + JSON directories, written atomically
(unlearning.outputs).

Loading never unpickles. A checkpoint's `fingerprint` is a hash of its weights, checked on
load (a corrupt file is refused) and recorded by importance stores and reports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unlearning.errors import UserError
from unlearning.models import build_model, canonical_arch, logits_of
from unlearning.outputs import atomic_directory, write_json

MODEL_WEIGHTS, MODEL_META = "model.safetensors", "model.json"
STORE_WEIGHTS, STORE_META = "importance.safetensors", "importance.json"


def fingerprint(tensors: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order (first 16 hex digits)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent} is not a {what}: {path.name} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is corrupt: {error}") from None


def check_model_json(meta, where: Path) -> None:
    """UserError naming the first field of a checkpoint's model.json that cannot be right."""
    if not isinstance(meta, dict):
        raise UserError(f"{where} must hold a JSON object, not a {type(meta).__name__}")
    for key in ("arch", "num_classes", "input_shape"):
        if key not in meta:
            raise UserError(f"{where} lacks {key!r}")
    if not isinstance(meta["arch"], str) or not meta["arch"]:
        raise UserError(f"{where}: 'arch' must name a factory (a non-empty string), got {meta['arch']!r}")
    if not _is_count(meta["num_classes"]):
        raise UserError(f"{where}: 'num_classes' must be a positive integer, got {meta['num_classes']!r}")
    shape = meta["input_shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or not all(map(_is_count, shape)):
        raise UserError(f"{where}: 'input_shape' must be a list of 1 to 4 positive integers, got {shape!r}")
    if not isinstance(meta.get("arch_args", {}), dict):
        raise UserError(f"{where}: 'arch_args' must be a JSON object, got {meta['arch_args']!r}")
    normalize = meta.get("normalize")
    if normalize is not None:
        check_normalize(normalize, shape[0] if len(shape) > 1 else None, where)


def check_normalize(normalize, channels: int | None, where) -> None:
    """`{"mean": [...], "std": [...]}`: finite numbers, std > 0, one per channel."""
    if not isinstance(normalize, dict) or set(normalize) != {"mean", "std"}:
        raise UserError(f"{where}: 'normalize' must be an object with 'mean' and 'std', got {normalize!r}")
    for key in ("mean", "std"):
        values = normalize[key]
        if not isinstance(values, list) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise UserError(f"{where}: normalize {key} must be a list of finite numbers, got {values!r}")
        if channels is not None and len(values) not in (1, channels):
            raise UserError(f"{where}: normalize {key} has {len(values)} values for {channels} input channels")
    if any(v <= 0 for v in normalize["std"]):
        raise UserError(f"{where}: normalize std must be > 0, got {normalize['std']}")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_tensors(path: Path, what: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"{path.parent} is not a {what}: {path.name} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{path} is corrupt or truncated: {error}") from None


def _check_finite(tensors: dict[str, Tensor], path: Path) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path} has non-finite values in {name!r}")


def model_meta(model: nn.Module) -> dict:
    meta = getattr(model, "amnesis_meta", None)
    if meta is None:
        raise UserError("the model does not say how to rebuild it: build it with unlearning.new_model, or "
                        "name its factory (save_model(model, path, factory='package.module:callable', ...))")
    return meta


def attach_meta(
    model: nn.Module,
    arch: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    normalize: dict | None,
    arch_args: dict | None = None,
    extra: dict | None = None,
) -> nn.Module:
    if normalize is not None:
        check_normalize(normalize, input_shape[0] if len(input_shape) > 1 else None, "normalize")
    model.amnesis_meta = {
        "arch": canonical_arch(arch),
        "arch_args": dict(arch_args or {}),
        "num_classes": int(num_classes),
        "input_shape": [int(d) for d in input_shape],
        "normalize": normalize,
        **(extra or {}),
    }
    return model


def new_model(
    arch: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    normalize: dict | None = None,
    seed: int | None = None,
    **arch_args,
) -> nn.Module:
    """A freshly initialised model that carries what its checkpoint will record."""
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model(arch, num_classes, input_shape, **arch_args)
    return attach_meta(model, arch, num_classes, input_shape, normalize, arch_args)


def model_fingerprint(model: nn.Module) -> str:
    return fingerprint(model.state_dict())


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    extra: dict | None = None,
    *,
    factory: str | None = None,
    factory_kwargs: dict | None = None,
    input_shape: tuple[int, ...] | list[int] | None = None,
    normalize: dict | None = None,
    num_classes: int | None = None,
) -> str:
    """Write `model` as a checkpoint directory at `path` (must not exist); returns fingerprint.

    A model built by `new_model` or `load_model` knows how it was built. Any other module
    needs `factory` ("package.module:callable", "torchvision:NAME", "timm:NAME"),
    `factory_kwargs` to call it with, and `input_shape` (one input, without the batch
    dimension); `normalize` ({"mean": [...], "std": [...]} per channel) if its inputs are
    normalised; `num_classes` is read from the output on a zero input unless given.
    """
    if factory is not None:
        describe_model(model, factory, factory_kwargs, input_shape, normalize, num_classes)
    with atomic_directory(path) as staging:
        return write_model_files(model, staging, extra)


def describe_model(
    model: nn.Module,
    factory: str,
    factory_kwargs: dict | None,
    input_shape,
    normalize: dict | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """Attach what a checkpoint records to a module built elsewhere, after checking that
    `factory(**factory_kwargs)` builds a network with the same parameters and buffers."""
    if input_shape is None:
        raise UserError("a model saved with a factory needs input_shape (one input, without the batch dimension)")
    if isinstance(input_shape, (str, bytes)) or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise UserError(f"input_shape must be a list of positive integers, got {input_shape!r}")
    if not isinstance(factory_kwargs or {}, dict):
        raise UserError(f"factory_kwargs must be a dict, got {type(factory_kwargs).__name__}")
    if num_classes is None:
        num_classes = output_classes(model, tuple(input_shape))
    rebuilt = build_model(factory, num_classes, tuple(input_shape), **(factory_kwargs or {}))
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    theirs = {name: tuple(t.shape) for name, t in rebuilt.state_dict().items()}
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:1]
        raise UserError(f"factory {factory} builds a different network than the model given "
                        f"(first difference: {differ[0][0]} {differ[0][1]})")
    return attach_meta(model, factory, num_classes, tuple(input_shape), normalize, factory_kwargs)


def output_classes(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The number of logits `model` returns for one input (a zero tensor, in eval mode)."""
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else "cpu"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = logits_of(model(torch.zeros(2, *input_shape, device=device)))
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"the model does not take inputs of shape {list(input_shape)}: "
                        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    finally:
        model.train(was_training)
    if logits.dim() != 2:
        raise UserError(f"the model returns logits of shape {tuple(logits.shape)} for a batch of 2; "
                        "expected (batch, classes)")
    return int(logits.shape[1])


def write_model_files(model: nn.Module, directory: Path, extra: dict | None = None) -> str:
    """model.safetensors + model.json into an existing (staging) directory; returns fingerprint."""
    if not all_finite(model):
        raise UserError("refusing to save a model with non-finite weights")
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    meta = {**model_meta(model), **(extra or {})}
    if not meta.get("arch"):
        raise UserError("the model names no factory, so its checkpoint could not be loaded again: "
                        "give factory='package.module:callable' (and factory_kwargs) when saving or forgetting")
    meta.pop("parent_fingerprint", None)
    meta["fingerprint"] = fingerprint(state)
    save_file(state, str(Path(directory) / MODEL_WEIGHTS))
    write_json(Path(directory) / MODEL_META, meta)
    return meta["fingerprint"]


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a checkpoint's architecture and load its weights (no unpickling)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model checkpoint {path} does not exist or is not a directory")
    meta = _read_json(path / MODEL_META, "model checkpoint")
    check_model_json(meta, path / MODEL_META)
    state = _read_tensors(path / MODEL_WEIGHTS, "model checkpoint")
    if meta.get("fingerprint") and fingerprint(state) != meta["fingerprint"]:
        raise UserError(f"{path / MODEL_WEIGHTS} does not match the fingerprint in {MODEL_META}")
    _check_finite(state, path / MODEL_WEIGHTS)
    model = build_model(meta["arch"], meta["num_classes"], meta["input_shape"], **meta.get("arch_args", {}))
    meta["arch"] = canonical_arch(meta["arch"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(f"{path} does not match architecture {meta['arch']!r}: {first}") from None
    model.amnesis_meta = {k: v for k, v in meta.items() if k != "fingerprint"}
    model.amnesis_meta["parent_fingerprint"] = meta.get("fingerprint")
    return model.to(map_location)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Weights trained elsewhere: a .safetensors file, or a torch file read with
    `weights_only=True` (never unpickled), holding a state dict or a dict with one under
    `state_dict`, `model_state_dict` or `model`. DataParallel's `module.` prefix is dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_tensors(path, "weights file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for anything but tensors and containers
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is not a weights file torch can read safely (weights_only=True): {first}") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(t, Tensor) for t in loaded.values()):
        raise UserError(f"{path} holds no state dict (a dict of parameter names to tensors)")
    if all(name.startswith("module.") for name in loaded):
        loaded = {name.removeprefix("module."): t for name, t in loaded.items()}
    return loaded


def import_model(
    factory: str,
    factory_kwargs: dict,
    weights: str | os.PathLike,
    input_shape,
    normalize: dict | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """The network `factory` builds, with the weights in `weights`, ready for `save_model`."""
    state = read_state_dict(weights)
    _check_finite(state, Path(weights))
    if num_classes is None:
        num_classes = _head_size(state, factory, factory_kwargs, tuple(input_shape))
    model = build_model(factory, num_classes or 1, tuple(input_shape), **factory_kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[1 if "\n" in str(error).strip() else 0].strip()
        raise UserError(f"{weights} does not fit the network {factory} builds: {first}") from None
    describe_model(model, factory, factory_kwargs, input_shape, normalize, num_classes)  # None: from its output
    return model


def _head_size(state: dict[str, Tensor], factory: str, factory_kwargs: dict, input_shape) -> int | None:
    """The number of classes the weights were trained for: the first dimension of the tensor
    that grows with `num_classes` in the factory's network (None if none does)."""
    one, two = (build_model(factory, n, input_shape, **factory_kwargs).state_dict() for n in (1, 2))
    for name, tensor in one.items():
        if name in state and tensor.dim() and tensor.shape[0] == 1 and two[name].shape[0] == 2:
            return int(state[name].shape[0])
    return None


def save_importance(
    sums_or_mean,
    path: str | os.PathLike,
    model_fingerprint: str,
    dataset_fingerprint: str,
    extra: dict | None = None,
) -> dict:
    """Write an importance store (the mean, one tensor per parameter) atomically."""
    from unlearning.importance import ImportanceSums

    if isinstance(sums_or_mean, ImportanceSums):
        mean = sums_or_mean.mean()
        info = {
            "kind": sums_or_mean.kind,
            "mode": sums_or_mean.mode,
            "batch_size": sums_or_mean.batch_size,
            "count": sums_or_mean.count,
            "num_samples": sums_or_mean.num_samples,
        }
    else:
        mean, info = sums_or_mean, {}
    meta = {
        **info,
        **(extra or {}),
        "model_fingerprint": model_fingerprint,
        "dataset_fingerprint": dataset_fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "format": 1,
    }
    with atomic_directory(path) as staging:
        save_file({n: t.contiguous().float() for n, t in mean.items()}, str(staging / STORE_WEIGHTS))
        write_json(staging / STORE_META, meta)
    return meta


def load_importance(
    path: str | os.PathLike, model: nn.Module | None = None
) -> tuple[dict[str, Tensor], dict]:
    """Read an importance store; with `model`, refuse a store made for another model."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"importance store {path} does not exist or is not a directory")
    meta = _read_json(path / STORE_META, "importance store")
    importance = _read_tensors(path / STORE_WEIGHTS, "importance store")
    _check_finite(importance, path / STORE_WEIGHTS)
    if not isinstance(meta, dict):
        raise UserError(f"{path / STORE_META} must hold a JSON object")
    if model is not None:
        expected = meta.get("model_fingerprint")
        if not expected:
            raise UserError(f"importance store {path}: {STORE_META} names no model_fingerprint, so nothing says "
                            "which model it was computed for; rebuild it with `unlearn importance`")
        actual = model_fingerprint(model)
        lineage = model_meta(model).get("lineage_root")
        if expected not in (actual, lineage):
            raise UserError(f"importance store {path} was computed for model {expected}, "
                            f"not for this model ({actual})")
        _check_store_tensors(importance, model, path)
    return importance, meta


def _check_store_tensors(importance: dict[str, Tensor], model: nn.Module, path: Path) -> None:
    """One tensor per trainable parameter, of its shape."""
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name not in importance:
            raise UserError(f"importance store {path} is incomplete: no tensor for parameter {name!r}")
        if tuple(importance[name].shape) != tuple(parameter.shape):
            raise UserError(f"importance store {path}: {name!r} has shape {tuple(importance[name].shape)}, "
                            f"the model's parameter {tuple(parameter.shape)}")


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
