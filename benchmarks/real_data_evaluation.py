"""SAMS-VAE and simple baselines on the bundled real screens, one seed; writes docs/results_real_data.md.

Run: ``python benchmarks/real_data_evaluation.py [--epochs 100]`` (about 5 minutes on 2 CPU cores).

* TAP-seq (Schraivogel 2020): every multi-target cell is held out (OOD, f = 0: the model and the baselines see
  only singles and controls), and the held-out combinations are scored.
* ECCITE-seq (Papalexi 2021): a random 80 / 10 / 10 cell split; in-distribution single perturbations are scored.

SAMS-VAE here is the paper's model (``penetrance=False``) with the fast recipe, as when ``docs/results_real_data.md`` was
measured; ``mechanism_fidelity.py`` measures the current default.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch
from _markdown import markdown_table

import sams_scvi

COLUMNS = [
    "n_cells",
    "n_perturbations",
    "iwelbo",
    "pearson",
    "pearson_top20",
    "r2",
    "r2_top20",
    "direction_agreement_top20",
]


def _score(adata, split, epochs: int, subset: str) -> pd.DataFrame:
    scvi.settings.seed = 0
    adata = adata.copy()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, penetrance=False)
    start = time.perf_counter()
    model.train(max_epochs=epochs, datasplitter_kwargs={"external_indexing": split}, enable_progress_bar=False)
    seconds = time.perf_counter() - start
    rows = {"SAMS-VAE": sams_scvi.evaluate(model, adata, split, subsets=[subset], progress_bar=False).loc[subset]}
    rows["SAMS-VAE, ATE at the median library"] = sams_scvi.evaluate(
        model, adata, split, subsets=[subset], library_size="median", progress_bar=False
    ).loc[subset]
    for baseline in ("additive", "mean_perturbed", "control"):
        rows[f"baseline: {baseline}"] = sams_scvi.evaluate(
            baseline, adata, split, subsets=[subset], progress_bar=False
        ).loc[subset]
    rows["baseline: additive, disjoint controls"] = sams_scvi.evaluate(
        "additive", adata, split, subsets=[subset], disjoint_controls=True, progress_bar=False
    ).loc[subset]
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    testable = [p for p in sorted(set(labels[split[2]]) - {"control"}) if (labels == p).sum() >= 2]
    ceiling = sams_scvi.metrics.split_half_ceiling(adata, testable, seed=0)
    ceiling["n_cells"] = int(np.isin(labels, testable).sum())
    rows["split-half ceiling (data vs data)"] = ceiling
    table = pd.DataFrame(rows).T[COLUMNS]
    table["train_seconds"] = [round(seconds, 1)] + [np.nan] * (len(table) - 1)
    return table


def main(epochs: int) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tapseq = sams_scvi.data.schraivogel2020_tapseq()
    tap_split = sams_scvi.metrics.combination_split(
        tapseq, 0.0, test_fraction=1.0, combination_test_fraction=1.0, seed=0
    )
    tap = _score(tapseq, tap_split, epochs, "test")

    eccite = sams_scvi.data.papalexi2021_eccite()
    order = np.random.default_rng(0).permutation(eccite.n_obs)
    n_val = n_test = eccite.n_obs // 10
    ecc_split = [np.sort(order[n_val + n_test :]), np.sort(order[:n_val]), np.sort(order[n_val : n_val + n_test])]
    ecc = _score(eccite, ecc_split, epochs, "test")

    def markdown(table: pd.DataFrame) -> str:
        return markdown_table(table, lambda _, v: "" if pd.isna(v) else f"{v:.3g}", index="")

    text = f"""# Held-out TAP-seq combinations and in-distribution ECCITE-seq (1 seed)

Produced by `python benchmarks/real_data_evaluation.py --epochs {epochs}` (seed 0, one seed; SAMS-VAE is the fast
recipe without penetrance (`penetrance=False`), {epochs} epochs; baselines fitted on the training cells; data ATEs on all cells, scale log2(1 + 1e4 x / sum x);
IWELBO in nats per cell with 100 importance samples; top-20 = each perturbation's 20 genes with the largest
observed |ATE|). Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,
torch {torch.__version__}, scvi-tools {scvi.__version__}.

## TAP-seq (Schraivogel 2020): held-out multi-target combinations

Training sees only controls and single targets; the test set is every cell with two or more targets
({int(tap.loc["SAMS-VAE", "n_cells"])} cells, {int(tap.loc["SAMS-VAE", "n_perturbations"])} combinations, 1 to 8 cells each, so the
observed combination ATEs are very noisy). The ceiling row scores the data against itself (two disjoint halves
of the cells of the combinations with at least 2 cells); "disjoint controls" fits the additive baseline and measures
the observed effect with different halves of the control cells.

{markdown(tap)}

## ECCITE-seq (Papalexi 2021): in-distribution single perturbations (random 10 % test cells)

{markdown(ecc)}

## Reading the tables

* Following the paper, observed ATEs are computed on all cells, including the training cells. For in-distribution
  perturbations a data-derived baseline (here "additive", which for a single perturbation is its training-cell
  ATE) is therefore scored largely against its own cells, which is why it can exceed the split-half ceiling; the
  model benefits in the same way, to a lesser degree.
* "ATE at the median library" samples the model's counts at the data's median library size instead of the
  paper's 1e4 before the same log2(1 + 1e4 x / sum x) transform; for shallow data this puts model and data on the
  same footing (docs/model.md, "ATE").
* TAP-seq combinations have 1 to 8 cells each: their split-half ceiling is near 0, so no predictor can show
  agreement there, and differences between rows are within noise. Held-out combination scores need a screen with
  tens of cells per combination (e.g. Norman 2019).
"""
    out = Path(__file__).resolve().parents[1] / "docs" / "results_real_data.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=100)
    main(parser.parse_args().epochs)
