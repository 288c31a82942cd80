"""One evaluation of a model for a deletion request: the metrics of report.json.

retain_acc / forget_acc are on the training rows of D_r / D_f; test_acc on the test split.
For a class (or sub-class) request, test_forget_acc / test_retain_acc are the test images of
the forgotten / retained classes (docs/methods.md#accuracies). MIA follows docs/methods.md
section 9; poison tasks add attack_success_rate and poisoned_clean_acc.
"""

from __future__ import annotations

import torch
from torch import nn

from unlearning.data import Dataset, ForgetSet, PoisonTask, split_forget
from unlearning.metrics import (
    accuracy_from_logits,
    attack_success_rate,
    membership_inference,
    per_class_accuracy,
    predict_logits,
    zrf_score,
)


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    forget: ForgetSet | None,
    normalize: dict | None,
    poison: PoisonTask | None = None,
    random_model: nn.Module | None = None,
) -> dict:
    poison = poison if poison is not None else dataset.poison
    if forget is None:
        test_logits = predict_logits(model, dataset.test, normalize)
        train_logits = predict_logits(model, dataset.train, normalize)
        metrics = {
            "train_acc": accuracy_from_logits(train_logits, dataset.train.labels),
            "test_acc": accuracy_from_logits(test_logits, dataset.test.labels),
            "per_class_test_acc": per_class_accuracy(test_logits, dataset.test.labels, dataset.num_classes),
        }
        return {**metrics, **(_poison_metrics(model, dataset, poison, normalize) if poison else {})}
    retain_split, forget_split = split_forget(dataset, forget)
    retain_logits = predict_logits(model, retain_split, normalize)
    forget_logits = predict_logits(model, forget_split, normalize)
    test_logits = predict_logits(model, dataset.test, normalize)
    metrics = {
        "retain_acc": accuracy_from_logits(retain_logits, retain_split.labels),
        "forget_acc": accuracy_from_logits(forget_logits, forget_split.labels),
        "test_acc": accuracy_from_logits(test_logits, dataset.test.labels),
        "mia": membership_inference(retain_logits, forget_logits, test_logits),
        "per_class_test_acc": per_class_accuracy(test_logits, dataset.test.labels, dataset.num_classes),
    }
    if forget.kind in ("class", "subclass"):
        test_classes = dataset.test.fine_labels if forget.kind == "subclass" else dataset.test.labels
        in_forgotten = torch.isin(test_classes, torch.tensor(forget.classes))
        metrics["test_forget_acc"] = accuracy_from_logits(
            test_logits[in_forgotten], dataset.test.labels[in_forgotten]
        )
        metrics["test_retain_acc"] = accuracy_from_logits(
            test_logits[~in_forgotten], dataset.test.labels[~in_forgotten]
        )
    if random_model is not None:
        metrics["zrf"] = zrf_score(forget_logits, predict_logits(random_model, forget_split, normalize))
    if poison is not None:
        metrics.update(_poison_metrics(model, dataset, poison, normalize))
    return metrics


def _poison_metrics(model, dataset: Dataset, poison: PoisonTask, normalize) -> dict:
    """Attack success rate on triggered test images; poisoned training rows vs clean labels."""
    rows = poison.dataset.index_of(poison.poisoned_ids)
    poisoned_logits = predict_logits(model, poison.dataset.train.subset(rows), normalize)
    return {
        "attack_success_rate": attack_success_rate(model, poison.triggered_test, poison.target, normalize),
        "poisoned_clean_acc": accuracy_from_logits(poisoned_logits, poison.clean_labels),
    }
