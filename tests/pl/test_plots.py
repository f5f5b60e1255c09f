"""The plots: each draws what it claims, returns axes or figures as scanpy's do, and leaves the data as it was."""

import numpy as np
import pandas as pd
import pytest

import sams_scvi


def test_plots(known, gaussian_screen, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mechanisms = known.get_mechanisms(module_distance=0.3)
    ax = sams_scvi.pl.mechanism_heatmap(mechanisms, show=False)
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(shown) == sorted(known.perturbations) and shown[-1] == "p5"  # "no mechanism" last
    fig = sams_scvi.pl.mechanism_heatmap(mechanisms, layer="mask_probability", save=tmp_path / "m.png", return_fig=True)
    assert isinstance(fig, plt.Figure) and (tmp_path / "m.png").stat().st_size > 0

    ate = known.estimate_ate(["p0", "p3"], n_samples=200, progress_bar=False)
    observed = sams_scvi.metrics.observed_ate(gaussian_screen, perturbations=["p0", "p3"], scale="none")
    ax = sams_scvi.pl.ate_intervals(ate, ["g0", "g1", "g2"], observed=observed, show=False)
    assert len(ax.containers) == 2  # one error-bar group per perturbation
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["p0", "p3"] and legend[-1] == "observed" and legend[-2].startswith("predicted (90 %")
    largest = ate.obs_names[np.abs(ate[:, ["g0"]].X).argmax()]
    ax = sams_scvi.pl.ate_intervals(ate, ["g0"], n_perturbations=1, show=False)  # the largest effect on g0 only
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [largest, "predicted (90 % interval)"]
    with pytest.raises(ValueError, match="not in the ATE"):
        sams_scvi.pl.ate_intervals(ate, ["nope"], show=False)

    ax = sams_scvi.pl.ate_scatter(ate, {"train": observed, "test": observed.to_df().iloc[:1]}, show=False)
    assert len(ax.collections) == 2 and [t.get_text()[:6] for t in ax.get_legend().get_texts()] == ["train:", "test: "]

    screen = known.screen_combinations(n_samples=100, progress_bar=False)
    ax = sams_scvi.pl.screen_volcano(screen, n_labels=3, show=False)
    assert len(ax.texts) == 3 and ax.texts[0].get_text() == screen.obs_names[0]
    assert ax.get_ylabel() == "genes with credible non-additivity" and ax.get_xlabel().startswith("non-additivity")
    assert sams_scvi.pl.screen_volcano(screen, show=True) is None  # shown: nothing returned, as in scanpy

    model = sams_scvi.SAMSVAE(known.adata, n_latent=2, n_hidden=8, likelihood="normal")
    model.train(max_epochs=2, check_val_every_n_epoch=1, enable_progress_bar=False)
    ax = sams_scvi.pl.training_history(model, show=False)
    assert [line.get_label() for line in ax.get_lines()] == [
        "train loss (negative ELBO)",
        "validation loss (negative ELBO)",
    ]
    with pytest.raises(ValueError, match="history"):
        sams_scvi.pl.training_history(model, keys=["nothing"], show=False)
    obs_before = known.adata.obs.copy()
    ax = sams_scvi.pl.latent_umap(known, indices=np.arange(150), n_neighbors=5, show=False)
    assert len(ax.collections) >= 1 and ax.get_title() == "perturbation"
    pd.testing.assert_frame_equal(known.adata.obs, obs_before)  # nothing written into the user's AnnData
    plt.close("all")
