"""Importance (docs/methods.md#importance) checked against values computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unlearning
from tests.conftest import assert_state_equal, state_copy
from unlearning.importance import compute_importance_sums


def tiny_linear() -> nn.Linear:
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
        layer.bias.copy_(torch.tensor([0.1, -0.2]))
    return layer


X = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [3.0, -2.0]])
Y = torch.tensor([0, 1, 1])


def hand_gradients(kind: str, x: torch.Tensor, y: torch.Tensor):
    """Gradient of the batch-mean loss of `kind` for tiny_linear, written out by hand."""
    layer = tiny_linear()
    z = x @ layer.weight.detach().T + layer.bias.detach()
    if kind == "fisher":  # d CE / dz = softmax - onehot
        dz = torch.softmax(z, dim=1) - torch.nn.functional.one_hot(y, 2).float()
    elif kind == "l2":  # d ||z||^2 / dz = 2 z
        dz = 2 * z
    else:  # d ||z|| / dz = z / ||z||
        dz = z / z.norm(dim=1, keepdim=True)
    dz = dz / len(x)
    return {"weight": dz.T @ x, "bias": dz.sum(dim=0)}


@pytest.mark.parametrize("kind", ["fisher", "l2", "l2_norm"])
def test_batch_mode_matches_hand_computation(kind):
    batches = [(X[:2], Y[:2]), (X[2:], Y[2:])]
    expected = {}
    for x, y in batches:
        for name, g in hand_gradients(kind, x, y).items():
            term = g.pow(2) if kind == "fisher" else g.abs()
            expected[name] = expected.get(name, 0) + term / len(batches)  # mean over batches
    got = unlearning.compute_importance(tiny_linear(), batches, kind=kind, mode="batch")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["fisher", "l2", "l2_norm"])
def test_per_sample_mode_matches_hand_computation(kind):
    expected = {}
    for i in range(len(X)):
        for name, g in hand_gradients(kind, X[i : i + 1], Y[i : i + 1]).items():
            term = g.pow(2) if kind == "fisher" else g.abs()
            expected[name] = expected.get(name, 0) + term / len(X)  # mean over samples
    got = unlearning.compute_importance(tiny_linear(), [(X, Y)], kind=kind, mode="per_sample")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["fisher", "l2", "l2_norm"])
def test_per_sample_equals_batch_mode_with_batch_size_one(digits, digits_model, kind):
    split = digits.train.subset(torch.arange(40))
    norm = digits.normalization()
    per_sample = unlearning.compute_importance(
        digits_model, split.batches(16, normalize=norm), kind=kind, mode="per_sample"
    )
    batch_one = unlearning.compute_importance(
        digits_model, split.batches(1, normalize=norm), kind=kind, mode="batch"
    )
    for name in per_sample:  # float32 gradients by two routes: equal to rounding
        scale = float(batch_one[name].abs().max())
        torch.testing.assert_close(per_sample[name], batch_one[name], rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("mode", ["per_sample", "batch"])
def test_sums_of_two_halves_equal_the_whole(digits, digits_model, mode):
    norm = digits.normalization()
    split = digits.train.subset(torch.arange(128))
    whole = compute_importance_sums(digits_model, split.batches(32, normalize=norm), mode=mode)
    first = compute_importance_sums(digits_model, split.subset(torch.arange(64)).batches(32, normalize=norm), mode=mode)
    second = compute_importance_sums(
        digits_model, split.subset(torch.arange(64, 128)).batches(32, normalize=norm), mode=mode
    )
    combined = first + second
    assert combined.count == whole.count == (128 if mode == "per_sample" else 4)
    assert combined.num_samples == 128
    for name, value in whole.mean().items():
        torch.testing.assert_close(combined.mean()[name], value, rtol=1e-6, atol=0)


def test_importance_covers_every_trainable_parameter_and_leaves_model_untouched(digits, digits_model):
    before = state_copy(digits_model)
    digits_model.train()
    importance = unlearning.compute_importance(
        digits_model, digits.train.subset(torch.arange(32)).batches(16, normalize=digits.normalization())
    )
    assert digits_model.training, "training flag must be restored"
    digits_model.eval()
    assert set(importance) == {n for n, p in digits_model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in digits_model.parameters())
    assert_state_equal(digits_model, before)
    assert all(float(v.sum()) > 0 for v in importance.values())


def test_batchnorm_uses_running_statistics():
    """In eval mode a BatchNorm model's importance of one batch equals that of its halves' union."""
    torch.manual_seed(0)
    model = unlearning.new_model("resnet_small", 10, (3, 32, 32), width=4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    whole = unlearning.compute_importance(model, [(x, y)], mode="per_sample")
    halves = compute_importance_sums(model, [(x[:4], y[:4])], mode="per_sample") + compute_importance_sums(
        model, [(x[4:], y[4:])], mode="per_sample"
    )
    for name, value in whole.items():
        torch.testing.assert_close(halves.mean()[name], value, rtol=1e-5, atol=1e-12)
    assert any("running_mean" in n for n, _ in model.named_buffers())


def test_empty_data_is_refused(digits_model):
    with pytest.raises(unlearning.UserError, match="empty"):
        unlearning.compute_importance(digits_model, [])


def test_unknown_kind_is_refused(digits_model):
    with pytest.raises(unlearning.UserError, match="kind"):
        unlearning.compute_importance(digits_model, [], kind="hessian")


def test_per_sample_chunks_follow_the_parameter_count():
    """64 samples per vmap call for small models; one for a ViT-B-sized one (64 would need ~22 GB)."""
    from unlearning.importance import per_sample_chunk_size

    small = unlearning.new_model("small_cnn", 10, (1, 8, 8), seed=0)
    assert per_sample_chunk_size(small) == 64
    vit_sized = torch.nn.Linear(9300, 9300)  # 86.5 M parameters, as ViT-B/16
    assert per_sample_chunk_size(vit_sized) == 1
    assert per_sample_chunk_size(vit_sized, budget_bytes=8 * 1024**3) == 8


@pytest.mark.parametrize("kind", ["fisher", "l2"])
def test_per_sample_sums_equal_a_loop_of_single_sample_gradients_across_chunks(kind):
    """Chunks of 3 over batches of 7 and 5 (ragged last chunks) give the float64 sums of a plain
    autograd loop over one sample at a time, to float32 rounding of the gradients."""
    torch.manual_seed(0)
    model = unlearning.new_model("resnet_small", 10, (3, 8, 8), width=4)
    model.eval()
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 10, (12,))
    got = compute_importance_sums(model, [(x[:7], y[:7]), (x[7:], y[7:])], kind=kind, mode="per_sample",
                                  per_sample_chunk=3)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(len(x)):
        logits = model(x[i : i + 1])
        loss = torch.nn.functional.cross_entropy(logits, y[i : i + 1]) if kind == "fisher" else logits.pow(2).sum()
        for total, g in zip(expected, torch.autograd.grad(loss, params)):
            total += (g.pow(2) if kind == "fisher" else g.abs()).double()
    assert (got.count, got.num_samples) == (12, 12)
    for (name, value), total in zip(got.sums.items(), expected):
        assert value.dtype == torch.float64, name
        torch.testing.assert_close(value, total, rtol=1e-4, atol=1e-6 * float(total.abs().max()))


def test_default_chunk_keeps_per_sample_blocks_on_the_heap():
    """The default chunk keeps the largest per-parameter block (chunk x parameter x 8 bytes)
    below glibc's largest mmap threshold: 28 samples for the benchmark's resnet_small width 16."""
    from unlearning.importance import HEAP_BLOCK_BYTES, heap_chunk_size

    model = unlearning.new_model("resnet_small", 10, (3, 32, 32), width=16)
    largest = max(p.numel() for p in model.parameters())
    assert heap_chunk_size(model) == 28
    assert 28 * largest * 8 < HEAP_BLOCK_BYTES <= 29 * largest * 8
    assert heap_chunk_size(torch.nn.Linear(9300, 9300)) == 1  # never below one sample


def test_allocator_setting_is_made_once_and_is_a_no_op_without_glibc(monkeypatch):
    import unlearning.importance as importance

    calls = []
    monkeypatch.setattr(importance, "_freed_memory_kept", None)
    monkeypatch.setattr(importance, "_mallopt", lambda parameter, value: calls.append(parameter) or True)
    assert importance.keep_freed_memory() and importance.keep_freed_memory()
    assert sorted(calls) == sorted([importance._M_MMAP_THRESHOLD, importance._M_TRIM_THRESHOLD, importance._M_TOP_PAD])

    monkeypatch.undo()
    monkeypatch.setattr(importance, "_freed_memory_kept", None)

    def not_glibc(name):
        raise ValueError(f"unrecognized configuration name {name!r}")

    monkeypatch.setattr(importance.os, "confstr", not_glibc)
    assert importance.keep_freed_memory() is False
    assert importance.keep_freed_memory() is False  # asked once: the answer is kept
