"""The user-facing scvi-tools machinery shared by SAMS-VAE and its comparison models."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LayerField,
    MuDataCategoricalJointObsField,
    MuDataCategoricalObsField,
    MuDataLayerField,
)
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin, VAEMixin
from scvi.utils import setup_anndata_dsp, track

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi.data._perturbation_field import MuDataPerturbationField, PerturbationField, parse_perturbations
from sams_scvi.module import SAMSModule
from sams_scvi.module._sampling import accumulate_log_normalized

from ._data_splitter import SAMSDataSplitter
from ._training_plan import SAMSTrainingPlan

_ATE_TARGET_SUM = 1e4
# values decoded per ATE chunk: on CPU small enough to stay in cache and reuse allocations (decoding 2,500
# samples at the Replogle shape takes 2.1 s per 78 samples in chunks of 2**26 values, 0.8 s in chunks of 2**21);
# on a GPU large enough to fill it
_ATE_CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**26}
# samples whose globals estimate_ate draws at once (Replogle shape: 2.3 ms per sample one chunk of 2 samples at a
# time, 2.1-2.2 ms in blocks of 4-16, 2.8 ms in blocks of 32)
_ATE_BLOCK_SAMPLES = 8


class BasePerturbationModel(VAEMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """What SAMS-VAE and its comparison models share: registration, training recipe, predictions, metrics.

    Subclasses build a :class:`~sams_scvi.module.SAMSModule` with their ``mechanism`` (how perturbations shift
    the latent space) in ``__init__`` via :meth:`_build_module`; everything else is common.
    """

    _module_cls = SAMSModule
    _training_plan_cls = SAMSTrainingPlan
    _data_splitter_cls = SAMSDataSplitter
    _display_name = "perturbation VAE"
    _one_hot_only = False

    def _build_module(self, n_latent: int, n_hidden: int, n_layers: int, n_particles: int, **module_kwargs) -> None:
        """Create ``self.module`` from the registered data's sizes and the given settings."""
        field_registries = self.registry_["field_registries"]
        n_cats_per_cov = [self.summary_stats.n_batch]
        cat_covs_state = field_registries.get(SAMS_REGISTRY_KEYS.CAT_COVS_KEY, {}).get("state_registry", {})
        n_cats_per_cov += list(cat_covs_state.get("n_cats_per_key", []))
        if self._one_hot_only and self.adata is not None:
            design = sparse.csr_matrix(self.adata_manager.get_from_registry(SAMS_REGISTRY_KEYS.PERTURBATION_KEY))
            if design.getnnz(axis=1).max(initial=0) > 1:
                raise ValueError(
                    f"{self._display_name} needs one treatment per cell, but some cells carry combinations. Set up "
                    f"the data with {type(self).__name__}.setup_anndata(..., encode_combinations='unique'); the "
                    "model then cannot predict unseen combinations."
                )
        if module_kwargs.get("likelihood", "nb") == "nb" and self.adata is not None:
            _check_counts(self.adata_manager.get_from_registry(SAMS_REGISTRY_KEYS.X_KEY))
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_perturbations=self.summary_stats.n_perturbations,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_cats_per_cov=n_cats_per_cov,
            n_particles=n_particles,
            **module_kwargs,
        )
        self._model_summary_string = (
            f"{self._display_name}: {self.summary_stats.n_perturbations} perturbations, n_latent={n_latent}, "
            f"n_hidden={n_hidden}, n_layers={n_layers}, n_particles={n_particles}, "
            + ", ".join(f"{k}={v}" for k, v in module_kwargs.items())
        )

    # ------------------------------------------------------------------ registration
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        perturbation_key: str,
        control_value: str = "control",
        delimiter: str = "+",
        dosage_key: str | None = None,
        layer: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        encode_combinations: Literal["additive", "unique"] = "additive",
        **kwargs,
    ) -> None:
        """%(summary)s.

        Parses ``adata.obs[perturbation_key]`` into a cells x perturbations design matrix (written to
        ``adata.obsm["_scvi_perturbation"]``); nothing else of ``adata`` is changed beyond scvi-tools' usual
        registration entries.

        Parameters
        ----------
        %(param_adata)s
        perturbation_key
            Column of ``adata.obs`` with one label per cell: ``control_value``, a perturbation (``"A"``) or a
            combination (``"A+B"``).
        control_value
            Label of unperturbed cells.
        delimiter
            Separator of combinations.
        dosage_key
            Optional column of ``adata.obs`` with dosages matching the labels (``"1+0.5"``).
        %(param_layer)s
        %(param_batch_key)s
        %(param_cat_cov_keys)s
        encode_combinations
            ``"additive"`` (default): a combination's design row is the sum of its perturbations' rows, so
            unseen combinations of seen perturbations can be predicted. ``"unique"``: every distinct label is
            its own treatment (one-hot; required by :class:`~sams_scvi.SVAEPlus`, the paper's
            ``encode_combos_as_unique``).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        _check_finite(adata.layers[layer] if layer is not None else adata.X)
        fields = [
            # counts are checked by the model, which knows its likelihood (raw counts for "nb")
            LayerField(SAMS_REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            CategoricalObsField(SAMS_REGISTRY_KEYS.BATCH_KEY, batch_key),
            PerturbationField(
                SAMS_REGISTRY_KEYS.PERTURBATION_KEY,
                perturbation_key,
                control_value,
                delimiter,
                dosage_key,
                encode_combinations,
            ),
            CategoricalJointObsField(SAMS_REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
        ]
        cls._register(adata, fields, setup_method_args, **kwargs)

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        perturbation_key: str,
        control_value: str = "control",
        delimiter: str = "+",
        dosage_key: str | None = None,
        rna_layer: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        encode_combinations: Literal["additive", "unique"] = "additive",
        modalities: dict[str, str] | None = None,
        **kwargs,
    ) -> None:
        """Set up a MuData whose RNA modality holds the raw counts.

        Parameters are those of :meth:`setup_anndata`, plus ``modalities``, which maps argument names to
        modality names, e.g. ``{"rna_layer": "rna", "perturbation_key": "rna"}``. An argument without an entry
        is read from ``mdata`` itself (``mdata.obs``).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if modalities is None:
            raise ValueError("`modalities` must name at least the RNA modality, e.g. {'rna_layer': 'rna'}.")
        modalities = cls._create_modalities_attr_dict(modalities, setup_method_args)
        rna = mdata.mod[modalities.rna_layer] if modalities.rna_layer is not None else mdata
        _check_finite(rna.layers[rna_layer] if rna_layer is not None else rna.X)
        fields = [
            MuDataLayerField(SAMS_REGISTRY_KEYS.X_KEY, rna_layer, mod_key=modalities.rna_layer, is_count_data=False),
            MuDataCategoricalObsField(SAMS_REGISTRY_KEYS.BATCH_KEY, batch_key, mod_key=modalities.batch_key),
            MuDataPerturbationField(
                SAMS_REGISTRY_KEYS.PERTURBATION_KEY,
                perturbation_key,
                control_value,
                delimiter,
                dosage_key,
                encode_combinations,
                mod_key=modalities.perturbation_key,
            ),
            MuDataCategoricalJointObsField(
                SAMS_REGISTRY_KEYS.CAT_COVS_KEY,
                categorical_covariate_keys,
                mod_key=modalities.categorical_covariate_keys,
            ),
        ]
        cls._register(mdata, fields, setup_method_args, **kwargs)

    @classmethod
    def _register(cls, data, fields: list, setup_method_args: dict, **kwargs) -> None:
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(data, **kwargs)
        state = adata_manager.get_state_registry(SAMS_REGISTRY_KEYS.PERTURBATION_KEY)
        if state["n_control_cells"] == 0:
            warnings.warn(
                f"No cells are labelled {state['control_value']!r}: the model can be trained, but average treatment "
                "effects (estimate_ate) need control cells to define the unperturbed state.",
                UserWarning,
                stacklevel=4,
            )
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        lr: float = 1e-3,
        batch_size: int = 512,
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = False,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train with Adam on the plated ELBO (spec §3).

        Parameters
        ----------
        max_epochs
            Number of passes through the training cells; ``None`` uses scvi-tools' heuristic.
        lr
            Adam learning rate (the paper's sweeps use 3e-4 over 30k-150k steps; 1e-3 is the reference demo's
            value, chosen here for the shorter runs a CPU affords).
        batch_size
            Cells per minibatch (512 in the paper).
        train_size, validation_size
            Fractions of cells for training and validation; pass
            ``datasplitter_kwargs={"external_indexing": [train, val, test]}`` for a fixed split, e.g. from
            :func:`sams_scvi.metrics.combination_split` (cells in none of the three are not used).
        early_stopping
            Stop when the validation ELBO stops improving (validation is then run every epoch).
        accelerator, devices
            Lightning device selection (``"auto"`` uses a GPU when one is present).
        plan_kwargs
            Arguments of :class:`~sams_scvi.model.SAMSTrainingPlan` (e.g. ``global_lr_factor``, ``align_at``,
            ``mask_hold``, whose defaults come from the model's ``recipe``) and :class:`scvi.train.TrainingPlan`.
            Defaults here differ from scvi-tools' where the paper does: Adam ``eps=1e-8`` (scvi's 0.01 would
            swamp the small per-step gradients of the global variables), ``weight_decay=1e-6``, and **no KL
            warm-up** (``n_epochs_kl_warmup=None``).
        datasplitter_kwargs
            Arguments of :class:`scvi.dataloaders.DataSplitter`.
        **trainer_kwargs
            Arguments of :class:`scvi.train.Trainer` / Lightning (e.g. ``enable_progress_bar``,
            ``check_val_every_n_epoch``, ``gradient_clip_val``).
        """
        plan_kwargs = {
            "lr": lr,
            "eps": 1e-8,
            "weight_decay": 1e-6,
            "n_epochs_kl_warmup": None,
            "n_steps_kl_warmup": None,
            **getattr(self, "_recipe_plan_kwargs", {}),
            **(plan_kwargs or {}),
        }
        if early_stopping:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        # Adam's weight decay drives weights on all-zero inputs into float32 denormals, which are ~5x slower
        # on CPUs (spec §9.4); flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)
        return super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            early_stopping=early_stopping,
            plan_kwargs=plan_kwargs,
            datasplitter_kwargs=datasplitter_kwargs,
            **trainer_kwargs,
        )

    # ------------------------------------------------------------------ helpers
    @property
    def _perturbation_state(self) -> dict:
        return self.registry_["field_registries"][SAMS_REGISTRY_KEYS.PERTURBATION_KEY]["state_registry"]

    @property
    def perturbations(self) -> list[str]:
        """The atomic perturbations the model knows (columns of the design matrix)."""
        return list(self._perturbation_state["vocabulary"])

    @property
    def _gene_names(self) -> pd.Index:
        return pd.Index(self.registry_["field_registries"][SAMS_REGISTRY_KEYS.X_KEY]["state_registry"]["column_names"])

    def _design_for(self, labels: Sequence[str]) -> torch.Tensor:
        """Dense design rows (len(labels), T) for perturbation labels, with the training vocabulary."""
        state = self._perturbation_state
        design, _ = parse_perturbations(
            list(labels),
            control_value=state["control_value"],
            delimiter=state["delimiter"],
            vocabulary=state["vocabulary"],
            label_source="`perturbations`",
            unique_combinations=state.get("encode_combinations") == "unique",
        )
        untrained = np.asarray(self.module.train_perturbation_counts.cpu() == 0)
        if self.is_trained_ and untrained.any():
            unseen = [label for label, row in zip(labels, design, strict=True) if untrained[row.indices].any()]
            if unseen:
                warnings.warn(
                    f"{len(unseen)} requested labels (e.g. {unseen[:3]}) involve treatments without training cells; "
                    "their effect is the untrained initial value, not a prediction"
                    + (
                        ". With encode_combinations='unique' a combination is a treatment of its own, so unseen "
                        "combinations cannot be predicted."
                        if state.get("encode_combinations") == "unique"
                        else "."
                    ),
                    UserWarning,
                    stacklevel=4,  # the caller of estimate_ate / predict_perturbation (through inference_mode)
                )
        return torch.as_tensor(design.toarray(), device=self.device)

    def _validate_anndata(self, adata=None, copy_if_view: bool = True):
        adata = super()._validate_anndata(adata, copy_if_view=copy_if_view)
        _check_gene_names(self._gene_names, adata, self.registry_)
        return adata

    @classmethod
    def load(cls, dir_path: str, adata=None, **kwargs):
        """Load a saved model; ``adata`` must hold the same genes, in the same order, as the training data.

        See :meth:`scvi.model.base.BaseModelClass.load` for the arguments.
        """
        if adata is not None and adata is not False:
            registry = cls.load_registry(dir_path, prefix=kwargs.get("prefix"))
            genes = registry["field_registries"][SAMS_REGISTRY_KEYS.X_KEY]["state_registry"]["column_names"]
            _check_gene_names(pd.Index(genes), adata, registry)
        return super().load(dir_path, adata=adata, **kwargs)

    def _sample_covariates(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """Covariate codes of random registered cells, shape (*shape, J), to marginalise covariates out."""
        if self.adata is None:
            return None
        codes = []
        manager = self.adata_manager
        for key in (SAMS_REGISTRY_KEYS.BATCH_KEY, SAMS_REGISTRY_KEYS.CAT_COVS_KEY):
            if key in manager.data_registry:
                value = manager.get_from_registry(key)
                codes.append(
                    np.asarray(value.to_numpy() if isinstance(value, pd.DataFrame) else value).reshape(len(value), -1)
                )
        if not codes or self.module.decoder_covariates.is_empty:
            return None
        codes = np.concatenate(codes, axis=1)
        cells = np.random.randint(0, codes.shape[0], size=int(np.prod(shape)))
        return torch.as_tensor(codes[cells].reshape(*shape, codes.shape[1]), device=self.device)

    # ------------------------------------------------------------------ latent space
    @torch.inference_mode()
    def get_latent(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        representation: Literal["basal", "perturbed"] = "basal",
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Posterior-mean latent state of each cell, shape (cells, n_latent).

        ``"basal"`` is :math:`E[z_b \\mid x]`, the cell without its perturbation; ``"perturbed"`` adds the
        cell's offset :math:`d_i (M \\odot E)` (the two coincide for the conditional VAE, which has no latent
        shift). Globals are at their posterior point estimate (mask mode,
        embedding mean), so the result is deterministic.
        """
        if representation not in ("basal", "perturbed"):
            raise ValueError("`representation` must be 'basal' or 'perturbed'.")
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        globals_ = self.module.point_globals()
        latents = []
        for tensors in self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size):
            out = self.module.infer_cells(tensors, globals_)
            z = out["basal_mean"][0]  # one particle: the globals are at their point estimate
            if representation == "perturbed":
                z = self.module.compose(z, out["offset"][0])
            latents.append(z.cpu().numpy())
        return np.concatenate(latents)

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Basal latent representation (as :meth:`get_latent` with ``representation="basal"``)."""
        if kwargs.get("give_mean", True) is False or kwargs.get("return_dist", False):
            raise NotImplementedError(f"{type(self).__name__} returns posterior means; use get_latent.")
        return self.get_latent(adata, indices, representation="basal", batch_size=batch_size)

    @torch.inference_mode()
    def get_mask_probabilities(self) -> pd.DataFrame:
        """Posterior probability :math:`q(m_{tk} = 1)` that perturbation ``t`` acts on latent dimension ``k``."""
        if not self.module.mechanism.has_mask:
            raise ValueError(f"{self._display_name} has no masks.")
        probs = torch.sigmoid(self.module.mask_logits).detach().cpu().numpy()
        return pd.DataFrame(
            probs, index=pd.Index(self.perturbations, name="perturbation"), columns=_latent_names(probs.shape[1])
        )

    @torch.inference_mode()
    def get_penetrance(self) -> pd.Series:
        """Estimated probability :math:`\\pi_t` that a cell responds to perturbation ``t`` (``penetrance=True``)."""
        if not self.module.models_penetrance:
            raise ValueError(f"{self._display_name} was built without `penetrance=True`.")
        values = torch.sigmoid(self.module.penetrance_logit).cpu().numpy()
        return pd.Series(values, index=pd.Index(self.perturbations, name="perturbation"), name="penetrance")

    @torch.inference_mode()
    def get_response_probability(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Posterior probability :math:`q(u_{it} = 1 \\mid x_i)` that cell ``i`` responds to its perturbation ``t``.

        For a model with ``penetrance=True``; globals at their point estimate. Returns cells x perturbations, NaN
        where the cell does not carry the perturbation (a classification of responders and escapers, as
        Mixscape's, from the model's own likelihood).
        """
        if not self.module.models_penetrance:
            raise ValueError(f"{self._display_name} was built without `penetrance=True`.")
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        globals_ = self.module.point_globals()
        blocks = []
        for tensors in self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size):
            probability = self.module.infer_cells(tensors, globals_)["response_probability"][0]
            carried = tensors[SAMS_REGISTRY_KEYS.PERTURBATION_KEY].to(probability.device) != 0
            blocks.append(torch.where(carried, probability, torch.nan).cpu().numpy())
        positions = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        return pd.DataFrame(
            np.concatenate(blocks),
            index=adata.obs_names[positions],
            columns=pd.Index(self.perturbations, name="perturbation"),
        )

    @torch.inference_mode()
    def get_perturbation_embeddings(self) -> pd.DataFrame:
        """Posterior point estimate of each perturbation's latent shift :math:`m_t \\odot e_t` (perturbations x K)."""
        if not self.module.mechanism.has_shift:
            raise ValueError(f"{self._display_name} has no latent perturbation shifts.")
        shift = self.module.point_globals()["shift"][0].cpu().numpy()
        return pd.DataFrame(
            shift, index=pd.Index(self.perturbations, name="perturbation"), columns=_latent_names(shift.shape[1])
        )

    # ------------------------------------------------------------------ predictions
    @torch.inference_mode()
    def predict_perturbation(
        self,
        perturbations: Sequence[str] | None = None,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        expression: Literal["normalized", "counts"] = "normalized",
        target_sum: float = 1e4,
        n_samples: int = 20,
        batch_size: int | None = None,
        seed: int | None = 0,
        progress_bar: bool = True,
    ) -> AnnData:
        """Counterfactual expression of source cells under chosen perturbations.

        Each source cell's basal state is inferred from its counts (and its own perturbation), then every
        requested perturbation's shift :math:`d (M \\odot E)` is applied and decoded. With ``penetrance``, the
        source cell's own response is inferred too, and each requested perturbation acts with probability
        :math:`\\pi_t` per draw. Combinations never
        observed in training are allowed as long as their atomic perturbations were seen.

        Parameters
        ----------
        perturbations
            Labels to apply, e.g. ``["A", "A+B", "control"]``. Default: the control label followed by every
            label observed in the training data.
        adata
            Data holding the source cells; default, the registered AnnData.
        indices
            Source cells (positions in ``adata``). Default: the control cells.
        expression
            ``"normalized"``: posterior mean of the expression proportions times ``target_sum`` (as after
            :func:`scanpy.pp.normalize_total`; with ``likelihood="normal"``, the posterior mean on the data's own
            scale). ``"counts"``: one posterior-predictive draw (negative binomial, or normal) at
            the source cell's observed library size.
        target_sum
            Total per cell for ``"normalized"``.
        n_samples
            Posterior samples (of the globals and of the basal state) averaged for ``"normalized"``.
        batch_size
            Source cells per minibatch.
        seed
            Seed of the sampling (``None``: do not reseed); the global random state is left untouched.
        progress_bar
            Show a progress bar.

        Returns
        -------
        AnnData with one row per (source cell, perturbation): ``obs_names`` ``"<cell>_<label>"``, the source
        cell's ``obs`` columns with ``obs[perturbation_key]`` set to the applied label (same delimiter and
        control label as the training data, so scanpy and pertpy read it directly), ``obs["source_cell"]``,
        and ``var`` of the source data.
        """
        if expression not in ("normalized", "counts"):
            raise ValueError("`expression` must be 'normalized' or 'counts'.")
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        state = self._perturbation_state
        perturbation_key = self.registry_["setup_args"]["perturbation_key"]
        if perturbations is None:
            perturbations = [state["control_value"], *state["observed_labels"]]
        perturbations = [str(p) for p in perturbations]
        if len(perturbations) == 0:
            raise ValueError("`perturbations` is empty.")
        target_design = self._design_for(perturbations)  # (P, T)
        if indices is None:
            design = self.adata_manager.get_from_registry(SAMS_REGISTRY_KEYS.PERTURBATION_KEY)
            indices = np.flatnonzero(np.asarray(sparse.csr_matrix(design).getnnz(axis=1)) == 0)
            if len(indices) == 0:
                raise ValueError("`adata` has no control cells to use as source cells; pass `indices`.")
        indices = np.asarray(indices)
        n_draws = 1 if expression == "counts" else n_samples

        blocks = []
        with _seeded(seed, self.device):
            globals_ = self.module.sample_globals(n_draws, with_kl=False)
            loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
            for tensors in track(loader, description="Predicting perturbations", disable=not progress_bar):
                out = self.module.infer_cells(tensors, globals_)
                shifts = self.module.sample_offset(target_design, globals_["shift"], n_cells=len(out["library"]))
                z = self.module.compose(out["z_basal"][:, :, None, :], shifts)  # (S, n, P, K)
                covariates = self.module.covariate_codes(tensors)
                if covariates is not None:
                    covariates = covariates[:, None, :].expand(-1, len(perturbations), -1)
                library = out["library"][:, None].expand(-1, len(perturbations))
                gen = self.module.generative(z, library, covariates, design=target_design)
                if expression == "counts":
                    values = self.module.sample_observations(gen)[0]
                elif self.module.likelihood == "normal":
                    values = gen["mean"].mean(0)
                else:
                    values = gen["rho"].mean(0) * target_sum
                blocks.append(values.reshape(-1, values.shape[-1]).cpu().numpy())

        columns = [c for c in adata.obs.columns if not str(c).startswith("_scvi")]
        obs = adata.obs.iloc[np.repeat(indices, len(perturbations))][columns].copy()
        obs["source_cell"] = obs.index.astype(str)
        labels = np.tile(np.asarray(perturbations, dtype=object), len(indices))
        obs[perturbation_key] = pd.Categorical(labels, categories=list(dict.fromkeys(perturbations)))
        obs.index = pd.Index([f"{c}_{p}" for c, p in zip(obs["source_cell"], labels, strict=True)])
        var = pd.DataFrame(index=self._gene_names.copy())
        return AnnData(
            X=np.concatenate(blocks).astype(np.float32),
            obs=obs,
            var=var,
            uns={
                "sams_scvi": {
                    "perturbation_key": perturbation_key,
                    "control_value": state["control_value"],
                    "delimiter": state["delimiter"],
                    "expression": expression,
                    "n_samples": n_draws,
                }
            },
        )

    @torch.inference_mode()
    def estimate_ate(
        self,
        perturbations: Sequence[str] | None = None,
        n_samples: int = 2500,
        library_size: float | Literal["median"] = _ATE_TARGET_SUM,
        basal: Literal["prior", "control"] = "prior",
        batch_size: int = 250,
        seed: int | None = 0,
        progress_bar: bool = True,
    ) -> AnnData:
        r"""Average treatment effects of perturbations against the control, on the paper's scale.

        For each posterior sample of the globals, a basal state is drawn, shifted by each condition's
        :math:`d\,(M \odot E)` (with ``penetrance``, each perturbation acting with probability :math:`\pi_t`),
        decoded, and counts are drawn at a fixed library size; each sample is put on the
        scale :math:`y = \log_2(1 + 10^4 x / \sum_g x_g)`, and
        :math:`\mathrm{ATE}_t = \bar y_t - \bar y_{\mathrm{control}}`. The basal state comes from

        * ``basal="prior"`` (the paper's estimator): :math:`z_b \sim N(0, I)`, drawn afresh for the control and
          for each perturbation; registered covariates are marginalised over the registered cells;
        * ``basal="control"``: :math:`z_b \sim q(z_b \mid x_i)` of a random registered control cell :math:`i`,
          shared by the control and every perturbation of that sample (a paired counterfactual of the observed
          control population, with that cell's covariates). It reads the effect where the control cells
          actually lie rather than where the prior puts them; see ``docs/model.md``.

        Parameters
        ----------
        perturbations
            Labels to evaluate (observed or unseen combinations of known perturbations). Default: every
            non-control label observed in the training data.
        n_samples
            Monte-Carlo samples (2,500 in the paper).
        library_size
            Library size of the sampled counts: ``1e4`` as in the paper, or ``"median"`` for the median observed
            library of the registered cells, which matches shallow data better (spec §9.6).
        basal
            Where the basal states come from: ``"prior"`` or ``"control"`` (above).
        batch_size
            Most samples decoded per chunk; fewer when ``batch_size x (perturbations + 1) x genes`` would exceed
            about 2 million values on CPU (cache-sized chunks are fastest there) or 67 million on a GPU.
        seed
            Seed of the sampling (``None``: do not reseed); the global random state is left untouched.
        progress_bar
            Show a progress bar.

        Returns
        -------
        AnnData (perturbations x genes): ``X`` the ATE, ``layers["mc_se"]`` its Monte-Carlo standard error,
        ``obs["n_cells"]`` the number of registered cells with that label (0 for unseen combinations), and
        ``uns["control"]``. ``ate.to_df()`` gives the table. With ``likelihood="normal"`` the ATE is on the data's
        own scale: the difference of the decoded means (the expectation over the noise), and ``library_size`` is
        not used.
        """
        self._check_if_trained(warn=False)
        state = self._perturbation_state
        if state["n_control_cells"] == 0:
            raise ValueError(
                "The training data has no control cells: the ATE compares each perturbation with the unperturbed "
                "(control) state, which the model can only learn from control cells. Register data with cells "
                f"labelled {state['control_value']!r}."
            )
        if perturbations is None:
            perturbations = list(state["observed_labels"])
        perturbations = [str(p) for p in perturbations]
        if len(perturbations) == 0:
            raise ValueError("`perturbations` is empty.")
        design = self._design_for([state["control_value"], *perturbations])  # (P + 1, T), control first
        library = self._ate_library_size(library_size) if self.module.likelihood == "nb" else 1.0
        n_conditions = design.shape[0]
        if basal not in ("prior", "control"):
            raise ValueError("`basal` must be 'prior' or 'control'.")

        device = self.device
        sums = torch.zeros(n_conditions, self.module.n_input, dtype=torch.float64, device=device)
        diff_sq = torch.zeros(n_conditions - 1, self.module.n_input, dtype=torch.float64, device=device)
        # memory-bounded: decoded in chunks of at most ~2**21 (CPU: cache-sized) or ~2**26 (GPU, 256 MB per float32
        # tensor) values; the globals for a block of several chunks at once (fewer small tensor operations)
        chunk_elements = _ATE_CHUNK_ELEMENTS.get(device.type, _ATE_CHUNK_ELEMENTS["cuda"])
        per_chunk = max(1, min(batch_size, chunk_elements // (n_conditions * self.module.n_input)))
        per_block = per_chunk * max(1, _ATE_BLOCK_SAMPLES // per_chunk)
        blocks = [min(per_block, n_samples - start) for start in range(0, n_samples, per_block)]
        with _seeded(seed, device):
            # inside the seeded block: the encoder's draws must not advance the caller's random state
            control_posterior = self._control_basal_posterior() if basal == "control" else None
            for block in track(blocks, description="Estimating ATEs", disable=not progress_bar):
                globals_ = self.module.sample_globals(block, with_kl=False)
                offset = self.module.sample_offset(design, globals_["shift"])  # (block, P+1, K)
                if control_posterior is None:
                    z = self.module.compose(torch.randn_like(offset), offset)
                    covariates = self._sample_covariates((block, n_conditions))
                else:
                    z, covariates = self._control_basal_draws(control_posterior, offset)
                library_sizes = torch.full((per_chunk, n_conditions), library, device=device)
                for start in range(0, block, per_chunk):
                    chunk = slice(start, min(start + per_chunk, block))
                    gen = self.module.generative(
                        z[chunk],
                        library_sizes[: chunk.stop - start],
                        None if covariates is None else covariates[chunk],
                        design=design,
                    )
                    if self.module.likelihood == "normal":
                        _accumulate_means(gen["mean"], sums, diff_sq)
                    else:
                        accumulate_log_normalized(gen["mu"], gen["theta"], _ATE_TARGET_SUM, sums, diff_sq)
        means = sums / n_samples
        ate = means[1:] - means[:1]
        variance = (diff_sq / n_samples - ate**2).clamp(min=0) * n_samples / max(n_samples - 1, 1)
        standard_error = (variance / n_samples).sqrt()

        n_cells = self._label_counts()
        obs = pd.DataFrame(
            {"n_cells": [int(n_cells.get(p, 0)) for p in perturbations]},
            index=pd.Index(perturbations, name="perturbation"),
        )
        return AnnData(
            X=ate.float().cpu().numpy(),
            obs=obs,
            var=pd.DataFrame(index=self._gene_names.copy()),
            layers={"mc_se": standard_error.float().cpu().numpy()},
            uns={
                "control": state["control_value"],
                "n_samples": n_samples,
                **({} if self.module.likelihood == "normal" else {"library_size": float(library)}),
                "basal": basal,
                "scale": "data" if self.module.likelihood == "normal" else "log2(1 + 1e4 * x / sum(x))",
            },
        )

    @torch.inference_mode()
    def _control_basal_posterior(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Location and scale of :math:`q(z_b \\mid x_i)` (n_control, K) of the control cells, and their covariates.

        A control cell has no offset, so its basal posterior does not depend on the globals. The covariate codes
        are ``None`` when the decoder has no covariates.
        """
        if self.adata is None:
            raise ValueError("basal='control' needs the registered AnnData (its control cells).")
        design = sparse.csr_matrix(self.adata_manager.get_from_registry(SAMS_REGISTRY_KEYS.PERTURBATION_KEY))
        controls = np.flatnonzero(design.getnnz(axis=1) == 0)
        globals_ = self.module.point_globals()
        locs, scales, codes = [], [], []
        for tensors in self._make_data_loader(adata=self.adata, indices=controls, batch_size=1024):
            out = self.module.inference(**self.module._get_inference_input(tensors), global_samples=globals_)
            qz = out["qz"]
            scale = qz.scale if qz.scale.dim() == 2 else qz.scale[0]
            locs.append(self.module.basal_mean(out)[0])
            scales.append(scale)
            covariates = self.module.covariate_codes(tensors)
            if covariates is not None and not self.module.decoder_covariates.is_empty:
                codes.append(covariates.to(scale.device))  # the loader's tensors stay on the CPU
        return torch.cat(locs), torch.cat(scales), (torch.cat(codes) if codes else None)

    def _control_basal_draws(
        self,
        control_posterior: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        offset: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per sample, one random control cell's :math:`z_b \\sim q(z_b \\mid x_i)` plus each condition's offset.

        Returns the latents (S, P, K) and that cell's covariates (S, P, J) or ``None``.
        """
        loc, scale, codes = control_posterior
        cells = torch.randint(loc.shape[0], (offset.shape[0],), device=loc.device)
        basal = torch.randn_like(loc[cells]).mul_(scale[cells]).add_(loc[cells])
        z = self.module.compose(basal[:, None, :], offset)
        covariates = None if codes is None else codes[cells][:, None, :].expand(-1, offset.shape[1], -1)
        return z, covariates

    def _ate_library_size(self, library_size: float | str) -> float:
        if library_size == "median":
            if self.adata is None:
                raise ValueError("library_size='median' needs the registered AnnData.")
            x = self.adata_manager.get_from_registry(SAMS_REGISTRY_KEYS.X_KEY)
            return float(np.median(np.asarray(x.sum(1)).ravel()))
        if isinstance(library_size, str) or library_size <= 0:
            raise ValueError("`library_size` must be a positive number or 'median'.")
        return float(library_size)

    def _label_counts(self) -> pd.Series:
        """Registered cells per label (empty when the model was loaded without data)."""
        key = self.registry_["setup_args"]["perturbation_key"]
        if self.adata is None or key not in self.adata.obs:
            return pd.Series(dtype=int)
        return self.adata.obs[key].astype(str).str.strip().value_counts()

    # ------------------------------------------------------------------ likelihood bounds
    @torch.inference_mode()
    def get_elbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        n_samples: int = 5,
        seed: int | None = 0,
        **kwargs,
    ) -> float:
        """Evidence lower bound per cell (nats; higher is better), global KL terms included.

        :math:`\\frac{1}{n}\\big[\\sum_i E_q(\\log p(x_i \\mid z_i) + \\log p(z^b_i) - \\log q(z^b_i))
        - \\sum_{t \\text{ present}} \\mathrm{KL}_t\\big]`, with ``n_samples`` global samples shared by all cells.
        """
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        local_terms, present = [], None
        with _seeded(seed, self.device):
            globals_ = self.module.sample_globals(n_samples)
            for tensors in self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size):
                log_w = self._log_weights(tensors, globals_)
                local_terms.append(log_w.mean(0).cpu())
                seen = (tensors[SAMS_REGISTRY_KEYS.PERTURBATION_KEY] != 0).any(0).cpu()
                present = seen if present is None else present | seen
        local = torch.cat(local_terms)
        global_kl = globals_["kl"].mean(0).cpu()[present].sum()
        return float(local.mean() - global_kl / len(local))

    @torch.inference_mode()
    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_mc_samples: int = 100,
        batch_size: int | None = None,
        return_mean: bool = True,
        seed: int | None = 0,
        n_samples_per_pass: int = 25,
        **kwargs,
    ) -> float | np.ndarray:
        """Importance-weighted ELBO (the paper's IWELBO) of held-out cells, in nats per cell.

        The globals are drawn once from :math:`q` (``n_mc_samples`` samples) and shared by all cells; only the
        basal state is importance-weighted: :math:`\\log \\frac{1}{S}\\sum_s \\exp[\\log p(x \\mid z^{(s)})
        + \\log p(z^{b(s)}) - \\log q(z^{b(s)} \\mid \\cdot)]` (spec §5.1). Samples are decoded
        ``n_samples_per_pass`` at a time, so memory is bounded by ``n_samples_per_pass x batch_size x genes``.
        Returns the mean over cells, or per-cell values (``return_mean=False``).
        """
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        values = []
        with _seeded(seed, self.device):
            globals_ = self.module.sample_globals(n_mc_samples)
            for tensors in self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size):
                log_w = torch.cat(
                    [
                        self._log_weights(
                            tensors, {k: v[start : start + n_samples_per_pass] for k, v in globals_.items()}
                        )
                        for start in range(0, n_mc_samples, n_samples_per_pass)
                    ]
                )
                values.append((torch.logsumexp(log_w, 0) - np.log(n_mc_samples)).cpu().numpy())
        values = np.concatenate(values)
        return float(values.mean()) if return_mean else values

    def _log_weights(self, tensors: dict[str, torch.Tensor], globals_: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-particle local log-weights :math:`\\log p(x \\mid z) + \\log p(z_b) - \\log q(z_b)`, shape (S, n)."""
        inference_outputs, generative_outputs = self.module(
            tensors, inference_kwargs={"global_samples": globals_}, compute_loss=False
        )
        log_likelihood, kl_basal = self.module.local_terms(tensors, inference_outputs, generative_outputs)
        branches = inference_outputs.get("branches")
        if branches is None:
            return log_likelihood - kl_basal
        # p(x) = sum_u pi(u) p(x | u), each p(x | u) importance-sampled by its own q(z_b | x, u)
        n_cells = tensors[SAMS_REGISTRY_KEYS.PERTURBATION_KEY].shape[0]
        return self.module.combine_branches(log_likelihood - kl_basal, branches, n_cells)[0]


def _accumulate_means(mean: torch.Tensor, sums: torch.Tensor, diff_sq: torch.Tensor) -> None:
    """Add the sums over samples of decoded means (S, C, G) to ``sums`` and of squared contrasts to ``diff_sq``."""
    mean = mean.to(sums.dtype)
    sums += mean.sum(0)
    diff_sq += mean[:, 1:].sub(mean[:, :1]).square().sum(0)


def _latent_names(n: int) -> pd.Index:
    return pd.Index([f"latent_{k}" for k in range(n)], name="latent")


def _check_finite(x) -> None:
    """Raise on NaN or infinite values."""
    values = x.data if sparse.issparse(x) else np.asarray(x)
    if values.size and not np.all(np.isfinite(values)):
        raise ValueError("The expression matrix has NaN or infinite values.")


def _check_counts(x) -> None:
    """Raise on negative values and warn on non-integers: the negative binomial models raw counts."""
    values = x.data if sparse.issparse(x) else np.asarray(x)
    if values.size == 0:
        return
    if np.min(values) < 0:
        raise ValueError(
            "The count matrix has negative values; the negative binomial likelihood models raw UMI counts. For "
            "normalised or scaled data, create the model with likelihood='normal'."
        )
    sample = values.ravel()[:: max(1, values.size // 100_000)]  # scvi-tools checks a sample too
    if not np.all(sample == np.round(sample)):
        warnings.warn(
            "The data are not integers, as unnormalized count data would be; the negative binomial likelihood "
            "models raw UMI counts. For normalised data, create the model with likelihood='normal'.",
            UserWarning,
            stacklevel=4,
        )


def _check_gene_names(genes: pd.Index, adata, registry: dict) -> None:
    """Raise a clear error when ``adata`` does not hold the model's genes in the same order."""
    mod_key = registry["field_registries"][SAMS_REGISTRY_KEYS.X_KEY]["data_registry"].get("mod_key")
    target = adata.mod[mod_key] if mod_key is not None else adata
    var_names = pd.Index(target.var_names)
    if len(var_names) != len(genes) or not var_names.equals(genes):
        missing = genes.difference(var_names)
        raise ValueError(
            f"The data has {len(var_names)} genes but the model was trained on {len(genes)}"
            + (f"; {len(missing)} model genes are missing (e.g. {list(missing[:5])})" if len(missing) else "")
            + ". Subset and order the data to the model's genes: adata[:, model_genes]."
        )


class _seeded:
    """Context manager: reseed torch (and numpy) inside, restore the caller's random state afterwards."""

    def __init__(self, seed: int | None, device: torch.device | str) -> None:
        self.seed = seed
        self.devices = [device] if torch.device(device).type == "cuda" else []

    def __enter__(self):
        if self.seed is None:
            return self
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        self._np_state = np.random.get_state()
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        return self

    def __exit__(self, *exc):
        if self.seed is None:
            return False
        np.random.set_state(self._np_state)
        return self._fork.__exit__(*exc)
