"""Building blocks shared by the SAMS-VAE networks and distributions (plain PyTorch)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Normal
from torch.nn import functional as F

_LEAKY_SLOPE = 0.01
_VARIANCE_EPS = 1e-4


class ResidualMLP(nn.Module):
    r"""The reference's trunk: :math:`h_1 = \mathrm{LReLU}(W_1 x + b_1 + s)`, :math:`h_l = h_{l-1} + \mathrm{LReLU}(W_l h_{l-1} + b_l)`.

    ``s`` (``context``) is an optional pre-activation term added to the first layer. It is how inputs that are
    concatenated in the paper enter here without building the concatenation: ``W [x; u] = W_x x + W_u u``, so a
    one-hot ``u`` becomes a row look-up and a per-particle ``u`` does not repeat the per-cell ``W_x x``.
    """

    def __init__(self, n_input: int, n_hidden: int, n_layers: int = 1) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError("`n_layers` must be at least 1.")
        self.first = nn.Linear(n_input, n_hidden)
        self.residual = nn.ModuleList(nn.Linear(n_hidden, n_hidden) for _ in range(n_layers - 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.first(x)
        if context is not None:
            h = h + context
        h = F.leaky_relu(h, _LEAKY_SLOPE)
        for layer in self.residual:
            h = h + F.leaky_relu(layer(h), _LEAKY_SLOPE)
        return h


class GaussianMLP(nn.Module):
    """Residual trunk with mean and log-variance heads; returns ``Normal(mean, sqrt(exp(logvar) + 1e-4))``."""

    def __init__(self, n_input: int, n_output: int, n_hidden: int, n_layers: int = 1) -> None:
        super().__init__()
        self.trunk = ResidualMLP(n_input, n_hidden, n_layers)
        self.mean = nn.Linear(n_hidden, n_output)
        self.log_var = nn.Linear(n_hidden, n_output)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Normal:
        h = self.trunk(x, context)
        return Normal(self.mean(h), torch.sqrt(self.log_var(h).exp() + _VARIANCE_EPS))


class CovariateEmbedding(nn.Module):
    """Sum of one learned vector per categorical covariate: the one-hot part of a first linear layer.

    ``Linear([z; onehot(c_1); ...; onehot(c_J)]) = Linear(z) + sum_j W_j[c_j]``; covariates with a single
    category carry no information and are skipped.
    """

    def __init__(self, n_cats_per_cov: list[int], n_hidden: int) -> None:
        super().__init__()
        self.n_cats_per_cov = list(n_cats_per_cov)
        self.embeddings = nn.ModuleList(nn.Embedding(n, n_hidden) if n > 1 else None for n in self.n_cats_per_cov)

    @property
    def is_empty(self) -> bool:
        return all(e is None for e in self.embeddings)

    def forward(self, codes: torch.Tensor | None) -> torch.Tensor | None:
        """``codes``: (..., n_covariates) integer codes; returns (..., n_hidden) or ``None``."""
        if codes is None or self.is_empty:
            return None
        codes = codes.long()
        return sum(e(codes[..., j]) for j, e in enumerate(self.embeddings) if e is not None)


def relaxed_bernoulli_straight_through(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hard {0, 1} sample of ``Bernoulli(sigmoid(logits))`` with the binary-Concrete gradient.

    Forward: ``1[sigmoid((logits + L) / temperature) > 0.5]`` with logistic noise ``L = log u - log(1 - u)``, an
    exact Bernoulli draw. Backward: the gradient of the relaxed sample (straight-through Gumbel-softmax). Without
    autograd only the forward value is computed, as the equivalent ``1[u > sigmoid(-logits)]`` from the same ``u``
    (the same draws, except where the relaxed sample rounds to exactly 1/2, e.g. at very high temperatures).
    """
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return (u > torch.sigmoid(-logits)).to(logits.dtype)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return _StraightThrough.apply(hard, soft)


