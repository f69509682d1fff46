"""The colours of the HTML diff: one per block (cycled), the final read's, ``b_0``'s."""

from __future__ import annotations

# Distinct hues, none of them the red of removed rows.
BLOCK_COLOURS = ("#2f6fdb", "#e08a00", "#8e44ad", "#0f9b8e", "#c0399a", "#7a5c2e", "#1b9ac9", "#6b7a00")
FINAL_COLOUR = "#444b55"
SOURCE0_COLOUR = "#5b6470"


def block_colour(block: int, num_blocks: int) -> str:
    """The colour of block ``block``; the final read (``block == num_blocks``) has its own."""
    return FINAL_COLOUR if block >= num_blocks else BLOCK_COLOURS[block % len(BLOCK_COLOURS)]


def source_colour(source: int) -> str:
    """``b_0`` is the embedding; ``b_{n+1}`` is block n's sum and takes block n's colour."""
    return SOURCE0_COLOUR if source == 0 else BLOCK_COLOURS[(source - 1) % len(BLOCK_COLOURS)]
