"""Predicted versus observed average treatment effects."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from sams_scvi.metrics._ate import _aligned, _pearson

from ._utils import finish, new_axes


def ate_scatter(
    predicted: AnnData | pd.DataFrame,
    observed: AnnData | pd.DataFrame | Mapping[str, AnnData | pd.DataFrame],
    ax=None,
    title: str | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Scatter of predicted against observed ATEs (one point per perturbation x gene), with Pearson r.

    Parameters
    ----------
    predicted, observed
        Perturbations x genes ATE tables, e.g. from :meth:`sams_scvi.SAMSVAE.estimate_ate` and
        :func:`sams_scvi.metrics.observed_ate`. ``observed`` may map subset names to tables (e.g. the ATE
        observed on training and on test cells, or on singles and on combinations): one colour and r per subset.
    ax
        Matplotlib axes to draw into; a new figure if ``None``.
    title
        Axes title.
    show
        Call ``plt.show()``; default, only when a new figure was made in an interactive session.
    save
        Path to write the figure to (the suffix picks the format).
    return_fig
        Return the figure instead of the axes.

    Returns
    -------
    The matplotlib axes; the figure with ``return_fig``; nothing when the plot was shown (as scanpy).
    """
    subsets = dict(observed) if isinstance(observed, Mapping) else {None: observed}
    fig, ax, made_here = new_axes(ax, (4.5, 4.5))
    lim, n_rows, n_genes = 0.0, 0, 0
    for name, table in subsets.items():
        pred, obs, rows = _aligned(predicted, table, perturbations=None)
        x, y = obs.ravel(), pred.ravel()
        label = None if name is None else f"{name}: r = {_pearson(x, y):.2f}"
        ax.scatter(x, y, s=6, alpha=0.5, linewidths=0, label=label)
        lim = max(lim, float(np.nanmax(np.abs(np.concatenate([x, y])))) * 1.05)
        n_rows, n_genes = n_rows + len(rows), obs.shape[1]
    lim = lim or 1.0
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("observed ATE (log2 scale)")
    ax.set_ylabel("predicted ATE (log2 scale)")
    if None in subsets:
        title = title or f"{n_rows} perturbations x {n_genes} genes, r = {_pearson(x, y):.2f}"
    else:
        ax.legend(frameon=False, fontsize=8)
    ax.set_title(title or "")
    return finish(fig, ax, made_here, show, save, return_fig)
