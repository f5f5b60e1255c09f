"""Quality against training steps and CPU seconds on TAP-seq, per recipe; writes docs/results_time_to_quality.md.

Run: ``python benchmarks/time_to_quality.py [--seeds 0 1 2] [--checkpoints 15 30 60 120 240]`` (about 4 minutes
per recipe and seed on 2 CPU cores). One training run per recipe and seed (the random 80 / 10 / 10 split of
``mechanism_fidelity.py``); at each checkpoint epoch a callback scores the model as it is on the held-out test
cells: ATE Pearson r, R² and slope of predicted on observed ATE over the single targets with at least 10 test cells,
held-out IWELBO, and the fraction of active mask entries. Evaluation time is not counted in the training seconds.
Also writes a figure, ``docs/time_to_quality.png``. Checkpoints of one run cannot show the axis alignment (it
happens at a fraction of ``max_epochs``), so the fast recipe runs here without it (``align_at=None``), and both
recipes fit the paper's model (``penetrance=False``), as when this table was measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import scvi
from _markdown import markdown_table
from lightning.pytorch.callbacks import Callback
from mechanism_fidelity import held_out_singles, scores

import sams_scvi

DOCS = Path(__file__).resolve().parents[1] / "docs"


class Checkpoints(Callback):
    """Score the model at the end of the chosen epochs, with the evaluation's own time left out of the clock."""

    def __init__(self, model, epochs, evaluate) -> None:
        self.model, self.epochs, self.evaluate = model, set(epochs), evaluate
        self.rows: list[dict] = []
        self.evaluation_seconds = 0.0
        self.start = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch not in self.epochs:
            return
        begin = time.perf_counter()
        train_seconds = begin - self.start - self.evaluation_seconds
        self.model.is_trained_ = True  # the inference methods refuse an untrained model
        self.model.module.eval()
        try:
            row = self.evaluate()
        finally:
            self.model.module.train()
            self.model.is_trained_ = False
        self.rows.append({"epoch": epoch, "steps": trainer.global_step, "train_seconds": train_seconds, **row})
        self.evaluation_seconds += time.perf_counter() - begin


def run(recipe: str, seed: int, checkpoints: list[int]) -> list[dict]:
    scvi.settings.seed = seed
    adata, split, singles, observed = held_out_singles("tapseq", seed)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
    model = sams_scvi.SAMSVAE(adata, recipe=recipe, penetrance=False)
    plan_kwargs = {"align_at": None}  # checkpoints of one run: see the module docstring

    def evaluate() -> dict:
        ate = model.estimate_ate(singles, n_samples=500, progress_bar=False)
        probabilities = model.get_mask_probabilities().to_numpy()
        return {
            **scores(ate, observed, singles),
            "iwelbo_test": model.get_marginal_ll(indices=split[2], n_mc_samples=50),
            "mask_active_fraction": float((probabilities > 0.5).mean()),
        }

    callback = Checkpoints(model, checkpoints, evaluate)
    model.train(
        max_epochs=max(checkpoints),
        plan_kwargs=plan_kwargs,
        datasplitter_kwargs={"external_indexing": split},
        enable_progress_bar=False,
        check_val_every_n_epoch=max(checkpoints),
        callbacks=[callback],
    )
    return [{"recipe": recipe, "seed": seed, **row} for row in callback.rows]


RECIPE_LABELS = {
    "reference": "the paper's recipe",
    "fast": "fast recipe without alignment and penetrance (not today's default)",
}
AXES = {
    "pearson": "Pearson r, predicted vs observed ATE",
    "slope": "slope of predicted on observed ATE",
    "iwelbo_test": "held-out IWELBO\n(nats per cell, higher is better)",
}


def training_mean() -> pd.Series:
    """The training cells' own mean on the same test cells (``results_fidelity.csv``): mean and sd over seeds."""
    rows = pd.read_csv(DOCS / "results_fidelity.csv")
    rows = rows[(rows["predictor"] == "training-cell mean") & (rows["recipe"] == rows["recipe"].iloc[0])]
    return pd.concat({"mean": rows[["pearson", "r2", "slope"]].mean(), "sd": rows[["pearson", "r2", "slope"]].std()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[15, 30, 60, 120, 240])
    parser.add_argument("--from-csv", action="store_true", help="only redraw the page and figure from the .csv")
    args = parser.parse_args()
    scvi.settings.dl_num_workers = 0
    csv = DOCS / "results_time_to_quality.csv"
    if args.from_csv:
        rows = pd.read_csv(csv)
    else:
        rows = []
        for seed in args.seeds:
            for recipe in ("reference", "fast"):
                rows += run(recipe, seed, sorted(args.checkpoints))
                pd.DataFrame(rows).to_csv(csv, index=False)
        rows = pd.DataFrame(rows)
    seeds = sorted(int(seed) for seed in rows["seed"].unique())
    grouped = rows.drop(columns=["seed"]).groupby(["recipe", "epoch"], sort=False)
    mean, sd = grouped.mean(), grouped.std()
    columns = [
        "steps",
        "train_seconds",
        "pearson",
        "r2",
        "slope",
        "pearson_top20",
        "iwelbo_test",
        "mask_active_fraction",
    ]
    text = mean[columns].map(lambda v: f"{v:.3g}").astype(object) + " ± " + sd[columns].map(lambda v: f"{v:.2g}")
    baseline = training_mean()
    _figure(mean, sd, baseline, len(seeds))
    own_mean = ", ".join(
        f"{name} {baseline['mean'][column]:.3f} ± {baseline['sd'][column]:.3f}"
        for column, name in (("pearson", "r"), ("r2", "R²"), ("slope", "slope"))
    )
    (DOCS / "results_time_to_quality.md").write_text(
        "# Time to quality on TAP-seq\n\n"
        f"Produced by `python benchmarks/time_to_quality.py` (seeds {seeds}, mean ± sd over seeds; 2 CPU cores; "
        "batch size 512, so one epoch is 17 steps). Scores on the held-out test cells of each seed's random 80 / 10 / "
        "10 split, against the ATE observed on them; `slope` is the least-squares slope through the origin of "
        f"predicted on observed ATE (the training cells' own mean scores {own_mean} on the same cells, "
        "`results_fidelity.md`, which also gives the split-half noise ceiling); `iwelbo_test` in nats per cell (50 "
        "importance samples). Both recipes fit the paper's model without penetrance, and the fast recipe runs "
        "without its axis alignment (checkpoints of one run cannot show it), so neither row is today's default "
        "model; `results_fidelity.md` scores that.\n\n"
        + markdown_table(text.reset_index())
        + "\n\n![Quality against CPU seconds](time_to_quality.png)\n"
    )


def _figure(mean: pd.DataFrame, sd: pd.DataFrame, baseline: pd.Series, n_seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for recipe in mean.index.get_level_values("recipe").unique():
        m, s = mean.loc[recipe], sd.loc[recipe]
        for ax, column in zip(axes, AXES, strict=True):
            ax.errorbar(
                m["train_seconds"], m[column], yerr=s[column], marker="o", capsize=3, label=RECIPE_LABELS[recipe]
            )
    for ax, (column, label) in zip(axes, AXES.items(), strict=True):
        if column in baseline["mean"]:
            ax.axhline(baseline["mean"][column], color="black", ls="--", lw=1, label="training-cell mean (same cells)")
        ax.set_xlabel("training seconds (2 CPU cores)")
        ax.set_ylabel(label)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncols=3, frameon=False, fontsize=8)
    fig.suptitle(f"TAP-seq held-out test cells: quality against training time (mean ± sd over {n_seeds} seeds)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(DOCS / "time_to_quality.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
