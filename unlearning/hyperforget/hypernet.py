"""A trained HyperForget hypernetwork: basis, denoiser, condition statistics and prompts;
saved as safetensors + JSON (docs/methods.md#hyperforget)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from unlearning.errors import UserError
from unlearning.hyperforget.diffusion import (
    Basis,
    Denoiser,
    HypernetConfig,
    ddim_sample,
    loss_features,
    train_denoiser,
)

WEIGHTS = "hypernet.safetensors"
INFO = "hypernet.json"


@dataclass
class Hypernet:
    basis: Basis
    denoiser: Denoiser
    feature_mean: Tensor  # [C] of log-losses over the collection
    feature_std: Tensor
    forgotten_loss: Tensor  # [C]: a class's loss at the end of runs that left it out
    probe_ids: Tensor  # the training rows every snapshot's losses were measured on
    config: HypernetConfig
    info: dict  # the target's arch, fingerprints, collection sizes

    @property
    def num_classes(self) -> int:
        return len(self.feature_mean)

    def condition(self, losses: Tensor) -> Tensor:
        return ((loss_features(losses) - self.feature_mean.double()) / self.feature_std.double()).float()

    def prompt(self, original_losses: Tensor, forget_classes: list[int]) -> Tensor:
        """The losses asked for: the forgotten level on `forget_classes`, the original's elsewhere."""
        wanted = original_losses.double().clone()
        for k in forget_classes:
            wanted[k] = self.forgotten_loss[k]
        return wanted

    def sample(self, wanted_losses: Tensor, seeds: list[int]) -> Tensor:
        """[len(seeds), D] parameter vectors conditioned on `wanted_losses`."""
        z = ddim_sample(self.denoiser, self.condition(wanted_losses), self.basis.scales.numel(), self.config, seeds)
        return self.basis.decode(z)


def forgotten_levels(losses: Tensor, final: Tensor, left_out: list[tuple[int, ...]]) -> Tensor:
    """Per class: the median loss of the runs' last snapshots that left it out (the collection's
    largest loss for it when no run did)."""
    levels = losses.max(0).values.clone()
    for k in range(losses.shape[1]):
        rows = [i for i in torch.nonzero(final, as_tuple=True)[0].tolist() if k in left_out[i]]
        if rows:
            levels[k] = losses[rows, k].median()
    return levels


def train_hypernet(params: Tensor, losses: Tensor, final: Tensor, left_out: list[tuple[int, ...]],
                   probe_ids: Tensor, config: HypernetConfig, info: dict, on_step=None,
                   device: str | torch.device = "cpu", fit_denoiser=None) -> Hypernet:
    """Fit the basis and the denoiser to N snapshots: `params` [N, D], `losses` [N, C], `final`
    [N] bool (a run's last snapshot), `left_out` (each snapshot's run's left-out classes).
    `fit_denoiser(z, condition, config)` trains the denoiser elsewhere (pipelines: Ray Train)."""
    if len(params) < 4:
        raise UserError(f"a hypernetwork needs at least 4 checkpoints, got {len(params)}")
    if not bool(torch.isfinite(losses).all()) or not bool(torch.isfinite(params).all()):
        raise UserError("the checkpoint collection has non-finite parameters or losses (a run diverged)")
    basis = Basis.fit(params, config.components)
    z = basis.encode(params)
    features = loss_features(losses)
    mean, std = features.mean(0), features.std(0).clamp(min=1e-3)
    condition = ((features - mean) / std).float()
    if fit_denoiser is not None:
        denoiser = fit_denoiser(z, condition, config)
    else:
        denoiser = train_denoiser(z, condition, config, on_step, device)
    info = {**info, "checkpoints": len(params), "parameters": params.shape[1], "components": z.shape[1]}
    return Hypernet(basis, denoiser, mean.float(), std.float(), forgotten_levels(losses, final, left_out).float(),
                    probe_ids.long(), config, info)


def save_hypernet(hypernet: Hypernet, path: str | os.PathLike) -> None:
    """A hypernetwork directory, written atomically; `path` must not exist."""
    from safetensors.torch import save_file

    from unlearning.outputs import atomic_directory

    tensors = {f"basis.{k}": v.contiguous() for k, v in hypernet.basis.state_dict().items()}
    tensors.update({f"denoiser.{k}": v.contiguous() for k, v in hypernet.denoiser.state_dict().items()})
    tensors.update(feature_mean=hypernet.feature_mean, feature_std=hypernet.feature_std,
                   forgotten_loss=hypernet.forgotten_loss, probe_ids=hypernet.probe_ids)
    with atomic_directory(path) as staging:
        save_file(tensors, str(staging / WEIGHTS))
        (staging / INFO).write_text(json.dumps({"config": hypernet.config.to_dict(), **hypernet.info}, indent=1))


def load_hypernet(path: str | os.PathLike) -> Hypernet:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / INFO).is_file():
        raise UserError(f"{path} is not a hypernetwork directory (made by `unlearn hyperforget train`)")
    try:
        info = json.loads((path / INFO).read_text())
        config = HypernetConfig(**info.pop("config"))
        tensors = load_file(str(path / WEIGHTS))
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        basis_state = part("basis.")
        basis = Basis(basis_state["mean"], basis_state["directions"], basis_state["scales"])
        denoiser = Denoiser(basis.scales.numel(), len(tensors["feature_mean"]), config.hidden, config.blocks)
        denoiser.load_state_dict(part("denoiser."))
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as error:
        raise UserError(f"{path}: unreadable hypernetwork ({str(error).splitlines()[0]})") from None
    return Hypernet(basis, denoiser.eval(), tensors["feature_mean"], tensors["feature_std"], tensors["forgotten_loss"],
                    tensors["probe_ids"], config, info)
