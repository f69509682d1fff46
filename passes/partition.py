"""Cut a stream's layers into consecutive blocks (design §2, Partition)."""

from __future__ import annotations

import logging

from attnres_compile.config import AttnResConfig

log = logging.getLogger("attnres_compile")


def partition_blocks(num_layers: int, config: AttnResConfig) -> tuple[tuple[int, ...], ...]:
    """Layer indices of each block; equal blocks of ``ceil(L / num_blocks)``, short one last.

    ``num_blocks`` above ``num_layers`` is Full AttnRes (one layer per block),
    logged rather than refused: a 4-layer stream under the default 8 is common.
    """
    if num_layers <= 0:
        raise ValueError(f"partition_blocks: a stream needs at least one layer, got {num_layers}")
    if config.num_blocks is not None and config.num_blocks > num_layers:
        log.info(
            "num_blocks=%d exceeds the stream's %d layers: using Full AttnRes (one layer per block)",
            config.num_blocks, num_layers,
        )
    size = config.layers_per_block(num_layers)
    blocks = tuple(tuple(range(start, min(start + size, num_layers))) for start in range(0, num_layers, size))
    if config.num_blocks is not None and len(blocks) != min(config.num_blocks, num_layers):
        log.info(
            "%d layers in blocks of %d give %d blocks (num_blocks=%d asked)",
            num_layers, size, len(blocks), config.num_blocks,
        )
    return blocks
