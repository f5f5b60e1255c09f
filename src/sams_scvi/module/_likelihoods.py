r"""The observation models :math:`p(x \mid z)` as distribution objects.

:meth:`SAMSModule.generative <sams_scvi.module.SAMSModule.generative>` returns one of these as ``px``, as
scvi-tools' modules do. Both have the event shape ``(G,)`` (a cell's expression vector), so ``log_prob`` sums over
genes and returns the batch shape ``(..., n)``, and both offer what the model layer needs without knowing which
likelihood it holds: the expected expression, the effect scale of average treatment effects, and sampling.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, constraints

from ._components import negative_binomial_count_terms, negative_binomial_mean_terms
from ._sampling import accumulate_log_normalized, sample_negative_binomial

MEAN_EPS = 1e-4  # the reference's Gamma-Poisson rate theta / (mu + 1e-4): the NB mean is mu + 1e-4
ATE_TARGET_SUM = 1e4  # the paper's scale of count effects: log2(1 + 1e4 x / sum(x))


class CountLikelihood(Distribution):
    r""":math:`x_g \sim NB(\mu_g, \theta_g)` with :math:`\mu = l\,\rho + 10^{-4}`, :math:`\rho = \mathrm{softmax}(f(z))`.

    Parameters
    ----------
    rho
        Expression proportions (..., n, G), rows summing to one.
    mu
        Means (..., n, G).
    theta
        Gene-wise inverse dispersion (G,).
    """

    arg_constraints = {}
    support = constraints.nonnegative_integer
    has_counts = True
    log_input = True  # the encoder reads standardised log(1 + x)
    ate_scale = "log2(1 + 1e4 * x / sum(x))"
    effect_scale = "log2 fold change of mean expression"

    def __init__(self, rho: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor):
        self.rho = rho
        self.mu = mu
        self.theta = theta
        super().__init__(batch_shape=mu.shape[:-1], event_shape=mu.shape[-1:], validate_args=False)

    @classmethod
    def from_decoder(cls, logits: torch.Tensor, library: torch.Tensor, theta: torch.Tensor) -> CountLikelihood:
        """From the decoder's output (..., n, G): :math:`\rho = \\mathrm{softmax}`, :math:`\\mu = l \rho + 10^{-4}`."""
        rho = torch.softmax(logits, dim=-1)
        return cls(rho, rho.mul(library[..., None]).add_(MEAN_EPS), theta)  # 2 passes instead of 4 via log_softmax

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu.square() / self.theta

    def log_prob(self, value: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`\sum_g \log NB(x_g; \mu_g, \theta_g)`, shape (..., n), with a hand-written gradient.

        ``value`` holds one row per cell (n_cells, G); ``rows`` (n,), if given, maps each row of the distribution to
        its cell (several rows per cell: a cell's response patterns under penetrance). The count-only terms are
        computed once per cell and only where :math:`x > 0`; see
        :func:`~sams_scvi.module._components.negative_binomial_mean_terms` for the rest.
        """
        # under mixed precision the decoder's means arrive in half precision: the likelihood stays in float32
        mu = self.mu.float() if self.mu.dtype in (torch.float16, torch.bfloat16) else self.mu
        with torch.autocast(mu.device.type, enabled=False):
            nonzero = value.nonzero(as_tuple=True)  # once: on a GPU each nonzero() waits for the device
            count_only = negative_binomial_count_terms(value.to(mu.dtype), self.theta, nonzero)  # once per cell
            if rows is not None:
                value, count_only = value[rows], count_only[rows]
                nonzero = value.nonzero(as_tuple=True)
            return count_only + negative_binomial_mean_terms(value, mu, self.theta, nonzero)

    @torch.no_grad()
    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Counts of shape ``sample_shape + (..., n, G)`` (a compiled Gamma-Poisson sampler on CPU)."""
        mu = self.mu.expand(*sample_shape, *self.mu.shape)
        return sample_negative_binomial(mu, self.theta)

    def expression(self, target_sum: float | None = None) -> torch.Tensor:
        """Expected expression: the proportions times ``target_sum``, or the NB mean when ``target_sum`` is ``None``."""
        return self.mu if target_sum is None else self.rho * target_sum

    def log_expression(self, dim: int = 0) -> torch.Tensor:
        """:math:`\\log_2` of the mean proportions over ``dim``: differences of it are :attr:`effect_scale`."""
        return self.rho.mean(dim).log2()

    def accumulate_ate(self, sums: torch.Tensor, rows: slice = slice(None)) -> None:
        """Add to ``sums`` (C, G) the sums over the samples ``rows`` (S, C, G) of draws on :attr:`ate_scale`.

        See :func:`~sams_scvi.module._sampling.accumulate_log_normalized`.
        """
        accumulate_log_normalized(self.mu[rows], self.theta, ATE_TARGET_SUM, sums)

    def likelihood_parameters(self) -> dict[str, torch.Tensor]:
        """``mean`` (..., n, G) and ``dispersions`` (..., n, G), as scvi-tools' ``get_likelihood_parameters``."""
        return {"mean": self.mu, "dispersions": self.theta.expand_as(self.mu)}

    def select(self, index) -> CountLikelihood:
        """The distribution of the rows ``index`` selects over the batch axes (genes kept)."""
        return CountLikelihood(self.rho[index], self.mu[index], self.theta)


class GaussianLikelihood(Distribution):
    r""":math:`x_g \sim N(f_g(z), \sigma_g^2)` for normalised data, with a gene-wise noise scale :math:`\sigma_g`.

    Parameters
    ----------
    loc
        Decoded means (..., n, G).
    scale
        Gene-wise noise scale (G,).
    """

    arg_constraints = {}
    support = constraints.real
    has_counts = False
    log_input = False  # the encoder reads the standardised values themselves
    ate_scale = "data"
    effect_scale = "difference of decoded means"

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor):
        self.loc = loc
        self.scale = scale
        super().__init__(batch_shape=loc.shape[:-1], event_shape=loc.shape[-1:], validate_args=False)

    @classmethod
    def from_decoder(cls, output: torch.Tensor, library: torch.Tensor, scale: torch.Tensor) -> GaussianLikelihood:
        """From the decoder's output (..., n, G), the means; ``library`` is not used."""
        return cls(output, scale)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        return self.scale.square().expand_as(self.loc)

    def log_prob(self, value: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`\sum_g \log N(x_g; \mu_g, \sigma_g^2)`, shape (..., n); ``rows`` as in :class:`CountLikelihood`."""
        value = value if rows is None else value[rows]
        z = (value - self.loc) / self.scale
        return -0.5 * z.square().sum(-1) - torch.log(self.scale).sum() - 0.5 * value.shape[-1] * math.log(2 * math.pi)

    @torch.no_grad()
    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        loc = self.loc.expand(*sample_shape, *self.loc.shape)
        return torch.randn_like(loc).mul_(self.scale).add_(loc)

    def expression(self, target_sum: float | None = None) -> torch.Tensor:
        """Expected expression on the data's own scale (``target_sum`` does not apply)."""
        return self.loc

    def log_expression(self, dim: int = 0) -> torch.Tensor:
        """The mean over ``dim``: the data are already on their analysis scale."""
        return self.loc.mean(dim)

    def accumulate_ate(self, sums: torch.Tensor, rows: slice = slice(None)) -> None:
        """Add to ``sums`` (C, G) the sums over the samples ``rows`` (S, C, G) of the decoded means."""
        sums += self.loc[rows].to(sums.dtype).sum(0)

    def likelihood_parameters(self) -> dict[str, torch.Tensor]:
        """``mean`` (..., n, G) and ``scale`` (..., n, G)."""
        return {"mean": self.loc, "scale": self.scale.expand_as(self.loc)}

    def select(self, index) -> GaussianLikelihood:
        return GaussianLikelihood(self.loc[index], self.scale)


Likelihood = CountLikelihood | GaussianLikelihood
