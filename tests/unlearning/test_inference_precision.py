"""A request's inference precision (unlearning.passes): outcome passes in bfloat16 autocast
agree with float32 on a trained model's predictions, and every way a request predicts uses it."""

from __future__ import annotations

import pytest
import torch

import unlearning
from unlearning.checkpoint import model_meta
from unlearning.metrics import accuracy
from unlearning.passes import LocalExecutor
from unlearning.search import Step, dampened_copy


def test_bf16_outcomes_run_in_bf16_and_agree_with_fp32(digits, digits_model):
    """bfloat16 keeps ~3 significant digits: the entropies move, a ~99 % model's predictions
    almost never do (its margins are far wider than bf16's rounding)."""
    normalize = model_meta(digits_model)["normalize"]
    [fp32] = LocalExecutor().outcomes([digits_model], digits.test, normalize)
    [bf16] = LocalExecutor(precision="bf16").outcomes([digits_model], digits.test, normalize)
    assert not torch.equal(fp32.entropy, bf16.entropy)  # autocast took effect
    assert float((fp32.entropy - bf16.entropy).abs().max()) < 0.05
    assert float((fp32.pred == bf16.pred).double().mean()) >= 0.99
    assert abs(fp32.accuracy(digits.test.labels) - bf16.accuracy(digits.test.labels)) <= 0.01
    # the logits path (TPE trials, the metrics helpers) predicts what the outcome pass does
    assert accuracy(digits_model, digits.test, normalize, "bf16") == bf16.accuracy(digits.test.labels)
    assert accuracy(digits_model, digits.test, normalize) == fp32.accuracy(digits.test.labels)


def test_a_task_scores_its_search_steps_in_its_precision(digits, digits_model):
    forget = unlearning.parse_forget("class:3", digits)
    retain, forget_split = unlearning.data.split_forget(digits, forget)
    task = unlearning.UnlearningTask(model=digits_model, dataset=digits, forget=forget, retain_split=retain,
                                     forget_split=forget_split, normalize=model_meta(digits_model)["normalize"],
                                     inference_precision="bf16")
    assert task.executor.precision == "bf16"
    full, forget_importance = task.importance("full", "fisher"), task.importance("forget", "fisher")
    dampened = dampened_copy(digits_model, full, forget_importance, Step(index=0, alpha=10.0, lam=1.0))
    [expected] = LocalExecutor(precision="bf16").outcomes([dampened], forget_split, task.normalize)
    assert task.forget_accuracy(dampened) == expected.accuracy(forget_split.labels)


@pytest.mark.parametrize("precision", ["fp16", "float32", ""])
def test_an_unknown_precision_is_refused(precision):
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        LocalExecutor(precision=precision)
