"""SSD, LFSSD, ASSD, Potion and the PTN-style search (docs/methods.md#methods)."""

from __future__ import annotations

from unlearning.dampening import adaptive_alpha, check_strengths, ssd
from unlearning.errors import UserError
from unlearning.methods.registry import MethodOutput, register_method
from unlearning.methods.task import UnlearningTask
from unlearning.retained import search_with_slack
from unlearning.search import (
    PTN_DEFAULTS,
    PTNConfig,
    PTNWalk,
    dampened_copy,
    path_entry,
    ptn_search,
)
from unlearning.settling import search_ceiling


def _fixed(task: UnlearningTask, kind: str, reference: str, alpha: float, lam: float) -> MethodOutput:
    check_strengths(alpha, lam)
    full = task.importance(reference, kind)
    forget = task.importance("forget", kind)
    return MethodOutput(ssd(task.model, full, forget, alpha, lam), {"alpha": alpha, "lambda": lam, "kind": kind})


def _adaptive(task: UnlearningTask, kind: str, lam: float) -> MethodOutput:
    full = task.importance("retain", kind)
    forget = task.importance("forget", kind)
    alpha = adaptive_alpha(full, forget, task.forget_fraction)
    output = _fixed(task, kind, "retain", alpha, lam)
    output.details["forget_fraction"] = task.forget_fraction
    return output


@register_method("ssd", alpha=10.0, lam=1.0)
def ssd_method(task: UnlearningTask, alpha: float, lam: float) -> MethodOutput:
    """Selective Synaptic Dampening with fixed alpha, lambda (Fisher importance over D)."""
    return _fixed(task, "fisher", "full", alpha, lam)


@register_method("lfssd", alpha=10.0, lam=1.0)
def lfssd_method(task: UnlearningTask, alpha: float, lam: float) -> MethodOutput:
    """Loss-free SSD: label-free l2 importance, fixed alpha, lambda."""
    return _fixed(task, "l2", "full", alpha, lam)


@register_method("assd", lam=1.0)
def assd_method(task: UnlearningTask, lam: float) -> MethodOutput:
    """Adaptive SSD: alpha from the ratio percentile p = 100 - ln(1 + 100 s), I^D on D_r."""
    return _adaptive(task, "fisher", lam)


@register_method("potion_step", lam=1.0)
def potion_step_method(task: UnlearningTask, lam: float) -> MethodOutput:
    """Potion's single adaptive step, no walk: l2-norm importance, adaptive alpha, I^D on D_r."""
    return _adaptive(task, "l2_norm", lam)


# The walk's settings a request may override; their defaults live in PTNConfig alone.
WALK = {key: getattr(PTN_DEFAULTS, key)
        for key in ("growth", "max_steps", "start_divisor", "walk_back", "refine", "max_retain_drop", "relax_after_drop",
                    "settle_early")}
PAPER = {"walk_back": False, "refine": False, "relax_after_drop": 1.0}  # the papers' walk: forward from s_0 only


