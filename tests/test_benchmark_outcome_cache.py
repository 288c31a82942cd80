"""The benchmarks evaluate the original from its stored outcome passes (benchmarks/outcome_cache.py):
the same metrics as a fresh evaluation, for any forget set, and never another model's passes."""

from __future__ import annotations

import copy

import torch

import benchmarks.suites.blocks as blocks
import unlearning
from benchmarks.common import Scale
from benchmarks.outcome_cache import OriginalOutcomes
from unlearning.checkpoint import model_meta
from unlearning.evaluation import evaluate_model


def metrics(model, dataset, spec: str, executor=None) -> dict:
    forget = unlearning.parse_forget(spec, dataset)
    return evaluate_model(model, dataset, forget, model_meta(model)["normalize"], executor=executor)


def test_stored_passes_give_the_fresh_metrics_for_every_forget_set(tmp_path, digits, digits_model):
    first = OriginalOutcomes(digits_model, digits, tmp_path)
    assert metrics(digits_model, digits, "class:3", first) == metrics(digits_model, digits, "class:3")
    assert first.passes_run == 2 and len(list(tmp_path.glob("*-train.safetensors"))) == 1
    again = OriginalOutcomes(digits_model, digits, tmp_path)  # a later request, another process
    for spec in ("class:3", "random:50", "class:7"):
        assert metrics(digits_model, digits, spec, again) == metrics(digits_model, digits, spec)
    assert again.passes_run == 0


def test_another_model_and_a_damaged_file_are_not_served_the_stored_passes(tmp_path, digits, digits_model):
    metrics(digits_model, digits, "class:3", OriginalOutcomes(digits_model, digits, tmp_path))
    changed = copy.deepcopy(digits_model)
    with torch.no_grad():
        next(changed.parameters()).mul_(-1.0)
    other = OriginalOutcomes(changed, digits, tmp_path)
    assert metrics(changed, digits, "class:3", other) == metrics(changed, digits, "class:3")
    assert other.passes_run == 2
    assert metrics(changed, digits, "class:3")["test_acc"] < metrics(digits_model, digits, "class:3")["test_acc"]
    [train_file] = [p for p in tmp_path.glob("*-train.safetensors") if p.name.startswith(other.key)]
    train_file.write_bytes(train_file.read_bytes()[:100])
    damaged = OriginalOutcomes(changed, digits, tmp_path)
    assert metrics(changed, digits, "random:50", damaged) == metrics(changed, digits, "random:50")
    assert damaged.passes_run == 1  # the training pass again; the test pass was read


def test_a_poison_request_runs_only_the_triggered_pass_again(tmp_path, poisoned_digits):
    dataset, model = poisoned_digits
    metrics(model, dataset, "poison:identified", OriginalOutcomes(model, dataset, tmp_path))
    again = OriginalOutcomes(model, dataset, tmp_path)
    found = metrics(model, dataset, "poison:identified", again)
    assert found == metrics(model, dataset, "poison:identified") and again.passes_run == 1
    assert found["attack_success_rate"] > 0.5  # the backdoor is learnt: the triggered pass is real


def test_a_suites_request_reads_the_originals_passes_from_the_benchmark_cache(tmp_path, monkeypatch, digits,
                                                                             digits_model):
    monkeypatch.setattr(blocks, "CACHE", tmp_path)
    bench = blocks.Bench(digits_model, digits, Scale(), methods=[], batch_size=64)
    forget = unlearning.parse_forget("class:4", digits)
    original, rows = blocks.run_request(bench, forget, "test")
    assert rows == [] and bench.original_outcomes.passes_run == 2
    assert len(list((tmp_path / "outcomes").glob("*.safetensors"))) == 2
    fresh = metrics(digits_model, digits, "class:4")
    fresh.pop("per_class_test_acc")
    assert original == fresh
