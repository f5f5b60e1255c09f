"""A catalogue of bad or unusual inputs: each gets a clear error or the right result, and the user's
AnnData is never changed. One case per input; the message fragment is what tells the user the fix."""

import re
import warnings

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


def _unchanged(adata, before, registered: bool = False):
    """The user's data as it was; ``registered``: only scvi-tools' registration entries were added."""
    pd.testing.assert_frame_equal(adata.obs[before.obs.columns] if registered else adata.obs, before.obs)
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
    # training arguments: checked before Lightning starts (-1 trained forever, 0 and 1.5 passed or asserted)
    "train max_epochs=-1": (lambda m, a: m.train(max_epochs=-1, **TRAIN_KW), ValueError, "`max_epochs` must be a positive"),
    "train max_epochs=1.5": (lambda m, a: m.train(max_epochs=1.5, **TRAIN_KW), ValueError, "`max_epochs` must be a posi"),
    "train max_epochs=0": (lambda m, a: m.train(max_epochs=0, **TRAIN_KW), ValueError, "`max_epochs` must be a positive"),
    "train batch_size=0": (
        lambda m, a: m.train(max_epochs=1, batch_size=0, **TRAIN_KW), ValueError, "`batch_size` must be a positive"),
    "train train_size=0": (lambda m, a: m.train(max_epochs=1, train_size=0, **TRAIN_KW), ValueError, r"in \(0, 1\]"),
    "train validation_size=-0.1": (
        lambda m, a: m.train(max_epochs=1, validation_size=-0.1, **TRAIN_KW), ValueError, "`validation_size` must"),
    "train early_stopping without validation cells": (
        lambda m, a: m.train(max_epochs=1, early_stopping=True, train_size=1.0, **TRAIN_KW),
        ValueError, r"early_stopping needs validation cells \(train_size < 1\)"),
    "train unknown plan_kwargs": (
        lambda m, a: m.train(max_epochs=1, plan_kwargs={"lrr": 1}, **TRAIN_KW), TypeError, r"Unknown plan_kwargs \['lrr'\]"),
    "train checkpoint_dir that is a file": (
        lambda m, a: m.train(max_epochs=1, checkpoint_dir=__file__, **TRAIN_KW), NotADirectoryError, "not a folder"),
    # model settings: checked at construction (0 built a meaningless model, negative or 2.5 failed inside torch)
    "model n_latent=0": (lambda m, a: sams_scvi.SAMSVAE(a, n_latent=0), ValueError, "`n_latent` must be a positive int"),
    "model n_latent=-2": (lambda m, a: sams_scvi.SAMSVAE(a, n_latent=-2), ValueError, "`n_latent` must be a positive"),
    "model n_latent=2.5": (lambda m, a: sams_scvi.SAMSVAE(a, n_latent=2.5), ValueError, "`n_latent` must be a positive"),
    "model n_hidden=0": (lambda m, a: sams_scvi.SAMSVAE(a, n_hidden=0), ValueError, "`n_hidden` must be a positive int"),
    "model n_particles=0": (
        lambda m, a: sams_scvi.SAMSVAE(a, n_particles=0), ValueError, "`n_particles` must be a positive int"),
    "model embedding_prior_scale=-1": (
        lambda m, a: sams_scvi.SAMSVAE(a, embedding_prior_scale=-1.0), ValueError, "`embedding_prior_scale` must"),
    # method arguments
    "get_elbo n_samples=0": (lambda m, a: m.get_elbo(n_samples=0), ValueError, "`n_samples` must be a positive int"),
    "get_marginal_ll n_mc_samples=0": (
        lambda m, a: m.get_marginal_ll(n_mc_samples=0), ValueError, "`n_mc_samples` must be a positive int"),
    "get_marginal_ll n_mc_samples=-5": (
        lambda m, a: m.get_marginal_ll(n_mc_samples=-5), ValueError, "`n_mc_samples` must be a positive int"),
    "normalized expression of an unknown gene": (
        lambda m, a: m.get_normalized_expression(gene_list=["g0", "nope"]), KeyError, r"not trained on \(e.g. \['nope'\]"),
    "normalized expression library_size=0": (
        lambda m, a: m.get_normalized_expression(library_size=0), ValueError, "`library_size` must be a finite pos"),
    "effective shifts n_samples=2.5": (
        lambda m, a: m.get_effective_shifts(n_samples=2.5), ValueError, "`n_samples` must be a positive int"),
    "active dimensions threshold as text": (
        lambda m, a: m.get_active_dimensions(threshold="0.5"), TypeError, "`threshold` must be a number"),
    "estimate_ate credible_level as text": (
        lambda m, a: m.estimate_ate(credible_level="0.9", progress_bar=False), TypeError, "`credible_level` must be a"),
    "predict n_samples too large for memory": (
        lambda m, a: m.predict_perturbation(["p0"], indices=[0], n_samples=10**9, progress_bar=False),
        ValueError, "lower n_samples"),
    "differential expression by a misspelt column": (
        lambda m, a: m.differential_expression(groupby="perturbaton"), KeyError, r"available columns: \['perturbation'"),
    "differential expression of an unknown group": (
        lambda m, a: m.differential_expression(groupby="perturbation", group1="p9"), ValueError, r"groups are \['"),
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


