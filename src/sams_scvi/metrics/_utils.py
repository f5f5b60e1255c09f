"""Look-ups in the user's AnnData and argument checks shared by the metrics, with errors that name the fix."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData


def obs_labels(adata: AnnData, key: str, name: str = "perturbation_key") -> np.ndarray:
    """The labels of ``adata.obs[key]`` as stripped text, with an error that lists the columns if it is absent."""
    if key not in adata.obs:
        columns = [c for c in adata.obs.columns if not str(c).startswith("_scvi_")]  # not scvi-tools' own
        raise KeyError(f"{key!r} is not a column of adata.obs; available columns: {columns}. Pass {name}=<column>.")
    return adata.obs[key].astype(str).str.strip().to_numpy()


def unique_labels(perturbations: Iterable, name: str = "perturbations", as_text: bool = False) -> list:
    """The labels (as text, with ``as_text``), each once, in their first order: a repeat would count twice."""
    if isinstance(perturbations, str):
        raise TypeError(f"`{name}` must be a list of labels, not the text {perturbations!r}; pass [{perturbations!r}].")
    return list(dict.fromkeys(str(p) for p in perturbations) if as_text else dict.fromkeys(perturbations))


def check_unique_names(names: Sequence, what: str, fix: str) -> None:
    """Raise a :class:`ValueError` naming the repeats when ``names`` (table rows or columns) are not unique."""
    names = pd.Index(names)
    if names.is_unique:
        return
    repeated = names[names.duplicated()].unique()
    raise ValueError(f"{what} has repeated names {list(repeated[:5])}; {fix}")
