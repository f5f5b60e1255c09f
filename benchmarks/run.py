"""Performance harness: SAMS-VAE training steps and predictions against scVI at the paper's data shapes.

Run ``python benchmarks/run.py`` (or ``make bench``) for the full benchmark, which writes ``benchmarks/RESULTS.md``;
``python benchmarks/run.py --quick`` is a smoke test on tiny shapes (a few seconds, writes nothing). Options:
``--device auto|cpu|cuda``, ``--threads N`` (default: all available cores), ``--steps N`` and ``--warmup N``
(timed and warm-up training steps), ``--shapes replogle norman`` and ``--output PATH``.

On synthetic Poisson counts (gene-specific rates, a few hundred UMIs per cell) shaped like the paper's Replogle
(1,187 genes, 722 one-hot perturbations) and Norman (5,000 genes, 105 perturbations with doubles) screens, it
measures, in one process, the median training step (forward, backward, Adam step) of :class:`sams_scvi.SAMSVAE`
(batch 512, 5 particles, correlated guide; the default model with penetrance and the paper's without) and of
:class:`scvi.model.SCVI` with the same layer sizes on
batch x particles rows, then the time of ``estimate_ate`` (Replogle only), ``get_marginal_ll`` and
``predict_perturbation``. Steps reuse one prefetched minibatch, so data loading is not timed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scvi
import torch
from scipy import sparse

import sams_scvi


@dataclass(frozen=True)
class Shape:
    """Data and network sizes of one benchmark configuration."""

    name: str
    n_genes: int
    n_perturbations: int
    n_doubles: int
    n_latent: int
    emb_hidden: int
    emb_layers: int
    time_ate: bool
    n_hidden: int = 400
    n_layers: int = 1
    batch_size: int = 512
    n_particles: int = 5
    ate_samples: int = 2500
    ll_cells: int = 512
    ll_samples: int = 100
    predict_cells: int = 100
    predict_samples: int = 20


SHAPES = {
    "replogle": Shape("Replogle", 1187, 722, 0, 100, 200, 2, time_ate=True),
    "norman": Shape("Norman", 5000, 105, 100, 200, 400, 4, time_ate=False),
}
QUICK = {
    "n_genes": 60,
    "n_latent": 8,
    "n_hidden": 32,
    "emb_hidden": 16,
    "batch_size": 32,
    "ate_samples": 40,
    "ll_cells": 32,
    "ll_samples": 10,
    "predict_cells": 10,
    "predict_samples": 4,
}


def synthetic_adata(shape: Shape, seed: int) -> anndata.AnnData:
    """Poisson counts with gene-specific rates and ~300 UMIs per cell; 10% controls, every label present."""
    rng = np.random.default_rng(seed)
    singles = [f"p{t}" for t in range(shape.n_perturbations)]
    pairs = set()
    while len(pairs) < shape.n_doubles:
        a, b = sorted(rng.choice(shape.n_perturbations, size=2, replace=False))
        pairs.add(f"p{a}+p{b}")
    labels = singles + sorted(pairs)
    n_cells = shape.batch_size * shape.n_particles + shape.ll_cells  # scVI's step needs batch x particles cells
    n_control = max(n_cells // 10, shape.predict_cells)
    cell_labels = np.array(["control"] * n_control + [labels[i % len(labels)] for i in range(n_cells - n_control)])
    rng.shuffle(cell_labels)
    gene_share = rng.lognormal(0.0, 1.0, shape.n_genes)
    gene_share /= gene_share.sum()
    library = rng.lognormal(np.log(300.0), 0.3, n_cells)
    counts = rng.poisson(library[:, None] * gene_share[None, :]).astype(np.float32)
    obs = pd.DataFrame({"perturbation": cell_labels}, index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"gene{g}" for g in range(shape.n_genes)])
    return anndata.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=var)


def first_batch(model, indices: np.ndarray, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One minibatch from the model's own data loader (so the registry keys match), moved to ``device``."""
    tensors = next(iter(model._make_data_loader(adata=model.adata, indices=indices, batch_size=batch_size)))
    return {k: v.to(device) for k, v in tensors.items()}


