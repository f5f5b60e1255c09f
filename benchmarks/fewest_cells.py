"""Does pooling across perturbations help the perturbations with fewest cells? Writes docs/results_fewest_cells.md.

Run: ``python benchmarks/fewest_cells.py [--datasets tapseq eccite] [--seeds 0 1 2] [--epochs 120]`` (about 15
minutes on 2 CPU cores). The protocol of ``mechanism_fidelity.py`` (random 80 / 10 / 10 split per seed, the default
SAMS-VAE trained on the training cells, scored on the single targets with at least 10 test cells), but scored per
perturbation: Pearson r, R² and slope through the origin of the predicted on the test cells' observed ATE, over all
genes, for the model's ATE and for the training cells' own mean of that perturbation. Perturbations are then
grouped by their number of training cells (thirds within each dataset); if the model pools information across
perturbations, its advantage over the training-cell mean should be largest in the smallest third. The model is
the paper's (``penetrance=False``), as when the page was measured; the default's held-out scores are in
``results_fidelity*.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
from _markdown import markdown_table
from mechanism_fidelity import DATASETS, held_out_singles

import sams_scvi
from sams_scvi import metrics

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "results_fewest_cells.md"


def per_perturbation(predicted, observed, singles: list[str]) -> pd.DataFrame:
    return metrics.ate_metrics_per_perturbation(predicted, observed, perturbations=singles)[["pearson", "r2", "slope"]]


def run(dataset: str, seed: int, epochs: int) -> pd.DataFrame:
    scvi.settings.seed = seed
    adata, split, singles, observed = held_out_singles(dataset, seed)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
    model = sams_scvi.SAMSVAE(adata, penetrance=False)
    model.train(
        max_epochs=epochs,
        datasplitter_kwargs={"external_indexing": split},
        enable_progress_bar=False,
        check_val_every_n_epoch=epochs,
    )
    model_ate = model.estimate_ate(singles, n_samples=1000, progress_bar=False)
    training_mean = metrics.observed_ate(adata, indices=split[0], perturbations=singles)
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    n_train = pd.Series(labels[split[0]]).value_counts()
    model_scores = per_perturbation(model_ate, observed, singles).add_suffix("_model")
    mean_scores = per_perturbation(training_mean, observed, singles).add_suffix("_mean")
    table = model_scores.join(mean_scores)
    table["n_train_cells"] = n_train.reindex(table.index).to_numpy()
    return table.reset_index().assign(dataset=dataset, seed=seed)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, seed and third of perturbations by training cells: mean scores; then mean ± sd over seeds."""
    rows = rows.copy()
    thirds = ["fewest", "middle", "most"]
    rows["cells"] = rows.groupby(["dataset", "seed"])["n_train_cells"].transform(
        lambda n: pd.qcut(n.rank(method="first"), 3, labels=thirds)
    )
    columns = ["n_train_cells", "pearson_model", "pearson_mean", "r2_model", "r2_mean", "slope_model", "slope_mean"]
    per_seed = rows.groupby(["dataset", "cells", "seed"], observed=True)[columns].mean()
    per_seed["pearson_gain"] = per_seed["pearson_model"] - per_seed["pearson_mean"]
    grouped = per_seed.groupby(level=["dataset", "cells"], observed=True, sort=False)
    mean, sd = grouped.mean(), grouped.std()
    return mean.map(lambda v: f"{v:.3g}").astype(object) + " ± " + sd.map(lambda v: f"{v:.2g}").astype(object)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the .csv")
    args = parser.parse_args()
    scvi.settings.dl_num_workers = 0
    csv = OUTPUT.with_suffix(".csv")
    rows = pd.read_csv(csv) if args.resume and csv.exists() else pd.DataFrame(columns=["dataset", "seed"])
    for dataset in args.datasets:
        for seed in args.seeds:
            if ((rows["dataset"] == dataset) & (rows["seed"] == seed)).any():
                continue
            rows = pd.concat([rows, run(dataset, seed, args.epochs)], ignore_index=True)
            rows.to_csv(csv, index=False)
    rows = rows[rows["dataset"].isin(args.datasets) & rows["seed"].isin(args.seeds)].infer_objects()
    OUTPUT.write_text(
        "# Perturbations with fewest cells: the model against the training-cell mean\n\n"
        f"Produced by `python benchmarks/fewest_cells.py --epochs {args.epochs}` (seeds {args.seeds}; default "
        "SAMS-VAE). Per perturbation, scores of the predicted on the held-out test cells' observed ATE over all "
        "genes (Pearson r, R², slope through the origin), for the model (`_model`) and the training cells' own "
        "mean (`_mean`); averaged within each third of the perturbations ranked by training cells, then mean ± sd "
        "over seeds. `pearson_gain` = model minus mean.\n\n"
        + markdown_table(summarise(rows).reset_index(), index=None)
        + "\n"
    )
    print(OUTPUT.read_text())


if __name__ == "__main__":
    np.seterr(invalid="ignore")
    main()
