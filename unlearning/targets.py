"""Forget-accuracy targets: what a search aims at, per kind of request
(docs/methods.md#forget-targets)."""

from __future__ import annotations

from unlearning.search import PTN_DEFAULTS


def forget_target(
    request_kind: str,
    original_test_acc: float | None = None,
    original_forget_acc: float | None = None,
    rho: float | None = None,
) -> float:
    """What retraining would give, per kind of request (docs/methods.md#forget-targets).

    whole class -> near 0 (CLASS_TARGET); random samples and sub-classes -> the model's
    accuracy on data it never saw (its test accuracy on the forget set's class mix, fine
    classes for a sub-class, computed by the caller: a model retrained without a sub-class
    still recognises its coarse class through the siblings); poison -> rho * A_0.
    """
    if rho is not None:
        if original_forget_acc is None:
            raise ValueError("a rho target needs the original forget-set accuracy")
        return rho * original_forget_acc
    if request_kind == "class":
        return CLASS_TARGET
    if original_test_acc is None:
        raise ValueError("a random-sample target needs the original test accuracy")
    return original_test_acc


CLASS_TARGET = 0.01


def request_rho(request_kind: str, rho: float | None) -> float | None:
    """The rho a request uses: the given one, else PTNConfig.poison_rho for poison requests."""
    if rho is None and request_kind == "poison":
        return PTN_DEFAULTS.poison_rho
    return rho
