"""Mechanism fidelity on a bundled screen: are effects predicted at full size? Writes docs/results_fidelity*.md.

Run: ``python benchmarks/mechanism_fidelity.py [--dataset tapseq | eccite] [--seeds 0 1 2] [--epochs N]`` (without
``--epochs``, ``train()``'s default length: about 4 minutes per setting and seed for TAP-seq on 2 CPU cores, 6 for
ECCITE-seq). For each training recipe and seed, the cells are split at random 80 / 10 / 10 into train /
validation / test; the model is trained on the training cells and scored on the single-target perturbations of the
held-out test cells, against the ATE observed on those cells:

* Pearson r and R² over all genes and over each perturbation's 20 most changed genes, and the least-squares slope
  through the origin of predicted on observed ATE (1: full size; below 1: shrunk);
* the same for the training cells' own mean per perturbation (the estimate every biologist computes), on the same
  test cells. Its slope is below 1 too, because the test cells' observed ATE is itself noisy (regression
  dilution): it is the reference a model's slope should reach;
* the decomposition of :func:`sams_scvi.metrics.effect_decomposition` (pooled slopes of the fitted,
  counterfactual and ATE stages), the fraction of active mask entries and the targets without any.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch
from _markdown import markdown_table

import sams_scvi
from sams_scvi import metrics

# name: (SAMSVAE arguments, plan_kwargs); every recipe trains for --epochs epochs (default: train()'s default length)
RECIPES = {
    "reference": ({"recipe": "reference"}, {}),
    "fast, no alignment": ({"recipe": "fast", "penetrance": False}, {"align_at": None}),
    "fast, no penetrance": ({"recipe": "fast", "penetrance": False}, {}),
    "fast (default)": ({"recipe": "fast"}, {}),
}
MIN_TEST_CELLS = 10


def split_cells(n_obs: int, seed: int) -> list[np.ndarray]:
    """Random 80 / 10 / 10 train / validation / test positions."""
    order = np.random.default_rng(seed).permutation(n_obs)
    n_test = n_obs // 10
    return [np.sort(order[2 * n_test :]), np.sort(order[n_test : 2 * n_test]), np.sort(order[:n_test])]


SCORES = ["pearson", "r2", "slope", "pearson_top20", "r2_top20", "slope_top20"]


def scores(predicted, observed, perturbations: list[str]) -> dict:
    """Pearson r, R² and slope through the origin, over all genes and the top 20 genes per perturbation."""
    return metrics.ate_metrics(predicted, observed, perturbations=perturbations, top_k=20)[SCORES].to_dict()


DATASETS = {
    "tapseq": ("TAP-seq (Schraivogel 2020)", sams_scvi.data.schraivogel2020_tapseq, "results_fidelity.md"),
    "eccite": ("ECCITE-seq (Papalexi 2021)", sams_scvi.data.papalexi2021_eccite, "results_fidelity_eccite.md"),
}


def held_out_singles(dataset: str, seed: int):
    """The screen, the seed's split, its scored single targets and the ATE observed on its test cells."""
    adata = DATASETS[dataset][1]()
    split = split_cells(adata.n_obs, seed)
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    test_labels = pd.Series(labels[split[2]]).value_counts()
    singles = sorted(p for p, n in test_labels.items() if p != "control" and "+" not in p and n >= MIN_TEST_CELLS)
    observed = metrics.observed_ate(adata, indices=split[2], perturbations=singles)
    return adata, split, singles, observed


def noise_ceiling(dataset: str, seed: int) -> dict:
    """The test cells against themselves: each label's test cells split in two random halves, one half's ATE
    scored against the other's (conservative: each half has half the cells)."""
    adata, split, singles, _ = held_out_singles(dataset, seed)
    halves = metrics.split_half_ceiling(adata, singles, indices=split[2], seed=seed, top_k=20)
    return {"predictor": "split-half ceiling (test cells)", **halves[SCORES].to_dict()}


