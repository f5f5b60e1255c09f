"""Held-out combinations on a screen that SAMS-VAE did not generate: interactions sized like Norman et al. 2019's.

Run: ``python benchmarks/combination_simulation.py [--seeds 0 1 2] [--lengths 1 2 4]`` (about 2-3 minutes per run
on 2 CPU cores). Writes ``docs/results_combinations.md`` and its ``.csv``.

Each seed simulates (``sams_scvi.data.simulate_combinations``) its own 3,000-cell combinatorial screen in expression
space, with no latent space:

* the control cells' per-gene expression and negative-binomial dispersion, and their library sizes, are those of
  the ECCITE-seq control cells (Papalexi 2021, 299 genes);
* each of 16 single perturbations changes the log expression of its genes: one or two of 6 shared gene programs
  (15 genes each) with random signed strengths, plus a few genes of its own;
* a double's log-fold change is :math:`c_1 \\delta_a + c_2 \\delta_b + \\varepsilon_{ab}`, the model Norman et al.
  fit to every double of their screen (github.com/thomasmaxwellnorman/Perturbseq_GI,
  ``data_sharing/regr_fits_final.csv``, 125 doubles): :math:`\\log c` is drawn from a normal with their fits' mean
  and standard deviation (-0.33 and 0.59: median coefficient 0.8, buffering more often than synergy), and the
  interaction term :math:`\\varepsilon_{ab}` has a norm of 20-60 % of the combined effect's (their fits leave
  45-70 %, measurement noise included) on the genes either single moves and a few others.

The screen has 900 control cells, 100 cells of each single and 60 of each of 8 doubles; 5 more doubles, both of
whose singles are in the screen, are held out. Test cells are drawn afresh (300 per held-out double, 1,000 controls).
Scores: Pearson r, R² and the slope through the origin of the predicted against the observed ATE of the held-out
doubles on the test cells, over each double's 20 most changed genes and over all genes. Baselines: the two singles'
observed effects added (from the screen's cells, so their control cells are disjoint from the test controls), and
the split-half noise ceiling of the test cells.
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
from mechanism_fidelity import summarise

import sams_scvi
from sams_scvi import metrics

SCORES = ["pearson_top20", "r2_top20", "slope_top20", "pearson", "r2", "slope"]


def simulate(seed: int):
    """The screen and the test cells (as two AnnData) and the held-out doubles."""
    adata = sams_scvi.data.simulate_combinations(seed=seed)
    screen, test = (adata[adata.obs["split"] == split].copy() for split in ("screen", "test"))
    return screen, test, adata.uns["simulation"]["held_out_doubles"]


def run(seed: int, length: float) -> list[dict]:
    screen, test, heldout = simulate(seed)
    observed = metrics.observed_ate(test, perturbations=heldout)
    rows = []
    if length == 1:
        singles = metrics.observed_ate(screen, perturbations=sorted({a for pair in heldout for a in pair.split("+")}))
        additive = pd.DataFrame(
            [singles[a].X.ravel() + singles[b].X.ravel() for a, b in (pair.split("+") for pair in heldout)],
            index=heldout,
            columns=test.var_names,
        )
        rows.append({"predictor": "singles' effects added (disjoint controls)", **_scores(additive, observed, heldout)})
        halves = metrics.split_half_ceiling(test, heldout, seed=seed, top_k=20)
        rows.append({"predictor": "split-half ceiling (test cells)", **halves[SCORES].to_dict()})
    sams_scvi.SAMSVAE.setup_anndata(screen, perturbation_key="perturbation", control_value="control")
    scvi.settings.seed = seed
    model = sams_scvi.SAMSVAE(screen)
    typical = np.median(screen.obs["perturbation"].value_counts().drop("control")) * 0.9
    default_epochs = sams_scvi.model.default_max_epochs(int(np.ceil(0.9 * screen.n_obs)), None, typical)
    start = time.perf_counter()
    model.train(max_epochs=None if length == 1 else int(round(length * default_epochs)), enable_progress_bar=False)
    seconds = time.perf_counter() - start
    ate = model.estimate_ate(heldout, progress_bar=False)
    rows.append(
        {
            "predictor": f"SAMS-VAE, {length:g}x default length",
            **_scores(ate, observed, heldout),
            "epochs": len(model.history["elbo_train"]),
            "train_seconds": seconds,
        }
    )
    return [{"recipe": "simulation", "seed": seed, **row} for row in rows]


def _scores(predicted, observed, perturbations) -> dict:
    return metrics.ate_metrics(predicted, observed, perturbations=perturbations, top_k=20)[SCORES].to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lengths", type=float, nargs="+", default=[1.0])
    parser.add_argument("--output", default=str(Path(__file__).parents[1] / "docs" / "results_combinations.md"))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the output's .csv")
    args = parser.parse_args()
    scvi.settings.dl_num_workers = 0
    csv = Path(args.output).with_suffix(".csv")
    rows = pd.read_csv(csv) if args.resume and csv.exists() else pd.DataFrame(columns=["seed", "predictor"])
    for length in args.lengths:
        for seed in args.seeds:
            name = f"SAMS-VAE, {length:g}x default length"
            if ((rows["seed"] == seed) & (rows["predictor"] == name)).any():
                continue
            rows = pd.concat([rows, pd.DataFrame(run(seed, length))], ignore_index=True)
            rows.to_csv(csv, index=False)
    table = summarise(rows.assign(recipe="simulation")).droplevel("recipe")
    keep = [c for c in [*SCORES, "epochs", "train_seconds"] if c in table.columns]
    Path(args.output).write_text(
        "# Held-out combinations on a screen SAMS-VAE did not generate\n\n"
        f"Produced by `python benchmarks/combination_simulation.py` (seeds {args.seeds}, mean ± sd over seeds; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads). Each seed simulates a 2,980-cell screen in "
        "expression space (no latent space): 16 singles built from shared gene programs, 8 doubles in the screen "
        "and 5 held out, each double's log-fold change `c1 * a + c2 * b + interaction` with coefficients and "
        "interaction sizes drawn like Norman et al. 2019's fits to their 125 doubles, counts from the ECCITE-seq "
        "control cells' expression, dispersion and depth (`benchmarks/combination_simulation.py` says how). The "
        "model is trained with every default and scored on fresh test cells of the held-out doubles against "
        "their observed ATE, over each double's 20 most changed genes (`_top20`) and over all genes; the additive "
        "baseline adds the singles' effects observed in the screen, whose control cells are disjoint from the "
        "test controls.\n\n" + markdown_table(table[keep].reset_index(), index=None) + "\n"
    )


if __name__ == "__main__":
    main()
