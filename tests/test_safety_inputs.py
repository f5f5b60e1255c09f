"""Inputs that used to give silently wrong results or crash inside pandas / numpy / torch: each now gives the right
result or a clear error naming the argument and the fix, and the user's AnnData is left as it was."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
from scipy import sparse

import sams_scvi
from sams_scvi import metrics
from sams_scvi.data import parse_perturbations

from .conftest import TRAIN_KW
from .test_bad_inputs import _unchanged

QUICK = {"model_kwargs": {"n_latent": 4, "n_hidden": 16}, "train_kwargs": {"max_epochs": 1, **TRAIN_KW}}


def _adata(labels, **obs):
    rng = np.random.default_rng(0)
    x = sparse.csr_matrix(rng.poisson(2.0, (len(labels), 6)).astype(np.float32))
    return ad.AnnData(x, obs=pd.DataFrame({"perturbation": labels, **obs}, index=[f"c{i}" for i in range(len(labels))]))


def _copy_registered(adata, **setup):
    """A copy of the data registered afresh, so that tests never touch the shared fixture's data."""
    copy = adata.copy()
    sams_scvi.SAMSVAE.setup_anndata(copy, perturbation_key="perturbation", **setup)
    return copy


# ------------------------------------------------------------------------------------------------ labels
def test_guide_numbers_after_the_delimiter_warn_at_setup():
    adata = _adata(["control", "MYC_1", "MYC_2", "KRAS_1", "A_1_B_2", "control"] * 3)
    before = adata.copy()
    with pytest.warns(UserWarning, match=r"'MYC_1'.*guide numbers after the delimiter '_'.*delimiter='\+'"):
        sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", delimiter="_")
    _unchanged(adata, before, registered=True)
    # the design is as before (the warning says why it is probably not what was meant)
    state = sams_scvi.SAMSVAE._get_most_recent_anndata_manager(adata).get_state_registry("perturbation")
    assert list(state["vocabulary"]) == ["1", "2", "A", "B", "KRAS", "MYC"]
    # numeric perturbation codes, and a number that is a label on its own, are perturbations, not guide numbers
    for labels in (["0", "1", "2", "1_2", "0"], ["0", "7", "A", "A_7", "B_7"]):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            sams_scvi.SAMSVAE.setup_anndata(
                _adata(labels * 3), perturbation_key="perturbation", delimiter="_", control_value="0"
            )


@pytest.mark.parametrize("container", [tuple, list])
def test_labels_holding_tuples_or_lists_are_refused(container):
    labels = [container(p) for p in (["control"], ["A"], ["A", "B"], ["B"])] * 3
    adata = _adata(["x"] * len(labels))
    adata.obs["perturbation"] = pd.Series(labels, index=adata.obs_names, dtype=object)
    before = adata.copy()
    with pytest.raises(TypeError, match=r"text like 'A\+B'.*adata\.obs\['perturbation'\]\.map\('\+'\.join\)"):
        sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    _unchanged(adata, before)
    assert adata.obs["perturbation"].tolist() == labels
    with pytest.raises(TypeError, match="text like"):
        parse_perturbations(labels)
    # the conversion the message shows gives the combinations
    adata.obs["perturbation"] = adata.obs["perturbation"].map("+".join)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    np.testing.assert_array_equal(adata.obsm["_scvi_perturbation"][:4].toarray(), [[0, 0], [1, 0], [1, 1], [0, 1]])


def test_perturbed_cells_without_dosage_are_refused():
    adata = _adata(["control", "A", "A+B", "B", "control", "A"], dose=[np.nan, "2", "1+0.5", None, np.nan, np.nan])
    before = adata.copy()
    with pytest.raises(ValueError, match=r"adata.obs\['dose'\] has no dosage for 2 perturbed cells \(e.g. cell 'c3', "):
        sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", dosage_key="dose")
    _unchanged(adata, before)
    # missing dosages on control cells stay fine
    adata.obs["dose"] = [np.nan, "2", "1+0.5", "1", pd.NA, "3"]
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", dosage_key="dose")
    np.testing.assert_allclose(
        adata.obsm["_scvi_perturbation"].toarray(), [[0, 0], [2, 0], [1, 0.5], [0, 1], [0, 0], [3, 0]]
    )


# ------------------------------------------------------------------------------------------------ ensembles
def _other_model(adata, difference):
    if difference == "likelihood":
        return sams_scvi.SAMSVAE(adata, n_latent=6, n_hidden=32, likelihood="normal")
    if difference == "perturbations":
        other = _copy_registered(adata[adata.obs["perturbation"].astype(str) != "p3"])
    else:
        other = _copy_registered(adata[:, 5:])
    return sams_scvi.SAMSVAE(other, n_latent=6, n_hidden=32)


