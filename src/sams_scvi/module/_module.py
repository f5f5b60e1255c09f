"""SAMSModule: the SAMS-VAE generative model, its variational guides and the plated ELBO (plain PyTorch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi._defaults import ALIGN_MASK_LOGIT, ALIGN_THRESHOLD, N_HIDDEN, N_LATENT, N_LAYERS, N_PARTICLES

from ._alignment import active_entries, sparsest_rotation
from ._components import CovariateEmbedding, GaussianMLP, ResidualMLP
from ._likelihoods import CountLikelihood, GaussianLikelihood
from ._mechanisms import MechanismName, build_mechanism

Likelihood = Literal["nb", "normal"]
MAX_ENUMERATED_PERTURBATIONS = 4  # a cell with k perturbations has 2**k response patterns


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

    Where each part of the story lives: the priors, named as in the paper, in :meth:`prior` (:math:`p(z_b)` here,
    the globals' :math:`p(M), p(E)` from :attr:`mechanism`); the globals' guide :math:`q(M, E)` in :attr:`mechanism`
    (:meth:`sample_globals`, which also returns their KL against the prior); the shift
    :math:`z = z_b + D(M \odot E)` in :meth:`latent_offset` and, for any basal states under any conditions (with
    penetrance responses drawn), :meth:`perturbed_latent`; :math:`p(x \mid z)` in :meth:`generative`, which returns
    it as a distribution (:class:`~sams_scvi.module.CountLikelihood` or
    :class:`~sams_scvi.module.GaussianLikelihood`); :meth:`decode` chains the last two. The guide of the cells is
    :meth:`inference` (training) and :meth:`infer_cells` (posterior summaries); the objective is :meth:`loss`
    (plated ELBO) and :meth:`marginal_ll` (the paper's IWELBO); :meth:`sample` draws from the posterior predictive.

    The paper's comparison models share everything here and differ only in ``mechanism``
    (:mod:`sams_scvi.module._mechanisms`), i.e. in how the latent shift is built and what is global:

    ==================  ==========================================  =======================================
    ``mechanism``       latent                                      encoder / decoder
    ==================  ==========================================  =======================================
    ``"sparse"``        SAMS-VAE: :math:`z = z_b + D(M \odot E)`    encoder sees :math:`x` [and the offset]
    ``"dense"``         CPA-VAE: :math:`z = z_b + D E`              encoder sees :math:`x` [and the offset]
    ``"sparse_point"``  SVAE+: :math:`z \sim N(D(M \odot \mu), I)`  :math:`q(z \mid x)`, no treatment input
    ``"none"``          conditional VAE: :math:`z \sim N(0, I)`     encoder and decoder see :math:`D`
    ==================  ==========================================  =======================================

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
    mean_field_encoder
        If ``True`` the encoder sees only the counts; otherwise also the sampled offset :math:`D(M \odot E)` (the
        treatment vector for the conditional VAE). Ignored by mechanisms whose encoder sees only the counts
        (SVAE+).
    n_particles
        Monte-Carlo particles per training step.
    mechanism
        The latent-shift model (table above).
    likelihood
        ``"nb"``: raw counts, :math:`x \sim NB(l\,\mathrm{softmax}(f(z)), \theta)` (the paper's). ``"normal"``:
        normalised data (e.g. log-normalised or scaled expression, or the paper's Gaussian simulation),
        :math:`x_g \sim N(f_g(z), \sigma_g^2)` with a learned gene-wise :math:`\sigma_g`; the encoder then reads
        :math:`(x - m_g) / s_g` instead of :math:`(\log(1 + x) - m_g) / s_g`.
    penetrance
        If ``True``, a cell responds to each of its perturbations only with probability :math:`\pi_t` (CRISPR
        cells that escape the edit or the knockdown): :math:`u_{it} \sim \mathrm{Bern}(\pi_t)` and
        :math:`z_i = z^b_i + \sum_t d_{it} u_{it} (m_t \odot e_t)`. :math:`u_i` is summed out exactly
        (:meth:`response_branches`; the ELBO becomes :math:`\log \sum_u p(u) \exp \mathrm{ELBO}_u`), and
        :math:`\pi_t` is a point estimate. ``False``: the paper's model, in which every cell responds.
    penetrance_init
        Initial :math:`\pi_t`.
    penetrance_prior
        ``a`` of the prior :math:`\pi_t \sim \mathrm{Beta}(a, 1)` (mean ``a / (a + 1)``): a perturbation acts
        on nearly every cell unless its cells show otherwise. With ``a = 1`` (flat) the responses become a free
        binary feature: weak perturbations drift to :math:`\pi \approx 0.5` (``docs/model.md``).
    **mechanism_kwargs
        Arguments of the mechanism's class (priors, guide, initialisation), e.g. ``mask_prior_prob``, ``guide`` or
        ``embedding_init_scale`` for :class:`~sams_scvi.module._mechanisms.SparseMechanism`; an argument the
        mechanism does not take raises a ``ValueError``.
    """

    def __init__(
        self,
        n_input: int,
        n_perturbations: int,
        n_latent: int = N_LATENT,
        n_hidden: int = N_HIDDEN,
        n_layers: int = N_LAYERS,
        n_cats_per_cov: list[int] | None = None,
        mean_field_encoder: bool = False,
        n_particles: int = N_PARTICLES,
        mechanism: MechanismName = "sparse",
        likelihood: Likelihood = "nb",
        penetrance: bool = False,
        penetrance_init: float = 0.9,
        penetrance_prior: float = 50.0,
        **mechanism_kwargs,
    ) -> None:
        super().__init__()
        if likelihood not in ("nb", "normal"):
            raise ValueError(f"`likelihood` must be 'nb' or 'normal', not {likelihood!r}.")
        self.likelihood = likelihood
        # p(x | z): which distribution generative() returns (and what its effects are measured on)
        self.px_class = GaussianLikelihood if likelihood == "normal" else CountLikelihood
        self.n_input = n_input
        self.n_perturbations = n_perturbations
        self.n_latent = n_latent
        self.n_particles = n_particles
        self.mechanism_name = mechanism
        # Globals and their guide: q(M) q(E | M) for SAMS-VAE, and the comparison models' counterparts.
        self.mechanism = build_mechanism(mechanism, n_perturbations, n_latent, **mechanism_kwargs)
        self.mean_field_encoder = mean_field_encoder or not self.mechanism.encoder_sees_offset

        # Fixed data statistics (buffers: saved with the model, moved with .to()): the gene-wise mean and standard
        # deviation of the encoder's input transform, log1p(x) for counts and x itself under "normal" (normalize).
        self.register_buffer("input_mean", torch.zeros(n_input))
        self.register_buffer("input_std", torch.ones(n_input))
        self.register_buffer("normalization_fitted", torch.tensor(False))
        self.register_buffer("train_perturbation_counts", torch.zeros(n_perturbations))

        # q(z_b | x [, D(M*E)]), q(z | x) for SVAE+, or q(z | x, D) for the conditional VAE.
        self.basal_encoder = GaussianMLP(n_input, n_latent, n_hidden, n_layers)
        conditioned = not self.mean_field_encoder
        in_networks = self.mechanism.treatment_in_networks
        self.design_projection = (
            nn.Linear(n_perturbations, n_hidden, bias=False) if conditioned and in_networks else None
        )
        self.offset_projection = nn.Linear(n_latent, n_hidden, bias=False) if conditioned and not in_networks else None
        # p(x | z, c [, D]).
        self.decoder = ResidualMLP(n_latent, n_hidden, n_layers)
        self.decoder_covariates = CovariateEmbedding(n_cats_per_cov or [], n_hidden)
        self.decoder_design = nn.Linear(n_perturbations, n_hidden, bias=False) if in_networks else None
        self.decoder_head = nn.Linear(n_hidden, n_input)
        # NB: gene-wise inverse dispersion theta = exp(phi); normal: gene-wise noise scale sigma = exp(phi)
        self.log_dispersion = nn.Parameter(torch.zeros(n_input))
        # Partial penetrance: cell i responds to its perturbation t (u_it = 1) with probability pi_t.
        if penetrance and not self.mechanism.has_shift:
            raise ValueError(f"`penetrance` needs a latent shift; the {mechanism!r} mechanism has none.")
        if not 0.0 < penetrance_init < 1.0:
            raise ValueError(f"`penetrance_init` must be a probability in (0, 1), not {penetrance_init}.")
        self.penetrance_prior = penetrance_prior
        self.penetrance_logit = (
            nn.Parameter(torch.full((n_perturbations,), math.log(penetrance_init / (1.0 - penetrance_init))))
            if penetrance
            else None
        )

    # Names of the input statistics before 0.3 ("x_log_*" although under "normal" they are not of log counts); kept
    # as aliases, and models saved with them load.
    _RENAMED_BUFFERS = {"x_log_mean": "input_mean", "x_log_std": "input_std"}

    @property
    def x_log_mean(self) -> torch.Tensor:
        """Alias of :attr:`input_mean` (its name before 0.3)."""
        return self.input_mean

    @property
    def x_log_std(self) -> torch.Tensor:
        """Alias of :attr:`input_std` (its name before 0.3)."""
        return self.input_std

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for old, new in self._RENAMED_BUFFERS.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        if self.penetrance_logit is not None and prefix + "penetrance_logit" not in state_dict:
            # saved before `penetrance` existed: the paper's model, in which every perturbed cell responds
            self.penetrance_logit = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ priors and global variables
    def prior(self) -> dict[str, torch.distributions.Distribution]:
        r"""The priors, named as in the paper; each is per entry (cell and latent dimension, or perturbation).

        ``"z_basal"`` :math:`N(0, 1)` and the mechanism's (SAMS-VAE: ``"mask"`` :math:`\mathrm{Bern}(\alpha)`,
        ``"embedding"`` :math:`N(0, \sigma_E^2)`), and under penetrance ``"penetrance"`` :math:`\mathrm{Beta}(a, 1)`
        (a MAP penalty on the point estimate :math:`\pi_t`).
        """
        priors = {"z_basal": self.basal_prior(), **self.mechanism.prior()}
        if self.models_penetrance:
            a = torch.tensor(float(self.penetrance_prior), device=self.penetrance_logit.device)
            priors["penetrance"] = torch.distributions.Beta(a, torch.ones_like(a))
        return priors

    def basal_prior(self) -> Normal:
        r""":math:`p(z_b) = N(0, I)`, per latent dimension.

        For SVAE+, whose encoder infers :math:`z`, this is :math:`p(z) = N(D(M \odot \mu), I)` read on
        :math:`z_b = z - \mathrm{offset}`.
        """
        anchor = self.log_dispersion
        return Normal(anchor.new_zeros(()), anchor.new_ones(()))

    def global_variational_parameters(self) -> list[nn.Parameter]:
        """The mechanism's free per-perturbation variational parameters (e.g. mask logits, embedding locations)."""
        extra = [] if self.penetrance_logit is None else [self.penetrance_logit]
        return self.mechanism.variational_parameters() + extra

    def perturbation_axes(self) -> dict[str, int]:
        """State-dict entries with one slice per perturbation, and that axis: what grows when perturbations are added.

        The mechanism's per-perturbation variational parameters and the penetrance logits (rows), the first layers
        that read the treatment vector (columns; the conditional VAE) and the training cell counts.
        """
        per_perturbation = {id(p) for p in self.global_variational_parameters()}
        axes = {name: 0 for name, p in self.named_parameters() if id(p) in per_perturbation}
        for layer in ("design_projection", "decoder_design"):
            if getattr(self, layer) is not None:
                axes[f"{layer}.weight"] = 1
        axes["train_perturbation_counts"] = 0
        return axes

    def covariate_axes(self) -> dict[str, int]:
        """State-dict entries with one row per category of a covariate (the decoder's covariate embeddings)."""
        return {
            f"decoder_covariates.embeddings.{j}.weight": 0
            for j, embedding in enumerate(self.decoder_covariates.embeddings)
            if embedding is not None
        }

    @property
    def _draws_present_only(self) -> bool:
        """Whether a minibatch draws only the globals of the perturbations it carries.

        True for every mechanism with per-perturbation globals; the conditional VAE has none (its networks read
        the whole treatment vector).
        """
        return self.mechanism.has_shift and not self.mechanism.treatment_in_networks

    @property
    def models_penetrance(self) -> bool:
        """Whether cells respond to their perturbations only with probability :math:`\\pi_t`."""
        return self.penetrance_logit is not None

    def response_branches(self, design: torch.Tensor, columns: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        r"""Every response pattern :math:`u_i \in \{0, 1\}^{k_i}` of each cell's :math:`k_i` perturbations.

        Returns ``design`` (R, T), the cell's design with the non-responding perturbations removed, ``cells`` (R,)
        and ``branch`` (R,) (branch 0: every perturbation acts, so a control cell has one row), and
        ``log_prior`` (R,) :math:`\sum_t \log \pi_t^{u_t} (1 - \pi_t)^{1 - u_t}`. ``columns``: the perturbations
        of the design's columns, if it holds only some (see :meth:`present_perturbations`).
        """
        present = design != 0
        n_present = present.sum(-1)
        most = int(n_present.max()) if design.shape[0] else 0
        if most > MAX_ENUMERATED_PERTURBATIONS:
            raise ValueError(
                f"`penetrance=True` enumerates the 2**k response patterns of a cell with k perturbations; a cell has "
                f"{most} > {MAX_ENUMERATED_PERTURBATIONS}. Train without penetrance for such designs."
            )
        rank = (present.cumsum(-1) - 1).clamp(min=0)
        logit = self.penetrance_logit if columns is None else self.penetrance_logit[columns]
        log_on = torch.nn.functional.logsigmoid(logit)
        log_off = torch.nn.functional.logsigmoid(-logit)
        parts = {"design": [], "cells": [], "branch": [], "log_prior": []}
        for branch in range(2**most):
            cells = (n_present > (branch.bit_length() - 1)).nonzero(as_tuple=True)[0]
            off = present[cells] & ((branch >> rank[cells]) & 1).bool()
            on = present[cells] & ~off
            parts["design"].append(design[cells] * on)
            parts["cells"].append(cells)
            parts["branch"].append(torch.full_like(cells, branch))
            parts["log_prior"].append((on * log_on + off * log_off).sum(-1))
        return {key: torch.cat(value) for key, value in parts.items()}

    @staticmethod
    def branch_table(values: torch.Tensor, branches: dict[str, torch.Tensor], n_cells: int) -> torch.Tensor:
        """Rows (S, R) -> (S, n, B): ``values + log_prior`` per cell and response pattern, ``-inf`` where none."""
        n_branches = int(branches["branch"].max()) + 1
        table = values.new_full((values.shape[0], n_cells, n_branches), -torch.inf)
        table[:, branches["cells"], branches["branch"]] = values + branches["log_prior"]
        return table

    @classmethod
    def combine_branches(
        cls, values: torch.Tensor, branches: dict[str, torch.Tensor], n_cells: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per cell :math:`\\log \\sum_u \\pi(u) \\exp(v_u)` (S, n), and per row :math:`q(u \\mid x)` (S, R).

        With :math:`v_u` a response pattern's ELBO, the first is the bound with :math:`q(u \\mid x)` at its
        optimum, :math:`\\propto \\pi(u) \\exp(v_u)`, the second.
        """
        combined = torch.logsumexp(cls.branch_table(values, branches, n_cells), dim=-1)
        posterior = torch.exp(values + branches["log_prior"] - combined[:, branches["cells"]])
        return combined, posterior

    def perturbed_latent(self, z_basal: torch.Tensor, design: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        r"""Counterfactual states :math:`z = z_b + \sum_t d_t u_t\,\mathrm{shift}_t` of basal states under conditions.

        ``z_basal`` (S, n, K) or (S, n, P, K), ``design`` (P, T) the conditions applied to every state, ``shift``
        (S, T, K) one draw of the globals per leading index; returns (S, n, P, K). Under penetrance each state
        responds to each of its condition's perturbations with probability :math:`\pi_t`, drawn independently
        (:math:`u_t \sim \mathrm{Bern}(\pi_t)`); otherwise every :math:`u_t = 1`.
        """
        n_cells = z_basal.shape[1]
        if not self.models_penetrance:
            offset = self.latent_offset(design, shift)[:, None]  # (S, 1, P, K)
        else:
            columns = design.nonzero(as_tuple=True)[1]
            probability = torch.sigmoid(self.penetrance_logit)[columns]
            responses = torch.bernoulli(probability.expand(shift.shape[0], n_cells, len(columns)))
            offset = self.latent_offset(design, shift, responses)
        return self.compose(z_basal if z_basal.dim() == 4 else z_basal[:, :, None, :], offset)

    def decode(
        self,
        z_basal: torch.Tensor,
        design: torch.Tensor,
        shift: torch.Tensor,
        library: torch.Tensor,
        covariates: torch.Tensor | None = None,
    ) -> CountLikelihood | GaussianLikelihood:
        r""":math:`p(x \mid z)` of basal states under conditions: :meth:`perturbed_latent`, then :meth:`generative`.

        ``z_basal`` (S, n, K), ``design`` (P, T), ``shift`` (S, T, K), ``library`` (n,) and ``covariates`` (n, J)
        of the states; the distribution has batch shape (S, n, P).
        """
        z = self.perturbed_latent(z_basal, design, shift)
        n_conditions = design.shape[0]
        if covariates is not None:
            covariates = covariates[:, None, :].expand(-1, n_conditions, -1)
        library = library[:, None].expand(-1, n_conditions)
        return self.generative(z, library, covariates, design=design)["px"]

    @property
    def mask_logits(self) -> torch.Tensor:
        """Mask posterior logits :math:`\\lambda` (T, K); only for mechanisms with masks."""
        if not self.mechanism.has_mask:
            raise AttributeError(f"The {self.mechanism_name!r} mechanism has no masks.")
        return self.mechanism.mask_logits

    def sample_globals(
        self, n_particles: int, with_kl: bool = True, columns: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Draw the globals from q per particle: ``shift`` (S, T, K), ``kl`` (S, T) and the mechanism's variables.

        ``kl[s, t]`` is the single-sample estimate :math:`\\sum_k \\log q - \\log p` of perturbation ``t``'s globals
        (for SAMS-VAE, of :math:`(m_{tk}, e_{tk})`); ``with_kl=False`` skips it (about half the cost at inference).
        ``columns`` (C,): draw only these perturbations' globals, (S, C, K) and (S, C), and return ``columns`` too;
        the design is then read through :meth:`restrict_design`.
        """
        out = self.mechanism.sample(n_particles, with_kl=with_kl, columns=columns)
        return out if columns is None else {**out, "columns": columns}

    @staticmethod
    def present_perturbations(design: torch.Tensor) -> torch.Tensor:
        """Columns (C,) of the perturbations that some cell of ``design`` (n, T) carries."""
        return (design != 0).any(0).nonzero(as_tuple=True)[0]

    @staticmethod
    def restrict_design(design: torch.Tensor, global_samples: dict[str, torch.Tensor]) -> torch.Tensor:
        """``design`` (n, T) reduced to the columns whose globals ``global_samples`` holds (all, by default)."""
        columns = global_samples.get("columns")
        return design if columns is None else design[:, columns]

    @torch.no_grad()
    def point_globals(self) -> dict[str, torch.Tensor]:
        """Posterior point estimate (SAMS-VAE: mask mode :math:`1[\\sigma(\\lambda) > 0.5]`, mean of q(E | mode))."""
        return self.mechanism.point()

    @torch.no_grad()
    def rotate_latent(self, rotation: torch.Tensor, active: torch.Tensor, mask_logit: float = ALIGN_MASK_LOGIT) -> None:
        r"""Re-express the latent space as :math:`z' = zR` for an orthogonal ``rotation`` (K, K).

        The basal prior :math:`N(0, I)` is rotation invariant, and :math:`z` enters the decoder and the offset
        enters the encoder through linear layers, whose weights absorb :math:`R`; the encoder's mean is rotated and
        its log variances mixed by :math:`R \circ R` (the rotated covariance is no longer diagonal). The mechanism
        rotates its shifts and restarts its masks at ``active`` (T, K), with logits ``mask_logit`` and
        ``-mask_logit``; see ``SparseMechanism.rotate``.
        """
        if not hasattr(self.mechanism, "rotate"):
            raise ValueError(f"The {self.mechanism_name!r} mechanism has no masks to align.")
        rotation = rotation.to(self.decoder.first.weight)
        mixing = rotation * rotation
        self.decoder.first.weight.copy_(self.decoder.first.weight @ rotation)
        encoder = self.basal_encoder
        encoder.mean.weight.copy_(rotation.T @ encoder.mean.weight)
        encoder.mean.bias.copy_(encoder.mean.bias @ rotation)
        encoder.log_var.weight.copy_(mixing.T @ encoder.log_var.weight)
        encoder.log_var.bias.copy_(encoder.log_var.bias @ mixing)
        if self.offset_projection is not None:
            self.offset_projection.weight.copy_(self.offset_projection.weight @ rotation)
        self.mechanism.rotate(rotation, active.to(rotation.device), mask_logit)

    @torch.no_grad()
    def align_mechanism(self, threshold: float = ALIGN_THRESHOLD, mask_logit: float = ALIGN_MASK_LOGIT) -> torch.Tensor:
        """Rotate the latent space to the basis where the point shifts are sparsest; returns the rotation (K, K).

        Masks restart on (logit ``mask_logit``) where the rotated shift is at least ``threshold`` times the largest
        entry of its perturbation or among the largest entries that carry 90 % of its squared norm, and off
        (``-mask_logit``) elsewhere; a perturbation whose point shift is zero keeps its mask mode (see
        :mod:`sams_scvi.module._alignment`).
        """
        shift = self.point_globals()["shift"][0]
        rotation = torch.as_tensor(sparsest_rotation(shift)).to(shift)
        active = active_entries(shift @ rotation, threshold)
        unmoved = shift.abs().amax(dim=-1) == 0
        active[unmoved] = self.mechanism.mask_logits[unmoved] > 0
        self.rotate_latent(rotation, active, mask_logit)
        return rotation

    @torch.no_grad()
    def infer_cells(self, tensors: dict[str, torch.Tensor], global_samples: dict[str, torch.Tensor]) -> dict:
        r"""Posterior basal states of the cells in ``tensors``, with their responses inferred under penetrance.

        Returns ``z_basal`` (S, n, K), one draw per particle (under penetrance, from the response pattern drawn
        from :math:`q(u \mid x)`, itself computed from each pattern's ELBO at the encoder's mean), ``z`` (S, n, K),
        the perturbed state of that draw, ``basal_mean`` (S, n, K), the posterior mean (averaged over response
        patterns), ``basal_scale`` (S, n, K), its standard deviation (of the mixture over response patterns),
        ``offset`` (S, n, K), the mean offset :math:`\sum_u q(u \mid x)\, D_u (M \odot E)`, ``library`` (n,), and
        ``response_probability`` (S, n, T), :math:`q(u_{it} = 1 \mid x_i)` (``None`` without penetrance).
        """
        if not self.models_penetrance:
            out = self.inference(**self._get_inference_input(tensors), global_samples=global_samples)
            basal_mean = self.basal_mean(out)
            n_particles = out["z_basal"].shape[0]
            scale = out["qz"].scale
            return {
                "z_basal": out["z_basal"],
                "z": out["z"],
                "basal_mean": basal_mean.expand(n_particles, -1, -1),
                "basal_scale": (scale if scale.dim() == 3 else scale[None]).expand(n_particles, -1, -1),
                "offset": out["offset"],
                "library": out["library"],
                "response_probability": None,
            }
        out = self.inference(**self._get_inference_input(tensors), global_samples=global_samples)
        branches = out["branches"]
        # q(u | x) from each pattern's ELBO at the encoder's mean, log p(x | z_mean) - KL(q(z_b) || p(z_b)):
        # deterministic given the globals, so that get_latent and the response probabilities are reproducible
        qz = out["qz"]
        loc = qz.loc if qz.loc.dim() == 3 else qz.loc[None]
        basal_loc, z_mean = self.split_encoded(loc, out["offset"])
        kl_basal = torch.distributions.kl_divergence(Normal(basal_loc, qz.scale), self.basal_prior()).sum(-1)
        at_mean = {**out, "z": z_mean}
        generative_outputs = self.generative(**self._get_generative_input(tensors, at_mean))
        log_likelihood, _ = self.local_terms(tensors, out, generative_outputs)
        n_cells = tensors[SAMS_REGISTRY_KEYS.PERTURBATION_KEY].shape[0]
        elbo = log_likelihood - kl_basal  # (S, R)
        _, posterior = self.combine_branches(elbo, branches, n_cells)

        def cell_mean(values: torch.Tensor) -> torch.Tensor:  # (S or 1, R, ...) -> (S, n, ...), weighted by q(u | x)
            values = values.expand(posterior.shape[0], *values.shape[1:])
            weighted = posterior.reshape(*posterior.shape, *[1] * (values.dim() - 2)) * values
            return values.new_zeros(values.shape[0], n_cells, *values.shape[2:]).index_add(
                1, branches["cells"], weighted
            )

        table = self.branch_table(elbo, branches, n_cells)
        drawn = torch.distributions.Categorical(logits=table).sample()  # (S, n): one response pattern per particle
        row_of = torch.zeros(n_cells, table.shape[-1], dtype=torch.long, device=elbo.device)
        row_of[branches["cells"], branches["branch"]] = torch.arange(len(branches["cells"]), device=elbo.device)
        rows = row_of.gather(1, drawn.T).T  # (S, n)
        index = rows[..., None].expand(-1, -1, out["z_basal"].shape[-1])
        z_basal = out["z_basal"].gather(1, index)
        basal_mean = cell_mean(self.basal_mean(out))
        # the mixture's variance: E_u[scale_u^2 + mean_u^2] - mean^2
        second_moment = cell_mean(qz.scale.square() + self.basal_mean(out).square())
        return {
            "z_basal": z_basal,
            "z": out["z"].gather(1, index),
            "basal_mean": basal_mean,
            "basal_scale": (second_moment - basal_mean.square()).clamp(min=0).sqrt(),
            "offset": cell_mean(out["offset"]),
            "library": tensors[SAMS_REGISTRY_KEYS.X_KEY].sum(-1).to(z_basal.device),
            "response_probability": cell_mean(
                (branches["design"] != 0).to(elbo.dtype)[None].expand(elbo.shape[0], -1, -1)
            ),
        }

    @staticmethod
    def latent_offset(design: torch.Tensor, shift: torch.Tensor, responses: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`D (M \\odot E)`: design (n, T), shifts (S, T, K) -> offset (S, n, K).

        The design is sparse (one-hot or a few perturbations per cell), so the product visits only its nonzero
        entries: ``offset[:, i] = sum over nonzero d_it of d_it * shift[:, t]``. ``responses`` ``(S, *cells, nnz)``,
        one factor per nonzero entry (in ``design.nonzero()`` order), gives ``(S, *cells, n, K)`` instead.
        """
        if design.dim() != 2 or shift.dim() != 3:
            raise ValueError(f"Expected a (n, T) design and (S, T, K) shifts; got {design.shape} and {shift.shape}.")
        rows, columns = design.nonzero(as_tuple=True)
        weighted = shift[:, columns] * design[rows, columns][:, None]  # (S, nnz, K)
        cells = ()
        if responses is not None:
            cells = tuple(responses.shape[1:-1])
            weighted = weighted.reshape(weighted.shape[0], *[1] * len(cells), *weighted.shape[1:])
            weighted = weighted * responses[..., None]
        offset = shift.new_zeros(shift.shape[0], *cells, design.shape[0], shift.shape[-1])
        return offset.index_add(-2, rows, weighted)

    @staticmethod
    def compose(z_basal: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The perturbed latent state :math:`z = z_b + D (M \\odot E)` (shapes broadcast)."""
        return z_basal + offset

    def split_encoded(self, z_encoded: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_basal, z)`` from the encoder's variable: :math:`z_b` for most mechanisms, :math:`z` for SVAE+."""
        if self.mechanism.encodes_basal:
            return z_encoded, self.compose(z_encoded, offset)
        return z_encoded - offset, z_encoded

    def basal_mean(self, inference_outputs: dict) -> torch.Tensor:
        """Posterior mean of :math:`z_b`, (S, n, K), from :meth:`inference` outputs."""
        loc = inference_outputs["qz"].loc
        loc = loc if loc.dim() == 3 else loc[None]  # (S, n, K); S = 1 when the encoder sees only the counts
        return self.split_encoded(loc, inference_outputs["offset"])[0]

    # ------------------------------------------------------------------ scvi-tools module interface
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor | None]:
        return {"x": tensors[SAMS_REGISTRY_KEYS.X_KEY], "design": tensors[SAMS_REGISTRY_KEYS.PERTURBATION_KEY]}

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict[str, torch.Tensor], **kwargs
    ) -> dict[str, torch.Tensor | None]:
        covariates = self.covariate_codes(tensors)
        design = tensors[SAMS_REGISTRY_KEYS.PERTURBATION_KEY]
        branches = inference_outputs.get("branches")
        if branches is not None:  # one row per response pattern
            covariates = None if covariates is None else covariates[branches["cells"].to(covariates.device)]
            design = branches["design"]
        return {
            "z": inference_outputs["z"],
            "library": inference_outputs["library"],
            "covariates": covariates,
            "design": design,
        }

    @staticmethod
    def covariate_codes(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Batch and extra categorical covariates as one (n, J) code matrix, or ``None``."""
        parts = [tensors[k] for k in (SAMS_REGISTRY_KEYS.BATCH_KEY, SAMS_REGISTRY_KEYS.CAT_COVS_KEY) if k in tensors]
        return torch.cat(parts, dim=-1) if parts else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder input :math:`(\\log(1 + x) - m_g) / s_g` (counts) or :math:`(x - m_g) / s_g` (``"normal"``).

        :math:`m_g, s_g` are training-split gene statistics of the same transform.
        """
        values = torch.log1p(x) if self.px_class.log_input else x
        return (values - self.input_mean) / self.input_std

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        design: torch.Tensor,
        n_samples: int | None = None,
        global_samples: dict[str, torch.Tensor] | None = None,
    ) -> dict:
        """Sample globals (unless given), the offset :math:`D(M \\odot E)` and :math:`z_b \\sim q(z_b \\mid \\cdot)`.

        Returns ``z_basal`` and ``z`` of shape (S, n, K), the encoder's posterior ``qz`` and its sample
        ``z_encoded`` (``z_basal``, or ``z`` for SVAE+), the ``offset``, the observed ``library`` (n,) and the
        ``globals`` dictionary, and ``design`` (n, C), the cells' design restricted to the columns of the globals
        drawn. With penetrance the rows are every response pattern of every cell
        (:meth:`response_branches`, whose outputs are added as ``branches``).
        """
        if global_samples is None:
            # only the perturbations this minibatch carries: the plated ELBO charges no other perturbation's
            # globals, so drawing all T of them made a step's cost grow with the screen instead of the batch
            columns = self.present_perturbations(design) if self._draws_present_only else None
            global_samples = self.sample_globals(n_samples or self.n_particles, columns=columns)
        design = cell_design = self.restrict_design(design, global_samples)
        branches = None
        if self.models_penetrance:
            branches = self.response_branches(design, global_samples.get("columns"))
            x, design = x[branches["cells"]], branches["design"]
        n_particles = global_samples["shift"].shape[0]
        offset = self.latent_offset(design, global_samples["shift"])
        context = None  # what the encoder sees besides the counts: the offset, or the treatment vector
        if self.offset_projection is not None:
            context = self.offset_projection(offset)
        elif self.design_projection is not None:
            context = self.design_projection(design)
        qz = self.basal_encoder(self.normalize(x), context=context)
        z_encoded = qz.rsample() if qz.loc.dim() == 3 else qz.rsample((n_particles,))
        z_basal, z = self.split_encoded(z_encoded, offset)
        return {
            "qz": qz,
            "z_encoded": z_encoded,
            "z_basal": z_basal,
            "z": z,
            "offset": offset,
            "library": x.sum(-1),
            "globals": global_samples,
            "design": cell_design,  # (n, C): the cells' design, restricted to the columns of the globals drawn
            **({} if branches is None else {"branches": branches}),
        }

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        covariates: torch.Tensor | None = None,
        design: torch.Tensor | None = None,
        transform_batch: int | None = None,
    ) -> dict:
        """:math:`p(x \\mid z, c\\,[, d])` for latent states :math:`z` (..., n, K): ``{"px": distribution}``.

        ``"nb"``: :class:`~sams_scvi.module._likelihoods.CountLikelihood`,
        :math:`NB(l\\,\\mathrm{softmax}(f(z)), \theta)` at the library sizes ``library`` (..., n);
        ``"normal"``: :class:`~sams_scvi.module._likelihoods.GaussianLikelihood`, :math:`N(f(z), \\sigma^2)`.
        ``covariates`` (..., n, J) are the cells' codes (batch first); ``transform_batch`` decodes every cell in
        that batch instead. ``design`` (..., n, T) is read only by the conditional VAE, whose decoder sees the
        treatment.
        """
        if transform_batch is not None and covariates is not None:
            covariates = covariates.clone()
            covariates[..., 0] = transform_batch
        context = self.decoder_covariates(covariates)  # what the decoder sees besides z: covariates [, treatment]
        if self.decoder_design is not None:
            treatment = self.decoder_design(design)
            context = treatment if context is None else context + treatment
        h = self.decoder(z, context=context)
        dispersion = self.log_dispersion.exp()  # NB: inverse dispersion theta; normal: noise scale sigma
        return {"px": self.px_class.from_decoder(self.decoder_head(h), library, dispersion)}

    def global_kl_share(
        self,
        design: torch.Tensor,
        kl: torch.Tensor,
        perturbation_counts: torch.Tensor | None = None,
        columns: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Charge each cell :math:`\\sum_t 1[d_{it} \\neq 0]\\,\\mathrm{KL}_t / n_t` (n_t = cells with t; 0 if none).

        Summed over the cells whose counts are ``n_t``, every perturbation's KL is counted exactly once.
        ``kl`` is (S, T); returns (S, n). ``columns``: the perturbations of the design's and ``kl``'s columns, if
        they hold only some.
        """
        counts = self.train_perturbation_counts if perturbation_counts is None else perturbation_counts
        counts = counts if columns is None else counts[columns]
        inverse = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
        weights = (design != 0).to(kl.dtype) * inverse
        return kl @ weights.T

    def local_terms(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict, generative_outputs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per particle and cell (S, n): :math:`\\log p(x \\mid z)` and :math:`\\log q(z_b \\mid \\cdot) - \\log p(z_b)`.

        Under penetrance, per particle and response pattern (S, R) (see :meth:`inference`).
        """
        log_q = inference_outputs["qz"].log_prob(inference_outputs["z_encoded"])
        kl_basal = (log_q - self.basal_prior().log_prob(inference_outputs["z_basal"])).sum(-1)
        x = tensors[SAMS_REGISTRY_KEYS.X_KEY].to(kl_basal.device)
        cells = inference_outputs["branches"]["cells"] if "branches" in inference_outputs else None
        # under penetrance the rows are response patterns of the cells
        return generative_outputs["px"].log_prob(x, rows=cells), kl_basal

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
        perturbation_counts: torch.Tensor | None = None,
    ) -> LossOutput:
        """Negative plated ELBO per cell, averaged over particles and cells (``docs/model.md``).

        Under penetrance the local term is :math:`\\log \\sum_u \\pi(u) \\exp \\mathrm{ELBO}_u` and the global share
        also carries :math:`-\\log \\mathrm{Beta}(\\pi_t \\mid a, 1)` (a MAP penalty on the point estimates).
        """
        global_samples = inference_outputs["globals"]
        columns = global_samples.get("columns")
        design = inference_outputs["design"]
        log_likelihood, kl_basal = self.local_terms(tensors, inference_outputs, generative_outputs)
        local_elbo = log_likelihood - kl_weight * kl_basal
        branches = inference_outputs.get("branches")
        if branches is not None:
            # log sum_u pi(u) exp(ELBO_u). Reported split: the expected log-likelihood under the optimal
            # q(u | x), and the rest (basal and response KL).
            local_elbo, posterior = self.combine_branches(local_elbo, branches, design.shape[0])
            log_likelihood = local_elbo.new_zeros(local_elbo.shape).index_add(
                1, branches["cells"], posterior * log_likelihood
            )
            kl_basal = (log_likelihood - local_elbo) / kl_weight if kl_weight > 0 else torch.zeros_like(local_elbo)
        global_terms = global_samples["kl"]
        if self.models_penetrance and self.penetrance_prior != 1.0:
            # -log Beta(pi_t | a, 1) up to a constant, charged once per perturbation like its KL (a MAP penalty on
            # the point estimate pi_t: get_elbo and get_marginal_ll leave it out)
            logit = self.penetrance_logit if columns is None else self.penetrance_logit[columns]
            global_terms = global_terms - (self.penetrance_prior - 1.0) * torch.nn.functional.logsigmoid(logit)
        kl_global = self.global_kl_share(design, global_terms, perturbation_counts, columns)
        loss = (-local_elbo + kl_weight * kl_global).mean()
        return LossOutput(
            loss=loss,
            reconstruction_loss=-log_likelihood.mean(0),
            kl_local={"kl_basal": kl_basal.mean(0), "kl_global_share": kl_global.mean(0)},
            extra_metrics=self.mechanism_summary(),
        )

    @torch.no_grad()
    def shift_magnitude(self) -> torch.Tensor:
        r"""Mean norm of the point shifts :math:`\|\bar m_t \odot \bar e_t\|` of the perturbations with training cells.

        While it still grows, the predicted effects are still growing (an undertrained model predicts them shrunk).
        """
        shift = self.mechanism.point()["shift"].reshape(-1, self.n_latent)
        trained = self.train_perturbation_counts > 0
        norms = shift.norm(dim=-1)[trained] if bool(trained.any()) else shift.norm(dim=-1)
        return norms.mean().detach().float()

    def mechanism_summary(self) -> dict[str, torch.Tensor]:
        """What training logs of the mechanism: the fraction of mask entries on (logit > 0), the mean penetrance.

        Their changes over the last quarter of training tell whether the mechanism has settled.
        """
        summary = {}
        if self.mechanism.has_mask:
            summary["mask_active_fraction"] = (self.mask_logits.detach() > 0).float().mean()
        if self.models_penetrance:
            summary["penetrance_mean"] = torch.sigmoid(self.penetrance_logit.detach()).mean()
        return summary

    def log_importance_weights(self, tensors: dict[str, torch.Tensor], global_samples: dict[str, torch.Tensor]):
        r"""Per particle and cell (S, n): :math:`\log p(x \mid z) + \log p(z_b) - \log q(z_b \mid \cdot)`.

        The globals are given (shared by every cell); under penetrance the response patterns are summed out,
        :math:`\log \sum_u \pi(u) \exp(\cdot)`, each importance-sampled by its own :math:`q(z_b \mid x, u)`.
        """
        inference_outputs, generative_outputs = self.forward(
            tensors, inference_kwargs={"global_samples": global_samples}, compute_loss=False
        )
        log_likelihood, kl_basal = self.local_terms(tensors, inference_outputs, generative_outputs)
        branches = inference_outputs.get("branches")
        if branches is None:
            return log_likelihood - kl_basal
        n_cells = tensors[SAMS_REGISTRY_KEYS.PERTURBATION_KEY].shape[0]
        return self.combine_branches(log_likelihood - kl_basal, branches, n_cells)[0]

    @torch.inference_mode()
    def marginal_ll(
        self, tensors: dict[str, torch.Tensor], global_samples: dict[str, torch.Tensor], n_samples_per_pass: int = 25
    ) -> torch.Tensor:
        r"""The paper's importance-weighted ELBO of each cell (n,), in nats.

        :math:`\log \frac{1}{S} \sum_s \exp w_s` with the log-weights of :meth:`log_importance_weights`, one per
        draw of ``global_samples`` (S draws, decoded ``n_samples_per_pass`` at a time to bound memory).
        """
        n_draws = global_samples["shift"].shape[0]
        log_w = torch.cat(
            [
                self.log_importance_weights(
                    tensors, {k: v[start : start + n_samples_per_pass] for k, v in global_samples.items()}
                )
                for start in range(0, n_draws, n_samples_per_pass)
            ]
        )
        return torch.logsumexp(log_w, 0) - math.log(n_draws)

    @torch.inference_mode()
    def posterior_predictive(
        self, tensors: dict[str, torch.Tensor], n_samples: int = 1, transform_batch: Sequence[int | None] = (None,)
    ) -> list[CountLikelihood | GaussianLikelihood]:
        r""":math:`p(\hat x \mid x)` of each cell in its own state: one distribution (S, n, G) per ``transform_batch``.

        Per sample, the globals are drawn from :math:`q`, then the cell's basal state and (under penetrance) its
        response pattern from their posterior (:meth:`infer_cells`); the same states are decoded in each batch of
        ``transform_batch`` (``None``: each cell's own).
        """
        cells = self.infer_cells(tensors, self.sample_globals(n_samples, with_kl=False))
        design = tensors[SAMS_REGISTRY_KEYS.PERTURBATION_KEY].to(cells["z"].device)
        covariates = self.covariate_codes(tensors)
        return [
            self.generative(cells["z"], cells["library"], covariates, design=design, transform_batch=batch)["px"]
            for batch in transform_batch
        ]

    @torch.inference_mode()
    def sample(
        self, tensors: dict[str, torch.Tensor], n_samples: int = 1, generative_kwargs: dict | None = None
    ) -> torch.Tensor:
        r"""Posterior-predictive draws, one row per cell: (n, G), or (n, G, n_samples) when ``n_samples > 1``.

        Draws :math:`x` from :meth:`posterior_predictive`; ``generative_kwargs`` go to :meth:`generative` (e.g.
        ``transform_batch``), as in scvi-tools' modules.
        """
        kwargs = dict(generative_kwargs or {})
        transform_batch = kwargs.pop("transform_batch", None)
        if kwargs:
            raise TypeError(
                f"Unknown generative_kwargs {sorted(kwargs)}; the module's generative takes transform_batch."
            )
        draws = self.posterior_predictive(tensors, n_samples, (transform_batch,))[0].sample().cpu()  # (S, n, G)
        return draws[0] if n_samples == 1 else draws.permute(1, 2, 0)
