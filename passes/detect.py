"""Find the residual stream(s) of a transformer in an FX graph (design §4).

A *step* is an add ``x_out = x_in + f`` where the branch ``f``

(a) reads ``x_in`` only through a normalization (pre-norm), or raw with a norm
    at the branch's end (post-branch norm): structurally, ``f`` is a
    scale-free function of ``x_in`` (degree 0, see :func:`branch_degree`);
(b) contains an op with a weight parameter (a matrix, not a gain or a bias);
(c) touches no other value of the stream.

Steps chain into a stream when one step's output is the next one's input. The
two adds of a parallel attention + MLP pair (``x + a + m``) form one step.
Everything here rests on graph structure, never on module or model names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional, Union

import torch
import torch.fx as fx

from .graph import tensor_value, topo_index
from .ir import canonical_op, data_inputs, is_attnres_op, is_plain_add, mutated_operand, norm_eps, scalar_args
from .plan import SkippedSite

log = logging.getLogger("attnres_compile")

# Degree of a value as a function of the stream value x: f(c * x) = c**deg * f(x).
# INDEPENDENT: does not depend on x; None: not homogeneous (e.g. a raw linear of x).
INDEPENDENT = "independent"
Degree = Union[Fraction, str, None, tuple]

_MAX_SKIP_NOTES = 32


@dataclass
class Step:
    """One residual step found in a graph (nodes, not names: see plan.LayerPlan)."""

    stream_in: fx.Node
    adds: list[fx.Node]
    branches: list[fx.Node]
    region: set[fx.Node]
    eps: Optional[float]

    @property
    def stream_out(self) -> fx.Node:
        return self.adds[-1]


@dataclass
class BranchCheck:
    ok: bool
    region: set[fx.Node] = field(default_factory=set)
    eps: Optional[float] = None
    reason: str = ""


def region_between(src: fx.Node, sinks: list[fx.Node], order: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes that read ``src`` (through data edges) and feed one of ``sinks``.

    Walks back from the sinks, never past ``src`` in graph order, so the cost is
    the size of the layer, not of the graph.
    """
    start = order[src]
    seen: set[fx.Node] = set()
    stack = [s for s in sinks if order[s] > start]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(u for u in data_inputs(node) if order[u] > start and u not in seen)
    region: set[fx.Node] = set()
    for node in sorted(seen, key=order.__getitem__):
        if any(u is src or u in region for u in data_inputs(node)):
            region.add(node)
    return region


def _combine(node: fx.Node, op: Optional[str], degrees: list[Degree], reduced: bool, degree_of) -> Degree:
    """Degree of ``node`` from the degrees of its data inputs (homogeneity rules).

    ``degrees`` follows ``data_inputs(node)``; ``degree_of(arg)`` gives the degree
    of a positional argument (INDEPENDENT for a Python number).
    """
    dep = [d for d in degrees if d is not INDEPENDENT]
    if op == "norm":
        return Fraction(0)  # a norm's output is scale-free whatever it reads
    if op == "native_norm":
        return (Fraction(0), dep[0] if dep else None, -dep[0] if isinstance(dep[0], Fraction) else None)
    if op == "getitem":
        container = degrees[0]
        if isinstance(container, tuple):
            index = node.args[1]
            return container[index] if isinstance(index, int) and index < len(container) else None
        rest = degrees[1:]
        if isinstance(container, Fraction) and all(d is INDEPENDENT or d == 0 for d in rest):
            return container
        return Fraction(0) if all(d is INDEPENDENT or d == 0 for d in degrees) else None
    if any(d is None or isinstance(d, tuple) for d in dep):
        return None
    if op in ("cast", "neg"):
        return dep[0] if all(d == dep[0] for d in dep) else None
    if op == "native_dropout":
        return (dep[0], None)
    if op in ("add", "sub"):
        if len(dep) == 2:
            return dep[0] if dep[0] == dep[1] else None
        if dep[0] == 0:
            return dep[0]
        # x + eps keeps the degree (the eps of a norm); x + bias does not.
        return dep[0] if len(data_inputs(node)) == 1 else None
    if op in ("mul", "div") and len(node.args) >= 2:
        # By position, not by data input: x * x reads x twice, 1 / sqrt(v) has
        # only a denominator.
        left, right = (degree_of(a) for a in node.args[:2])
        left = Fraction(0) if left is INDEPENDENT else left
        right = Fraction(0) if right is INDEPENDENT else right
        if not isinstance(left, Fraction) or not isinstance(right, Fraction):
            return None
        total = left + right if op == "mul" else left - right
        return total if total != 0 or (left == 0 and right == 0) or reduced else None
    if op == "pow":
        exponent = node.args[1] if len(node.args) > 1 else None
        if isinstance(exponent, (int, float)) and len(dep) == 1:
            return dep[0] * Fraction(exponent).limit_denominator(64)
        return Fraction(0) if all(d == 0 for d in dep) else None
    if op == "rsqrt":
        return -dep[0] / 2
    if op == "sqrt":
        return dep[0] / 2
    if op == "reciprocal":
        return -dep[0]
    if op == "reduce" or op == "std":
        return dep[0]
    if op == "var":
        return 2 * dep[0]
    if op == "var_mean":
        return (2 * dep[0], dep[0])
    return Fraction(0) if all(d == 0 for d in dep) else None


