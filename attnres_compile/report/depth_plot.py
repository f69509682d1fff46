"""The depth weights as a heatmap (matplotlib, PNG): rows are reads in order, columns sources."""

from __future__ import annotations

import logging
from typing import Sequence

from torch import Tensor

from ..depth_weights import DepthWeights

log = logging.getLogger("attnres_compile")


def plot_depth_weights(weights: Sequence[DepthWeights], path: str, *, title: str = "Block AttnRes depth weights") -> None:
    """Write a heatmap per stream (rows: reads in order, columns: sources) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(weights), squeeze=False,
        figsize=(2.2 + 0.9 * max(w.weights.shape[1] for w in weights) * len(weights), 1.4 + 0.32 * max(len(w.rows) for w in weights)),
    )
    for ax, stream in zip(axes[0], weights):
        image = ax.imshow(stream.weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(stream.columns)), stream.columns)
        ax.set_yticks(range(len(stream.rows)), stream.rows, fontsize=8)
        ax.set_xlabel("source (b_0: embedding; b_n: block n-1, its partial sum while it runs)", fontsize=8)
        ax.set_title(f"stream {stream.stream}", fontsize=10)
        for (i, j), value in _cells(stream.weights):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
        fig.colorbar(image, ax=ax, label="mean alpha")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("attnres: wrote depth-weight plot %s", path)


def _cells(matrix: Tensor):
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = float(matrix[i, j])
            if value == value:  # not NaN
                yield (i, j), value
