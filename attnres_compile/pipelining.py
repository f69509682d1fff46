"""Pipeline-parallel stages cut from one rewritten program, with cross-stage caching.

    ep = torch.export.export(model, (micro_batch,), strict=False)
    program = attnres_compile.rewrite(ep, config)          # one flat Block AttnRes graph
    split = split_stages(program, num_stages=4)           # cuts between AttnRes blocks
    cache = StageCache()                                  # this rank's
    modules = {s: split.stage_module(s, world, cache) for s in split.stages_of_rank(rank, world)}
    shapes = split.example_transfers((micro_batch,), world, cached=True)
    stages = [PipelineStage(m, s, 4, device, input_args=shapes[s][0], output_args=shapes[s][1])
              for s, m in modules.items()]
    schedule = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn, scale_grads=False)
    shared = split.shared_parameters(world)
    cache.start_step(); schedule.step(...); sync_shared_gradients(shared)

A stage is the part of the program between two cuts. What crosses a cut is
every value computed before it and read after it: the completed block
summaries ``b_0 .. b_n`` that later reads weigh, and whatever else the layers
share (rotary tables, masks). Stage ``s`` runs on rank ``s % world`` (the
layout of torch's interleaved schedules), so with more stages than ranks a
rank sees a micro-batch several times. Without caching every hop carries all
live values; with caching (``cached=True``) a rank keeps what it received or
computed for a micro-batch in a :class:`StageCache`, and a hop carries only what
the receiving rank does not hold yet: each summary reaches a rank at most once
per micro-batch. A cached value's gradient from a later stage on the same rank
is added, locally, to the gradient that value's first holder sends back, so it
flows back over the wire once.

Parameters read by stages on several ranks (the query matrices, tied
embeddings) get their gradients summed across ranks by
:func:`sync_shared_gradients`, as tied weights are under any pipeline schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from .passes.reads import tag_of

__all__ = ["PipelineSplit", "StageCache", "split_stages", "sync_shared_gradients"]


def _count_of(graph: fx.Graph, unit: str) -> int:
    """Number of AttnRes blocks (``unit="block"``) or residual layers (``"layer"``) of the program's one
    stream: the final read's ``block`` or ``layer``."""
    tags = [t for t in map(tag_of, graph.nodes) if t is not None]
    if not tags:
        raise ValueError("pipeline stages: the program has no Block AttnRes reads; rewrite it first (attnres_compile.rewrite)")
    streams = {t["stream"] for t in tags}
    if len(streams) > 1:
        raise ValueError(
            f"pipeline stages: the program has {len(streams)} residual streams (an encoder-decoder?); "
            "cutting stages across several streams is not supported"
        )
    return max(t[unit] for t in tags)


def balanced_cuts(num_blocks: int, num_stages: int) -> list[int]:
    """The blocks that start stages 1 .. num_stages - 1, spreading ``num_blocks`` blocks evenly.

    The last stage also runs the final read and the model's head.
    """
    if not 1 <= num_stages <= num_blocks:
        raise ValueError(f"pipeline stages: {num_stages} stages need 1 to {num_blocks} blocks (the program has {num_blocks})")
    return [round(s * num_blocks / num_stages) for s in range(1, num_stages)]


def _stage_of_nodes(graph: fx.Graph, cuts: Sequence[int], unit: str) -> dict[fx.Node, int]:
    """The stage of every computing node: stage s starts at the first read of block (or layer) ``cuts[s - 1]``.

    A block's summary ``b_n`` is completed by a node tagged with block n (role
    ``partial``) just before that block's first read: it stays in the earlier
    stage, so the cut carries ``b_n`` rather than the two partial terms it sums.
    A cut at a layer inside a block carries the block's partial sum and its
    phase-1 read (every layer of the block merges with it) as well.
    """
    stage_of, stage = {}, 0
    for node in graph.nodes:
        if node.op in ("get_attr", "output") or (node.op == "call_module" and node.target == "_guards_fn"):
            continue
        tag = tag_of(node)
        while stage < len(cuts) and tag is not None and tag[unit] >= cuts[stage] and tag["role"] != "partial":
            stage += 1
        stage_of[node] = stage
    return stage_of


def _summary_names(graph: fx.Graph) -> dict[str, str]:
    """Node name -> ``"b_k"`` for every completed block summary the reads weigh."""
    names = {}
    for node in graph.nodes:
        tag = tag_of(node)
        if tag is not None and tag["role"] in ("block_read", "read"):
            for label, source in zip(tag["sources"], node.args[0]):
                if label.startswith("b_"):
                    names[source.name] = label
    return names


