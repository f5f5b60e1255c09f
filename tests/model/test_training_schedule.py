"""Training length, the recipe's schedule in updates per perturbation, and the convergence diagnostics."""

import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
import scvi

import sams_scvi
from sams_scvi.model._convergence import training_convergence
from sams_scvi.model._schedule import align_epoch

matplotlib.use("Agg")
pytestmark = pytest.mark.default_batch

TRAIN_KW = {"enable_progress_bar": False}


@pytest.fixture(scope="module")
def screen():
    scvi.settings.seed = 0
    adata = sams_scvi.data.simulate_sams(
        n_perturbations=4, n_genes=30, n_latent=4, n_cells_per_perturbation=60, n_control_cells=160, seed=1
    )
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    return adata


def test_alignment_is_keyed_to_updates_not_to_the_run_length():
    """After `after_updates` updates however long the run; half way through runs too short for that."""
    assert align_epoch(max_epochs=400, per_epoch=20, after_updates=1_000) == 50
    assert align_epoch(max_epochs=4_000, per_epoch=20, after_updates=1_000) == 50
    assert align_epoch(max_epochs=40, per_epoch=20, after_updates=1_000) == 20
    assert align_epoch(max_epochs=1, per_epoch=20, after_updates=1_000) == 1


def _alignment_epochs(adata, monkeypatch, **train_kwargs) -> list[int]:
    """Epochs at whose start the training plan aligned the latent axes."""
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    module_cls, plan_cls = type(model.module), model._training_plan_cls
    align, epoch_start = module_cls.align_mechanism, plan_cls.on_train_epoch_start
    calls, epochs = [], []

    def on_epoch_start(plan):
        before = len(calls)
        epoch_start(plan)
        if len(calls) > before:
            epochs.append(plan.current_epoch)

    with monkeypatch.context() as patch, warnings.catch_warnings():
        patch.setattr(module_cls, "align_mechanism", lambda m, *a, **k: calls.append(1) or align(m, *a, **k))
        patch.setattr(plan_cls, "on_train_epoch_start", on_epoch_start)
        warnings.simplefilter("ignore")  # short runs have not converged
        model.train(**TRAIN_KW, **train_kwargs)
    return epochs


@pytest.mark.slow
def test_longer_runs_align_at_the_same_point(screen, monkeypatch):
    """Doubling max_epochs leaves the alignment where it was (the 0.2 schedule moved it to half way)."""
    plan = {"align_after_updates": 24}
    # 400 cells x 0.9 at batch 64: 6 steps per epoch, each holding every perturbation -> epoch 4
    short = _alignment_epochs(screen, monkeypatch, max_epochs=10, batch_size=64, plan_kwargs=plan)
    long = _alignment_epochs(screen, monkeypatch, max_epochs=20, batch_size=64, plan_kwargs=plan)
    assert short == long == [4]
    old = _alignment_epochs(screen, monkeypatch, max_epochs=20, batch_size=64, plan_kwargs={"align_at": 0.5})
    assert old == [10]
    none = _alignment_epochs(screen, monkeypatch, max_epochs=6, batch_size=64, plan_kwargs={"align_at": None})
    assert none == []


def test_alignment_settings_are_checked(screen):
    model = sams_scvi.SAMSVAE(screen, n_latent=4, n_hidden=16)
    with pytest.raises(ValueError, match="either `align_after_updates`"):
        model.train(max_epochs=1, plan_kwargs={"align_after_updates": 10, "align_at": 0.5}, **TRAIN_KW)
    with pytest.raises(ValueError, match="positive integer"):
        model.train(max_epochs=1, plan_kwargs={"align_after_updates": 0.5}, **TRAIN_KW)


def _history(elbo, masks=None, penetrance=None) -> dict:
    history = {"elbo_train": pd.DataFrame({"elbo_train": elbo})}
    if masks is not None:
        history["mask_active_fraction_train"] = pd.DataFrame({"mask_active_fraction_train": masks})
    if penetrance is not None:
        history["penetrance_mean_train"] = pd.DataFrame({"penetrance_mean_train": penetrance})
    return history


def test_convergence_report():
    """A loss still falling or a mechanism still moving in the last quarter is unsettled; flat ones are settled."""
    rng = np.random.default_rng(0)
    flat = 100 + 0.01 * rng.standard_normal(40)
    falling = np.linspace(120, 100, 40)
    report = training_convergence(_history(flat, masks=np.full(40, 0.2), penetrance=np.full(40, 0.8)))
    assert report["quantity"].tolist() == ["objective", "masks", "penetrance"]
    assert report["settled"].tolist() == [True, True, True]
    assert (report["epochs"] == 10).all()
    report = training_convergence(_history(falling, masks=np.linspace(0.5, 0.1, 40), penetrance=np.full(40, 0.8)))
    assert report["settled"].tolist() == [False, False, True]
    # the objective fell by (20 / 39 * 9) / ~101.2 over the last 10 epochs
    assert report.loc[0, "change"] == pytest.approx(20 / 39 * 9 / np.mean(falling[-10:]), rel=1e-6)
    # a single epoch cannot be judged; a missing history gives an empty report
    assert np.isnan(training_convergence(_history([5.0]))["settled"].iloc[0])
    assert training_convergence(None).empty


def test_unconverged_model_warns_where_results_are_read(screen):
    """Two epochs: train, estimate_ate and differential_expression warn and name the fix; convergence() says why."""
    scvi.settings.seed = 0
    model = sams_scvi.SAMSVAE(screen, n_latent=4, n_hidden=16)
    with pytest.warns(UserWarning, match=r"not converged.*max_epochs=4"):
        model.train(max_epochs=2, **TRAIN_KW)
    report = model.convergence()
    assert set(report["quantity"]) == {"objective", "effects", "masks", "penetrance"}
    assert not report.set_index("quantity").loc["objective", "settled"]
    with pytest.warns(UserWarning, match="estimate_ate: Training has not converged"):
        model.estimate_ate(["p0"], n_samples=20, n_posterior_draws=2, progress_bar=False)
    with pytest.warns(UserWarning, match="differential_expression: Training has not converged"):
        model.differential_expression(groupby="perturbation", group1="p0", group2="control")
    figure = sams_scvi.pl.training_history(model, show=False, return_fig=True)
    axis = figure.axes[0]
    assert axis.get_title().startswith("not settled: objective")
    assert axis.get_ylabel() == "loss per cell (nats)"
    assert any("assessed" in text.get_text() for text in axis.get_legend().get_texts())


def test_converged_model_is_quiet(screen):
    """A model whose history is flat raises no convergence warning when its results are read."""
    scvi.settings.seed = 0
    model = sams_scvi.SAMSVAE(screen, n_latent=4, n_hidden=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=2, **TRAIN_KW)
    flat = np.full(20, 50.0)
    model.history_ = _history(flat, masks=np.full(20, 0.3), penetrance=np.full(20, 0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.estimate_ate(["p0"], n_samples=20, n_posterior_draws=2, progress_bar=False)
    assert model.convergence()["settled"].all()