@pytest.mark.parametrize(
    ("difference", "message"),
    [
        ("likelihood", r"models\[0\] has likelihood 'nb' but models\[1\] 'normal'"),
        ("perturbations", r"different perturbations \(only models\[0\] has \['p3'\]"),
        ("genes", r"different genes \(models\[1\] lacks \['g0'"),
    ],
)
def test_ensembles_refuse_models_that_differ(small_screen_model, difference, message):
    model, adata = small_screen_model
    other = _other_model(adata, difference)
    with pytest.raises(ValueError, match=message):
        sams_scvi.ensemble_ate([model, other], progress_bar=False)
    with pytest.raises(ValueError, match=message):
        sams_scvi.ensemble_screen([model, other], progress_bar=False)


def test_bootstrap_models_restores_the_callers_seed(small_screen_model):
    adata = _copy_registered(small_screen_model[1])
    scvi.settings.seed = 123
    models = sams_scvi.bootstrap_models(adata, 2, seed=7, progress_bar=False, **QUICK)
    assert scvi.settings.seed == 123 and len(models) == 2
    with pytest.raises(TypeError, match="max_epochs"):  # fails inside training, after the seed was set
        sams_scvi.bootstrap_models(adata, 2, seed=7, progress_bar=False, train_kwargs={"max_epochs": "x"})
    assert scvi.settings.seed == 123


def test_bootstrap_models_take_masks_and_obs_names(small_screen_model):
    adata = _copy_registered(small_screen_model[1])
    before = adata.copy()
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[::3] = True
    selections = {"positions": np.flatnonzero(mask), "mask": mask, "obs names": adata.obs_names[mask]}
    resamples = {
        kind: [
            m.train_indices for m in sams_scvi.bootstrap_models(adata, 2, indices=cells, progress_bar=False, **QUICK)
        ]
        for kind, cells in selections.items()
    }
    for kind in ("mask", "obs names"):
        for a, b in zip(resamples[kind], resamples["positions"], strict=True):
            np.testing.assert_array_equal(a, b)
    assert set(np.concatenate(resamples["mask"])) <= set(np.flatnonzero(mask))  # not positions 0 and 1
    _unchanged(adata, before, registered=True)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda m, a: sams_scvi.bootstrap_models(a, 2, seed="abc", progress_bar=False), "seed"),
        (lambda m, a: sams_scvi.ensemble_ate([m, m], credible_level="0.9", progress_bar=False), "credible_level"),
        (lambda m, a: sams_scvi.ensemble_screen([m, m], credible_level="0.9", progress_bar=False), "credible_level"),
        (lambda m, a: metrics.evaluate("control", a, [[0], [], [1]], seed="abc", progress_bar=False), "seed"),
        (lambda m, a: metrics.split_half_ceiling(a, seed="abc"), "seed"),
        (lambda m, a: metrics.random_halves(np.arange(10), seed="abc"), "seed"),
        (lambda m, a: metrics.combination_split(a, 0.5, seed="abc"), "seed"),
        (lambda m, a: metrics.effect_decomposition(m, seed="abc"), "seed"),
    ],
)
def test_wrongly_typed_seed_and_credible_level_are_named(small_screen_model, call, argument):
    model, adata = small_screen_model
    with pytest.raises(TypeError, match=f"`{argument}` must be a number"):
        call(model, adata)


# ------------------------------------------------------------------------------------------------ metrics
def test_evaluate_takes_split_parts_as_masks_and_obs_names(small_screen_model):
    adata = small_screen_model[1].copy()
    before = adata.copy()
    train = np.zeros(adata.n_obs, dtype=bool)
    train[::2] = True
    test = ~train
    kwargs = {"subsets": ("train", "test", "all"), "top_k": 5, "progress_bar": False}
    expected = metrics.evaluate("additive", adata, [np.flatnonzero(train), [], np.flatnonzero(test)], **kwargs)
    masks = metrics.evaluate("additive", adata, [train, np.zeros(adata.n_obs, bool), test], **kwargs)
    names = metrics.evaluate("additive", adata, [adata.obs_names[train], [], list(adata.obs_names[test])], **kwargs)
    pd.testing.assert_frame_equal(masks, expected)
    pd.testing.assert_frame_equal(names, expected)
    assert expected.loc["train", "n_cells"] == train.sum()
    _unchanged(adata, before)


def test_split_half_ceiling_takes_masks_and_obs_names(small_screen_model):
    adata = small_screen_model[1].copy()
    before = adata.copy()
    mask = adata.obs["perturbation"].astype(str).isin(["control", "p0", "p1"]).to_numpy()
    expected = metrics.split_half_ceiling(adata, indices=np.flatnonzero(mask), top_k=5)
    pd.testing.assert_series_equal(metrics.split_half_ceiling(adata, indices=mask, top_k=5), expected)
    pd.testing.assert_series_equal(metrics.split_half_ceiling(adata, indices=adata.obs_names[mask], top_k=5), expected)
    assert expected["n_perturbations"] == 2
    _unchanged(adata, before)


