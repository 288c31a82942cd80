"""Keeping freed memory in the process: every pass over data allocates and frees the same
large blocks at every batch (activations, per-sample gradients), and glibc's defaults hand
them back to the OS each time, so every batch faults its pages in afresh
(docs/implementation-notes.md#per-sample-gradients-and-the-allocator).

`keep_freed_memory` is called by every importance pass and by the processes that only make
outcome passes (the Ray evaluator actors); not by every outcome pass, since a driver that keeps
freed memory keeps its heap's transient peaks too. It is process-wide and idempotent, and a
no-op without glibc. Even with it glibc mmaps any block of 32 MiB or more, so outcome passes
forward `rows_per_forward` rows at a time, fewer than a batch where the model's activations
are large.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor, nn

# glibc's malloc on 64-bit: blocks of HEAP_BLOCK_BYTES or more are mmapped (32 MiB is the largest
# threshold it accepts); a thread's arena is a list of 64 MiB heaps (HEAP_MAX_SIZE).
HEAP_BLOCK_BYTES = 32 << 20
HEAP_BYTES = 64 << 20
KEEP_FREED_BYTES = 1 << 30  # free memory the main heap keeps at its top before trimming it
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
_freed_memory_kept: bool | None = None  # None: not asked yet


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; once per process, idempotent.

    By default glibc mmaps a block of 128 KiB or more and unmaps it when freed, trims free
    memory beyond 128 KiB at the top of the main heap, and unmaps a thread's heap as soon as it
    is empty. Per-sample gradients and a pass's activations are allocated and freed at every
    chunk or batch, so each one faulted its pages in afresh: 1,500-2,000 page faults a row for
    resnet_small's per-sample gradients in a thread (Ray Train runs the train function in one),
    about as much time in the kernel as in the model, and 15-30 % of a one-thread forward pass.
    Here blocks below 32 MiB come from the heaps, the main heap keeps up to 1 GiB free, and a
    top pad of one whole heap keeps threads' heaps mapped. Memory is reused, not returned: a
    process stays at its peak. Returns False (and changes nothing) without glibc.
    """
    global _freed_memory_kept
    if _freed_memory_kept is None:
        _freed_memory_kept = (
            _mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES)
            and _mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
            and _mallopt(_M_TOP_PAD, HEAP_BYTES)
        )
    return _freed_memory_kept


def _mallopt(parameter: int, value: int) -> bool:
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # raises where the C library is not glibc
        return ctypes.CDLL(None).mallopt(parameter, value) == 1
    except (AttributeError, OSError, ValueError):
        return False


def rows_per_forward(model: nn.Module, sample: Tensor, most: int) -> int:
    """Rows per forward pass (at most `most`) whose largest activation stays within a quarter of
    `HEAP_BLOCK_BYTES`, measured on one row of `sample` (a batch on the model's device): larger
    blocks are mmapped and faulted in again at every batch. A quarter leaves room for a
    convolution's own buffers. resnet_small (width 16) 64, torchvision's ResNet-18 at 32 pixels
    32, the digits networks `most`.
    """
    largest = 0

    def record(_module, _inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return max(1, min(most, HEAP_BLOCK_BYTES // (4 * max(largest, 1))))
