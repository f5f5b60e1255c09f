"""Credible intervals and combination screening against known truth; writes docs/results_discovery.md.

Run: ``python benchmarks/discovery_calibration.py [--seeds 0 1 2] [--epochs 100] [--resume]`` (a few minutes per seed
on 2 CPU cores). A screen is simulated from the SAMS generative process (``simulate_sams``: 10 perturbations, K = 10,
negative-binomial counts) with the true ATEs of every single and of all 45 pairs, none of which is observed. The
default model is trained on the singles; then, against the truth:

* coverage of ``estimate_ate``'s 90 % credible intervals for the seen singles and for the unseen pairs (the share
  of (perturbation, gene) entries whose true ATE lies inside), and the median of |error| / posterior sd (0.67 for a
  calibrated normal interval);
* the screen of ``screen_combinations``: Pearson r of the predicted against the true pair ATEs and non-additivity
  (ATE_ab - ATE_a - ATE_b, all genes), Spearman correlation of the pairs' non-additivity norms (does the ranking
  find the pairs that depart most from additivity?), and the coverage of the non-additivity intervals;
* the simple baselines on the same truth: the training cells' own mean ATE of each single, and the additive
  baseline (each pair predicted by the sum of its singles' observed ATEs); r, slope through the origin and R²
  for every predictor. No noise ceiling is needed: the true ATEs are known (20,000 Monte-Carlo samples each);
* a bootstrap ensemble (``bootstrap_models``, 5 models on resampled cells, ``ensemble_ate`` and
  ``ensemble_screen``): coverage of its intervals for the singles, the pairs and the non-additivity, and the median
  of |error| / total sd.
"""

from __future__ import annotations

import argparse
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch
from _markdown import markdown_table
from _runs import rows_by_seed
from scipy import stats

import sams_scvi
from sams_scvi import metrics

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCREEN = {"n_perturbations": 10, "n_latent": 10, "effect_size": 4.0}
LEVEL = 0.9
N_MODELS = 5


