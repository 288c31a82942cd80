"""Settling a missed PTN step early (unlearning.settling; docs/implementation-notes.md, "Settling a
missed step early"): a step's pass over D_f stops once more rows are right than every target
allows, and the walk, its refinement and a rho target's slack take the decisions full passes take."""

from __future__ import annotations

import pytest

import unlearning
from tests.conftest import assert_same_walk
from tests.unlearning.test_methods import make_task
from unlearning.passes import predict_outcomes, rows_right
from unlearning.search import PTNConfig, PTNWalk, dampened_copy, path_entry, ptn_search
from unlearning.settling import AtLeast, rows_allowed


@pytest.mark.parametrize("rows", [1, 7, 36, 180, 5000, 49999])
def test_rows_allowed_is_the_largest_count_whose_accuracy_stays_at_the_ceiling(rows):
    for ceiling in (0.0, 0.01, 0.0987, 0.1, 1 / 3, 0.78, 0.999, 1.0, 1.5, -0.1, 7 / rows, 0.1 * 0.9868):
        allowed = rows_allowed(ceiling, rows)
        assert -1 <= allowed <= rows
        if allowed >= 0:
            assert allowed / rows <= ceiling
        if allowed < rows:
            assert (allowed + 1) / rows > ceiling  # one more right is past it
    assert rows_allowed(1.0, rows) == rows and rows_allowed(-0.1, rows) == -1
    assert rows_allowed(7 / rows, rows) == min(7, rows)


def test_rows_right_counts_what_a_full_pass_counts_and_stops_once_past_allowed(digits, digits_model):
    split = digits.test
    normalize = unlearning.checkpoint.model_meta(digits_model)["normalize"]
    [outcomes] = predict_outcomes([digits_model], split.batches(256, normalize=normalize))
    total = int((outcomes.pred == split.labels).sum())
    right_in_first = int((outcomes.pred[:64] == split.labels[:64]).sum())  # one forward of SETTLE_ROWS rows
    assert total > 300  # a trained model: most of 359 rows right

    rows = len(split)
    digits_model.train()  # the flag comes back as it was, stopped or not
    assert rows_right(digits_model, split.batches(256, normalize=normalize)) == (total, rows)
    assert rows_right(digits_model, split.batches(256, normalize=normalize), allowed=total) == (total, rows)
    # past `allowed` at the forward holding the last row right: the rows after that forward unread
    last = int((outcomes.pred == split.labels).nonzero().max())
    assert rows_right(digits_model, split.batches(256, normalize=normalize), allowed=total - 1) == (
        total, min(rows, (last // 64 + 1) * 64))
    assert rows_right(digits_model, split.batches(256, normalize=normalize), allowed=0) == (right_in_first, 64)
    assert digits_model.training
    digits_model.eval()


def _walks(task, target, **settings):
    """The walk and refinement with settling passes and with full passes: (settled, full)."""
    full, forget = task.importance("full", "fisher"), task.importance("forget", "fisher")
    sample = task.retain_sample(500)

    def run(ceiling):
        walk = PTNWalk(full, forget, task.forget_fraction, target, PTNConfig(**settings))
        return ptn_search(
            walk, lambda steps: [task.forget_accuracy(dampened_copy(task.model, full, forget, s), ceiling) for s in steps],
            lambda step: task.accuracy(dampened_copy(task.model, full, forget, step), sample),
        )

    return run(target), run(None)


@pytest.mark.parametrize("start_divisor", [25.0, 0.2])  # forward from the paper's start; back from an over-dampening one
def test_a_settled_walk_takes_the_steps_and_answer_of_full_passes(digits, digits_model, start_divisor):
    task = make_task(digits, digits_model, "class:5")
    (settled, chosen, details), (full, full_chosen, full_details) = _walks(task, 0.01, start_divisor=start_divisor)
    assert settled.reached and settled.step == full.step and chosen == full_chosen
    settled_path = [path_entry(*pair) for pair in settled.path]
    assert_same_walk(settled_path, [path_entry(*pair) for pair in full.path], 0.01)
    assert_same_walk(details.pop("refinement"), full_details.pop("refinement"), 0.01)
    assert details == full_details
    stopped = [(acc, exact) for (_, acc), (_, exact) in zip(settled.path, full.path) if isinstance(acc, AtLeast)]
    assert stopped  # the misses far from the target stopped after a forward or two
    assert all(0.01 < acc <= exact for acc, exact in stopped)  # a lower bound, past the target
    assert sum(acc for acc, _ in stopped) < sum(exact for _, exact in stopped)  # and fewer rows read


def test_the_method_settles_by_default_and_answers_as_with_full_passes(digits, digits_model):
    settled = unlearning.run_method("ptn", make_task(digits, digits_model, "class:5"))
    full = unlearning.run_method("ptn", make_task(digits, digits_model, "class:5"), settle_early=False)
    assert settled.params == full.params
    assert_same_walk(settled.details["path"], full.details["path"], settled.params["target"])
    assert any(entry.get("stopped_early") for entry in settled.details["path"])
    assert not any(entry.get("stopped_early") for entry in full.details["path"] + full.details["refinement"])
    with pytest.raises(unlearning.UserError, match="settle_early"):
        unlearning.methods.registry.check_params("ptn", {"settle_early": "sometimes"})


def test_a_rho_targets_slack_reads_settled_steps_as_full_ones(poisoned_digits, monkeypatch):
    """The slack walks again to looser targets with the steps it has scored: a pass stops only
    past the loosest, so no looser walk reads a lower bound as a meeting step. Forwards of 4 rows,
    so the 36-row D_f can stop early."""
    monkeypatch.setattr(unlearning.passes, "SETTLE_ROWS", 4)
    dataset, model = poisoned_digits
    settled = unlearning.run_method("potion", make_task(dataset, model, "poison:identified"))
    full = unlearning.run_method("potion", make_task(dataset, model, "poison:identified"), settle_early=False)
    tried = settled.details["slack"]["tried"]
    assert len(tried) > 1 and tried == full.details["slack"]["tried"]  # the slack ran, the same way
    assert settled.params == full.params
    assert_same_walk(settled.details["path"], full.details["path"], settled.params["target"])
    assert any(entry.get("stopped_early") for entry in settled.details["path"] + settled.details["refinement"])
