"""Shared pieces of the Triton reads: source pointer table, tile loads, launch choices.

The sources of a read are separate tensors (the stream's block summaries); the
kernels take them as ``MAX_SOURCES`` separate pointer arguments instead of a
stacked ``[N, T, d]`` tensor, because stacking would copy every source once per
read. The number of sources actually used is the constexpr ``N``; unused
pointer slots repeat the first source and are never loaded. A read over more
than ``MAX_SOURCES`` sources is split into chunks of sources by the launchers
(each file says how the chunks are combined).

Whether the kernels run compiled or under the Triton interpreter is decided by
``TRITON_INTERPRET`` when this module is imported, which is when ``triton.jit``
decorates the kernels: :data:`INTERPRETED` records it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "INTERPRETED",
    "MAX_SOURCES",
    "load_tile",
    "padded_sources",
    "persistent_programs",
    "pick_source",
    "pow2",
    "source_chunks",
]

MAX_SOURCES = 16
"""Source pointer arguments per launch (N <= 16 in one launch; more are chunked)."""

INTERPRETED = bool(triton.knobs.runtime.interpret)
"""True when the kernels below were decorated under ``TRITON_INTERPRET=1`` (run on CPU tensors)."""


def pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (tile sizes must be powers of two)."""
    return triton.next_power_of_2(int(n))


def persistent_programs(device: torch.device) -> int:
    """Programs of a persistent (grid-stride) kernel: two per SM on CUDA, 3 under the interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 3  # a few, so that the tests stride over several token blocks per program


def padded_sources(sources: Sequence[Tensor]) -> list[Tensor]:
    """``sources`` (1 <= N <= MAX_SOURCES) padded to MAX_SOURCES pointer arguments with sources[0]."""
    if not 1 <= len(sources) <= MAX_SOURCES:
        raise ValueError(f"one launch takes 1..{MAX_SOURCES} sources, got {len(sources)}")
    return [*sources, *([sources[0]] * (MAX_SOURCES - len(sources)))]


def source_chunks(num_sources: int) -> list[tuple[int, int]]:
    """Split ``num_sources`` into the fewest launches of near-equal size, as ``(start, stop)``.

    Equal sizes (9 + 8 rather than 16 + 1) keep every launch's unrolled loop short.
    """
    num_chunks = -(-num_sources // MAX_SOURCES)
    base, extra = divmod(num_sources, num_chunks)
    bounds, start = [], 0
    for c in range(num_chunks):
        stop = start + base + (1 if c < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@triton.jit
def pick_source(
    i: tl.constexpr,
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15,
):
    """Pointer ``p_i`` of the table, chosen at compile time (``i`` is a constexpr)."""
    p = p0
    if i == 1:
        p = p1
    if i == 2:
        p = p2
    if i == 3:
        p = p3
    if i == 4:
        p = p4
    if i == 5:
        p = p5
    if i == 6:
        p = p6
    if i == 7:
        p = p7
    if i == 8:
        p = p8
    if i == 9:
        p = p9
    if i == 10:
        p = p10
    if i == 11:
        p = p11
    if i == 12:
        p = p12
    if i == 13:
        p = p13
    if i == 14:
        p = p14
    if i == 15:
        p = p15
    return p


@triton.jit
def load_tile(ptr, tok, col, tok_ok, col_ok, D):
    """Rows ``tok`` [BT] (int64), columns ``col`` [BD] of a row-major ``[T, D]`` tensor, as fp32 [BT, BD]."""
    offsets = tok[:, None] * D + col[None, :]
    mask = tok_ok[:, None] & col_ok[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
