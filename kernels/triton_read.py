"""The plain per-layer read in Triton: all sources, one query (Full AttnRes, final reads).

Math (reference: :func:`reference.read_forward` / ``read_backward``)::

    h = scale * sum_i softmax_i(w . rmsnorm(v_i)) v_i

It is phase 1 with one query and the scale folded into the output, so it runs
the phase-1 kernels of :mod:`.triton_block_read` with ``S = 1`` (the same
pointer table, masking, and chunking of more than ``MAX_SOURCES`` sources);
the backward passes no ``lse`` grad, so that kernel skips the ``lse`` term.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from . import triton_block_read

__all__ = ["read_backward", "read_forward"]


def read_forward(sources: Sequence[Tensor], query: Tensor, eps: float, scale: float) -> Tensor:
    """Plain read forward in Triton; same contract as :func:`reference.read_forward`.

    Parameters
    ----------
    sources : sequence of N Tensors [..., d], one shape, one dtype (fp32/bf16/fp16)
    query : Tensor [d]
    eps, scale : float

    Returns
    -------
    h : Tensor [..., d], dtype of the sources.
    """
    o, _ = triton_block_read.block_read_forward(sources, query.unsqueeze(0), eps, scale)  # [1, ..., d]
    return o[0]


def read_backward(
    grad_h: Tensor, sources: Sequence[Tensor], query: Tensor, eps: float, scale: float
) -> tuple[list[Tensor], Tensor]:
    """Plain read backward in Triton; same contract as :func:`reference.read_backward`.

    Parameters
    ----------
    grad_h : Tensor [..., d]
    sources : sequence of N Tensors [..., d]
    query : Tensor [d]
    eps, scale : float

    Returns
    -------
    grad_sources : list of N Tensors [..., d], dtype of the sources
    grad_query : Tensor [d], dtype of the query
    """
    grad_sources, grad_queries = triton_block_read.block_read_backward(
        grad_h.unsqueeze(0), None, sources, query.unsqueeze(0), eps, scale
    )
    return grad_sources, grad_queries[0]
