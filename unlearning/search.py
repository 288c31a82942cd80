"""The PTN-style search (docs/methods.md#ptn-search) over cached importances.

The schedule walks from the least aggressive dampening towards more aggressive ones:

1. alpha phase (lambda = 1): s_k = s_0 * growth^k with s_0 = |D_f| / N / start_divisor
   (25 by default, PTNConfig; a larger divisor starts gentler, for models where s_0 already overshoots),
   p_k = 100 - ln(1 + 100 s_k), alpha_k = percentile_{p_k}(I^f / I^D), while alpha_k > 1
   (every alpha <= lambda = 1 dampens exactly what alpha = 1 dampens) and k < max_steps;
2. lambda phase (alpha = 1): lambda_j = growth^-j down to `min_lambda`, for requests that
   the alpha phase alone cannot bring to the target;
3. threshold phase (lambda at its last value): alpha_j = growth^-j down to `min_lambda`, which also
   dampens parameters less important to D_f than to D (ratio < 1). Samples the model fits
   confidently (random forgetting) have small gradients, hence few ratios above 1: only this
   phase can reach them. Its last step dampens nearly everything, so every target is reachable.

Steps with the same (alpha, lambda) as an earlier step are dropped (they would give the same
model). The answer is the first step whose forget-set accuracy is <= the target. Every step
depends only on the original model and the two importances, so steps can be evaluated in any
order or in parallel; `first_meeting` picks the same answer as the sequential loop.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from unlearning.dampening import adaptive_percentile, dampen_, importance_ratios, lerp
from unlearning.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    index: int
    alpha: float
    lam: float
    s: float | None = None
    percentile: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    step: Step | None  # the least aggressive step that meets the target; None if none does
    target: float
    path: list[tuple[Step, float]]  # (step, forget accuracy) for every evaluated step

    @property
    def reached(self) -> bool:
        return self.step is not None


def percentile_of_sorted(sorted_values: Tensor, q: float) -> float:
    n = sorted_values.numel()
    position = (n - 1) * (q / 100.0)  # numpy: virtual index = (n - 1) * quantile
    lower = math.floor(position)
    upper = min(lower + 1, n - 1)
    return lerp(float(sorted_values[lower]), float(sorted_values[upper]), position - lower)


@dataclass(frozen=True)
class PTNConfig:
    """The PTN walk's settings: the one place their defaults live.

    Read by the `ptn` and `potion` methods, by the parallel walk on Ray Tune
    (pipelines/search.py) and by tune_configs/*.yaml, which only override them.
    """

    growth: float = 1.1  # s_{k+1} = growth * s_k; then lambda and alpha shrink by it
    max_steps: int = 500  # alpha-phase steps at most
    start_divisor: float = 25.0  # s_0 = |D_f| / N / start_divisor; larger starts gentler
    min_lambda: float = 1e-3  # where the lambda and threshold phases stop
    chunk_size: int = 1  # steps per lockstep round of a search's actors (the parallel walk only)
    poison_rho: float = 0.1  # poison requests' default rho (the paper sweeps 0 ... 0.75)

    def check(self) -> PTNConfig:
        """This config, or a UserError naming the first bad setting."""
        if not (math.isfinite(self.start_divisor) and self.start_divisor > 0):
            raise UserError(f"start_divisor must be a finite number > 0, got {self.start_divisor}")
        if not (math.isfinite(self.growth) and self.growth > 1):
            raise UserError(f"growth must be a finite number > 1, got {self.growth}")
        if self.max_steps < 1 or self.chunk_size < 1:
            raise UserError(f"max_steps and chunk_size must be >= 1, got {self.max_steps} and {self.chunk_size}")
        if not 0 < self.min_lambda < 1:
            raise UserError(f"min_lambda must be in (0, 1), got {self.min_lambda}")
        return self


PTN_DEFAULTS = PTNConfig()


def ptn_schedule(
    full_importance: dict[str, Tensor],
    forget_importance: dict[str, Tensor],
    forget_fraction: float,
    config: PTNConfig = PTN_DEFAULTS,
    lambda_phase: bool = True,
) -> list[Step]:
    config.check()
    ratios = importance_ratios(full_importance, forget_importance)
    if ratios.numel() == 0:
        raise UserError("no finite importance ratios: the forget-set importance is all zero")
    sorted_ratios = torch.sort(ratios).values
    adaptive_percentile(forget_fraction)  # validates the fraction
    growth, min_lambda = config.growth, config.min_lambda
    steps: list[Step] = []
    seen: set[tuple[float, float]] = set()

    def add(alpha: float, lam: float, s: float | None = None, p: float | None = None) -> None:
        if (alpha, lam) not in seen:
            seen.add((alpha, lam))
            steps.append(Step(len(steps), alpha, lam, s, p))

    s = forget_fraction / config.start_divisor
    for _ in range(config.max_steps):
        p = max(0.0, 100.0 - math.log(1.0 + 100.0 * s))
        alpha = percentile_of_sorted(sorted_ratios, p)
        if alpha <= 1.0:
            break
        add(alpha, 1.0, s, p)
        s *= growth
    if lambda_phase:
        lam = 1.0
        while lam / growth >= min_lambda:
            add(1.0, lam)
            lam /= growth
        add(1.0, lam)  # the smallest lambda >= min_lambda, kept for the threshold phase
        alpha = 1.0 / growth
        while alpha >= min_lambda:
            add(alpha, lam)
            alpha /= growth
    return steps


def dampened_copy(model: nn.Module, full_importance, forget_importance, step: Step) -> nn.Module:
    new_model = copy.deepcopy(model)
    dampen_(new_model, full_importance, forget_importance, step.alpha, step.lam)
    return new_model


def first_meeting(results: list[tuple[Step, float]], target: float) -> Step | None:
    """The lowest-index step whose accuracy is <= target (results may be in any order)."""
    meeting = [step for step, acc in results if acc <= target]
    return min(meeting, key=lambda step: step.index) if meeting else None


def sequential_search(
    model: nn.Module,
    full_importance: dict[str, Tensor],
    forget_importance: dict[str, Tensor],
    schedule: list[Step],
    forget_accuracy: Callable[[nn.Module], float],
    target: float,
    on_step: Callable[[Step, float], None] | None = None,
) -> SearchResult:
    """The reference loop: evaluate steps in order, stop at the first that meets the target."""
    path: list[tuple[Step, float]] = []
    for step in schedule:
        acc = forget_accuracy(dampened_copy(model, full_importance, forget_importance, step))
        path.append((step, acc))
        log.debug("PTN step %d: alpha %.4g, lambda %.4g -> forget accuracy %.4f (target %.4f)",
                  step.index, step.alpha, step.lam, acc, target)
        if on_step is not None:
            on_step(step, acc)
        if acc <= target:
            return SearchResult(step, target, path)
    return SearchResult(None, target, path)


def forget_target(
    request_kind: str,
    original_test_acc: float | None = None,
    original_forget_acc: float | None = None,
    rho: float | None = None,
) -> float:
    """What retraining would give, per kind of request (docs/methods.md#forget-targets).

    whole class -> near 0 (CLASS_TARGET); random samples and sub-classes -> the model's
    accuracy on data it never saw (its test accuracy on the forget set's class mix, fine
    classes for a sub-class, computed by the caller: a model retrained without a sub-class
    still recognises its coarse class through the siblings); poison -> rho * A_0.
    """
    if rho is not None:
        if original_forget_acc is None:
            raise ValueError("a rho target needs the original forget-set accuracy")
        return rho * original_forget_acc
    if request_kind == "class":
        return CLASS_TARGET
    if original_test_acc is None:
        raise ValueError("a random-sample target needs the original test accuracy")
    return original_test_acc


CLASS_TARGET = 0.01


def request_rho(request_kind: str, rho: float | None) -> float | None:
    """The rho a request uses: the given one, else PTNConfig.poison_rho for poison requests."""
    if rho is None and request_kind == "poison":
        return PTN_DEFAULTS.poison_rho
    return rho
