"""Counts simulated from the SAMS-VAE generative process, with the ground truth kept alongside."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse


def simulate_sams(
    n_perturbations: int = 10,
    n_genes: int = 100,
    n_latent: int = 10,
    mask_prob: float = 0.2,
    effect_size: float = 2.0,
    n_cells_per_perturbation: int = 300,
    n_control_cells: int = 1000,
    combinations: list[str] | None = None,
    n_cells_per_combination: int = 0,
    library_size: float = 2000.0,
    dispersion: float = 10.0,
    n_hidden: int = 64,
    n_ate_samples: int = 20_000,
    seed: int = 0,
) -> AnnData:
    r"""Simulate a perturbation screen from the SAMS generative model.

    :math:`z = z_b + D(M \odot E)` with :math:`z_b \sim N(0, I)`, a sparse true mask
    :math:`m_{tk} \sim \mathrm{Bernoulli}(\text{mask\_prob})` (at least one active dimension per perturbation),
    effects :math:`e_{tk} = \pm\,\text{effect\_size}`, a random one-hidden-layer LeakyReLU decoder with softmax
    output, a log-normal library size and negative-binomial counts.

    Parameters
    ----------
    n_perturbations, n_genes, n_latent
        Sizes ``T``, ``G`` and ``K``.
    mask_prob
        Probability that a perturbation acts on a latent dimension.
    effect_size
        Magnitude of the active embedding entries.
    n_cells_per_perturbation, n_control_cells
        Cells per single perturbation and control cells.
    combinations
        Labels such as ``"p0+p1"`` to simulate as well.
    n_cells_per_combination
        Cells per combination.
    library_size
        Median library size.
    dispersion
        Negative-binomial inverse dispersion of every gene.
    n_hidden
        Width of the random decoder.
    n_ate_samples
        Monte-Carlo samples for the true ATEs.
    seed
        Random seed.

    Returns
    -------
    AnnData of counts with ``obs["perturbation"]`` and, in ``uns["simulation"]``, the true ``mask`` and
    ``embedding`` (T x K) and the true ATE table ``ate`` (labels x genes, on the scale of
    :meth:`sams_scvi.SAMSVAE.estimate_ate`, library 1e4).
    """
    rng = np.random.default_rng(seed)
    names = [f"p{t}" for t in range(n_perturbations)]
    mask = rng.random((n_perturbations, n_latent)) < mask_prob
    mask[np.arange(n_perturbations), rng.integers(0, n_latent, n_perturbations)] = True
    embedding = effect_size * rng.choice([-1.0, 1.0], size=(n_perturbations, n_latent))
    shift = mask * embedding

    w1 = rng.normal(0, 1 / np.sqrt(n_latent), (n_latent, n_hidden))
    b1 = rng.normal(0, 0.5, n_hidden)
    w2 = rng.normal(0, 1.5 / np.sqrt(n_hidden), (n_hidden, n_genes))
    b2 = rng.normal(0, 1.0, n_genes)

    def proportions(z: np.ndarray) -> np.ndarray:
        h = z @ w1 + b1
        logits = np.where(h > 0, h, 0.01 * h) @ w2 + b2
        logits -= logits.max(-1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(-1, keepdims=True)

    def negative_binomial(mu: np.ndarray) -> np.ndarray:
        return rng.poisson(rng.gamma(dispersion, mu / dispersion))

    combinations = list(combinations or [])
    labels = ["control"] * n_control_cells + [n for n in names for _ in range(n_cells_per_perturbation)]
    labels += [c for c in combinations for _ in range(n_cells_per_combination)]
    conditions = ["control", *names, *combinations]

    def design(label: str) -> np.ndarray:
        row = np.zeros(n_perturbations)
        if label != "control":
            for atom in label.split("+"):
                row[names.index(atom)] = 1.0
        return row

    designs = {c: design(c) for c in conditions}
    d = np.stack([designs[label] for label in labels])
    z = rng.normal(size=(len(labels), n_latent)) + d @ shift
    library = rng.lognormal(np.log(library_size), 0.3, len(labels))
    counts = negative_binomial(library[:, None] * proportions(z))

    means = {}
    for c in conditions:
        zc = rng.normal(size=(n_ate_samples, n_latent)) + designs[c] @ shift
        x = negative_binomial(1e4 * proportions(zc))
        means[c] = np.log2(1 + 1e4 * x / np.maximum(x.sum(1, keepdims=True), 1)).mean(0)
    ate = pd.DataFrame(
        np.stack([means[c] - means["control"] for c in conditions[1:]]),
        index=conditions[1:],
        columns=[f"g{g}" for g in range(n_genes)],
    )

    adata = AnnData(
        X=sparse.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=ate.columns.copy()),
    )
    adata.uns["simulation"] = {
        "mask": pd.DataFrame(mask.astype(int), index=names),
        "embedding": pd.DataFrame(embedding, index=names),
        "ate": ate,
    }
    return adata
