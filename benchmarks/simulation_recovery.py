"""Ground-truth recovery on data simulated from the SAMS generative process; writes docs/results_simulation.md.

Run: ``python benchmarks/simulation_recovery.py`` (about 8 minutes on 2 CPU cores). For each optimisation setting
and training length it reports the ATE Pearson r against the true ATEs and the mask precision / recall / F1 under
Hungarian matching of latent dimensions (spec §3.2).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import scvi
import torch

import sams_scvi

SETTINGS = {
    "reference (mask logit 0, one lr)": ({}, {}),
    "sparse start (mask logit -2, 30x global lr)": ({"mask_init_logit": -2.0}, {"global_lr_factor": 30.0}),
}


def main() -> None:
    adata = sams_scvi.data.simulate_sams(n_perturbations=10, n_latent=10, effect_size=4.0, seed=0)
    truth = adata.uns["simulation"]
    rows = []
    for name, (model_kwargs, plan_kwargs) in SETTINGS.items():
        for epochs in (100, 300):
            scvi.settings.seed = 0
            data = adata.copy()
            sams_scvi.SAMSVAE.setup_anndata(data, perturbation_key="perturbation")
            model = sams_scvi.SAMSVAE(data, n_latent=10, **model_kwargs)
            start = time.perf_counter()
            model.train(max_epochs=epochs, plan_kwargs=plan_kwargs, enable_progress_bar=False)
            seconds = time.perf_counter() - start
            ate = model.estimate_ate(n_samples=2000, progress_bar=False)
            masks = sams_scvi.metrics.mask_recovery(model.get_mask_probabilities(), truth["mask"])
            rows.append(
                {
                    "setting": name,
                    "epochs": epochs,
                    "train_seconds": round(seconds, 1),
                    "ate_pearson": round(sams_scvi.metrics.ate_pearson(ate, truth["ate"]), 3),
                    **masks.round(3).to_dict(),
                }
            )
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    lines = ["| " + " | ".join(table.columns) + " |", "|---" * len(table.columns) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    text = f"""# Ground-truth recovery on simulated screens

Produced by `python benchmarks/simulation_recovery.py`: `simulate_sams(n_perturbations=10, n_latent=10,
effect_size=4, seed=0)` (4,000 cells: 1,000 controls and 300 per perturbation, 100 genes, true active mask
fraction {truth["mask"].to_numpy().mean():.2f}), SAMS-VAE with `n_latent=10`, seed 0, torch {torch.__version__},
{torch.get_num_threads()} threads. Mask metrics use q(m) > 0.5 and the best one-to-one matching of latent
dimensions.

{chr(10).join(lines)}

ATE recovery is good in every setting (r 0.97-0.99), but the masks are not: at the reference settings they stay
dense (77-79 % active against 24 % true, recall 1, precision 0.3); a sparse start halves the false positives but
F1 stays near 0.6, short of the 0.9 the evaluation issue targets. Latent dimensions are identified only through the
mask prior's pressure towards axis-aligned sparse shifts, which is weak per step (the global KL is counted once per
epoch); the paper's simulations train for many more steps.
"""
    out = Path(__file__).resolve().parents[1] / "docs" / "results_simulation.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
