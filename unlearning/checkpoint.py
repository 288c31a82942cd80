"""Checkpoints and importance stores: safetensors + JSON directories, written atomically.

Loading never unpickles. A checkpoint's `fingerprint` is a hash of its weights, checked on
load (a corrupt file is refused) and recorded by importance stores and reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unlearning.errors import UserError
from unlearning.models import build_model

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


@contextmanager
def atomic_directory(out: str | os.PathLike):
    """Yield a temporary sibling directory; rename it to `out` only if the block succeeds.

    `out` must not exist: inputs and earlier outputs are never overwritten.
    """
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output path (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent} is not a {what}: {path.name} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is corrupt: {error}") from None


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
        raise ValueError("model has no amnesis_meta; build it with unlearning.new_model")
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
    model.amnesis_meta = {
        "arch": arch,
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


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> str:
    """Write `model` as a checkpoint directory at `path` (must not exist); returns fingerprint."""
    with atomic_directory(path) as staging:
        return write_model_files(model, staging, extra)


def write_model_files(model: nn.Module, directory: Path, extra: dict | None = None) -> str:
    """model.safetensors + model.json into an existing (staging) directory; returns fingerprint."""
    if not all_finite(model):
        raise UserError("refusing to save a model with non-finite weights")
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    meta = {**model_meta(model), **(extra or {})}
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
    for key in ("arch", "num_classes", "input_shape"):
        if key not in meta:
            raise UserError(f"{path / MODEL_META} lacks {key!r}")
    state = _read_tensors(path / MODEL_WEIGHTS, "model checkpoint")
    if meta.get("fingerprint") and fingerprint(state) != meta["fingerprint"]:
        raise UserError(f"{path / MODEL_WEIGHTS} does not match the fingerprint in {MODEL_META}")
    _check_finite(state, path / MODEL_WEIGHTS)
    model = build_model(meta["arch"], meta["num_classes"], meta["input_shape"], **meta.get("arch_args", {}))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(f"{path} does not match architecture {meta['arch']!r}: {first}") from None
    model.amnesis_meta = {k: v for k, v in meta.items() if k != "fingerprint"}
    model.amnesis_meta["parent_fingerprint"] = meta.get("fingerprint")
    return model.to(map_location)


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
    if model is not None:
        expected = meta.get("model_fingerprint")
        actual = model_fingerprint(model)
        lineage = model_meta(model).get("lineage_root")
        if expected not in (actual, lineage):
            raise UserError(
                f"importance store {path} was computed for model {expected}, "
                f"not for this model ({actual})"
            )
    return importance, meta


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file via a temporary sibling and a rename; refuses to replace an existing file."""
    path = Path(path)
    if path.exists():
        raise UserError(f"{path} already exists; choose a new output path (nothing is overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.rename(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
