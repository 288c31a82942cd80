"""A rho target's slack (docs/methods.md#forget-targets; docs/implementation-notes.md, "A rho
target's slack"): rho * A_0 stands for what a healed model scores on D_f, and a poison drawn
from every class puts real members of the target class in D_f, which a healed model gets right."""

from __future__ import annotations

import pytest

import unlearning
from tests.unlearning.test_methods import accuracy, make_task
from unlearning.methods.registry import check_params
from unlearning.metrics import attack_success_rate, healed_fraction
from unlearning.search import PTN_DEFAULTS, PTNConfig
from unlearning.targets import slack_targets


def test_looser_targets_step_one_row_up_to_two_standard_errors_and_one_row_below_a0():
    # 0.09 over 50 rows: 2 SE = 2 sqrt(0.09 x 0.91 / 50) = 0.081, so up to 8 of 50 rows (0.16) may stay right
    assert slack_targets(0.09, 0.9, 50) == pytest.approx([0.09, 0.11, 0.13, 0.15, 0.17])
    assert slack_targets(0.09, 0.12, 50) == pytest.approx([0.09, 0.11])  # at most 5 rows: one below A_0's 6
    assert slack_targets(0.0, 0.9, 50) == [0.0]  # rho = 0 asks for every row wrong: no slack
    assert slack_targets(0.09, 0.9, 0) == [0.09]
    assert PTN_DEFAULTS.relax_after_drop == 0.01
    with pytest.raises(unlearning.UserError, match=r"relax_after_drop must be in \[0, 1\]"):
        PTNConfig(relax_after_drop=2).check()
    with pytest.raises(unlearning.UserError, match=r"relax_after_drop must be a finite number in \[0, 1\]"):
        check_params("potion", {"relax_after_drop": -0.5})


def scores(dataset, model, output) -> tuple[float, float]:
    """(healed fraction, clean test accuracy drop) of `output` against `model`."""
    normalize, poison = dataset.normalization(), dataset.poison
    asr = attack_success_rate(model, poison.triggered_test, 0, normalize)
    healed = healed_fraction(asr, attack_success_rate(output.model, poison.triggered_test, 0, normalize))
    return healed, accuracy(model, dataset.test, normalize) - accuracy(output.model, dataset.test, normalize)


def test_the_slack_spares_real_target_class_rows_and_the_papers_walk_takes_none(poisoned_digits):
    dataset, model = poisoned_digits
    poison = dataset.poison
    found = set(poison.identified.ids.tolist())
    real_zeros = sum(int(i) in found for i, c in zip(poison.poisoned_ids, poison.clean_labels) if c == 0)
    assert real_zeros == 4  # of the 36 identified rows: a healed model still calls them 0

    strict = unlearning.run_method("potion", make_task(dataset, model, "poison:identified"), relax_after_drop=1.0)
    slack = unlearning.run_method("potion", make_task(dataset, model, "poison:identified"))
    target = strict.params["target"]
    assert target == pytest.approx(0.1 * 1.0) and len(strict.details["slack"]["tried"]) == 1
    strict_healed, strict_drop = scores(dataset, model, strict)
    healed, drop = scores(dataset, model, slack)
    # the strict target (at most 3 of 36 right) breaks the zeros themselves: 20 test rows lost
    assert strict_healed == 1.0 and strict_drop > 0.04
    # the slack's answer lets 5 of 36 stay right (bisected between the strict target and 7 rows)
    tried = slack.details["slack"]["tried"]
    assert [round(t["target"] * 36, 1) for t in tried] == [3.6, 4.5, 5.5, 7.5] and slack.params["target"] == tried[2]["target"]
    assert tried[-1]["retain_acc"] - tried[2]["retain_acc"] <= 0.01 < tried[-1]["retain_acc"] - tried[1]["retain_acc"]
    assert drop < 0.01 and healed >= 0.9
    assert slack.details["retain_sample_acc"] - strict.details["retain_sample_acc"] > 0.03

    paper = unlearning.run_method("potion_paper", make_task(dataset, model, "poison:identified"))
    assert paper.params["target"] == target and len(paper.details["slack"]["tried"]) == 1


def test_a_class_request_and_a_given_target_take_no_slack(digits, digits_model, poisoned_digits):
    assert make_task(digits, digits_model, "class:3").search_targets(0.01, None, None) == [0.01]
    dataset, model = poisoned_digits
    task = make_task(dataset, model, "poison:identified")
    assert task.search_targets(0.05, 0.05, 0.1) == [0.05]  # the user's own target is kept as given
    assert len(task.search_targets(0.1, None, 0.1)) == 5
