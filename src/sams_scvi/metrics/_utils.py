"""Look-ups in the user's AnnData and argument checks shared by the metrics, with errors that name the fix."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData


def rna_counts(data, setup: dict, perturbation_key: str, layer: str | None) -> tuple[AnnData, str | None]:
    """The AnnData of the counts a model reads, with the perturbation labels in its ``obs``, and its layer.

    An AnnData is returned as it is. For a MuData: its RNA modality (as set up with ``setup_mudata``, or the
    modality named ``"rna"``) with the labels from ``mdata.obs`` (or from their modality), aligned by cell.
    """
    from mudata import MuData

    if not isinstance(data, MuData):
        return data, layer
    modalities = dict(setup.get("modalities") or {})
    rna_name = modalities.get("rna_layer") or ("rna" if "rna" in data.mod else None)
    if rna_name is None or rna_name not in data.mod:
        raise ValueError(
            f"Which modality of the MuData holds the RNA counts? Its modalities are {list(data.mod)}; pass "
            "mdata.mod[<name>] (with the perturbation labels in its obs), or name one 'rna'."
        )
    rna = data.mod[rna_name]
    if rna.n_obs != data.n_obs or not rna.obs_names.equals(data.obs_names):
        raise ValueError(
            f"The RNA modality {rna_name!r} does not hold the MuData's cells in its order; pass mdata.mod[{rna_name!r}] "
            "with the perturbation labels in its obs instead."
        )
    label_source = data.mod[modalities["perturbation_key"]] if modalities.get("perturbation_key") else data
    if perturbation_key not in label_source.obs:
        label_source = rna
    obs = pd.DataFrame({perturbation_key: obs_labels(label_source, perturbation_key)}, index=data.obs_names.copy())
    layer = setup.get("rna_layer", layer)
    counts = rna.X if layer is None else rna.layers[layer]
    return AnnData(X=counts, obs=obs, var=pd.DataFrame(index=rna.var_names.copy())), None


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
