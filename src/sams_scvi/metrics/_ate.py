"""Average treatment effects measured in the data, and their agreement with a model's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from sams_scvi._utils import _as_positions, _layer
from sams_scvi.metrics._utils import check_unique_names, obs_labels, unique_labels


def perturbseq_scale(x, target_sum: float = 1e4, log: Literal["log2", "log1p", "none"] = "log2") -> np.ndarray:
    """Expression scale of a (cells x genes) count block: :math:`\\log_2(1 + 10^4 x / \\sum_g x_g)` (the paper's).

    ``log="log1p"`` gives the natural-log variant, scanpy's ``normalize_total`` followed by ``log1p``;
    ``log="none"`` leaves already normalised values as they are.
    """
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    x = x.astype(np.float64)
    if log == "none":
        return x
    normalized = target_sum * x / np.maximum(x.sum(1, keepdims=True), 1)
    return np.log2(1 + normalized) if log == "log2" else np.log1p(normalized)


def observed_ate(
    adata: AnnData,
    perturbation_key: str = "perturbation",
    control_value: str = "control",
    perturbations: Sequence[str] | None = None,
    layer: str | None = None,
    indices: Sequence[int] | None = None,
    scale: Literal["log2", "log1p", "none"] = "log2",
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
        Labels to report; default, every non-control label. A label listed twice is reported once.
    layer
        Layer holding the counts (default ``X``).
    indices
        Cells to use (positions, a boolean mask or obs names); default, all cells. Obs names need unique
        ``adata.obs_names``.
    scale
        ``"log2"``: :math:`\\log_2(1 + 10^4 x / \\sum x)` (the paper's); ``"log1p"``: natural log; ``"none"``: the
        values as they are, for data that are already normalised (e.g. modelled with ``likelihood="normal"``).
    chunk_size
        Cells per chunk.

    Returns
    -------
    AnnData (perturbations x genes) with the ATE in ``X``, ``obs["n_cells"]`` and ``uns["control"]``, in the
    same layout as :meth:`sams_scvi.SAMSVAE.estimate_ate`.
    """
    labels = obs_labels(adata, perturbation_key)
    if scale not in ("log2", "log1p", "none"):
        raise ValueError("`scale` must be 'log2', 'log1p' or 'none'.")
    x = _layer(adata, layer)
    positions = _as_positions(adata, indices)
    if positions is not None and len(positions) == 0:
        raise ValueError("`indices` selects no cells; pass the cells to use, or indices=None for all cells.")
    selected = np.zeros(adata.n_obs, dtype=bool)
    selected[np.arange(adata.n_obs) if positions is None else positions] = True
    present = set(labels[selected])
    if control_value not in present:
        raise ValueError(f"No cells are labelled {control_value!r}; the ATE needs control cells.")
    if perturbations is None:
        perturbations = sorted(present - {control_value})
    perturbations = unique_labels(perturbations, as_text=True)
    missing = sorted(set(perturbations) - present)
    if missing:
        raise ValueError(f"No cells are labelled {missing[:10]}.")
    groups = [control_value, *perturbations]
    group_of = pd.Series(np.arange(len(groups)), index=groups)
    codes = np.array(pd.Series(labels).map(group_of), dtype=float)
    codes[~selected] = np.nan
    sums = np.zeros((len(groups), adata.n_vars))
    counts = np.zeros(len(groups))
    for start in range(0, adata.n_obs, chunk_size):
        block_codes = codes[start : start + chunk_size]
        keep = ~np.isnan(block_codes)
        if not keep.any():
            continue
        rows = np.arange(start, min(start + chunk_size, adata.n_obs))[keep]
        y = perturbseq_scale(x[rows], log=scale)
        g = block_codes[keep].astype(int)
        np.add.at(sums, g, y)
        counts += np.bincount(g, minlength=len(groups))
    means = sums / counts[:, None]
    return AnnData(
        X=(means[1:] - means[:1]).astype(np.float32),
        obs=pd.DataFrame({"n_cells": counts[1:].astype(int)}, index=pd.Index(perturbations, name="perturbation")),
        var=pd.DataFrame(index=adata.var_names.copy()),
        uns={
            "control": control_value,
            "n_control_cells": int(counts[0]),
            "scale": "data" if scale == "none" else f"{scale}(1 + 1e4 * x / sum(x))",
        },
    )


def _as_frame(ate: AnnData | pd.DataFrame) -> pd.DataFrame:
    return ate.to_df() if isinstance(ate, AnnData) else ate


def _aligned(
    predicted: AnnData | pd.DataFrame, observed: AnnData | pd.DataFrame, perturbations: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Predicted and observed ATE matrices on shared perturbations (rows) and genes (columns).

    Rows and genes are matched by name, so a table with a repeated name raises; a repeat in ``perturbations`` is
    dropped (first occurrence kept), as it would count one perturbation twice.
    """
    pred, obs = _as_frame(predicted), _as_frame(observed)
    for table, which in ((pred, "predicted"), (obs, "observed")):
        check_unique_names(
            table.index,
            f"The {which} ATE table's perturbations (rows)",
            "each perturbation needs one row: keep one, e.g. table[~table.index.duplicated()].",
        )
        check_unique_names(
            table.columns,
            f"The {which} ATE table's genes (columns)",
            "call adata.var_names_make_unique() on the data before computing ATEs.",
        )
    rows = unique_labels(perturbations) if perturbations is not None else [p for p in obs.index if p in pred.index]
    missing = [p for p in rows if p not in pred.index or p not in obs.index]
    if missing:
        raise ValueError(f"Perturbations missing from one of the tables: {missing[:10]}")
    if not rows:
        raise ValueError("The tables share no perturbations.")
    genes = obs.columns.intersection(pred.columns)
    if len(genes) == 0:
        raise ValueError("The tables share no genes.")
    return pred.loc[rows, genes].to_numpy(dtype=float), obs.loc[rows, genes].to_numpy(dtype=float), rows


def _top_k(pred: np.ndarray, obs: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep, per perturbation (row), the ``top_k`` genes with the largest observed ``|ATE|``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer (genes kept per perturbation), not {top_k!r}.")
    if top_k > obs.shape[1]:
        raise ValueError(f"top_k={top_k} exceeds the {obs.shape[1]} shared genes.")
    top = np.argpartition(-np.abs(obs), top_k - 1, axis=1)[:, :top_k]
    return np.take_along_axis(pred, top, axis=1), np.take_along_axis(obs, top, axis=1)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _mean_defined(values: list[float]) -> float:
    """Mean of the values that are defined (a constant prediction has no Pearson r); NaN if none is."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def _r2(pred: np.ndarray, obs: np.ndarray) -> float:
    """Coefficient of determination with the observed values as truth (as sklearn's ``r2_score``)."""
    residual = ((obs - pred) ** 2).sum()
    total = ((obs - obs.mean()) ** 2).sum()
    return float(1 - residual / total) if total > 0 else float("nan")


def _slope(pred: np.ndarray, obs: np.ndarray) -> float:
    """Least-squares slope through the origin of ``pred`` on ``obs``: 1 at full size, below 1 when shrunk."""
    denominator = float((obs * obs).sum())
    return float((pred * obs).sum()) / denominator if denominator > 0 else float("nan")


def _slope_rows(pred: np.ndarray, obs: np.ndarray) -> list[float]:
    return [_slope(p, o) for p, o in zip(pred, obs, strict=True)]


def _row_pearson(pred: np.ndarray, obs: np.ndarray) -> list[float]:
    """Pearson r of each perturbation (row)."""
    return [_pearson(p, o) for p, o in zip(pred, obs, strict=True)]


def _row_r2(pred: np.ndarray, obs: np.ndarray) -> list[float]:
    """R² of each perturbation (row)."""
    return [_r2(p, o) for p, o in zip(pred, obs, strict=True)]


def ate_pearson(
    predicted: AnnData | pd.DataFrame,
    observed: AnnData | pd.DataFrame,
    top_k: int | None = None,
    perturbations: Sequence[str] | None = None,
) -> float:
    """Pearson correlation of predicted and observed ATEs, pooled over perturbations x genes (the paper's metric).

    Parameters
    ----------
    predicted, observed
        Perturbations x genes ATE tables (AnnData or DataFrame); rows and genes are matched by name.
    top_k
        Keep, for each perturbation, only the ``top_k`` genes with the largest observed ``|ATE|``.
    perturbations
        Subset of perturbations; default, those in both tables. A label listed twice counts once. Tables with
        repeated perturbations (rows) or genes (columns) raise a :class:`ValueError`.
    """
    pred, obs, _ = _aligned(predicted, observed, perturbations)
    if top_k is not None:
        pred, obs = _top_k(pred, obs, top_k)
    return _pearson(pred, obs)


def ate_metrics(
    predicted: AnnData | pd.DataFrame,
    observed: AnnData | pd.DataFrame,
    top_k: int = 20,
    perturbations: Sequence[str] | None = None,
) -> pd.Series:
    """Agreement of predicted and observed ATEs, as the paper and the wider field report it.

    Pooled over perturbations x genes (the paper's protocol) and averaged per perturbation:

    * ``pearson``, ``r2``: all genes, pooled (R² with the observed ATE as truth);
    * ``slope``: least-squares slope through the origin of predicted on observed ATE, pooled (1: full size; a
      shrunk prediction can have a high ``pearson`` and a slope well below 1);
    * ``pearson_top{k}``, ``r2_top{k}``, ``slope_top{k}``: each perturbation's ``top_k`` genes by observed
      ``|ATE|``, pooled;
    * ``pearson_per_perturbation``, ``pearson_top{k}_per_perturbation``: mean over perturbations of the
      per-perturbation Pearson r ("Pearson delta");
    * ``direction_agreement_top{k}``: fraction of top-k entries whose predicted sign matches the observed one.

    Parameters
    ----------
    predicted, observed
        Perturbations x genes ATE tables (AnnData or DataFrame); rows and genes are matched by name.
    top_k
        Genes kept per perturbation for the top-k metrics.
    perturbations
        Subset of perturbations; default, those in both tables. A label listed twice counts once. Tables with
        repeated perturbations (rows) or genes (columns) raise a :class:`ValueError`.

    Returns
    -------
    The metrics, plus ``n_perturbations``.
    """
    pred, obs, rows = _aligned(predicted, observed, perturbations)
    pred_top, obs_top = _top_k(pred, obs, top_k)
    k = top_k
    return pd.Series(
        {
            "pearson": _pearson(pred, obs),
            "r2": _r2(pred, obs),
            "slope": _slope(pred, obs),
            f"pearson_top{k}": _pearson(pred_top, obs_top),
            f"r2_top{k}": _r2(pred_top, obs_top),
            f"slope_top{k}": _slope(pred_top, obs_top),
            "pearson_per_perturbation": _mean_defined(_row_pearson(pred, obs)),
            f"pearson_top{k}_per_perturbation": _mean_defined(_row_pearson(pred_top, obs_top)),
            f"direction_agreement_top{k}": float((np.sign(pred_top) == np.sign(obs_top)).mean()),
            "n_perturbations": len(rows),
        }
    )


def ate_metrics_per_perturbation(
    predicted: AnnData | pd.DataFrame,
    observed: AnnData | pd.DataFrame,
    top_k: int = 20,
    perturbations: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The metrics of :func:`ate_metrics`, computed separately for each perturbation.

    Parameters
    ----------
    predicted, observed
        Perturbations x genes ATE tables (AnnData or DataFrame); rows and genes are matched by name.
    top_k
        Genes kept per perturbation for the top-k metrics.
    perturbations
        Subset of perturbations; default, those in both tables. A label listed twice counts once. Tables with
        repeated perturbations (rows) or genes (columns) raise a :class:`ValueError`.

    Returns
    -------
    One row per perturbation: ``pearson``, ``r2``, ``slope`` (all genes), ``pearson_top{k}``, ``r2_top{k}``,
    ``slope_top{k}``, ``direction_agreement_top{k}`` and ``observed_norm`` (the Euclidean norm of the observed ATE, to sort
    perturbations by effect size).
    """
    pred, obs, rows = _aligned(predicted, observed, perturbations)
    pred_top, obs_top = _top_k(pred, obs, top_k)
    k = top_k
    table = pd.DataFrame(
        {
            "pearson": _row_pearson(pred, obs),
            "r2": _row_r2(pred, obs),
            "slope": _slope_rows(pred, obs),
            f"pearson_top{k}": _row_pearson(pred_top, obs_top),
            f"r2_top{k}": _row_r2(pred_top, obs_top),
            f"slope_top{k}": _slope_rows(pred_top, obs_top),
            f"direction_agreement_top{k}": (np.sign(pred_top) == np.sign(obs_top)).mean(axis=1),
            "observed_norm": np.linalg.norm(obs, axis=1),
        },
        index=pd.Index(rows, name="perturbation"),
    )
    return table
