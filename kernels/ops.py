"""The Block AttnRes reads as ``torch.library`` ops (namespace ``attnres``).

Ops (schemas are pinned; the passes find the reads by these names)::

    attnres::read(Tensor[] sources, Tensor query, float eps, float scale) -> Tensor
    attnres::read_backward(Tensor grad, Tensor[] sources, Tensor query, float eps,
                           float scale) -> Tensor[]            # [*grad_sources, grad_query]
    attnres::block_read(Tensor[] sources, Tensor queries, float eps) -> (Tensor, Tensor)
    attnres::block_read_backward(Tensor grad_o, Tensor grad_lse, Tensor[] sources,
                                 Tensor queries, float eps) -> Tensor[]
                                                               # [*grad_sources, grad_queries]
    attnres::merge(Tensor o, Tensor lse, Tensor? partial, Tensor query, float eps,
                   float scale) -> Tensor
    attnres::merge_backward(Tensor grad, Tensor h, Tensor lse, Tensor? partial,
                            Tensor query, float eps, float scale) -> Tensor[]
                                          # [grad_o, grad_lse, (grad_partial,) grad_query]
                                          # h: the merge's output, which its backward reads

Each op is a ``torch.library.triton_op``: eager calls run the body; under
``torch.compile`` AOTAutograd decomposes the op into its body, so Inductor sees
what is inside it -- the ``wrap_triton`` kernels on CUDA, which Inductor keeps
as user-defined Triton kernels in its output code; elsewhere one
``attnres::reference_*`` op, which it calls as an extern kernel -- while
``torch.export`` keeps each op as one node. The body also serves as the fake
kernel, so it must stay traceable under FakeTensor and symbolic shapes: no
``.item()``, no data-dependent control flow. Each forward op has
``register_autograd`` whose backward is the matching ``*_backward`` op, so the
backward is one node too.

Which path a body takes (decided from dtypes and devices only, so it traces):

- the Triton kernels (``triton_read``, ``triton_block_read``, ``triton_merge``)
  for CUDA tensors of fp32, bf16 or fp16;
- the same kernels under the Triton interpreter for real (not fake) tensors on
  any device when the process runs with ``TRITON_INTERPRET=1`` (set before this
  package is imported): that is how the CPU tests exercise them;
- the reference math otherwise -- CPU, fp64, a missing Triton, empty
  tensors -- inside an ``attnres::reference_*`` op that is opaque to the
  compiler (see the section on them below for why), which runs the C++
  kernels of ``cpu`` for fp32 on CPU and the ATen calls of ``eager`` for the
  rest; or ``reference`` itself, traced for Inductor to fuse
  (:func:`reference_reads`).

Phase 2 (``attnres::merge`` and its backward) can instead stay on aten ops on
CUDA, traced so that Inductor fuses them with the add that forms the partial.
The choice is read at each dispatch (:func:`merge_impl`):
``ATTNRES_MERGE_IMPL=aten|triton`` in the environment, or :func:`use_merge_impl`
around the calls (a compiled graph keeps the choice it was traced with). The
default is ``"triton"`` until both have been measured side by side on a GPU
(``benchmarks/bench_read.py`` times both). On CUDA a layer without a partial
(``h = scale * o``) is always traced aten ops.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import cpu, eager, reference

__all__ = [
    "MERGE_IMPLS",
    "REFERENCE_READS",
    "attnres_block_read",
    "attnres_merge",
    "attnres_read",
    "choices_key",
    "implementation_fingerprint",
    "merge_impl",
    "reference_reads",
    "use_merge_impl",
    "use_reference_reads",
]

log = logging.getLogger(__name__)

DEFAULT_EPS = reference.DEFAULT_EPS

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def implementation_fingerprint() -> str:
    """A hash of this package's sources (the ops' bodies, the reference, the kernels, Python and C++).

    Inductor's FX graph and AOTAutograd caches key on the traced graph, which
    names these ops but does not hold their Python bodies: code compiled
    against other bodies (another release, an edited checkout) must not be
    served for these. The backend puts this hash into the caches' key.
    """
    digest = hashlib.sha256()
    for path in sorted([*Path(__file__).parent.glob("*.py"), *Path(__file__).parent.glob("*.cpp")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------
# Path choice (dtype, device and fake-ness only: safe while tracing)
# --------------------------------------------------------------------------


class _TritonKernels(NamedTuple):
    read: ModuleType  # triton_read
    block_read: ModuleType  # triton_block_read
    merge: ModuleType  # triton_merge
    interpreted: bool  # decorated under TRITON_INTERPRET=1


@functools.cache
def _triton_kernels() -> Optional[_TritonKernels]:
    """The kernel modules, imported on first use (so a CPU-only process never imports
    Triton for them); None where Triton is not installed."""
    try:
        from . import triton_block_read, triton_common, triton_merge, triton_read
    except ImportError as error:
        log.debug("Triton kernels unavailable (%s): the reference path only", error)
        return None
    return _TritonKernels(triton_read, triton_block_read, triton_merge, triton_common.INTERPRETED)


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _use_triton(*tensors: Optional[Tensor]) -> bool:
    """Whether the Triton kernels take these tensors (None entries are ignored); see the docstring."""
    present = [t for t in tensors if t is not None]
    if any(t.dtype not in _TRITON_DTYPES or t.numel() == 0 for t in present):
        return False
    on_cuda = all(t.device.type == "cuda" for t in present)
    if not (on_cuda or _interpreter_requested()):
        return False
    kernels = _triton_kernels()
    if kernels is None:
        return False
    if kernels.interpreted:
        # Interpreted kernels run on real data only; traced (fake) calls take the reference.
        return not torch.compiler.is_compiling() and not any(is_fake(t) for t in present)
    return on_cuda


class _Choice:
    """A setting read at each dispatch: a context manager's value, else an environment variable, else the default.

    Read while a compile traces an op's body, so a compiled graph keeps the
    value it was traced with; the backend puts every choice's value into
    Inductor's cache key (:func:`choices_key`).
    """

    def __init__(self, env: str, allowed: tuple[str, ...]):
        self.env, self.allowed = env, allowed
        self._override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(env, default=None)

    def _checked(self, value: str, where: str) -> str:
        if value not in self.allowed:
            options = " or ".join(repr(a) for a in self.allowed)
            raise ValueError(f"attnres: {where} must be {options}, got {value!r}")
        return value

    def get(self) -> str:
        override = self._override.get()
        return override if override is not None else self._checked(os.environ.get(self.env, self.allowed[0]), self.env)

    @contextlib.contextmanager
    def use(self, value: str, where: str) -> Iterator[None]:
        token = self._override.set(self._checked(value, where))
        try:
            yield
        finally:
            self._override.reset(token)


MERGE_IMPLS = ("triton", "aten")
"""Values of :func:`merge_impl`, the default first."""
REFERENCE_READS = ("auto", "extern", "traced")
"""Values of :func:`reference_reads`, the default first."""
_MERGE_IMPL = _Choice("ATTNRES_MERGE_IMPL", MERGE_IMPLS)
_REFERENCE_READS = _Choice("ATTNRES_REFERENCE_READS", REFERENCE_READS)


def merge_impl() -> str:
    """Phase 2 on the Triton path, read at dispatch: ``"triton"`` (the kernel, default) or ``"aten"``.

    :func:`use_merge_impl` wins over ``ATTNRES_MERGE_IMPL`` in the environment.
    """
    return _MERGE_IMPL.get()


def use_merge_impl(impl: str):
    """Run phase 2 as ``impl`` (``"triton"`` or ``"aten"``) inside the block (and trace it so)."""
    return _MERGE_IMPL.use(impl, "use_merge_impl(impl)")


def reference_reads() -> str:
    """How a compile takes a read that has no Triton kernel (CPU, fp64), read at dispatch.

    ``"extern"``: one ``attnres::reference_*`` op, which Inductor calls as an
    extern kernel -- no generated code per read, so the compile time of a deep
    model stays near the plain model's, for slower steps. ``"traced"``: the
    reference math, traced for Inductor to fuse with its neighbours -- faster
    steps on CPU, but every layer adds kernels to generate and compile.
    ``"auto"`` (default): the backend picks per graph (see
    ``attnres_compile.backend``): ``"extern"`` for a graph with a backward,
    whose compile is the long one, ``"traced"`` for an inference graph
    (prefill, decode), whose step latency counts most; elsewhere it means
    ``"extern"``. :func:`use_reference_reads` wins over ``ATTNRES_REFERENCE_READS``.
    """
    return _REFERENCE_READS.get()


def use_reference_reads(mode: str):
    """Take reads without a Triton kernel as ``mode`` (one of :data:`REFERENCE_READS`) inside the block."""
    return _REFERENCE_READS.use(mode, "use_reference_reads(mode)")


def choices_key() -> str:
    """The settings that change what an op's body traces to, for Inductor's cache key."""
    return f"merge={merge_impl()},reference_reads={reference_reads()}"


def _use_triton_merge(partial: Optional[Tensor], *tensors: Optional[Tensor]) -> bool:
    return partial is not None and merge_impl() == "triton" and _use_triton(partial, *tensors)


def _traced_merge(partial: Optional[Tensor], *tensors: Tensor) -> bool:
    """The merge's aten ops go to Inductor to fuse: on CUDA the "aten" merge or no partial to merge;
    elsewhere with ``reference_reads() == "traced"``."""
    on_cuda = all(t.device.type == "cuda" for t in (*tensors, *([partial] if partial is not None else [])))
    if on_cuda:
        return partial is None or merge_impl() == "aten"
    return reference_reads() == "traced"


# --------------------------------------------------------------------------
# Input validation (shape/dtype only: safe on fake and symbolic tensors)
# --------------------------------------------------------------------------


def _check_floating(op: str, name: str, t: Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_sources(op: str, sources: Sequence[Tensor]) -> None:
    """All sources: non-empty list, one shape, one dtype, one device, floating, dim >= 1."""
    if len(sources) == 0:
        raise ValueError(f"{op}: sources must be a non-empty list of tensors")
    first = sources[0]
    _check_floating(op, "sources[0]", first)
    if first.dim() == 0:
        raise ValueError(f"{op}: sources must have a hidden dim d, got a 0-d tensor")
    for i, v in enumerate(sources[1:], start=1):
        if v.dtype != first.dtype:
            raise ValueError(
                f"{op}: all sources must have one dtype; sources[0] is {first.dtype}, "
                f"sources[{i}] is {v.dtype}"
            )
        if v.shape != first.shape:
            raise ValueError(
                f"{op}: all sources must have one shape; sources[0] is {tuple(first.shape)}, "
                f"sources[{i}] is {tuple(v.shape)}"
            )
        if v.device != first.device:
            raise ValueError(
                f"{op}: all sources must be on one device; sources[0] is on {first.device}, "
                f"sources[{i}] is on {v.device}"
            )


def _check_query(op: str, name: str, query: Tensor, d: object, like: Tensor, rows: bool) -> None:
    """A query ``[d]`` (``rows=False``) or a query matrix ``[S, d]`` (``rows=True``)."""
    _check_floating(op, name, query)
    want = "[S, d]" if rows else "[d]"
    if query.dim() != (2 if rows else 1):
        raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(query.shape)}")
    if query.shape[-1] != d:
        raise ValueError(
            f"{op}: {name} must be {want} with d = {d} (the sources' last dim), "
            f"got shape {tuple(query.shape)}"
        )
    if query.device != like.device:
        raise ValueError(f"{op}: {name} is on {query.device}, the sources on {like.device}")


def _check_like(op: str, name: str, t: Tensor, shape: object, like: Tensor, dtype: bool) -> None:
    _check_floating(op, name, t)
    if t.shape != shape:
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype and t.dtype != like.dtype:
        raise ValueError(f"{op}: {name} must have dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {like.device}")


def _check_merge(op: str, o: Tensor, lse: Tensor, partial: Optional[Tensor], query: Tensor) -> None:
    _check_floating(op, "o", o)
    if o.dim() == 0:
        raise ValueError(f"{op}: o must have a hidden dim d, got a 0-d tensor")
    _check_like(op, "lse", lse, o.shape[:-1], o, dtype=False)
    if partial is not None:
        _check_like(op, "partial", partial, o.shape, o, dtype=True)
    _check_query(op, "query", query, o.shape[-1], o, rows=False)


# --------------------------------------------------------------------------
# The reference path, as ops torch.compile does not trace into
# --------------------------------------------------------------------------
# Where the Triton kernels do not apply (CPU, fp64) a read runs the reference
# math eagerly, inside an op of its own: Inductor calls it as an extern kernel
# instead of generating code for it. Generated code would differ from read to
# read (the number of sources, the scale, the query row are constants in it),
# so every layer would add kernels to compile; as an extern call, a model's
# reads add none, and its compile time stays that of the plain model at any
# depth. The ops run ``cpu`` (C++ loops, one pass over each token's rows) for
# fp32 CPU tensors, ``eager`` (the reference's formulas as ATen calls, source
# by source) otherwise; both are tested against the reference.


def _flat_read_backward(
    impl: ModuleType, grad: Tensor, sources: list[Tensor], query: Tensor, eps: float, scale: float
) -> list[Tensor]:
    """``impl.read_backward`` as the op returns it: ``[*grad_sources, grad_query]``."""
    grad_sources, grad_query = impl.read_backward(grad, sources, query, eps, scale)
    return [*grad_sources, grad_query]


def _flat_block_read_backward(
    impl: ModuleType, grad_o: Tensor, grad_lse: Tensor, sources: list[Tensor], queries: Tensor, eps: float
) -> list[Tensor]:
    """``impl.block_read_backward`` as the op returns it: ``[*grad_sources, grad_queries]``."""
    grad_sources, grad_queries = impl.block_read_backward(grad_o, grad_lse, sources, queries, eps)
    return [*grad_sources, grad_queries]


def _flat_merge_backward(
    impl: ModuleType,
    grad: Tensor,
    h: Tensor,
    lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    eps: float,
    scale: float,
) -> list[Tensor]:
    """``impl.merge_backward`` as the op returns it: ``[grad_o, grad_lse, (grad_partial,) grad_query]``."""
    grads = impl.merge_backward(grad, h, lse, partial, query, eps, scale)  # grad_partial None without a partial
    return [g for g in grads if g is not None]


def _extern(*tensors: Optional[Tensor]) -> ModuleType:
    """The body of an extern op for these tensors: the CPU kernels (fp32 on CPU) or eager ATen calls."""
    return cpu if cpu.applies(*tensors) else eager


@torch.library.custom_op("attnres::reference_read", mutates_args=())
def _reference_read(sources: list[Tensor], query: Tensor, eps: float, scale: float) -> Tensor:
    return _extern(*sources, query).read_forward(sources, query, eps, scale)


@torch.library.custom_op("attnres::reference_read_backward", mutates_args=())
def _reference_read_backward(
    grad: Tensor, sources: list[Tensor], query: Tensor, eps: float, scale: float
) -> list[Tensor]:
    return _flat_read_backward(_extern(grad, *sources, query), grad, sources, query, eps, scale)


@torch.library.custom_op("attnres::reference_block_read", mutates_args=())
def _reference_block_read(sources: list[Tensor], queries: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _extern(*sources, queries).block_read_forward(sources, queries, eps)


@torch.library.custom_op("attnres::reference_block_read_backward", mutates_args=())
def _reference_block_read_backward(
    grad_o: Tensor, grad_lse: Tensor, sources: list[Tensor], queries: Tensor, eps: float
) -> list[Tensor]:
    impl = _extern(grad_o, grad_lse, *sources, queries)
    return _flat_block_read_backward(impl, grad_o, grad_lse, sources, queries, eps)


@torch.library.custom_op("attnres::reference_merge", mutates_args=())
def _reference_merge(
    o: Tensor, lse: Tensor, partial: Optional[Tensor], query: Tensor, eps: float, scale: float
) -> Tensor:
    return _extern(o, lse, partial, query).merge_forward(o, lse, partial, query, eps, scale)


@torch.library.custom_op("attnres::reference_merge_backward", mutates_args=())
def _reference_merge_backward(
    grad: Tensor, h: Tensor, lse: Tensor, partial: Optional[Tensor], query: Tensor, eps: float, scale: float
) -> list[Tensor]:
    return _flat_merge_backward(_extern(grad, h, lse, partial, query), grad, h, lse, partial, query, eps, scale)


# Fake implementations: shapes and dtypes only. A compile traces each read several times
# (metadata, the joint graph, the partitioner), so running the reference math on fake
# tensors there would cost a deep model seconds of compile time for nothing.


def _like_sources(sources: Sequence[Tensor]) -> list[Tensor]:
    return [torch.empty_like(v, memory_format=torch.contiguous_format) for v in sources]


@_reference_read.register_fake
def _(sources, query, eps, scale):
    return torch.empty_like(sources[0], memory_format=torch.contiguous_format)


@_reference_read_backward.register_fake
def _(grad, sources, query, eps, scale):
    return [*_like_sources(sources), torch.empty_like(query)]


@_reference_block_read.register_fake
def _(sources, queries, eps):
    first, num_queries = sources[0], queries.shape[0]
    lse_dtype = reference.compute_dtype(first.dtype, queries.dtype)
    o = first.new_empty((num_queries, *first.shape))
    return o, first.new_empty((num_queries, *first.shape[:-1]), dtype=lse_dtype)


@_reference_block_read_backward.register_fake
def _(grad_o, grad_lse, sources, queries, eps):
    return [*_like_sources(sources), torch.empty_like(queries)]


@_reference_merge.register_fake
def _(o, lse, partial, query, eps, scale):
    return torch.empty_like(o, memory_format=torch.contiguous_format)


@_reference_merge_backward.register_fake
def _(grad, h, lse, partial, query, eps, scale):
    grads = [torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(lse)]
    if partial is not None:
        grads.append(torch.empty_like(partial, memory_format=torch.contiguous_format))
    return [*grads, torch.empty_like(query)]


# --------------------------------------------------------------------------
# Plain read
# --------------------------------------------------------------------------


@torch.library.triton_op("attnres::read", mutates_args=())
def _read(sources: list[Tensor], query: Tensor, eps: float, scale: float) -> Tensor:
    _check_sources("attnres::read", sources)
    _check_query("attnres::read", "query", query, sources[0].shape[-1], sources[0], rows=False)
    if _use_triton(*sources, query):
        return _triton_kernels().read.read_forward(sources, query, eps, scale)
    if reference_reads() == "traced":
        return reference.read_forward(sources, query, eps, scale)
    return torch.ops.attnres.reference_read(sources, query, eps, scale)


@torch.library.triton_op("attnres::read_backward", mutates_args=())
def _read_backward(
    grad: Tensor, sources: list[Tensor], query: Tensor, eps: float, scale: float
) -> list[Tensor]:
    if _use_triton(grad, *sources, query):
        grad_sources, grad_query = _triton_kernels().read.read_backward(grad, sources, query, eps, scale)
        return [*grad_sources, grad_query]
    if reference_reads() == "traced":
        return _flat_read_backward(reference, grad, sources, query, eps, scale)
    return torch.ops.attnres.reference_read_backward(grad, sources, query, eps, scale)


def _read_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    sources, query, eps, scale = inputs
    ctx.save_for_backward(*sources, query)
    ctx.eps, ctx.scale = eps, scale


def _read_autograd(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    *sources, query = ctx.saved_tensors
    grads = torch.ops.attnres.read_backward(grad, sources, query, ctx.eps, ctx.scale)
    return list(grads[:-1]), grads[-1], None, None


_read.register_autograd(_read_autograd, setup_context=_read_setup_context)


# --------------------------------------------------------------------------
# Phase 1: block read
# --------------------------------------------------------------------------


@torch.library.triton_op("attnres::block_read", mutates_args=())
def _block_read(sources: list[Tensor], queries: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_sources("attnres::block_read", sources)
    _check_query(
        "attnres::block_read", "queries", queries, sources[0].shape[-1], sources[0], rows=True
    )
    if _use_triton(*sources, queries):
        return _triton_kernels().block_read.block_read_forward(sources, queries, eps)
    if reference_reads() == "traced":
        return reference.block_read_forward(sources, queries, eps)
    return torch.ops.attnres.reference_block_read(sources, queries, eps)


@torch.library.triton_op("attnres::block_read_backward", mutates_args=())
def _block_read_backward(
    grad_o: Tensor, grad_lse: Tensor, sources: list[Tensor], queries: Tensor, eps: float
) -> list[Tensor]:
    if _use_triton(grad_o, grad_lse, *sources, queries):
        grad_sources, grad_queries = _triton_kernels().block_read.block_read_backward(
            grad_o, grad_lse, sources, queries, eps
        )
        return [*grad_sources, grad_queries]
    if reference_reads() == "traced":
        return _flat_block_read_backward(reference, grad_o, grad_lse, sources, queries, eps)
    return torch.ops.attnres.reference_block_read_backward(grad_o, grad_lse, sources, queries, eps)


def _block_read_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    sources, queries, eps = inputs
    o, lse = output
    ctx.save_for_backward(*sources, queries)
    ctx.eps = eps
    # Only metadata: a missing output grad becomes zeros of this shape/dtype.
    ctx.o_meta = (o.shape, o.dtype, o.device)
    ctx.lse_meta = (lse.shape, lse.dtype, lse.device)


def _block_read_autograd(ctx, grad_o: Optional[Tensor], grad_lse: Optional[Tensor]):  # noqa: ANN001, ANN202
    *sources, queries = ctx.saved_tensors
    if grad_o is None:
        shape, dtype, device = ctx.o_meta
        grad_o = torch.zeros(shape, dtype=dtype, device=device)
    if grad_lse is None:
        shape, dtype, device = ctx.lse_meta
        grad_lse = torch.zeros(shape, dtype=dtype, device=device)
    grads = torch.ops.attnres.block_read_backward(grad_o, grad_lse, sources, queries, ctx.eps)
    return list(grads[:-1]), grads[-1], None


_block_read.register_autograd(_block_read_autograd, setup_context=_block_read_setup_context)


# --------------------------------------------------------------------------
# Phase 2: merge with the intra-block partial
# --------------------------------------------------------------------------


@torch.library.triton_op("attnres::merge", mutates_args=())
def _merge(
    o: Tensor, lse: Tensor, partial: Optional[Tensor], query: Tensor, eps: float, scale: float
) -> Tensor:
    _check_merge("attnres::merge", o, lse, partial, query)
    if _use_triton_merge(partial, o, lse, query):
        return _triton_kernels().merge.merge_forward(o, lse, partial, query, eps, scale)
    if _traced_merge(partial, o, lse, query):
        return reference.merge_forward(o, lse, partial, query, eps, scale)
    return torch.ops.attnres.reference_merge(o, lse, partial, query, eps, scale)


@torch.library.triton_op("attnres::merge_backward", mutates_args=())
def _merge_backward(
    grad: Tensor,
    h: Tensor,
    lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    eps: float,
    scale: float,
) -> list[Tensor]:
    if _use_triton_merge(partial, grad, h, lse, query):
        return list(_triton_kernels().merge.merge_backward(grad, h, lse, partial, query, eps, scale))
    if _traced_merge(partial, grad, h, lse, query):
        return _flat_merge_backward(reference, grad, h, lse, partial, query, eps, scale)
    return torch.ops.attnres.reference_merge_backward(grad, h, lse, partial, query, eps, scale)


def _merge_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    o, lse, partial, query, eps, scale = inputs
    ctx.has_partial = partial is not None
    # The output, not o: the layer's norm keeps h anyway (see reference.merge_backward).
    ctx.save_for_backward(output, lse, query, *([partial] if partial is not None else []))
    ctx.eps, ctx.scale = eps, scale


def _merge_autograd(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    h, lse, query, *rest = ctx.saved_tensors
    partial = rest[0] if ctx.has_partial else None
    grads = torch.ops.attnres.merge_backward(grad, h, lse, partial, query, ctx.eps, ctx.scale)
    if partial is None:
        grad_o, grad_lse, grad_query = grads
        grad_partial = None
    else:
        grad_o, grad_lse, grad_partial, grad_query = grads
    return grad_o, grad_lse, grad_partial, grad_query, None, None


_merge.register_autograd(_merge_autograd, setup_context=_merge_setup_context)


# --------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------


def attnres_read(
    sources: Sequence[Tensor], query: Tensor, eps: float = DEFAULT_EPS, scale: float = 1.0
) -> Tensor:
    """``h = scale * sum_i softmax_i(query . rmsnorm(v_i)) v_i`` via ``attnres::read``.

    Parameters
    ----------
    sources : sequence of N Tensors [..., d], one shape and dtype
    query : Tensor [d]
    eps : float
        Key-norm eps.
    scale : float
        1 for the paper's convex mix ("mean"), N for "count".

    Returns
    -------
    h : Tensor [..., d], dtype of the sources.
    """
    return torch.ops.attnres.read(list(sources), query, float(eps), float(scale))


def attnres_block_read(
    sources: Sequence[Tensor], queries: Tensor, eps: float = DEFAULT_EPS
) -> tuple[Tensor, Tensor]:
    """Phase 1: every query of a block reads the completed sources, via ``attnres::block_read``.

    Parameters
    ----------
    sources : sequence of N Tensors [..., d], one shape and dtype
    queries : Tensor [S, d]
    eps : float

    Returns
    -------
    o : Tensor [S, ..., d], dtype of the sources (unscaled)
    lse : Tensor [S, ...], fp32 (fp64 for fp64 inputs)
    """
    return torch.ops.attnres.block_read(list(sources), queries, float(eps))


def attnres_merge(
    o: Tensor,
    lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
) -> Tensor:
    """Phase 2: fold the intra-block partial into one query's phase-1 read, via ``attnres::merge``.

    Parameters
    ----------
    o : Tensor [..., d]
        ``o[l]`` of :func:`attnres_block_read`.
    lse : Tensor [...]
        ``lse[l]`` of :func:`attnres_block_read`.
    partial : Tensor [..., d] or None
        Sum of the block's earlier branch outputs; None for a block's first layer.
    query : Tensor [d]
        The same query that produced ``o``/``lse``.
    eps, scale : float

    Returns
    -------
    h : Tensor [..., d], dtype of ``o``.
    """
    return torch.ops.attnres.merge(o, lse, partial, query, float(eps), float(scale))