@dataclass
class PipelineSplit:
    """A rewritten program cut into stages; which values cross each cut, naive or cached.

    ``live[s]``: the values (node names, in graph order) computed at or before
    stage ``s`` and read after it.
    """

    program: fx.GraphModule
    num_stages: int
    cuts: list[int]
    stage_of: dict[fx.Node, int]
    live: list[list[str]]
    summaries: dict[str, str]
    _nodes: dict[str, fx.Node] = field(repr=False, default_factory=dict)

    # ------------------------------------------------------------ layout

    @staticmethod
    def rank_of(stage: int, world: int) -> int:
        """The rank that runs ``stage``: round robin, as torch's interleaved schedules lay stages out."""
        return stage % world

    def stages_of_rank(self, rank: int, world: int) -> list[int]:
        return [s for s in range(self.num_stages) if self.rank_of(s, world) == rank]

    # ------------------------------------------------------------ what crosses each cut

    def plan(self, world: int, cached: bool) -> "TransferPlan":
        """What each stage receives, takes from its rank's cache, keeps in it, and sends on."""
        held: dict[int, set[str]] = {r: set() for r in range(world)}
        received, from_cache, sent = [], [], []
        for s in range(self.num_stages):
            rank = self.rank_of(s, world)
            incoming = self.live[s - 1] if s > 0 else []
            if cached:
                from_cache.append([v for v in incoming if v in held[rank]])
                received.append([v for v in incoming if v not in held[rank]])
            else:
                from_cache.append([])
                received.append(list(incoming))
            held[rank] |= set(incoming) | self._computed_in(s)
            if s + 1 < self.num_stages:
                after = self.rank_of(s + 1, world)
                sent.append([v for v in self.live[s] if not (cached and v in held[after])])
        kept = []
        for s in range(self.num_stages):
            rank = self.rank_of(s, world)
            later = {v for t in range(s + 1, self.num_stages) if self.rank_of(t, world) == rank for v in from_cache[t]}
            kept.append(self._graph_order(later & (set(received[s]) | self._computed_in(s))))
        return TransferPlan(received=received, from_cache=from_cache, kept=kept, sent=sent)

    def _computed_in(self, stage: int) -> set[str]:
        return {n.name for n, s in self.stage_of.items() if s == stage}

    def _graph_order(self, names) -> list[str]:
        return [n.name for n in self.program.graph.nodes if n.name in names]

    def example_transfers(self, example_inputs: Sequence[Tensor], world: int, cached: bool) -> list[tuple[tuple, tuple]]:
        """What each stage takes and gives for one micro-batch, ``[(inputs, outputs)]`` by stage.

        Runs every stage once, in order, on ``example_inputs`` (stage 0's
        micro-batch). ``PipelineStage`` takes these as its static shapes: it then
        skips its own metadata forward, which would count as a micro-batch of
        the cache. Values keep their ``requires_grad``, so gradients flow back
        over every cut that needs them.
        """
        cache = StageCache() if cached else None
        transfers, args = [], tuple(example_inputs)
        for stage in range(self.num_stages):
            out = self.stage_module(stage, world, cache)(*args)
            out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            out = tuple(t.detach().requires_grad_(t.requires_grad) for t in out)
            transfers.append((args, out))
            args = out
        return transfers

    # ------------------------------------------------------------ the stage modules

    def stage_module(self, stage: int, world: int, cache: Optional["StageCache"] = None) -> "StageModule":
        """The module that runs ``stage``: caching on when a cache is given."""
        plan = self.plan(world, cached=cache is not None)
        graph_module = self._stage_graph(stage, plan)
        return StageModule(graph_module, stage, plan, cache, self)

    def _stage_graph(self, stage: int, plan: "TransferPlan") -> fx.GraphModule:
        """Stage ``stage``'s nodes as a graph: (received..., from cache...) -> sent values (or the output)."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for name in plan.received[stage] + plan.from_cache[stage]:
            env[self._nodes[name]] = graph.placeholder(name)
        if stage == 0:
            for node in self.program.graph.nodes:
                if node.op == "placeholder":
                    env[node] = graph.placeholder(node.name)
        for node in self.program.graph.nodes:
            if self.stage_of.get(node) != stage or node.op == "placeholder":
                continue
            for used in node.all_input_nodes:
                if used.op == "get_attr" and used not in env:
                    env[used] = graph.get_attr(used.target)
            env[node] = graph.node_copy(node, lambda n: env[n])
        if stage == self.num_stages - 1:
            output = next(n for n in self.program.graph.nodes if n.op == "output")
            graph.output(fx.map_arg(output.args[0], lambda n: env[n]))
        else:
            # The kept values follow the sends: StageModule keeps them and carries their later gradients.
            graph.output(tuple(env[self._nodes[name]] for name in plan.sent[stage] + plan.kept[stage]))
        return fx.GraphModule(self.program, graph)  # takes the parameters its get_attr nodes read, shared

    def shared_parameters(self, world: int) -> list[nn.Parameter]:
        """The parameters stages on several ranks read (the queries, a tied embedding), in name order.

        A tied weight is one parameter under two names (``tok_emb.weight``,
        ``lm_head.weight``): it is listed once.
        """
        readers: dict[int, set[int]] = {}
        parameters: dict[int, tuple[str, nn.Parameter]] = {}
        for stage in range(self.num_stages):
            for name, parameter in self.parameters_of_stage(stage).items():
                readers.setdefault(id(parameter), set()).add(self.rank_of(stage, world))
                parameters.setdefault(id(parameter), (name, parameter))
        return [p for _, p in sorted((parameters[k] for k, ranks in readers.items() if len(ranks) > 1), key=lambda item: item[0])]

    def parameters_of_stage(self, stage: int) -> dict[str, nn.Parameter]:
        """The program's parameters that ``stage`` reads, by their names in the program."""
        named = dict(self.program.named_parameters(remove_duplicate=False))  # a tied weight under each name
        found = {}
        for node in self.program.graph.nodes:
            if self.stage_of.get(node) == stage:
                for used in node.all_input_nodes:
                    if used.op == "get_attr" and used.target in named:
                        found[used.target] = named[used.target]
        return found


