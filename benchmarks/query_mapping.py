"""Query mapping: a held-out ECCITE-seq replicate mapped onto a reference trained on the other two.

Run: ``python benchmarks/query_mapping.py [--seeds 0 1 2]`` (about 8 minutes per seed on 2 CPU cores). Writes
``docs/results_query_mapping.md`` and its ``.csv``.

Per seed, 2,000 random cells of each biological replicate of Papalexi et al.'s ECCITE-seq screen are drawn. A
reference SAMS-VAE (``batch_key="bio_rep"``) is trained with every default on replicates 1 and 2; half of the
replicate-3 cells are mapped onto it with ``load_query_data`` (only the new replicate's decoder row trains), and
a joint model is trained on replicates 1 and 2 plus the same half. The other half of replicate 3 is seen by no
model. Scores:

* ATEs against the ATE observed on the unseen replicate-3 cells (log2(1 + 1e4 x / sum x)), over the single targets
  with at least 10 of them: Pearson r, R² and the slope through the origin, over all genes and the 20 most
  changed genes per target; beside them the reference without mapping and the training cells' mean.
* The split-half noise ceiling of those unseen cells (their own ATEs on two random halves, against each other).
* Mixing of the unseen replicate-3 cells with replicates 1 and 2 in each model's basal latent space: the fraction of
  a cell's 15 nearest neighbours from replicates 1 and 2, divided by their share of the pooled cells (1: mixed as
  if the replicate made no difference; 0: apart).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
from _markdown import markdown_table
from mechanism_fidelity import SCORES, summarise
from sklearn.neighbors import NearestNeighbors

import sams_scvi
from sams_scvi import metrics

CELLS_PER_REPLICATE = 2_000
NEIGHBOURS = 15
RECIPE = "ECCITE-seq, 3 x 2,000 cells"


def _scores(predicted, observed, perturbations) -> dict:
    return metrics.ate_metrics(predicted, observed, perturbations=perturbations, top_k=20)[SCORES].to_dict()


def _mixing(latent: np.ndarray, is_query: np.ndarray) -> float:
    """Mean share of reference neighbours of the query cells over the reference's share of all cells."""
    neighbours = NearestNeighbors(n_neighbors=NEIGHBOURS + 1).fit(latent).kneighbors(latent[is_query])[1][:, 1:]
    return float((~is_query[neighbours]).mean() / (~is_query).mean())


def _train(cells, seed: int):
    sams_scvi.SAMSVAE.setup_anndata(cells, perturbation_key="perturbation", batch_key="bio_rep")
    scvi.settings.seed = seed
    model = sams_scvi.SAMSVAE(cells)
    start = time.perf_counter()
    model.train(enable_progress_bar=False)
    return model, time.perf_counter() - start


