"""Argument checks and helpers shared across the package (models, metrics, tools, plots, command line)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from sams_scvi._constants import SAMS_REGISTRY_KEYS


def _latent_names(n: int) -> pd.Index:
    return pd.Index([f"latent_{k}" for k in range(n)], name="latent")


def _layer(adata, layer: str | None):
    """``adata.layers[layer]`` (``adata.X`` for ``None``), with an error that lists the layers there are."""
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} is not in adata.layers (layers: {list(adata.layers.keys())}); pass the layer that "
            "holds the raw counts, or layer=None for adata.X."
        )
    return adata.layers[layer]


def _stored_values(x, chunk_rows: int = 10_000):
    """The stored values of a matrix, in row chunks: numpy, scipy sparse, or backed (h5py/anndata) on disk."""
    if sparse.issparse(x):
        yield x.data
    elif isinstance(x, np.ndarray) or not hasattr(x, "shape"):
        yield np.asarray(x)
    else:  # backed AnnData: read a block of rows at a time instead of the whole matrix
        for start in range(0, x.shape[0], chunk_rows):
            block = x[start : start + chunk_rows]
            yield block.data if sparse.issparse(block) else np.asarray(block)


def _check_obs_keys(adata, **keys: str | list[str] | None) -> None:
    """Raise a clear error when a key argument (``batch_key=...``) names no column of ``adata.obs``."""
    columns = [c for c in adata.obs.columns if not str(c).startswith("_scvi_")]  # not scvi-tools' own
    for argument, value in keys.items():
        for key in [value] if isinstance(value, str) else (value or []):
            if key not in adata.obs:
                raise KeyError(f"{argument}={key!r} is not a column of adata.obs; available columns: {columns}.")
            missing = int(adata.obs[key].isna().sum())
            if missing:  # scvi-tools' categorical check fails on them with a message that does not say so
                raise ValueError(
                    f"{argument}={key!r}: {missing} cells have no value (NaN) in adata.obs[{key!r}]. Give them one "
                    f"(e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).replace('nan', 'unknown')) or drop "
                    "those cells before setup."
                )


def _check_finite(x) -> None:
    """Raise on NaN or infinite values."""
    for values in _stored_values(x):
        if values.size and not np.all(np.isfinite(values)):
            raise ValueError("The expression matrix has NaN or infinite values.")


def _check_counts(x) -> None:
    """Raise on negative values and warn on non-integers: the negative binomial models raw counts."""
    integers = True
    for values in _stored_values(x):
        if values.size == 0:
            continue
        if np.min(values) < 0:
            raise ValueError(
                "The count matrix has negative values; the negative binomial likelihood models raw UMI counts. For "
                "normalised or scaled data, create the model with likelihood='normal'."
            )
        sample = values.ravel()[:: max(1, values.size // 100_000)]  # scvi-tools checks a sample too
        integers = integers and bool(np.all(sample == np.round(sample)))
    if not integers:
        warnings.warn(
            "The data are not integers, as unnormalized count data would be; the negative binomial likelihood "
            "models raw UMI counts. For normalised data, create the model with likelihood='normal'.",
            UserWarning,
            stacklevel=4,
        )


def _warn_duplicate_genes(adata) -> None:
    """Warn when gene names repeat: ATE tables and predictions are indexed by them."""
    names = pd.Index(adata.var_names)
    if names.is_unique:
        return
    repeated = names[names.duplicated()].unique()
    warnings.warn(
        f"{len(repeated)} gene names occur more than once (e.g. {list(repeated[:5])}), so the genes of ATE tables and "
        "predictions cannot all be told apart by name. Call adata.var_names_make_unique() before setup_anndata.",
        UserWarning,
        stacklevel=3,  # the user's setup_anndata call
    )


def _check_gene_names(genes: pd.Index, adata, registry: dict) -> None:
    """Raise a clear error when ``adata`` does not hold the model's genes in the same order."""
    mod_key = registry["field_registries"][SAMS_REGISTRY_KEYS.X_KEY]["data_registry"].get("mod_key")
    target = adata.mod[mod_key] if mod_key is not None else adata
    var_names = pd.Index(target.var_names)
    if var_names.equals(genes):
        return
    fix = "Subset and order the data to the training genes: adata[:, training_genes], in the training order."
    missing = genes.difference(var_names)
    if len(missing) == 0 and len(var_names) == len(genes):
        raise ValueError(f"The data has the model's {len(genes)} genes, but in another order. {fix}")
    raise ValueError(
        f"The data has {len(var_names)} genes but the model was trained on {len(genes)}"
        + (f"; {len(missing)} model genes are missing (e.g. {list(missing[:5])})" if len(missing) else "")
        + f". {fix}"
    )


class _seeded:
    """Context manager: reseed torch (and numpy) inside, restore the caller's random state afterwards."""

    def __init__(self, seed: int | None, device: torch.device | str) -> None:
        _check_seed(seed, allow_none=True)
        self.seed = None if seed is None else int(seed)
        self.devices = [device] if torch.device(device).type == "cuda" else []

    def __enter__(self):
        if self.seed is None:
            return self
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        self._np_state = np.random.get_state()
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        return self

    def __exit__(self, *exc):
        if self.seed is None:
            return False
        np.random.set_state(self._np_state)
        return self._fork.__exit__(*exc)


