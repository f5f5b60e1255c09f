r"""How perturbations shift the latent space: the one place where SAMS-VAE and its comparison models differ.

Every mechanism owns the per-perturbation global variables, their variational posterior and prior, and returns,
per particle, the latent shift of each atomic perturbation and the KL-type term of its globals:

* ``sample(S)`` -> ``{"shift": (S, T, K), "kl": (S, T), ...}``, with
  :math:`\mathrm{kl}_{st} = \sum_k \log q(\cdot_{tk}) - \log p(\cdot_{tk})` (a single-sample estimate;
  ``sample(S, with_kl=False)`` leaves it out, for inference); ``sample(S, columns=c)`` draws only the
  perturbations ``c`` (C,), giving (S, C, K) and (S, C): a minibatch needs only the globals of the perturbations
  its cells carry, and the globals are independent across perturbations under both ``q`` and ``p``;
* ``prior()`` -> the priors of the globals, named as in the paper (e.g. ``{"mask": p(M), "embedding": p(E)}``),
  per entry :math:`(t, k)`; ``sample`` charges its KL-type term against them;
* ``point()`` -> the posterior point estimate, ``{"shift": (1, T, K), ...}``;
* ``variational_parameters()`` -> the free per-perturbation parameters (for their own learning rate).

A cell's latent offset is then :math:`d_i\,\mathrm{shift}` (see :meth:`SAMSModule.latent_offset`). Each mechanism
also declares how the shared networks use it (class attributes, read by :class:`SAMSModule`):

* ``has_mask``, ``has_shift``: whether it has masks, and a latent shift at all;
* ``encodes_basal``: the encoder infers the basal state :math:`z_b` (``False``: the perturbed state :math:`z`,
  and :math:`z_b = z - \mathrm{offset}`);
* ``encoder_sees_offset``: whether the encoder may be conditioned on the sampled offset (``mean_field_encoder``);
* ``treatment_in_networks``: the treatment vector :math:`d` itself is an input of the encoder and decoder.

Each mechanism's own arguments (priors, guide, initialisation) are those of its constructor, and nowhere else:
:class:`SAMSModule` passes its extra keyword arguments through, and an argument a mechanism does not take raises.
"""

from __future__ import annotations

import inspect
import math
from typing import Literal

import torch
from torch import nn
from torch.distributions import Bernoulli, Beta, Normal

from sams_scvi._defaults import ALIGN_MASK_LOGIT

from ._components import GaussianMLP, bernoulli_log_prob, relaxed_bernoulli_straight_through

MechanismName = Literal["sparse", "dense", "sparse_point", "none"]


