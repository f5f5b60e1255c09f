r"""Axis alignment of the latent space: the rotation that makes the mechanism sparsest.

The basal prior :math:`N(0, I_K)` is invariant under every orthogonal :math:`R`, and the decoder's first layer is
linear in :math:`z`, so re-expressing the latent space as :math:`z' = zR` (shifts :math:`s'_t = s_t R`, decoder
weights :math:`W' = WR`) leaves the model's predictions unchanged. Only the sparsity prior on the masks prefers one
basis over another, and its gradient moves the whole network through that symmetry very slowly: trained models
reach a good likelihood with dense, rotated shifts. These functions find the basis in which the learned shifts are
sparsest (docs/model.md, "Mask recovery").
"""

from __future__ import annotations

import numpy as np
import torch


def varimax(loadings: np.ndarray, n_iter: int = 200, tol: float = 1e-8) -> np.ndarray:
    r"""Kaiser's varimax rotation of a (T, K) matrix :math:`L`.

    The orthogonal :math:`R` maximising the variance of the squared entries of :math:`LR` in each column.
    """
    n_rows, k = loadings.shape
    rotation = np.eye(k)
    objective = 0.0
    for _ in range(n_iter):
        rotated = loadings @ rotation
        target = rotated**3 - rotated * (rotated**2).sum(0) / n_rows
        u, singular, vt = np.linalg.svd(loadings.T @ target)
        rotation = u @ vt
        if singular.sum() < objective * (1 + tol):
            break
        objective = singular.sum()
    return rotation


def sparsest_rotation(
    shift: np.ndarray | torch.Tensor, n_restarts: int = 8, n_steps: int = 500, smoothing: float = 0.05, seed: int = 0
) -> np.ndarray:
    r"""The orthogonal :math:`R` (K, K) that minimises the L1 norm of the rotated shifts :math:`\|SR\|_1`.

    Varimax rewards a few large entries per column, which is not the same as few nonzero entries per row; the
    L1 norm is. It is minimised on the orthogonal group, :math:`R = R_0 \exp(A - A^\top)`, by Adam, with
    :math:`|x|` smoothed to :math:`\sqrt{x^2 + \epsilon^2}` (:math:`\epsilon` = ``smoothing`` times the root mean
    square of ``shift``). The objective has local minima, so it starts from the varimax solution and from
    ``n_restarts - 1`` random rotations, and keeps the best.

    Parameters
    ----------
    shift
        (T, K) shifts :math:`m_t \odot e_t`, one row per perturbation.
    n_restarts
        Starting rotations (the first is varimax).
    n_steps
        Adam steps per start.
    smoothing
        Smoothing of the absolute value, relative to the scale of ``shift``.
    seed
        Seed of the random starts.
    """
    shift = torch.as_tensor(shift, dtype=torch.float64).detach().cpu()
    if shift.dim() != 2:
        raise ValueError(f"Expected a (T, K) matrix of shifts, got shape {tuple(shift.shape)}.")
    k = shift.shape[1]
    scale = shift.pow(2).mean().sqrt().item()
    if scale == 0.0:
        return np.eye(k)
    generator = torch.Generator().manual_seed(seed)
    starts = [torch.as_tensor(varimax(shift.numpy()), dtype=torch.float64)]
    for _ in range(n_restarts - 1):
        q, r = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
        starts.append(q * torch.sign(torch.diagonal(r)))
    best, best_norm = starts[0], float("inf")
    for start in starts:
        rotation = _descend_l1(shift / scale, start, n_steps, smoothing)
        norm = (shift @ rotation).abs().sum().item()
        if norm < best_norm:
            best, best_norm = rotation, norm
    return best.numpy()


def _descend_l1(shift: torch.Tensor, start: torch.Tensor, n_steps: int, epsilon: float) -> torch.Tensor:
    k = shift.shape[1]
    log_rotation = torch.zeros(k, k, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([log_rotation], lr=0.02)
    with torch.enable_grad():
        for _ in range(n_steps):
            rotation = start @ torch.linalg.matrix_exp(log_rotation - log_rotation.T)
            loss = torch.sqrt((shift @ rotation) ** 2 + epsilon**2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return start @ torch.linalg.matrix_exp(log_rotation - log_rotation.T)


def active_entries(rotated_shift: torch.Tensor, threshold: float, energy: float = 0.9) -> torch.Tensor:
    """The entries of (T, K) rotated shifts whose masks restart on.

    Those at least ``threshold`` times their row's largest absolute value, together with the row's largest entries
    that carry an ``energy`` fraction of its squared norm (so that no row loses much of its shift to many small
    entries). Rows of zeros have none.
    """
    squared = rotated_shift.pow(2)
    row_max = squared.amax(dim=-1, keepdim=True)
    large = (squared >= threshold**2 * row_max) & (row_max > 0)
    ordered, order = squared.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered  # energy of the larger entries
    needed = before < energy * ordered.sum(dim=-1, keepdim=True)
    carrying = torch.zeros_like(large).scatter(-1, order, needed) & (row_max > 0)
    return large | carrying
