"""DiHyFo: a conditional diffusion model over a network's parameters (docs/methods.md#hyperforget).

The variable diffused is a checkpoint's coordinates in the span of the collection: with μ the
mean checkpoint and U the top principal directions of the checkpoints around it,
z = diag(1/s) Uᵀ(θ − μ) (s: each direction's spread), θ = μ + U diag(s) z. With as many
directions as checkpoints − 1 every collected checkpoint is represented exactly; the
denoiser is then an MLP over a few hundred numbers instead of every weight (a linear
autoencoder, where G.pt tokenises the raw weights and p-diff learns an autoencoder).

The condition is the per-class loss vector, as log(loss), standardised over the collection.
DDPM with G.pt's settings (1000 steps, linear β from 1e-4 to 2e-2, the denoiser predicts the
clean signal z₀); samples are drawn with DDIM (η = 0) in `sample_steps` steps, one seeded
noise draw per sample.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class HypernetConfig:
    components: int = 512  # principal directions kept, at most checkpoints - 1
    hidden: int = 512
    blocks: int = 4
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    steps: int = 4000  # optimiser steps
    batch_size: int = 128
    lr: float = 1e-3
    ema: float = 0.999
    sample_steps: int = 20
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def loss_features(losses: Tensor) -> Tensor:
    """The condition's raw form: log of each class's loss (losses span 1e-3 to ~10)."""
    return torch.log(losses.double().clamp(min=1e-4))


class Basis(nn.Module):
    """θ <-> z: the collection's mean, principal directions and their spreads."""

    def __init__(self, mean: Tensor, directions: Tensor, scales: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("directions", directions.float())  # [D, k]
        self.register_buffer("scales", scales.float())  # [k]

    @staticmethod
    def fit(params: Tensor, components: int, chunk: int = 1 << 16) -> Basis:
        """Principal directions of the [N, D] checkpoints from their N x N Gram matrix (float64,
        accumulated over column chunks: D may be large, N is not)."""
        params = params.float()
        mean = params.mean(0)
        gram = torch.zeros(len(params), len(params), dtype=torch.float64)
        for start in range(0, params.shape[1], chunk):
            block = (params[:, start : start + chunk] - mean[start : start + chunk]).double()
            gram += block @ block.T
        values, vectors = torch.linalg.eigh(gram)
        order = torch.argsort(values, descending=True)
        values, vectors = values[order], vectors[:, order]
        k = max(1, min(components, len(params) - 1, int((values > values[0] * 1e-12).sum())))
        singular = values[:k].clamp(min=1e-30).sqrt()
        directions = torch.empty(params.shape[1], k, dtype=torch.float32)
        for start in range(0, params.shape[1], chunk):
            block = (params[:, start : start + chunk] - mean[start : start + chunk]).double()
            directions[start : start + chunk] = ((block.T @ vectors[:, :k]) / singular).float()
        scales = (singular / math.sqrt(max(1, len(params) - 1))).float()
        return Basis(mean, directions, scales)

    def encode(self, params: Tensor) -> Tensor:
        return ((params.float() - self.mean) @ self.directions) / self.scales

    def decode(self, z: Tensor) -> Tensor:
        return self.mean + (z.float() * self.scales) @ self.directions.T


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    frequencies = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float().view(-1, 1) * frequencies.view(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class Denoiser(nn.Module):
    """An MLP with residual blocks: (z_t, t, condition) -> predicted z₀."""

    def __init__(self, dim: int, condition_dim: int, hidden: int, blocks: int):
        super().__init__()
        self.time_dim = 128
        self.inp = nn.Linear(dim, hidden)
        self.cond = nn.Sequential(nn.Linear(self.time_dim + condition_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))
            for _ in range(blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def forward(self, z: Tensor, t: Tensor, condition: Tensor) -> Tensor:
        c = self.cond(torch.cat([timestep_embedding(t, self.time_dim), condition.float()], dim=1))
        h = self.inp(z) + c
        for block in self.blocks:
            h = h + block(h + c)
        return self.out(h)


def schedule(config: HypernetConfig) -> Tensor:
    """ᾱ_t for t = 0 … T−1 (float64)."""
    betas = torch.linspace(config.beta_start, config.beta_end, config.timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def train_denoiser(z: Tensor, condition: Tensor, config: HypernetConfig, on_step=None,
                   device: str | torch.device = "cpu", rank: int = 0, world: int = 1, wrap=None) -> Denoiser:
    """Fit the denoiser to (z₀, condition) pairs with the simple DDPM loss on z₀; returns its EMA.

    Data parallel when `world` > 1: each of the `world` processes (this one is `rank`) draws its
    own share of every batch of `config.batch_size` with its own generator, and `wrap` (Ray
    Train's `prepare_model`, DDP) averages the gradients; every rank starts from the same
    initialisation, so all ranks hold the same weights and the same EMA."""
    import copy

    torch.manual_seed(config.seed)
    model = Denoiser(z.shape[1], condition.shape[1], config.hidden, config.blocks).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    trained = wrap(model) if wrap is not None else model
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                                    pct_start=0.05)
    alpha_bar = schedule(config).float()
    z, condition = z.float(), condition.float()
    share = max(1, min(config.batch_size, len(z)) // world)
    for step in range(config.steps):
        rows = torch.randint(0, len(z), (share,), generator=generator)
        t = torch.randint(0, config.timesteps, (share,), generator=generator)
        noise = torch.randn(share, z.shape[1], generator=generator)
        a = alpha_bar[t].view(-1, 1)
        noisy = a.sqrt() * z[rows] + (1 - a).sqrt() * noise
        loss = F.mse_loss(trained(noisy.to(device), t.to(device), condition[rows].to(device)), z[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for kept, live in zip(ema.parameters(), model.parameters()):
                kept.lerp_(live, 1 - config.ema)
        if on_step is not None:
            on_step(step, float(loss.detach()))
    return ema.eval().cpu()


@torch.no_grad()
def ddim_sample(model: Denoiser, condition: Tensor, dim: int, config: HypernetConfig, seeds: list[int]) -> Tensor:
    """One z₀ per seed, DDIM with η = 0 over `config.sample_steps` evenly spaced timesteps."""
    alpha_bar = schedule(config)
    times = torch.linspace(config.timesteps - 1, 0, config.sample_steps).round().long().unique_consecutive()
    z = torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(s)) for s in seeds]).double()
    cond = condition.float().view(1, -1).expand(len(seeds), -1)
    for i, t in enumerate(times):
        a = alpha_bar[t]
        predicted = model(z.float(), t.repeat(len(seeds)), cond).double()
        eps = (z - a.sqrt() * predicted) / (1 - a).sqrt()
        a_next = alpha_bar[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0, dtype=torch.float64)
        z = a_next.sqrt() * predicted + (1 - a_next).sqrt() * eps
    return z.float()
