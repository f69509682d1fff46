"""A timm-style vision transformer: LayerScale and DropPath between branch and add.

Written the way timm's ``vision_transformer.Block`` is (``x + drop_path(ls(attn(norm(x))))``),
with timm's in-place LayerScale option (``x.mul_(gamma)``) and its per-sample
DropPath (a Bernoulli mask from ``x.new_empty``, scaled by ``1 / keep_prob``), so
that the zoo covers both idioms without depending on timm. Not used by the
library itself: a test fixture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    """Per-channel gain on a branch output; ``inplace`` as in timm (``x.mul_(gamma)``)."""

    def __init__(self, dim: int, init_values: float = 1e-1, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole branch with probability ``p`` in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (``F.scaled_dot_product_attention``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # x: [B, N, dim]
        b, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, dim / heads]
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, layer_scale: float, drop_path: float, inplace: bool):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.ls1, self.drop_path1 = LayerScale(dim, layer_scale, inplace), DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ls2, self.drop_path2 = LayerScale(dim, layer_scale, inplace), DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class TimmStyleViT(nn.Module):
    """Patch embedding, CLS token, learned positions, pre-norm blocks, final norm, linear head on CLS."""

    def __init__(
        self, image: int = 16, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 4,
        classes: int = 5, layer_scale: float = 0.1, drop_path: float = 0.1, inplace: bool = True,
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, layer_scale, drop_path, inplace) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, pixels):  # pixels: [B, 3, H, W]
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [B, N, dim]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