def test_repeated_perturbations_or_genes_in_ate_tables_are_refused(small_screen_model):
    adata = small_screen_model[1]
    before = adata.copy()
    observed = metrics.observed_ate(adata, perturbations=["p0", "p1", "p2"])
    table = observed.to_df()
    table_before = table.copy()
    repeated_row = pd.concat([table, table.iloc[[0]]])
    with pytest.raises(ValueError, match=r"predicted ATE table's perturbations \(rows\) has repeated names \['p0'\]"):
        metrics.ate_metrics(repeated_row, observed, top_k=5)
    repeated_gene = table.rename(columns={table.columns[1]: table.columns[0]})
    with pytest.raises(ValueError, match=r"observed ATE table's genes \(columns\).*var_names_make_unique"):
        metrics.ate_metrics_per_perturbation(table, repeated_gene, top_k=5)
    genes = small_screen_model[1].copy()
    genes.var_names = ["g0", *genes.var_names[:-1]]  # g0 twice
    with pytest.warns(UserWarning, match="more than once"):
        sams_scvi.SAMSVAE.setup_anndata(genes, perturbation_key="perturbation")
    with pytest.raises(ValueError, match=r"model's genes has repeated names \['g0'\].*var_names_make_unique"):
        metrics.effect_decomposition(sams_scvi.SAMSVAE(genes, n_latent=4, n_hidden=16))
    masks = pd.DataFrame(np.eye(3), index=["p0", "p1", "p0"])
    with pytest.raises(ValueError, match=r"learned masks' perturbations \(rows\) has repeated names \['p0'\]"):
        metrics.mask_recovery(masks, masks.iloc[:2])
    pd.testing.assert_frame_equal(table, table_before)
    _unchanged(adata, before, registered=True)


def test_a_perturbation_listed_twice_counts_once(small_screen_model):
    adata = small_screen_model[1]
    before = adata.copy()
    observed = metrics.observed_ate(adata, perturbations=["p0", "p1", "p0"])
    assert list(observed.obs_names) == ["p0", "p1"]
    predicted = metrics.baseline_ate(adata, "additive", ["p0+p1", "p0", "p0+p1"])
    assert list(predicted.obs_names) == ["p0+p1", "p0"]
    truth = metrics.observed_ate(adata, perturbations=["p0+p1", "p0", "p2"])
    once = metrics.ate_metrics(predicted, truth, top_k=5, perturbations=["p0+p1", "p0"])
    twice = metrics.ate_metrics(predicted, truth, top_k=5, perturbations=["p0+p1", "p0", "p0+p1"])
    pd.testing.assert_series_equal(twice, once)
    per = metrics.ate_metrics_per_perturbation(predicted, truth, top_k=5, perturbations=["p0", "p0"])
    assert list(per.index) == ["p0"]
    _unchanged(adata, before, registered=True)


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_cells_named_in_data_with_repeated_obs_names_are_refused(small_screen_model):
    adata = small_screen_model[1].copy()
    adata.obs_names = [f"cell{i % 300}" for i in range(adata.n_obs)]
    before = adata.copy()
    with pytest.raises(ValueError, match=r"`indices` names cells.*adata\.obs_names_make_unique\(\)"):
        metrics.split_half_ceiling(adata, indices=adata.obs_names[:200], top_k=5)
    with pytest.raises(ValueError, match=r"`split\[0\]` names cells.*obs_names_make_unique"):
        metrics.evaluate("additive", adata, [adata.obs_names[:300], [], adata.obs_names[300:]], progress_bar=False)
    _unchanged(adata, before)
    # positions still identify the cells
    assert metrics.observed_ate(adata, indices=np.arange(adata.n_obs)).n_obs == 5


def test_effect_decomposition_takes_masks_and_obs_names(small_screen_model):
    model, adata = small_screen_model
    before = adata.copy()
    mask = adata.obs["perturbation"].astype(str).isin(["control", "p2"]).to_numpy()
    kwargs = {"min_cells": 5, "top_k": 5, "n_ate_samples": 8}
    expected = metrics.effect_decomposition(model, indices=np.flatnonzero(mask), **kwargs)
    assert list(expected.index) == ["p2"] and expected["n_cells"].tolist() == [80]
    pd.testing.assert_frame_equal(metrics.effect_decomposition(model, indices=mask, **kwargs), expected)
    by_name = metrics.effect_decomposition(model, indices=adata.obs_names[mask], **kwargs)
    pd.testing.assert_frame_equal(by_name, expected)
    _unchanged(adata, before, registered=True)