@dataclass
class TransferPlan:
    """Per stage: values received over the wire, taken from the rank's cache, kept in it, sent to the next stage."""

    received: list[list[str]]
    from_cache: list[list[str]]
    kept: list[list[str]]
    sent: list[list[str]]


def split_stages(
    program: fx.GraphModule, num_stages: int, cuts: Optional[Sequence[int]] = None, *, unit: str = "block"
) -> PipelineSplit:
    """Cut a rewritten program into ``num_stages`` stages.

    ``cuts`` are the blocks (``unit="block"``) or residual layers (``unit="layer"``,
    a cut that may fall inside a block) that start stages 1 .. num_stages - 1,
    strictly increasing, each from 1 to the number of blocks or layers; the
    default spreads the blocks evenly (:func:`balanced_cuts`).
    """
    if unit not in ("block", "layer"):
        raise ValueError(f"pipeline stages: unit must be 'block' or 'layer', got {unit!r}")
    count = _count_of(program.graph, unit)
    if cuts is None:
        if unit != "block":
            raise ValueError("pipeline stages: cuts counted in layers must be given")
        cuts = balanced_cuts(count, num_stages)
    cuts = list(cuts)
    if len(cuts) != num_stages - 1 or any(not 1 <= c <= count for c in cuts) or cuts != sorted(set(cuts)):
        raise ValueError(
            f"pipeline stages: cuts {cuts} must be {num_stages - 1} strictly increasing {unit}s in 1..{count}"
        )
    stage_of = _stage_of_nodes(program.graph, cuts, unit)
    last_use = {}
    for node in program.graph.nodes:
        user_stage = num_stages - 1 if node.op == "output" else stage_of.get(node)
        for used in node.all_input_nodes:
            if used in stage_of and user_stage is not None:
                last_use[used] = max(last_use.get(used, -1), user_stage)
    live = [
        [n.name for n in program.graph.nodes if n in stage_of and stage_of[n] <= s < last_use.get(n, -1)]
        for s in range(num_stages - 1)
    ]
    nodes = {n.name: n for n in program.graph.nodes}
    return PipelineSplit(program, num_stages, cuts, stage_of, live, _summary_names(program.graph), nodes)


# ---------------------------------------------------------------- the cache


