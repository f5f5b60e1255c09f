"""Held-out combinations on a screen that SAMS-VAE did not generate: interactions sized like Norman et al. 2019's.

Run: ``python benchmarks/combination_simulation.py [--seeds 0 1 2] [--lengths 1 2 4]`` (about 2-3 minutes per run
on 2 CPU cores). Writes ``docs/results_combinations.md`` and its ``.csv``.

Each seed simulates its own 3,000-cell combinatorial screen in expression space, with no latent space:

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

import anndata
import numpy as np
import pandas as pd
import scvi
import torch
from _markdown import markdown_table
from mechanism_fidelity import summarise
from scipy import sparse

import sams_scvi
from sams_scvi import metrics

N_SINGLES, N_PROGRAMS, PROGRAM_GENES, PRIVATE_GENES = 16, 6, 15, 3
N_TRAIN_DOUBLES, N_HELDOUT_DOUBLES = 8, 5
CONTROL_CELLS, SINGLE_CELLS, DOUBLE_CELLS = 900, 100, 60
TEST_DOUBLE_CELLS, TEST_CONTROL_CELLS = 300, 1_000
LOG_COEF_MEAN, LOG_COEF_SD = -0.33, 0.59  # log c1, log c2 over Norman et al.'s 125 fitted doubles
INTERACTION_NORM = (0.2, 0.6)
SCORES = ["pearson_top20", "r2_top20", "slope_top20", "pearson", "r2", "slope"]


def control_profile():
    """Per-gene proportions and NB dispersions, and library sizes, of the ECCITE-seq control cells."""
    adata = sams_scvi.data.papalexi2021_eccite()
    counts = adata[adata.obs["perturbation"] == "control"].X
    counts = (counts.toarray() if sparse.issparse(counts) else np.asarray(counts)).astype(float)
    library = counts.sum(1)
    proportion = counts.sum(0) / library.sum()
    mean = proportion * np.median(library)
    normalised = counts / library[:, None] * np.median(library)
    excess = np.maximum(normalised.var(0) - mean, 1e-3 * mean**2)
    dispersion = np.clip(mean**2 / excess, 0.05, 100.0)
    return proportion, dispersion, library[library > 0]


def simulate(seed: int):
    """The screen, the test cells (as two AnnData) and the held-out doubles."""
    rng = np.random.default_rng(seed)
    proportion, dispersion, libraries = control_profile()
    n_genes = len(proportion)
    programs = np.zeros((N_PROGRAMS, n_genes))
    for program in programs:
        program[rng.choice(n_genes, PROGRAM_GENES, replace=False)] = rng.normal(0.0, 0.8, PROGRAM_GENES)
    effects = {}
    for i in range(N_SINGLES):
        chosen = rng.choice(N_PROGRAMS, rng.integers(1, 3), replace=False)
        strengths = rng.choice([-1, 1], len(chosen)) * rng.uniform(0.6, 1.5, len(chosen))
        effect = strengths @ programs[chosen]
        effect[rng.choice(n_genes, PRIVATE_GENES, replace=False)] += rng.normal(0.0, 0.7, PRIVATE_GENES)
        effects[f"g{i}"] = effect
    pairs = set()
    while len(pairs) < N_TRAIN_DOUBLES + N_HELDOUT_DOUBLES:
        a, b = sorted(rng.choice(N_SINGLES, 2, replace=False))
        pairs.add((f"g{a}", f"g{b}"))
    pairs = sorted(pairs)
    rng.shuffle(pairs)
    for a, b in pairs:
        c1, c2 = np.clip(np.exp(rng.normal(LOG_COEF_MEAN, LOG_COEF_SD, 2)), 0.1, 3.0)
        combined = c1 * effects[a] + c2 * effects[b]
        genes = np.flatnonzero((effects[a] != 0) | (effects[b] != 0))
        genes = np.union1d(genes, rng.choice(n_genes, 5, replace=False))
        interaction = np.zeros(n_genes)
        interaction[genes] = rng.standard_normal(len(genes))
        interaction *= rng.uniform(*INTERACTION_NORM) * np.linalg.norm(combined) / np.linalg.norm(interaction)
        effects[f"{a}+{b}"] = combined + interaction
    heldout = [f"{a}+{b}" for a, b in pairs[N_TRAIN_DOUBLES:]]
    screen_sizes = {"control": CONTROL_CELLS, **{f"g{i}": SINGLE_CELLS for i in range(N_SINGLES)}}
    screen_sizes.update({f"{a}+{b}": DOUBLE_CELLS for a, b in pairs[:N_TRAIN_DOUBLES]})
    test_sizes = {"control": TEST_CONTROL_CELLS, **dict.fromkeys(heldout, TEST_DOUBLE_CELLS)}

    def cells(sizes: dict[str, int], name: str) -> anndata.AnnData:
        labels = np.repeat(list(sizes), list(sizes.values()))
        log_fold = np.stack([effects.get(label, np.zeros(n_genes)) for label in labels])
        rates = proportion * np.exp(log_fold)
        rates /= rates.sum(1, keepdims=True)
        mean = rates * rng.choice(libraries, len(labels))[:, None]
        counts = rng.negative_binomial(dispersion, dispersion / (dispersion + mean))
        adata = anndata.AnnData(sparse.csr_matrix(counts.astype(np.float32)))
        adata.obs_names = [f"{name}{i}" for i in range(len(labels))]
        adata.var_names = [f"gene{j}" for j in range(n_genes)]
        adata.obs["perturbation"] = pd.Categorical(labels)
        return adata

    return cells(screen_sizes, "screen"), cells(test_sizes, "test"), heldout


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
