"""Average treatment effects measured in the data, and their agreement with a model's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse


def perturbseq_scale(x, target_sum: float = 1e4) -> np.ndarray:
    """The paper's expression scale :math:`\\log_2(1 + 10^4 x / \\sum_g x_g)` of a (cells x genes) count block."""
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    x = x.astype(np.float64)
    totals = x.sum(1, keepdims=True)
    return np.log2(1 + target_sum * x / np.maximum(totals, 1))


def observed_ate(
    adata: AnnData,
    perturbation_key: str = "perturbation",
    control_value: str = "control",
    perturbations: Sequence[str] | None = None,
    layer: str | None = None,
    chunk_size: int = 10_000,
) -> AnnData:
    """Data average treatment effects: mean of each label's cells minus mean of the control cells.

    Both on the paper's scale :math:`\\log_2(1 + 10^4 x / \\sum_g x_g)` of raw counts, accumulated in chunks of
    cells so that sparse data is never densified whole.

    Parameters
    ----------
    adata
        Raw counts (``X`` or ``layers[layer]``) with a label per cell in ``obs[perturbation_key]``.
    perturbation_key, control_value
        Label column and control label.
    perturbations
        Labels to report; default, every non-control label.
    layer
        Layer holding the counts (default ``X``).
    chunk_size
        Cells per chunk.

    Returns
    -------
    AnnData (perturbations x genes) with the ATE in ``X``, ``obs["n_cells"]`` and ``uns["control"]``, in the
    same layout as :meth:`sams_scvi.SAMSVAE.estimate_ate`.
    """
    if perturbation_key not in adata.obs:
        raise KeyError(f"{perturbation_key!r} is not a column of adata.obs.")
    labels = adata.obs[perturbation_key].astype(str).str.strip().to_numpy()
    if not (labels == control_value).any():
        raise ValueError(f"No cells are labelled {control_value!r}; the ATE needs control cells.")
    if perturbations is None:
        perturbations = sorted(set(labels) - {control_value})
    perturbations = [str(p) for p in perturbations]
    missing = sorted(set(perturbations) - set(labels))
    if missing:
        raise ValueError(f"No cells are labelled {missing[:10]}.")
    groups = [control_value, *perturbations]
    group_of = pd.Series(np.arange(len(groups)), index=groups)
    codes = pd.Series(labels).map(group_of).to_numpy(dtype=float)
    x = adata.layers[layer] if layer is not None else adata.X
    sums = np.zeros((len(groups), adata.n_vars))
    counts = np.zeros(len(groups))
    for start in range(0, adata.n_obs, chunk_size):
        block_codes = codes[start : start + chunk_size]
        keep = ~np.isnan(block_codes)
        if not keep.any():
            continue
        rows = np.arange(start, min(start + chunk_size, adata.n_obs))[keep]
        y = perturbseq_scale(x[rows])
        g = block_codes[keep].astype(int)
        np.add.at(sums, g, y)
        counts += np.bincount(g, minlength=len(groups))
    means = sums / counts[:, None]
    return AnnData(
        X=(means[1:] - means[:1]).astype(np.float32),
        obs=pd.DataFrame({"n_cells": counts[1:].astype(int)}, index=pd.Index(perturbations, name="perturbation")),
        var=pd.DataFrame(index=adata.var_names.copy()),
        uns={"control": control_value, "n_control_cells": int(counts[0]), "scale": "log2(1 + 1e4 * x / sum(x))"},
    )


def _as_frame(ate: AnnData | pd.DataFrame) -> pd.DataFrame:
    return ate.to_df() if isinstance(ate, AnnData) else ate


def ate_pearson(
    predicted: AnnData | pd.DataFrame,
    observed: AnnData | pd.DataFrame,
    top_k: int | None = None,
    perturbations: Sequence[str] | None = None,
) -> float:
    """Pearson correlation of predicted and observed ATEs, pooled over perturbations x genes (spec §5.2).

    Parameters
    ----------
    predicted, observed
        Perturbations x genes ATE tables (AnnData or DataFrame); rows and genes are matched by name.
    top_k
        Keep, for each perturbation, only the ``top_k`` genes with the largest observed ``|ATE|``.
    perturbations
        Subset of perturbations; default, those in both tables.
    """
    pred, obs = _as_frame(predicted), _as_frame(observed)
    rows = list(perturbations) if perturbations is not None else [p for p in obs.index if p in pred.index]
    missing = [p for p in rows if p not in pred.index or p not in obs.index]
    if missing or not rows:
        raise ValueError(
            f"Perturbations missing from one of the tables: {missing[:10]}" if missing else "No shared perturbations."
        )
    genes = obs.columns.intersection(pred.columns)
    if top_k is not None and top_k > len(genes):
        raise ValueError(f"top_k={top_k} exceeds the {len(genes)} shared genes.")
    p = pred.loc[rows, genes].to_numpy(dtype=float)
    o = obs.loc[rows, genes].to_numpy(dtype=float)
    if top_k is not None:
        top = np.argpartition(-np.abs(o), top_k - 1, axis=1)[:, :top_k]
        p = np.take_along_axis(p, top, axis=1)
        o = np.take_along_axis(o, top, axis=1)
    return float(np.corrcoef(p.ravel(), o.ravel())[0, 1])
