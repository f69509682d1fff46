"""Offline byte-level training text: the source of Python's standard library.

Every CPython install carries a few megabytes of real, structured text (its own
``.py`` sources), so the examples can train a language model with no download
and no data set on disk. Tokens are raw bytes (vocabulary 256). Files are
joined in sorted order with a NUL byte after each: Python source cannot contain
NUL, so it marks file boundaries unambiguously (like an end-of-text token) and
lets :func:`split_train_val` cut between files.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["FILE_SEPARATOR", "batch_iterator", "load_corpus", "split_train_val", "stdlib_files"]

log = logging.getLogger("attnres_compile.examples")

FILE_SEPARATOR = 0
"""Byte appended after every file (NUL never occurs in Python source)."""


def stdlib_files() -> list[Path]:
    """The standard library's top-level ``.py`` files, sorted by name.

    Only the top level is used: it already holds several megabytes and does not
    depend on which optional packages (``test``, ``idlelib``...) a distribution
    ships.

    Returns
    -------
    list of Path
        Non-empty, in a fixed (sorted) order.
    """
    # sysconfig names the base install's library even inside a virtualenv; the
    # directory of `os` is the fallback for unusual layouts (embedded builds).
    for root in (sysconfig.get_paths().get("stdlib"), os.path.dirname(os.__file__)):
        if root and os.path.isdir(root):
            files = sorted(p for p in Path(root).glob("*.py") if p.is_file())
            if files:
                return files
    raise FileNotFoundError("found no standard-library .py sources to train on")


def load_corpus(max_bytes: int = 2_000_000) -> torch.Tensor:
    """Concatenate standard-library sources into one byte tensor.

    Parameters
    ----------
    max_bytes : int
        Upper bound on the corpus length; the last file is cut to fit.

    Returns
    -------
    Tensor [N] uint8
        ``N <= max_bytes``; each file is followed by :data:`FILE_SEPARATOR`.
        Deterministic for a given Python install.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    chunks, total = [], 0
    for path in stdlib_files():
        chunk = path.read_bytes() + bytes([FILE_SEPARATOR])
        chunks.append(chunk[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    data = b"".join(chunks)
    log.info("offline corpus: %d bytes from %d stdlib files", len(data), len(chunks))
    # bytearray: torch.frombuffer wants a writable buffer.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def split_train_val(data: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the corpus into a training head and a validation tail.

    The cut moves to the file boundary nearest the target, so that no file is
    shared between the two parts (a shared file would leak validation text
    into training).

    Parameters
    ----------
    data : Tensor [N]
        A corpus from :func:`load_corpus`.
    val_fraction : float
        Target share of the validation part, in (0, 1); the actual share
        depends on where files end.

    Returns
    -------
    train : Tensor [N_train]
    val : Tensor [N - N_train]
        ``torch.cat([train, val])`` equals ``data``; both are views of it.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    target = int(len(data) * (1.0 - val_fraction))
    # Candidate cuts lie just after a separator; both parts must be non-empty.
    # With no candidate (a corpus of one file) cut mid-file at the target.
    cuts = (data == FILE_SEPARATOR).nonzero().flatten() + 1
    cuts = cuts[cuts < len(data)]
    cut = int(cuts[(cuts - target).abs().argmin()]) if len(cuts) > 0 else target
    return data[:cut], data[cut:]


def batch_iterator(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows of the corpus for next-token prediction.

    Parameters
    ----------
    data : Tensor [N]
        Byte corpus (any integer dtype), ``N > seq_len``.
    batch_size : int
        B, windows per batch.
    seq_len : int
        T, tokens per window.
    generator : torch.Generator
        Source of the window offsets; the same seed gives the same batches.

    Yields
    ------
    x : LongTensor [B, T]
        ``data[s : s + T]`` for B random offsets ``s``.
    y : LongTensor [B, T]
        ``data[s + 1 : s + T + 1]``, the next token at every position.
    """
    if len(data) <= seq_len:
        raise ValueError(f"corpus of {len(data)} tokens is too short for seq_len={seq_len}")
    window = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
        chunk = data[starts[:, None] + window].long()  # [B, T + 1]
        yield chunk[:, :-1], chunk[:, 1:]
