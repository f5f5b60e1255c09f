"""Where a perturbation's effect goes: latent mechanism vs basal state, and expression magnitude stage by stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import anndata
import numpy as np
import pandas as pd
from anndata import AnnData

from sams_scvi._utils import _as_positions, _check_seed
from sams_scvi.metrics._ate import _slope, _slope_rows, observed_ate
from sams_scvi.metrics._utils import check_unique_names, unique_labels

STAGES = ("fitted", "counterfactual", "ate_control", "ate")


def effect_decomposition(
    model,
    indices: Sequence[int] | Sequence[bool] | Sequence[str] | None = None,
    perturbations: Sequence[str] | None = None,
    min_cells: int = 10,
    top_k: int = 20,
    n_ate_samples: int = 1000,
    library_size: float | Literal["median"] = "median",
    seed: int = 0,
) -> pd.DataFrame:
    r"""Follow each perturbation's effect from the latent space to the predicted ATE, to find where it shrinks.

    **Latent space.** With :math:`\bar z^b_P` the mean posterior basal state of the perturbation's cells,
    :math:`\bar z^b_C` that of the control cells (globals at their point estimate) and :math:`s_t` the label's
    point latent shift :math:`d_t (M \odot E)`, the perturbed cells sit at
    :math:`\Delta = (\bar z^b_P - \bar z^b_C) + s_t` relative to the controls. ``basal_norm`` is
    :math:`\lVert \bar z^b_P - \bar z^b_C \rVert` (the part absorbed by the cells' basal states), ``mechanism_norm``
    is :math:`\lVert s_t \rVert`, and ``mechanism_fraction`` :math:`= s_t \cdot \Delta / \lVert\Delta\rVert^2` (1: the
    global mechanism carries the whole shift; 0: the basal states do).

    **Expression space.** Each stage is an ATE on the paper's scale :math:`\log_2(1 + 10^4 x / \sum x)` (on the
    data's own scale for ``likelihood="normal"``), compared
    with the ATE observed on the same cells by the least-squares slope through the origin,
    :math:`\sum_g p_g o_g / \sum_g o_g^2` (1: full size; below 1: shrunk), over all genes (``slope_<stage>``) and
    over the perturbation's ``top_k`` genes by observed :math:`|\mathrm{ATE}|` (``slope_top<k>_<stage>``):

    * ``fitted``: the model's reconstruction of the cells, each decoded from its own posterior (basal state plus
      its own shift) and sampled at its observed library; a slope below 1 here is lost by the likelihood fit
      (encoder, decoder, dispersion);
    * ``counterfactual``: the control cells' posterior basal states shifted by the label's sampled latent shift,
      sampled at their observed libraries; a drop from ``fitted`` is the part the mechanism does not carry
      (these two stages draw the globals from their posterior, one draw per cell, as
      :meth:`predict_perturbation` does);
    * ``ate_control``: :meth:`estimate_ate` with ``basal="control"`` at ``library_size`` (its basal states come
      from all registered control cells);
    * ``ate``: :meth:`estimate_ate` with the paper's prior basal states at ``library_size``; a drop from
      ``ate_control`` is the estimator's (prior draws instead of the control cells' states).

    For a model with ``penetrance=True`` every stage draws each cell's response :math:`u \sim \mathrm{Bern}(\pi_t)`
    afresh (the basal state comes from the response pattern drawn from :math:`q(u \mid x)`), so ``fitted`` is
    then the cells' basal states re-perturbed, not their own responses.

    Parameters
    ----------
    model
        A trained :class:`~sams_scvi.SAMSVAE` (or comparison model with a latent shift).
    indices
        Cells of the model's AnnData whose observed effects are the reference, e.g. held-out test cells: positions,
        a boolean mask or obs names (unique ``obs_names``); a cell listed twice counts once. Default: all cells.
    perturbations
        Labels to report; default, every non-control label with at least ``min_cells`` cells among ``indices``.
        A label listed twice is reported once.
    min_cells
        Fewest cells of a label among ``indices`` for the default ``perturbations``.
    top_k
        Genes per perturbation for the ``slope_top<k>_*`` columns.
    n_ate_samples
        Monte-Carlo samples of the two ``estimate_ate`` stages.
    library_size
        Library of the ``estimate_ate`` stages (``"median"``: the data's median, on the data's footing).
    seed
        Seed of every sampling step (a non-negative integer).

    Returns
    -------
    One row per perturbation: ``n_cells``, ``observed_norm`` (Euclidean norm of the observed ATE), the latent
    columns and the slopes. ``DataFrame.attrs["pooled"]`` holds the slopes pooled over all perturbations.
    """
    if model.adata is None:
        raise ValueError("The model has no registered AnnData; load it with the data to decompose its effects.")
    if not model.module.mechanism.has_shift:
        raise ValueError(f"{model._display_name} has no latent shift to decompose.")
    _check_seed(seed)
    adata = model.adata
    # every stage's table is matched to the observed one by gene name
    check_unique_names(
        adata.var_names, "The model's genes", "call adata.var_names_make_unique() before setup_anndata and train again."
    )
    setup = model.registry_["setup_args"]
    key, control = setup["perturbation_key"], setup.get("control_value", "control")
    indices = _as_positions(adata, indices)
    indices = np.arange(adata.n_obs) if indices is None else np.unique(indices)  # sorted, each cell once
    labels = adata.obs[key].astype(str).str.strip().to_numpy()[indices]
    if perturbations is None:
        counts = pd.Series(labels).value_counts()
        perturbations = sorted(p for p, n in counts.items() if p != control and n >= min_cells)
    perturbations = unique_labels(perturbations, as_text=True)
    if not perturbations:
        raise ValueError(f"No perturbation has at least {min_cells} cells among `indices`.")
    controls = indices[labels == control]
    if len(controls) == 0:
        raise ValueError("`indices` holds no control cells.")

    scale = "log2" if model.module.px_class.has_counts else "none"  # the scale of the model's estimate_ate
    layer = setup.get("layer") or setup.get("rna_layer")
    observed = observed_ate(adata, key, control, perturbations, indices=indices, layer=layer, scale=scale).to_df()
    latent = _latent_split(model, indices, labels, control, perturbations)

    # fitted: every cell decoded from its own posterior; counterfactual: controls shifted by each perturbation
    own = [
        model.predict_perturbation([label], indices=cells, expression="counts", seed=seed + i, progress_bar=False)
        for i, (label, cells) in enumerate([(control, controls)] + [(p, indices[labels == p]) for p in perturbations])
    ]
    fitted = observed_ate(_concat(own), key, control, perturbations, scale=scale).to_df()
    shifted = model.predict_perturbation(
        [control, *perturbations], indices=controls, expression="counts", seed=seed, progress_bar=False
    )
    counterfactual = observed_ate(shifted, key, control, perturbations, scale=scale).to_df()
    predicted = {
        "fitted": fitted,
        "counterfactual": counterfactual,
        **{
            stage: model.estimate_ate(
                perturbations,
                n_samples=n_ate_samples,
                library_size=library_size,
                basal=basal,
                seed=seed,
                progress_bar=False,
            ).to_df()
            for stage, basal in (("ate_control", "control"), ("ate", "prior"))
        },
    }

    obs = observed.to_numpy(dtype=float)
    top_k = min(top_k, obs.shape[1])
    top = np.argpartition(-np.abs(obs), top_k - 1, axis=1)[:, :top_k]
    table = latent.assign(
        n_cells=[int((labels == p).sum()) for p in perturbations], observed_norm=np.linalg.norm(obs, axis=1)
    )
    pooled = {}
    for stage in STAGES:
        pred = predicted[stage].loc[perturbations, observed.columns].to_numpy(dtype=float)
        pred_top, obs_top = np.take_along_axis(pred, top, 1), np.take_along_axis(obs, top, 1)
        table[f"slope_{stage}"] = _slope_rows(pred, obs)
        table[f"slope_top{top_k}_{stage}"] = _slope_rows(pred_top, obs_top)
        pooled[f"slope_{stage}"] = _slope(pred, obs)
        pooled[f"slope_top{top_k}_{stage}"] = _slope(pred_top, obs_top)
    columns = ["n_cells", "observed_norm", "mechanism_norm", "basal_norm", "mechanism_fraction", "n_active_dims"]
    table = table[columns + [c for c in table.columns if c.startswith("slope")]]
    table.attrs["pooled"] = pd.Series(pooled)
    return table


def _latent_split(model, indices, labels, control: str, perturbations: list[str]) -> pd.DataFrame:
    """Mechanism shift and mean basal displacement of each label's cells (point globals)."""
    basal = model.get_latent(indices=indices, representation="basal")
    control_mean = basal[labels == control].mean(0)
    design = model._design_for(perturbations).cpu().numpy()  # (P, T)
    shifts = model.get_perturbation_embeddings().to_numpy()  # (T, K), point estimate
    label_shift = design @ shifts
    active = (design != 0).astype(float) @ (np.abs(shifts) > 0).astype(float)
    rows = []
    for p, shift, n_active in zip(perturbations, label_shift, active, strict=True):
        absorbed = basal[labels == p].mean(0) - control_mean
        total = absorbed + shift
        denominator = float(total @ total)
        rows.append(
            {
                "mechanism_norm": float(np.linalg.norm(shift)),
                "basal_norm": float(np.linalg.norm(absorbed)),
                "mechanism_fraction": float(shift @ total) / denominator if denominator > 0 else np.nan,
                "n_active_dims": int((n_active > 0).sum()),
            }
        )
    return pd.DataFrame(rows, index=pd.Index(perturbations, name="perturbation"))


def _concat(parts: list[AnnData]) -> AnnData:
    return anndata.concat(parts, index_unique=None, merge="first")