@contextlib.contextmanager
def _scvi_seed(seed: int) -> Iterator[None]:
    """``scvi.settings.seed = seed`` inside the block; afterwards the caller's session is as it was.

    Setting scvi-tools' seed reseeds torch, numpy and Python, switches cuDNN to deterministic kernels and extends
    ``XLA_FLAGS``; all of it, and the seed value itself, is restored on exit (without reseeding).
    """
    import random

    import scvi

    previous_seed = scvi.settings.seed
    environment = {name: os.environ.get(name) for name in ("XLA_FLAGS", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []):
        scvi.settings.seed = int(seed)
        try:
            yield
        finally:
            scvi.settings._seed = previous_seed  # the value only: the setter would reseed everything again
            for name, value in environment.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def _as_positions(adata, indices, name: str = "indices", allow_empty: bool = False) -> np.ndarray | None:
    """Cell positions from integer positions, a boolean mask or obs names, as scanpy accepts them.

    ``None`` stays ``None`` (all cells). Negative positions count from the end, as in numpy. A boolean
    :class:`pandas.Series` indexed by obs names is aligned to ``adata`` by name. A selection of no cells is refused
    (every caller would otherwise fail later inside torch or pandas) unless ``allow_empty``.
    """
    if indices is None:
        return None
    if isinstance(indices, str):
        raise TypeError(f"`{name}` must be a list of cells, not the text {indices!r}; pass [{indices!r}].")
    if isinstance(indices, pd.Series) and indices.dtype == bool and not isinstance(indices.index, pd.RangeIndex):
        # a mask such as adata.obs["x"] == "y" of another AnnData or order: its index says which cell is which
        aligned = indices.reindex(pd.Index(adata.obs_names))
        if aligned.isna().any() or not indices.index.is_unique:
            raise ValueError(
                f"The boolean Series `{name}` is indexed by names that are not the obs names of `adata` "
                f"(or repeat); pass a mask of adata.obs, or `{name}.to_numpy()` in the order of adata's cells."
            )
        indices = aligned.to_numpy(dtype=bool)
    values = np.asarray(list(indices) if isinstance(indices, pd.Index | pd.Series) else indices)
    if values.ndim != 1:
        raise ValueError(f"`{name}` must be one-dimensional (positions, a boolean mask or obs names).")
    n_obs = adata.n_obs
    if values.dtype == bool:
        if values.shape[0] != n_obs:
            raise ValueError(
                f"The boolean mask `{name}` has {values.shape[0]} entries but `adata` has {n_obs} cells; pass one "
                "entry per cell of the AnnData given (or of the registered one)."
            )
        positions = np.flatnonzero(values)
    elif values.size == 0:
        positions = values.astype(np.int64)
    elif values.dtype.kind in "OUS":
        obs_names = pd.Index(adata.obs_names)
        if not obs_names.is_unique:
            repeated = obs_names[obs_names.duplicated()].unique()
            raise ValueError(
                f"`{name}` names cells, but {len(repeated)} obs names occur more than once (e.g. "
                f"{list(repeated[:3])}), so a name does not identify one cell. Call adata.obs_names_make_unique() "
                "first, or pass positions or a boolean mask."
            )
        positions = obs_names.get_indexer(values.astype(str))
        missing = values[positions < 0]
        if missing.size:
            raise ValueError(
                f"{missing.size} entries of `{name}` are not obs names of `adata` (e.g. {list(missing[:3])}); pass "
                "obs names, integer positions or a boolean mask."
            )
    elif values.dtype.kind not in "iu":
        raise TypeError(f"`{name}` must hold integer positions, booleans or obs names, not {values.dtype}.")
    elif values.min() < -n_obs or values.max() >= n_obs:
        raise IndexError(f"`{name}` has positions outside 0..{n_obs - 1}, the cells of `adata`.")
    else:
        values = values.astype(np.int64)  # int8 positions would overflow when counted from the end
        positions = np.where(values < 0, values + n_obs, values)
    if positions.size == 0 and allow_empty:
        return positions.astype(np.int64)
    if positions.size == 0:
        raise ValueError(f"`{name}` selects no cells; pass at least one cell, or None for all cells.")
    return positions.astype(np.int64)


def _check_positive(name: str, value, integer: bool = False) -> None:
    """Raise unless ``value`` is a finite positive number (and an integer, if asked)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`{name}` must be a {'positive integer' if integer else 'positive number'}, not {value!r}.")
    if not np.isfinite(value) or value <= 0:
        kind = "positive integer" if integer else "finite positive number"
        raise ValueError(f"`{name}` must be a {kind}, not {value!r}.")
    if integer and int(value) != value:
        raise ValueError(f"`{name}` must be a positive integer, not {value!r}.")


def _check_seed(seed, name: str = "seed", allow_none: bool = False) -> None:
    """Raise unless ``seed`` is a non-negative integer (or ``None``, with ``allow_none``): torch and numpy refuse others."""
    if seed is None and allow_none:
        return
    _check_number(name, seed)
    if int(seed) != seed or seed < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, not {seed!r}.")


def _check_number(name: str, value) -> None:
    """Raise a ``TypeError`` naming the argument unless ``value`` is a real number (not text or a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`{name}` must be a number, not {value!r}.")


def _as_labels(perturbations) -> list[str]:
    """Perturbation labels as a list of strings, each once; a single string is one label, not its letters.

    Surrounding spaces are dropped, as the label parser drops them, so that outputs carry the registered label; a
    repeated label would give repeated rows and obs names.
    """
    if isinstance(perturbations, str):
        return [perturbations.strip()]
    return list(dict.fromkeys(str(p).strip() for p in perturbations))
