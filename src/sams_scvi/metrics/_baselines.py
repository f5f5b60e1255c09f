"""Data-derived baselines with the same output as :meth:`sams_scvi.SAMSVAE.estimate_ate`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from sams_scvi._utils import _layer
from sams_scvi.metrics._ate import observed_ate
from sams_scvi.metrics._splits import _atoms
from sams_scvi.metrics._utils import obs_labels, unique_labels


def baseline_ate(
    adata: AnnData,
    kind: Literal["control", "additive", "mean_perturbed"],
    perturbations: Sequence[str],
    perturbation_key: str = "perturbation",
    control_value: str = "control",
    delimiter: str = "+",
    indices: Sequence[int] | None = None,
    layer: str | None = None,
    scale: Literal["log2", "log1p", "none"] = "log2",
) -> AnnData:
    """ATEs predicted by a simple baseline fitted on the cells ``indices`` (e.g. the training split).

    * ``"control"``: no effect (every ATE is 0);
    * ``"additive"``: the sum of the observed ATEs of the label's single perturbations, ΔA + ΔB for ``"A+B"``;
    * ``"mean_perturbed"``: the same ATE for every label, that of all perturbed cells pooled.

    Parameters
    ----------
    adata
        Raw counts with labels in ``obs[perturbation_key]``.
    kind
        The baseline.
    perturbations
        Labels to predict (e.g. held-out combinations); a label listed twice is predicted once.
    perturbation_key, control_value, delimiter
        How labels are written.
    indices
        Cells the baseline may use (positions, a boolean mask or obs names); default, all.
    layer, scale
        As in :func:`~sams_scvi.metrics.observed_ate`.

    Returns
    -------
    AnnData (perturbations x genes) like :meth:`sams_scvi.SAMSVAE.estimate_ate`.
    """
    perturbations = unique_labels(perturbations, as_text=True)
    if not perturbations:
        raise ValueError("`perturbations` is empty.")
    if kind == "control":
        values = np.zeros((len(perturbations), adata.n_vars), dtype=np.float32)
    elif kind == "additive":
        needed = sorted({a for p in perturbations for a in _atoms(p, control_value, delimiter)})
        singles = observed_ate(
            adata, perturbation_key, control_value, perturbations=needed, layer=layer, indices=indices, scale=scale
        ).to_df()
        values = np.stack(
            [singles.loc[_atoms(p, control_value, delimiter)].sum(0).to_numpy() for p in perturbations]
        ).astype(np.float32)
    elif kind == "mean_perturbed":
        labels = obs_labels(adata, perturbation_key)
        pooled = AnnData(
            X=_layer(adata, layer),
            obs=pd.DataFrame(
                {"group": np.where(labels == control_value, control_value, "perturbed")}, index=adata.obs_names
            ),
            var=pd.DataFrame(index=adata.var_names),
        )
        effect = observed_ate(
            pooled, "group", control_value, perturbations=["perturbed"], indices=indices, scale=scale
        ).X[0]
        values = np.tile(effect, (len(perturbations), 1)).astype(np.float32)
    else:
        raise ValueError("`kind` must be 'control', 'additive' or 'mean_perturbed'.")
    return AnnData(
        X=values,
        obs=pd.DataFrame(index=pd.Index(perturbations, name="perturbation")),
        var=pd.DataFrame(index=adata.var_names.copy()),
        uns={
            "control": control_value,
            "baseline": kind,
            "scale": "data" if scale == "none" else f"{scale}(1 + 1e4 * x / sum(x))",
        },
    )
