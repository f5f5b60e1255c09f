"""Combination splits of the paper's Norman tasks, for any screen with combinations (``docs/models.md``)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from anndata import AnnData

from sams_scvi._utils import _check_seed
from sams_scvi.metrics._utils import obs_labels


def _atoms(label: str, control_value: str, delimiter: str) -> list[str]:
    return [a.strip() for a in label.split(delimiter) if a.strip() not in ("", control_value)]


def combination_split(
    adata: AnnData,
    fraction: float,
    mode: Literal["ood", "data_efficiency"] = "ood",
    perturbation_key: str = "perturbation",
    control_value: str = "control",
    delimiter: str = "+",
    test_fraction: float = 0.2,
    val_fraction: float = 0.2,
    combination_test_fraction: float = 0.25,
    seed: int = 0,
) -> list[np.ndarray]:
    """Train / validation / test cell indices for combinatorial generalisation.

    Cells with at most one perturbation are split ``1 - val_fraction`` / ``val_fraction`` into train / validation
    and never tested. Combination cells are first partitioned once (``test_fraction`` to test, then
    ``val_fraction`` of the rest to validation), so the splits are nested across ``fraction`` for a fixed seed.

    * ``mode="ood"``: the combinations (sorted, then shuffled with ``seed``) are ordered; training and validation
      keep the combination cells of the first ``floor(fraction * C)`` combinations, and the test set keeps the
      test-partition cells of the last ``ceil(combination_test_fraction * C)`` combinations. For
      ``fraction <= 1 - combination_test_fraction`` the test combinations are never seen in training (only
      their single perturbations are). Only combinations whose perturbations all occur as singles are used.
    * ``mode="data_efficiency"``: all combinations are present; training keeps the first
      ``floor(fraction * n)`` of its ``n`` combination cells, validation and test keep all of theirs.

    Parameters
    ----------
    adata
        Data with one label per cell in ``obs[perturbation_key]``.
    fraction
        ``f`` in [0, 1]: fraction of combinations (``"ood"``) or of training combination cells
        (``"data_efficiency"``) used for training.
    mode
        ``"ood"`` or ``"data_efficiency"``.
    perturbation_key, control_value, delimiter
        How labels are written.
    test_fraction, val_fraction, combination_test_fraction
        Partition sizes (the paper's 0.2, 0.2 and 0.25).
    seed
        Seed of the partition and of the order of combinations (a non-negative integer).

    Returns
    -------
    ``[train, validation, test]`` arrays of cell positions, usable as
    ``datasplitter_kwargs={"external_indexing": ...}`` in :meth:`sams_scvi.SAMSVAE.train`.
    """
    _check_seed(seed)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("`fraction` must be in [0, 1].")
    if mode not in ("ood", "data_efficiency"):
        raise ValueError("`mode` must be 'ood' or 'data_efficiency'.")
    labels = obs_labels(adata, perturbation_key)
    n_atoms = np.array([len(_atoms(label, control_value, delimiter)) for label in labels])
    singles = set(labels[n_atoms == 1])
    usable = np.array(
        [
            n >= 2 and all(a in singles for a in _atoms(label, control_value, delimiter))
            for label, n in zip(labels, n_atoms, strict=True)
        ]
    )
    if not usable.any():
        raise ValueError("No cells carry a combination whose perturbations also occur as singles.")

    rng = np.random.default_rng(seed)
    single_cells = rng.permutation(np.flatnonzero(n_atoms <= 1))
    n_single_val = round(val_fraction * len(single_cells))
    single_val, single_train = single_cells[:n_single_val], single_cells[n_single_val:]

    combo_cells = rng.permutation(np.flatnonzero(usable))
    n_test = round(test_fraction * len(combo_cells))
    combo_test, rest = combo_cells[:n_test], combo_cells[n_test:]
    n_val = round(val_fraction * len(rest))
    combo_val, combo_train = rest[:n_val], rest[n_val:]

    if mode == "ood":
        combos = np.array(sorted(set(labels[usable])), dtype=object)
        np.random.default_rng(seed).shuffle(combos)
        train_combos = set(combos[: math.floor(fraction * len(combos))])
        test_combos = set(combos[len(combos) - math.ceil(combination_test_fraction * len(combos)) :])
        combo_train = combo_train[np.isin(labels[combo_train], list(train_combos))]
        combo_val = combo_val[np.isin(labels[combo_val], list(train_combos))]
        combo_test = combo_test[np.isin(labels[combo_test], list(test_combos))]
    else:
        combo_train = combo_train[: math.floor(fraction * len(combo_train))]

    splits = [np.concatenate([single_train, combo_train]), np.concatenate([single_val, combo_val]), combo_test]
    if len(splits[2]) == 0:
        raise ValueError("The split has no test cells; lower `combination_test_fraction` or use more combinations.")
    return [np.sort(s).astype(np.int64) for s in splits]
