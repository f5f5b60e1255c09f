"""Predicted and observed cells side by side, in the format scverse's evaluation tools read (cell-eval, pertpy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from scipy import sparse

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi._utils import _as_labels, _as_positions


def prediction_pair(
    model,
    adata: AnnData | None = None,
    indices: Sequence[int] | None = None,
    perturbations: Sequence[str] | None = None,
    source_indices: Sequence[int] | None = None,
    n_source_cells: int | None = 1000,
    target_sum: float = 1e4,
    seed: int = 0,
    progress_bar: bool = True,
) -> tuple[AnnData, AnnData]:
    r"""Predicted and observed cells of the same labels, genes and scale: the inputs of cell-eval and pertpy.

    Both are on :math:`\log(1 + \text{target\_sum}\, x / \sum_g x_g)`, what :func:`scanpy.pp.normalize_total`
    and :func:`scanpy.pp.log1p` give observed counts; the predicted cells are posterior-predictive draws
    (:meth:`~sams_scvi.SAMSVAE.predict_perturbation` with ``expression="log1p"``), so they carry the cell-to-cell
    noise that real cells have. The two hold the same label set (the control label included), the model's genes
    in the same order, and the labels in ``obs[perturbation_key]``:

    .. code-block:: python

        predicted, observed = sams_scvi.tl.prediction_pair(model, indices=test_cells)
        key, control = predicted.uns["sams_scvi"]["perturbation_key"], predicted.uns["sams_scvi"]["control_value"]
        cell_eval.MetricsEvaluator(predicted, observed, control_pert=control, pert_col=key)

    Parameters
    ----------
    model
        A trained model of this package.
    adata
        Data holding the observed and source cells; default, the registered AnnData.
    indices
        Observed cells to compare with (positions in ``adata``), e.g. the test cells of a split; default, all.
        Their control cells (no treatment in the registered design) are the observed control.
    perturbations
        Non-control labels to compare; default, every label among the observed cells. Each needs observed cells.
    source_indices
        Cells whose basal states carry the predictions; they may not include observed control cells. Default:
        the control cells outside ``indices``; when all control cells are on one side (no ``indices``, or
        ``indices`` without control cells), a random half of them, the other half being the observed control.
    n_source_cells
        Subsample the source cells to at most this many (``None``: all). The prediction is dense, with
        ``n_source_cells x (labels + 1)`` rows: 1,000 source cells x 2,000 labels x 8,000 genes is 64 GB of
        float32, so subset ``perturbations`` or lower this on genome-wide screens.
    target_sum
        Total counts per cell before the log.
    seed
        Seed of the subsampling and of the predictive draws.
    progress_bar
        Show the prediction's progress bar.

    Returns
    -------
    ``(predicted, observed)``: AnnDatas with float32 ``X`` (observed stays sparse if the data is),
    ``obs[perturbation_key]`` categorical over the same labels, and ``uns["sams_scvi"]`` naming the
    perturbation key, the control label and ``target_sum``.
    """
    if n_source_cells is not None and (
        isinstance(n_source_cells, bool) or not isinstance(n_source_cells, int | np.integer) or n_source_cells < 1
    ):
        raise ValueError(f"`n_source_cells` must be a positive integer (or None for all), not {n_source_cells!r}.")
    adata = model._validate_anndata(adata)
    manager = model.get_anndata_manager(adata, required=True)
    state = model._perturbation_state
    key = model.registry_["setup_args"]["perturbation_key"]
    control = state["control_value"]
    if key not in adata.obs:
        raise ValueError(
            f"`adata.obs` has no column {key!r}: prediction_pair reads the labels of a model set up with "
            "`setup_anndata`; for MuData, build the pair from the RNA modality's AnnData."
        )
    all_rows = np.arange(adata.n_obs)
    observed_rows = all_rows if indices is None else np.unique(_as_positions(adata, indices))
    if observed_rows.size == 0:
        raise ValueError("`indices` is empty.")
    # Control cells are those without treatment in the registered design (as the model sees them), whatever
    # their label's spelling; they are labelled with the control value on both sides.
    design = manager.get_from_registry(SAMS_REGISTRY_KEYS.PERTURBATION_KEY)
    is_control = np.asarray(sparse.csr_matrix(design).getnnz(axis=1)) == 0
    labels = adata.obs[key].astype(str).str.strip().to_numpy(dtype=object)
    labels[is_control] = control
    observed_labels = labels[observed_rows]
    if perturbations is None:
        perturbations = [p for p in dict.fromkeys(observed_labels) if p != control]
    perturbations = [p for p in dict.fromkeys(label.strip() for label in _as_labels(perturbations)) if p != control]
    missing = [p for p in perturbations if p not in set(observed_labels)]
    if missing:
        raise ValueError(
            f"{len(missing)} labels have no observed cells among `indices` (e.g. {missing[:3]}); cell-eval needs "
            "the same labels on both sides. Pass `perturbations` with observed labels only."
        )
    perturbed = observed_rows[np.isin(observed_labels, perturbations)]

    # The observed control cells and the source cells of the prediction are disjoint: shared cells would put the
    # same noise in both sides' control and inflate every agreement. When all control cells are on one side (no
    # `indices`, or a split that tests perturbed cells only), they are split in half at random.
    rng = np.random.default_rng(seed)
    controls = np.flatnonzero(is_control)
    observed_controls = np.intersect1d(observed_rows, controls)
    if source_indices is not None:
        source = np.unique(_as_positions(adata, source_indices, "source_indices"))
        if observed_controls.size == 0:
            observed_controls = np.setdiff1d(controls, source)
        elif np.intersect1d(source, observed_controls).size:
            raise ValueError(
                "`source_indices` include observed control cells (control cells among `indices`); pass source "
                "cells outside `indices`."
            )
    else:
        others = np.setdiff1d(controls, observed_controls)
        if observed_controls.size and others.size:
            source = others
        else:
            shuffled = rng.permutation(observed_controls if observed_controls.size else others)
            source, observed_controls = np.sort(shuffled[: len(shuffled) // 2]), np.sort(shuffled[len(shuffled) // 2 :])
    if observed_controls.size == 0 or source.size == 0:
        raise ValueError(f"Too few control cells ({control!r}) for both the observed side and the source cells.")
    if n_source_cells is not None and source.size > n_source_cells:
        source = np.sort(rng.choice(source, n_source_cells, replace=False))
    keep = np.concatenate([observed_controls, perturbed])
    keep.sort()

    conditions = [control, *perturbations]
    predicted = model.predict_perturbation(
        conditions,
        adata=adata,
        indices=source,
        expression="log1p",
        target_sum=target_sum,
        seed=seed,
        progress_bar=progress_bar,
    )

    counts = manager.get_from_registry(SAMS_REGISTRY_KEYS.X_KEY)[keep]
    observed = AnnData(
        X=counts.astype(np.float32),
        obs=adata.obs.iloc[keep][[c for c in adata.obs.columns if not str(c).startswith("_scvi")]].copy(),
        var=pd.DataFrame(index=predicted.var_names.copy()),
    )
    sc.pp.normalize_total(observed, target_sum=target_sum)  # on the new AnnData: the user's data is not touched
    sc.pp.log1p(observed)
    categories = pd.CategoricalDtype(conditions)
    observed.obs[key] = pd.Series(labels[keep], index=observed.obs_names).astype(categories)
    predicted.obs[key] = predicted.obs[key].astype(str).astype(categories)
    info = {"perturbation_key": key, "control_value": control, "target_sum": float(target_sum)}
    predicted.uns["sams_scvi"] = {**predicted.uns["sams_scvi"], **info}
    observed.uns["sams_scvi"] = {**info, "expression": "observed"}
    return predicted, observed
