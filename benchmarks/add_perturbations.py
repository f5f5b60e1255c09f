"""Adding perturbations to a trained model: leave-k-out on the 3,000-cell TAP-seq screen.

Run: ``python benchmarks/add_perturbations.py [--seeds 0 1 2] [--k 3]`` (about 6 minutes per seed on 2 CPU cores).
Writes ``docs/results_add_perturbations.md`` and its ``.csv``.

Per seed, the small screen of ``small_screens.py`` (each single target at most 100 cells, controls up to 3,000
cells) is drawn and ``k`` of its scored targets are held out. A reference SAMS-VAE is trained with every default
on the screen without them; ``add_perturbations`` then learns their mechanisms from their screen cells with the
reference fixed, at its default length and at a quarter of it. Scored on the targets' remaining cells, which no
model saw, against their observed ATE (log2(1 + 1e4 x / sum x)): Pearson r, R² and the slope through the origin
over all genes and each target's 20 most changed genes. Beside them, on the same cells: a model trained jointly on
the whole screen (the held-out targets included) and the targets' training-cell mean.
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
from small_screens import CELLS_PER_TARGET, small_screen

import sams_scvi
from sams_scvi import metrics
from sams_scvi.model import default_batch_size, default_max_epochs


def _scores(predicted, observed, perturbations) -> dict:
    return metrics.ate_metrics(predicted, observed, perturbations=perturbations, top_k=20)[SCORES].to_dict()


def _trained(cells, seed: int):
    cells = cells.copy()
    sams_scvi.SAMSVAE.setup_anndata(cells, perturbation_key="perturbation", control_value="control")
    scvi.settings.seed = seed
    model = sams_scvi.SAMSVAE(cells)
    start = time.perf_counter()
    model.train(enable_progress_bar=False)
    return model, time.perf_counter() - start


def run(seed: int, k: int) -> list[dict]:
    adata = sams_scvi.data.schraivogel2020_tapseq()
    screen, test, singles = small_screen(adata, seed)
    held = sorted(np.random.default_rng(seed).choice(singles, k, replace=False))
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    new_cells = screen[np.isin(labels[screen], held)]
    observed = metrics.observed_ate(adata, indices=test, perturbations=held)
    rows = [
        {
            "predictor": "training-cell mean",
            **_scores(metrics.observed_ate(adata, indices=screen, perturbations=held), observed, held),
        }
    ]
    joint, joint_seconds = _trained(adata[screen], seed)
    rows.append(
        {
            "predictor": "trained jointly",
            **_scores(joint.estimate_ate(held, progress_bar=False), observed, held),
            "seconds": joint_seconds,
        }
    )
    reference, reference_seconds = _trained(adata[np.setdiff1d(screen, new_cells)], seed)
    n_train = int(round(0.9 * len(new_cells)))
    batch_size = default_batch_size(n_train)
    cells_each = 0.9 * min(CELLS_PER_TARGET, len(new_cells) / k)
    for name, updates in (("added (default length)", 4_000), ("added (1/4 length)", 1_000)):
        epochs = default_max_epochs(n_train, batch_size, cells_each, updates=updates)
        scvi.settings.seed = seed
        start = time.perf_counter()
        added = reference.add_perturbations(adata[new_cells].copy(), max_epochs=epochs, enable_progress_bar=False)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "predictor": name,
                **_scores(added.estimate_ate(held, progress_bar=False), observed, held),
                "seconds": seconds,
                "epochs": epochs,
            }
        )
    rows.append({"predictor": "reference (without the targets)", "seconds": reference_seconds})
    return [{"recipe": "TAP-seq, 3,000 cells", "seed": seed, "held_out": " ".join(held), **row} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=3, help="targets held out per seed")
    parser.add_argument("--output", default=str(Path(__file__).parents[1] / "docs" / "results_add_perturbations.md"))
    parser.add_argument("--from-csv", action="store_true", help="only rewrite the page from the output's .csv")
    args = parser.parse_args()
    scvi.settings.dl_num_workers = 0
    csv = Path(args.output).with_suffix(".csv")
    if args.from_csv:
        rows = pd.read_csv(csv)
    else:
        rows = pd.DataFrame()
        for seed in args.seeds:
            rows = pd.concat([rows, pd.DataFrame(run(seed, args.k))], ignore_index=True)
            rows.to_csv(csv, index=False)
    table = summarise(rows.drop(columns=["held_out"]))
    keep = [c for c in ["pearson", "pearson_top20", "r2", "slope", "slope_top20", "seconds"] if c in table.columns]
    held = "; ".join(f"seed {s}: {h}" for s, h in rows.groupby("seed")["held_out"].first().items())
    Path(args.output).write_text(
        "# Adding perturbations to a trained model\n\n"
        f"Produced by `python benchmarks/add_perturbations.py` (mean ± sd over seeds {args.seeds}; 2 CPU cores). "
        f"Held out: {held}. All scores on the held-out targets' cells that no model saw.\n\n"
        + markdown_table(table[keep].reset_index(level="recipe", drop=True).reset_index(), index=None)
        + "\n"
    )
    print(Path(args.output).read_text())


if __name__ == "__main__":
    main()