class StageCache:
    """What a rank keeps of each micro-batch for its later stages, and their gradients: one per rank.

    ``keep`` stores a value as a stage computes or receives it; a later stage on
    the same rank ``take``s a detached copy (a leaf of that stage's autograd
    graph). In the backward, which reaches the later stage first, the copies'
    gradients are added to the kept value's own gradient.
    """

    def __init__(self) -> None:
        self.start_step()

    def start_step(self) -> None:
        """Forget every micro-batch: call before each schedule step."""
        self._values: dict[tuple[int, str], Tensor] = {}
        self._copies: dict[tuple[int, str], list[Tensor]] = {}
        self._forwards: dict[int, int] = {}

    def next_microbatch(self, stage: int) -> int:
        """The micro-batch a stage's forward is on: every schedule runs a stage's forwards in micro-batch order."""
        count = self._forwards.get(stage, 0)
        self._forwards[stage] = count + 1
        return count

    def keep(self, microbatch: int, name: str, value: Tensor) -> None:
        self._values[microbatch, name] = value

    def take(self, microbatch: int, name: str) -> Tensor:
        value = self._values[microbatch, name]
        copy = value.detach().requires_grad_(value.requires_grad)
        self._copies.setdefault((microbatch, name), []).append(copy)
        return copy

    def later_gradient(self, key: tuple[int, str]) -> Optional[Tensor]:
        grads = [c.grad for c in self._copies.get(key, ()) if c.grad is not None]
        return sum(grads[1:], grads[0]) if grads else None


class _AddLaterGradients(torch.autograd.Function):
    """``value`` unchanged; in the backward, each kept value gets the gradient later stages gave its copies.

    Hanging the kept values on a value the stage sends puts them on the stage's
    backward path, also one the stage only keeps (received, not read here, not
    sent on); autograd adds this gradient to whatever the stage's own uses give.
    """

    @staticmethod
    def forward(ctx, value: Tensor, cache: StageCache, keys: list[tuple[int, str]], *kept: Tensor) -> Tensor:
        ctx.cache, ctx.keys = cache, keys
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: Tensor):
        later = [ctx.cache.later_gradient(key) if needed else None for key, needed in zip(ctx.keys, ctx.needs_input_grad[3:])]
        return (grad, None, None, *later)


class StageModule(nn.Module):
    """One stage: received values in, the values the next stage needs out; logs what it sends (``sent_log``)."""

    def __init__(self, graph_module: fx.GraphModule, stage: int, plan: TransferPlan,
                 cache: Optional[StageCache], split: PipelineSplit):
        super().__init__()
        self.graph_module = graph_module
        self.stage = stage
        self.from_cache = plan.from_cache[stage]
        self.sent_names = plan.sent[stage] if stage < len(plan.sent) else []
        self.kept_names = plan.kept[stage]
        self.cache = cache
        self.sent_log: list[dict[str, int]] = []
        self._summaries = split.summaries

    def forward(self, *received: Tensor):
        microbatch = self.cache.next_microbatch(self.stage) if self.cache is not None else 0
        cached = [self.cache.take(microbatch, name) for name in self.from_cache]
        out = self.graph_module(*received, *cached)
        if self.kept_names:
            out = self._keep(tuple(out), microbatch)
        if self.sent_names:
            self.sent_log.append({name: t.numel() * t.element_size() for name, t in zip(self.sent_names, out)})
        return out

    def _keep(self, out: tuple[Tensor, ...], microbatch: int) -> tuple[Tensor, ...]:
        """Keep the values that follow the sends in ``out``; return the sends, the first floating one carrying
        the kept values' later gradients."""
        sent, kept = out[:len(self.sent_names)], out[len(self.sent_names):]
        for name, value in zip(self.kept_names, kept):
            self.cache.keep(microbatch, name, value)
        carriers = [i for i, t in enumerate(sent) if t.is_floating_point()]
        if not carriers:
            raise ValueError(f"pipeline stages: stage {self.stage} sends no floating-point value to carry gradients back")
        first = carriers[0]
        keys = [(microbatch, name) for name in self.kept_names]
        return sent[:first] + (_AddLaterGradients.apply(sent[first], self.cache, keys, *kept),) + sent[first + 1:]

    @property
    def sent_bytes(self) -> list[int]:
        """Bytes this stage's forward sent, one entry per micro-batch it ran."""
        return [sum(sent.values()) for sent in self.sent_log]

    def summaries_sent(self) -> list[dict[str, int]]:
        """Per micro-batch run: the block summaries (``"b_k"``) sent and their bytes, as counted when sent."""
        return [{self._summaries[n]: size for n, size in sent.items() if n in self._summaries} for sent in self.sent_log]


def sync_shared_gradients(shared: list[nn.Parameter], group=None) -> None:
    """Sum, across ranks, the gradients of ``split.shared_parameters(world)``; after each step's backward.

    Every rank calls it with the same list; a rank none of whose stages reads
    a shared parameter adds zeros.
    """
    import torch.distributed as dist

    for parameter in shared:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, group=group)
