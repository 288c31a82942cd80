"""The benchmark tables count a refused request instead of averaging its NaN (benchmarks/tables.py)."""

from __future__ import annotations

import math

from benchmarks.suites.blocks import run_one
from benchmarks.suites.classes import random_summary
from benchmarks.suites.poison import poison_summary
from benchmarks.tables import poison_request_line, random_table
from pipelines.request import poison_outcome
from tests.unlearning.test_methods import make_task
from unlearning.checkpoint import model_meta
from unlearning.evaluation import evaluate_model


def request(dataset, model, spec: str, method: str, params: dict) -> dict:
    """One real request as a suite records it: the original's metrics and the method's row."""
    task = make_task(dataset, model, spec, importance_mode="batch")
    original = evaluate_model(model, dataset, task.forget, model_meta(model)["normalize"])
    return {"forget": spec, "original": original, "rows": [run_one(method, task, dataset, task.forget, params)]}


def test_a_refused_random_request_is_counted_and_the_answered_one_averaged(digits, digits_model):
    answered = request(digits, digits_model, "random:50", "ptn", {})
    refused = request(digits, digits_model, "random:200", "ptn", {"target": 0.5})  # only a wrecked model meets it
    row = refused["rows"][0]
    assert row["refused"] and "max_retain_drop=0.1" in row["details"]["refused"] and math.isnan(row["metrics"]["test_acc"])
    summary = random_summary("ptn", [answered, refused])
    assert summary["refused"] == 1 and summary["test_acc"] == answered["rows"][0]["metrics"]["test_acc"]
    line = random_table([random_summary("original", [answered, refused]), summary]).splitlines()[-1]
    assert line.startswith("| ptn (1 refused) | ") and "nan" not in line


def test_a_refused_poison_request_says_what_it_would_have_cost(poisoned_digits):
    dataset, model = poisoned_digits
    # the strict target breaks the real zeros among the identified rows (tests/unlearning/test_rho_slack.py)
    q = request(dataset, model, "poison:identified", "potion", {"relax_after_drop": 1.0, "max_retain_drop": 0.02})
    row = q["rows"][0]
    row["metrics"].update(poison_outcome(q["original"], row["metrics"]))
    q.update(seed=0, identified=0.5, identified_count=36, poisoned=72)
    line = poison_request_line(q, row)
    assert line.startswith("| 0 | 36/72 | potion | refused (") and " pts of retained acc) | – |" in line
    cost = float(line.split("refused (")[1].split(" pts")[0])
    assert 2 < cost < 20 and "nan" not in line
    summary = poison_summary([q], 0.5, "potion")
    assert summary["refused"] == 1 and summary["seeds"] == 0 and math.isnan(summary["healed"])
