"""Ground-truth recovery on data simulated from the SAMS generative process; writes docs/results_simulation.md.

Run: ``python benchmarks/simulation_recovery.py`` (about 15 minutes on 2 CPU cores). For two simulated screens
(10 perturbations with K = 10, and 100 perturbations with K = 15 and sparser true masks, closer to the spec's §6.3
simulation), each optimisation setting and training length, it reports the ATE Pearson r against the true ATEs
and the mask precision / recall / F1 under Hungarian matching of latent dimensions (spec §3.2).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import scvi
import torch
from _markdown import markdown_table

import sams_scvi

SETTINGS = {
    "reference (mask logit 0, one lr)": ({}, {}),
    "sparse start (mask logit -2, 30x global lr)": ({"mask_init_logit": -2.0}, {"global_lr_factor": 30.0}),
}


# name: (simulate_sams arguments, n_latent, training lengths in epochs)
SCREENS = {
    "10 perturbations, K=10": ({"n_perturbations": 10, "n_latent": 10, "effect_size": 4.0}, 10, (100, 300)),
    "100 perturbations, K=15": (
        {
            "n_perturbations": 100,
            "n_latent": 15,
            "mask_prob": 1 / 15,
            "effect_size": 5.0,
            "n_cells_per_perturbation": 200,
            "n_control_cells": 2000,
        },
        15,
        (100,),
    ),
}


def main() -> None:
    rows = []
    for screen, (simulation, n_latent, lengths) in SCREENS.items():
        adata = sams_scvi.data.simulate_sams(**simulation, seed=0)
        rows += _recover(adata, screen, n_latent, lengths)
    _write(rows)


def _recover(adata, screen: str, n_latent: int, lengths) -> list[dict]:
    truth = adata.uns["simulation"]
    rows = []
    for name, (model_kwargs, plan_kwargs) in SETTINGS.items():
        for epochs in lengths:
            scvi.settings.seed = 0
            data = adata.copy()
            sams_scvi.SAMSVAE.setup_anndata(data, perturbation_key="perturbation")
            model = sams_scvi.SAMSVAE(data, n_latent=n_latent, **model_kwargs)
            start = time.perf_counter()
            model.train(max_epochs=epochs, plan_kwargs=plan_kwargs, enable_progress_bar=False)
            seconds = time.perf_counter() - start
            ate = model.estimate_ate(n_samples=2000, progress_bar=False)
            masks = sams_scvi.metrics.mask_recovery(model.get_mask_probabilities(), truth["mask"])
            rows.append(
                {
                    "screen": screen,
                    "setting": name,
                    "epochs": epochs,
                    "train_seconds": round(seconds, 1),
                    "ate_pearson": round(sams_scvi.metrics.ate_pearson(ate, truth["ate"]), 3),
                    **masks.round(3).to_dict(),
                }
            )
            print(rows[-1], flush=True)
    return rows


def _write(rows: list[dict]) -> None:
    table = pd.DataFrame(rows)
    text = f"""# Ground-truth recovery on simulated screens

Produced by `python benchmarks/simulation_recovery.py` (seed 0, torch {torch.__version__},
{torch.get_num_threads()} threads). Screens: `simulate_sams(n_perturbations=10, n_latent=10, effect_size=4)`
(4,000 cells: 1,000 controls and 300 per perturbation, 100 genes) and `simulate_sams(n_perturbations=100,
n_latent=15, mask_prob=1/15, effect_size=5, n_cells_per_perturbation=200, n_control_cells=2000)` (22,000 cells,
closer to the spec's §6.3 simulation: many perturbations, sparse masks). SAMS-VAE with `n_latent` equal to the
true K. Mask metrics use q(m) > 0.5 and the best one-to-one matching of latent dimensions.

{markdown_table(table)}

ATE recovery is good in every setting (r 0.97 or more), but the masks are not: at the reference settings they stay
dense (recall near 1, low precision); a sparse start removes part of the false positives but F1 stays far short
of the 0.9 the evaluation issue targets, and more perturbations make it worse at the same number of epochs.
Latent dimensions are identified only through the mask prior's pressure towards axis-aligned sparse shifts. Its
gradient is small and steady (each perturbation's KL is counted once per epoch), while the straight-through mask
gradients from the likelihood are large and noisy; Adam normalises by their magnitude, so the masks drift towards
the prior very slowly and a rotated, dense solution that fits the data equally well persists (spec §9.5). The
paper's runs are 30k-150k steps; these are about 800-3,900.
"""
    out = Path(__file__).resolve().parents[1] / "docs" / "results_simulation.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