def run(recipe: str, seed: int, epochs: int | None, dataset: str = "tapseq") -> list[dict]:
    model_kwargs, plan_kwargs = RECIPES[recipe]
    scvi.settings.seed = seed
    adata, split, singles, observed = held_out_singles(dataset, seed)

    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
    model = sams_scvi.SAMSVAE(adata, **model_kwargs)
    start = time.perf_counter()
    model.train(
        max_epochs=epochs,
        plan_kwargs=plan_kwargs or None,
        datasplitter_kwargs={"external_indexing": split},
        enable_progress_bar=False,
        check_val_every_n_epoch=10**6,  # no validation passes: the scores are on the test cells
    )
    seconds = time.perf_counter() - start
    probabilities = model.get_mask_probabilities().to_numpy()
    convergence = model.convergence().set_index("quantity")
    common = {
        "recipe": recipe,
        "seed": seed,
        "diverged": 0,
        "epochs": len(model.history["elbo_train"]),
        "train_seconds": seconds,
        "mask_active_fraction": float((probabilities > 0.5).mean()),
        "targets_without_mask": int(((probabilities > 0.5).sum(1) == 0).sum()),
        "objective_change": float(convergence.loc["objective", "change"]),
        "settled": float(convergence["settled"].astype(bool).all()),
        "unsettled": " ".join(convergence.index[convergence["settled"].eq(False)]),
    }
    training_mean = metrics.observed_ate(adata, indices=split[0], perturbations=singles)
    decomposition = metrics.effect_decomposition(model, indices=split[2], perturbations=singles, n_ate_samples=500)
    rows = [
        {"recipe": recipe, "seed": seed, "predictor": "training-cell mean", **scores(training_mean, observed, singles)}
    ]
    for basal in ("prior", "control"):
        ate = model.estimate_ate(singles, n_samples=1000, basal=basal, progress_bar=False)
        rows.append({**common, "predictor": f"SAMS-VAE, basal={basal}", **scores(ate, observed, singles)})
    ate = model.estimate_ate(singles, n_samples=1000, library_size=1e4, progress_bar=False)
    rows.append({**common, "predictor": "SAMS-VAE, basal=prior, library=1e4 (paper)", **scores(ate, observed, singles)})
    rows[1].update({f"decomposition_{k}": v for k, v in decomposition.attrs["pooled"].items()})
    return rows


