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
    penetrance: float = 1.0,
    mask: np.ndarray | None = None,
    embedding: np.ndarray | None = None,
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
    penetrance
        Probability that a cell responds to each of its perturbations (below 1: cells that escape it keep their
        basal state for that perturbation); ``obs["responded"]`` records whether a cell responded to all of its
        perturbations, and the true ATEs average over responders and escapers.
    mask, embedding
        The true mask (0/1) and embeddings, each ``(n_perturbations, n_latent)``, to plant a structure (e.g.
        modules of perturbations sharing dimensions); default, drawn as above.
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
    drawn_mask = _true_mask(rng, n_perturbations, n_latent, mask_prob)
    drawn_embedding = effect_size * rng.choice([-1.0, 1.0], size=(n_perturbations, n_latent))
    if mask is not None and not np.isin(np.asarray(mask), (0, 1)).all():
        raise ValueError("A planted `mask` holds 0 and 1 only.")
    mask = drawn_mask if mask is None else _planted(mask, "mask", (n_perturbations, n_latent)).astype(int)
    embedding = drawn_embedding if embedding is None else _planted(embedding, "embedding", (n_perturbations, n_latent))
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

    labels, conditions, design = _screen(
        names, n_control_cells, n_cells_per_perturbation, combinations, n_cells_per_combination
    )
    if not 0.0 < penetrance <= 1.0:
        raise ValueError(f"`penetrance` must be in (0, 1], not {penetrance}.")

    def responding(d: np.ndarray) -> np.ndarray:  # each (cell, perturbation) acts with probability `penetrance`
        return d * (rng.random(d.shape) < penetrance) if penetrance < 1.0 else d

    cell_design = design(labels)
    acting = responding(cell_design)
    z = rng.normal(size=(len(labels), n_latent)) + acting @ shift
    library = rng.lognormal(np.log(library_size), 0.3, len(labels))
    counts = negative_binomial(library[:, None] * proportions(z))

    means = {}
    for c in conditions:
        condition = np.repeat(design([c]), n_ate_samples, axis=0)
        zc = rng.normal(size=(n_ate_samples, n_latent)) + responding(condition) @ shift
        x = negative_binomial(1e4 * proportions(zc))
        means[c] = np.log2(1 + 1e4 * x / np.maximum(x.sum(1, keepdims=True), 1)).mean(0)
    obs = {"perturbation": pd.Categorical(labels), "responded": (acting == cell_design).all(1)}
    return _screen_anndata(sparse.csr_matrix(counts.astype(np.float32)), obs, names, mask, embedding, means)


