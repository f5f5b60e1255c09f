"""The quick-start demo: SAMS-VAE on the bundled TAP-seq screen, end to end."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import scvi

from . import data, metrics, pl
from ._utils import _scvi_seed
from .model import SAMSVAE

MIN_HELD_OUT_CELLS = 10  # targets with fewer held-out cells are not scored (their observed ATE is noise)


def run_demo(
    output_dir: str | Path = "demo_output", max_epochs: int | None = None, seed: int = 0, progress_bar: bool = True
) -> dict:
    """Train SAMS-VAE on the Schraivogel 2020 TAP-seq screen and write its results.

    Writes to ``output_dir``: the trained model (``model/``), the ATE table (``ate.csv``, perturbations x
    genes, log2 scale, sampled at the data's median library), its Monte-Carlo standard errors (``ate_se.csv``), and
    a figure of predicted against observed ATEs (``ate_scatter.png``). The model trains on a random 90% of the cells;
    its ATEs of the single targets are scored against those observed on the other 10%, next to the training cells'
    own mean per target (Pearson r over targets x genes, and the slope through the origin: 1 = full size), and
    beside the noise ceiling of r (:func:`~sams_scvi.metrics.full_sample_ceiling` of the held-out cells' split
    halves).

    Parameters
    ----------
    output_dir
        Folder for the outputs (created if missing).
    max_epochs
        Training epochs; ``None``: ``train()``'s default length for this screen (211 epochs).
    seed
        Random seed (scvi-tools' ``settings.seed``).
    progress_bar
        Show progress bars.

    Returns
    -------
    A summary dictionary (also printed by the command line).
    """
    workers = scvi.settings.dl_num_workers
    scvi.settings.dl_num_workers = 0
    try:
        with _scvi_seed(seed):  # the caller's seed and random states return afterwards
            return _run_demo(Path(output_dir), max_epochs, seed, progress_bar)
    finally:
        scvi.settings.dl_num_workers = workers


def _run_demo(output_dir: Path, max_epochs: int | None, seed: int, progress_bar: bool) -> dict:
    import matplotlib.pyplot as plt  # no matplotlib.use(): the caller's backend is theirs; the figure is only saved

    output_dir.mkdir(parents=True, exist_ok=True)
    adata = data.schraivogel2020_tapseq()
    SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
    model = SAMSVAE(adata)
    start = time.perf_counter()
    model.train(
        max_epochs=max_epochs,
        enable_progress_bar=progress_bar,
        check_val_every_n_epoch=10 if max_epochs is None else max(1, max_epochs // 10),
    )
    train_seconds = time.perf_counter() - start
    model.save(output_dir / "model", overwrite=True)

    # by default at the data's median library: the depth at which the observed ATEs below are computed
    ate = model.estimate_ate(progress_bar=progress_bar)
    ate.to_df().to_csv(output_dir / "ate.csv")
    ate.to_df(layer="mc_se").to_csv(output_dir / "ate_se.csv")

    # scored on the cells training never saw (the 10% validation split), against the estimate every biologist
    # computes: the training cells' own mean per target, on the same held-out cells
    held_out, trained_on = model.validation_indices, model.train_indices
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    counts = pd.Series(labels[held_out]).value_counts()
    singles = sorted(p for p, n in counts.items() if p != "control" and "+" not in p and n >= MIN_HELD_OUT_CELLS)
    observed = metrics.observed_ate(adata, indices=held_out, perturbations=singles)
    model_scores = metrics.ate_metrics(ate, observed, perturbations=singles)
    training_mean = metrics.observed_ate(adata, indices=trained_on, perturbations=singles)
    baseline_scores = metrics.ate_metrics(training_mean, observed, perturbations=singles)
    # the best r any noise-free prediction can expect against these noisy held-out ATEs
    halves = metrics.split_half_ceiling(adata, perturbations=singles, indices=held_out, seed=seed)
    ceiling = metrics.full_sample_ceiling(halves["pearson"])

    ax = pl.ate_scatter(ate[singles], observed, show=False)
    ax.set_title(
        f"TAP-seq, {len(singles)} single targets, {len(held_out)} held-out cells\n"
        f"r = {model_scores['pearson']:.2f}, slope = {model_scores['slope']:.2f} (training-cell mean: "
        f"{baseline_scores['pearson']:.2f}, {baseline_scores['slope']:.2f})",
        fontsize=9,
    )
    ax.figure.tight_layout()
    ax.figure.savefig(output_dir / "ate_scatter.png", dpi=150)
    plt.close(ax.figure)

    # A combination never observed in the data: its effect is the sum of the learned sparse shifts.
    observed_labels = set(adata.obs["perturbation"].astype(str))
    unseen = next(
        f"{a}+{b}"
        for a in model.perturbations
        for b in model.perturbations
        if a < b and f"{a}+{b}" not in observed_labels
    )
    unseen_ate = model.estimate_ate([unseen], n_samples=1000, library_size="median", progress_bar=False)
    unseen_ate = unseen_ate.to_df().iloc[0]
    top_gene = unseen_ate.abs().idxmax()

    history = model.history["elbo_train"]["elbo_train"].to_numpy()
    summary = {
        "dataset": f"Schraivogel 2020 TAP-seq, {adata.n_obs} cells x {adata.n_vars} genes, "
        f"{len(model.perturbations)} targets, {int((adata.obs['perturbation'].astype(str).str.contains('+', regex=False)).sum())} "
        "multi-target cells",
        "train_seconds": round(train_seconds, 1),
        "elbo_first_epoch": round(-float(history[0]), 2),
        "elbo_last_epoch": round(-float(history[-1]), 2),
        "held_out_cells": len(held_out),
        "ate_pearson_held_out": round(float(model_scores["pearson"]), 3),
        "ate_pearson_top20_held_out": round(float(model_scores["pearson_top20"]), 3),
        "ate_slope_held_out": round(float(model_scores["slope"]), 3),
        "training_mean_pearson_held_out": round(float(baseline_scores["pearson"]), 3),
        "training_mean_slope_held_out": round(float(baseline_scores["slope"]), 3),
        "noise_ceiling_pearson_held_out": round(ceiling, 3),
        "mask_active_fraction": round(float((model.get_mask_probabilities().to_numpy() > 0.5).mean()), 3),
        "penetrance_range": "{:.2f}-{:.2f}".format(*model.get_penetrance().agg(["min", "max"])),
        "unseen_combination": unseen,
        "unseen_top_gene": f"{top_gene} ({unseen_ate[top_gene]:+.2f} log2)",
        "output_dir": str(output_dir.resolve()),
    }
    return summary
