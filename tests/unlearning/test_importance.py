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
    import unlearning.heap as heap

    calls = []
    monkeypatch.setattr(heap, "_freed_memory_kept", None)
    monkeypatch.setattr(heap, "_mallopt", lambda parameter, value: calls.append(parameter) or True)
    assert heap.keep_freed_memory() and heap.keep_freed_memory()
    assert sorted(calls) == sorted([heap._M_MMAP_THRESHOLD, heap._M_TRIM_THRESHOLD, heap._M_TOP_PAD])

    monkeypatch.undo()
    monkeypatch.setattr(heap, "_freed_memory_kept", None)

    def not_glibc(name):
        raise ValueError(f"unrecognized configuration name {name!r}")

    monkeypatch.setattr(heap.os, "confstr", not_glibc)
    assert heap.keep_freed_memory() is False
    assert heap.keep_freed_memory() is False  # asked once: the answer is kept


def test_rows_per_forward_keeps_the_largest_activation_within_a_quarter_heap_block():
    from unlearning.heap import HEAP_BLOCK_BYTES, rows_per_forward
    from unlearning.metrics import entropy
    from unlearning.passes import predict_outcomes

    assert HEAP_BLOCK_BYTES // 4 == 8 << 20
    wide = nn.Sequential(nn.Linear(10, 8192), nn.ReLU(), nn.Linear(8192, 3)).eval()  # 32 KiB a row
    rows = torch.randn(300, 10)
    assert rows_per_forward(wide, rows, 1000) == 256
    assert rows_per_forward(wide, rows, 100) == 100  # never above `most`
    assert rows_per_forward(nn.Linear(10, 65536), rows, 1000) == 32  # 256 KiB a row
    assert rows_per_forward(nn.Linear(10, 3 << 21), rows, 1000) == 1  # 24 MiB a row: one at a time
    # cut into forwards of 256 rows, in order: the same outcomes as one forward of all 300
    [found] = predict_outcomes([wide], [(rows, None)])
    with torch.no_grad():
        whole = wide(rows)
    assert torch.equal(found.pred, whole.argmax(1))
    torch.testing.assert_close(found.entropy, entropy(whole), rtol=1e-5, atol=1e-6)


class _Mixed(nn.Module):
    """Every layer kind the layer-wise per-sample path knows, in awkward settings: a grouped,
    strided, dilated convolution with many output positions (grouped backward), a Conv1d
    without bias over few positions (unfold), GroupNorm, LayerNorm over a sequence, an
    in-place ReLU after a hooked layer, a Linear applied per position."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=1, padding=2, dilation=2, groups=3)
        self.group_norm = nn.GroupNorm(2, 6)
        self.conv1d = nn.Conv1d(6, 4, 3, stride=2, padding=1, bias=False)
        self.layer_norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu_(self.group_norm(self.conv(x)))  # 12 x 12 = 144 positions
        h = self.conv1d(h.flatten(2)[:, :, :40]).transpose(1, 2)  # 20 positions
        return self.head(self.layer_norm(h)).mean(dim=1)


def _layerwise_and_vmap(model, x, y, kind):
    from unlearning import importance
    from unlearning.per_sample import LayerwisePerSample

    model.eval()
    layerwise, reference = (importance.empty_sums(model, kind, "per_sample") for _ in range(2))
    assert LayerwisePerSample.of(model).step(
        x, lambda logits: importance._loss(kind, logits, y, "sum"), lambda g: importance._accumulate(kind, g),
        layerwise.sums,
    )
    importance._vmap_per_sample_step(model, kind, x, y, reference, 64)
    return layerwise.sums, reference.sums


@pytest.mark.parametrize("kind", ["fisher", "l2", "l2_norm"])
@pytest.mark.parametrize("arch", ["resnet_small", "small_cnn", "mlp", "mixed"])
def test_layerwise_per_sample_terms_equal_vmap(arch, kind):
    """One hooked batch backward gives vmap's per-sample sums to float32 rounding, for every
    layer kind and both convolution paths (BatchNorm in eval mode with running statistics)."""
    torch.manual_seed(0)
    if arch == "mixed":
        model, shape = _Mixed(), (3, 12, 12)
    else:
        shape = (64,) if arch == "mlp" else (3, 16, 16)
        model = unlearning.new_model(arch, 5, shape, seed=0, **({"width": 8} if arch == "resnet_small" else {}))
    if arch == "resnet_small":  # running statistics away from 0 and 1, so BatchNorm's xhat matters
        model.train()
        with torch.no_grad():
            model(torch.randn(32, *shape) * 3 + 1)
    x, y = torch.randn(9, *shape), torch.randint(0, 5, (9,))
    layerwise, reference = _layerwise_and_vmap(model, x, y, kind)
    assert layerwise.keys() == reference.keys()
    for name, expected in reference.items():
        assert layerwise[name].dtype == torch.float64
        torch.testing.assert_close(layerwise[name], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_layerwise_per_sample_chunks_a_layer_below_the_heap_block(monkeypatch):
    """A layer's per-sample blocks are cut into row chunks (here 2 rows) and still add up."""
    import unlearning.per_sample as per_sample

    torch.manual_seed(0)
    model = unlearning.new_model("small_cnn", 5, (3, 16, 16), seed=0)
    x, y = torch.randn(7, 3, 16, 16), torch.randint(0, 5, (7,))
    whole, _ = _layerwise_and_vmap(model, x, y, "fisher")
    largest = max(p.numel() for p in model.parameters()) * 4
    monkeypatch.setattr(per_sample, "HEAP_BLOCK_BYTES", 2 * largest + 1)
    chunked, _ = _layerwise_and_vmap(model, x, y, "fisher")
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-12, atol=0)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


class _RawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.offset = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.layer(x + self.offset)


@pytest.mark.parametrize("model_class", [_Shared, _RawParameter])
def test_models_the_layerwise_path_cannot_split_fall_back_to_vmap(model_class):
    """A layer called twice (its per-sample gradient is a sum the squares do not split) or a
    parameter outside the known layers: per-sample sums still equal a one-sample loop."""
    from unlearning.per_sample import LayerwisePerSample

    torch.manual_seed(0)
    model = model_class()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    layerwise = LayerwisePerSample.of(model)
    if layerwise is not None:  # the shared layer is found only when the forward pass runs
        sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters()}
        assert layerwise.step(x, lambda logits: torch.nn.functional.cross_entropy(logits, y, reduction="sum"),
                              lambda g: g.square_(), sums) is False
        assert all(float(s.abs().sum()) == 0 for s in sums.values())  # nothing added before refusing
    got = compute_importance_sums(model, [(x, y)], kind="fisher", mode="per_sample")
    params = dict(model.named_parameters())
    for name, total in got.sums.items():
        expected = sum(
            torch.autograd.grad(torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params[name])[0]
            .pow(2).double()
            for i in range(len(x))
        )
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-9)