def simulate_sams_gaussian(
    n_perturbations: int = 100,
    n_genes: int = 100,
    n_latent: int = 15,
    mask_prob: float = 2 / 15,
    effect_mean: float = 5.0,
    effect_sd: float = 0.5,
    n_cells_per_perturbation: int = 700,
    n_control_cells: int = 700,
    combinations: list[str] | None = None,
    n_cells_per_combination: int = 0,
    split_fractions: tuple[float, float, float] = (5 / 7, 1 / 7, 1 / 7),
    n_layers: int = 4,
    n_hidden: int = 50,
    noise_fraction: float = 0.2,
    n_ate_samples: int = 20_000,
    seed: int = 0,
) -> AnnData:
    r"""Simulate a screen as in the SAMS-VAE paper's ground-truth experiment: sparse shifts, Gaussian outputs.

    :math:`z = z_b + D(M \odot E)` with :math:`z_b \sim N(0, I_K)`, a true mask
    :math:`m_{tk} \sim \mathrm{Bernoulli}(\text{mask\_prob})` (at least one active dimension per perturbation) and
    effects :math:`e_{tk} = \pm N(\text{effect\_mean}, \text{effect\_sd}^2)` with a random sign. The decoder is
    ``n_layers`` random orthogonal layers of width ``n_hidden`` with LeakyReLU(0.2), then a random orthogonal map
    to the genes; its outputs are standardised per gene over the simulated cells, and Gaussian noise makes up
    ``noise_fraction`` of each gene's variance. The defaults are the paper's: K = 15, 100 perturbations and
    genes, 500 / 100 / 100 cells per perturbation for training / validation / test.

    Parameters
    ----------
    n_perturbations, n_genes, n_latent
        Sizes ``T``, ``G`` and ``K``.
    mask_prob
        Probability that a perturbation acts on a latent dimension.
    effect_mean, effect_sd
        Mean and standard deviation of the magnitude of an active embedding entry.
    n_cells_per_perturbation, n_control_cells
        Cells per single perturbation and control cells.
    combinations
        Labels such as ``"p0+p1"`` to simulate as well (their shifts add).
    n_cells_per_combination
        Cells per combination.
    split_fractions
        Fractions of each label's cells in ``obs["split"]`` = ``"train"``, ``"validation"`` and ``"test"``.
    n_layers, n_hidden
        Depth and width of the random decoder.
    noise_fraction
        Share of each gene's variance that is noise.
    n_ate_samples
        Monte-Carlo samples for the true ATEs.
    seed
        Random seed.

    Returns
    -------
    AnnData of normalised values (fit with ``likelihood="normal"``) with ``obs["perturbation"]`` and
    ``obs["split"]``; ``uns["simulation"]`` holds the true ``mask`` and ``embedding`` (T x K) and the true ATE table
    ``ate`` (labels x genes, on the data's scale).
    """
    rng = np.random.default_rng(seed)
    names = [f"p{t}" for t in range(n_perturbations)]
    mask = _true_mask(rng, n_perturbations, n_latent, mask_prob)
    embedding = rng.choice([-1.0, 1.0], size=mask.shape) * rng.normal(effect_mean, effect_sd, size=mask.shape)
    shift = mask * embedding
    widths = [n_latent] + [n_hidden] * n_layers + [n_genes]
    weights = [_random_orthogonal(rng, a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]

    def decode(z: np.ndarray) -> np.ndarray:
        for w in weights[:-1]:
            z = z @ w
            z = np.where(z > 0, z, 0.2 * z)
        return z @ weights[-1]

    labels, conditions, design = _screen(
        names, n_control_cells, n_cells_per_perturbation, combinations, n_cells_per_combination
    )
    signal = decode(rng.normal(size=(len(labels), n_latent)) + design(labels) @ shift)
    center, spread = signal.mean(0), signal.std(0)
    noise_sd = np.sqrt(noise_fraction / (1 - noise_fraction))
    values = (signal - center) / spread + noise_sd * rng.normal(size=signal.shape)

    means = {
        c: ((decode(rng.normal(size=(n_ate_samples, n_latent)) + design([c]) @ shift) - center) / spread).mean(0)
        for c in conditions
    }
    obs = {
        "perturbation": pd.Categorical(labels),
        "split": pd.Categorical(_split_within_labels(rng, labels, split_fractions)),
    }
    return _screen_anndata(values.astype(np.float32), obs, names, mask, embedding, means)


def _screen_anndata(x, obs: dict, names: list[str], mask, embedding, means: dict) -> AnnData:
    """The simulated cells, with the true masks, embeddings and ATEs in ``uns["simulation"]``.

    The ATEs are each condition's mean minus the control's (``means``: condition -> per-gene mean, control first).
    """
    conditions = list(means)
    ate = pd.DataFrame(
        np.stack([means[c] - means[conditions[0]] for c in conditions[1:]]),
        index=conditions[1:],
        columns=[f"g{g}" for g in range(x.shape[1])],
    )
    adata = AnnData(
        X=x,
        obs=pd.DataFrame(obs, index=[f"cell{i}" for i in range(x.shape[0])]),
        var=pd.DataFrame(index=ate.columns.copy()),
    )
    latents = [f"latent_{k}" for k in range(mask.shape[1])]
    adata.uns["simulation"] = {
        # string column names: the AnnData must stay writable to h5ad
        "mask": pd.DataFrame(mask.astype(int), index=names, columns=latents),
        "embedding": pd.DataFrame(embedding, index=names, columns=latents),
        "ate": ate,
    }
    return adata


def _planted(values, name: str, shape: tuple[int, int]) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.shape != shape:
        raise ValueError(f"`{name}` must have shape (n_perturbations, n_latent) = {shape}, not {values.shape}.")
    return values


def _true_mask(rng: np.random.Generator, n_perturbations: int, n_latent: int, mask_prob: float) -> np.ndarray:
    """Bernoulli(mask_prob) entries, with at least one active dimension per perturbation."""
    mask = rng.random((n_perturbations, n_latent)) < mask_prob
    mask[np.arange(n_perturbations), rng.integers(0, n_latent, n_perturbations)] = True
    return mask


def _random_orthogonal(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    """A random (semi-)orthogonal (n_in, n_out) matrix: orthonormal rows or columns, whichever are fewer."""
    q, r = np.linalg.qr(rng.normal(size=(max(n_in, n_out), min(n_in, n_out))))
    q = q * np.sign(np.diag(r))  # Haar-distributed
    return q if n_in >= n_out else q.T


def _screen(names, n_control_cells, n_cells_per_perturbation, combinations, n_cells_per_combination):
    """Cell labels, the conditions (control first) and a function from labels to design rows."""
    combinations = list(combinations or [])
    labels = ["control"] * n_control_cells + [n for n in names for _ in range(n_cells_per_perturbation)]
    labels += [c for c in combinations for _ in range(n_cells_per_combination)]
    index = {n: t for t, n in enumerate(names)}

    def design(batch: list[str]) -> np.ndarray:
        rows = np.zeros((len(batch), len(names)))
        for i, label in enumerate(batch):
            if label != "control":
                for atom in label.split("+"):
                    rows[i, index[atom]] = 1.0
        return rows

    return labels, ["control", *names, *combinations], design


def _split_within_labels(rng: np.random.Generator, labels: list[str], fractions: tuple[float, float, float]) -> list:
    """``"train"`` / ``"validation"`` / ``"test"`` for each cell, in the given fractions of every label's cells."""
    labels = np.asarray(labels)
    split = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        cells = rng.permutation(np.flatnonzero(labels == label))
        n_train = int(round(fractions[0] * len(cells)))
        n_val = int(round(fractions[1] * len(cells)))
        split[cells[:n_train]] = "train"
        split[cells[n_train : n_train + n_val]] = "validation"
        split[cells[n_train + n_val :]] = "test"
    return list(split)