def slope_r2(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Least-squares slope through the origin of predicted on true effects, and R² of the prediction."""
    slope = float((predicted * truth).sum() / (truth**2).sum())
    return slope, float(1 - ((truth - predicted) ** 2).sum() / ((truth - truth.mean()) ** 2).sum())


def coverage(truth: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    return float(np.mean((truth >= lower) & (truth <= upper)))


def run(seed: int, epochs: int) -> dict:
    names = [f"p{t}" for t in range(SCREEN["n_perturbations"])]
    pairs = [f"{a}+{b}" for a, b in combinations(names, 2)]
    adata = sams_scvi.data.simulate_sams(**SCREEN, combinations=pairs, n_cells_per_combination=0, seed=seed)
    truth = adata.uns["simulation"]["ate"]
    scvi.settings.seed = seed
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=SCREEN["n_latent"])
    start = time.perf_counter()
    model.train(max_epochs=epochs, enable_progress_bar=False, check_val_every_n_epoch=epochs)
    train_seconds = time.perf_counter() - start

    row = {"seed": seed, "train_seconds": train_seconds}
    ate = model.estimate_ate(names, n_samples=5000, credible_level=LEVEL, progress_bar=False)
    true_singles = truth.loc[names, ate.var_names].to_numpy()
    row["singles_r"] = float(np.corrcoef(ate.X.ravel(), true_singles.ravel())[0, 1])
    row["singles_slope"], row["singles_r2"] = slope_r2(ate.X, true_singles)
    row["singles_coverage"] = coverage(true_singles, ate.layers["ci_lower"], ate.layers["ci_upper"])
    row["singles_abs_z_median"] = float(np.median(np.abs(ate.X - true_singles) / ate.layers["posterior_sd"]))
    row["singles_posterior_sd"] = float(np.median(ate.layers["posterior_sd"]))
    row["singles_mc_se"] = float(np.median(ate.layers["mc_se"]))

    start = time.perf_counter()
    screen = model.screen_combinations(pairs, n_samples=2000, credible_level=LEVEL, progress_bar=False)
    row["screen_seconds"] = time.perf_counter() - start
    labels = list(screen.obs_names)
    true_pairs = truth.loc[labels, screen.var_names].to_numpy()
    a, b = screen.obs["perturbation_a"], screen.obs["perturbation_b"]
    true_additive = truth.loc[a, screen.var_names].to_numpy() + truth.loc[b, screen.var_names].to_numpy()
    true_non_additivity = true_pairs - true_additive
    predicted = screen.layers["non_additivity"]
    row["pairs_r"] = float(np.corrcoef(screen.X.ravel(), true_pairs.ravel())[0, 1])
    row["pairs_slope"], row["pairs_r2"] = slope_r2(screen.X, true_pairs)
    row["pairs_coverage"] = coverage(true_pairs, screen.layers["ci_lower"], screen.layers["ci_upper"])
    row["non_additivity_r"] = float(np.corrcoef(predicted.ravel(), true_non_additivity.ravel())[0, 1])
    row["non_additivity_slope"] = float((predicted * true_non_additivity).sum() / (true_non_additivity**2).sum())
    row["non_additivity_coverage"] = coverage(
        true_non_additivity, screen.layers["non_additivity_lower"], screen.layers["non_additivity_upper"]
    )
    true_norm = np.sqrt(np.mean(true_non_additivity**2, axis=1))
    row["non_additivity_rank_spearman"] = float(stats.spearmanr(screen.obs["non_additivity_norm"], true_norm)[0])
    top = 10
    row["top10_overlap"] = len(set(np.argsort(-true_norm)[:top]) & set(range(top))) / top  # screen is ranked
    row["true_non_additivity_share"] = float(np.mean(true_non_additivity**2) / np.mean(true_pairs**2))

    start = time.perf_counter()
    models = sams_scvi.bootstrap_models(
        adata,
        n_models=N_MODELS,
        model_kwargs={"n_latent": SCREEN["n_latent"]},
        train_kwargs={"max_epochs": epochs, "enable_progress_bar": False},
        seed=seed,
        progress_bar=False,
    )
    ensemble = sams_scvi.ensemble_ate(models, names + pairs, n_samples=2000, credible_level=LEVEL, progress_bar=False)
    row["ensemble_seconds"] = time.perf_counter() - start
    for part, labels_ in (("singles", names), ("pairs", pairs)):
        rows_ = [ensemble.obs_names.get_loc(label) for label in labels_]
        true = truth.loc[labels_, ensemble.var_names].to_numpy()
        lower, upper = ensemble.layers["ci_lower"][rows_], ensemble.layers["ci_upper"][rows_]
        row[f"ensemble_{part}_r"] = float(np.corrcoef(ensemble.X[rows_].ravel(), true.ravel())[0, 1])
        row[f"ensemble_{part}_slope"], row[f"ensemble_{part}_r2"] = slope_r2(ensemble.X[rows_], true)
        row[f"ensemble_{part}_coverage"] = coverage(true, lower, upper)
        row[f"ensemble_{part}_abs_z_median"] = float(
            np.median(np.abs(ensemble.X[rows_] - true) / ensemble.layers["total_sd"][rows_])
        )

    ensemble_screen = sams_scvi.ensemble_screen(models, pairs, n_samples=2000, credible_level=LEVEL, progress_bar=False)
    ensemble_screen = ensemble_screen[labels]  # the single model's order
    predicted = ensemble_screen.layers["non_additivity"]
    row["ensemble_non_additivity_r"] = float(np.corrcoef(predicted.ravel(), true_non_additivity.ravel())[0, 1])
    row["ensemble_non_additivity_coverage"] = coverage(
        true_non_additivity,
        ensemble_screen.layers["non_additivity_lower"],
        ensemble_screen.layers["non_additivity_upper"],
    )
    row["ensemble_non_additivity_rank_spearman"] = float(
        stats.spearmanr(ensemble_screen.obs["non_additivity_norm"], true_norm)[0]
    )

    observed = metrics.observed_ate(adata, perturbations=names).to_df()
    additive = observed.loc[a].to_numpy() + observed.loc[b].to_numpy()
    row["additive_baseline_pairs_r"] = float(np.corrcoef(additive.ravel(), true_pairs.ravel())[0, 1])
    row["additive_baseline_pairs_slope"], row["additive_baseline_pairs_r2"] = slope_r2(additive, true_pairs)
    singles_mean = observed.loc[names, ate.var_names].to_numpy()
    row["training_mean_singles_r"] = float(np.corrcoef(singles_mean.ravel(), true_singles.ravel())[0, 1])
    row["training_mean_singles_slope"], row["training_mean_singles_r2"] = slope_r2(singles_mean, true_singles)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--output", type=Path, default=DOCS / "results_discovery.md")
    parser.add_argument("--resume", action="store_true", help="keep the seeds already in the output's .csv")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = rows_by_seed(args.output.with_suffix(".csv"), args.seeds, lambda seed: run(seed, args.epochs), args.resume)
    numeric = rows.drop(columns="seed").astype(float)
    per_seed = {f"seed {int(seed)}": numeric.iloc[i] for i, seed in enumerate(rows["seed"])}
    summary = pd.DataFrame({"mean": numeric.mean(), "sd": numeric.std(), **per_seed})
    text = [
        "# Credible intervals and combination screening on a simulated screen",
        "",
        f"Produced by `python benchmarks/discovery_calibration.py --epochs {args.epochs}` (seeds {args.seeds}; "
        f"torch {torch.__version__}, 2 threads). `simulate_sams({SCREEN})`, trained on the singles with the default "
        f"model for {args.epochs} epochs; {int(LEVEL * 100)} % credible intervals; all 45 pairs unseen. See the "
        "script's docstring for the definitions.",
        "",
        markdown_table(summary.map(lambda v: f"{v:.3g}").reset_index(names="metric")),
        "",
    ]
    args.output.write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
