"""Scaling benchmark: SAMS-VAE training on synthetic sparse screens from 10^4 to 10^6 cells, 100 to 10,000 perturbations.

Each configuration runs in a fresh process (so its peak memory is its own): build a sparse screen (2,000 genes, about
60 nonzero genes per cell, one-hot perturbations, 10% controls), set it up, and train through scvi-tools' own data
loader (``max_steps`` steps of batch 512, data loading included); the first ``--warmup`` steps are not timed. It
reports the median step, the projected time of one epoch (steps per epoch x median step), the peak resident memory,
and, with ``--ate``, the time of ``estimate_ate`` for every perturbation.

    python benchmarks/scaling.py                                 # the default grid, writes benchmarks/SCALING.md
    python benchmarks/scaling.py --cells 10000 --perturbations 100 1000 --steps 20 --output -   # print only

Not a test: timings depend on the machine, and a row at 10^6 cells takes minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_GENES = 2_000
NONZERO_PER_CELL = 60
BATCH_SIZE = 512
ATE_SAMPLES = 200


def synthetic_screen(n_cells: int, n_perturbations: int, seed: int = 0):
    """A sparse CSR screen: ~60 of 2,000 genes counted per cell, one perturbation or control per cell."""
    import anndata
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    gene_share = rng.lognormal(0.0, 1.0, N_GENES)
    gene_share /= gene_share.sum()
    columns = rng.choice(N_GENES, size=(n_cells, NONZERO_PER_CELL), p=gene_share).astype(np.int32)
    columns.sort(axis=1)
    values = rng.poisson(3.0, size=(n_cells, NONZERO_PER_CELL)).astype(np.float32) + 1
    indptr = np.arange(0, n_cells * NONZERO_PER_CELL + 1, NONZERO_PER_CELL, dtype=np.int64)
    counts = sparse.csr_matrix((values.ravel(), columns.ravel(), indptr), shape=(n_cells, N_GENES))
    counts.sum_duplicates()
    labels = np.where(rng.random(n_cells) < 0.1, -1, rng.integers(0, n_perturbations, n_cells))
    names = np.array([f"p{t}" for t in range(n_perturbations)] + ["control"], dtype=object)
    obs = pd.DataFrame({"perturbation": pd.Categorical(names[labels])}, index=pd.RangeIndex(n_cells).astype(str))
    return anndata.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"g{g}" for g in range(N_GENES)]))


def run_one(
    n_cells: int,
    n_perturbations: int,
    steps: int,
    warmup: int,
    ate: bool,
    all_globals: bool,
    backed: bool = False,
    batch_size: int = BATCH_SIZE,
) -> dict:
    """Train ``steps`` steps on one configuration in this process; returns the measurements.

    ``backed``: write the screen to an h5ad file in a temporary folder and train from it opened with
    ``backed="r"`` (rows read from disk per minibatch; the file is written by a child process so that building it
    does not count toward this process's peak memory).
    """
    import scvi
    import torch
    from lightning.pytorch import Callback

    import sams_scvi
    from sams_scvi.module import SAMSModule

    if all_globals:  # the behaviour before 0.2: every step draws the globals of all T perturbations
        SAMSModule._draws_present_only = property(lambda self: False)

    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    if backed:
        import anndata

        folder = tempfile.mkdtemp(prefix="sams_scaling_")
        path = os.path.join(folder, "screen.h5ad")
        write = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import scaling; "
        write += f"scaling.synthetic_screen({n_cells}, {n_perturbations}).write_h5ad({path!r})"
        subprocess.run([sys.executable, "-c", write], check=True)
    start = time.perf_counter()
    adata = anndata.read_h5ad(path, backed="r") if backed else synthetic_screen(n_cells, n_perturbations)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata)
    setup_s = time.perf_counter() - start

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.times: list[float] = []
            self.end = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.end = time.perf_counter()
            self.times.append(self.end - self.starts[-1])

    timer = StepTimer()
    model.train(
        max_epochs=1,
        max_steps=steps,
        batch_size=batch_size,
        train_size=1.0,
        enable_progress_bar=False,
        callbacks=[timer],
    )
    step = float(np.median(timer.times[warmup:]))
    # from the first timed step's start to the last step's end: steps plus the data loading between them
    loop = (timer.end - timer.starts[warmup]) / (len(timer.times) - warmup)
    steps_per_epoch = int(np.ceil(n_cells / batch_size))
    row = {
        "cells": n_cells,
        "perturbations": n_perturbations,
        "globals_drawn": "all T" if all_globals else "present",
        "data": "backed h5ad" if backed else "in memory",
        "setup_s": round(setup_s, 1),
        "step_ms": round(1e3 * step, 1),
        "loop_ms": round(1e3 * loop, 1),
        "epoch_min_projected": round(steps_per_epoch * loop / 60, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "torch_threads": torch.get_num_threads(),
    }
    if ate:
        start = time.perf_counter()
        effects = model.estimate_ate(n_samples=ATE_SAMPLES, progress_bar=False)
        row["ate_perturbations"] = effects.n_obs
        row["ate_all_s"] = round(time.perf_counter() - start, 1)
        row["peak_rss_gb_with_ate"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if backed:
        adata.file.close()
        shutil.rmtree(folder, ignore_errors=True)
    return row


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [
        "# Scaling benchmark (`benchmarks/scaling.py`)",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"`{' '.join(sys.argv[1:]) or 'defaults'}`. Synthetic sparse screens: {N_GENES} genes, ~{NONZERO_PER_CELL} "
        f"nonzero per cell, one-hot perturbations, batch {BATCH_SIZE}, default model and recipe; {args.steps} steps "
        f"through scvi-tools' data loader, the first {args.warmup} not timed. `step_ms`: median forward + backward + "
        "Adam; `loop_ms`: wall time per step including data loading and Lightning; `epoch_min_projected`: steps per "
        "epoch x `loop_ms`; `peak_rss_gb`: the process's peak resident memory (data, model and training); with "
        f"`--ate`, `estimate_ate(n_samples={ATE_SAMPLES})` of every observed perturbation (`ate_perturbations`), its "
        "time and the peak memory including it.",
        "",
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--perturbations", type=int, nargs="+", default=[100, 1_000, 10_000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ate", action="store_true", help="also time estimate_ate of every perturbation")
    parser.add_argument(
        "--compare-all-globals", action="store_true", help="also run each configuration drawing all T perturbations"
    )
    parser.add_argument(
        "--backed", action="store_true", help="train from an h5ad file opened backed='r' instead of memory"
    )
    parser.add_argument("--output", default=str(Path(__file__).with_name("SCALING.md")), help="'-': print only")
    parser.add_argument("--one", nargs=4, type=int, help=argparse.SUPPRESS)  # internal: one configuration
    args = parser.parse_args()
    if args.one is not None:
        n_cells, n_perturbations, all_globals, backed = args.one
        row = run_one(n_cells, n_perturbations, args.steps, args.warmup, args.ate, bool(all_globals), bool(backed))
        print(json.dumps(row))
        return
    rows = []
    variants = [0, 1] if args.compare_all_globals else [0]
    for n_cells in args.cells:
        for n_perturbations in args.perturbations:
            for all_globals in variants:
                one = map(str, (n_cells, n_perturbations, all_globals, int(args.backed)))
                command = [sys.executable, __file__, "--one", *one, "--steps", str(args.steps),
                           "--warmup", str(args.warmup)] + (["--ate"] if args.ate else [])  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    table = markdown(rows, args)
    if args.output == "-":
        print(table)
    else:
        Path(args.output).write_text(table)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
