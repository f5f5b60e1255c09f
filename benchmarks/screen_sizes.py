"""The default training length across screen sizes, 10^3 to 10^6 cells: batch, epochs, steps and projected time.

Run: ``python benchmarks/screen_sizes.py`` (about 3 minutes on 2 CPU cores; writes ``docs/results_screen_sizes.md``).

For screens shaped like common designs (an arrayed or pilot screen of 10^3 cells, a 3,000-cell combinatorial screen,
TAP-seq-sized 10^4, a 10^5-cell pooled screen and a genome-scale 10^6-cell one), it lists what ``train()`` chooses
without arguments (:func:`sams_scvi.model.default_batch_size`, :func:`sams_scvi.model.default_max_epochs`): the
minibatch, the epochs, the optimiser steps, the updates a typical perturbation receives and the cells passed
through the network. It then times 30 steps of each at that batch size (synthetic sparse counts, 2,000 genes, ~60
nonzero per cell, as ``benchmarks/scaling.py``; the first 5 steps not timed, data loading included) and projects
the wall time of the default run. Quality is measured, not projected, at 3,000 cells
(``docs/results_small_screens.md``) and 10^4 (``docs/results_fidelity.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from _markdown import markdown_table

from sams_scvi.model import default_batch_size, default_max_epochs, updates_per_epoch

TRAIN_FRACTION = 0.9
# name: (cells, perturbations); controls are 10 % of the cells
SCREENS = {
    "arrayed / pilot": (1_000, 10),
    "combinatorial": (3_000, 25),
    "TAP-seq sized": (10_000, 50),
    "pooled": (100_000, 500),
    "genome-scale": (1_000_000, 5_000),
}


def plan(cells: int, perturbations: int) -> dict:
    """What train() chooses for a screen of this shape."""
    n_train = math.ceil(TRAIN_FRACTION * cells)
    typical = 0.9 * n_train / perturbations
    batch = default_batch_size(n_train)
    epochs = default_max_epochs(n_train, batch, typical)
    steps = epochs * math.ceil(n_train / batch)
    return {
        "cells": cells,
        "perturbations": perturbations,
        "batch_size": batch,
        "epochs": epochs,
        "steps": steps,
        "updates_per_perturbation": round(epochs * updates_per_epoch(n_train, batch, typical)),
        "cell_passes_millions": round(epochs * n_train / 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output", default=str(Path(__file__).parents[1] / "docs" / "results_screen_sizes.md"))
    args = parser.parse_args()
    rows = []
    for name, (cells, perturbations) in SCREENS.items():
        row = {"screen": name, **plan(cells, perturbations)}
        code = (
            f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import scaling; "
            f"print(json.dumps(scaling.run_one({cells}, {perturbations}, {args.steps}, 5, False, False, "
            f"batch_size={row['batch_size']})))"
        )
        result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        timing = json.loads(result.stdout.strip().splitlines()[-1])
        row["loop_ms"] = timing["loop_ms"]
        row["projected_minutes"] = round(row["steps"] * timing["loop_ms"] / 6e4, 1)
        rows.append(row)
        print(row, flush=True)
    table = pd.DataFrame(rows)
    Path(args.output).write_text(
        "# The default training length across screen sizes\n\n"
        f"Produced by `python benchmarks/screen_sizes.py` (torch {torch.__version__}, {torch.get_num_threads()} "
        "threads, CPU). What `train()` chooses without arguments for screens of each size (90 % of the cells "
        "trained on, a typical perturbation with 90 % of the training cells divided among the perturbations): "
        "minibatch, epochs, optimiser steps, updates of a typical perturbation (steps whose minibatch holds its "
        "cells) and cell passes. `loop_ms` is the measured time per step at that batch size, data loading "
        "included (synthetic counts, 2,000 genes, ~60 nonzero per cell); `projected_minutes` = steps x `loop_ms`, a "
        "projection, not a full run. The held-out quality of the default is measured at 3,000 cells "
        "(`results_small_screens.md`) and at 10^4 (`results_fidelity.md`).\n\n"
        + markdown_table(table, index=None)
        + "\n"
    )


if __name__ == "__main__":
    main()
