"""The format our predictions take for scverse's evaluation tools (checked here without the tools installed)."""

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import sams_scvi

from ..conftest import TRAIN_KW


def test_log1p_expression_is_a_normalized_draw(small_screen_model):
    model, adata = small_screen_model
    controls = np.flatnonzero(adata.obs["perturbation"] == "control")[:30]
    pred = model.predict_perturbation(["control", "p0"], indices=controls, expression="log1p", progress_bar=False)
    x = pred.X
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() < 15  # cell-eval's log1p range
    assert np.allclose(np.expm1(x.astype(np.float64)).sum(1), 1e4, rtol=1e-4)  # rows scaled to 1e4 before the log
    assert not np.allclose(x, np.round(x))  # not integers, so cell-eval does not normalise it again
    # a predictive draw, not a mean: two seeds give different cells
    other = model.predict_perturbation(
        ["control", "p0"], indices=controls, expression="log1p", seed=1, progress_bar=False
    )
    assert not np.allclose(x, other.X)


def test_log1p_expression_needs_counts():
    adata = sams_scvi.data.simulate_sams(n_perturbations=2, n_genes=10, n_cells_per_perturbation=20, n_control_cells=20)
    adata.X = np.log1p(adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X, dtype=np.float32))
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=2, n_hidden=8, likelihood="normal")
    model.train(max_epochs=1, **TRAIN_KW)
    with pytest.raises(ValueError, match="needs counts"):
        model.predict_perturbation(["p0"], expression="log1p", progress_bar=False)


def test_prediction_pair_matches_scanpy_and_labels(small_screen_model):
    model, adata = small_screen_model
    rng = np.random.default_rng(0)
    test = np.sort(rng.choice(adata.n_obs, 300, replace=False))
    predicted, observed = sams_scvi.tl.prediction_pair(model, indices=test, n_source_cells=25, progress_bar=False)

    key = predicted.uns["sams_scvi"]["perturbation_key"]
    control = predicted.uns["sams_scvi"]["control_value"]
    assert (key, control) == ("perturbation", "control")
    assert list(predicted.var_names) == list(observed.var_names) == list(adata.var_names)
    labels = set(adata.obs["perturbation"].iloc[test].astype(str))
    assert set(predicted.obs[key]) == set(observed.obs[key]) == labels and control in labels
    assert list(predicted.obs[key].cat.categories) == list(observed.obs[key].cat.categories)
    assert predicted.n_obs == 25 * len(labels)
    # the source cells are control cells outside the observed ones
    assert not set(predicted.obs["source_cell"]) & set(observed.obs_names)

    # observed: exactly what scanpy's normalize_total + log1p give the same cells
    reference = adata[test].copy()
    sc.pp.normalize_total(reference, target_sum=1e4)
    sc.pp.log1p(reference)
    x = observed.X.toarray() if sparse.issparse(observed.X) else observed.X
    ref = reference.X.toarray() if sparse.issparse(reference.X) else reference.X
    assert np.allclose(x, ref, atol=1e-5)
    assert observed.obs_names.equals(pd.Index(adata.obs_names[test]))


def test_prediction_pair_of_perturbed_test_cells_takes_other_controls(small_screen_model):
    """A combination split tests perturbed cells only: the observed controls then come from the other controls."""
    model, adata = small_screen_model
    labels = adata.obs["perturbation"].astype(str)
    perturbed = np.flatnonzero(labels.isin(["p0", "p0+p1"]))
    predicted, observed = sams_scvi.tl.prediction_pair(model, indices=perturbed, progress_bar=False)
    observed_controls = set(observed.obs_names[observed.obs["perturbation"] == "control"])
    assert len(observed_controls) >= (labels == "control").sum() // 2
    assert not observed_controls & set(predicted.obs["source_cell"])
    assert set(observed.obs["perturbation"]) == set(predicted.obs["perturbation"]) == {"control", "p0", "p0+p1"}


def test_prediction_pair_default_keeps_source_and_observed_controls_apart(small_screen_model):
    """Without `indices` every control cell is observed: half of them become the source cells instead."""
    model, adata = small_screen_model
    predicted, observed = sams_scvi.tl.prediction_pair(model, n_source_cells=None, progress_bar=False)
    n_controls = int((adata.obs["perturbation"] == "control").sum())
    observed_controls = set(observed.obs_names[observed.obs["perturbation"] == "control"])
    sources = set(predicted.obs["source_cell"])
    assert not observed_controls & sources
    assert len(observed_controls) + len(sources) == n_controls
    assert observed.n_obs == adata.n_obs - len(sources)


def test_prediction_pair_normalizes_indices(small_screen_model):
    model, adata = small_screen_model
    test = np.arange(0, adata.n_obs, 3)
    once, _ = sams_scvi.tl.prediction_pair(model, indices=test, n_source_cells=10, progress_bar=False)
    twice = sams_scvi.tl.prediction_pair(
        model, indices=np.concatenate([test, test[:50]]), perturbations="p0", n_source_cells=10, progress_bar=False
    )[1]
    assert twice.obs_names.is_unique  # duplicated indices count once
    assert set(twice.obs["perturbation"]) == {"control", "p0"}  # a single label is one label, not its letters
    controls = np.flatnonzero(adata.obs["perturbation"] == "control")
    with pytest.raises(ValueError, match="include observed control cells"):
        sams_scvi.tl.prediction_pair(model, indices=test, source_indices=controls, progress_bar=False)


def test_one_draw_per_cell_picks_one_posterior_sample_per_cell():
    import torch

    from sams_scvi.model._prediction import _one_draw_per_cell

    torch.manual_seed(0)
    n_draws, n_cells = 4, 50
    from sams_scvi.module._likelihoods import CountLikelihood

    mu = torch.arange(n_draws, dtype=torch.float32).reshape(n_draws, 1, 1, 1).expand(n_draws, n_cells, 2, 3)
    theta = torch.ones(3)
    picked = _one_draw_per_cell(CountLikelihood(mu / mu.sum(-1, keepdim=True).clamp(min=1), mu, theta), n_cells)
    assert picked.mu.shape == (n_cells, 2, 3) and picked.batch_shape == (n_cells, 2) and picked.theta is theta
    draws = picked.mu[:, 0, 0]
    assert set(draws.tolist()) == set(range(n_draws))  # cells come from different posterior samples
    assert torch.all(picked.mu == draws[:, None, None])  # one sample per cell, for all its labels and genes


def test_prediction_pair_errors_name_the_fix(small_screen_model):
    model, adata = small_screen_model
    only_p0 = np.flatnonzero(adata.obs["perturbation"].isin(["control", "p0"]))
    with pytest.raises(ValueError, match="no observed cells"):
        sams_scvi.tl.prediction_pair(model, indices=only_p0, perturbations=["p0", "p1"], progress_bar=False)


def test_quiet_dependencies_drops_only_the_noise():
    import logging
    import warnings

    from sams_scvi._logging import quiet_dependencies

    before = list(warnings.filters)
    lightning_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    lightning_logger.addHandler(handler)
    lightning_logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inside_filters = len(warnings.filters)
            with quiet_dependencies():
                lightning_logger.info("💡 Tip: install something")
                lightning_logger.info("GPU available: False")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
                warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
            assert len(warnings.filters) == inside_filters  # ours removed, nobody else's touched
        assert [r.getMessage() for r in records] == ["GPU available: False"]
        assert [str(w.message) for w in caught] == ["an unrelated warning"]
    finally:
        lightning_logger.removeHandler(handler)
    assert list(warnings.filters) == before