@register_method("ptn", kind=None, reference="full", target=None, rho=None, **WALK)
def ptn_method(
    task: UnlearningTask,
    kind: str | None,
    reference: str,
    target: float | None,
    rho: float | None,
    growth: float,
    max_steps: int,
    start_divisor: float,
    walk_back: bool,
    refine: bool,
    max_retain_drop: float = PTN_DEFAULTS.max_retain_drop,
    relax_after_drop: float = PTN_DEFAULTS.relax_after_drop,
    settle_early: bool = PTN_DEFAULTS.settle_early,
) -> MethodOutput:
    """PTN-style search: the least aggressive dampening that brings D_f accuracy to the target,
    walking back when the first step already meets it, then refined for retained accuracy; a rho
    target that costs more than `relax_after_drop` is searched again with its slack.

    `start_divisor` sets s_0 = |D_f| / N / start_divisor (default in PTNConfig); larger starts gentler.
    `kind` None: the request's (`UnlearningTask.search_kind`: l2 for a sub-class, else fisher).
    `settle_early`: a step's pass over D_f stops once it misses every target (the same answer;
    false gives every step's exact accuracy in the path).
    """
    if reference not in ("full", "retain"):
        raise UserError(f"ptn reference must be 'full' or 'retain', got {reference!r}")
    kind = kind or task.search_kind()
    rho, given = task.search_rho(rho), target
    target = task.search_target(given, rho)
    full = task.importance(reference, kind)
    forget = task.importance("forget", kind)
    config = PTNConfig(growth=growth, max_steps=max_steps, start_divisor=start_divisor, walk_back=walk_back,
                       refine=refine, max_retain_drop=max_retain_drop, relax_after_drop=relax_after_drop,
                       settle_early=settle_early).check()

    targets = task.search_targets(target, given, rho)
    ceiling = search_ceiling(targets, settle_early)  # a pass past every target settles its step (AtLeast)

    def evaluate(steps):
        accuracies = [task.forget_accuracy(dampened_copy(task.model, full, forget, step), ceiling) for step in steps]
        for step, acc in zip(steps, accuracies):
            if task.progress is not None:
                task.progress({"step": step.index, "forget_acc": acc})
        return accuracies

    retain_accuracy = task.retained_scorer(full, forget, config.retain_sample)
    walks = []

    def search(goal):
        walks.append(PTNWalk(full, forget, task.forget_fraction, goal, config))
        return ptn_search(walks[-1], evaluate, retain_accuracy)

    sample = task.retain_sample(config.retain_sample)
    target, result, chosen, details = search_with_slack(
        search, targets, retain_accuracy, task.accuracy(task.model, sample), len(sample), config,
    )
    output = _fixed(task, kind, reference, chosen.alpha, chosen.lam)
    output.params.update({"target": target, "rho": rho, "reference": reference, "step": chosen.index})
    output.details.update(
        {
            "reached": result.reached,
            "schedule_length": len(walks[0].schedule),  # the same for any target
            "path": [path_entry(step, acc) for step, acc in result.path],
            **details,
        }
    )
    return output


@register_method("ptn_paper", kind="fisher", reference="full", target=None, rho=None, growth=PTN_DEFAULTS.growth,
                 max_steps=PTN_DEFAULTS.max_steps, start_divisor=PTN_DEFAULTS.start_divisor,
                 max_retain_drop=PTN_DEFAULTS.max_retain_drop)
def ptn_paper_method(task: UnlearningTask, kind: str, reference: str, target: float | None, rho: float | None,
                     growth: float, max_steps: int, start_divisor: float, max_retain_drop: float) -> MethodOutput:
    """The PTN walk as the Potion paper runs it: forward from s_0, no walk back, no refinement."""
    return ptn_method(task, kind, reference, target, rho, growth, max_steps, start_divisor, **PAPER,
                      max_retain_drop=max_retain_drop)


@register_method("potion", target=None, rho=None, **WALK)
def potion_method(
    task: UnlearningTask, target: float | None, rho: float | None, growth: float, max_steps: int,
    start_divisor: float, walk_back: bool, refine: bool, max_retain_drop: float, relax_after_drop: float,
    settle_early: bool,
) -> MethodOutput:
    """Potion: l2-norm importance, I^D on D_r, the PTN walk to rho x A_0 (poison), with this
    project's walk back and refinement (`potion_paper` without them)."""
    return ptn_method(task, "l2_norm", "retain", target, rho, growth, max_steps, start_divisor, walk_back, refine,
                      max_retain_drop, relax_after_drop, settle_early)


@register_method("potion_paper", target=None, rho=None, growth=PTN_DEFAULTS.growth, max_steps=PTN_DEFAULTS.max_steps,
                 start_divisor=PTN_DEFAULTS.start_divisor, max_retain_drop=PTN_DEFAULTS.max_retain_drop)
def potion_paper_method(task: UnlearningTask, target: float | None, rho: float | None, growth: float,
                        max_steps: int, start_divisor: float, max_retain_drop: float) -> MethodOutput:
    """Potion exactly as in its paper (l2-norm importance, I^D on D_r, the forward PTN walk), with
    this project's ceiling on retained damage."""
    return ptn_method(task, "l2_norm", "retain", target, rho, growth, max_steps, start_divisor, **PAPER,
                      max_retain_drop=max_retain_drop)
