"""Recovery of sparse masks against a ground truth, up to a permutation of latent dimensions."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from sams_scvi.metrics._utils import check_unique_names


def mask_recovery(
    learned: pd.DataFrame | np.ndarray, true: pd.DataFrame | np.ndarray, threshold: float = 0.5
) -> pd.Series:
    """Precision, recall and F1 of learned masks under the best matching of latent dimensions.

    Latent dimensions are only identified up to a permutation, so learned dimensions are matched one to one to
    true dimensions by the Hungarian algorithm, maximising the number of shared active entries (as the paper's
    simulation metrics do). Learned dimensions left unmatched count their active entries as false
    positives; unmatched true dimensions count theirs as false negatives.

    Parameters
    ----------
    learned
        Perturbations x learned dimensions: mask probabilities or 0/1 (e.g.
        :meth:`sams_scvi.SAMSVAE.get_mask_probabilities`). Rows are matched to ``true`` by name if both are
        DataFrames, which then must not repeat a perturbation.
    true
        Perturbations x true dimensions, 0/1.
    threshold
        Entries of ``learned`` above it are active.

    Returns
    -------
    ``precision``, ``recall``, ``f1``, ``learned_active_fraction`` and ``true_active_fraction``.
    """
    if isinstance(learned, pd.DataFrame) and isinstance(true, pd.DataFrame):
        for table, which in ((learned, "learned"), (true, "true")):
            check_unique_names(table.index, f"The {which} masks' perturbations (rows)", "give each one row.")
        missing = true.index.difference(learned.index)
        if len(missing):
            raise ValueError(f"Perturbations missing from the learned masks: {list(missing[:10])}")
        learned = learned.loc[true.index]
    learned = np.asarray(learned, dtype=float) > threshold
    true = np.asarray(true, dtype=float) > 0.5
    if learned.shape[0] != true.shape[0]:
        raise ValueError(f"{learned.shape[0]} learned rows but {true.shape[0]} true rows.")
    shared = learned.T.astype(int) @ true.astype(int)  # (K_learned, K_true) true positives of each pairing
    rows, cols = linear_sum_assignment(-shared)
    tp = int(shared[rows, cols].sum())
    fp = int(learned.sum()) - tp
    fn = int(true.sum()) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return pd.Series(
        {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "learned_active_fraction": float(learned.mean()),
            "true_active_fraction": float(true.mean()),
        }
    )
