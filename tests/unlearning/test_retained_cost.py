"""The search's ceiling on retained damage (docs/implementation-notes.md, "A ceiling on retained damage")."""

from __future__ import annotations

import pytest

import unlearning
from tests.unlearning.test_methods import make_task
from unlearning.errors import UserError
from unlearning.methods.registry import check_params
from unlearning.retained import check_retained_cost
from unlearning.search import PTN_DEFAULTS, PTNConfig


def test_the_cost_is_returned_at_or_below_the_ceiling_and_refused_above_it():
    assert check_retained_cost(0.9, 0.85, 0.1, 2000, 0.05) == {"retain_sample_acc_before": 0.9, "retain_sample_acc": 0.85}
    assert check_retained_cost(0.9, 0.95, 0.0, 2000, 0.05)["retain_sample_acc"] == 0.95  # a gain is no cost
    with pytest.raises(UserError) as caught:
        check_retained_cost(0.9, 0.7, 0.1, 2000, 0.088)
    message = str(caught.value)
    assert "costs 20.0 points" in message and "90.0 -> 70.0 % on 2000 seeded retained rows" in message
    assert "target, 8.8 %" in message and "max_retain_drop=0.1" in message and "\n" not in message
    assert PTN_DEFAULTS.max_retain_drop == 0.10
    with pytest.raises(UserError, match="max_retain_drop must be in"):
        PTNConfig(max_retain_drop=1.5).check()
    for bad in (-1, 1.5, float("nan")):  # a request's --param, refused before any work
        with pytest.raises(UserError, match=r"max_retain_drop must be a finite number in \[0, 1\]"):
            check_params("ptn", {"max_retain_drop": bad})
    check_params("potion", {"max_retain_drop": 0.0})


@pytest.mark.parametrize("method", ["ptn", "potion_paper"])
def test_a_target_only_a_wrecked_model_meets_is_refused_unless_the_ceiling_is_lifted(digits, digits_model, method):
    # 50 % on 200 random rows of every class (unseen rows score ~98 %): only a wrecked model meets it
    task = make_task(digits, digits_model, "random:200", importance_mode="batch")
    with pytest.raises(UserError, match=r"costs \d+\.\d points of retained accuracy .* more than max_retain_drop=0.1;"):
        unlearning.run_method(method, task, target=0.5)
    task = make_task(digits, digits_model, "random:200", importance_mode="batch")
    output = unlearning.run_method(method, task, target=0.5, max_retain_drop=1.0)
    before, after = output.details["retain_sample_acc_before"], output.details["retain_sample_acc"]
    assert before > 0.97 and after < before - 0.3  # the walk's answer, now accepted, with its cost on record


def test_a_default_class_request_records_its_cost_and_passes(digits, digits_model):
    task = make_task(digits, digits_model, "class:3", importance_mode="batch")
    output = unlearning.run_method("ptn", task)
    before, after = output.details["retain_sample_acc_before"], output.details["retain_sample_acc"]
    assert before - after <= 0.01  # forgetting a digit class costs the other classes almost nothing
