"""Random transformer-like modules whose residual structure is known, for fuzzing the passes.

A :class:`ModelSpec` is plain data (drawn by hypothesis in
``tests/passes/test_fuzz.py``); :func:`build_model` turns it into an
``nn.Module`` and :func:`example_inputs` gives its inputs. Because the spec
says how many residual steps the model takes and which of them are parallel
pairs, a test can hold the detector to the exact truth, not only to the
zero-query identity.

Every idiom here is one that real model code puts in the graph (design §4):
hand-written and functional norms, LayerScale and constant multipliers,
dropout with ``p=0``, ``x += f`` and ``f + x``, the two adds of a parallel pair
in any association, a scaled or dropped-out embedding as ``b_0``, and the raw
stream returned as a hidden state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fx_models import RMSNorm  # tests/support

VOCAB = 32
BATCH, SEQ = 2, 5

NORMS = ("layernorm", "rmsnorm_fp32", "f_rms_norm", "weightless_layernorm")
SCALES = ("none", "layerscale", "constant")
SEQUENTIAL_ADDS = ("x + f", "f + x", "x += f")
# Two adds (one parallel layer) or the branches summed before the stream (one plain layer).
PARALLEL_ADDS = ("x + a + m", "(x + a) + m", "m + (x + a)")
SUMMED_ADDS = ("(a + m) + x", "m = a; m += mlp; x + m")
EMBEDS = ("input", "tokens", "scaled_tokens", "dropout_tokens")
HIDDEN = ("none", "last", "all")


@dataclass(frozen=True)
class LayerSpec:
    """One residual step: a sequential branch or an attention + MLP pair (``add`` tells which)."""

    add: str
    norm: str = "layernorm"
    scale: str = "none"
    dropout: bool = False

    @property
    def parallel(self) -> bool:
        """Does the detector see two adds (a parallel pair) for this step?"""
        return self.add in PARALLEL_ADDS

    @property
    def two_branches(self) -> bool:
        return self.add in PARALLEL_ADDS or self.add in SUMMED_ADDS


@dataclass(frozen=True)
class ModelSpec:
    """A whole model: its width, its residual steps, where the stream starts and what it returns.

    ``embed``: ``"input"`` (the stream is the model's float input), or token ids
    embedded as is, times ``sqrt(d)``, or through ``dropout(p=0)``.
    ``hidden``: return the raw stream as well — none, the last value, or every
    value (``b_0`` and the output of each step, as ``output_hidden_states``).
    """

    d: int
    layers: tuple[LayerSpec, ...]
    embed: str = "input"
    final_norm: bool = True
    hidden: str = "none"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def parallel_layers(self) -> list[bool]:
        return [layer.parallel for layer in self.layers]


# ---------------------------------------------------------------- building blocks


class FunctionalRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.d, self.eps = d, eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.rms_norm(x, (self.d,), self.weight, self.eps)


class WeightlessLayerNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.d = d

    def forward(self, x):
        return F.layer_norm(x, (self.d,), None, None, 1e-5)


def make_norm(kind: str, d: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(d)
    if kind == "rmsnorm_fp32":
        return RMSNorm(d)
    if kind == "f_rms_norm":
        return FunctionalRMSNorm(d)
    if kind == "weightless_layernorm":
        return WeightlessLayerNorm(d)
    raise ValueError(f"unknown norm {kind!r}")


class Mlp(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        return self.down(F.gelu(self.up(h)))


class Scaled(nn.Module):
    """What sits between a branch and its add: LayerScale or a constant, then dropout."""

    def __init__(self, d: int, scale: str, dropout: bool):
        super().__init__()
        self.scale, self.dropout = scale, dropout
        self.gamma = nn.Parameter(torch.full((d,), 0.5)) if scale == "layerscale" else None

    def forward(self, f):
        if self.scale == "layerscale":
            f = self.gamma * f
        elif self.scale == "constant":
            f = f * 0.7  # e.g. a residual_multiplier
        return F.dropout(f, p=0.0, training=self.training) if self.dropout else f


class Layer(nn.Module):
    """One residual step as :class:`LayerSpec` describes it."""

    def __init__(self, d: int, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.norm = make_norm(spec.norm, d)
        self.attn = nn.Linear(d, d)  # stands for attention: one weight matrix
        self.mlp = Mlp(d) if spec.two_branches else None
        self.post = Scaled(d, spec.scale, spec.dropout)

    def forward(self, x):
        add = self.spec.add
        h = self.norm(x)
        if add in SEQUENTIAL_ADDS:
            f = self.post(self.attn(h))
            if add == "x + f":
                return x + f
            if add == "f + x":
                return f + x
            x += f
            return x
        a, m = self.post(self.attn(h)), self.mlp(h)
        if add == "x + a + m":
            return x + a + m
        if add == "(x + a) + m":
            t = x + a
            return t + m
        if add == "m + (x + a)":
            return m + (x + a)
        if add == "(a + m) + x":
            return (a + m) + x
        if add == "m = a; m += mlp; x + m":
            a += m  # the branch sum built in place, as GPT-J-style code does
            return x + a
        raise ValueError(f"unknown add {add!r}")


class RandomModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.emb = nn.Embedding(VOCAB, spec.d) if spec.embed != "input" else None
        self.layers = nn.ModuleList(Layer(spec.d, layer) for layer in spec.layers)
        self.final = nn.LayerNorm(spec.d) if spec.final_norm else None
        self.head = nn.Linear(spec.d, 3)

    def embed(self, inputs):
        if self.emb is None:
            return inputs
        x = self.emb(inputs)
        if self.spec.embed == "scaled_tokens":
            return x * math.sqrt(self.spec.d)
        if self.spec.embed == "dropout_tokens":
            return F.dropout(x, p=0.0, training=self.training)
        return x

    def forward(self, inputs):
        x = self.embed(inputs)
        hidden = [x]
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        out = self.head(self.final(x) if self.final is not None else x)
        if self.spec.hidden == "last":
            return out, x
        if self.spec.hidden == "all":
            return (out, *hidden)
        return out


# ---------------------------------------------------------------- hypothesis strategies


def layer_specs(draw_add):
    """Strategy for one :class:`LayerSpec` whose add form is drawn by ``draw_add``."""
    from hypothesis import strategies as st

    return st.builds(
        LayerSpec,
        add=draw_add,
        norm=st.sampled_from(NORMS),
        scale=st.sampled_from(SCALES),
        dropout=st.booleans(),
    )


def model_specs(max_layers: int = 40):
    """Strategy for :class:`ModelSpec`: 1 to ``max_layers`` steps, d of 8 or 16."""
    from hypothesis import strategies as st

    adds = st.sampled_from(SEQUENTIAL_ADDS + PARALLEL_ADDS + SUMMED_ADDS)

    @st.composite
    def specs(draw):
        embed = draw(st.sampled_from(EMBEDS))
        hidden = draw(st.sampled_from(HIDDEN))
        layers = draw(st.lists(layer_specs(adds), min_size=1, max_size=max_layers))
        layers = [_without_aliasing(layer, i, embed, hidden) for i, layer in enumerate(layers)]
        return ModelSpec(
            d=draw(st.sampled_from((8, 16))),
            layers=tuple(layers),
            embed=embed,
            final_norm=draw(st.booleans()),
            hidden=hidden,
        )

    return specs()


def _without_aliasing(layer: LayerSpec, index: int, embed: str, hidden: str) -> LayerSpec:
    """``x += f`` only where no one else holds ``x``.

    An in-place add into the model's own input would write into the caller's
    tensor, and one into a value already kept as a hidden state would change
    that hidden state too: code that does either is broken before any rewrite.
    """
    aliased = hidden == "all" or (index == 0 and embed == "input")
    if layer.add == "x += f" and aliased:
        return LayerSpec("x + f", layer.norm, layer.scale, layer.dropout)
    return layer


def build_model(spec: ModelSpec, seed: int = 0) -> RandomModel:
    """The module ``spec`` describes, with weights drawn from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return RandomModel(spec).eval()


def example_inputs(spec: ModelSpec, seed: int = 0) -> tuple[torch.Tensor]:
    """Token ids ``[BATCH, SEQ]`` or a float stream ``[BATCH, SEQ, d]``."""
    gen = torch.Generator().manual_seed(seed)
    if spec.embed == "input":
        return (torch.randn(BATCH, SEQ, spec.d, generator=gen),)
    return (torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen),)
