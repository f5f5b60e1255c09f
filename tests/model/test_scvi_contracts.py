"""scvi-tools' model and module contracts on SAMS-VAE: posterior predictive sampling, criticism, getters."""

import numpy as np
import pytest
import scvi
import torch

import sams_scvi
from sams_scvi.module import CountLikelihood, GaussianLikelihood

from ..conftest import TRAIN_KW


def test_module_sample_draws_one_row_per_cell_under_penetrance(small_screen_model):
    model, adata = small_screen_model
    assert model.module.models_penetrance  # the default: a perturbed cell has two response patterns
    tensors = next(iter(model._make_data_loader(adata=adata, indices=np.arange(64), batch_size=64)))
    one = model.module.sample(tensors)
    several = model.module.sample(tensors, n_samples=3)
    assert one.shape == (64, adata.n_vars) and several.shape == (64, adata.n_vars, 3)
    assert torch.all(several >= 0) and torch.all(several == several.round())  # counts


def test_posterior_predictive_sample_matches_the_data_on_average(small_screen_model):
    model, adata = small_screen_model
    draws = model.posterior_predictive_sample(n_samples=4, seed=0)
    assert draws.shape == (adata.n_obs, adata.n_vars, 4)
    dense = draws.todense()
    again = model.posterior_predictive_sample(n_samples=4, seed=0).todense()
    np.testing.assert_array_equal(dense, again)  # reproducible by seed
    observed = np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X)
    # library sizes are the observed ones: each cell's simulated total follows its own total
    r = np.corrcoef(dense.sum(1).mean(-1), observed.sum(1))[0, 1]
    assert r > 0.8, r
    genes = model.posterior_predictive_sample(gene_list=list(adata.var_names[:3]), seed=0)
    assert genes.shape == (adata.n_obs, 3)
    with pytest.raises(KeyError, match="not trained on"):
        model.posterior_predictive_sample(gene_list=["no-such-gene"])


def test_scvi_tools_posterior_predictive_check_runs(small_screen_model):
    from scvi.criticism import PosteriorPredictiveCheck

    model, adata = small_screen_model
    observed = adata.copy()
    observed.X = observed.X.toarray()  # scvi-tools 1.4's check compares sparse counts with np.all, which fails
    check = PosteriorPredictiveCheck(observed, {"sams": model}, n_samples=2)
    check.coefficient_of_variation("features")
    check.coefficient_of_variation("cells")
    check.zero_fraction()
    cv_genes = check.metrics["cv_gene"]
    assert list(cv_genes.columns) == ["sams", "Raw"] and len(cv_genes) == adata.n_vars
    check.differential_expression(de_groupby="perturbation", p_val_thresh=0.2)
    summary = check.metrics["diff_exp"]["summary"]
    assert set(summary["group"]) == set(adata.obs["perturbation"].astype(str))


def test_likelihood_parameters_and_library_sizes(small_screen_model):
    model, adata = small_screen_model
    parameters = model.get_likelihood_parameters(indices=np.arange(30), seed=0)
    assert set(parameters) == {"mean", "dispersions"}
    assert parameters["mean"].shape == (30, adata.n_vars) and np.all(parameters["mean"] > 0)
    theta = model.module.log_dispersion.exp().detach().numpy()
    np.testing.assert_allclose(parameters["dispersions"], np.broadcast_to(theta, (30, adata.n_vars)), rtol=1e-6)
    totals = np.asarray(adata.X[:30].sum(1)).ravel()
    np.testing.assert_allclose(parameters["mean"].sum(1), totals, rtol=1e-3)  # NB means at the observed library
    several = model.get_likelihood_parameters(indices=np.arange(30), n_samples=3, seed=0)
    assert several["mean"].shape == (3, 30, adata.n_vars)
    library = model.get_latent_library_size(indices=np.arange(30))
    np.testing.assert_allclose(library.ravel(), totals)


def test_latent_representation_in_scvi_tools_signature(small_screen_model):
    model, _ = small_screen_model
    mean = model.get_latent_representation()
    np.testing.assert_allclose(mean, model.get_latent(), rtol=1e-5, atol=1e-6)
    loc, scale = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(loc, mean, rtol=1e-5, atol=1e-6)
    assert scale.shape == mean.shape and np.all(scale > 0)
    np.random.seed(0)
    draws = np.stack([model.get_latent_representation(give_mean=False) for _ in range(30)])
    standardised = (draws.mean(0) - mean) / (scale / np.sqrt(30))
    assert np.abs(standardised).mean() < 1.2  # draws scatter around the mean with the reported spread


