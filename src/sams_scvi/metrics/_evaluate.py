"""One entry point: every metric of a model or baseline, per subset of a split, as one tidy table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData
from scvi.utils import track

from sams_scvi._utils import _as_positions, _check_seed
from sams_scvi.metrics._ate import ate_metrics, ate_metrics_per_perturbation, observed_ate
from sams_scvi.metrics._baselines import baseline_ate
from sams_scvi.metrics._noise import random_halves
from sams_scvi.metrics._utils import obs_labels, rna_counts

SUBSETS = ("train", "validation", "test", "all")


def evaluate(
    predictor,
    adata: AnnData | MuData,
    split: Sequence[Sequence[int] | Sequence[bool] | Sequence[str]] | None = None,
    subsets: Sequence[str] = SUBSETS,
    perturbation_key: str | None = None,
    control_value: str | None = None,
    delimiter: str | None = None,
    top_k: int = 20,
    n_ate_samples: int = 2500,
    n_iwelbo_samples: int = 100,
    library_size: float | Literal["median"] = "median",
    disjoint_controls: bool = False,
    per_perturbation: bool = False,
    scale: Literal["log2", "log1p", "none"] | None = None,
    seed: int = 0,
    progress_bar: bool = True,
    layer: str | None = None,
) -> pd.DataFrame:
    """Evaluate a trained model or a baseline on a split, with the paper's protocol (``docs/models.md``).

    For each subset of cells (``train``, ``validation``, ``test``, and ``all`` = their union):

    * ``iwelbo``: held-out importance-weighted ELBO in nats per cell (models only; globals sampled once);
    * the ATE metrics of :func:`~sams_scvi.metrics.ate_metrics` over the perturbations observed in that subset,
      against data ATEs computed on all cells of ``adata`` (as the paper does).

    Parameters
    ----------
    predictor
        A trained :class:`~sams_scvi.SAMSVAE` (anything with ``estimate_ate`` and ``get_marginal_ll``), or a
        baseline name for :func:`~sams_scvi.metrics.baseline_ate` (``"control"``, ``"additive"``,
        ``"mean_perturbed"``), which is fitted on the training cells.
    adata
        Raw counts with labels in ``obs[perturbation_key]``, or a MuData (the model's, set up with
        ``setup_mudata``; its RNA modality holds the counts).
    split
        ``[train, validation, test]``, each as cell positions, a boolean mask or obs names (unique
        ``adata.obs_names``), e.g. from :func:`~sams_scvi.metrics.combination_split`. A part may be empty.
        Default: the model's own split.
    subsets
        Rows to report; a requested subset without cells raises a :class:`ValueError`.
    perturbation_key, control_value, delimiter
        How labels are written. Default: as the model was set up (for a baseline: ``"perturbation"``,
        ``"control"``, ``"+"``).
    top_k
        Genes per perturbation of the top-k metrics.
    n_ate_samples, n_iwelbo_samples, library_size
        Monte-Carlo sizes and library size of the model's ATE and IWELBO.
    disjoint_controls
        Split the control cells in two random halves: a baseline is fitted with one, the observed ATEs use the
        other. Otherwise a data-derived baseline (e.g. additive ΔA + ΔB) and the observed effect share the
        control mean, whose noise inflates their agreement.
    per_perturbation
        Return one row per (subset, perturbation) with :func:`~sams_scvi.metrics.ate_metrics_per_perturbation`
        and the perturbation's number of cells in the subset, instead of one pooled row per subset.
    scale
        Scale of the data ATEs and baselines (see :func:`~sams_scvi.metrics.observed_ate`); default, the model's:
        ``"none"`` for ``likelihood="normal"``, else the paper's ``"log2"``.
    seed
        Seed of the control halves (a non-negative integer).
    progress_bar
        Show a progress bar over subsets.
    layer
        Layer of ``adata`` with the raw counts the observed ATEs (and baselines) are computed from. Default: the
        model's layer (``adata.X`` for a baseline).

    Returns
    -------
    One row per subset; columns ``n_cells``, ``iwelbo`` and the ATE metrics. With ``per_perturbation``, rows
    indexed by ``(subset, perturbation)`` with ``n_cells`` and the per-perturbation ATE metrics.
    """
    is_baseline = isinstance(predictor, str)
    _check_seed(seed)
    setup = {} if is_baseline else dict(predictor.registry_["setup_args"])
    # the data is read as the model reads it: its label column, control label, delimiter and counts layer
    perturbation_key = perturbation_key or setup.get("perturbation_key") or "perturbation"
    control_value = str(control_value if control_value is not None else setup.get("control_value", "control"))
    delimiter = delimiter or setup.get("delimiter") or "+"
    if layer is None and setup.get("layer") is not None:
        layer = setup["layer"]
    # the data's counts and labels, read as the model reads them (for a MuData, its RNA modality); the model's own
    # calls keep `adata`, the data it was set up with
    counts, layer = rna_counts(adata, setup, perturbation_key, layer)
    labels = obs_labels(counts, perturbation_key)
    if split is None:
        if is_baseline:
            raise ValueError("A baseline needs `split` (its training cells).")
        split = _model_split(predictor, adata)
    if len(split) != 3:
        raise ValueError("`split` must be [train, validation, test]: positions, boolean masks or obs names.")
    if any(part is None for part in split):
        raise ValueError("Each part of `split` must be cells (or an empty list), not None.")
    # each part may be empty (a split without validation cells); only scoring an empty subset is refused below
    parts = [_as_positions(adata, part, f"split[{i}]", allow_empty=True) for i, part in enumerate(split)]
    cells = dict(zip(SUBSETS[:3], parts, strict=True))
    cells["all"] = np.unique(np.concatenate(list(cells.values())))
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise ValueError(f"Unknown subsets {unknown}; choose from {SUBSETS}.")
    empty = [s for s in subsets if len(cells[s]) == 0]
    if empty:
        raise ValueError(f"The split has no {', '.join(empty)} cells; leave them out of `subsets`.")

    wanted = {s: sorted(set(labels[cells[s]]) - {control_value}) for s in subsets}
    everything = sorted(set().union(*wanted.values()))
    observed_cells, baseline_cells = None, cells["train"]
    if disjoint_controls:
        fit_half, score_half = random_halves(np.flatnonzero(labels == control_value), seed)
        observed_cells = np.setdiff1d(np.arange(adata.n_obs), fit_half)
        baseline_cells = np.setdiff1d(cells["train"], score_half)
    if scale is None:  # a model's estimate_ate decides: data-scale ATEs for the Gaussian likelihood
        normal = not is_baseline and getattr(predictor.module, "likelihood", "nb") == "normal"
        scale = "none" if normal else "log2"
    observed = observed_ate(
        counts,
        perturbation_key,
        control_value,
        perturbations=everything,
        layer=layer,
        indices=observed_cells,
        scale=scale,
    )
    if is_baseline:
        predicted = baseline_ate(
            counts,
            predictor,
            everything,
            perturbation_key,
            control_value,
            delimiter,
            indices=baseline_cells,
            layer=layer,
            scale=scale,
        )
    else:
        predicted = predictor.estimate_ate(
            everything, n_samples=n_ate_samples, library_size=library_size, progress_bar=False
        )

    if per_perturbation:
        tables = {}
        for subset in track(subsets, description="Evaluating", disable=not progress_bar):
            if not wanted[subset]:
                continue
            table = ate_metrics_per_perturbation(predicted, observed, top_k=top_k, perturbations=wanted[subset])
            counts = pd.Series(labels[cells[subset]]).value_counts()
            table.insert(0, "n_cells", counts.reindex(table.index).to_numpy())
            tables[subset] = table
        if not tables:
            raise ValueError("No perturbed cells in the requested subsets.")
        return pd.concat(tables, names=["subset", "perturbation"])

    rows = {}
    for subset in track(subsets, description="Evaluating", disable=not progress_bar):
        row = {"n_cells": len(cells[subset]), "iwelbo": np.nan}
        if not is_baseline:
            row["iwelbo"] = predictor.get_marginal_ll(adata, indices=cells[subset], n_mc_samples=n_iwelbo_samples)
        if wanted[subset]:
            row.update(ate_metrics(predicted, observed, top_k=top_k, perturbations=wanted[subset]).to_dict())
        rows[subset] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "subset"
    return table


def _model_split(model, adata: AnnData) -> list:
    """The model's train / validation / test cells: positions in its own data, obs names for any other ``adata``.

    The split is stored as positions in the data the model was trained on; another AnnData may hold those cells in
    another order, so they are found there by name (a missing cell is then an error, not a wrong cell).
    """
    split = [model.train_indices, model.validation_indices, model.test_indices]
    if model.adata is None or adata is model.adata:
        return split
    names = np.asarray(model.adata.obs_names)
    return [names[np.asarray(part, dtype=np.int64)] for part in split]
