import numpy as np
import pytest

import sams_scvi
from sams_scvi.model import MinifiedDataError

from ..conftest import TRAIN_KW


@pytest.fixture
def trained(tapseq):
    adata = tapseq[:1200].copy()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=2, **TRAIN_KW)
    return model, adata


def test_minified_model_keeps_latents_and_effects_without_counts(trained, tmp_path):
    model, adata = trained
    latent, perturbed = model.get_latent(), model.get_latent(representation="perturbed")
    mean, scale = model.get_latent_representation(return_dist=True)
    library = model.get_latent_library_size()
    ate = model.estimate_ate(["CPQ", "GATA1"], n_samples=40, progress_bar=False)
    control_loc, control_scale, _ = model._control_basal_posterior()
    predicted = model.predict_perturbation(["CPQ", "CPQ+GATA1"], n_samples=50, progress_bar=False)
    counts_before = adata.X.copy()

    model.minify_adata()
    assert model.is_minified and model.minified_data_type == "latent_posterior_parameters"
    assert model.adata is not adata and model.adata.X.nnz == 0
    assert (adata.X != counts_before).nnz == 0  # the user's data is untouched
    np.testing.assert_allclose(model.get_latent(), latent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_latent(representation="perturbed"), perturbed, rtol=1e-5, atol=1e-6)
    stored_mean, stored_scale = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(stored_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored_scale, scale, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.get_latent_library_size(), library)
    np.testing.assert_allclose(model.estimate_ate(["CPQ", "GATA1"], n_samples=40, progress_bar=False).X, ate.X)
    # basal="control" reads the control cells' stored posterior (its random draws come in another order)
    stored_loc, stored_scale, _ = model._control_basal_posterior()
    np.testing.assert_allclose(stored_loc.cpu(), control_loc.cpu(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored_scale.cpu(), control_scale.cpu(), rtol=1e-4, atol=1e-6)
    assert np.isfinite(model.estimate_ate(["CPQ"], n_samples=20, basal="control", progress_bar=False).X).all()
    # counterfactuals of the control cells are drawn from their stored posterior, the distribution encoding their
    # counts gives (the random draws come in another order, so the samples agree in distribution, not exactly)
    stored_prediction = model.predict_perturbation(["CPQ", "CPQ+GATA1"], n_samples=50, progress_bar=False)
    assert stored_prediction.obs_names.equals(predicted.obs_names)
    assert np.corrcoef(stored_prediction.X.ravel(), predicted.X.ravel())[0, 1] > 0.99
    for label in ("CPQ", "CPQ+GATA1"):
        rows = predicted.obs["perturbation"] == label
        np.testing.assert_allclose(stored_prediction.X[rows].mean(0), predicted.X[rows].mean(0), rtol=0.05)
    perturbed_cell = int(np.flatnonzero(adata.obs["perturbation"].astype(str).to_numpy() != "control")[0])

    for call in (
        lambda: model.get_normalized_expression(),
        lambda: model.get_marginal_ll(n_mc_samples=2),
        lambda: model.predict_perturbation(["CPQ"], indices=[perturbed_cell], progress_bar=False),
        lambda: model.train(max_epochs=1, **TRAIN_KW),
    ):
        with pytest.raises(MinifiedDataError, match="minify_adata replaced|control cells only"):
            call()
    assert model.get_normalized_expression(adata[:50].copy()).shape == (50, adata.n_vars)  # cells with counts

    model.save(tmp_path / "light", save_anndata=True)
    loaded = sams_scvi.SAMSVAE.load(tmp_path / "light")
    assert loaded.is_minified
    np.testing.assert_allclose(loaded.get_latent(), latent, rtol=1e-5, atol=1e-6)