def train_step(module: torch.nn.Module, tensors: dict, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """A closure running one forward + backward + Adam step of an scvi-tools module."""

    def step() -> None:
        _, _, loss_out = module(tensors, loss_kwargs={"kl_weight": 1.0})
        loss_out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock milliseconds of ``fn()``, synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kilobytes on Linux


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench_shape(shape: Shape, device: torch.device, warmup: int, steps: int, seed: int) -> list[dict]:
    """Time one shape; returns the table rows."""
    scvi.settings.seed = seed
    adata = synthetic_adata(shape, seed)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
    design = sparse.csr_matrix(adata.obsm["_scvi_perturbation"])
    counts = np.asarray((design != 0).sum(0)).ravel().astype(np.float32)
    models = {}
    # the default model (penetrance: each perturbed cell is decoded responding and escaping) and the paper's
    for name, penetrance in (("default", True), ("paper's model", False)):
        models[name] = sams_scvi.SAMSVAE(
            adata,
            n_latent=shape.n_latent,
            n_hidden=shape.n_hidden,
            n_layers=shape.n_layers,
            guide="correlated",
            mean_field_encoder=False,
            n_particles=shape.n_particles,
            embedding_encoder_n_hidden=shape.emb_hidden,
            embedding_encoder_n_layers=shape.emb_layers,
            penetrance=penetrance,
        )
        models[name].module.train_perturbation_counts.copy_(torch.as_tensor(counts))  # else every KL share is 0
        models[name].to_device(device)
        models[name].module.train()
    model = models["default"]
    adata_scvi = adata.copy()
    scvi.model.SCVI.setup_anndata(adata_scvi)
    reference = scvi.model.SCVI(
        adata_scvi, n_hidden=shape.n_hidden, n_layers=shape.n_layers, n_latent=shape.n_latent, gene_likelihood="nb"
    )
    reference.to_device(device)
    reference.module.train()

    cells = np.arange(adata.n_obs)
    sams_rows, scvi_rows = shape.batch_size, shape.batch_size * shape.n_particles
    steps_of = {
        name: train_step(m.module, first_batch(m, cells, sams_rows, device), torch.optim.Adam(m.module.parameters()))
        for name, m in models.items()
    }
    steps_of["scvi"] = train_step(
        reference.module,
        first_batch(reference, cells, scvi_rows, device),
        torch.optim.Adam(reference.module.parameters()),
    )
    memory = {}
    for name, step in steps_of.items():
        reset_peak(device)
        for _ in range(warmup):
            step()
        memory[name] = peak_memory_mb(device)
    times = {name: [] for name in steps_of}
    for _ in range(steps):  # interleaved, so drifting machine load hits every model alike
        for name, step in steps_of.items():
            times[name].append(timed(step, device))
    scvi_median = float(np.median(times["scvi"]))
    rows = []
    for name in models:
        sams_median = float(np.median(times[name]))
        ratio = sams_median / scvi_median
        print(
            f"{shape.name}: SAMS ({name}) step {sams_median:.1f} ms, scVI step {scvi_median:.1f} ms, ratio {ratio:.2f}"
        )
        step_memory = (
            f"{memory[name]:.0f} / {memory['scvi']:.0f}" if device.type == "cuda" else f"{peak_memory_mb(device):.0f}"
        )
        rows.append(
            {
                "shape": shape.name,
                "measurement": f"train step, {name} ({sams_rows} cells x {shape.n_particles} particles vs {scvi_rows} "
                "rows)",
                "SAMS ms": sams_median,
                "scVI ms": scvi_median,
                "ratio": ratio,
                "peak MB": step_memory,
                "details": f"median of {steps} after {warmup} warm-up; IQR SAMS "
                f"{np.percentile(times[name], 25):.1f}-{np.percentile(times[name], 75):.1f} ms",
            }
        )

    model.module.eval()
    model.is_trained_ = True  # the prediction methods refuse untrained models
    labels = adata.obs["perturbation"].astype(str)
    controls = np.flatnonzero(labels == "control")[: shape.predict_cells]
    perturbed = sorted(set(labels) - {"control"}, key=lambda s: (s.count("+"), s))
    predict_labels = [perturbed[0], perturbed[1], perturbed[-1]]  # the last is a double where there are any
    calls = {}
    if shape.time_ate:
        calls[f"estimate_ate ({len(perturbed)} labels, {shape.ate_samples} samples)"] = lambda: model.estimate_ate(
            n_samples=shape.ate_samples, progress_bar=False
        )
    calls[f"get_marginal_ll ({shape.ll_cells} cells, {shape.ll_samples} samples)"] = lambda: model.get_marginal_ll(
        indices=cells[: shape.ll_cells], n_mc_samples=shape.ll_samples
    )
    calls[
        f"predict_perturbation ({len(controls)} cells x {len(predict_labels)} labels, {shape.predict_samples} samples)"
    ] = lambda: model.predict_perturbation(
        perturbations=predict_labels, indices=controls, n_samples=shape.predict_samples, progress_bar=False
    )
    # warm-up: the first negative-binomial draws after installing or editing the sampler compile its kernels
    # (numba, ~10-20 s, then cached on disk): a one-off cost, not part of the timings
    model.predict_perturbation(perturbations=predict_labels[:1], indices=controls[:2], n_samples=1, progress_bar=False)
    model.estimate_ate(perturbations=predict_labels[:1], n_samples=4, progress_bar=False)
    for measurement, call in calls.items():
        reset_peak(device)
        ms = timed(call, device)
        print(f"{shape.name}: {measurement} {ms:.0f} ms", flush=True)
        rows.append(
            {
                "shape": shape.name,
                "measurement": measurement,
                "SAMS ms": ms,
                "peak MB": f"{peak_memory_mb(device):.0f}",
                "details": "one call",
            }
        )
    return rows


def machine(device: torch.device) -> str:
    """CPU model, threads, GPU, library versions, commit and date, as one Markdown paragraph."""
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (
        f"Machine: {cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads, device {device}{gpu}. "
        f"Python {platform.python_version()}, torch {torch.__version__}, scvi-tools {scvi.__version__}, "
        f"sams_scvi {sams_scvi.__version__} (commit {commit}); {datetime.date.today().isoformat()}."
    )


def markdown(rows: list[dict], device: torch.device) -> str:
    columns = ["shape", "measurement", "SAMS ms", "scVI ms", "ratio", "peak MB", "details"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "-")
            cells.append(f"{value:.{2 if column == 'ratio' else 1}f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    memory = (
        "peak CUDA memory allocated during the measurement (train step: SAMS / scVI warm-up)"
        if device.type == "cuda"
        else "peak resident memory of the whole process so far (monotone over the rows)"
    )
    return "\n".join(lines) + f"\n\nratio = SAMS step / scVI step. peak MB: {memory}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    )
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up training steps (default 5; quick 2)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for smoke tests; writes nothing")
    parser.add_argument("--output", type=Path, default=None, help="Markdown file (default benchmarks/RESULTS.md)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as SAMSVAE.train does: denormal weights are ~5x slower on CPUs
    steps = args.steps if args.steps is not None else 3 if args.quick else 20
    warmup = args.warmup if args.warmup is not None else 2 if args.quick else 5
    shapes = [SHAPES[name] for name in args.shapes]
    if args.quick:
        shapes = [
            replace(s, **QUICK, name=f"{s.name} (quick)", n_perturbations=12, n_doubles=min(s.n_doubles, 6))
            for s in shapes
        ]

    rows = [row for shape in shapes for row in bench_shape(shape, device, warmup, steps, args.seed)]
    command = " ".join(["python benchmarks/run.py", *sys.argv[1:]])
    text = (
        f"# SAMS-VAE performance against scVI\n\nProduced by `{command}` on synthetic counts "
        f"(see the module docstring of benchmarks/run.py).\n{machine(device)}\n\n{markdown(rows, device)}\n"
    )
    print("\n" + text)
    output = args.output or (None if args.quick else Path(__file__).resolve().parent / "RESULTS.md")
    if output is not None:
        output.write_text(text)
        print(f"written to {output}")


if __name__ == "__main__":
    main()
