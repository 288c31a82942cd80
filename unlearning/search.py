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
model). The answer is the first step whose forget-set accuracy is <= the target; when that is
step 0 the walk goes back below it (`PTNWalk`: doubling, then bisection on the ladder), so the
answer does not depend on where the schedule starts. Every step depends only on the original
model and the two importances, so steps can be evaluated in any order or in parallel; the
in-process loop and the parallel walk drive the same `PTNWalk` and take the same answer. A
step's pass may stop once it misses every target (`unlearning.settling`): the same decisions.
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
from unlearning.settling import AtLeast

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


def path_entry(step: Step, accuracy: float) -> dict:
    """A walk step as reports record it; `stopped_early` marks an `AtLeast` accuracy."""
    entry = {**step.to_dict(), "forget_acc": float(accuracy)}
    return {**entry, "stopped_early": True} if isinstance(accuracy, AtLeast) else entry


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
    walk_back: bool = True  # step 0 already meets: walk below it to the least aggressive meeting step
    refine: bool = True  # then, among meeting steps at other lambdas, keep the most retained accuracy
    refine_keep: tuple[float, ...] = (0.25, 0.5)  # refinement's lambdas: keep x the answer's alpha
    retain_sample: int = 2000  # retained rows (seeded sample) refinement scores each candidate on
    chunk_size: int = 1  # steps per lockstep round of a search's actors (the parallel walk only)
    poison_rho: float = 0.1  # poison requests' default rho (the paper sweeps 0 ... 0.75)
    max_retain_drop: float = 0.10  # refuse an answer that costs more retained-sample accuracy
    relax_after_drop: float = 0.01  # a rho target costing more retained accuracy is re-sought with slack
    settle_early: bool = True  # a missed step's pass stops once past every target (AtLeast): same answer

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
        for name in ("max_retain_drop", "relax_after_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        return self


PTN_DEFAULTS = PTNConfig()


def sorted_ratios_of(full_importance: dict[str, Tensor], forget_importance: dict[str, Tensor]) -> Tensor:
    ratios = importance_ratios(full_importance, forget_importance)
    if ratios.numel() == 0:
        raise UserError("no finite importance ratios: the forget-set importance is all zero")
    return torch.sort(ratios).values


def ladder_step(sorted_ratios: Tensor, s0: float, growth: float, k: int, lam: float = 1.0) -> Step:
    """Step k of the alpha ladder s_k = s_0 * growth^k (at `lam`); k < 0 is gentler than the start."""
    s = s0 * growth**k
    p = max(0.0, 100.0 - math.log(1.0 + 100.0 * s))
    return Step(k, percentile_of_sorted(sorted_ratios, p), lam, s, p)


def ptn_schedule(
    full_importance: dict[str, Tensor],
    forget_importance: dict[str, Tensor],
    forget_fraction: float,
    config: PTNConfig = PTN_DEFAULTS,
    lambda_phase: bool = True,
) -> list[Step]:
    """The forward schedule: step 0 at s_0, then ever more aggressive (the module docstring)."""
    return _forward_schedule(sorted_ratios_of(full_importance, forget_importance), forget_fraction, config,
                             lambda_phase)


def _forward_schedule(sorted_ratios: Tensor, forget_fraction: float, config: PTNConfig,
                      lambda_phase: bool = True) -> list[Step]:
    config.check()
    adaptive_percentile(forget_fraction)  # validates the fraction
    growth, min_lambda = config.growth, config.min_lambda
    steps: list[Step] = []
    seen: set[tuple[float, float]] = set()

    def add(alpha: float, lam: float, s: float | None = None, p: float | None = None) -> None:
        if (alpha, lam) not in seen:
            seen.add((alpha, lam))
            steps.append(Step(len(steps), alpha, lam, s, p))

    s0 = forget_fraction / config.start_divisor
    for k in range(config.max_steps):
        step = ladder_step(sorted_ratios, s0, growth, k)
        if step.alpha <= 1.0:
            break
        add(step.alpha, 1.0, step.s, step.percentile)
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


class LadderBoundary:
    """The least aggressive step of the ladder (at one lambda) that meets the target.

    From `start` the search doubles its stride away from it (gentler while steps meet, more
    aggressive while they miss) until the outcome flips, then bisects between the last miss
    and the first meeting index: about 2 log2(distance) evaluations. `lowest` is a ladder index
    gentle enough to dampen nothing, `highest` the most aggressive one the walk allows. The
    answer is a meeting step whose gentler neighbour misses: the least aggressive meeting step
    when forget accuracy falls monotonically along the ladder.
    """

    def __init__(self, ladder: Callable[[int, float], Step], lam: float, start: int, lowest: int, highest: int,
                 target: float):
        self.ladder, self.lam, self.start, self.target = ladder, lam, start, target
        self.lowest, self.highest = lowest, highest
        self.accuracy: dict[int, float] = {}
        self.steps: dict[int, Step] = {}

    def record(self, step: Step, accuracy: float) -> None:
        self.steps[step.index], self.accuracy[step.index] = step, accuracy

    def next_index(self) -> int | None:
        if not self.accuracy:
            return self.start
        meeting = [k for k, acc in self.accuracy.items() if acc <= self.target]
        if meeting:
            first = min(meeting)
            misses = [k for k in self.accuracy if k < first]
            if misses:
                return None if first - max(misses) <= 1 else (max(misses) + first) // 2
            if first <= self.lowest:
                return None  # even the gentlest step meets
            return max(self.lowest, self.start - max(1, 2 * (self.start - first)))
        last = max(self.accuracy)
        if last >= self.highest:
            return None  # no step of this ladder meets
        return min(self.highest, self.start + max(1, 2 * (last - self.start)))

    def pending(self) -> list[Step]:
        index = self.next_index()
        return [] if index is None else [self.ladder(index, self.lam)]

    def answer(self) -> Step | None:
        meeting = [k for k, acc in self.accuracy.items() if acc <= self.target]
        return self.steps[min(meeting)] if meeting else None


GENTLEST = -1024  # s_0 / 1.1^1024 ~ 0: p = 100, alpha = the largest ratio, nothing is dampened


class PTNWalk:
    """The walk as a state machine that every executor drives the same way.

    `pending()` gives the next steps to evaluate on D_f (in any order, or in parallel);
    `record()` takes their accuracies; when `pending()` is empty, `result()` is the answer.
    Both the in-process loop and the parallel walk on Ray drive it, so they take the same
    decisions from the same accuracies and return the same answer.

    Forward: the schedule's steps in order (`chunk` at a time) until one meets the target.
    Walk back (`config.walk_back`): if the very first step already meets it, the start was too
    aggressive for this model, so a `LadderBoundary` follows the ladder below step 0 (index -j
    is s_0 / growth^j) to the least aggressive meeting step.
    """

    def __init__(self, full_importance, forget_importance, forget_fraction: float, target: float,
                 config: PTNConfig = PTN_DEFAULTS, lambda_phase: bool = True):
        self.ratios = sorted_ratios_of(full_importance, forget_importance)
        self.schedule = _forward_schedule(self.ratios, forget_fraction, config, lambda_phase)
        self.s0, self.config, self.target = forget_fraction / config.start_divisor, config, target
        self.accuracy: dict[int, float] = {}  # step index -> forget accuracy
        self.steps: dict[int, Step] = {}
        self._known: dict[tuple[float, float], float] = {}  # (alpha, lambda) -> accuracy
        self.back: LadderBoundary | None = None

    def ladder(self, k: int, lam: float = 1.0) -> Step:
        return ladder_step(self.ratios, self.s0, self.config.growth, k, lam)

    def ladder_index(self, step: Step) -> int:
        return round(math.log(step.s / self.s0) / math.log(self.config.growth))

    def highest(self) -> int:
        """The ladder index of the most aggressive alpha-phase step."""
        return max((self.ladder_index(step) for step in self.schedule if step.s is not None), default=0)

    def record(self, step: Step, accuracy: float) -> None:
        self.steps[step.index], self.accuracy[step.index] = step, accuracy
        self._known[(step.alpha, step.lam)] = accuracy
        if step.index < 0:
            self.back.record(step, accuracy)

    def answer_index(self) -> int | None:
        meeting = [i for i in self.accuracy if self.accuracy[i] <= self.target]
        return min(meeting) if meeting else None

    def pending(self, chunk: int = 1) -> list[Step]:
        while True:
            steps = self._next(chunk)
            fresh = [step for step in steps if (step.alpha, step.lam) not in self._known]
            for step in steps:
                if step not in fresh:  # the same dampening as an evaluated step: the same model
                    self.record(step, self._known[(step.alpha, step.lam)])
            if fresh or not steps:
                return fresh

    def _next(self, chunk: int) -> list[Step]:
        answer = self.answer_index()
        if answer is None:
            done = max(self.accuracy, default=-1) + 1
            return self.schedule[done : done + chunk]
        if answer > 0 or not self.config.walk_back or self.schedule[0].s is None:
            return []
        if self.back is None:
            self.back = LadderBoundary(self.ladder, 1.0, 0, GENTLEST, 0, self.target)
            self.back.record(self.steps[0], self.accuracy[0])
        return self.back.pending()

    def result(self) -> SearchResult:
        """The answer and its path: every evaluated step up to the answer, gentlest first."""
        answer = self.answer_index()  # forward steps a chunk evaluated past the answer are left out
        limit = max(answer, 0) if answer is not None else max(self.accuracy, default=-1)
        path = [(self.steps[i], self.accuracy[i]) for i in sorted(self.accuracy) if i <= limit]
        return SearchResult(self.steps[answer] if answer is not None else None, self.target, path)


class Refinement:
    """Retained damage as part of the answer (docs/methods.md#ptn-search, "Refinement").

    The walk's answer (alpha*, lambda = 1) shrinks every selected parameter to at most
    1 / alpha* of its value: near zero when alpha* is large. With lambda = keep * alpha* a
    selected parameter keeps up to `keep` of its value (beta = min(lambda / r, 1)), so a gentler
    shrink of more parameters; for each `config.refine_keep` a `LadderBoundary` finds that
    lambda's least aggressive meeting step from the answer's ladder index. The boundaries
    advance together, so a parallel executor evaluates their probes in one round. `choose()`
    scores every candidate's retained accuracy and keeps the best; ties keep the walk's answer.
    """

    def __init__(self, walk: PTNWalk, answer: Step | None):
        self.answer = answer
        alpha_phase = answer is not None and answer.s is not None
        keep = walk.config.refine_keep if walk.config.refine and alpha_phase else ()
        lambdas = sorted({share * answer.alpha for share in keep} - {answer.lam}) if keep else []
        start = walk.ladder_index(answer) if alpha_phase else 0
        self.boundaries = {
            lam: LadderBoundary(walk.ladder, lam, start, GENTLEST, walk.highest(), walk.target) for lam in lambdas
        }

    def pending(self, chunk: int = 1) -> list[Step]:
        return [step for boundary in self.boundaries.values() for step in boundary.pending()]

    def record(self, step: Step, accuracy: float) -> None:
        self.boundaries[step.lam].record(step, accuracy)

    def candidates(self) -> list[Step]:
        found = [boundary.answer() for boundary in self.boundaries.values()]
        return [self.answer] + [step for step in found if step is not None] if self.answer else []

    def choose(self, retain_accuracy: Callable[[Step], float]) -> tuple[Step | None, list[dict]]:
        """(the candidate with the best retained accuracy, every candidate's scores)."""
        scored = [(step, retain_accuracy(step)) for step in self.candidates()] if self.boundaries else []
        if not scored:
            return self.answer, []
        best = max(scored, key=lambda pair: pair[1])[0]  # max keeps the first of equals: the answer
        return best, [{**step.to_dict(), "retain_acc": acc, "chosen": step == best} for step, acc in scored]

    def path(self) -> list[dict]:
        return [path_entry(boundary.steps[k], acc)
                for boundary in self.boundaries.values() for k, acc in sorted(boundary.accuracy.items())]


def drive(machine, evaluate: Callable[[list[Step]], list[float]], chunk: int = 1) -> None:
    """Evaluate what `machine` (a PTNWalk or a Refinement) asks for until it asks for nothing."""
    while steps := machine.pending(chunk):
        for step, acc in zip(steps, evaluate(steps), strict=True):
            machine.record(step, acc)


def ptn_search(
    walk: PTNWalk, evaluate: Callable[[list[Step]], list[float]], retain_accuracy: Callable[[Step], float],
    chunk: int = 1,
) -> tuple[SearchResult, Step | None, dict]:
    """The walk, then its refinement: (the walk's result, the step to apply, details)."""
    drive(walk, evaluate, chunk)
    result = walk.result()
    refinement = Refinement(walk, result.step)
    drive(refinement, evaluate)
    chosen, scores = refinement.choose(retain_accuracy)
    return result, chosen, {"refinement": refinement.path(), "candidates": scores}


def sequential_search(
    model: nn.Module,
    full_importance: dict[str, Tensor],
    forget_importance: dict[str, Tensor],
    walk: PTNWalk,
    forget_accuracy: Callable[[nn.Module], float],
    on_step: Callable[[Step, float], None] | None = None,
) -> SearchResult:
    """The reference loop: drive `walk` one step at a time, in this process."""

    def evaluate(steps: list[Step]) -> list[float]:
        accuracies = []
        for step in steps:
            acc = forget_accuracy(dampened_copy(model, full_importance, forget_importance, step))
            log.debug("PTN step %d: alpha %.4g, lambda %.4g -> forget accuracy %.4f (target %.4f)",
                      step.index, step.alpha, step.lam, acc, walk.target)
            if on_step is not None:
                on_step(step, acc)
            accuracies.append(acc)
        return accuracies

    drive(walk, evaluate)
    return walk.result()