def _scaled_base(inputs: list[fx.Node], degrees: dict, bases: dict) -> Union[fx.Node, None, bool]:
    """The one variable the inputs' non-zero degrees are measured in.

    None if they mix two variables, False if no input has a non-zero degree.
    """
    found = {bases[u] for u in inputs if u in bases and degrees[u] is not INDEPENDENT and degrees[u] != 0}
    return found.pop() if len(found) == 1 else (None if found else False)


def branch_degree(src: fx.Node, region: set[fx.Node], order: dict[fx.Node, int]):
    """Homogeneity degree of every region node as a function of ``src``.

    Returns ``(degrees, eps)``: a branch whose output has degree 0 reads ``src``
    only through a normalization; ``eps`` is the first norm's epsilon found.

    A value that is not homogeneous in ``src`` (``silu(W x)``, ``W x + b``)
    becomes a variable of its own, degree 1 in itself: a hand-written norm of it
    (``y * rsqrt(mean(y**2) + eps)``) is then degree 0, as ``F.rms_norm`` of
    anything is. This is what a post-branch norm (OLMo2: ``x + norm(mlp(x))``)
    looks like. Degrees in two different variables never cancel: their
    product or quotient is a new variable.
    """
    degrees: dict[fx.Node, Degree] = {src: Fraction(1)}
    reduced: dict[fx.Node, bool] = {src: False}
    bases: dict[fx.Node, fx.Node] = {src: src}  # the variable each degree is measured in

    def degree_of(arg) -> Degree:
        return degrees.get(arg, INDEPENDENT) if isinstance(arg, fx.Node) else INDEPENDENT

    eps: Optional[float] = None
    for node in sorted(region, key=order.__getitem__):
        inputs = data_inputs(node)
        op = canonical_op(node)
        is_reduction = op in ("reduce", "var", "std", "var_mean", "norm", "native_norm")
        node_reduced = is_reduction or any(reduced.get(u, False) for u in inputs)
        ins = [degrees.get(u, INDEPENDENT) for u in inputs]
        base = _scaled_base(inputs, degrees, bases)
        degree = None if base is None else _combine(node, op, ins, node_reduced, degree_of)
        if degree is None:  # not homogeneous in any one variable: a variable of its own
            degree, base, node_reduced = Fraction(1), node, False
        degrees[node], reduced[node] = degree, node_reduced
        bases[node] = base if isinstance(base, fx.Node) else src
        if eps is None:
            if op in ("norm", "native_norm"):
                eps = norm_eps(node)
            elif op == "add" and node_reduced and isinstance(degree, Fraction) and degree != 0:
                scalars = scalar_args(node)
                eps = float(scalars[0]) if scalars else None
    return degrees, eps


def weight_values(graph: fx.Graph, parameters: set[fx.Node]) -> set[fx.Node]:
    """Parameters and values computed from parameters alone (``t(W)``, ``W.to(bf16)``, ``1 + w``).

    Core aten spells ``nn.Linear`` as ``addmm(b, x, t(W))``: the weight a branch
    reads is then a view of the parameter, not the parameter node itself. A
    sharded parameter reaches its layer through method calls Dynamo records as
    such: SimpleFSDP's ``W.redistribute(Replicate).to_local()`` (the all-gather).
    """
    weights = set(parameters)
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if node.op in ("call_function", "call_method") and inputs and all(u in weights for u in inputs):
            weights.add(node)
    return weights


def _has_weight(region: set[fx.Node], parameters: set[fx.Node]) -> bool:
    """Does the region use a parameter that is a matrix (a layer, not a gain or bias)?"""
    for node in region:
        for u in node.all_input_nodes:
            if u in parameters:
                value = tensor_value(u)
                if value is None or value.dim() >= 2:
                    return True
    return False


