"""A catalogue of bad or unusual inputs (issue 14): each gets a clear error or the right result, and the user's
AnnData is never changed. One case per input; the message fragment is what tells the user the fix."""

import numpy as np
import pandas as pd
import pytest

import sams_scvi

from .conftest import TRAIN_KW


@pytest.fixture(scope="module")
def model_and_data():
    adata = sams_scvi.data.simulate_sams(
        n_perturbations=3, n_genes=20, n_cells_per_perturbation=40, n_control_cells=60, seed=0
    )
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, **TRAIN_KW)
    return model, adata


def _unchanged(adata, before):
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    assert adata.obs_names.equals(before.obs_names) and adata.var_names.equals(before.var_names)
    assert (adata.X != before.X).nnz == 0 if hasattr(adata.X, "nnz") else np.array_equal(adata.X, before.X)


BAD_CALLS = {
    "estimate_ate n_samples=0": (
        lambda m, a: m.estimate_ate(n_samples=0, progress_bar=False), ValueError, "at least 4"),
    "estimate_ate n_samples=-5": (
        lambda m, a: m.estimate_ate(n_samples=-5, progress_bar=False), ValueError, "at least 4"),
    "estimate_ate library_size=nan": (
        lambda m, a: m.estimate_ate(library_size=float("nan"), progress_bar=False), ValueError, "finite positive"),
    "estimate_ate library_size='mean'": (
        lambda m, a: m.estimate_ate(library_size="mean", progress_bar=False), ValueError, "'median'"),
    "predict n_samples=0": (
        lambda m, a: m.predict_perturbation(["p0"], n_samples=0, progress_bar=False), ValueError, "n_samples"),
    "predict target_sum=-1": (
        lambda m, a: m.predict_perturbation(["p0"], target_sum=-1, progress_bar=False), ValueError, "target_sum"),
    "predict unknown perturbation": (
        lambda m, a: m.predict_perturbation(["p0+nope"], progress_bar=False), ValueError, "nope"),
    "predict boolean mask of the wrong length": (
        lambda m, a: m.predict_perturbation(["p0"], indices=np.ones(5, bool), progress_bar=False),
        ValueError, "one entry per cell"),
    "predict obs names that do not exist": (
        lambda m, a: m.predict_perturbation(["p0"], indices=["no-such-cell"], progress_bar=False),
        ValueError, "not obs names"),
    "predict positions out of range": (
        lambda m, a: m.predict_perturbation(["p0"], indices=[0, 10_000], progress_bar=False), IndexError, "outside"),
    "predict float indices": (
        lambda m, a: m.predict_perturbation(["p0"], indices=[0.5, 1.5], progress_bar=False), TypeError, "integer"),
    "latent of genes in another order": (
        lambda m, a: m.get_latent(adata=a[:, ::-1].copy()), ValueError, "order"),
    "prediction_pair with a label that has no observed cells": (
        lambda m, a: sams_scvi.tl.prediction_pair(
            m, indices=np.flatnonzero(a.obs["perturbation"].isin(["control", "p0"])), perturbations=["p1"],
            progress_bar=False),
        ValueError, "no observed cells"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_gets_a_clear_error_and_leaves_the_data(model_and_data, case):
    model, adata = model_and_data
    call, error, fragment = BAD_CALLS[case]
    before = adata.copy()
    with pytest.raises(error, match=fragment):
        call(model, adata)
    _unchanged(adata, before)


def test_source_cells_default_to_the_controls_of_the_anndata_passed(model_and_data):
    """On a reordered or smaller copy, the default source cells are that copy's control cells."""
    model, adata = model_and_data
    for other in (adata[::-1].copy(), adata[:50].copy()):
        pred = model.predict_perturbation(["p0"], adata=other, progress_bar=False)
        source_labels = other.obs.loc[pred.obs["source_cell"], "perturbation"].astype(str)
        assert (source_labels == "control").all()
        assert pred.n_obs == int((other.obs["perturbation"] == "control").sum())


def test_indices_as_positions_mask_or_names_agree(model_and_data):
    model, adata = model_and_data
    mask = (adata.obs["perturbation"] == "p1").to_numpy()
    positions = np.flatnonzero(mask)
    by_position = model.get_latent(indices=positions)
    assert np.allclose(model.get_latent(indices=mask), by_position)
    assert np.allclose(model.get_latent(indices=list(adata.obs_names[positions])), by_position)
    assert np.allclose(model.get_latent(indices=positions - adata.n_obs), by_position)  # negative, as numpy
    pred = model.predict_perturbation("p0", indices=adata.obs_names[positions[:3]], progress_bar=False)
    assert list(pred.obs["source_cell"]) == list(adata.obs_names[positions[:3]])
    assert set(pred.obs["perturbation"]) == {"p0"}  # a single label is one label, not its letters
