"""A combinatorial screen simulated in expression space, with interactions sized like those of real doubles."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

# log c1, log c2 of the doubles' fits c1 * a + c2 * b + interaction (Norman et al. 2019's 125 fitted doubles)
LOG_COEF_MEAN, LOG_COEF_SD = -0.33, 0.59
INTERACTION_NORM = (0.2, 0.6)  # the interaction's norm, as a fraction of that of c1 * a + c2 * b
PROGRAM_GENES, PRIVATE_GENES = 15, 3


def simulate_combinations(
    n_singles: int = 16,
    n_programs: int = 6,
    n_screen_doubles: int = 8,
    n_held_out_doubles: int = 5,
    n_control_cells: int = 900,
    n_cells_per_single: int = 100,
    n_cells_per_double: int = 60,
    n_test_control_cells: int = 1_000,
    n_test_cells_per_double: int = 300,
    seed: int = 0,
) -> AnnData:
    r"""A combinatorial CRISPR screen simulated in expression space, not from SAMS-VAE's own model.

    Every gene's mean expression, negative-binomial dispersion and the library sizes are those of the bundled
    ECCITE-seq control cells (299 genes). Each single perturbation changes the log expression of one or two of
    ``n_programs`` shared gene programs (15 genes each, random signed strengths) and of a few genes of its own.
    A double's log-fold change is :math:`c_1 \delta_a + c_2 \delta_b + \varepsilon_{ab}`, the form Norman et al.
    (2019) fit to each of their 125 doubles: :math:`\log c` is drawn from a normal with their fits' mean and
    standard deviation (-0.33 and 0.59: buffering more often than synergy), and the interaction
    :math:`\varepsilon_{ab}` has 20-60 % of the norm of the rest, on the genes either single moves and five
    others. There is no latent space, so SAMS-VAE's additive latent shifts are an approximation here, as on real
    data.

    The cells come in two parts, ``obs["split"]``: the ``"screen"`` (control cells, every single and
    ``n_screen_doubles`` doubles) and fresh ``"test"`` cells (control cells and ``n_held_out_doubles`` doubles that
    no screen cell carries, each of whose singles is in the screen), to train on the one and score on the other.

    Parameters
    ----------
    n_singles, n_programs
        Single perturbations (``g0``, ``g1``, ...) and shared gene programs.
    n_screen_doubles, n_held_out_doubles
        Doubles in the screen, and doubles only in the test cells.
    n_control_cells, n_cells_per_single, n_cells_per_double
        Screen cells per label.
    n_test_control_cells, n_test_cells_per_double
        Test cells per label.
    seed
        Random seed.

    Returns
    -------
    AnnData of counts (sparse) with ``obs["perturbation"]`` and ``obs["split"]``, and ``uns["simulation"]``:
    ``log_fold_change`` (labels x genes, the true effect on the log expression proportions before they are
    renormalised), ``held_out_doubles`` and ``screen_doubles``.
    """
    from ._datasets import papalexi2021_eccite

    rng = np.random.default_rng(seed)
    proportion, dispersion, libraries = _control_profile(papalexi2021_eccite())
    n_genes = len(proportion)
    programs = np.zeros((n_programs, n_genes))
    for program in programs:
        program[rng.choice(n_genes, PROGRAM_GENES, replace=False)] = rng.normal(0.0, 0.8, PROGRAM_GENES)
    effects = {}
    for i in range(n_singles):
        chosen = rng.choice(n_programs, rng.integers(1, 3), replace=False)
        strengths = rng.choice([-1, 1], len(chosen)) * rng.uniform(0.6, 1.5, len(chosen))
        effect = strengths @ programs[chosen]
        effect[rng.choice(n_genes, PRIVATE_GENES, replace=False)] += rng.normal(0.0, 0.7, PRIVATE_GENES)
        effects[f"g{i}"] = effect
    pairs = set()
    n_doubles = n_screen_doubles + n_held_out_doubles
    if n_doubles > n_singles * (n_singles - 1) // 2:
        raise ValueError(f"{n_singles} singles make fewer than {n_doubles} distinct doubles.")
    while len(pairs) < n_doubles:
        a, b = sorted(rng.choice(n_singles, 2, replace=False))
        pairs.add((f"g{a}", f"g{b}"))
    pairs = sorted(pairs)
    rng.shuffle(pairs)
    for a, b in pairs:
        c1, c2 = np.clip(np.exp(rng.normal(LOG_COEF_MEAN, LOG_COEF_SD, 2)), 0.1, 3.0)
        combined = c1 * effects[a] + c2 * effects[b]
        genes = np.union1d(np.flatnonzero((effects[a] != 0) | (effects[b] != 0)), rng.choice(n_genes, 5, replace=False))
        interaction = np.zeros(n_genes)
        interaction[genes] = rng.standard_normal(len(genes))
        interaction *= rng.uniform(*INTERACTION_NORM) * np.linalg.norm(combined) / np.linalg.norm(interaction)
        effects[f"{a}+{b}"] = combined + interaction
    screen_doubles = [f"{a}+{b}" for a, b in pairs[:n_screen_doubles]]
    held_out = [f"{a}+{b}" for a, b in pairs[n_screen_doubles:]]
    screen_sizes = {"control": n_control_cells, **{f"g{i}": n_cells_per_single for i in range(n_singles)}}
    screen_sizes.update(dict.fromkeys(screen_doubles, n_cells_per_double))
    test_sizes = {"control": n_test_control_cells, **dict.fromkeys(held_out, n_test_cells_per_double)}

    parts, names, labels = [], [], []
    for split, sizes in (("screen", screen_sizes), ("test", test_sizes)):
        part_labels = np.repeat(list(sizes), list(sizes.values()))
        log_fold = np.stack([effects.get(label, np.zeros(n_genes)) for label in part_labels])
        rates = proportion * np.exp(log_fold)
        rates /= rates.sum(1, keepdims=True)
        mean = rates * rng.choice(libraries, len(part_labels))[:, None]
        parts.append(rng.negative_binomial(dispersion, dispersion / (dispersion + mean)).astype(np.float32))
        names += [f"{split}{i}" for i in range(len(part_labels))]
        labels.append(pd.DataFrame({"perturbation": part_labels, "split": split}))
    obs = pd.concat(labels, ignore_index=True)
    obs.index = pd.Index(names)
    obs["perturbation"] = pd.Categorical(obs["perturbation"])
    obs["split"] = pd.Categorical(obs["split"], categories=["screen", "test"])
    gene_names = [f"gene{j}" for j in range(n_genes)]
    return AnnData(
        X=sparse.csr_matrix(np.concatenate(parts)),
        obs=obs,
        var=pd.DataFrame(index=gene_names),
        uns={
            "simulation": {
                "log_fold_change": pd.DataFrame(
                    np.stack(list(effects.values())), index=list(effects), columns=gene_names
                ),
                "screen_doubles": screen_doubles,
                "held_out_doubles": held_out,
            }
        },
    )


def _control_profile(adata: AnnData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene proportions and NB dispersions, and library sizes, of a screen's control cells."""
    counts = adata[adata.obs["perturbation"] == "control"].X
    counts = (counts.toarray() if sparse.issparse(counts) else np.asarray(counts)).astype(float)
    library = counts.sum(1)
    proportion = counts.sum(0) / library.sum()
    mean = proportion * np.median(library)
    normalised = counts / library[:, None] * np.median(library)
    excess = np.maximum(normalised.var(0) - mean, 1e-3 * mean**2)
    dispersion = np.clip(mean**2 / excess, 0.05, 100.0)
    return proportion, dispersion, library[library > 0]
