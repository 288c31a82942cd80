"""Forget-accuracy targets: what a search aims at, per kind of request
(docs/methods.md#forget-targets)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unlearning.errors import UserError
from unlearning.search import PTN_DEFAULTS


def forget_target(
    request_kind: str,
    original_test_acc: float | None = None,
    original_forget_acc: float | None = None,
    rho: float | None = None,
    unseen_se: float = 0.0,
    forget_size: int | None = None,
) -> float:
    """What retraining would give, per kind of request (docs/methods.md#forget-targets).

    whole class -> near 0 (CLASS_TARGET); random samples and sub-classes -> the model's
    accuracy on data it never saw (its test accuracy on the forget set's class mix, fine
    classes for a sub-class, computed by the caller: a model retrained without a sub-class
    still recognises its coarse class through the siblings): A_mix. When D_f scores above it
    (`original_forget_acc`, over `forget_size` rows) the target may rise by up to UNSEEN_Z
    standard errors `unseen_se` (a retrained model's accuracy on these rows scatters around
    A_mix), but stays at least one row below the original's; poison -> rho * A_0.
    """
    if rho is not None:
        if original_forget_acc is None:
            raise ValueError("a rho target needs the original forget-set accuracy")
        return rho * original_forget_acc
    if request_kind == "class":
        return CLASS_TARGET
    if original_test_acc is None:
        raise ValueError("a random-sample target needs the original test accuracy")
    if math.isnan(original_test_acc):
        raise UserError("the test split has no rows of the forget set's classes, so there is no "
                        "unseen-data target: give the search a target (--param target=...)")
    if original_forget_acc is None or forget_size is None or original_forget_acc <= original_test_acc:
        return original_test_acc
    one_row_below = original_forget_acc - 1 / forget_size
    return max(original_test_acc, min(original_test_acc + UNSEEN_Z * unseen_se, one_row_below))


def slack_targets(target: float, original_forget_acc: float, forget_size: int) -> list[float]:
    """A rho target, then the looser targets its slack allows, ascending: one per forget row more
    that may stay right, up to UNSEEN_Z binomial standard errors above rho * A_0 and at least one
    row below A_0. rho * A_0 stands for what a healed model scores on D_f; over |D_f| rows that
    score scatters, most where D_f holds real members of its label class, which a healed model
    still gets right (docs/methods.md#forget-targets). A looser target sits half a row above its
    row count, so float rounding of an accuracy never decides it."""
    if forget_size < 1:
        return [target]
    spread = UNSEEN_Z * math.sqrt(target * (1 - target) / forget_size)
    highest = min(target + spread, original_forget_acc - 1 / forget_size)
    rows = range(math.floor(target * forget_size) + 1, math.floor(highest * forget_size + 1e-9) + 1)
    return [target] + [(k + 0.5) / forget_size for k in rows]


CLASS_TARGET = 0.01
# How many standard errors above A_mix D_f's accuracy may stay: a model that never saw D_f
# scores above A_mix + 2 SE on it about 2 % of the time (docs/methods.md#forget-targets). Rows
# that score above A_mix always lose at least one correct prediction, however small D_f is.
UNSEEN_Z = 2.0


def unseen_accuracy(correct: Tensor, groups_test: Tensor, groups_forget: Tensor) -> tuple[float, float]:
    """A_mix and its standard error, from the original's test outcomes.

    `correct` is 1/0 per test row, `groups_*` the (fine) class of each test and forget row.
    A_mix is the mean over forget rows of their class's test accuracy a_c. Its standard error
    as a prediction of a retrained model's accuracy on D_f adds two variances: D_f's rows are
    Bernoulli draws, sum_x a_c(x) (1 - a_c(x)) / |D_f|^2, and each a_c is itself estimated
    from n_c test rows, sum_c (m_c / |D_f|)^2 a_c (1 - a_c) / n_c (m_c: D_f's rows in class c).
    Forget rows of a class without test rows are left out of both; (nan, nan) if that is all of them.
    """
    size = int(max(groups_test.max(), groups_forget.max())) + 1
    count = torch.bincount(groups_test, minlength=size).double()
    hits = torch.bincount(groups_test, weights=correct.double(), minlength=size)
    known = count > 0
    n, m = count[known], torch.bincount(groups_forget, minlength=size).double()[known]
    a = hits[known] / n
    n_forget = float(m.sum())
    if n_forget == 0:
        return float("nan"), float("nan")
    mix = float((m * a).sum() / n_forget)
    var_rows = float((m * a * (1 - a)).sum()) / n_forget**2
    var_estimate = float(((m / n_forget) ** 2 * a * (1 - a) / n).sum())
    return mix, math.sqrt(var_rows + var_estimate)


def request_rho(request_kind: str, rho: float | None) -> float | None:
    """The rho a request uses: the given one, else PTNConfig.poison_rho for poison requests."""
    if rho is None and request_kind == "poison":
        return PTN_DEFAULTS.poison_rho
    return rho