def draw(adata, seed: int):
    """The seed's reference cells, mapped replicate-3 cells, unseen replicate-3 cells and scored single targets."""
    rng = np.random.default_rng(seed)
    replicate = adata.obs["bio_rep"].astype(str).to_numpy()
    drawn = {
        r: rng.choice(np.flatnonzero(replicate == r), CELLS_PER_REPLICATE, replace=False) for r in np.unique(replicate)
    }
    reference_cells = np.sort(np.concatenate([drawn["rep_1"], drawn["rep_2"]]))
    query = rng.permutation(drawn["rep_3"])
    mapped_cells, unseen = np.sort(query[: len(query) // 2]), np.sort(query[len(query) // 2 :])
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    counts = pd.Series(labels[unseen]).value_counts()
    singles = sorted(t for t in counts.index if t != "control" and counts[t] >= 10)
    return reference_cells, mapped_cells, unseen, singles


def ceiling(adata, seed: int) -> dict:
    """Split-half agreement of the unseen cells' own ATEs: what a perfect predictor could expect."""
    _, _, unseen, singles = draw(adata, seed)
    halves = metrics.split_half_ceiling(adata, singles, indices=unseen, seed=seed, top_k=20)
    return {
        "recipe": RECIPE,
        "seed": seed,
        "predictor": "split-half ceiling (unseen cells)",
        **halves[SCORES].to_dict(),
        "full_sample_pearson": metrics.full_sample_ceiling(float(halves["pearson"])),
    }


def run(seed: int) -> list[dict]:
    adata = sams_scvi.data.papalexi2021_eccite()
    reference_cells, mapped_cells, unseen, singles = draw(adata, seed)
    observed = metrics.observed_ate(adata, indices=unseen, perturbations=singles)

    reference, reference_seconds = _train(adata[reference_cells].copy(), seed)
    joint, joint_seconds = _train(adata[np.sort(np.concatenate([reference_cells, mapped_cells]))].copy(), seed)
    scvi.settings.seed = seed
    mapped = sams_scvi.SAMSVAE.load_query_data(adata[mapped_cells].copy(), reference)
    start = time.perf_counter()
    mapped.train(enable_progress_bar=False)
    mapped_seconds = time.perf_counter() - start

    pooled = adata[np.concatenate([reference_cells, unseen])].copy()
    is_query = np.r_[np.zeros(len(reference_cells), bool), np.ones(len(unseen), bool)]
    training_mean = metrics.observed_ate(
        adata, indices=np.concatenate([reference_cells, mapped_cells]), perturbations=singles
    )
    rows = [
        {"predictor": "training-cell mean", **_scores(training_mean, observed, singles)},
        {
            "predictor": "reference, not mapped",
            **_scores(reference.estimate_ate(singles, progress_bar=False), observed, singles),
            "seconds": reference_seconds,
        },
        {
            "predictor": "query mapped onto the reference",
            **_scores(mapped.estimate_ate(singles, progress_bar=False), observed, singles),
            "mixing": _mixing(mapped.get_latent(pooled), is_query),
            "seconds": mapped_seconds,
        },
        {
            "predictor": "trained jointly",
            **_scores(joint.estimate_ate(singles, progress_bar=False), observed, singles),
            "mixing": _mixing(joint.get_latent(pooled), is_query),
            "seconds": joint_seconds,
        },
    ]
    return [{"recipe": RECIPE, "seed": seed, **row} for row in rows] + [ceiling(adata, seed)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default=str(Path(__file__).parents[1] / "docs" / "results_query_mapping.md"))
    parser.add_argument("--from-csv", action="store_true", help="only rewrite the page from the output's .csv")
    args = parser.parse_args()
    scvi.settings.dl_num_workers = 0
    csv = Path(args.output).with_suffix(".csv")
    if args.from_csv:
        rows = pd.read_csv(csv)
        if "full_sample_pearson" not in rows:  # written before the ceiling was added
            adata = sams_scvi.data.papalexi2021_eccite()
            ceilings = pd.DataFrame([ceiling(adata, seed) for seed in sorted(rows["seed"].unique())])
            rows = rows[~rows["predictor"].str.startswith("split-half")]
            rows = pd.concat([rows, ceilings], ignore_index=True)
            rows.to_csv(csv, index=False)
    else:
        rows = pd.DataFrame()
        for seed in args.seeds:
            rows = pd.concat([rows, pd.DataFrame(run(seed))], ignore_index=True)
            rows.to_csv(csv, index=False)
    table = summarise(rows)
    keep = [
        c
        for c in ["pearson", "full_sample_pearson", "pearson_top20", "r2", "slope", "slope_top20", "mixing", "seconds"]
        if c in table.columns
    ]
    Path(args.output).write_text(
        "# Mapping a new replicate onto a trained model\n\n"
        f"Produced by `python benchmarks/query_mapping.py` (mean ± sd over seeds {args.seeds}; 2 CPU cores). "
        "Scores on replicate-3 cells that no model saw; `mixing` 1 means the unseen replicate sits among the "
        "reference's cells as if it were one of them. The ceiling row scores two random halves of the unseen cells "
        "against each other; its `full_sample_pearson` is the r a noise-free prediction could expect against all "
        "of them (Spearman-Brown), the bound for the `pearson` column.\n\n"
        + markdown_table(table[keep].reset_index(level="recipe", drop=True).reset_index(), index=None)
        + "\n"
    )
    print(Path(args.output).read_text())


if __name__ == "__main__":
    main()