class SparseMechanism(nn.Module):
    r"""SAMS-VAE: sparse shifts :math:`\mathrm{shift}_t = m_t \odot e_t`.

    Prior :math:`m_{tk} \sim \mathrm{Bern}(\alpha)`, :math:`e_{tk} \sim N(0, \sigma_E^2)`.

    Guide :math:`q(M)\,q(E \mid M)`: free Bernoulli logits sampled by a straight-through relaxed Bernoulli, and
    either the ``"correlated"`` :math:`q(e_t \mid m_t, t)` (a Gaussian MLP of ``[m_t; onehot(t)]``; the one-hot
    part is a learned row per perturbation) or the ``"mean_field"`` :math:`q(E)` with free location and scale.

    Parameters
    ----------
    n_perturbations, n_latent
        ``T`` and ``K``.
    mask_prior_prob
        Prior probability :math:`\alpha` that a mask entry is on.
    embedding_prior_scale
        Prior scale :math:`\sigma_E` of the embeddings.
    guide
        ``"correlated"`` (:math:`q(E \mid M)`) or ``"mean_field"`` (:math:`q(E)`).
    embedding_encoder_n_hidden, embedding_encoder_n_layers
        Size of the correlated guide's :math:`q(e_t \mid m_t, t)` network.
    mask_init_logit
        Initial logit of every mask posterior entry (0, probability 0.5, as the reference). A sparse start (e.g.
        -2) recovers sparse masks in fewer steps but can leave weak perturbations without any active dimension;
        see ``docs/model.md``.
    gumbel_temperature
        Temperature of the relaxed Bernoulli.
    embedding_init_scale
        Initial scale of :math:`q(E)` (the reference: 1, the prior's). A sampled embedding of an untrained
        perturbation is noise of this size in the latent state.
    mask_kl_weight
        Weight of the masks' KL term (1: the ELBO). Above 1 the objective is no longer the ELBO; it prunes mask
        entries that the likelihood does not need faster.
    """

    has_mask = True
    has_shift = True
    encodes_basal = True
    encoder_sees_offset = True
    treatment_in_networks = False

    def __init__(
        self,
        n_perturbations: int,
        n_latent: int,
        mask_prior_prob: float = 0.01,
        embedding_prior_scale: float = 1.0,
        guide: Literal["correlated", "mean_field"] = "correlated",
        embedding_encoder_n_hidden: int = 200,
        embedding_encoder_n_layers: int = 2,
        mask_init_logit: float = 0.0,
        gumbel_temperature: float = 1.0,
        embedding_init_scale: float = 1.0,
        mask_kl_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if guide not in ("correlated", "mean_field"):
            raise ValueError(f"`guide` must be 'correlated' or 'mean_field', not {guide!r}.")
        if not 0.0 < mask_prior_prob < 1.0:
            raise ValueError("`mask_prior_prob` must be in (0, 1).")
        self.guide = guide
        self.gumbel_temperature = gumbel_temperature
        self.mask_kl_weight = mask_kl_weight
        self.register_buffer("mask_prior_logit", torch.tensor(math.log(mask_prior_prob / (1 - mask_prior_prob))))
        self.register_buffer("embedding_prior_scale", torch.tensor(float(embedding_prior_scale)))
        self.mask_logits = nn.Parameter(torch.full((n_perturbations, n_latent), float(mask_init_logit)))
        if guide == "correlated":
            self.embedding_encoder = GaussianMLP(
                n_latent, n_latent, embedding_encoder_n_hidden, embedding_encoder_n_layers
            )
            self.perturbation_onehot = nn.Embedding(n_perturbations, embedding_encoder_n_hidden)
            if embedding_init_scale != 1.0:  # 1: leave the network's own (the reference's) initialisation
                with torch.no_grad():  # initial q(E | M) scale: variance exp(bias) + 1e-4
                    self.embedding_encoder.log_var.bias.fill_(2 * math.log(embedding_init_scale))
        else:
            self.embedding_loc = nn.Parameter(torch.zeros(n_perturbations, n_latent))
            self.embedding_log_scale = nn.Parameter(
                torch.full((n_perturbations, n_latent), math.log(embedding_init_scale))
            )

    def prior(self) -> dict[str, torch.distributions.Distribution]:
        r""":math:`p(m_{tk}) = \mathrm{Bern}(\alpha)` and :math:`p(e_{tk}) = N(0, \sigma_E^2)`."""
        return {
            "mask": Bernoulli(logits=self.mask_prior_logit),
            "embedding": Normal(torch.zeros_like(self.embedding_prior_scale), self.embedding_prior_scale),
        }

    def variational_parameters(self) -> list[nn.Parameter]:
        if self.guide == "correlated":
            return [self.mask_logits, self.perturbation_onehot.weight]
        return [self.mask_logits, self.embedding_loc, self.embedding_log_scale]

    def embedding_posterior(self, mask: torch.Tensor, columns: torch.Tensor | None = None) -> Normal:
        """:math:`q(E \\mid M)` for masks of shape (S, T, K), or (S, C, K) of the perturbations ``columns``.

        The mean-field guide ignores ``mask``.
        """
        if self.guide == "correlated":
            rows = self.perturbation_onehot.weight
            return self.embedding_encoder(mask, context=rows if columns is None else rows[columns])
        loc, log_scale = self.embedding_loc, self.embedding_log_scale
        if columns is not None:
            loc, log_scale = loc[columns], log_scale[columns]
        return Normal(loc, log_scale.exp() + 1e-4)

    def sample(
        self, n_particles: int, with_kl: bool = True, columns: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.mask_logits if columns is None else self.mask_logits[columns]
        logits = logits.expand(n_particles, -1, -1)
        mask = relaxed_bernoulli_straight_through(logits, self.gumbel_temperature)
        q_embedding = self.embedding_posterior(mask, columns)
        embedding = q_embedding.rsample() if self.guide == "correlated" else q_embedding.rsample((n_particles,))
        out = {"shift": mask * embedding, "mask": mask, "embedding": embedding}
        if with_kl:
            prior = self.prior()
            kl_embedding = q_embedding.log_prob(embedding) - prior["embedding"].log_prob(embedding)
            # the relaxed mask's log-mass, differentiable in the mask (torch's Bernoulli validates binary values)
            kl_mask = bernoulli_log_prob(mask, logits) - bernoulli_log_prob(mask, prior["mask"].logits)
            out["kl"] = (kl_embedding + self.mask_kl_weight * kl_mask).sum(-1)
        return out

    @torch.no_grad()
    def rotate(self, rotation: torch.Tensor, active: torch.Tensor, mask_logit: float = ALIGN_MASK_LOGIT) -> None:
        r"""Re-express the shifts in the latent basis :math:`z' = zR` and restart the masks at ``active``.

        The point shift :math:`\bar m_t \odot \bar e_t` becomes :math:`(\bar m_t \odot \bar e_t) R`: exactly for the
        mean-field guide when ``active`` covers the rotated shift's nonzero entries. The correlated guide's output
        layer is rotated, which is exact when every mask is on before and after; its input is the mask, so a change
        of mask mode is absorbed into the perturbation's own row of the first layer, and embeddings under masks
        that were off enter the rotated shift. Scales are mixed as :math:`\log \sigma' = (\log \sigma)(R \circ R)`, an approximation
        of the rotated diagonal. Mask logits become ``mask_logit`` where ``active`` (T, K) is true and
        ``-mask_logit`` elsewhere.
        """
        old_mode = (self.mask_logits > 0).to(rotation.dtype)
        new_mode = active.to(rotation.dtype)
        mixing = rotation * rotation  # columns sum to 1: a convex combination of the old log scales
        if self.guide == "correlated":
            network = self.embedding_encoder
            network.mean.weight.copy_(rotation.T @ network.mean.weight)
            network.mean.bias.copy_(network.mean.bias @ rotation)
            network.log_var.weight.copy_(mixing.T @ network.log_var.weight)
            network.log_var.bias.copy_(network.log_var.bias @ mixing)
            self.perturbation_onehot.weight.add_((old_mode - new_mode) @ network.trunk.first.weight.T)
        else:
            self.embedding_loc.copy_((old_mode * self.embedding_loc) @ rotation)
            self.embedding_log_scale.copy_(self.embedding_log_scale @ mixing)
        self.mask_logits.copy_(torch.where(active, mask_logit, -mask_logit))

    @torch.no_grad()
    def point(self) -> dict[str, torch.Tensor]:
        """Mask mode :math:`1[\\sigma(\\lambda) > 0.5]` and the mean of :math:`q(E \\mid \\text{mode})`."""
        mask = (self.mask_logits > 0).to(self.mask_logits.dtype)[None]
        embedding = self.embedding_posterior(mask).mean
        embedding = embedding if embedding.dim() == 3 else embedding[None]
        return {"shift": mask * embedding, "mask": mask, "embedding": embedding}


class DenseMechanism(nn.Module):
    r"""CPA-VAE (SAMS-VAE without masks): dense shifts :math:`\mathrm{shift}_t = e_t`.

    Prior :math:`e_{tk} \sim N(0, \sigma_E^2)`; mean-field :math:`q(E)` with free location and scale
    (initialised to 0 and 1).

    Parameters
    ----------
    n_perturbations, n_latent
        ``T`` and ``K``.
    embedding_prior_scale
        Prior scale :math:`\sigma_E` of the embeddings.
    """

    has_mask = False
    has_shift = True
    encodes_basal = True
    encoder_sees_offset = True
    treatment_in_networks = False

    def __init__(self, n_perturbations: int, n_latent: int, embedding_prior_scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("embedding_prior_scale", torch.tensor(float(embedding_prior_scale)))
        self.embedding_loc = nn.Parameter(torch.zeros(n_perturbations, n_latent))
        self.embedding_log_scale = nn.Parameter(torch.zeros(n_perturbations, n_latent))

    def prior(self) -> dict[str, torch.distributions.Distribution]:
        r""":math:`p(e_{tk}) = N(0, \sigma_E^2)`."""
        return {"embedding": Normal(torch.zeros_like(self.embedding_prior_scale), self.embedding_prior_scale)}

    def variational_parameters(self) -> list[nn.Parameter]:
        return [self.embedding_loc, self.embedding_log_scale]

    def sample(
        self, n_particles: int, with_kl: bool = True, columns: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        loc, log_scale = self.embedding_loc, self.embedding_log_scale
        if columns is not None:
            loc, log_scale = loc[columns], log_scale[columns]
        q_embedding = Normal(loc, log_scale.exp() + 1e-4)
        embedding = q_embedding.rsample((n_particles,))
        out = {"shift": embedding, "embedding": embedding}
        if with_kl:
            kl = q_embedding.log_prob(embedding) - self.prior()["embedding"].log_prob(embedding)
            out["kl"] = kl.sum(-1)
        return out

    @torch.no_grad()
    def point(self) -> dict[str, torch.Tensor]:
        loc = self.embedding_loc[None].clone()  # a copy: callers may turn it into a DataFrame and edit it
        return {"shift": loc, "embedding": loc}


class SparsePointMechanism(nn.Module):
    r"""SVAE+ (Lopez et al., 2022): sparse shifts of the prior mean, :math:`\mathrm{shift}_t = m_t \odot \mu_t`.

    Prior :math:`\pi_{tk} \sim \mathrm{Beta}(1, \beta)`, :math:`m_{tk} \sim \mathrm{Bern}(\pi_{tk})`.

    :math:`\mu_t` is a learned point parameter (no prior; initialised :math:`N(0, 0.1^2)`). The guide is a point
    mass on :math:`\pi = \sigma(\lambda)` (MAP: :math:`\log q = 0`) and masks drawn from the relaxed Bernoulli
    with those probabilities, so :math:`q(m)` and :math:`p(m \mid \pi)` cancel and the global term is
    :math:`-\sum_k \log \mathrm{Beta}(\pi_{tk}; 1, \beta)`.

    Parameters
    ----------
    n_perturbations, n_latent
        ``T`` and ``K``.
    mask_prior_beta
        :math:`\beta` of the :math:`\mathrm{Beta}(1, \beta)` prior on mask probabilities (at least 1).
    mask_init_logit
        Initial logit of the mask probabilities.
    gumbel_temperature
        Temperature of the relaxed Bernoulli.
    """

    has_mask = True
    has_shift = True
    encodes_basal = False  # q(z | x): the encoder infers the perturbed state
    encoder_sees_offset = False  # ... from the counts alone
    treatment_in_networks = False

    def __init__(
        self,
        n_perturbations: int,
        n_latent: int,
        mask_prior_beta: float = 2.0,
        mask_init_logit: float = 0.0,
        gumbel_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if mask_prior_beta < 1:
            # below 1, the MAP term -(beta - 1) log(1 - pi) is unbounded below as pi -> 1: the logits diverge
            raise ValueError("`mask_prior_beta` must be at least 1.")
        self.gumbel_temperature = gumbel_temperature
        self.register_buffer("mask_prior_beta", torch.tensor(float(mask_prior_beta)))
        self.mask_logits = nn.Parameter(torch.full((n_perturbations, n_latent), float(mask_init_logit)))
        self.means = nn.Parameter(0.1 * torch.randn(n_perturbations, n_latent))

    def prior(self) -> dict[str, torch.distributions.Distribution]:
        r""":math:`p(\pi_{tk}) = \mathrm{Beta}(1, \beta)` (and :math:`m_{tk} \sim \mathrm{Bern}(\pi_{tk})`)."""
        return {"mask_probability": Beta(torch.ones_like(self.mask_prior_beta), self.mask_prior_beta)}

    def variational_parameters(self) -> list[nn.Parameter]:
        return [self.mask_logits, self.means]

    def sample(
        self, n_particles: int, with_kl: bool = True, columns: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits, means = self.mask_logits, self.means
        if columns is not None:
            logits, means = logits[columns], means[columns]
        mask = relaxed_bernoulli_straight_through(logits.expand(n_particles, -1, -1), self.gumbel_temperature)
        out = {"shift": mask * means, "mask": mask, "embedding": means.expand_as(mask)}
        if with_kl:
            # prior()["mask_probability"].log_prob(pi) = log b + (b - 1) log(1 - pi), with log(1 - pi) taken from the
            # logits (stable when pi saturates at 1, where Beta.log_prob(sigmoid(logits)) is -inf)
            beta = self.mask_prior_beta
            log_prior = torch.log(beta) + (beta - 1) * nn.functional.logsigmoid(-logits)
            out["kl"] = (-log_prior.sum(-1)).expand(n_particles, -1)
        return out

    @torch.no_grad()
    def point(self) -> dict[str, torch.Tensor]:
        mask = (self.mask_logits > 0).to(self.mask_logits.dtype)[None]
        return {"shift": mask * self.means, "mask": mask, "embedding": self.means[None].clone()}


class NoMechanism(nn.Module):
    """Conditional VAE: no latent shift and no globals; the treatment enters the encoder and decoder directly."""

    has_mask = False
    has_shift = False
    encodes_basal = True
    encoder_sees_offset = True  # with no shift, "the offset" the encoder may see is the treatment vector d
    treatment_in_networks = True

    def __init__(self, n_perturbations: int, n_latent: int) -> None:
        super().__init__()
        self.n_perturbations, self.n_latent = n_perturbations, n_latent
        self.register_buffer("_anchor", torch.zeros(()))  # gives the mechanism a device and dtype

    def prior(self) -> dict[str, torch.distributions.Distribution]:
        """No globals, no priors."""
        return {}

    def variational_parameters(self) -> list[nn.Parameter]:
        return []

    def sample(
        self, n_particles: int, with_kl: bool = True, columns: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        zeros = self._anchor.new_zeros
        n_columns = self.n_perturbations if columns is None else len(columns)
        out = {"shift": zeros(n_particles, n_columns, self.n_latent)}
        if with_kl:
            out["kl"] = zeros(n_particles, n_columns)
        return out

    @torch.no_grad()
    def point(self) -> dict[str, torch.Tensor]:
        return {"shift": self._anchor.new_zeros(1, self.n_perturbations, self.n_latent)}


MECHANISMS = {
    "sparse": SparseMechanism,
    "dense": DenseMechanism,
    "sparse_point": SparsePointMechanism,
    "none": NoMechanism,
}


def build_mechanism(name: MechanismName, n_perturbations: int, n_latent: int, **kwargs) -> nn.Module:
    """The mechanism called ``name`` (``"sparse"``, ``"dense"``, ``"sparse_point"`` or ``"none"``).

    ``kwargs`` are the mechanism's own constructor arguments; one it does not take raises a ``ValueError``.
    """
    if name not in MECHANISMS:
        raise ValueError(f"Unknown mechanism {name!r}; choose from {list(MECHANISMS)}.")
    cls = MECHANISMS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "n_perturbations", "n_latent"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"{unknown} do not apply to the {name!r} mechanism (model); leave them out. It takes {sorted(accepted)}."
        )
    return cls(n_perturbations, n_latent, **kwargs)
