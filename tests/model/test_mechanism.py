"""Where a perturbation's effect goes: the decomposition diagnostic and the control-basal ATE estimator."""

import numpy as np
import pytest
import scvi
import torch

import sams_scvi

from ..conftest import TRAIN_KW


@pytest.fixture(scope="module")
def simulated_model():
    """SAMS-VAE (mean-field guide: free embedding parameters to edit) trained on a screen with strong effects.

    The paper's model (every cell responds, as in this simulation): the tests edit its mechanism and read the
    estimators; penetrance has its own tests.
    """
    scvi.settings.seed = 0
    adata = sams_scvi.data.simulate_sams(
        n_perturbations=4, n_genes=40, n_latent=4, effect_size=3.0, n_cells_per_perturbation=200, seed=0
    )
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=64, guide="mean_field", mask_init_logit=2.0, penetrance=False)
    model.train(max_epochs=60, plan_kwargs={"global_lr_factor": 10.0, "align_at": None}, **TRAIN_KW)
    return model, adata


def _switch_off(model, perturbation: str) -> None:
    """Turn a perturbation's mechanism off: every mask entry certainly 0."""
    t = model.perturbations.index(perturbation)
    with torch.no_grad():
        model.module.mechanism.mask_logits[t] = -50.0


def test_decomposition_attributes_effects_where_they_are(simulated_model):
    model, adata = simulated_model
    table = sams_scvi.metrics.effect_decomposition(model, n_ate_samples=300)
    assert list(table.index) == ["p0", "p1", "p2", "p3"]
    assert set(table.attrs["pooled"].index) >= {"slope_fitted", "slope_counterfactual", "slope_ate"}
    # trained: the mechanism carries the shifts, and its counterfactuals reproduce a sizeable part of the effects
    assert (table["mechanism_fraction"] > 0.5).all(), table
    assert (table["slope_counterfactual"] > 0.3).all(), table

    # a perturbation whose mechanism is switched off: nothing is carried by it, nothing is predicted from it,
    # while the others are untouched
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    try:
        _switch_off(model, "p0")
        off = sams_scvi.metrics.effect_decomposition(model, n_ate_samples=300)
    finally:
        model.module.load_state_dict(state)
    assert off.loc["p0", "mechanism_norm"] == 0
    assert off.loc["p0", "n_active_dims"] == 0
    assert abs(off.loc["p0", "slope_counterfactual"]) < 0.1
    assert abs(off.loc["p0", "slope_ate"]) < 0.1
    np.testing.assert_allclose(off.loc["p1", "mechanism_norm"], table.loc["p1", "mechanism_norm"], rtol=1e-5)
    assert off.loc["p1", "slope_counterfactual"] > 0.3


def test_decomposition_argument_checks(simulated_model):
    model, adata = simulated_model
    controls = np.flatnonzero(adata.obs["perturbation"] == "control")
    with pytest.raises(ValueError, match="at least"):
        sams_scvi.metrics.effect_decomposition(model, indices=controls)
    perturbed = np.flatnonzero(adata.obs["perturbation"] != "control")
    with pytest.raises(ValueError, match="no control cells"):
        sams_scvi.metrics.effect_decomposition(model, indices=perturbed)


def test_ate_from_control_basal_states(simulated_model):
    model, adata = simulated_model
    truth = adata.uns["simulation"]["ate"]
    ate = model.estimate_ate(n_samples=400, basal="control", progress_bar=False)
    assert ate.shape == (4, adata.n_vars) and np.all(np.isfinite(ate.X))
    assert sams_scvi.metrics.ate_pearson(ate, truth) > 0.8
    with pytest.raises(ValueError, match="basal"):
        model.estimate_ate(basal="posterior", progress_bar=False)

    # without a mechanism, the paired counterfactual has no effect beyond count noise, and that noise is smaller
    # than with the paper's independent prior draws per condition
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    try:
        _switch_off(model, "p0")
        paired = model.estimate_ate(["p0"], n_samples=400, basal="control", progress_bar=False)
        prior = model.estimate_ate(["p0"], n_samples=400, basal="prior", progress_bar=False)
    finally:
        model.module.load_state_dict(state)
    assert np.all(np.abs(paired.X) < 4 * paired.layers["mc_se"] + 1e-3)  # zero, within Monte-Carlo error
    assert np.abs(paired.X).mean() < np.abs(prior.X).mean()


@pytest.mark.parametrize("guide", ["correlated", "mean_field"])
def test_embedding_init_scale(guide):
    module = sams_scvi.module.SAMSModule(
        n_input=10, n_perturbations=3, n_latent=5, guide=guide, embedding_init_scale=0.1, mask_init_logit=20.0
    )
    torch.manual_seed(0)
    embedding = module.sample_globals(2000, with_kl=False)["embedding"]
    # the correlated guide's network adds a spread around its bias, as at the reference's scale 1
    typical = embedding.std(0).log().mean().exp().item()
    assert 0.08 < typical < 0.12, typical


