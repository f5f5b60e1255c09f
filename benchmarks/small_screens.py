"""Small screens: the default ``train()`` and ``estimate_ate()`` on ~3,000-cell subsamples of the bundled screens.

Run: ``python benchmarks/small_screens.py [--datasets tapseq eccite] [--seeds 0 1 2] [--lengths 1 2 4]`` (about
2 minutes per run at the default length on 2 CPU cores). Writes ``docs/results_small_screens.md`` and its ``.csv``.

A screen of a few thousand cells (pilot, arrayed and combinatorial screens) is where a training length chosen on
10,000 cells went wrong. For each seed, each single target of TAP-seq (Schraivogel 2020) or ECCITE-seq (Papalexi
2021) contributes at most 100 random cells (at most half of its cells) and control cells fill the screen to 3,000;
the model is trained on that screen alone, with every default. It is scored on all the remaining cells of those
labels, which it never saw, against their observed ATE (log2(1 + 1e4 x / sum x)), on the single targets: Pearson r,
R² and the least-squares slope through the origin, over all genes and each target's 20 most changed genes. Beside
it, on the same cells: the training cells' own mean per target, and the split-half noise ceiling of the test cells.
``--lengths`` trains also for multiples of the default number of epochs (longer must never be worse).
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
from mechanism_fidelity import SCORES, summarise

import sams_scvi
from sams_scvi import metrics

SCREEN_CELLS = 3_000
CELLS_PER_TARGET = 100
DATASETS = {
    "tapseq": ("TAP-seq", sams_scvi.data.schraivogel2020_tapseq),
    "eccite": ("ECCITE-seq", sams_scvi.data.papalexi2021_eccite),
}


def small_screen(adata, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Positions of the screen's cells and of the held-out test cells, and the scored single targets."""
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    singles = sorted({label for label in labels if label != "control" and "+" not in label})
    screen = []
    for target in singles:
        cells = np.flatnonzero(labels == target)
        screen.extend(rng.choice(cells, min(CELLS_PER_TARGET, len(cells) // 2), replace=False))
    controls = np.flatnonzero(labels == "control")
    screen.extend(rng.choice(controls, SCREEN_CELLS - len(screen), replace=False))
    screen = np.sort(np.asarray(screen))
    test = np.setdiff1d(np.flatnonzero(np.isin(labels, [*singles, "control"])), screen)
    test_counts = pd.Series(labels[test]).value_counts()
    scored = [target for target in singles if test_counts.get(target, 0) >= 10]
    return screen, test, scored


def run(dataset: str, seed: int, length: float) -> list[dict]:
    adata = DATASETS[dataset][1]()
    screen, test, singles = small_screen(adata, seed)
    observed = metrics.observed_ate(adata, indices=test, perturbations=singles)
    rows = []
    if length == 1:
        training_mean = metrics.observed_ate(adata, indices=screen, perturbations=singles)
        rows.append({"predictor": "training-cell mean", **_scores(training_mean, observed, singles)})
        halves = metrics.split_half_ceiling(adata, singles, indices=test, seed=seed, top_k=20)
        rows.append({"predictor": "split-half ceiling (test cells)", **halves[SCORES].to_dict()})
    cells = adata[screen].copy()
    sams_scvi.SAMSVAE.setup_anndata(cells, perturbation_key="perturbation", control_value="control")
    scvi.settings.seed = seed
    model = sams_scvi.SAMSVAE(cells)
    default_epochs = sams_scvi.model.default_max_epochs(int(np.ceil(0.9 * cells.n_obs)), None, CELLS_PER_TARGET * 0.9)
    start = time.perf_counter()
    model.train(max_epochs=None if length == 1 else int(round(length * default_epochs)), enable_progress_bar=False)
    seconds = time.perf_counter() - start
    probabilities = model.get_mask_probabilities().to_numpy()
    report = model.convergence().set_index("quantity")
    ate = model.estimate_ate(singles, progress_bar=False)
    rows.append(
        {
            "predictor": f"SAMS-VAE, {length:g}x default length",
            **_scores(ate, observed, singles),
            "epochs": len(model.history["elbo_train"]),
            "train_seconds": seconds,
            "targets_without_mask": int(((probabilities > 0.5).sum(1) == 0).sum()),
            "objective_change": float(report.loc["objective", "change"]),
            "settled": float(report["settled"].astype(bool).all()),
        }
    )
    return [{"dataset": dataset, "seed": seed, **row} for row in rows]


def _scores(predicted, observed, perturbations) -> dict:
    return metrics.ate_metrics(predicted, observed, perturbations=perturbations, top_k=20)[SCORES].to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lengths", type=float, nargs="+", default=[1.0])
    parser.add_argument("--output", default=str(Path(__file__).parents[1] / "docs" / "results_small_screens.md"))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the output's .csv")
    args = parser.parse_args()
    scvi.settings.dl_num_workers = 0
    csv = Path(args.output).with_suffix(".csv")
    rows = pd.read_csv(csv) if args.resume and csv.exists() else pd.DataFrame(columns=["dataset", "seed", "predictor"])
    for dataset in args.datasets:
        for length in args.lengths:
            for seed in args.seeds:
                name = f"SAMS-VAE, {length:g}x default length"
                if ((rows["dataset"] == dataset) & (rows["seed"] == seed) & (rows["predictor"] == name)).any():
                    continue
                rows = pd.concat([rows, pd.DataFrame(run(dataset, seed, length))], ignore_index=True)
                rows.to_csv(csv, index=False)
    rows = rows[rows["dataset"].isin(args.datasets)]
    tables = []
    for dataset in args.datasets:
        part = rows[rows["dataset"] == dataset].rename(columns={"dataset": "recipe"})
        table = summarise(part)
        keep = [
            c
            for c in [
                "pearson",
                "pearson_top20",
                "r2",
                "slope",
                "slope_top20",
                "epochs",
                "train_seconds",
                "targets_without_mask",
            ]
            if c in table.columns
        ]
        tables.append(
            f"## {DATASETS[dataset][0]}\n\n"
            + markdown_table(table[keep].reset_index().rename(columns={"recipe": "screen"}), index=None)
        )
    Path(args.output).write_text(
        "# Small screens: 3,000 cells, at most 100 per target\n\n"
        f"Produced by `python benchmarks/small_screens.py` (seeds {args.seeds}, mean ± sd over seeds; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads). Each seed subsamples its own screen: at most "
        f"{CELLS_PER_TARGET} random cells of each single target and control cells up to {SCREEN_CELLS:,}. The model "
        "is trained on that screen with every default (`train()`, `estimate_ate()`) and scored on all the other "
        "cells of those labels, which it never saw, against their observed ATE; the training-cell mean and the "
        "split-half noise ceiling are on the same test cells. `slope` is the least-squares slope through the origin "
        "of predicted on observed ATE.\n\n" + "\n\n".join(tables) + "\n"
    )


if __name__ == "__main__":
    main()
