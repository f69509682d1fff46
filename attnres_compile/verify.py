"""``verify``: numerics of the rewrite against eager PyTorch, forward and backward.

Two checks, each on outputs and on the gradients of a fixed random projection
of the outputs:

(a) zero-init identity — the compiled rewritten model with zero queries against
    the original eager model (gradients of every original parameter);
(b) kernel check — random queries, the compiled rewritten model against the
    eager rewritten reference (gradients of every parameter, queries included).

Each output and each gradient group is compared by ``max |got - want| / max |want|``.
A gradient that is zero in exact arithmetic (e.g. attention's key-projection
bias: softmax ignores a shift shared by all keys) holds only float roundoff on
both sides, and its own max-rel compares noise with noise. A gradient group
smaller than ``ZERO_GRADIENT_FLOOR`` times the largest gradient group of the
same check is therefore measured against that largest group instead
(marked ``~0`` in the report): below that ratio fp32 roundoff of the terms the
gradient sums (~6e-8 each) is as large as the gradient itself.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .backend import AttnResBackend
from .config import AttnResConfig
from .prepare import prepare
from .queries import AttnResQueries, is_query_parameter, plain_run_expected

log = logging.getLogger("attnres_compile")


ZERO_GRADIENT_FLOOR = 1e-6  # a gradient group below this fraction of its check's largest is "zero"


@dataclass(frozen=True)
class Comparison:
    check: str
    name: str
    max_abs: float
    max_rel: float  # max |a - b| / max |b|, or / the check's largest gradient where ``floored``
    ok: bool
    floored: bool = False  # the reference is float noise of an analytically zero gradient


@dataclass
class VerifyReport:
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rtol: float = 1e-5

    @property
    def ok(self) -> bool:
        return bool(self.comparisons) and all(c.ok for c in self.comparisons) and not self.failures

    @property
    def failures(self) -> list[str]:
        return [n for n in self.notes if n.startswith("FAIL")]

    def worst(self, check: str) -> float:
        return max((c.max_rel for c in self.comparisons if c.check == check), default=math.nan)

    def __str__(self) -> str:
        width = max((len(c.name) for c in self.comparisons), default=10)
        lines = [f"attnres verify: {'OK' if self.ok else 'FAILED'} (rel tol {self.rtol:g})"]
        check = None
        for c in self.comparisons:
            if c.check != check:
                check = c.check
                lines.append(f"  {check}:")
                lines.append(f"    {'':{width}}  {'max abs':>10}  {'max rel':>10}")
            mark = ("  ~0 (vs the largest gradient)" if c.floored else "") + ("" if c.ok else "  <-- over tolerance")
            lines.append(f"    {c.name:{width}}  {c.max_abs:10.3e}  {c.max_rel:10.3e}{mark}")
        lines.extend(f"  {n}" for n in self.notes)
        return "\n".join(lines)


def _max_abs(tensors: list[torch.Tensor]) -> float:
    return max((float(t.double().abs().max()) for t in tensors if t.numel()), default=0.0)


def _compare(
    check: str,
    name: str,
    got: list[torch.Tensor],
    want: list[torch.Tensor],
    rtol: float,
    largest: float = 0.0,
) -> Comparison:
    """Max abs and max rel error of ``got`` against ``want``.

    ``largest`` is the largest reference of the same kind (the check's largest
    gradient): a ``want`` below ``ZERO_GRADIENT_FLOOR * largest`` is zero in
    exact arithmetic, and its error is measured against ``largest``.
    """
    max_abs = _max_abs([g.double() - w.double() for g, w in zip(got, want)])
    scale = _max_abs(want)
    floored = scale < ZERO_GRADIENT_FLOOR * largest
    denominator = largest if floored else scale
    max_rel = max_abs / denominator if denominator > 0 else max_abs
    return Comparison(check, name, max_abs, max_rel, ok=max_rel <= rtol, floored=floored)


def _group_name(param_name: str) -> str:
    """``model.layers.3.mlp.up.weight`` → ``model.layers.*.mlp.up.weight``."""
    return re.sub(r"\.\d+\.", ".*.", param_name)


def _float_tensors(outputs: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(outputs)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _run(model_fn, model: nn.Module, args: tuple, kwargs: dict, projections: list[torch.Tensor]):
    """Outputs and parameter gradients of ``sum_k <out_k, R_k>`` (fixed random R_k)."""
    model.zero_grad(set_to_none=True)
    outputs = _float_tensors(model_fn(*args, **kwargs))
    loss = sum((o.float() * r).sum() for o, r in zip(outputs, projections))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outputs], grads


def _projections(model: nn.Module, args: tuple, kwargs: dict, seed: int) -> list[torch.Tensor]:
    with torch.no_grad():
        outputs = _float_tensors(model(*args, **kwargs))
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen).to(o.device) for o in outputs]


@contextlib.contextmanager
def _queries_set_to(queries: list[torch.Tensor], values: list[torch.Tensor]):
    saved = [q.detach().clone() for q in queries]
    with torch.no_grad():
        for q, v in zip(queries, values):
            q.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for q, v in zip(queries, saved):
                q.copy_(v)


def _compare_runs(report, check, got, want, param_names, rtol):
    out_got, grad_got = got
    out_want, grad_want = want
    for i, (g, w) in enumerate(zip(out_got, out_want)):
        report.comparisons.append(_compare(check, f"output {i} {tuple(w.shape)}", [g], [w], rtol))
    if len(out_got) != len(out_want):
        report.notes.append(f"FAIL {check}: {len(out_got)} outputs vs {len(out_want)}")
    groups: dict[str, list[str]] = {}
    for name in param_names:
        groups.setdefault(_group_name(name), []).append(name)
    compared: dict[str, list[str]] = {}
    for group, names in groups.items():
        missing = [n for n in names if (n in grad_want) != (n in grad_got)]
        if missing:
            report.notes.append(f"FAIL {check}: gradient present on one side only for {missing[:3]}")
            continue
        names = [n for n in names if n in grad_want]
        if names:
            compared[group] = names
    largest = _max_abs([grad_want[n] for names in compared.values() for n in names])
    for group, names in compared.items():
        report.comparisons.append(
            _compare(check, f"grad {group}", [grad_got[n] for n in names], [grad_want[n] for n in names], rtol, largest)
        )


def _compiled(model: nn.Module, backend: AttnResBackend):
    return torch.compile(model, backend=backend)


def verify(
    model: nn.Module,
    example_inputs: tuple,
    config: Optional[AttnResConfig] = None,
    *,
    example_kwargs: Optional[dict[str, Any]] = None,
    rtol: float = 1e-5,
    seed: int = 0,
    training: bool = False,
) -> VerifyReport:
    """Check the rewrite's numerics on ``example_inputs``; see the module docstring.

    An unprepared model is checked on a prepared deep copy. The model runs in
    eval mode (dropout off) during the checks, or in train mode with
    ``training=True``, for a forward that changes with the mode (Hugging Face's
    gradient checkpointing; its dropout must be 0 for the runs to compare);
    its queries and mode are restored.
    Returns a :class:`VerifyReport`; ``report.ok`` is the verdict, ``str(report)``
    the table of max abs / max rel errors per output and gradient group.
    """
    kwargs = example_kwargs or {}
    report = VerifyReport(rtol=rtol)
    if not isinstance(getattr(model, "attnres", None), AttnResQueries):
        model = prepare(copy.deepcopy(model), example_inputs, config, example_kwargs=kwargs)
        if not isinstance(getattr(model, "attnres", None), AttnResQueries):
            report.notes.append("FAIL: the model has no residual stream to rewrite (see the log)")
            return report
    was_training = model.training
    model.train(training)
    try:
        _verify_prepared(model, model.attnres.queries, example_inputs, kwargs, rtol, seed, report)
    finally:
        model.train(was_training)
    log.info("%s", report)
    return report


def _verify_prepared(model, queries: list[torch.Tensor], args, kwargs, rtol, seed, report) -> None:
    original = [n for n, _ in model.named_parameters() if not is_query_parameter(n)]
    everything = [n for n, _ in model.named_parameters()]
    zeros = [torch.zeros_like(q) for q in queries]
    gen = torch.Generator().manual_seed(seed)
    # Scores s = w . rmsnorm(v) with |rmsnorm(v)| ~ sqrt(d): rows of std 1/sqrt(d) give O(1) scores.
    random = [torch.randn(q.shape, generator=gen).div(math.sqrt(q.shape[-1])).to(q.device) for q in queries]

    # One compiled model serves both checks: the queries are inputs of the compiled graph, so the
    # program compiled at zero queries must also be right at random ones (no value is baked in).
    backend = AttnResBackend()
    compiled_model = _compiled(model, backend)
    with _queries_set_to(queries, zeros), plain_run_expected():
        projections = _projections(model, args, kwargs, seed)
        eager = _run(model, model, args, kwargs, projections)
        compiled = _run(compiled_model, model, args, kwargs, projections)
    _require_rewrite(report, backend, "zero-init identity")
    _compare_runs(report, "zero-init identity (compiled rewrite vs eager original)", compiled, eager, original, rtol)

    with _queries_set_to(queries, random):
        reference_backend = AttnResBackend(inductor=False)
        reference = _run(_compiled(model, reference_backend), model, args, kwargs, projections)
        compiled = _run(compiled_model, model, args, kwargs, projections)
    _require_rewrite(report, reference_backend, "eager rewritten reference")
    _compare_runs(report, "random queries (compiled vs eager rewritten reference)", compiled, reference, everything, rtol)


def _require_rewrite(report: VerifyReport, backend: AttnResBackend, what: str) -> None:
    """A check whose backend never rewrote a graph would compare the plain model with itself."""
    if not backend.plans:
        report.notes.append(f"FAIL {what}: the backend rewrote no graph (Dynamo fell back or the stream was not found)")


def verify_rewrite(
    original: nn.Module,
    rewritten: nn.Module,
    example_inputs: tuple,
    *,
    example_kwargs: Optional[dict[str, Any]] = None,
    rtol: float = 1e-5,
    seed: int = 0,
) -> VerifyReport:
    """Zero-init identity of an export-path rewrite, forward and backward.

    ``rewritten`` (e.g. ``rewrite(program)``) with its queries set to zero
    against ``original`` (e.g. ``program.module()``): every output, and the
    gradient of every parameter the two share. The queries are restored.
    """
    kwargs = example_kwargs or {}
    report = VerifyReport(rtol=rtol)
    queries = [p for n, p in rewritten.named_parameters() if is_query_parameter(n)]
    if not queries:
        report.notes.append("FAIL: the rewritten module has no attnres queries (nothing was rewritten)")
        return report
    shared = [n for n, _ in original.named_parameters()]
    with _queries_set_to(queries, [torch.zeros_like(q) for q in queries]):
        projections = _projections(original, example_inputs, kwargs, seed)
        want = _run(original, original, example_inputs, kwargs, projections)
        got = _run(rewritten, rewritten, example_inputs, kwargs, projections)
    _compare_runs(report, "zero-init identity (rewritten vs original)", got, want, shared, rtol)
    log.info("%s", report)
    return report
