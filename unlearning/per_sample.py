"""Per-sample squared (or absolute) gradients from one batch backward, layer by layer.

`torch.func.vmap` over one-sample gradients is exact for any model but costs about twice a
batch backward: its per-sample convolution weight gradients are not the batched matrix
product they could be. For the layers that hold almost every parameter of a vision network
the per-sample weight gradient is a product of what the layer saw and what came back to it:

    Linear      grad_i W = g_i x_i^T                 (summed over any sequence positions)
    Conv        grad_i W = g_i unfold(x_i)^T         (summed over output positions)
    BatchNorm   grad_i w = sum_p g_ip xhat_ip,  grad_i b = sum_p g_ip   (eval: running statistics)
    LayerNorm / GroupNorm   the same with the sample's own statistics

where x_i is sample i's input to the layer and g_i the gradient of *its own* loss with respect
to the layer's output. With the batch loss taken as the sum of per-sample losses and the model
in eval mode, samples do not interact, so one backward of the summed loss yields every g_i at
once. A forward hook keeps x, a tensor hook on the output receives g, and the per-sample
weight gradients are formed there in row chunks (a memory budget), squared or made absolute,
and added in float64. The backward itself asks only for the input's gradient, so autograd
skips the batch weight gradients this replaces: the cost is about one batch backward.

`LayerwisePerSample.of(model)` is None (the caller falls back to vmap) when a trainable
parameter lives outside these layers, a layer is in training mode where that couples samples,
or a convolution pads in a way `unfold` does not; a layer called twice in one forward pass is
found at run time (`step` returns False before adding anything) since its per-sample gradient
is then a sum the squares do not split.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearning.heap import HEAP_BLOCK_BYTES
from unlearning.models import logits_of

LAYER_BUDGET_BYTES = 256 << 20  # one layer's per-sample gradients and unfolded inputs, per chunk
GROUPED_MIN_POSITIONS = 128  # convolutions with more output positions use a grouped backward
SMALL_ROW = 4096  # terms per sample below which one float64 sum over the rows is cheaper

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, *_NORMS)


def _supported(module: nn.Module) -> bool:
    if not isinstance(module, _LAYERS):
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        # training mode (or no running statistics) normalises with the batch's own statistics
        return not module.training and module.track_running_stats
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return True


class LayerwisePerSample:
    """Per-sample gradient terms of `model`'s trainable parameters from hooks on its layers."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]):
        self.model = model
        self.layers = layers  # module name -> module holding trainable parameters

    @classmethod
    def of(cls, model: nn.Module) -> LayerwisePerSample | None:
        layers: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not _supported(module):
                return None
            layers[name] = module
        return cls(model, layers) if layers else None

    def step(self, inputs: Tensor, loss_of: Callable[[Tensor], Tensor], accumulate: Callable[[Tensor], Tensor],
             sums: dict[str, Tensor]) -> bool:
        """Add every sample's terms accumulate(grad_i) to `sums` (float64, by parameter name).

        `loss_of(logits)` is the sum of the per-sample losses; `accumulate` may work in place
        (it is given fresh tensors). False (and `sums` untouched) when a layer ran more than
        once or the input cannot carry a gradient.
        """
        if not inputs.is_floating_point():
            return False
        seen: dict[str, Tensor] = {}
        calls: dict[str, int] = {}
        pending: dict[str, dict[str, Tensor]] = {}

        def forward_hook(name):
            def hook(module, args, output):
                calls[name] = calls.get(name, 0) + 1
                seen[name] = args[0].detach()
                if output.requires_grad:
                    output.register_hook(lambda g: pending.__setitem__(name, self._terms(name, g, seen, accumulate)))
            return hook

        handles = [module.register_forward_hook(forward_hook(name)) for name, module in self.layers.items()]
        try:
            x = inputs.detach().requires_grad_(True)
            logits = logits_of(self.model(x))
            if any(count != 1 for count in calls.values()) or len(calls) != len(self.layers):
                return False
            torch.autograd.grad(loss_of(logits), x)
        finally:
            for handle in handles:
                handle.remove()
        if len(pending) != len(self.layers):
            return False
        for name, terms in pending.items():
            prefix = f"{name}." if name else ""
            for parameter, total in terms.items():
                sums[prefix + parameter] += total
        return True

    def _terms(self, name: str, g: Tensor, seen: dict[str, Tensor], accumulate) -> dict[str, Tensor]:
        module, x = self.layers[name], seen.pop(name)
        g = g.detach()
        total_bytes, largest_bytes = _row_bytes(module, x, g)
        rows = max(1, min(LAYER_BUDGET_BYTES // total_bytes, (HEAP_BLOCK_BYTES - 1) // largest_bytes))
        totals: dict[str, Tensor] = {}
        for start in range(0, len(x), rows):
            grads = _per_sample_grads(module, x[start : start + rows], g[start : start + rows])
            for parameter, grad in grads.items():
                if getattr(module, parameter).requires_grad:
                    total = totals.setdefault(parameter, torch.zeros(grad.shape[1:], dtype=torch.float64, device=grad.device))
                    _add_rows(total, accumulate(grad))
        return totals


def _add_rows(total: Tensor, terms: Tensor) -> None:
    """total += terms summed over rows, in float64. A float32 -> float64 `sum(dtype=)` over the
    rows of a large tensor runs at ~10 ns an element here; adding row by row is ~15x faster."""
    if terms[0].numel() < SMALL_ROW:
        total.add_(terms.sum(dim=0, dtype=torch.float64))
    else:
        for row in terms:
            total.add_(row)


def _row_bytes(module: nn.Module, x: Tensor, g: Tensor) -> tuple[int, int]:
    """Bytes a sample takes in one chunk's blocks: all of them, and the largest block.

    A chunk's largest block is kept below HEAP_BLOCK_BYTES so that malloc serves it from a heap
    `heap.keep_freed_memory` keeps (a fresh mmap faults its pages in at every chunk)."""
    weight = module.weight.numel() if module.weight is not None else 1
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        kernel = math.prod(module.weight.shape[1:]) * module.groups
        columns = kernel * (g[0].numel() // module.out_channels)
        return 4 * (weight + columns), 4 * max(weight, columns)
    return 4 * (2 * weight + x[0].numel() + g[0].numel()), 4 * max(weight, x[0].numel(), g[0].numel())


def _per_sample_grads(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    if isinstance(module, nn.Linear):
        x, g = x.reshape(len(x), -1, x.shape[-1]), g.reshape(len(g), -1, g.shape[-1])
        grads = {"weight": torch.einsum("bto,bti->boi", g, x)}
        if module.bias is not None:
            grads["bias"] = g.sum(dim=1)
        return grads
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _conv_grads(module, x, g)
    xhat = _normalised(module, x)
    if isinstance(module, nn.LayerNorm):  # weight has the normalised shape: sum the leading dims
        dims = list(range(1, g.dim() - len(module.normalized_shape)))
    else:  # BatchNorm, GroupNorm: a weight per channel, summed over positions
        dims = list(range(2, g.dim()))
    grads = {"weight": _sum(g * xhat, dims)}
    if module.bias is not None:
        grads["bias"] = _sum(g, dims)
    return grads


def _sum(t: Tensor, dims: list[int]) -> Tensor:
    return t.sum(dim=dims) if dims else t.clone()  # a fresh tensor: `accumulate` works in place


def _normalised(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)


def _conv_grads(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-sample weight gradients of a convolution, two ways (same values; docs/implementation-notes.md).

    Many output positions: one weight-gradient backward of the convolution with the batch
    folded into its groups (sample b's channels are group b), which returns every sample's
    gradient at once. Few positions: unfold the input and multiply, as a batched matrix
    product (the grouped backward's overhead per group dominates there)."""
    conv1d = isinstance(module, nn.Conv1d)
    if conv1d:  # as a 2-D convolution of height 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, padding = (1, *module.kernel_size), (0, *module.padding)
        stride, dilation = (1, *module.stride), (1, *module.dilation)
    else:
        kernel, padding, stride, dilation = module.kernel_size, module.padding, module.stride, module.dilation
    rows, groups, out = len(x), module.groups, module.out_channels
    shape = (rows, out, module.in_channels // groups, *kernel)
    if g.shape[2] * g.shape[3] >= GROUPED_MIN_POSITIONS:
        weight = torch.nn.grad.conv2d_weight(
            x.reshape(1, -1, *x.shape[2:]), (rows * out, *shape[2:]), g.reshape(1, -1, *g.shape[2:]),
            stride=stride, padding=padding, dilation=dilation, groups=rows * groups,
        ).reshape(shape)
    else:
        columns = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C*k*k, P)
        columns = columns.reshape(rows * groups, -1, columns.shape[-1])
        flat = g.reshape(rows * groups, out // groups, -1)  # (B*G, O/G, P)
        weight = torch.bmm(flat, columns.transpose(1, 2)).reshape(shape)
    if conv1d:
        weight = weight.squeeze(3)
    grads = {"weight": weight}
    if module.bias is not None:
        grads["bias"] = g.sum(dim=(2, 3))
    return grads
