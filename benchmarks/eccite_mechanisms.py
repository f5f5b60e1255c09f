"""Do the learned mechanisms group a known pathway? ECCITE-seq's IFN-gamma pathway; writes docs/results_eccite_mechanisms.md.

Run: ``python benchmarks/eccite_mechanisms.py [--seeds 0 1 2] [--epochs 120]`` (about 5 minutes per seed on 2 CPU
cores). In Papalexi et al. 2021 (THP-1 cells, CRISPR knockouts) the knockouts of the IFN-gamma pathway, IFNGR1,
IFNGR2, JAK2, STAT1 and IRF1, share one transcriptional phenotype (they lose PD-L1 induction). The default model is
trained on all cells (scvi-tools' random 90 / 10 split); then:

* ``cosine_within``: mean cosine similarity of the effective shifts (``get_mechanism_similarity``) over the 10 pairs
  of pathway perturbations, ``cosine_between``: over pathway x other pairs;
* ``pathway_modules``: in how many modules of ``get_mechanisms()`` (default ``module_distance``) the five fall, and
  ``module_purity``: the share of the largest of those modules' members that are pathway perturbations;
* the same two cosines for the observed ATEs of the training cells (``observed_*``: the data's own grouping, what
  a model that read the data perfectly would reproduce).
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

import sams_scvi
from sams_scvi import metrics

DOCS = Path(__file__).resolve().parents[1] / "docs"
PATHWAY = ["IFNGR1", "IFNGR2", "JAK2", "STAT1", "IRF1"]


def pathway_cosines(similarity: pd.DataFrame) -> tuple[float, float]:
    others = [p for p in similarity.index if p not in PATHWAY]
    within = [similarity.loc[a, b] for a, b in combinations(PATHWAY, 2)]
    between = [similarity.loc[a, b] for a in PATHWAY for b in others]
    return float(np.nanmean(within)), float(np.nanmean(between))


def run(seed: int, epochs: int) -> dict:
    adata = sams_scvi.data.papalexi2021_eccite()
    scvi.settings.seed = seed
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata)
    start = time.perf_counter()
    model.train(max_epochs=epochs, enable_progress_bar=False, check_val_every_n_epoch=epochs)
    row = {"seed": seed, "train_seconds": time.perf_counter() - start}
    row["cosine_within"], row["cosine_between"] = pathway_cosines(model.get_mechanism_similarity("cosine"))
    mechanisms = model.get_mechanisms()
    modules = mechanisms.obs["module"].astype(str)
    pathway_modules = modules[PATHWAY]
    row["pathway_modules"] = pathway_modules.nunique()
    largest = pathway_modules.value_counts().index[0]
    members = modules.index[modules == largest]
    row["module_purity"] = float(np.isin(members, PATHWAY).mean())
    row["largest_module"] = " ".join(sorted(members))
    row["pathway_without_mechanism"] = int((pathway_modules == "no mechanism").sum())

    singles = list(model.perturbations)
    observed = metrics.observed_ate(adata, indices=model.train_indices, perturbations=singles).to_df()
    row["observed_cosine_within"], row["observed_cosine_between"] = pathway_cosines(
        _cosine(observed.to_numpy(), observed.index)
    )
    return row


def _cosine(values: np.ndarray, index: pd.Index) -> pd.DataFrame:
    unit = values / np.linalg.norm(values, axis=1, keepdims=True)
    return pd.DataFrame(unit @ unit.T, index=index, columns=index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--output", type=Path, default=DOCS / "results_eccite_mechanisms.md")
    parser.add_argument("--resume", action="store_true", help="keep the seeds already in the output's .csv")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = rows_by_seed(args.output.with_suffix(".csv"), args.seeds, lambda seed: run(seed, args.epochs), args.resume)
    text = [
        "# Mechanisms of a known pathway on ECCITE-seq",
        "",
        f"Produced by `python benchmarks/eccite_mechanisms.py --epochs {args.epochs}` (seeds {args.seeds}; torch "
        f"{torch.__version__}, 2 threads). Pathway: {', '.join(PATHWAY)}. See the script's docstring for the "
        "definitions.",
        "",
        markdown_table(rows.round(3)),
        "",
    ]
    args.output.write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
