"""The plan: what the detector found and what the rewrite will do, as plain data.

Every way in (the backend, the export rewrite, the dry runs, the depth weights,
``prepare``) builds the same plan with the same passes; nodes are referred to by
name so a plan can be printed, serialized and compared without holding a graph.
Two traces of one model (``prepare``'s and a later compile's) name their nodes
differently; their :meth:`Plan.layout` is what must agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class LayerPlan:
    """One residual step (the paper's *layer*): branch output(s) added to the stream.

    ``stream_in`` is the stream value the branches read; ``adds`` are the add
    nodes that put the branch outputs on the stream (two for a parallel
    attention + MLP pair), ``branches`` the added values, in the same order, and
    ``branch_kinds`` what each computes (``"attention"``, ``"mlp"``, ``"moe"``).
    ``module_path`` is the module the add was traced in, ``branch_modules``
    the innermost module of each branch output (from ``nn_module_stack``; empty
    when the graph does not record it).
    """

    index: int
    stream_in: str
    adds: tuple[str, ...]
    branches: tuple[str, ...]
    module_path: str = ""
    branch_kinds: tuple[str, ...] = ()
    branch_modules: tuple[str, ...] = ()

    @property
    def stream_out(self) -> str:
        return self.adds[-1]

    @property
    def is_parallel(self) -> bool:
        """Several branches read one stream value and are added at once (GPT-NeoX, Falcon)."""
        return len(self.adds) > 1

    @property
    def description(self) -> str:
        """``"attention"``, ``"mlp"``, ``"moe"``, or ``"parallel (attention + mlp)"``."""
        kinds = " + ".join(self.branch_kinds) or "branch"
        return f"parallel ({kinds})" if self.is_parallel else kinds


@dataclass(frozen=True)
class StreamPlan:
    """A residual stream and its Block AttnRes layout.

    ``source`` is ``b_0`` (the value the first layer reads), ``blocks`` holds
    the layer indices of each block, ``width`` is d, ``eps`` the key-norm eps.
    Query rows: one per layer in order, then one for the final read.
    """

    index: int
    source: str
    width: int
    eps: float
    layers: tuple[LayerPlan, ...]
    blocks: tuple[tuple[int, ...], ...]

    @property
    def num_queries(self) -> int:
        return len(self.layers) + 1

    @property
    def stream_out(self) -> str:
        return self.layers[-1].stream_out

    @property
    def layout(self) -> "StreamLayout":
        return StreamLayout(self.width, tuple(layer.description for layer in self.layers))


@dataclass(frozen=True)
class StreamLayout:
    """What a stream's query rows are bound to: its width and, in order, what each layer computes.

    Node names differ from trace to trace; the layout does not, as long as the
    model traced the same stack.
    """

    width: int
    layers: tuple[str, ...]

    def describe(self) -> str:
        return f"{len(self.layers)} layers of width {self.width} ({', '.join(self.layers)})"


def layout_difference(expected: tuple[StreamLayout, ...], found: tuple[StreamLayout, ...]) -> Optional[str]:
    """The first way ``found`` differs from ``expected``, in words; None when they agree."""
    if len(expected) != len(found):
        return f"{len(expected)} residual stream(s) expected, {len(found)} found"
    for k, (want, got) in enumerate(zip(expected, found)):
        if want != got:
            return f"stream {k}: expected {want.describe()}, found {got.describe()}"
    return None


@dataclass(frozen=True)
class SkippedSite:
    """A place the detector looked at and left alone, and why."""

    node: str
    reason: str


@dataclass(frozen=True)
class Plan:
    streams: tuple[StreamPlan, ...]
    skipped: tuple[SkippedSite, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def query_shapes(self) -> tuple[tuple[int, int], ...]:
        """``(rows, width)`` of the query matrix each stream needs, in stream order."""
        return tuple((s.num_queries, s.width) for s in self.streams)

    @property
    def layout(self) -> tuple[StreamLayout, ...]:
        return tuple(s.layout for s in self.streams)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """A few lines a person can read: streams, layers, blocks, skips."""
        if not self.streams:
            lines = ["no residual stream rewritten"]
        else:
            lines = []
        for s in self.streams:
            sizes = [len(b) for b in s.blocks]
            parallel = sum(layer.is_parallel for layer in s.layers)
            lines.append(
                f"stream {s.index}: d={s.width}, {len(s.layers)} layers"
                + (f" ({parallel} parallel)" if parallel else "")
                + f", {len(s.blocks)} blocks of {sizes}, b_0={s.source}, eps={s.eps:g}, "
                f"{s.num_queries} queries"
            )
        for site in self.skipped:
            lines.append(f"skipped {site.node}: {site.reason}")
        lines.extend(self.notes)
        return "\n".join(lines)