def check_branch(
    src: fx.Node, branch: fx.Node, order: dict[fx.Node, int], parameters: set[fx.Node]
) -> BranchCheck:
    """Is ``branch`` a residual branch of stream value ``src`` (conditions a, b)?"""
    region = region_between(src, [branch], order)
    if branch not in region:
        return BranchCheck(False, reason="does not read the stream value")
    degrees, eps = branch_degree(src, region, order)
    if degrees.get(branch) != 0:
        return BranchCheck(
            False, region,
            reason=f"reads {src.name} raw, with no normalization on the way in or at its end "
            "(post-norm, or a norm the detector does not recognize)",
        )
    if not _has_weight(region, parameters):
        return BranchCheck(False, region, reason="contains no op with a weight matrix")
    return BranchCheck(True, region, eps)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = tensor_value(a), tensor_value(b)
    if va is None or vb is None:
        return va is None and vb is None  # no meta: let structure decide
    return tuple(va.shape) == tuple(vb.shape)


def _non_floating_dtype(a: fx.Node, b: fx.Node) -> Optional[torch.dtype]:
    """The dtype of an add's operands when it is not a real floating-point one (None otherwise)."""
    for value in (tensor_value(a), tensor_value(b)):
        if value is not None and not value.is_floating_point():
            return value.dtype
    return None


def _note_non_floating_step(node, a, b, dtype, order, parameters, skipped: list[SkippedSite]) -> None:
    """An add of a weighted branch onto an integer or complex value is no step; say so, naming the dtype."""
    if len(skipped) >= _MAX_SKIP_NOTES:
        return
    for src, branch in ((a, b), (b, a)):
        check = check_branch(src, branch, order, parameters)
        if check.ok or (check.region and _has_weight(check.region, parameters)):
            skipped.append(SkippedSite(
                node.name, f"a residual step on a {dtype} stream: Block AttnRes reads need a real floating-point stream",
            ))
            return


def _find_steps(graph: fx.Graph, order, parameters, skipped: list[SkippedSite]) -> list[Step]:
    steps: list[Step] = []
    by_output: dict[fx.Node, Step] = {}
    for node in graph.nodes:
        if not is_plain_add(node):
            continue
        a, b = node.args[0], node.args[1]
        if not _same_shape(a, b):
            continue
        dtype = _non_floating_dtype(a, b)
        if dtype is not None:
            _note_non_floating_step(node, a, b, dtype, order, parameters, skipped)
            continue
        if _extend_parallel(node, a, b, by_output, order, parameters):
            continue
        for src, branch in ((a, b), (b, a)):
            check = check_branch(src, branch, order, parameters)
            if check.ok:
                step = Step(src, [node], [branch], check.region, check.eps)
                steps.append(step)
                by_output[node] = step
                break
            if check.region and len(skipped) < _MAX_SKIP_NOTES and _has_weight(check.region, parameters):
                skipped.append(SkippedSite(node.name, f"not a residual step: {branch.name} {check.reason}"))
    return steps


def _extend_parallel(add, a, b, by_output, order, parameters) -> bool:
    """Fold ``(x + f1) + f2`` into one step when f2 also reads x (parallel pair)."""
    for partial_sum, branch in ((a, b), (b, a)):
        step = by_output.get(partial_sum)
        if step is None or len(partial_sum.users) != 1:
            continue
        check = check_branch(step.stream_in, branch, order, parameters)
        if not check.ok:
            continue
        step.adds.append(add)
        step.branches.append(branch)
        step.region |= check.region
        del by_output[partial_sum]
        by_output[add] = step
        return True
    return False


def _chain_steps(steps: list[Step], order, skipped: list[SkippedSite]) -> list[list[Step]]:
    """Link steps whose output is the next one's input into streams."""
    by_input: dict[fx.Node, list[Step]] = {}
    for step in steps:
        by_input.setdefault(step.stream_in, []).append(step)
    outputs = {step.stream_out for step in steps}
    heads = sorted({s.stream_in for s in steps if s.stream_in not in outputs}, key=order.__getitem__)
    chains = []
    for head in heads:
        chain: list[Step] = []
        value, ok = head, True
        while value in by_input:
            followers = by_input[value]
            if len(followers) > 1:
                names = ", ".join(s.stream_out.name for s in followers)
                skipped.append(SkippedSite(value.name, f"stream value feeds {len(followers)} residual adds ({names}): the stream forks"))
                ok = False
                break
            chain.append(followers[0])
            value = followers[0].stream_out
        if ok and chain:
            chains.append(chain)
    return chains


