"""SAMSModule: the SAMS-VAE generative model, its variational guides and the plated ELBO (plain PyTorch)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal

from sams_scvi._constants import SAMS_REGISTRY_KEYS

from ._components import (
    CovariateEmbedding,
    GaussianMLP,
    ResidualMLP,
    bernoulli_log_prob,
    negative_binomial_log_prob_parts,
    relaxed_bernoulli_straight_through,
    sample_negative_binomial,
)

_MEAN_EPS = 1e-4  # the reference's Gamma-Poisson rate theta / (mu + 1e-4): the NB mean is mu + 1e-4


class SAMSModule(BaseModuleClass):
    r"""Sparse Additive Mechanism Shift VAE (Bereket & Karaletsos, 2023).

    Generative model, for perturbations :math:`t = 1..T`, latent dimensions :math:`k = 1..K` and cells :math:`i`:

    .. math::
        e_{tk} \sim N(0, \sigma_E^2), \quad m_{tk} \sim \mathrm{Bernoulli}(\alpha), \quad
        z^b_i \sim N(0, I_K), \quad z_i = z^b_i + \sum_t d_{it}\,(m_t \odot e_t),

        x_{ig} \sim NB\big(l_i\,\mathrm{softmax}_g(f(z_i, c_i)),\ \theta_g\big)

    with the observed library size :math:`l_i`, optional categorical covariates :math:`c_i` and gene-wise
    inverse dispersion :math:`\theta_g`. Variational family:
    :math:`q(M)\,q(E \mid M)\,\prod_i q(z^b_i \mid x_i, [d_i, M, E])`, with free Bernoulli mask logits sampled by a
    straight-through relaxed Bernoulli, a ``"correlated"`` (:math:`q(e_t \mid m_t, t)`, an MLP) or ``"mean_field"``
    (free location and scale) embedding posterior, and a basal encoder on log-standardised counts that, unless
    ``mean_field_encoder``, also sees the sampled offset :math:`D(M \odot E)`.

    Parameters
    ----------
    n_input
        Number of genes ``G``.
    n_perturbations
        Number of atomic perturbations ``T`` (columns of ``D``; control is all zeros).
    n_latent
        Latent dimension ``K``.
    n_hidden, n_layers
        Width and depth of the encoder and decoder trunks.
    n_cats_per_cov
        Number of categories of each categorical covariate (batch first); the decoder is conditioned on them.
    mask_prior_prob
        Prior probability :math:`\alpha` that a mask entry is on.
    embedding_prior_scale
        Prior scale :math:`\sigma_E` of the embeddings.
    guide
        ``"correlated"`` (:math:`q(E \mid M)`) or ``"mean_field"`` (:math:`q(E)`).
    mean_field_encoder
        If ``True`` the basal encoder sees only the counts; otherwise also the sampled offset.
    embedding_encoder_n_hidden, embedding_encoder_n_layers
        Size of the correlated guide's :math:`q(e_t \mid m_t, t)` network.
    n_particles
        Monte-Carlo particles per training step.
    mask_init_logit
        Initial logit of every mask posterior entry (0, probability 0.5, as the reference). A sparse start
        (e.g. -2) recovers sparse masks in fewer steps but can leave weak perturbations without any active
        dimension; see ``docs/model.md`` for measurements.
    gumbel_temperature
        Temperature of the relaxed Bernoulli.
    """

    def __init__(
        self,
        n_input: int,
        n_perturbations: int,
        n_latent: int = 100,
        n_hidden: int = 400,
        n_layers: int = 1,
        n_cats_per_cov: list[int] | None = None,
        mask_prior_prob: float = 0.01,
        embedding_prior_scale: float = 1.0,
        guide: Literal["correlated", "mean_field"] = "correlated",
        mean_field_encoder: bool = False,
        embedding_encoder_n_hidden: int = 200,
        embedding_encoder_n_layers: int = 2,
        n_particles: int = 5,
        mask_init_logit: float = 0.0,
        gumbel_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if guide not in ("correlated", "mean_field"):
            raise ValueError(f"`guide` must be 'correlated' or 'mean_field', not {guide!r}.")
        if not 0.0 < mask_prior_prob < 1.0:
            raise ValueError("`mask_prior_prob` must be in (0, 1).")
        self.n_input = n_input
        self.n_perturbations = n_perturbations
        self.n_latent = n_latent
        self.guide = guide
        self.mean_field_encoder = mean_field_encoder
        self.n_particles = n_particles
        self.gumbel_temperature = gumbel_temperature

        # Fixed priors and data statistics (buffers: saved with the model, moved with .to()).
        self.register_buffer("mask_prior_logit", torch.tensor(math.log(mask_prior_prob / (1 - mask_prior_prob))))
        self.register_buffer("embedding_prior_scale", torch.tensor(float(embedding_prior_scale)))
        self.register_buffer("x_log_mean", torch.zeros(n_input))
        self.register_buffer("x_log_std", torch.ones(n_input))
        self.register_buffer("normalization_fitted", torch.tensor(False))
        self.register_buffer("train_perturbation_counts", torch.zeros(n_perturbations))

        # q(M): free Bernoulli logits.
        self.mask_logits = nn.Parameter(torch.full((n_perturbations, n_latent), float(mask_init_logit)))
        # q(E | M) or q(E).
        if guide == "correlated":
            self.embedding_encoder = GaussianMLP(
                n_latent, n_latent, embedding_encoder_n_hidden, embedding_encoder_n_layers
            )
            self.perturbation_onehot = nn.Embedding(n_perturbations, embedding_encoder_n_hidden)
        else:
            self.embedding_loc = nn.Parameter(torch.zeros(n_perturbations, n_latent))
            self.embedding_log_scale = nn.Parameter(torch.zeros(n_perturbations, n_latent))
        # q(z_b | x [, D(M*E)]).
        self.basal_encoder = GaussianMLP(n_input, n_latent, n_hidden, n_layers)
        self.offset_projection = None if mean_field_encoder else nn.Linear(n_latent, n_hidden, bias=False)
        # p(x | z, c).
        self.decoder = ResidualMLP(n_latent, n_hidden, n_layers)
        self.decoder_covariates = CovariateEmbedding(n_cats_per_cov or [], n_hidden)
        self.decoder_head = nn.Linear(n_hidden, n_input)
        self.log_dispersion = nn.Parameter(torch.zeros(n_input))

    # ------------------------------------------------------------------ global variables
    def global_variational_parameters(self) -> list[nn.Parameter]:
        """Free per-perturbation variational parameters (mask logits; embedding location/scale or one-hot rows)."""
        if self.guide == "correlated":
            return [self.mask_logits, self.perturbation_onehot.weight]
        return [self.mask_logits, self.embedding_loc, self.embedding_log_scale]

    def embedding_posterior(self, mask: torch.Tensor) -> Normal:
        """:math:`q(E \\mid M)` for masks of shape (S, T, K) (the mean-field guide ignores ``mask``)."""
        if self.guide == "correlated":
            return self.embedding_encoder(mask, shift=self.perturbation_onehot.weight)
        scale = self.embedding_log_scale.exp() + 1e-4
        return Normal(self.embedding_loc, scale)

    def sample_globals(self, n_particles: int) -> dict[str, torch.Tensor]:
        """Draw ``(M, E) ~ q`` per particle; returns ``mask``, ``embedding`` (S, T, K) and ``kl`` (S, T).

        ``kl[s, t]`` is the single-sample estimate :math:`\\sum_k \\log q(e_{tk}, m_{tk}) - \\log p(e_{tk}, m_{tk})`.
        """
        logits = self.mask_logits.expand(n_particles, -1, -1)
        mask = relaxed_bernoulli_straight_through(logits, self.gumbel_temperature)
        q_embedding = self.embedding_posterior(mask)
        embedding = q_embedding.rsample() if self.guide == "correlated" else q_embedding.rsample((n_particles,))
        p_embedding = Normal(torch.zeros_like(embedding), self.embedding_prior_scale)
        log_q = q_embedding.log_prob(embedding) + bernoulli_log_prob(mask, logits)
        log_p = p_embedding.log_prob(embedding) + bernoulli_log_prob(mask, self.mask_prior_logit)
        return {"mask": mask, "embedding": embedding, "kl": (log_q - log_p).sum(-1)}

    @torch.no_grad()
    def point_globals(self) -> dict[str, torch.Tensor]:
        """Posterior point estimate: mask mode :math:`1[\\sigma(\\lambda) > 0.5]` and the mean of q(E | mode)."""
        mask = (self.mask_logits > 0).to(self.mask_logits.dtype)[None]
        embedding = self.embedding_posterior(mask).mean
        if embedding.dim() == 2:
            embedding = embedding[None]
        return {"mask": mask, "embedding": embedding}

    @staticmethod
    def latent_offset(design: torch.Tensor, mask: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """:math:`D (M \\odot E)`: design (n, T) or (..., n, T), globals (S, T, K) -> offset (S, n, K)."""
        return torch.matmul(design, mask * embedding)

    # ------------------------------------------------------------------ scvi-tools module interface
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor | None]:
        return {"x": tensors[SAMS_REGISTRY_KEYS.X_KEY], "design": tensors[SAMS_REGISTRY_KEYS.PERTURBATION_KEY]}

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict[str, torch.Tensor], **kwargs
    ) -> dict[str, torch.Tensor | None]:
        return {
            "z": inference_outputs["z"],
            "library": inference_outputs["library"],
            "covariates": self.covariate_codes(tensors),
        }

    @staticmethod
    def covariate_codes(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Batch and extra categorical covariates as one (n, J) code matrix, or ``None``."""
        parts = [tensors[k] for k in (SAMS_REGISTRY_KEYS.BATCH_KEY, SAMS_REGISTRY_KEYS.CAT_COVS_KEY) if k in tensors]
        return torch.cat(parts, dim=-1) if parts else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder input :math:`(\\log(1 + x) - m_g) / s_g` with training-split gene statistics."""
        return (torch.log1p(x) - self.x_log_mean) / self.x_log_std

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        design: torch.Tensor,
        n_samples: int | None = None,
        global_samples: dict[str, torch.Tensor] | None = None,
    ) -> dict:
        """Sample globals (unless given), the offset :math:`D(M \\odot E)` and :math:`z_b \\sim q(z_b \\mid \\cdot)`.

        Returns ``z_basal`` and ``z`` of shape (S, n, K), the basal posterior ``qz``, the ``offset``, the
        observed ``library`` (n,) and the ``globals`` dictionary.
        """
        if global_samples is None:
            global_samples = self.sample_globals(n_samples or self.n_particles)
        n_particles = global_samples["mask"].shape[0]
        offset = self.latent_offset(design, global_samples["mask"], global_samples["embedding"])
        shift = None if self.offset_projection is None else self.offset_projection(offset)
        qz = self.basal_encoder(self.normalize(x), shift=shift)
        z_basal = qz.rsample() if shift is not None else qz.rsample((n_particles,))
        return {
            "qz": qz,
            "z_basal": z_basal,
            "z": z_basal + offset,
            "offset": offset,
            "library": x.sum(-1),
            "globals": global_samples,
        }

    @auto_move_data
    def generative(self, z: torch.Tensor, library: torch.Tensor, covariates: torch.Tensor | None = None) -> dict:
        """Decode :math:`z` (..., n, K) into expression proportions ``rho``, NB means ``mu`` and ``theta`` (G,)."""
        h = self.decoder(z, shift=self.decoder_covariates(covariates))
        log_rho = torch.log_softmax(self.decoder_head(h), dim=-1)
        mu = library[..., None] * log_rho.exp() + _MEAN_EPS
        return {"log_rho": log_rho, "mu": mu, "theta": self.log_dispersion.exp()}

    def global_kl_share(
        self, design: torch.Tensor, kl: torch.Tensor, perturbation_counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Charge each cell :math:`\\sum_t 1[d_{it} \\neq 0]\\,\\mathrm{KL}_t / n_t` (n_t = cells with t; 0 if none).

        Summed over the cells whose counts are ``n_t``, every perturbation's KL is counted exactly once.
        ``kl`` is (S, T); returns (S, n).
        """
        counts = self.train_perturbation_counts if perturbation_counts is None else perturbation_counts
        inverse = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
        weights = (design != 0).to(kl.dtype) * inverse
        return kl @ weights.T

    def local_terms(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict, generative_outputs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per particle and cell (S, n): :math:`\\log p(x \\mid z)` and :math:`\\log q(z_b \\mid \\cdot) - \\log p(z_b)`."""
        x = tensors[SAMS_REGISTRY_KEYS.X_KEY].to(generative_outputs["mu"].device)
        count_only, mean_part = negative_binomial_log_prob_parts(
            x, generative_outputs["mu"], generative_outputs["theta"]
        )
        z_basal = inference_outputs["z_basal"]
        kl_basal = (inference_outputs["qz"].log_prob(z_basal) - Normal(0.0, 1.0).log_prob(z_basal)).sum(-1)
        return count_only + mean_part, kl_basal

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
        perturbation_counts: torch.Tensor | None = None,
    ) -> LossOutput:
        """Negative plated ELBO per cell, averaged over particles and cells (spec §3.1)."""
        design = tensors[SAMS_REGISTRY_KEYS.PERTURBATION_KEY]
        log_likelihood, kl_basal = self.local_terms(tensors, inference_outputs, generative_outputs)
        kl_global = self.global_kl_share(design, inference_outputs["globals"]["kl"], perturbation_counts)
        loss = (-log_likelihood + kl_weight * (kl_basal + kl_global)).mean()
        return LossOutput(
            loss=loss,
            reconstruction_loss=-log_likelihood.mean(0),
            kl_local={"kl_basal": kl_basal.mean(0), "kl_global_share": kl_global.mean(0)},
            extra_metrics={"mask_active_fraction": (self.mask_logits.detach() > 0).float().mean()},
        )

    @torch.inference_mode()
    def sample(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> torch.Tensor:
        """Posterior-predictive counts of shape (n_samples, n, G)."""
        inference_outputs, generative_outputs = self.forward(
            tensors, inference_kwargs={"n_samples": n_samples}, compute_loss=False
        )
        return sample_negative_binomial(generative_outputs["mu"], generative_outputs["theta"]).cpu()