# ---------------------------------------------------------------- set-up: labels, layers, keys


def _screen(**relabel):
    """A small simulated screen; ``relabel`` maps an existing label to what (some of) its cells become."""
    adata = sams_scvi.data.simulate_sams(
        n_perturbations=3, n_genes=20, n_cells_per_perturbation=20, n_control_cells=30, seed=0
    )
    labels = adata.obs["perturbation"].astype(str).to_numpy(dtype=object)
    for old, new in relabel.items():
        cells = np.flatnonzero(labels == old)
        labels[cells[: len(cells) // 2] if new.get("half") else cells] = new["to"]
    adata.obs["perturbation"] = pd.Categorical(labels)
    return adata


def _with_combinations(adata, delimiter="+"):
    labels = adata.obs["perturbation"].astype(str).to_numpy(dtype=object)
    labels[:6] = f"p0{delimiter}p1"
    adata.obs["perturbation"] = pd.Categorical(labels)
    return adata


SETUP_ERRORS = {
    "control label in two spellings": (
        lambda: _screen(control={"to": "Control", "half": True}), {}, ValueError, r"replace\(\{'Control': 'control'\}"),
    "control label only in another spelling": (
        lambda: _screen(control={"to": "CONTROL"}), {}, ValueError, "control_value='CONTROL'"),
    "missing layer": (lambda: _screen(), {"layer": "counts"}, KeyError, "not in adata.layers"),
    "missing perturbation column": (
        lambda: _screen(), {"perturbation_key": "guide"}, KeyError, "not a column of adata.obs"),
    "missing batch column": (lambda: _screen(), {"batch_key": "donor"}, KeyError, "batch_key='donor' is not a column"),
    "missing covariate column": (
        lambda: _screen(), {"categorical_covariate_keys": ["perturbation", "lane"]}, KeyError, "'lane' is not a column"),
    "control_value of the wrong type": (lambda: _screen(), {"control_value": None}, TypeError, "control_value"),
    "empty name in a combination": (
        lambda: _screen(p0={"to": "p0+"}), {}, ValueError, "empty perturbation name"),
    "no perturbation_key": (lambda: _screen(), {"perturbation_key": None}, TypeError, "perturbation_key is required"),
}

SETUP_WARNINGS = {
    "one perturbation in two spellings": (lambda: _screen(p0={"to": "P0", "half": True}), {}, "differ only in case"),
    "a perturbation named twice": (lambda: _screen(p0={"to": "p0+p0", "half": True}), {}, "more than once"),
    "combinations with another delimiter": (
        lambda: _with_combinations(_screen()), {"delimiter": "_"}, "Pass delimiter='+'"),
    "controls under another name": (lambda: _screen(control={"to": "non-targeting"}), {},
                                    "control_value='non-targeting'"),
}


@pytest.mark.parametrize("case", list(SETUP_ERRORS))
def test_bad_setup_gets_a_clear_error_and_leaves_the_data(case):
    make, kwargs, error, fragment = SETUP_ERRORS[case]
    adata = make()
    before = adata.copy()
    with pytest.raises(error, match=fragment):
        sams_scvi.SAMSVAE.setup_anndata(adata, **{"perturbation_key": "perturbation", **kwargs})
    _unchanged(adata, before)


@pytest.mark.parametrize("case", list(SETUP_WARNINGS))
def test_suspicious_labels_are_reported_at_setup(case):
    make, kwargs, fragment = SETUP_WARNINGS[case]
    adata = make()
    before = adata.copy()
    with pytest.warns(UserWarning, match=re.escape(fragment)) as record:
        sams_scvi.SAMSVAE.setup_anndata(adata, **{"perturbation_key": "perturbation", **kwargs})
    assert any(w.filename == __file__ for w in record if fragment.split("'")[0] in str(w.message))  # user's line
    _unchanged(adata, before, registered=True)


def test_integer_labels_with_an_integer_control_value():
    """Labels 0, 1, 2, 3 with control_value=0: the zeros are the controls, not a perturbation called '0'."""
    adata = _screen()
    codes = {"control": 0, "p0": 1, "p1": 2, "p2": 3}
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str).map(codes).astype(int)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", control_value=0)
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    assert model.perturbations == ["1", "2", "3"]
    assert model._perturbation_state["n_control_cells"] == int((adata.obs["perturbation"] == 0).sum())


def test_genes_in_another_order_are_named_as_such(model_and_data):
    model, adata = model_and_data
    with pytest.raises(ValueError, match="the model's 20 genes, but in another order"):
        model.get_latent(adata=adata[:, ::-1].copy())
    with pytest.raises(ValueError, match="1 model genes are missing"):
        model.get_latent(adata=adata[:, 1:].copy())


@pytest.mark.parametrize("dense", [True, False])
def test_backed_anndata_trains_and_predicts(tmp_path, dense):
    """A file-backed AnnData (read_h5ad(..., backed='r')) is checked in row blocks instead of crashing."""
    import anndata as ad

    adata = _screen()
    adata.X = adata.X.toarray() if dense else adata.X
    adata.write_h5ad(tmp_path / "screen.h5ad")
    backed = ad.read_h5ad(tmp_path / "screen.h5ad", backed="r")
    sams_scvi.SAMSVAE.setup_anndata(backed, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(backed, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, **TRAIN_KW)
    assert np.isfinite(model.estimate_ate(n_samples=20, progress_bar=False).X).all()


def test_backed_anndata_with_negative_values_is_rejected(tmp_path):
    import anndata as ad

    adata = _screen()
    adata.X = adata.X.toarray() - 1.0
    adata.write_h5ad(tmp_path / "screen.h5ad")
    backed = ad.read_h5ad(tmp_path / "screen.h5ad", backed="r")
    sams_scvi.SAMSVAE.setup_anndata(backed, perturbation_key="perturbation")
    with pytest.raises(ValueError, match="negative values"):
        sams_scvi.SAMSVAE(backed, n_latent=4, n_hidden=16)


def test_missing_modality_is_named():
    mudata = pytest.importorskip("mudata")
    adata = _screen()
    mdata = mudata.MuData({"rna": adata})
    with pytest.raises(KeyError, match=r"'RNA', which is not a modality of the MuData \(modalities: \['rna'\]\)"):
        sams_scvi.SAMSVAE.setup_mudata(mdata, perturbation_key="perturbation", modalities={"rna_layer": "RNA"})


def test_a_view_passed_as_adata_stays_a_view(model_and_data):
    """scvi-tools makes a view actual in place; the model works on a copy and leaves the user's view alone."""
    model, adata = model_and_data
    view = adata[:50]
    before = view.copy()
    pred = model.predict_perturbation(["p0"], adata=view, progress_bar=False)
    assert view.is_view
    assert pred.n_obs == int((before.obs["perturbation"] == "control").sum())
    assert np.allclose(model.get_latent(adata=view), model.get_latent(indices=np.arange(50)), atol=1e-5)
    assert view.is_view
    _unchanged(view, before)


def test_model_loaded_without_data_asks_for_adata(model_and_data, tmp_path):
    model, adata = model_and_data
    model.save(tmp_path / "model", overwrite=True)
    loaded = sams_scvi.SAMSVAE.load(tmp_path / "model", adata=False)
    for call in (
        lambda: loaded.predict_perturbation(["p0"], progress_bar=False),
        lambda: loaded.get_latent(),
        lambda: loaded.get_normalized_expression(),
    ):
        with pytest.raises(ValueError, match=r"loaded without data .*pass adata="):
            call()
    assert loaded.predict_perturbation(["p0"], adata=adata.copy(), progress_bar=False).n_obs > 0


def test_screening_a_pair_twice_screens_it_once(model_and_data):
    model, _ = model_and_data
    with pytest.warns(UserWarning, match="more than once"):
        screen = model.screen_combinations(["p0+p2", "p2+p0"], n_samples=8, n_posterior_draws=2, progress_bar=False)
    assert list(screen.obs_names) == ["p0+p2"]


def test_expression_and_response_accept_obs_names(model_and_data):
    model, adata = model_and_data
    names = list(adata.obs_names[[3, 70, 100]])
    by_name = model.get_normalized_expression(indices=names, seed=0)
    assert list(by_name.index) == names
    assert np.allclose(by_name, model.get_normalized_expression(indices=[3, 70, 100], seed=0))
    response = model.get_response_probability(indices=names)
    assert list(response.index) == names


def test_a_single_covariate_key_is_read_as_a_list():
    adata = _screen()
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 2, "d1", "d2")
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", categorical_covariate_keys="donor")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    assert model.registry_["setup_args"]["categorical_covariate_keys"] == ["donor"]
    assert model.summary_stats.n_extra_categorical_covs == 1


def test_duplicate_gene_names_warn_with_the_fix():
    adata = _screen()
    names = np.array(adata.var_names, dtype=object)  # a copy: pandas 3 hands out read-only arrays
    names[1] = names[0]
    adata.var_names = names
    with pytest.warns(UserWarning, match=r"var_names_make_unique") as record:
        sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    assert record[0].filename == __file__  # points at the user's setup_anndata line
    unique = _screen()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sams_scvi.SAMSVAE.setup_anndata(unique, perturbation_key="perturbation")


def test_labels_with_surrounding_spaces_come_back_as_registered(model_and_data):
    model, adata = model_and_data
    sources = np.flatnonzero(adata.obs["perturbation"].astype(str) == "control")[:3]
    predicted = model.predict_perturbation([" p0 ", "p1"], indices=sources, n_samples=1, progress_bar=False)
    assert set(predicted.obs["perturbation"].astype(str)) == {"p0", "p1"}
    ate = model.estimate_ate(" p0", n_samples=8, n_posterior_draws=2, progress_bar=False)
    assert list(ate.obs_names) == ["p0"] and ate.obs.loc["p0", "n_cells"] == (adata.obs["perturbation"] == "p0").sum()
