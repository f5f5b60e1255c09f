"""The paper's model comparison on the bundled TAP-seq screen; writes docs/results_models.md.

Run: ``python benchmarks/compare_models.py [--epochs 100] [--fractions 0 0.5]`` (about 7 minutes per fraction on
2 CPU cores). For each fraction ``f`` of the multi-target combinations kept for training
(:func:`sams_scvi.metrics.combination_split`, OOD mode), every model of :func:`sams_scvi.paper_models` is
trained with seed 0 and scored on the held-out combination cells (test IWELBO, ATE r / R² over all genes and
each combination's top-20 genes), with the simple baselines as extra rows.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import pandas as pd
import scvi
import torch
from _markdown import markdown_table

import sams_scvi

COLUMNS = ["n_cells", "n_perturbations", "iwelbo", "pearson", "pearson_top20", "r2", "r2_top20", "train_seconds"]


def markdown(table: pd.DataFrame) -> str:
    return markdown_table(
        table, lambda c, v: "" if pd.isna(v) else f"{v:.0f}" if c.startswith("n_") else f"{v:.3f}", index="model"
    )


def main(epochs: int, fractions: list[float]) -> None:
    adata = sams_scvi.data.schraivogel2020_tapseq()
    sections = []
    for fraction in fractions:
        # the first f of the (shuffled) combinations train, the other 1 - f are tested on a 1 - f share of
        # their cells: at f = 0 every combination cell is a test cell
        held_out = 1.0 - fraction
        split = sams_scvi.metrics.combination_split(
            adata, fraction, test_fraction=held_out, combination_test_fraction=held_out, seed=0
        )
        table = sams_scvi.compare_models(adata, split, max_epochs=epochs, seed=0)[COLUMNS]
        print(table.round(3).to_string(), flush=True)
        n_test = int(table.iloc[0]["n_perturbations"])
        sections.append(
            f"## f = {fraction}: {n_test} held-out combinations ({int(table.iloc[0]['n_cells'])} cells)\n\n"
            + markdown(table)
        )
    text = f"""# SAMS-VAE and the comparison models on held-out TAP-seq combinations

Produced by `python benchmarks/compare_models.py --epochs {epochs} --fractions {" ".join(map(str, fractions))}`:
Schraivogel 2020 TAP-seq, OOD split (seed 0) keeping a fraction f of the multi-target combinations for training
and testing on a 1 - f share of the cells of the other combinations (so the test sets differ between f); every model with its defaults (n_latent 32, hidden 400,
1 layer, 5 particles, lr 1e-3, batch 512), {epochs} epochs, seed 0. IWELBO in nats per test cell (100 importance
samples, globals shared across cells); ATEs on the scale log2(1 + 1e4 x / sum x) against data ATEs on all cells.
Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, scvi-tools
{scvi.__version__}.

{chr(10).join(s + chr(10) for s in sections)}
"""
    out = Path(__file__).resolve().parents[1] / "docs" / "results_models.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5])
    args = parser.parse_args()
    main(args.epochs, args.fractions)
