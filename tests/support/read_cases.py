"""Random inputs of the reads and a comparison of their outputs, shared by the kernel tests."""

from __future__ import annotations

import torch


def read_case(shape: tuple, n: int, s: int, seed: int, dtype: torch.dtype = torch.float32):
    """``(sources, queries, grad_o, grad_lse)``: N sources of ``shape``, S queries, and gradients for phase 1's outputs."""
    gen = torch.Generator().manual_seed(seed)
    sources = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(n)]
    queries = torch.randn(s, shape[-1], generator=gen, dtype=dtype)
    grad_o = torch.randn(s, *shape, generator=gen, dtype=dtype)
    grad_lse = torch.randn(s, *shape[:-1], generator=gen, dtype=dtype)
    return sources, queries, grad_o, grad_lse


def assert_reads_close(got, want, tol: float) -> None:
    """``got`` and ``want`` (tensors, or nested lists and tuples of them, None allowed) alike in dtype, shape and values."""
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_reads_close(g, w, tol)
    elif want is None:
        assert got is None
    else:
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
