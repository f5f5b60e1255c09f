"""Bad inputs to the metrics, tools, plots, comparison and command line, and the setup cases they share:
each gets a clear error or the right result, and the user's AnnData is never changed."""

import matplotlib
import numpy as np
import pytest

import sams_scvi
from sams_scvi.cli import main

from .conftest import TRAIN_KW
from .test_bad_inputs import _unchanged

matplotlib.use("Agg")


def _sim():
    return sams_scvi.data.simulate_sams(
        n_perturbations=3, n_genes=20, n_cells_per_perturbation=30, n_control_cells=40, seed=0
    )


def _state(adata):
    return sams_scvi.SAMSVAE._get_most_recent_anndata_manager(adata).get_state_registry("perturbation")


@pytest.fixture(scope="module")
def model_and_data():
    adata = _sim()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, **TRAIN_KW)
    return model, adata


@pytest.fixture(scope="module")
def ate(model_and_data):
    model, _ = model_and_data
    return model.estimate_ate(n_samples=20, progress_bar=False)


# ------------------------------------------------------------------------------------------------ setup (field)
def test_float_labels_match_a_numeric_control_value():  # S16
    adata = _sim()
    codes = {"control": 0.0, "p0": 1.0, "p1": 2.0, "p2": 3.0}
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str).map(codes).astype(float)
    before = adata.copy()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", control_value=0)
    state = _state(adata)
    assert state["n_control_cells"] == 40 and state["control_value"] == "0.0"
    assert list(state["vocabulary"]) == ["1.0", "2.0", "3.0"]
    _unchanged(adata, before, registered=True)


def _with_dosage(value):
    adata = _sim()
    labels = adata.obs["perturbation"].astype(str)
    adata.obs["dose"] = np.where(labels == "control", "", "1")
    adata.obs.loc[labels == "p0", "dose"] = value
    return adata


@pytest.mark.parametrize(("value", "error"), [("-1", "finite and >= 0"), ("inf", "perturbation label 'p0'")])
def test_negative_or_infinite_dosage_is_rejected(value, error):  # S29, S30
    adata = _with_dosage(value)
    before = adata.copy()
    with pytest.raises(ValueError, match=error):
        sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", dosage_key="dose")
    _unchanged(adata, before)


def test_zero_dosage_warns_that_cells_become_controls():  # S29 (dosage 0)
    adata = _with_dosage("0")
    with pytest.warns(UserWarning, match="counted as control"):
        sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", dosage_key="dose")
    assert _state(adata)["n_control_cells"] == 70


# ------------------------------------------------------------------------------------------------ metrics
def test_top_k_zero_is_rejected(model_and_data, ate):  # X09
    _, adata = model_and_data
    observed = sams_scvi.metrics.observed_ate(adata)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        sams_scvi.metrics.ate_metrics(ate, observed, top_k=0)


METRIC_ERRORS = {
    "X04 observed_ate with no cells": (
        lambda m, a: sams_scvi.metrics.observed_ate(a, indices=[]), ValueError, "selects no cells"),
    "X05 observed_ate of a missing layer": (
        lambda m, a: sams_scvi.metrics.observed_ate(a, layer="counts"), KeyError, "not in adata.layers"),
    "X24 combination_split of a missing column": (
        lambda m, a: sams_scvi.metrics.combination_split(a, 0.5, perturbation_key="x"), KeyError,
        "'x' is not a column of adata.obs; available columns"),
    "X34 evaluate with a misspelt column": (
        lambda m, a: sams_scvi.metrics.evaluate(m, a, perturbation_key="perturbaton", subsets=["train"]), KeyError,
        "'perturbaton' is not a column of adata.obs"),
    "TL6 prediction_pair with no source cells": (
        lambda m, a: sams_scvi.tl.prediction_pair(m, n_source_cells=0, progress_bar=False), ValueError,
        "n_source_cells` must be a positive integer"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(METRIC_ERRORS))
def test_bad_tool_input_gets_a_clear_error_and_leaves_the_data(model_and_data, case):
    model, adata = model_and_data
    call, error, fragment = METRIC_ERRORS[case]
    before = adata.copy()
    with pytest.raises(error, match=fragment):
        call(model, adata)
    _unchanged(adata, before, registered=True)


def test_observed_ate_accepts_obs_names_and_masks(model_and_data):  # X06
    _, adata = model_and_data
    positions = np.arange(0, adata.n_obs, 2)
    expected = sams_scvi.metrics.observed_ate(adata, indices=positions).X
    by_name = sams_scvi.metrics.observed_ate(adata, indices=adata.obs_names[positions]).X
    mask = np.zeros(adata.n_obs, bool)
    mask[positions] = True
    np.testing.assert_array_equal(by_name, expected)
    np.testing.assert_array_equal(sams_scvi.metrics.observed_ate(adata, indices=mask).X, expected)


def test_compare_models_leaves_the_users_registration(model_and_data):  # X35
    _, adata = model_and_data
    split = [np.arange(0, adata.n_obs, 3), np.arange(1, adata.n_obs, 3), np.arange(2, adata.n_obs, 3)]
    uuid = adata.uns["_scvi_uuid"]
    sams_scvi.compare_models(
        adata,
        split,
        models={"SAMS-VAE": (sams_scvi.SAMSVAE, {"n_latent": 4, "n_hidden": 16}, {})},
        baselines=(),
        max_epochs=1,
        n_ate_samples=8,
        n_iwelbo_samples=2,
        progress_bar=False,
    )
    assert adata.uns["_scvi_uuid"] == uuid
    sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)  # the user's registration still holds


def test_gene_set_given_as_one_string_is_one_gene(model_and_data):  # TL10
    model, _ = model_and_data
    programs = model.get_gene_programs(n_top_genes=None)
    gene = str(programs["gene"].iloc[0])
    table = sams_scvi.tl.program_enrichment(programs, {"s": gene}, n_top_genes=5, min_overlap=0)
    assert (table["set_size"] == 1).all()


# ------------------------------------------------------------------------------------------------ plots
def test_mechanism_heatmap_names_its_input(model_and_data, ate):  # PL1, PL2
    model, _ = model_and_data
    mechanisms = model.get_mechanisms()
    with pytest.raises(KeyError, match="layers: "):
        sams_scvi.pl.mechanism_heatmap(mechanisms, layer="mask", show=False)
    with pytest.raises(ValueError, match=r"get_mechanisms\(\)"):
        sams_scvi.pl.mechanism_heatmap(ate, show=False)


def test_ate_intervals_names_unknown_perturbations(ate):  # PL4
    with pytest.raises(KeyError, match=r"perturbations not in the ATE table: \['NOPE'\]"):
        sams_scvi.pl.ate_intervals(ate, genes=[ate.var_names[0]], perturbations=["NOPE"], show=False)


def test_screen_volcano_names_its_input(ate):  # PL7
    with pytest.raises(ValueError, match=r"screen_combinations\(\)"):
        sams_scvi.pl.screen_volcano(ate, show=False)


def test_latent_umap_accepts_obs_names(model_and_data):  # PL11
    model, adata = model_and_data
    ax = sams_scvi.pl.latent_umap(model, indices=adata.obs_names[:60], n_neighbors=5, show=False)
    assert ax is not None


# ------------------------------------------------------------------------------------------------ command line
def test_train_on_a_file_that_is_not_h5ad(tmp_path, capsys):  # K25
    path = tmp_path / "notafile.h5ad"
    path.write_text("not an AnnData\n")
    assert main(["train", str(path), "--output", str(tmp_path / "m2"), "--quiet"]) == 1
    assert "is not a readable h5ad file" in capsys.readouterr().err
