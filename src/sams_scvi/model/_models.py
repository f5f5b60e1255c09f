r"""SAMS-VAE and the paper's comparison models: one class each, differing only in the latent mechanism.

================  ============================================  ==============================================
model             latent state                                  treatment enters
================  ============================================  ==============================================
SAMSVAE           :math:`z = z_b + D (M \odot E)`, sparse M      additive latent shift (masked embeddings)
CPAVAE            :math:`z = z_b + D E`                          additive latent shift (dense embeddings)
ConditionalVAE    :math:`z \sim N(0, I)`                         encoder and decoder inputs
SVAEPlus          :math:`z \sim N(m_a \odot \mu_a, I)`           sparse shift of the prior mean; one-hot only
================  ============================================  ==============================================
"""

from __future__ import annotations

from typing import Literal

from anndata import AnnData

from sams_scvi._defaults import N_HIDDEN, N_LATENT, N_LAYERS, N_PARTICLES

from ._base import BasePerturbationModel
from ._recipes import resolve_recipe


class SAMSVAE(BasePerturbationModel):
    r"""Sparse Additive Mechanism Shift VAE for single-cell perturbation screens.

    Each perturbation :math:`t` shifts the basal latent state by a sparse vector :math:`m_t \odot e_t`, and
    combinations add their shifts: :math:`z = z_b + D (M \odot E)` (Bereket & Karaletsos, NeurIPS 2023).
    See :class:`~sams_scvi.module.SAMSModule` for the model and guides.

    Parameters
    ----------
    adata
        AnnData (or MuData) registered with :meth:`setup_anndata` (or :meth:`setup_mudata`).
    registry
        A saved registry, to build the model without data (used by :meth:`load` with ``adata=False``).
    n_latent
        Latent dimension ``K``.
    n_hidden, n_layers
        Width and depth of the encoder and decoder.
    mask_prior_prob
        Prior probability :math:`\alpha` that a perturbation acts on a latent dimension.
    embedding_prior_scale
        Prior scale of the perturbation embeddings.
    guide
        ``"correlated"`` (the paper's headline :math:`q(E \mid M)`) or ``"mean_field"``.
    mean_field_encoder
        If ``False`` (default), the basal encoder also sees the sampled perturbation offset.
    n_particles
        Monte-Carlo particles per training step.
    likelihood
        ``"nb"`` (default): raw UMI counts with a negative binomial, as in the paper. ``"normal"``: normalised or
        scaled data with a gene-wise Gaussian; ATEs are then differences of means on the data's own scale.
    recipe
        Optimisation settings (the objective, the paper's ELBO, is the same): ``"fast"`` (default) starts the
        masks on (logit 3) and trains the per-perturbation variational parameters 10x faster, so that effects are
        carried by the mechanism within minutes, and half way through it rotates the latent axes to where the
        shifts are sparsest and sets the masks there (:meth:`~sams_scvi.module.SAMSModule.align_mechanism`);
        ``"reference"`` is the authors' (masks at 0.5, one learning rate, no alignment). Arguments given
        explicitly (``mask_init_logit``, ``plan_kwargs={"global_lr_factor": ..., "align_at": ...}``) override the
        recipe. Measurements: ``docs/model.md``.
    penetrance
        If ``True``, each perturbed cell responds to each of its perturbations with a learned probability
        :math:`\pi_t` and otherwise stays at its basal state (CRISPR cells that escape the knockdown), so that
        the mechanism describes the cells that respond and the predicted population effect keeps its size on the
        log scale; :meth:`get_penetrance` and :meth:`get_response_probability` report :math:`\pi_t` and each
        cell's posterior. ``False``: the paper's model, where every cell responds. ``None`` (default): the
        recipe's choice (``"fast"``: ``True``; ``"reference"``: ``False``). See ``docs/model.md``.
    **module_kwargs
        Further arguments of :class:`~sams_scvi.module.SAMSModule` (e.g. ``embedding_encoder_n_hidden``,
        ``mask_init_logit``, ``embedding_init_scale``, ``penetrance_prior``).

    Examples
    --------
    >>> adata = sams_scvi.data.schraivogel2020_tapseq()
    >>> sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
    >>> model = sams_scvi.SAMSVAE(adata)
    >>> model.train()
    >>> ate = model.estimate_ate()
    """

    _display_name = "SAMS-VAE"

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_latent: int = N_LATENT,
        n_hidden: int = N_HIDDEN,
        n_layers: int = N_LAYERS,
        mask_prior_prob: float = 0.01,
        embedding_prior_scale: float = 1.0,
        guide: Literal["correlated", "mean_field"] = "correlated",
        mean_field_encoder: bool = False,
        n_particles: int = N_PARTICLES,
        likelihood: Literal["nb", "normal"] = "nb",
        recipe: Literal["fast", "reference"] = "fast",
        penetrance: bool | None = None,
        **module_kwargs,
    ) -> None:
        super().__init__(adata, registry)
        chosen = resolve_recipe(recipe)
        self._recipe_plan_kwargs = dict(chosen.plan)
        recipe_module = dict(chosen.module)
        recipe_penetrance = recipe_module.pop("penetrance", False)
        self._build_module(
            n_latent,
            n_hidden,
            n_layers,
            n_particles,
            likelihood=likelihood,
            mechanism="sparse",
            penetrance=recipe_penetrance if penetrance is None else penetrance,
            mask_prior_prob=mask_prior_prob,
            embedding_prior_scale=embedding_prior_scale,
            guide=guide,
            mean_field_encoder=mean_field_encoder,
            **{**recipe_module, **module_kwargs},
        )
        self.init_params_ = self._get_init_params(locals())


