"""Evaluation (docs/methods.md#metrics): per-sample accuracy, MIA, ZRF, attack success, healed %.

Accuracies are true per-sample fractions (the reference code averages per-batch accuracies).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearning.data import Split
from unlearning.heap import rows_per_forward
from unlearning.models import logits_of
from unlearning.training import autocast_for

# rows decoded per batch of an outcome pass; each forward takes at most this many, fewer where the
# model's activations would exceed what glibc keeps in its heaps (heap.rows_per_forward)
EVAL_BATCH = 256


@torch.no_grad()
def predict_logits(
    model: nn.Module, split: Split, normalize: dict | None = None, batch_size: int = EVAL_BATCH,
    precision: str = "fp32",
) -> Tensor:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    size = None
    outputs = []
    try:
        for inputs, _ in split.batches(batch_size, normalize=normalize):
            inputs = inputs.to(device)
            size = size or rows_per_forward(model, inputs, batch_size)
            for part in inputs.split(size):
                with autocast_for(precision, device):
                    outputs.append(logits_of(model(part)).float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)


def accuracy_of(predictions: Tensor, labels: Tensor) -> float:
    """Share of predicted classes equal to the labels (NaN for no rows)."""
    if len(labels) == 0:
        return float("nan")
    return float((predictions == labels).double().mean())


def accuracy_from_logits(logits: Tensor, labels: Tensor) -> float:
    return accuracy_of(logits.argmax(dim=1), labels)


def accuracy(model: nn.Module, split: Split, normalize: dict | None = None, precision: str = "fp32") -> float:
    return accuracy_from_logits(predict_logits(model, split, normalize, precision=precision), split.labels)


def per_class_accuracy(predictions: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    """Accuracy of the predicted classes on each class's rows (NaN for a class without rows)."""
    correct = predictions == labels
    result = []
    for k in range(num_classes):
        mask = labels == k
        result.append(float(correct[mask].double().mean()) if bool(mask.any()) else float("nan"))
    return result


def entropy(logits: Tensor) -> Tensor:
    """Softmax entropy -sum p log p per sample (the MIA's only feature)."""
    log_p = F.log_softmax(logits.double(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def membership_inference(
    retain_logits: Tensor, forget_logits: Tensor, test_logits: Tensor
) -> float:
    """Share of forget samples a class-balanced logistic regression calls "member".

    Fitted on entropy of D_r training samples (member, 1) and of test samples (non-member, 0).
    """
    return membership_inference_entropy(entropy(retain_logits), entropy(forget_logits), entropy(test_logits))


def membership_inference_entropy(retain: Tensor, forget: Tensor, test: Tensor) -> float:
    """`membership_inference` from the softmax entropies alone (what a pass over rows returns)."""
    from sklearn.linear_model import LogisticRegression

    if not all(bool(torch.isfinite(t).all()) for t in (retain, forget, test)):
        return float("nan")  # a diverged model: no attack to fit (reported as NaN, not a crash)
    features = torch.cat([retain.double(), test.double()]).numpy().reshape(-1, 1)
    targets = np.concatenate([np.ones(len(retain)), np.zeros(len(test))])
    attack = LogisticRegression(class_weight="balanced", solver="lbfgs")
    attack.fit(features, targets)
    return float(attack.predict(forget.double().numpy().reshape(-1, 1)).mean())


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Per-sample Jensen-Shannon divergence in bits (in [0, 1]) between rows of p and q."""
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (torch.log2(a) - torch.log2(b)), torch.zeros_like(a)).sum(1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def zrf_score(model_logits: Tensor, random_logits: Tensor) -> float:
    """ZRF = 1 - mean JS(model, randomly initialised model) on D_f; 1 means "like random".

    Per-sample JS in bits averaged over samples (the reference averages over N*C elements,
    which compresses the scale toward 1).
    """
    p = F.softmax(model_logits.double(), dim=1)
    q = F.softmax(random_logits.double(), dim=1)
    return float(1.0 - js_divergence(p, q).mean())


def attack_success_rate(model: nn.Module, triggered_test: Split, target: int, normalize=None) -> float:
    """Share of triggered test images (true class != target) classified as the target."""
    logits = predict_logits(model, triggered_test, normalize)
    return float((logits.argmax(dim=1) == target).double().mean())


def healed_fraction(asr_before: float, asr_after: float) -> float:
    """1 - ASR_after / ASR_before (1 = the trigger no longer works at all)."""
    if asr_before <= 0:
        return float("nan")
    return 1.0 - asr_after / asr_before