def with_noise_free_ceiling(rows: pd.DataFrame, ceiling: str) -> pd.DataFrame:
    """Add, per seed, the r a noise-free prediction can expect against all test cells (from the split-half r)."""
    halves = rows[rows["predictor"] == ceiling]
    noise_free = pd.DataFrame(
        {
            "recipe": halves["recipe"],
            "seed": halves["seed"],
            "predictor": "noise-free prediction (ceiling of r)",
            "pearson": [metrics.full_sample_ceiling(r) for r in halves["pearson"]],
        }
    )
    return pd.concat([rows, noise_free], ignore_index=True)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ± standard deviation over seeds of every numeric column, per recipe and predictor."""
    labels = ("recipe", "seed", "predictor", "unsettled")
    numeric = [c for c in rows.columns if c not in labels and rows[c].notna().any()]
    rows = rows.astype(dict.fromkeys(numeric, float))
    grouped = rows.groupby(["recipe", "predictor"], sort=False)[numeric]
    mean, sd = grouped.mean(), grouped.std()
    text = mean.map(lambda v: f"{v:.3g}").astype(object) + " ± " + sd.map(lambda v: f"{v:.2g}").astype(object)
    return text.where(mean.notna(), "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: train()'s default length")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--dataset", choices=list(DATASETS), default="tapseq")
    parser.add_argument("--output", default=None, help="default: docs/results_fidelity[_eccite].md")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the output's .csv")
    args = parser.parse_args()
    scvi.settings.dl_num_workers = 0
    name, load, page = DATASETS[args.dataset]
    args.output = args.output or str(Path(__file__).parents[1] / "docs" / page)
    csv = Path(args.output).with_suffix(".csv")
    rows = pd.read_csv(csv) if args.resume and csv.exists() else pd.DataFrame(columns=["recipe", "seed"])
    for recipe in args.recipes:
        for seed in args.seeds:
            if ((rows["recipe"] == recipe) & (rows["seed"] == seed)).any():
                continue
            try:
                new = run(recipe, seed, args.epochs, args.dataset)
            except (ValueError, RuntimeError) as error:  # a run whose parameters became NaN: counted, not scored
                print(f"{recipe}, seed {seed}: diverged ({str(error)[:80]})")
                new = [{"recipe": recipe, "seed": seed, "predictor": "SAMS-VAE, basal=prior", "diverged": 1}]
            rows = pd.concat([rows, pd.DataFrame(new)], ignore_index=True)
            rows.to_csv(csv, index=False)  # after every run: a long benchmark keeps what it has done
    ceiling = "split-half ceiling (test cells)"
    lacking = [r for r in args.recipes if not ((rows["recipe"] == r) & (rows["predictor"] == ceiling)).any()]
    if lacking:  # data only: no training
        ceilings = {seed: noise_ceiling(args.dataset, seed) for seed in args.seeds}
        extra = [{"recipe": r, "seed": seed, **c} for r in lacking for seed, c in ceilings.items()]
        rows = pd.concat([rows, pd.DataFrame(extra)], ignore_index=True)
        rows.to_csv(csv, index=False)  # every recipe's runs stay in the .csv; the page shows --recipes
    table = summarise(with_noise_free_ceiling(rows[rows["recipe"].isin(args.recipes)], ceiling))
    keep = [
        "pearson",
        "pearson_top20",
        "r2",
        "r2_top20",
        "slope",
        "slope_top20",
        "epochs",
        "train_seconds",
        "mask_active_fraction",
        "targets_without_mask",
        "settled",
        "diverged",
    ]
    decomposition = [c for c in table.columns if c.startswith("decomposition_slope_") and "top20" not in c]
    Path(args.output).write_text(
        f"# Mechanism fidelity on {name}: effect sizes on held-out cells\n\n"
        f"Produced by `python benchmarks/mechanism_fidelity.py --dataset {args.dataset}"
        + (f" --epochs {args.epochs}" if args.epochs else "")
        + f"` (seeds {args.seeds}, mean ± sd "
        f"over seeds; torch {torch.__version__}, {torch.get_num_threads()} threads). Each seed draws its own random "
        f"80 / 10 / 10 split of the {load().n_obs:,} cells; scores are over the single targets with at least "
        f"{MIN_TEST_CELLS} test cells, against the ATE observed on the test cells (log2(1 + 1e4 x / sum x)). "
        "`slope` is the least-squares slope through the origin of predicted on observed ATE; the training-cell "
        "mean's slope is below 1 only because the test cells' ATE is noisy, so it is the level a model should "
        "reach. The split-half ceiling scores one random half of the test cells against the other (each half has "
        "half the cells, so it is conservative); the noise-free row turns its r into the r that a prediction without "
        "any error can expect against all test cells (`sams_scvi.metrics.full_sample_ceiling`, Spearman-Brown). "
        "Recipes: `reference` (the paper's model and settings), `fast, no "
        "alignment` and `fast, no penetrance` (the default without the axis alignment, or without modelling "
        "cells that escape their perturbation), `fast (default)` (both). Every run trains "
        + (f"for {args.epochs} epochs" if args.epochs else "for `train()`'s default length (`epochs`)")
        + ". The model's ATE is sampled at the data's median library (the default, the depth of the observed "
        "ATE); `library=1e4 (paper)` at the paper's 1e4.\n\n"
        + markdown_table(table[keep].reset_index(), index=None)
        + "\n\nWhere the magnitude goes (`sams_scvi.metrics.effect_decomposition`, pooled slopes on the test cells: "
        "fitted = the model's reconstruction of the cells, counterfactual = control cells' posterior basal states "
        "shifted by the mechanism, ate_control / ate = `estimate_ate(basal='control' / 'prior')` at the median "
        "library):\n\n"
        + markdown_table(
            table.xs("SAMS-VAE, basal=prior", level="predictor")[decomposition].rename(
                columns=lambda c: c.removeprefix("decomposition_")
            ),
            index="recipe",
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
