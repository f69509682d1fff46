"""Cut a stream's layers into consecutive blocks (design §2, Partition)."""

from __future__ import annotations

import logging
import math
from typing import Optional

log = logging.getLogger("attnres_compile")


def layers_per_block(num_layers: int, *, num_blocks: Optional[int] = None, block_size: Optional[int] = None) -> int:
    """``block_size`` when given, else ``ceil(num_layers / num_blocks)`` (at least 1)."""
    if block_size is not None:
        return block_size
    if num_blocks is None:
        raise ValueError("partition: give num_blocks or block_size")
    return max(1, math.ceil(num_layers / num_blocks))


def partition_blocks(
    num_layers: int, *, num_blocks: Optional[int] = None, block_size: Optional[int] = None
) -> tuple[tuple[int, ...], ...]:
    """Layer indices of each block: equal blocks of ``layers_per_block``, the short one last.

    ``num_blocks`` above ``num_layers`` is Full AttnRes (one layer per block),
    logged rather than refused: a 4-layer stream under the default 8 is common.
    """
    if num_layers <= 0:
        raise ValueError(f"partition_blocks: a stream needs at least one layer, got {num_layers}")
    if num_blocks is not None and num_blocks > num_layers:
        log.info(
            "num_blocks=%d exceeds the stream's %d layers: using Full AttnRes (one layer per block)",
            num_blocks, num_layers,
        )
    size = layers_per_block(num_layers, num_blocks=num_blocks, block_size=block_size)
    blocks = tuple(tuple(range(start, min(start + size, num_layers))) for start in range(0, num_layers, size))
    if block_size is None and len(blocks) != min(num_blocks, num_layers):
        log.info("%d layers in blocks of %d give %d blocks (num_blocks=%d asked)", num_layers, size, len(blocks), num_blocks)
    return blocks
