"""The reads' CPU kernels (``cpu_reads.cpp``): fp32, each token's rows read once per read.

The extern ops (``attnres::reference_*``, see :mod:`.ops`) run on CPU between
Inductor's kernels. Eager ATen calls (:mod:`.eager`) make a pass over memory
per term of the formulas; these loops take each token's N source rows (a few
KB, in cache) through the whole read at once, and split the tokens over
``torch.get_num_threads()`` OpenMP threads. Same signatures, dtypes and
formulas as :mod:`.eager` and :mod:`.reference`; tested against the
reference (``tests/kernels/test_cpu.py``).

They apply to contiguous-or-not fp32 CPU tensors (:func:`applies`); anything
else (fp64 for ``gradcheck``, bf16, a merge without a partial) takes
:mod:`.eager`. The library is built on first use with ``$CXX`` (default
``g++``, the compiler Inductor's CPU code needs anyway), cached in
Inductor's cache directory under ``attnres/`` by a hash of the source and the
flags, and loaded with ``ctypes``. Where it cannot be built, :func:`library`
says why once in the log and the reads take :mod:`.eager`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import eager

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_reads.cpp")

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_SIGNATURES = {
    # v, n, w, S, T, d, eps, scale, o, lse, threads
    "attnres_block_read_forward": (_P, _I, _P, _I, _I, _I, _F, _F, _P, _P, _I),
    # grad_o, grad_scale, grad_lse, v, n, w, S, T, d, eps, dv, grad_w_parts, threads
    "attnres_block_read_backward": (_P, _F, _P, _P, _I, _P, _I, _I, _I, _F, _P, _P, _I),
    # o, lse, p, w, T, d, eps, scale, h, threads
    "attnres_merge_forward": (_P, _P, _P, _P, _I, _I, _F, _F, _P, _I),
    # g, h, lse, p, w, T, d, eps, scale, grad_o, grad_lse, grad_p, grad_w_parts, threads
    "attnres_merge_backward": (_P, _P, _P, _P, _P, _I, _I, _F, _F, _P, _P, _P, _P, _I),
}


def _flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _cache_dir() -> Path:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        root = Path(cache_dir())
    except Exception:  # noqa: BLE001 -- any failure: a private helper; fall back to the temp dir
        root = Path(tempfile.gettempdir()) / "torchinductor_attnres"
    return root / "attnres"


def _build(compiler: str, flags: list[str]) -> Path:
    """The shared library for ``flags``, compiled unless the cache has it."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + repr((compiler, flags)).encode()).hexdigest()[:20]
    target = _cache_dir() / f"cpu_reads_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        command = [*shlex.split(compiler), *flags, str(SOURCE), "-o", str(partial)]
        log.info("attnres: building the CPU read kernels (once per cache directory): %s", shlex.join(command))
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(partial, target)  # atomic: a concurrent process loads a whole file or builds its own
    return target


@functools.cache
def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None (said once in the log) where they cannot be built."""
    compiler = os.environ.get("CXX", "g++")
    try:
        lib = ctypes.CDLL(str(_build(compiler, _flags())))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        log.warning(
            "attnres: the CPU read kernels could not be built with %r (%s); reads on CPU run as eager ATen "
            "calls, which is slower", compiler, detail.strip().splitlines()[-1] if detail.strip() else error,
        )
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib


def applies(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernels take these tensors (None entries ignored): fp32 on CPU, non-empty, and built."""
    present = [t for t in tensors if t is not None]
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0 for t in present):
        return False
    return library() is not None


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    """``t``'s data pointer (NULL for None); the caller keeps ``t`` alive until the kernel returns."""
    return None if t is None else t.data_ptr()