class CPAVAE(BasePerturbationModel):
    r"""CPA-VAE: SAMS-VAE without masks, :math:`z = z_b + D E` with :math:`e_{tk} \sim N(0, \sigma_E^2)`.

    The paper's ablation of the compositional perturbation autoencoder (no adversary, no dose network), with a
    mean-field :math:`q(E)`. Same API as :class:`SAMSVAE`.

    Parameters
    ----------
    adata, registry, n_latent, n_hidden, n_layers, embedding_prior_scale, mean_field_encoder, n_particles, likelihood
        As for :class:`SAMSVAE`.
    **module_kwargs
        Further arguments of :class:`~sams_scvi.module.SAMSModule`.
    """

    _display_name = "CPA-VAE"

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_latent: int = N_LATENT,
        n_hidden: int = N_HIDDEN,
        n_layers: int = N_LAYERS,
        embedding_prior_scale: float = 1.0,
        mean_field_encoder: bool = False,
        n_particles: int = N_PARTICLES,
        likelihood: Literal["nb", "normal"] = "nb",
        **module_kwargs,
    ) -> None:
        super().__init__(adata, registry)
        self._build_module(
            n_latent,
            n_hidden,
            n_layers,
            n_particles,
            likelihood=likelihood,
            mechanism="dense",
            embedding_prior_scale=embedding_prior_scale,
            mean_field_encoder=mean_field_encoder,
            **module_kwargs,
        )
        self.init_params_ = self._get_init_params(locals())


class ConditionalVAE(BasePerturbationModel):
    r"""Conditional VAE: :math:`z \sim N(0, I)`, encoder :math:`q(z \mid x, d)` and decoder :math:`p(x \mid z, d)`.

    The treatment vector :math:`d` (multi-hot for combinations) is an input of both networks; there are no
    global variables, so effects are learned implicitly by the decoder. Same API as :class:`SAMSVAE`
    (``get_mask_probabilities`` and ``get_perturbation_embeddings`` raise: it has neither).

    Parameters
    ----------
    adata, registry, n_latent, n_hidden, n_layers, n_particles, likelihood
        As for :class:`SAMSVAE`.
    **module_kwargs
        Further arguments of :class:`~sams_scvi.module.SAMSModule`.
    """

    _display_name = "Conditional VAE"

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_latent: int = N_LATENT,
        n_hidden: int = N_HIDDEN,
        n_layers: int = N_LAYERS,
        n_particles: int = N_PARTICLES,
        likelihood: Literal["nb", "normal"] = "nb",
        **module_kwargs,
    ) -> None:
        super().__init__(adata, registry)
        self._build_module(
            n_latent, n_hidden, n_layers, n_particles, likelihood=likelihood, mechanism="none", **module_kwargs
        )
        self.init_params_ = self._get_init_params(locals())


class SVAEPlus(BasePerturbationModel):
    r"""SVAE+ (Lopez et al., 2022): sparse shifts of the prior mean, :math:`z \sim N(m_a \odot \mu_a, I)`.

    :math:`\pi_{tk} \sim \mathrm{Beta}(1, \beta)`, :math:`m_{tk} \sim \mathrm{Bern}(\pi_{tk})`, learned point
    means :math:`\mu_a`, and an encoder :math:`q(z \mid x)` without treatment input. Each cell must carry a
    single treatment: set the data up with ``encode_combinations="unique"`` when it has combinations (each
    combination then is its own treatment, and unseen combinations cannot be predicted).

    Parameters
    ----------
    adata, registry, n_latent, n_hidden, n_layers, n_particles, likelihood
        As for :class:`SAMSVAE`.
    mask_prior_beta
        :math:`\beta` of the Beta(1, β) prior on mask probabilities (2 in the paper's Norman runs).
    **module_kwargs
        Further arguments of :class:`~sams_scvi.module.SAMSModule`.
    """

    _display_name = "SVAE+"
    _one_hot_only = True

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_latent: int = N_LATENT,
        n_hidden: int = N_HIDDEN,
        n_layers: int = N_LAYERS,
        mask_prior_beta: float = 2.0,
        n_particles: int = N_PARTICLES,
        likelihood: Literal["nb", "normal"] = "nb",
        **module_kwargs,
    ) -> None:
        super().__init__(adata, registry)
        self._build_module(
            n_latent,
            n_hidden,
            n_layers,
            n_particles,
            likelihood=likelihood,
            mechanism="sparse_point",
            mask_prior_beta=mask_prior_beta,
            **module_kwargs,
        )
        self.init_params_ = self._get_init_params(locals())
