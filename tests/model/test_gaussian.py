"""The Gaussian likelihood for normalised data, on the paper's Gaussian ground-truth simulation."""

import numpy as np
import pytest
import scvi

import sams_scvi

from ..conftest import TRAIN_KW

pytestmark = pytest.mark.slow  # trains for minutes; `make test-quick` leaves it out


@pytest.fixture(scope="module")
def gaussian_screen():
    return sams_scvi.data.simulate_sams_gaussian(
        n_perturbations=6,
        n_genes=30,
        n_latent=4,
        mask_prob=0.25,
        n_cells_per_perturbation=210,
        n_control_cells=420,
        combinations=["p0+p1", "p2+p3"],
        n_cells_per_combination=70,
        n_ate_samples=4000,
        seed=0,
    )


def test_gaussian_simulation_matches_its_specification(gaussian_screen):
    adata = gaussian_screen
    truth = adata.uns["simulation"]
    assert list(truth["ate"].index) == ["p0", "p1", "p2", "p3", "p4", "p5", "p0+p1", "p2+p3"]
    mask = truth["mask"].to_numpy()
    assert mask.shape == (6, 4) and mask.sum(1).min() >= 1
    magnitudes = np.abs(truth["embedding"].to_numpy())
    assert 4.0 < magnitudes.mean() < 6.0  # |e| ~ N(5, 0.5^2)
    # standardised signal (variance 1) plus noise making up 20% of each gene's variance
    np.testing.assert_allclose(adata.X.var(0), 1.25, rtol=0.1)
    assert (adata.X < 0).any()
    counts = adata.obs.groupby("split", observed=True).size()
    assert counts["train"] == 5 * counts["test"] and counts["validation"] == counts["test"]
    # the true ATE of a combination adds its singles' latent shifts, not their expression effects
    assert np.abs(truth["ate"].loc["p0+p1"] - truth["ate"].loc["p0"] - truth["ate"].loc["p1"]).max() > 0.05


def test_gaussian_model_recovers_true_effects_of_held_out_combinations(gaussian_screen):
    scvi.settings.seed = 0
    adata = gaussian_screen.copy()
    combos = adata.obs["perturbation"].astype(str).str.contains("+", regex=False).to_numpy()
    split = adata.obs["split"].to_numpy()
    train = np.flatnonzero((split == "train") & ~combos)
    val = np.flatnonzero((split == "validation") & ~combos)
    test = np.flatnonzero(combos)  # every combination cell is held out
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=64, likelihood="normal")
    model.train(max_epochs=150, datasplitter_kwargs={"external_indexing": [train, val, test]}, **TRAIN_KW)

    truth = adata.uns["simulation"]["ate"]
    ate = model.estimate_ate(["p0", "p1", "p2", "p3", "p4", "p5", "p0+p1", "p2+p3"], n_samples=500, progress_bar=False)
    assert ate.uns["scale"] == "data"
    assert sams_scvi.metrics.ate_pearson(ate, truth, perturbations=["p0", "p1", "p2", "p3", "p4", "p5"]) > 0.95
    # held-out doubles: the latent shifts add, which the expression-scale additive baseline cannot capture
    # (about 0.78 against the baseline's 0.64 at this seed)
    doubles = ["p0+p1", "p2+p3"]
    additive = sams_scvi.metrics.baseline_ate(adata, "additive", doubles, indices=train, scale="none")
    model_r = sams_scvi.metrics.ate_pearson(ate, truth, perturbations=doubles)
    assert model_r > 0.7
    assert model_r > sams_scvi.metrics.ate_pearson(additive, truth, perturbations=doubles)
    # data-scale observations: predictions and draws may be negative, and the held-out bound is finite
    prediction = model.predict_perturbation(["control", "p0"], indices=np.arange(5), progress_bar=False)
    assert (prediction.X < 0).any()
    draws = model.predict_perturbation(["p0"], indices=np.arange(5), expression="counts", progress_bar=False)
    assert np.any(draws.X != np.round(draws.X))
    assert np.isfinite(model.get_marginal_ll(indices=test, n_mc_samples=20))
    # evaluate() scores a Gaussian model against data ATEs on the data's own scale
    table = sams_scvi.evaluate(
        model, adata, [train, val, test], subsets=["test"], n_ate_samples=200, n_iwelbo_samples=10, progress_bar=False
    )
    assert table.loc["test", "pearson"] > 0.7, table
    observed = sams_scvi.metrics.observed_ate(adata, scale="none", perturbations=["p0"])
    assert observed.uns["scale"] == "data"
    np.testing.assert_allclose(
        observed.X[0],
        adata.X[adata.obs["perturbation"] == "p0"].mean(0) - adata.X[adata.obs["perturbation"] == "control"].mean(0),
        rtol=1e-4,
        atol=1e-5,
    )
