"""What a training step keeps for its backward: the figure activation memory is judged by."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def saved_for_backward_bytes(forward: Callable[[], Tensor]) -> int:
    """Bytes of the tensors ``forward()`` saves for its backward, each storage view counted once.

    Counted by ``torch.autograd.graph.saved_tensors_hooks`` around the call (for a
    compiled model: what AOTAutograd's partitioner chose to save, parameters
    included); the backward of ``forward().float().square().mean()`` then runs
    and frees them. Gradients it leaves on parameters are the caller's to clear.
    """
    saved: dict[tuple, int] = {}

    def pack(t: Tensor) -> Tensor:
        saved[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out.float().square().mean().backward()
    return sum(saved.values())
