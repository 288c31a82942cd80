"""One evaluation of a model for a deletion request: the metrics of report.json.

retain_acc / forget_acc are on the training rows of D_r / D_f; test_acc on the test split.
For a class (or sub-class) request, test_forget_acc / test_retain_acc are the test images of
the forgotten / retained classes (docs/methods.md#accuracies). MIA follows docs/methods.md
section 9; poison tasks add attack_success_rate and poisoned_clean_acc.

Every number comes from outcome passes (`unlearning.passes`): one over the training split and
one over the test split for all the models at once (plus the triggered test images of a poison
task), run by an executor, so the rows stay where the executor reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from unlearning.data import Dataset, ForgetSet, PoisonTask
from unlearning.metrics import (
    membership_inference_entropy,
    per_class_accuracy,
    predict_logits,
    zrf_score,
)
from unlearning.passes import LocalExecutor, Outcomes


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    forget: ForgetSet | None,
    normalize: dict | None,
    poison: PoisonTask | None = None,
    random_model: nn.Module | None = None,
    executor=None,
) -> dict:
    return evaluate_models([model], dataset, forget, normalize, poison, random_model, executor)[0]


def evaluate_models(
    models: Sequence[nn.Module],
    dataset: Dataset,
    forget: ForgetSet | None,
    normalize: dict | None,
    poison: PoisonTask | None = None,
    random_model: nn.Module | None = None,
    executor=None,
) -> list[dict]:
    """The metrics of each model, from one outcome pass per split shared by all of them."""
    executor = executor or LocalExecutor(next(models[0].parameters()).device)
    poison = poison if poison is not None else dataset.poison
    train_outcomes = executor.outcomes(models, dataset.train, normalize)
    test_outcomes = executor.outcomes(models, dataset.test, normalize)
    in_forget = torch.isin(dataset.train.ids, forget.ids) if forget is not None else None
    results = [_split_metrics(dataset, forget, in_forget, train, test) for train, test in zip(train_outcomes, test_outcomes)]
    if random_model is not None and forget is not None:
        for model, metrics in zip(models, results):
            metrics["zrf"] = _zrf(model, random_model, dataset, in_forget, normalize)
    if poison is not None:
        for metrics, found in zip(results, _poison_metrics(models, dataset, poison, train_outcomes, normalize, executor)):
            metrics.update(found)
    return results


def _split_metrics(dataset: Dataset, forget: ForgetSet | None, in_forget, train: Outcomes, test: Outcomes) -> dict:
    labels, test_labels = dataset.train.labels, dataset.test.labels
    per_class = per_class_accuracy(test.pred, test_labels, dataset.num_classes)
    if forget is None:
        return {"train_acc": train.accuracy(labels), "test_acc": test.accuracy(test_labels), "per_class_test_acc": per_class}
    retain, forgotten = train.select(~in_forget), train.select(in_forget)
    metrics = {
        "retain_acc": retain.accuracy(labels[~in_forget]),
        "forget_acc": forgotten.accuracy(labels[in_forget]),
        "test_acc": test.accuracy(test_labels),
        "mia": membership_inference_entropy(retain.entropy, forgotten.entropy, test.entropy),
        "per_class_test_acc": per_class,
    }
    if forget.kind in ("class", "subclass"):
        test_classes = dataset.test.fine_labels if forget.kind == "subclass" else test_labels
        in_forgotten = torch.isin(test_classes, torch.tensor(forget.classes))
        metrics["test_forget_acc"] = test.select(in_forgotten).accuracy(test_labels[in_forgotten])
        metrics["test_retain_acc"] = test.select(~in_forgotten).accuracy(test_labels[~in_forgotten])
    return metrics


def _zrf(model, random_model, dataset: Dataset, in_forget, normalize) -> float:
    """ZRF needs both models' full output distributions on D_f: computed in this process."""
    forget_split = dataset.train.where(in_forget)
    return zrf_score(predict_logits(model, forget_split, normalize), predict_logits(random_model, forget_split, normalize))


def _poison_metrics(models, dataset: Dataset, poison: PoisonTask, train: list[Outcomes], normalize, executor) -> list[dict]:
    """Attack success rate on triggered test images; poisoned training rows vs clean labels.

    The poisoned rows' outcomes come from the training pass, or from a pass of their own when
    earlier requests removed some of them from the training split.
    """
    triggered = executor.outcomes(models, poison.triggered_test, normalize)
    if bool(torch.isin(poison.poisoned_ids, dataset.train.ids).all()):
        rows = dataset.index_of(poison.poisoned_ids)
        poisoned = [found.select(rows) for found in train]
    else:
        rows = poison.dataset.index_of(poison.poisoned_ids)
        poisoned = executor.outcomes(models, poison.dataset.train.subset(rows), normalize)
    return [
        {
            "attack_success_rate": float((hit.pred == poison.target).double().mean()),
            "poisoned_clean_acc": rows_found.accuracy(poison.clean_labels),
        }
        for hit, rows_found in zip(triggered, poisoned)
    ]