def test_default_recipe_puts_a_strong_effect_into_the_mechanism():
    """Short training: the default recipe carries strong simulated effects in the mechanism at near full size."""
    adata = sams_scvi.data.simulate_sams(
        n_perturbations=4, n_genes=40, n_latent=4, effect_size=3.0, n_cells_per_perturbation=200, seed=1
    )
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    tables = {}
    for recipe in ("fast", "reference"):
        scvi.settings.seed = 0
        model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=64, recipe=recipe)
        model.train(max_epochs=40, **TRAIN_KW)
        tables[recipe] = sams_scvi.metrics.effect_decomposition(model, n_ate_samples=300)
    fast, reference = tables["fast"], tables["reference"]
    assert (fast["mechanism_fraction"] > 0.8).all(), fast
    assert (fast["n_active_dims"] >= 1).all(), fast
    pooled_fast, pooled_reference = fast.attrs["pooled"], reference.attrs["pooled"]
    assert pooled_fast["slope_counterfactual"] > 0.7, pooled_fast
    assert pooled_fast["slope_ate"] > pooled_reference["slope_ate"] + 0.1, (pooled_fast, pooled_reference)


def test_recipe_arguments(tmp_path):
    adata = sams_scvi.data.simulate_sams(n_perturbations=2, n_genes=10, n_latent=2, n_cells_per_perturbation=20)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    with pytest.raises(ValueError, match="Unknown recipe"):
        sams_scvi.SAMSVAE(adata, recipe="slow")
    fast = sams_scvi.SAMSVAE(adata, n_latent=2)
    assert torch.all(fast.module.mask_logits == 3.0)
    assert fast._recipe_plan_kwargs == {
        "global_lr_factor": 10.0,
        "align_after_updates": 1000,
        "align_mask_logit": 8.0,
        "mask_hold": None,
    }
    reference = sams_scvi.SAMSVAE(adata, n_latent=2, recipe="reference")
    assert torch.all(reference.module.mask_logits == 0.0)
    explicit = sams_scvi.SAMSVAE(adata, n_latent=2, mask_init_logit=-1.0)  # an explicit argument wins
    assert torch.all(explicit.module.mask_logits == -1.0)
    reference.train(max_epochs=1, **TRAIN_KW)
    assert reference.trainer.lightning_module.global_lr_factor == 1.0
    fast.train(max_epochs=1, **TRAIN_KW)
    assert fast.trainer.lightning_module.global_lr_factor == 10.0
    fast.train(max_epochs=1, plan_kwargs={"global_lr_factor": 2.0}, **TRAIN_KW)  # an explicit setting wins
    assert fast.trainer.lightning_module.global_lr_factor == 2.0
    reference.save(tmp_path / "model")
    loaded = sams_scvi.SAMSVAE.load(tmp_path / "model", adata=adata)
    assert loaded._recipe_plan_kwargs == {"global_lr_factor": 1.0, "align_after_updates": None}


def test_control_basal_draws_keep_each_cell_with_its_covariates():
    """Every sample pairs one control cell's basal state with that same cell's covariates, for all conditions."""
    model = sams_scvi.SAMSVAE.__new__(sams_scvi.SAMSVAE)  # only the module's composition is needed
    model.module = sams_scvi.module.SAMSModule(n_input=3, n_perturbations=2, n_latent=2)
    n_cells = 7
    loc = torch.arange(n_cells, dtype=torch.float32)[:, None].repeat(1, 2)  # cell i sits at (i, i)
    scale = torch.zeros(n_cells, 2)
    codes = torch.arange(n_cells)[:, None] * 10  # cell i has covariate code 10 i
    basal, covariates = model._control_basal_draws((loc, scale, codes), 50)
    assert basal.shape == (50, 2) and covariates.shape == (50, 1)
    assert set(basal[:, 0].tolist()) <= set(range(n_cells)) and len(set(basal[:, 0].tolist())) > 1
    torch.testing.assert_close(basal[:, 1], basal[:, 0])  # a cell's own state ...
    torch.testing.assert_close(covariates[:, 0].float(), 10 * basal[:, 0])  # ... with its own cell's codes


@pytest.mark.parametrize("model_class", [sams_scvi.SVAEPlus, sams_scvi.ConditionalVAE])
def test_control_basal_ate_for_the_comparison_models(model_class):
    adata = sams_scvi.data.simulate_sams(n_perturbations=3, n_genes=20, n_latent=3, n_cells_per_perturbation=50)
    model_class.setup_anndata(adata, perturbation_key="perturbation")
    model = model_class(adata, n_latent=3, n_hidden=32)
    model.train(max_epochs=3, **TRAIN_KW)
    ate = model.estimate_ate(n_samples=50, basal="control", progress_bar=False)
    assert ate.shape == (3, 20) and np.all(np.isfinite(ate.X)) and ate.uns["basal"] == "control"
