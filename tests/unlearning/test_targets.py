"""Forget-accuracy targets (docs/methods.md#forget-targets): A_mix and its standard error."""

import math

import pytest
import torch

from unlearning.errors import UserError
from unlearning.targets import CLASS_TARGET, UNSEEN_Z, forget_target, unseen_accuracy


def test_unseen_accuracy_weights_classes_by_the_forget_mix_and_adds_both_variances():
    # Test rows: class 0 right 2 of 4 (a = 0.5), class 1 right 2 of 2 (a = 1), class 2 none.
    correct = torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool)
    groups_test = torch.tensor([0, 0, 0, 0, 1, 1])
    # Forget rows: three of class 0, one of class 1, one of class 2 (no test rows: left out).
    groups_forget = torch.tensor([0, 0, 0, 1, 2])
    mix, se = unseen_accuracy(correct, groups_test, groups_forget)
    assert mix == pytest.approx((3 * 0.5 + 1 * 1.0) / 4)
    var_rows = (3 * 0.25 + 1 * 0.0) / 4**2
    var_estimate = (3 / 4) ** 2 * 0.25 / 4 + (1 / 4) ** 2 * 0.0 / 2
    assert se == pytest.approx(math.sqrt(var_rows + var_estimate))


def test_unseen_accuracy_without_any_known_class_is_nan_and_the_target_says_so():
    mix, se = unseen_accuracy(torch.tensor([True]), torch.tensor([0]), torch.tensor([1, 1]))
    assert math.isnan(mix) and math.isnan(se)
    with pytest.raises(UserError, match="no rows of the forget set's classes.*--param target="):
        forget_target("random", original_test_acc=mix, unseen_se=se)


def test_targets_per_kind_of_request():
    assert forget_target("class", original_test_acc=0.8, unseen_se=0.1) == CLASS_TARGET
    # poison: rho x A_0, no standard error
    assert forget_target("poison", original_test_acc=0.8, original_forget_acc=0.9, rho=0.1, unseen_se=0.1) == pytest.approx(0.09)


def unseen_target(forget_acc: float, size: int, mix: float = 0.78, se: float = 0.013) -> float:
    return forget_target("random", original_test_acc=mix, original_forget_acc=forget_acc, unseen_se=se, forget_size=size)


def test_rows_above_unseen_data_may_stay_up_to_two_standard_errors_above_it():
    assert unseen_target(0.85, 1000) == pytest.approx(0.78 + UNSEEN_Z * 0.013)
    # ... but always lose at least one correct prediction, however few they are
    assert unseen_target(0.80, 1000) == pytest.approx(0.80 - 1 / 1000)
    assert unseen_target(1.0, 5, mix=0.9, se=0.13) == pytest.approx(0.9)  # 4 of 5 is already below A_mix
    assert unseen_target(1.0, 20, mix=0.994, se=0.018) == pytest.approx(0.994)
    # rows at or below A_mix: the target is A_mix, nothing to forget
    assert unseen_target(0.75, 1000) == 0.78
    assert unseen_target(0.78, 100, se=0.04) == 0.78


def test_a_model_that_never_saw_the_rows_lands_above_the_target_about_2_percent_of_the_time():
    """Simulated: per-class true accuracies p_c, the original's test outcomes (1,000 rows a
    class) estimate them, and a model that never saw D_f (1,000 rows of the class mix) is right
    on each row with its class's p_c. A target of A_mix alone forces such a model's accuracy
    down half the time; A_mix + 2 standard errors ~2.3 % of the time (P(N(0,1) > 2))."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.7, 0.8, 0.9, 0.95])
    groups_test = torch.arange(5).repeat_interleave(1000)
    trials, above, above_mix = 2000, 0, 0
    for _ in range(trials):
        correct = torch.rand(len(groups_test), generator=g) < p[groups_test]
        groups_forget = torch.randint(0, 5, (1000,), generator=g)
        unseen_rows = torch.rand(1000, generator=g) < p[groups_forget]
        mix, se = unseen_accuracy(correct, groups_test, groups_forget)
        accuracy = float(unseen_rows.double().mean())
        above += accuracy > mix + UNSEEN_Z * se
        above_mix += accuracy > mix
    assert 0.01 < above / trials < 0.04
    assert 0.45 < above_mix / trials < 0.55