class _StraightThrough(torch.autograd.Function):
    """Returns ``hard`` exactly in the forward pass and routes the gradient to ``soft`` in the backward pass."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


def bernoulli_log_prob(value: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Exact Bernoulli log-mass ``value * logits - softplus(logits)`` (differentiable in both arguments)."""
    return value * logits - F.softplus(logits)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_g \log N(x_g; \mu_g, \sigma_g^2)` for ``x`` (n, G), ``mean`` (..., n, G) and ``scale`` (G,); shape (..., n)."""
    z = (x - mean) / scale
    return -0.5 * z.square().sum(-1) - torch.log(scale).sum() - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def negative_binomial_count_terms(
    x: torch.Tensor, theta: torch.Tensor, nonzero: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    r"""Count-only part of the negative-binomial log-likelihood, summed over genes, shape (n,).

    .. math::
        \log NB(x;\mu,\theta) = \underbrace{\log\Gamma(x+\theta) - \log\Gamma(\theta) - \log\Gamma(x+1)}_{\text{count-only}}
        + \underbrace{\theta\log\theta + x\log\mu - (x+\theta)\log(\theta+\mu)}_{\text{mean terms}}

    The count-only part does not depend on the particle, so it is computed once per cell, and it vanishes where
    :math:`x = 0`, so only the nonzero counts are visited. ``nonzero``: ``x.nonzero(as_tuple=True)`` if already
    computed. See :func:`negative_binomial_mean_terms` for the rest.
    """
    rows, genes = x.nonzero(as_tuple=True) if nonzero is None else nonzero
    counts, dispersion = x[rows, genes], theta[genes]
    terms = torch.lgamma(counts + dispersion) - torch.lgamma(dispersion) - torch.lgamma(counts + 1)
    return terms.new_zeros(x.shape[0]).index_add(0, rows, terms)


def negative_binomial_mean_terms(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    r""":math:`\sum_g \theta_g\log\theta_g + x_g\log\mu_g - (x_g+\theta_g)\log(\theta_g+\mu_g)`, shape (..., n).

    Split as :math:`-\sum_g \theta_g \log(1 + \mu_g / \theta_g)` (dense, a matrix-vector product; the
    :math:`\theta\log\theta` terms are folded in, which keeps float32 exact for large :math:`\theta`) plus
    :math:`\sum_{g: x_g > 0} x_g (\log\mu_g - \log t_g)` (nonzero counts only), with :math:`t = \theta + \mu`,
    and differentiated by hand: the forward and backward passes each touch the particle x cell x gene tensors a
    few times, where autograd of the textbook expression makes about twenty passes. ``x`` is (n, G), ``mu``
    (..., n, G); ``nonzero`` is ``x.nonzero(as_tuple=True)`` if already computed.
    """
    if x.dim() != 2 or mu.shape[-2:] != x.shape:
        raise ValueError(f"Expected x of shape (n, G) and mu of shape (..., n, G); got {x.shape} and {mu.shape}.")
    rows, genes = x.nonzero(as_tuple=True) if nonzero is None else nonzero
    return _NegativeBinomialMeanTerms.apply(x.to(mu.dtype), mu, theta, rows, genes)


class _NegativeBinomialMeanTerms(torch.autograd.Function):
    """Value and hand-written gradients (in ``mu`` and ``theta``) of :func:`negative_binomial_mean_terms`."""

    @staticmethod
    def forward(ctx, x, mu, theta, rows, genes) -> torch.Tensor:
        counts = x[rows, genes]
        # theta log theta - theta log(theta + mu) as -theta log1p(mu / theta): the two large terms cancel in
        # float32 (at theta = 1e4 and 2,000 genes the difference was off by thousands of nats per cell)
        ratio = mu / theta  # (..., n, G)
        log1p_ratio = torch.log1p(ratio)
        mu_nonzero = mu[..., rows, genes]
        dense = -torch.matmul(log1p_ratio, theta)  # (..., n)
        out = dense.index_add(-1, rows, counts * (torch.log(mu_nonzero) - torch.log(mu_nonzero + theta[genes])))
        ctx.save_for_backward(rows, genes, counts, mu_nonzero, ratio, log1p_ratio, theta)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved tensors carry no graph: no second derivatives
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor, None, None]:
        rows, genes, counts, mu_nonzero, ratio, log1p_ratio, theta = ctx.saved_tensors
        n_genes = theta.shape[0]
        inv_t_nonzero = 1.0 / (mu_nonzero + theta[genes])
        grad_nonzero = grad[..., rows] * counts  # (..., nnz)
        share = (ratio + 1.0).reciprocal_()  # theta / (theta + mu)
        flat_grad = grad.reshape(1, -1)
        # d/dtheta: -log1p(mu / theta) + 1 - theta / t (dense) - x / t (nonzeros), with t = theta + mu
        grad_theta = -(flat_grad @ log1p_ratio.reshape(-1, n_genes)) - (flat_grad @ share.reshape(-1, n_genes))
        grad_theta = grad_theta.reshape(n_genes) + grad.sum()
        nonzero_terms = grad_nonzero * inv_t_nonzero  # (..., nnz)
        if nonzero_terms.dim() > 1:
            nonzero_terms = nonzero_terms.flatten(0, -2).sum(0)
        grad_theta = grad_theta.index_add(0, genes, -nonzero_terms)
        # d/dmu: -theta / t (dense) + x / mu - x / t (nonzeros)
        grad_mu = share.mul_(-grad[..., None])
        grad_mu[..., rows, genes] += grad_nonzero * (1.0 / mu_nonzero - inv_t_nonzero)
        return None, grad_mu, grad_theta, None, None
