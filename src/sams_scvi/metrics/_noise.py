"""How well could any predictor agree with noisy data ATEs? Split-half ceilings and disjoint control halves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from sams_scvi._utils import _as_positions, _check_seed
from sams_scvi.metrics._ate import ate_metrics, observed_ate
from sams_scvi.metrics._utils import obs_labels, unique_labels


def random_halves(cells: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split cell positions into two disjoint random halves (sorted); ``seed`` is a non-negative integer."""
    _check_seed(seed)
    shuffled = np.random.default_rng(seed).permutation(np.asarray(cells))
    half = len(shuffled) // 2
    return np.sort(shuffled[:half]), np.sort(shuffled[half:])


def full_sample_ceiling(split_half_pearson: float) -> float:
    """The Pearson r a noise-free prediction can expect against the full sample: :math:`\\sqrt{2r / (1 + r)}`.

    :func:`split_half_ceiling` correlates two *half-size* samples, both noisy. A prediction without noise is
    scored against the full sample, whose noise variance is half a half's; by the Spearman-Brown formula the
    full sample's reliability is :math:`2r / (1 + r)` and its correlation with the noise-free truth is the square
    root of that. A model's ``pearson`` above it is fitting the test cells' noise; well below it, the model misses
    signal the data holds.

    Parameters
    ----------
    split_half_pearson
        The ``pearson`` entry of :func:`split_half_ceiling`. At or below 0 (the halves share no signal) the
        ceiling is 0.
    """
    r = float(split_half_pearson)
    if not np.isfinite(r) or r > 1:
        raise ValueError(f"`split_half_pearson` must be a correlation (at most 1), not {split_half_pearson!r}.")
    return float(np.sqrt(2 * r / (1 + r))) if r > 0 else 0.0


def split_half_ceiling(
    adata: AnnData,
    perturbations: Sequence[str] | None = None,
    perturbation_key: str = "perturbation",
    control_value: str = "control",
    top_k: int = 20,
    indices: Sequence[int] | Sequence[bool] | Sequence[str] | None = None,
    seed: int = 0,
) -> pd.Series:
    """Agreement between the data ATEs of two disjoint halves of the cells: a noise ceiling for every metric.

    Each label's cells and the control cells are split in two at random; the ATEs measured on one half are
    scored against those of the other with :func:`~sams_scvi.metrics.ate_metrics`. With ~100 cells per
    condition and a few hundred UMIs per cell this is often far below 1, and a model cannot be expected to
    beat it (it estimates the agreement of a half-size sample, so it is conservative;
    :func:`full_sample_ceiling` turns its ``pearson`` into the ceiling of a noise-free prediction).

    Parameters
    ----------
    adata
        Raw counts with labels in ``obs[perturbation_key]``.
    perturbations
        Labels to score; default, every non-control label with at least 2 cells. A label listed twice counts once.
    perturbation_key, control_value
        How labels are written.
    top_k
        Genes per perturbation of the top-k metrics.
    indices
        Cells to use: positions, a boolean mask or obs names (unique ``adata.obs_names``); default, all. A cell
        listed twice is used once (it would otherwise be able to land in both halves).
    seed
        Seed of the halves (a non-negative integer).
    """
    _check_seed(seed)
    labels = obs_labels(adata, perturbation_key)
    cells = _as_positions(adata, indices)
    # a cell drawn twice is one cell; the order is kept, since the halves are drawn from it
    cells = np.arange(adata.n_obs) if cells is None else pd.unique(cells)
    counts = pd.Series(labels[cells]).value_counts()
    if perturbations is None:
        perturbations = sorted(p for p, n in counts.items() if p != control_value and n >= 2)
    perturbations = unique_labels(perturbations, as_text=True)
    too_few = [p for p in [control_value, *perturbations] if counts.get(p, 0) < 2]
    if too_few:
        raise ValueError(f"Split halves need at least 2 cells per label; too few for {too_few[:10]}.")
    first, second = [], []
    for label in [control_value, *perturbations]:
        a, b = random_halves(cells[labels[cells] == label], seed)
        first.append(a)
        second.append(b)
    kwargs = {"perturbation_key": perturbation_key, "control_value": control_value, "perturbations": perturbations}
    half_a = observed_ate(adata, indices=np.concatenate(first), **kwargs)
    half_b = observed_ate(adata, indices=np.concatenate(second), **kwargs)
    return ate_metrics(half_a, half_b, top_k=top_k)
