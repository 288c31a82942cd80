"""Selective Synaptic Dampening and its adaptive threshold (docs/methods.md#dampening,
#adaptive-alpha).

select theta_i  iff  I^f_i > alpha * I^D_i            (strict)
beta_i = min(lambda * I^D_i / I^f_i, 1);  theta_i <- beta_i * theta_i for selected i
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import Tensor, nn

from unlearning.errors import UserError


def check_strengths(alpha: float, lam: float) -> None:
    for name, value in (("alpha", alpha), ("lambda", lam)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise UserError(f"{name} must be a finite number > 0, got {value!r}")


def check_importance_matches(model: nn.Module, importance: dict[str, Tensor], what: str) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(importance))
    extra = sorted(set(importance) - set(params))
    if missing or extra:
        name = (missing or extra)[0]
        raise UserError(
            f"{what} does not match the model: parameter {name!r} is "
            f"{'missing from it' if missing else 'not in the model'}"
        )
    for name, p in params.items():
        if tuple(importance[name].shape) != tuple(p.shape):
            raise UserError(
                f"{what} does not match the model: {name!r} has shape "
                f"{tuple(importance[name].shape)}, the model {tuple(p.shape)}"
            )


def dampening_factors(d: Tensor, f: Tensor, alpha: float, lam: float) -> Tensor:
    """beta for every element: 1 where not selected, min(lam*d/f, 1) where f > alpha*d."""
    selected = f > alpha * d
    # f > alpha * d >= 0 wherever selected, so the division is safe there.
    beta = torch.clamp(lam * d / torch.where(selected, f, torch.ones_like(f)), max=1.0)
    return torch.where(selected, beta, torch.ones_like(beta))


@torch.no_grad()
def dampen_(
    model: nn.Module,
    full_importance: dict[str, Tensor],
    forget_importance: dict[str, Tensor],
    alpha: float,
    lam: float,
) -> int:
    """Dampen `model` in place; returns how many scalar parameters were selected."""
    selected = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        d = full_importance[name].to(p.device, torch.float32)
        f = forget_importance[name].to(p.device, torch.float32)
        beta = dampening_factors(d, f, alpha, lam)
        selected += int((f > alpha * d).sum())
        p.mul_(beta.to(p.dtype))
    return selected


def ssd(
    model: nn.Module,
    full_importance: dict[str, Tensor],
    forget_importance: dict[str, Tensor],
    alpha: float = 10.0,
    lam: float = 1.0,
) -> nn.Module:
    """A dampened copy of `model`; the input model is not modified."""
    check_strengths(alpha, lam)
    check_importance_matches(model, full_importance, "the full-data importance")
    check_importance_matches(model, forget_importance, "the forget-set importance")
    new_model = copy.deepcopy(model)
    dampen_(new_model, full_importance, forget_importance, alpha, lam)
    return new_model


def importance_ratios(
    full_importance: dict[str, Tensor], forget_importance: dict[str, Tensor]
) -> Tensor:
    """r_i = I^f_i / I^D_i over all parameters of the network, non-finite ratios dropped."""
    parts = []
    for name in sorted(full_importance):
        ratio = forget_importance[name].double().flatten() / full_importance[name].double().flatten()
        parts.append(ratio[torch.isfinite(ratio)])
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)


def percentile(values: Tensor, q: float) -> float:
    """Exact percentile with numpy's default ('linear') interpolation, at any size.

    torch.quantile refuses more than 2^24 elements; two order statistics found by
    torch.kthvalue (linear time, no size limit) give the same answer exactly.
    """
    values = values.flatten().double()
    n = values.numel()
    if n == 0:
        raise UserError("no finite importance ratios: the forget-set importance is all zero")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    position = (n - 1) * (q / 100.0)  # numpy: virtual index = (n - 1) * quantile
    lower = math.floor(position)
    upper = min(lower + 1, n - 1)
    low_value = torch.kthvalue(values, lower + 1).values.item()
    if upper == lower:
        return low_value
    high_value = torch.kthvalue(values, upper + 1).values.item()
    return lerp(low_value, high_value, position - lower)


def lerp(low: float, high: float, fraction: float) -> float:
    """numpy's percentile interpolation, bit for bit (it switches form at t >= 0.5)."""
    low, high = np.float64(low), np.float64(high)
    if fraction >= 0.5:
        return float(high - (high - low) * (1 - fraction))
    return float(low + (high - low) * fraction)


def adaptive_percentile(forget_fraction: float) -> float:
    """p = 100 - ln(1 + 100 s), s = |D_f| / (|D_r| + |D_f|)  (ASSD)."""
    if not 0.0 < forget_fraction <= 1.0:
        raise UserError(f"forget fraction must be in (0, 1], got {forget_fraction}")
    return max(0.0, 100.0 - math.log(1.0 + 100.0 * forget_fraction))


def adaptive_alpha(
    full_importance: dict[str, Tensor],
    forget_importance: dict[str, Tensor],
    forget_fraction: float,
) -> float:
    """ASSD's alpha: the p-th percentile of the importance ratios of the whole network."""
    ratios = importance_ratios(full_importance, forget_importance)
    return percentile(ratios, adaptive_percentile(forget_fraction))
