"""The SSD update and the adaptive alpha (docs/methods.md#dampening), by hand and vs numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import unlearning
from unlearning.dampening import adaptive_percentile, importance_ratios, percentile


def one_parameter_model(values) -> nn.Module:
    model = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([values]))
    return model


def test_ssd_update_matches_hand_computation():
    model = one_parameter_model([1.0, 2.0, -3.0, 4.0, 5.0, 6.0])
    full = {"weight": torch.tensor([[1.0, 1.0, 0.5, 0.0, 0.0, 2.0]])}
    forget = {"weight": torch.tensor([[5.0, 10.0, 30.0, 1.0, 0.0, 20.0]])}
    # alpha = 10: selected iff f > 10 d (strict): [no (5>10), no (10>10), yes, yes (d=0), no, no (20>20)]
    # beta = min(lam d / f, 1) with lam = 1: element 2 -> 0.5/30, element 3 -> 0.
    new = unlearning.ssd(model, full, forget, alpha=10.0, lam=1.0)
    expected = torch.tensor([[1.0, 2.0, -3.0 * 0.5 / 30.0, 0.0, 5.0, 6.0]])
    torch.testing.assert_close(new.weight.detach(), expected)
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[1.0, 2.0, -3.0, 4.0, 5.0, 6.0]]))


def test_lambda_cap_binds_only_when_lambda_exceeds_alpha():
    model = one_parameter_model([1.0, 1.0])
    full = {"weight": torch.tensor([[1.0, 1.0]])}
    forget = {"weight": torch.tensor([[2.0, 8.0]])}
    # alpha = 1.5 selects both; lam = 4: beta = min(4/2, 1) = 1 and min(4/8, 1) = 0.5
    new = unlearning.ssd(model, full, forget, alpha=1.5, lam=4.0)
    torch.testing.assert_close(new.weight.detach(), torch.tensor([[1.0, 0.5]]))


@pytest.mark.parametrize("alpha,lam", [(0.0, 1.0), (-1.0, 1.0), (10.0, 0.0), (10.0, -2.0), (math.inf, 1.0), (math.nan, 1.0)])
def test_non_positive_or_non_finite_strengths_are_refused(alpha, lam):
    model = one_parameter_model([1.0])
    imp = {"weight": torch.ones(1, 1)}
    with pytest.raises(unlearning.UserError, match="alpha|lambda"):
        unlearning.ssd(model, imp, imp, alpha=alpha, lam=lam)


def test_importance_for_another_model_is_refused():
    model = one_parameter_model([1.0, 2.0])
    with pytest.raises(unlearning.UserError, match="does not match the model"):
        unlearning.ssd(model, {"weight": torch.ones(1, 3)}, {"weight": torch.ones(1, 3)})
    with pytest.raises(unlearning.UserError, match="missing"):
        unlearning.ssd(model, {}, {"weight": torch.ones(1, 2)})


def random_importances(seed: int, sizes=(50, 30, 7)):
    generator = torch.Generator().manual_seed(seed)
    full, forget = {}, {}
    for i, size in enumerate(sizes):
        full[f"p{i}"] = torch.rand(size, generator=generator)
        forget[f"p{i}"] = torch.rand(size, generator=generator) * 3
    full["p0"][:5] = 0.0  # infinite and nan ratios are dropped
    forget["p0"][:2] = 0.0
    return full, forget


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.5])
def test_adaptive_alpha_equals_numpy_percentile(fraction):
    full, forget = random_importances(1)
    ratios = np.concatenate(
        [(forget[n].double() / full[n].double()).numpy() for n in sorted(full)]
    )
    ratios = ratios[np.isfinite(ratios)]
    assert len(ratios) == 87 - 5
    expected = np.percentile(ratios, 100 - math.log(1 + 100 * fraction))
    assert unlearning.adaptive_alpha(full, forget, fraction) == expected


def test_adaptive_percentile_of_one_percent_is_99_31():
    assert adaptive_percentile(0.01) == pytest.approx(100 - math.log(2), abs=1e-12)
    assert round(adaptive_percentile(0.01), 2) == 99.31


def test_percentile_is_exact_beyond_two_to_the_24_elements():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(2**24 + 1001, generator=generator, dtype=torch.float64)
    array = values.numpy()
    for q in (99.31, 50.0, 0.0, 100.0):
        assert percentile(values, q) == np.percentile(array, q)


def test_ratios_drop_non_finite_values():
    full = {"w": torch.tensor([0.0, 0.0, 1.0, 2.0])}
    forget = {"w": torch.tensor([0.0, 1.0, 3.0, 1.0])}
    assert importance_ratios(full, forget).tolist() == [3.0, 0.5]
