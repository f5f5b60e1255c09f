"""How long ``train()`` runs and when the recipe's steps happen, measured in updates per perturbation.

A perturbation's mask logits and embedding move only in the optimiser steps whose minibatch holds one of its
cells. The number of such steps, its *updates*, is what a perturbation's mechanism needs to converge, and it means
the same on a 3,000-cell arrayed screen (every minibatch holds every perturbation) and on a genome-wide screen of
10^6 cells (a minibatch holds a fraction of them). Epochs do not: 120 epochs are 700 updates on 3,000 cells at batch
512 and 2,000 on 10,000 cells. See ``docs/model.md`` ("Training length").
"""

from __future__ import annotations

import math

import numpy as np

# Updates per perturbation of a default run. Measured on TAP-seq subsampled to 3,000 cells (100 per target) and on
# the full screens: ~700 updates leave the effects shrunk to a fifth, 4,000 reach the training-cell mean's
# correlation (benchmarks/NOTES.md, "Training length").
DEFAULT_UPDATES = 4_000
# The recipe aligns the latent axes after this many updates (or half way through a shorter run). Later, the masks'
# KL has had time to prune weak perturbations' dense, unaligned shifts (TAP-seq: 5 of 14 targets lost at 3,400).
ALIGN_AFTER_UPDATES = 1_000
# Longest default run, in cells passed through the network: scvi-tools' budget, 8 epochs of 10^6 cells.
MAX_CELL_PASSES = 8_000_000
# Default minibatch: the paper's 512, halved (down to 128) until an epoch has at least this many steps, so that a
# small screen makes its updates in minutes (a step of 128 cells costs about 2/5 of one of 512 on a CPU).
MIN_STEPS_PER_EPOCH = 16
BATCH_SIZES = (512, 256, 128)


def default_batch_size(n_train_cells: int) -> int:
    """Cells per minibatch of ``train(batch_size=None)``: 512, or 256 / 128 when an epoch would have < 16 steps."""
    for batch_size in BATCH_SIZES:
        if n_train_cells >= MIN_STEPS_PER_EPOCH * batch_size:
            return batch_size
    return BATCH_SIZES[-1]


def updates_per_epoch(n_train_cells: int, batch_size: int, cells_per_perturbation: float) -> float:
    r"""Expected optimiser steps per epoch whose minibatch holds a perturbation with ``cells_per_perturbation`` cells.

    :math:`\lceil n / B \rceil \, (1 - (1 - n_t / n)^B)` for :math:`n` training cells, batch size :math:`B` and
    :math:`n_t` cells of the perturbation.
    """
    n_train_cells = max(int(n_train_cells), 1)
    steps = math.ceil(n_train_cells / batch_size)
    share = min(max(float(cells_per_perturbation), 1.0) / n_train_cells, 1.0)
    return steps * (1.0 - (1.0 - share) ** min(batch_size, n_train_cells))


def typical_cells_per_perturbation(counts: np.ndarray) -> float:
    """Median training cells of the perturbations that have any (the pace of a typical mechanism)."""
    counts = np.asarray(counts, dtype=float)
    present = counts[counts > 0]
    return float(np.median(present)) if present.size else 1.0


def default_max_epochs(
    n_train_cells: int,
    batch_size: int | None = None,
    cells_per_perturbation: float | None = None,
    updates: int = DEFAULT_UPDATES,
) -> int:
    """Epochs of ``train(max_epochs=None)``: enough for ``updates`` updates of a typical perturbation.

    At most 8 million cell passes (8 epochs of 10^6 cells), at least one epoch.

    Parameters
    ----------
    n_train_cells
        Cells trained on.
    batch_size
        Cells per minibatch; default :func:`default_batch_size`.
    cells_per_perturbation
        Training cells of a typical perturbation; default: every minibatch holds it.
    updates
        Updates per perturbation to reach.
    """
    n_train_cells = max(int(n_train_cells), 1)
    batch_size = default_batch_size(n_train_cells) if batch_size is None else int(batch_size)
    cells = n_train_cells if cells_per_perturbation is None else cells_per_perturbation
    epochs = _epochs_for(updates, updates_per_epoch(n_train_cells, batch_size, cells))
    return int(max(1, min(epochs, MAX_CELL_PASSES // n_train_cells)))


def align_epoch(max_epochs: int, per_epoch: float, after_updates: int = ALIGN_AFTER_UPDATES) -> int:
    """First epoch trained in the aligned basis: after ``after_updates`` updates, or half way if that is sooner.

    Never before the end of the first epoch.
    """
    return max(1, min(_epochs_for(after_updates, per_epoch), max_epochs // 2))


def _epochs_for(updates: float, per_epoch: float) -> int:
    """Whole epochs that make ``updates`` (an expectation: 5.9997 updates per epoch count as 6)."""
    return math.ceil(round(updates / max(per_epoch, 1e-12), 2))