def _pointers(tensors: Sequence[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _rows(v: Tensor) -> Tensor:
    """``v [..., d]`` as contiguous ``[T, d]``."""
    return v.contiguous().reshape(-1, v.shape[-1])


def _threads() -> int:
    return max(1, torch.get_num_threads())


# --------------------------------------------------------------------------
# Phase 1 and the plain read
# --------------------------------------------------------------------------


def _read(sources: Sequence[Tensor], queries: Tensor, eps: float, scale: float, with_lse: bool):
    first = sources[0]
    vs = [_rows(v) for v in sources]
    w = queries.contiguous()
    tokens, d, num_queries = vs[0].shape[0], vs[0].shape[1], w.shape[0]
    o = first.new_empty((num_queries, *first.shape))
    lse = first.new_empty((num_queries, *first.shape[:-1])) if with_lse else None
    library().attnres_block_read_forward(
        _pointers(vs), len(vs), w.data_ptr(), num_queries, tokens, d, eps, scale, o.data_ptr(), _ptr(lse), _threads()
    )
    return o, lse


def block_read_forward(sources: Sequence[Tensor], queries: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`.reference.block_read_forward`: ``o [S, ..., d]``, ``lse [S, ...]``."""
    return _read(sources, queries, eps, 1.0, with_lse=True)


def read_forward(sources: Sequence[Tensor], query: Tensor, eps: float, scale: float) -> Tensor:
    """:func:`.reference.read_forward`: ``h [..., d]``."""
    o, _ = _read(sources, query.unsqueeze(0), eps, scale, with_lse=False)
    return o[0]


def _read_backward(
    grad_o: Optional[Tensor], grad_scale: float, grad_lse: Optional[Tensor], sources: Sequence[Tensor],
    queries: Tensor, eps: float,
) -> tuple[list[Tensor], Tensor]:
    vs = [_rows(v) for v in sources]
    w = queries.contiguous()
    # Held in names until the call returns: a temporary's memory would be freed before the kernel reads it.
    g = None if grad_o is None else grad_o.contiguous()
    g_lse = None if grad_lse is None else grad_lse.contiguous()
    tokens, d, num_queries = vs[0].shape[0], vs[0].shape[1], w.shape[0]
    grads = [torch.empty_like(v) for v in vs]
    parts = w.new_zeros((_threads(), num_queries, d))
    library().attnres_block_read_backward(
        _ptr(g), grad_scale, _ptr(g_lse), _pointers(vs), len(vs), w.data_ptr(), num_queries, tokens, d, eps,
        _pointers(grads), parts.data_ptr(), parts.shape[0],
    )
    return [g.reshape(src.shape) for g, src in zip(grads, sources)], parts.sum(0)


def block_read_backward(
    grad_o: Optional[Tensor], grad_lse: Optional[Tensor], sources: Sequence[Tensor], queries: Tensor, eps: float
) -> tuple[list[Tensor], Tensor]:
    """:func:`.reference.block_read_backward`: ``(grad_sources, grad_queries)``."""
    return _read_backward(grad_o, 1.0, grad_lse, sources, queries, eps)


def read_backward(
    grad_h: Tensor, sources: Sequence[Tensor], query: Tensor, eps: float, scale: float
) -> tuple[list[Tensor], Tensor]:
    """:func:`.reference.read_backward`: ``(grad_sources, grad_query)``."""
    grad_sources, grad_queries = _read_backward(grad_h, scale, None, sources, query.unsqueeze(0), eps)
    return grad_sources, grad_queries[0]


# --------------------------------------------------------------------------
# Phase 2 (without a partial it is ``scale * o``, one ATen call: ``eager``'s)
# --------------------------------------------------------------------------


def merge_forward(
    o: Tensor, lse: Tensor, partial: Optional[Tensor], query: Tensor, eps: float, scale: float
) -> Tensor:
    """:func:`.reference.merge_forward`: ``h [..., d]``."""
    if partial is None:
        return eager.merge_forward(o, lse, None, query, eps, scale)
    o_rows, p_rows, lse_c, w = _rows(o), _rows(partial), lse.contiguous(), query.contiguous()
    h = torch.empty_like(o_rows)
    library().attnres_merge_forward(
        o_rows.data_ptr(), lse_c.data_ptr(), p_rows.data_ptr(), w.data_ptr(),
        o_rows.shape[0], o_rows.shape[1], eps, scale, h.data_ptr(), _threads(),
    )
    return h.reshape(o.shape)


def merge_backward(
    grad_h: Tensor, h: Tensor, lse: Tensor, partial: Optional[Tensor], query: Tensor, eps: float, scale: float
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """:func:`.reference.merge_backward`: ``(grad_o, grad_lse, grad_partial, grad_query)``."""
    if partial is None:
        return eager.merge_backward(grad_h, h, lse, None, query, eps, scale)
    g, h_rows, p_rows, lse_c, w = _rows(grad_h), _rows(h), _rows(partial), lse.contiguous(), query.contiguous()
    grad_o, grad_p, grad_lse = torch.empty_like(g), torch.empty_like(g), torch.empty_like(lse_c)
    parts = w.new_zeros((_threads(), w.shape[0]))
    library().attnres_merge_backward(
        g.data_ptr(), h_rows.data_ptr(), lse_c.data_ptr(), p_rows.data_ptr(), w.data_ptr(), g.shape[0], g.shape[1],
        eps, scale, grad_o.data_ptr(), grad_lse.data_ptr(), grad_p.data_ptr(), parts.data_ptr(), parts.shape[0],
    )
    return grad_o.reshape(h.shape), grad_lse, grad_p.reshape(partial.shape), parts.sum(0)
