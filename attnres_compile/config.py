"""The one configuration object of attnres-compile."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .passes.partition import layers_per_block

SCALES = ("count", "mean")

CONFIG_VERSION = 1
"""The layout of :meth:`AttnResConfig.to_dict` (saved in checkpoints' ``config.json``)."""


class _DefaultNumBlocks(int):
    """The default ``num_blocks`` (8), told apart from an explicit ``8``.

    ``AttnResConfig(block_size=6)`` must mean "partition by block size", while
    ``AttnResConfig(num_blocks=8, block_size=6)`` is two contradicting requests.
    """


_DEFAULT_NUM_BLOCKS = _DefaultNumBlocks(8)


@dataclass(frozen=True)
class AttnResConfig:
    """How a residual stream is turned into Block AttnRes.

    Parameters
    ----------
    num_blocks:
        Number of blocks the layers of a stream are cut into (paper: 8).
        ``block_size = ceil(L / num_blocks)``, so fewer blocks can result; a
        value above the number of layers gives Full AttnRes for that stream.
    block_size:
        Layers per block instead of ``num_blocks`` (the last block may be
        shorter). Setting it replaces the default ``num_blocks``.
    scale:
        ``"count"`` (default): ``h = n * sum(alpha_i v_i)`` with ``n`` the number
        of sources, so zero queries reproduce the original model exactly.
        ``"mean"``: the paper's convex mix ``h = sum(alpha_i v_i)``.
    eps:
        Epsilon of the key RMSNorm. ``None`` reads it off the model's own
        norms (1e-6 where the graph shows none).
    version:
        The layout of the saved dict; a config saved by a newer release is refused.
    """

    num_blocks: Optional[int] = _DEFAULT_NUM_BLOCKS
    block_size: Optional[int] = None
    scale: str = "count"
    eps: Optional[float] = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.block_size is not None:
            if self.num_blocks is not None and not isinstance(self.num_blocks, _DefaultNumBlocks):
                raise ValueError(
                    f"AttnResConfig: set num_blocks or block_size, not both "
                    f"(got num_blocks={self.num_blocks}, block_size={self.block_size})"
                )
            object.__setattr__(self, "num_blocks", None)
        elif self.num_blocks is None:
            raise ValueError("AttnResConfig: one of num_blocks or block_size must be set")
        for name in ("num_blocks", "block_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"AttnResConfig: {name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))  # drop the default marker type
        if self.scale not in SCALES:
            raise ValueError(f"AttnResConfig: scale must be one of {SCALES}, got {self.scale!r}")
        if self.eps is not None and not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"AttnResConfig: eps must be a positive float, got {self.eps!r}")
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"AttnResConfig: version {self.version!r} is not {CONFIG_VERSION}, the one this release reads "
                "(was the config saved by another release of attnres-compile?)"
            )

    @property
    def plan_options(self) -> dict[str, Any]:
        """``num_blocks``, ``block_size`` and ``eps``, as ``passes.pipeline.plan_graph`` takes them."""
        return {"num_blocks": self.num_blocks, "block_size": self.block_size, "eps": self.eps}

    def layers_per_block(self, num_layers: int) -> int:
        """Block size used for a stream of ``num_layers`` layers."""
        return layers_per_block(num_layers, num_blocks=self.num_blocks, block_size=self.block_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttnResConfig":
        """The inverse of :meth:`to_dict`; a dict without ``version`` (saved before it existed) is version 1."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"AttnResConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**data)