def test_feature_correlation_matrix(small_screen_model):
    model, adata = small_screen_model
    corr = model.get_feature_correlation_matrix(n_samples=2, correlation_type="pearson")
    assert corr.shape == (adata.n_vars, adata.n_vars) and list(corr.index) == list(adata.var_names)
    np.testing.assert_allclose(np.diag(corr), 1.0, atol=1e-6)
    np.testing.assert_allclose(corr.to_numpy(), corr.to_numpy().T, atol=1e-10)
    with pytest.raises(ValueError, match="spearman"):
        model.get_feature_correlation_matrix(correlation_type="kendall")


def test_importance_weighted_de_says_why_it_is_not_available(small_screen_model):
    model, _ = small_screen_model
    with pytest.raises(NotImplementedError, match="shared by every cell"):
        model.differential_expression(groupby="perturbation", group1="p0", weights="importance")


def test_generative_returns_the_likelihood_distribution():
    module = sams_scvi.module.SAMSModule(n_input=6, n_perturbations=2, n_latent=3, n_hidden=8)
    z, library = torch.randn(4, 5, 3), torch.full((5,), 50.0)
    px = module.generative(z, library)["px"]
    assert isinstance(px, CountLikelihood) and px.batch_shape == (4, 5) and px.event_shape == (6,)
    torch.testing.assert_close(px.mean.sum(-1), library.expand(4, 5) + 6e-4)
    x = torch.poisson(torch.full((5, 6), 8.0))
    textbook = scvi.distributions.NegativeBinomial(mu=px.mu, theta=px.theta).log_prob(x).sum(-1)
    torch.testing.assert_close(px.log_prob(x), textbook, rtol=1e-5, atol=1e-4)
    normal = sams_scvi.module.SAMSModule(n_input=6, n_perturbations=2, n_latent=3, n_hidden=8, likelihood="normal")
    px = normal.generative(z, library)["px"]
    assert isinstance(px, GaussianLikelihood)
    textbook = torch.distributions.Normal(px.loc, px.scale).log_prob(x).sum(-1)
    torch.testing.assert_close(px.log_prob(x), textbook)


def test_decode_applies_each_condition_to_every_basal_state():
    torch.manual_seed(0)
    module = sams_scvi.module.SAMSModule(n_input=6, n_perturbations=3, n_latent=4, n_hidden=8)
    shift = torch.randn(2, 3, 4)
    design = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0]])
    z_basal = torch.randn(2, 5, 4)
    z = module.perturbed_latent(z_basal, design, shift)
    assert z.shape == (2, 5, 3, 4)
    torch.testing.assert_close(z[:, :, 0], z_basal)  # control: no shift
    torch.testing.assert_close(z[:, :, 2], z_basal + shift[:, None, 0] + shift[:, None, 1])
    px = module.decode(z_basal, design, shift, torch.full((5,), 100.0))
    assert px.batch_shape == (2, 5, 3)


def test_decode_draws_responses_under_penetrance():
    torch.manual_seed(0)
    module = sams_scvi.module.SAMSModule(
        n_input=6, n_perturbations=1, n_latent=2, n_hidden=8, penetrance=True, penetrance_init=0.3
    )
    shift = torch.ones(1, 1, 2)
    z = module.perturbed_latent(torch.zeros(1, 4000, 2), torch.tensor([[1.0]]), shift)
    responded = z[0, :, 0, 0]
    assert set(responded.unique().tolist()) == {0.0, 1.0}
    assert abs(responded.mean().item() - 0.3) < 0.03


def test_bf16_mixed_precision_trains():
    """The likelihood is computed in float32 under autocast, so a bf16 run trains with a finite loss."""
    adata = sams_scvi.data.simulate_sams(n_perturbations=3, n_genes=20, n_latent=3, n_cells_per_perturbation=40)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=1, precision="bf16-mixed", **TRAIN_KW)
    assert np.all(np.isfinite(model.history["elbo_train"].to_numpy(float)))


def test_scvi_tools_criticism_report(tmp_path):
    from scvi.criticism import create_criticism_report

    adata = sams_scvi.data.simulate_sams(n_perturbations=3, n_genes=20, n_latent=3, n_cells_per_perturbation=40)
    adata.X = adata.X.toarray()  # scvi-tools 1.4's check compares sparse counts with np.all, which fails
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, **TRAIN_KW)
    create_criticism_report(model, n_samples=2, save_folder=str(tmp_path))
    report = __import__("json").loads((tmp_path / "metrics.json").read_text())
    assert set(report) == {"cell_wise_cv", "gene_wise_cv", "diff_exp"}
    for group in ("control", "p0", "p1", "p2"):  # DE is grouped by the perturbation labels
        assert group in report["diff_exp"]
