"""Plots of the learned mechanisms, of ATEs with their intervals, of a combination screen and of training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from sams_scvi._utils import _as_positions
from sams_scvi.model import tail_epochs, training_convergence

from ._utils import finish, new_axes


def mechanism_heatmap(
    mechanisms: AnnData,
    layer: str | None = None,
    ax=None,
    cmap: str = "RdBu_r",
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Heatmap of each perturbation's latent shift (or mask probability), perturbations grouped by module.

    Parameters
    ----------
    mechanisms
        Output of :meth:`~sams_scvi.SAMSVAE.get_mechanisms`.
    layer
        ``None``: the effective shifts (``X``); ``"mask_probability"`` or ``"point_shift"``.
    ax, show, save, return_fig
        As in scanpy: axes to draw into, show the figure, path to save it to, return the figure.
    """
    if "module" not in mechanisms.obs:
        raise ValueError(
            "`mechanisms` has no obs['module']; pass the output of model.get_mechanisms(), not an ATE table."
        )
    if layer is not None and layer not in mechanisms.layers:
        raise KeyError(
            f"Layer {layer!r} is not in the mechanisms (layers: {list(mechanisms.layers.keys())}); pass one of "
            "them, or layer=None for the latent shifts."
        )
    values = mechanisms.X if layer is None else mechanisms.layers[layer]
    values = np.asarray(values, dtype=float)
    order = np.argsort(mechanisms.obs["module"].cat.codes.to_numpy(), kind="stable")
    fig, ax, made_here = new_axes(ax, (0.35 * mechanisms.n_vars + 2.5, 0.25 * mechanisms.n_obs + 1.5))
    if layer == "mask_probability":
        image = ax.imshow(values[order], aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    else:
        limit = float(np.abs(values).max()) or 1.0
        image = ax.imshow(values[order], aspect="auto", cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_yticks(range(mechanisms.n_obs), mechanisms.obs_names[order], fontsize=7)
    ax.set_xticks(range(mechanisms.n_vars), [name.replace("latent_", "") for name in mechanisms.var_names], fontsize=7)
    ax.set_xlabel("latent dimension")
    modules = mechanisms.obs["module"].to_numpy()[order]
    for boundary in np.flatnonzero(modules[1:] != modules[:-1]):
        ax.axhline(boundary + 0.5, color="black", lw=0.8)
    fig.colorbar(image, ax=ax, label="mask probability" if layer == "mask_probability" else "latent shift")
    return finish(fig, ax, made_here, show, save, return_fig)


def ate_intervals(
    ate: AnnData,
    genes: Sequence[str],
    perturbations: Sequence[str] | None = None,
    observed: AnnData | pd.DataFrame | None = None,
    n_perturbations: int = 8,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Predicted ATEs of a few genes with their intervals, per perturbation (and the observed ATE if given).

    Parameters
    ----------
    ate
        Output of :meth:`~sams_scvi.SAMSVAE.estimate_ate` or :func:`~sams_scvi.ensemble_ate` (layers
        ``ci_lower`` and ``ci_upper``).
    genes
        Genes to show, one group of points each.
    perturbations
        Perturbations to show; default, the ``n_perturbations`` rows of ``ate`` with the largest predicted
        effect on ``genes``.
    observed
        Observed ATEs (e.g. :func:`sams_scvi.metrics.observed_ate`), drawn as crosses.
    n_perturbations
        How many perturbations to show when ``perturbations`` is not given.
    ax, show, save, return_fig
        As in scanpy.
    """
    genes = [genes] if isinstance(genes, str) else list(genes)
    missing = [g for g in genes if g not in ate.var_names]
    if missing:
        raise ValueError(f"Genes {missing} are not in the ATE table.")
    if "ci_lower" not in ate.layers:
        raise ValueError("`ate` has no intervals; pass the output of estimate_ate or ensemble_ate.")
    if perturbations is None:  # the largest effects on these genes: a legend of 100 labels shows nothing
        size = np.abs(np.asarray(ate[:, genes].X)).max(axis=1)
        perturbations = list(ate.obs_names[np.argsort(-size, kind="stable")[:n_perturbations]])
    perturbations = list(perturbations)
    unknown = [p for p in perturbations if p not in ate.obs_names]
    if unknown:
        raise KeyError(f"perturbations not in the ATE table: {unknown[:10]}; its rows are {list(ate.obs_names[:10])}.")
    from matplotlib.lines import Line2D

    observed_table = observed.to_df() if isinstance(observed, AnnData) else observed
    fig, ax, made_here = new_axes(ax, (min(3.0 + 0.25 * len(genes) * len(perturbations), 10.0), 3.5))
    width = 0.8 / max(len(perturbations), 1)
    for j, perturbation in enumerate(perturbations):
        row = ate.obs_names.get_loc(perturbation)
        columns = [ate.var_names.get_loc(g) for g in genes]
        x = np.arange(len(genes)) - 0.4 + width * (j + 0.5)
        centre = ate.X[row, columns]
        lower, upper = ate.layers["ci_lower"][row, columns], ate.layers["ci_upper"][row, columns]
        points = ax.errorbar(
            x, centre, yerr=[centre - lower, upper - centre], fmt="o", ms=4, capsize=2, label=perturbation
        )
        if observed_table is not None and perturbation in observed_table.index:
            ax.plot(x, observed_table.loc[perturbation, genes].to_numpy(), "x", color=points[0].get_color(), ms=6)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(genes)), genes, rotation=45 if len(genes) > 4 else 0)
    ax.set_xlabel("gene")
    level = ate.uns.get("credible_level")
    interval = f"{int(round(100 * level))} % interval" if level else "interval"
    scale = ate.uns.get("scale")
    ax.set_ylabel("ATE" + (f" ({scale})" if isinstance(scale, str) else ""))
    handles, names = ax.get_legend_handles_labels()
    marks = [Line2D([], [], color="black", marker="o", ls="", ms=4), Line2D([], [], color="black", marker="x", ls="")]
    handles += marks if observed_table is not None else marks[:1]
    names += [f"predicted ({interval})", "observed"][: 2 if observed_table is not None else 1]
    ax.legend(handles, names, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return finish(fig, ax, made_here, show, save, return_fig)


def screen_volcano(
    screen: AnnData,
    n_labels: int = 10,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Volcano-style view of a combination screen: each pair's non-additivity (size) against its evidence.

    x: the root mean square over genes of the pair's predicted non-additivity, ATE(A+B) - ATE(A) - ATE(B); y: the
    number of genes whose non-additivity interval excludes 0; colour: the size of the pair's predicted effect.
    Pairs up and to the right interact most, and most credibly.

    Parameters
    ----------
    screen
        Output of :meth:`~sams_scvi.SAMSVAE.screen_combinations`.
    n_labels
        Label the pairs ranked first.
    ax, show, save, return_fig
        As in scanpy.
    """
    obs = screen.obs
    needed = {"effect_norm", "non_additivity_norm", "n_credible_non_additive"}
    if not needed <= set(obs.columns):
        raise ValueError(
            f"`screen` lacks obs columns {sorted(needed - set(obs.columns))}; pass the output of "
            "model.screen_combinations()."
        )
    fig, ax, made_here = new_axes(ax, (5.5, 4.0))
    x, y = obs["non_additivity_norm"].to_numpy(float), obs["n_credible_non_additive"].to_numpy(float)
    points = ax.scatter(x, y, c=obs["effect_norm"], cmap="viridis", s=18)
    middle = (np.nanmin(x) + np.nanmax(x)) / 2 if len(x) else 0.0
    for position, label in enumerate(obs.index[:n_labels]):
        right_half = x[position] > middle  # labelled towards the centre, so no label runs off the axes
        ax.annotate(
            label,
            (x[position], y[position]),
            fontsize=7,
            xytext=(-3 if right_half else 3, 3),
            textcoords="offset points",
            ha="right" if right_half else "left",
        )
    ax.margins(x=0.08, y=0.12)
    ax.set_xlabel("non-additivity (root mean square over genes, log2)")
    ax.set_ylabel("genes with credible non-additivity")
    fig.colorbar(points, ax=ax, label="predicted effect (root mean square)", pad=0.02)
    return finish(fig, ax, made_here, show, save, return_fig)


def training_history(
    model,
    keys: Sequence[str] = ("elbo_train", "elbo_validation"),
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Curves of a trained model's ``history`` with its convergence (default: the training and validation loss).

    ``elbo_*`` entries are scvi-tools' names for the loss, the negative ELBO per cell: lower is better. The last
    quarter of the run, over which :meth:`~sams_scvi.SAMSVAE.convergence` judges whether training has settled, is
    shaded, and the title says what has not settled. A jump part way through the default recipe is the alignment
    of the latent axes (the masks restart in the new basis).

    Parameters
    ----------
    model
        A trained model.
    keys
        Entries of ``model.history`` to draw; missing ones are skipped.
    ax, show, save, return_fig
        As in scanpy.
    """
    history = getattr(model, "history", None) or {}
    present = [key for key in keys if key in history and len(history[key])]
    if not present:
        raise ValueError(f"The model's history has none of {list(keys)}; it has {sorted(history)}.")
    fig, ax, made_here = new_axes(ax, (5.0, 3.5))
    for key in present:
        series = history[key].iloc[:, 0]
        label = f"{key.replace('elbo_', '')} loss (negative ELBO)" if key.startswith("elbo_") else key
        ax.plot(series.index.to_numpy(), series.to_numpy(), label=label, marker="." if len(series) < 30 else None)
    report = training_convergence(history)
    if "elbo_train" in history and len(history["elbo_train"]) >= 2:
        epochs = history["elbo_train"].index.to_numpy()
        window = epochs[-tail_epochs(len(epochs)) :]
        ax.axvspan(window[0], window[-1], color="0.9", zorder=0, label="assessed for convergence")
    unsettled = report.loc[report["settled"].eq(False), "quantity"].tolist()
    if len(report) and report["settled"].notna().all():
        ax.set_title("not settled: " + ", ".join(unsettled) if unsettled else "settled", fontsize="medium")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per cell (nats)" if any(key.startswith("elbo_") for key in present) else "value")
    ax.legend(frameon=False)
    return finish(fig, ax, made_here, show, save, return_fig)


def latent_umap(
    model,
    adata: AnnData | None = None,
    indices: Sequence[int] | None = None,
    representation: str = "basal",
    color: str | Sequence[str] | None = None,
    n_neighbors: int = 15,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
    **kwargs,
):
    """UMAP of the cells' latent states (:meth:`~sams_scvi.SAMSVAE.get_latent`), coloured by perturbation.

    Computed with scanpy on a copy of the cells' ``obs`` (the user's AnnData is not changed) and drawn with
    :func:`scanpy.pl.umap`.

    Parameters
    ----------
    model
        A trained model.
    adata, indices
        Cells (default: the registered ones).
    representation
        ``"basal"`` (the state without the perturbation: perturbations should mix) or ``"perturbed"``.
    color
        ``obs`` columns to colour by; default, the perturbation label.
    n_neighbors
        Neighbours of the kNN graph.
    ax, show, save, return_fig
        As in scanpy.
    **kwargs
        Passed to :func:`scanpy.pl.umap`.
    """
    import scanpy as sc

    adata = model.adata if adata is None else adata
    positions = np.arange(adata.n_obs) if indices is None else _as_positions(adata, indices)
    latent = model.get_latent(adata, indices=positions, representation=representation)
    cells = AnnData(obs=adata.obs.iloc[positions].copy(), obsm={"X_latent": latent})
    sc.pp.neighbors(cells, use_rep="X_latent", n_neighbors=n_neighbors)
    sc.tl.umap(cells)
    fig, ax, made_here = new_axes(ax, (5.0, 4.5))
    color = model.registry_["setup_args"]["perturbation_key"] if color is None else color
    sc.pl.umap(cells, color=color, ax=ax, show=False, **kwargs)
    return finish(fig, ax, made_here, show, save, return_fig)