def _stream_dependent(b0: fx.Node, graph: fx.Graph, order) -> set[fx.Node]:
    """Every node whose value depends on ``b0`` (metadata reads excluded)."""
    dependent = {b0}
    start = order[b0]
    for node in graph.nodes:
        if order[node] > start and any(u in dependent for u in data_inputs(node)):
            dependent.add(node)
    return dependent


def _drop_nested_steps(steps: list[Step], skipped: list[SkippedSite]) -> list[Step]:
    """Condition (c) for skips around a whole stack: a branch may not hold residual steps itself.

    ``emb + norm(stack(emb))`` looks like one pre-norm step of ``emb`` whose branch
    is the entire network; its branch contains the real stream's adds. Steps come
    in graph order, so inner steps are kept before any step around them is judged.
    """
    kept: list[Step] = []
    kept_adds: set[fx.Node] = set()
    for step in steps:
        nested = sorted(a.name for a in step.region & kept_adds)
        if nested:
            skipped.append(SkippedSite(
                step.adds[0].name,
                f"not a residual step: its branch contains other residual adds ({', '.join(nested[:3])}), "
                "a skip connection around a whole stack",
            ))
            continue
        kept.append(step)
        kept_adds.update(step.adds)
    return kept


def _foreign_stream_read(chain: list[Step], graph: fx.Graph, order) -> Optional[SkippedSite]:
    """Condition (c): a branch may read the stream only through its own input."""
    dependent = _stream_dependent(chain[0].stream_in, graph, order)
    for i, step in enumerate(chain):
        for node in sorted(step.region, key=order.__getitem__):
            for u in data_inputs(node):
                if u in dependent and u not in step.region and u is not step.stream_in:
                    return SkippedSite(
                        node.name,
                        f"layer {i} (add {step.adds[0].name}) reads {u.name}, a value computed from "
                        "the stream outside this layer: cannot prove the rewrite keeps it",
                    )
    return None


def _stream_values(chain: list[Step]) -> list[fx.Node]:
    """``b_0`` and every add of the chain: the values the rewrite replaces or erases."""
    return [chain[0].stream_in] + [add for step in chain for add in step.adds]


def _mutated_stream_value(chain: list[Step], order) -> Optional[SkippedSite]:
    """A stream value written in place while someone else still reads it.

    ``hidden.append(x); x += f`` makes the kept hidden state the *next* stream
    value. The rewrite treats every add as a pure function (it erases them), so
    a value read after an in-place write to it cannot be proven to keep its
    meaning. (``x += f`` with no later reader is an ordinary step.)
    """
    for value in _stream_values(chain):
        for writer in value.users:
            if mutated_operand(writer) is not value:
                continue
            later = sorted(
                (u for u in value.users if order[u] > order[writer] and value in data_inputs(u)),
                key=order.__getitem__,
            )
            if later:
                return SkippedSite(
                    writer.name,
                    f"writes into the stream value {value.name} in place, and {later[0].name} reads {value.name} "
                    "after it (an alias of the updated stream): cannot prove the rewrite keeps it",
                )
    return None


def find_residual_streams(
    graph: fx.Graph, parameters: set[fx.Node]
) -> tuple[list[list[Step]], list[SkippedSite]]:
    """Residual streams of ``graph`` as lists of steps in execution order.

    Parameters
    ----------
    graph:
        A Dynamo (torch IR) or export (aten IR) graph.
    parameters:
        The nodes that stand for model parameters (placeholders or get_attr).

    Returns
    -------
    (streams, skipped): streams in graph order; skipped sites with reasons.
    """
    order = topo_index(graph)
    skipped: list[SkippedSite] = []
    rewritten = next((n for n in graph.nodes if is_attnres_op(n)), None)
    if rewritten is not None:
        skipped.append(SkippedSite(rewritten.name, "graph already holds Block AttnRes reads: not rewritten again"))
        return [], skipped
    steps = _find_steps(graph, order, weight_values(graph, parameters), skipped)
    steps = _drop_nested_steps(steps, skipped)
    streams = []
    for chain in _chain_steps(steps, order, skipped):
        problem = _foreign_stream_read(chain, graph, order) or _mutated_stream_value(chain, order)
        if problem is not None:
            skipped.append(problem)
            continue
        streams.append(chain)
    log.debug("found %d residual stream(s) with %s steps", len(streams), [len(c) for c in streams])
    return streams, skipped
