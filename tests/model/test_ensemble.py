"""Bootstrap ensembles of models: resampled training sets, pooled ATEs and screens, and interval coverage."""

import numpy as np
import pandas as pd
import pytest

import sams_scvi


def test_bootstrap_ensemble(tmp_path):
    adata = sams_scvi.data.simulate_sams(
        n_perturbations=3, n_genes=20, n_latent=3, n_cells_per_perturbation=60, n_control_cells=120, n_ate_samples=200
    )
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    models = sams_scvi.bootstrap_models(
        adata,
        n_models=3,
        model_kwargs={"n_latent": 3, "n_hidden": 16},
        train_kwargs={"max_epochs": 2, "enable_progress_bar": False},
        progress_bar=False,
    )
    labels = adata.obs["perturbation"].astype(str)
    for model in models:
        resample = model.train_indices
        assert len(resample) == adata.n_obs and len(np.unique(resample)) < adata.n_obs  # cells drawn with repeats
        pd.testing.assert_series_equal(  # every label keeps its number of cells
            labels.iloc[resample].value_counts().sort_index(), labels.value_counts().sort_index()
        )
        np.testing.assert_array_equal(model.module.train_perturbation_counts.numpy(), [60, 60, 60])
    assert not np.array_equal(models[0].train_indices, models[1].train_indices)

    ensemble = sams_scvi.ensemble_ate(models, ["p0", "p1+p2"], n_samples=200, progress_bar=False)
    single = [m.estimate_ate(["p0", "p1+p2"], n_samples=200, progress_bar=False) for m in models]
    values = np.stack([e.X for e in single]).astype(float)
    np.testing.assert_allclose(ensemble.X, values.mean(0), rtol=1e-5, atol=1e-6)
    mc = np.mean([e.layers["mc_se"].astype(float) ** 2 for e in single], axis=0)
    between = np.clip(values.var(0, ddof=1) - mc, 0, None)
    within = np.mean([e.layers["posterior_sd"].astype(float) ** 2 for e in single], axis=0)
    total = np.sqrt(within + (4 / 3) * between + mc / 3)
    np.testing.assert_allclose(ensemble.layers["total_sd"], total, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        ensemble.layers["ci_upper"] - ensemble.X, 2.920 * total, rtol=1e-3, atol=1e-5
    )  # t quantile 0.95, 2 df
    assert ensemble.uns["n_models"] == 3

    screen = sams_scvi.ensemble_screen(models, ["p0+p1", "p1+p2"], n_samples=100, progress_bar=False)
    singles = [m.screen_combinations(["p0+p1", "p1+p2"], n_samples=100, progress_bar=False) for m in models]
    for layer in (None, "non_additivity"):
        stacked = np.stack([(s_.to_df(layer).loc[screen.obs_names]).to_numpy() for s_ in singles])
        values = screen.X if layer is None else screen.layers[layer]
        np.testing.assert_allclose(values, stacked.mean(0), rtol=1e-5, atol=1e-6)
    assert screen.obs["non_additivity_norm"].is_monotonic_decreasing and screen.uns["n_models"] == 3
    np.testing.assert_allclose(screen.X - screen.layers["additive"], screen.layers["non_additivity"], atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        sams_scvi.bootstrap_models(adata, n_models=1)
    with pytest.raises(ValueError, match="datasplitter_kwargs"):
        sams_scvi.bootstrap_models(adata, train_kwargs={"datasplitter_kwargs": {}})


@pytest.mark.slow
def test_bootstrap_intervals_cover_true_effects():
    adata = sams_scvi.data.simulate_sams(
        n_perturbations=4, n_genes=50, n_latent=4, effect_size=3.0, n_cells_per_perturbation=150, n_control_cells=300
    )
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    models = sams_scvi.bootstrap_models(
        adata,
        n_models=5,
        model_kwargs={"n_latent": 4, "n_hidden": 64},
        train_kwargs={"max_epochs": 250, "enable_progress_bar": False},
        progress_bar=False,
    )
    labels = ["p0", "p1", "p2", "p3"]
    ate = sams_scvi.ensemble_ate(models, labels, n_samples=2000, progress_bar=False)
    truth = adata.uns["simulation"]["ate"].loc[labels, ate.var_names].to_numpy()
    inside = (truth >= ate.layers["ci_lower"]) & (truth <= ate.layers["ci_upper"])
    assert 0.8 <= inside.mean() <= 1.0, inside.mean()  # nominal 0.9
