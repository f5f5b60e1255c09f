"""Adding perturbations to a trained model: leave-k-out on the 3,000-cell TAP-seq screen and on a simulation.

Run: ``python benchmarks/add_perturbations.py [--datasets tapseq simulation] [--seeds 0 1 2]`` (about 6 minutes
per dataset and seed on 2 CPU cores). Writes ``docs/results_add_perturbations.md`` and its ``.csv``.

Per seed, a screen is drawn and three of its targets are held out: on TAP-seq the small screen of
``small_screens.py`` (each single target at most 100 cells, controls up to 3,000) and three random scored targets;
on the simulation (``simulate_sams``: 12 perturbations, 100 genes, 200 cells each, 2,000 controls) half of each
label's cells and perturbations p0-p2. A reference SAMS-VAE is trained with every default on the screen without the
held-out targets; ``add_perturbations`` then learns them from their screen cells (the default replays ten times as
many reference cells, here all of them, for 2,000 updates of each added target; the variants train half as long,
or replay only as many cells as were added).

Scored on cells no model saw (TAP-seq: the labels' remaining cells; simulation: the other half), against their
observed ATE (log2(1 + 1e4 x / sum x)): Pearson r, R² and the slope through the origin over all genes and each
label's 20 most changed genes. Beside them, on the same cells: a model trained jointly on the whole screen, the
training-cell mean (for combinations, the additive baseline: the sum of the single targets' training-cell means)
and the split-half noise ceiling. The targets the reference knew are scored too, to show what adding costs them;
on the simulation, combinations of an added and a known target, which no model was trained on.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scvi
from _markdown import markdown_table
from mechanism_fidelity import SCORES, summarise
from small_screens import small_screen

import sams_scvi
from sams_scvi import metrics
from sams_scvi.model import default_batch_size, default_max_epochs

K = 3
SIMULATED = [f"p{i}" for i in range(12)]
SIMULATED_COMBINATIONS = ["p0+p3", "p1+p4", "p2+p5", "p6+p7"]  # three pair an added target with a known one
VARIANTS = ("added (default: 2,000 updates)", "added (1,000 updates)", "added (replay as many as added)")
GROUPS = {"added": "Added targets", "known": "Targets the reference knew", "combinations": "Added + known pairs"}


def _tapseq(seed: int):
    adata = sams_scvi.data.schraivogel2020_tapseq()
    screen, test, singles = small_screen(adata, seed)
    held = sorted(np.random.default_rng(seed).choice(singles, K, replace=False))
    return adata, screen, test, held, [t for t in singles if t not in held], []


def _simulation(seed: int):
    adata = sams_scvi.data.simulate_sams(
        n_perturbations=len(SIMULATED),
        n_genes=100,
        n_cells_per_perturbation=200,
        n_control_cells=2_000,
        combinations=SIMULATED_COMBINATIONS,
        n_cells_per_combination=100,
        seed=seed,
    )
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    screen = np.sort(
        np.concatenate(
            [
                rng.choice(np.flatnonzero(labels == label), (labels == label).sum() // 2, replace=False)
                for label in ["control", *SIMULATED]
            ]
        )
    )
    test = np.setdiff1d(np.arange(adata.n_obs), screen)
    pairs = [c for c in SIMULATED_COMBINATIONS if c.split("+")[0] in SIMULATED[:K]]
    return adata, screen, test, SIMULATED[:K], SIMULATED[K:], pairs


DATASETS = {"tapseq": ("TAP-seq, 3,000 cells", _tapseq), "simulation": ("simulation, 2,200 cells", _simulation)}


def _trained(cells, seed: int):
    cells = cells.copy()
    sams_scvi.SAMSVAE.setup_anndata(cells, perturbation_key="perturbation", control_value="control")
    scvi.settings.seed = seed
    model = sams_scvi.SAMSVAE(cells)
    start = time.perf_counter()
    model.train(enable_progress_bar=False)
    return model, time.perf_counter() - start


def run(dataset: str, seed: int) -> list[dict]:
    adata, screen, test, held, known, pairs = DATASETS[dataset][1](seed)
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    new_cells = screen[np.isin(labels[screen], held)]
    groups = {"added": held, "known": known, "combinations": pairs}
    observed = metrics.observed_ate(adata, indices=test, perturbations=[*held, *known, *pairs])
    rows = []

    def score(name, ate, **extra):
        for group, targets in groups.items():
            if targets and set(targets) <= set(ate.obs_names):
                scores = metrics.ate_metrics(ate, observed, perturbations=targets, top_k=20)[SCORES].to_dict()
                rows.append({"predictor": name, "targets": group, **scores, **extra})

    mean = metrics.observed_ate(adata, indices=screen, perturbations=[*held, *known])
    if pairs:
        mean = anndata.concat([mean, metrics.baseline_ate(adata, "additive", pairs, indices=screen)])
    score("training-cell mean (pairs: additive)", mean)
    for group, targets in groups.items():
        if targets:
            halves = metrics.split_half_ceiling(adata, targets, indices=test, seed=seed, top_k=20)
            rows.append({"predictor": "split-half ceiling (test cells)", "targets": group, **halves[SCORES].to_dict()})
    everything = [*held, *known, *pairs]
    joint, seconds = _trained(adata[screen], seed)
    score("trained jointly", joint.estimate_ate(everything, progress_bar=False), seconds=seconds)
    reference, seconds = _trained(adata[np.setdiff1d(screen, new_cells)], seed)
    score("reference (without them)", reference.estimate_ate(known, progress_bar=False), seconds=seconds)
    for name in VARIANTS:
        arguments = {}
        if name == "added (replay as many as added)":
            arguments["replay_cells"] = len(new_cells)
        if name == "added (1,000 updates)":  # the epochs of the default run, for half its updates
            n_train = min(reference.adata.n_obs, 10 * len(new_cells)) + round(0.9 * len(new_cells))
            batch_size = default_batch_size(n_train)
            arguments["max_epochs"] = default_max_epochs(n_train, batch_size, 0.9 * len(new_cells) / K, updates=1_000)
        scvi.settings.seed = seed
        start = time.perf_counter()
        added = reference.add_perturbations(adata[new_cells].copy(), enable_progress_bar=False, **arguments)
        seconds = time.perf_counter() - start
        epochs = len(added.history["elbo_train"])
        score(name, added.estimate_ate(everything, progress_bar=False), seconds=seconds, epochs=epochs)
    recipe = DATASETS[dataset][0]
    return [{"recipe": recipe, "seed": seed, "held_out": " ".join(held), **row} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default=str(Path(__file__).parents[1] / "docs" / "results_add_perturbations.md"))
    parser.add_argument("--from-csv", action="store_true", help="only rewrite the page from the output's .csv")
    args = parser.parse_args()
    scvi.settings.dl_num_workers = 0
    csv = Path(args.output).with_suffix(".csv")
    if args.from_csv:
        rows = pd.read_csv(csv)
    else:
        rows = pd.DataFrame()
        for dataset in args.datasets:
            for seed in args.seeds:
                rows = pd.concat([rows, pd.DataFrame(run(dataset, seed))], ignore_index=True)
                rows.to_csv(csv, index=False)
    write_page(rows, Path(args.output))
    print(Path(args.output).read_text())


def write_page(rows: pd.DataFrame, output: Path) -> None:
    seeds = sorted(int(s) for s in rows["seed"].unique())
    sections = []
    for recipe, part in rows.groupby("recipe", sort=False):
        held = "; ".join(f"seed {s}: {h}" for s, h in part.groupby("seed")["held_out"].first().items())
        sections.append(f"## {recipe}\n\nHeld out: {held}.")
        for group, title in GROUPS.items():
            block = part[part["targets"] == group].drop(columns=["held_out", "targets"])
            if block.empty:
                continue
            table = summarise(block)
            keep = [c for c in ["pearson", "r2", "slope", "pearson_top20", "slope_top20", "seconds"] if c in table]
            table = table[keep].reset_index(level="recipe", drop=True).reset_index()
            sections.append(f"### {title}\n\n" + markdown_table(table, index=None))
    output.write_text(
        "# Adding perturbations to a trained model\n\n"
        f"Produced by `python benchmarks/add_perturbations.py` (mean ± sd over seeds {seeds}; 2 CPU cores). "
        "Every score is on cells that no model saw, against their observed ATE (log2(1 + 1e4 x / sum x)); `slope` "
        "is the least-squares slope through the origin of predicted on observed ATE, `_top20` over each label's 20 "
        "most changed genes, `seconds` the training time (for an added model: of `add_perturbations` alone, on "
        "top of the reference's). A reference is trained without three targets; `add_perturbations` learns them "
        "from their screen cells, replaying up to ten of the reference's cells per new one (the default; here all "
        "of them) or only as many as were added. The training-cell mean is each label's mean over the screen's "
        "cells (for pairs of an added and a known target, which no model trained on, the two singles' means "
        "added); the split-half row scores one half of the test cells against the other, a conservative ceiling "
        "since each half has half the cells.\n\n" + "\n\n".join(sections) + "\n"
    )


if __name__ == "__main__":
    main()
