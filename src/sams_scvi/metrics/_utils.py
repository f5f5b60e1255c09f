"""Look-ups in the user's AnnData shared by the metrics, with errors that name the fix."""

from __future__ import annotations

import numpy as np
from anndata import AnnData


def obs_labels(adata: AnnData, key: str, name: str = "perturbation_key") -> np.ndarray:
    """The labels of ``adata.obs[key]`` as stripped text, with an error that lists the columns if it is absent."""
    if key not in adata.obs:
        columns = [c for c in adata.obs.columns if not str(c).startswith("_scvi_")]  # not scvi-tools' own
        raise KeyError(f"{key!r} is not a column of adata.obs; available columns: {columns}. Pass {name}=<column>.")
    return adata.obs[key].astype(str).str.strip().to_numpy()
