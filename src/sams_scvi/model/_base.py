"""The user-facing scvi-tools machinery shared by SAMS-VAE and its comparison models."""

from __future__ import annotations

import hashlib
import inspect
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scvi
import torch
from anndata import AnnData
from scipy import sparse
from scvi.data import AnnDataManager
from scvi.data._utils import _assign_adata_uuid
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LayerField,
    MuDataCategoricalJointObsField,
    MuDataCategoricalObsField,
    MuDataLayerField,
)
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin, VAEMixin
from scvi.utils import setup_anndata_dsp

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi._logging import logger, quiet_dependencies
from sams_scvi._utils import (
    _as_positions,
    _check_counts,
    _check_finite,
    _check_gene_names,
    _check_number,
    _check_obs_keys,
    _check_positive,
    _layer,
    _warn_duplicate_genes,
)
from sams_scvi.data._label_checks import control_candidates, label_warnings
from sams_scvi.data._perturbation_field import (
    MuDataPerturbationField,
    MuDataPerturbationLabelsField,
    PerturbationField,
    PerturbationLabelsField,
    label_text,
    parse_perturbations,
)
from sams_scvi.module import SAMSModule

from ._ate import TreatmentEffectMixin
from ._checkpoint import InterruptWatch, ResumableCheckpoint, checkpoint_settings, settings_differences
from ._convergence import training_convergence, warn_if_unsettled
from ._cpu_memory import flush_denormals, reuse_freed_memory
from ._data_splitter import SAMSDataSplitter
from ._expression import ExpressionMixin
from ._latent import LatentMixin
from ._mechanism import MechanismMixin
from ._minify import MinifyMixin
from ._prediction import PredictionMixin
from ._query import QueryMixin
from ._save_load import SaveLoadMixin
from ._schedule import default_batch_size, default_max_epochs, typical_cells_per_perturbation
from ._training_plan import SAMSTrainingPlan


def _check_perturbation_key(perturbation_key) -> None:
    if not isinstance(perturbation_key, str) or not perturbation_key:
        raise TypeError(
            f"perturbation_key is required: the name of the adata.obs column with each cell's perturbation label "
            f"(e.g. perturbation_key='perturbation'), not {perturbation_key!r}."
        )


def _check_plan_kwargs(plan_cls, module, plan_kwargs: dict | None) -> None:
    """Raise on ``plan_kwargs`` keys that neither the training plan nor the module's loss takes."""
    known = set()
    for function in (plan_cls.__init__, *(cls.__init__ for cls in plan_cls.__mro__[1:] if cls is not object)):
        parameters = inspect.signature(function).parameters.values()
        known.update(p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    loss = inspect.signature(module.loss).parameters.values()  # scvi-tools passes the rest on to module.loss
    if any(p.kind is p.VAR_KEYWORD for p in loss):
        return
    known.update(p.name for p in loss)
    known -= {"self", "module", "tensors", "inference_outputs", "generative_outputs"}
    unknown = sorted(set(plan_kwargs or {}) - known)
    if unknown:
        raise TypeError(
            f"Unknown plan_kwargs {unknown}: neither {plan_cls.__name__} nor scvi-tools' TrainingPlan takes them. "
            f"Valid keys: {sorted(known)}."
        )


def _registration_copy(adata: AnnData) -> AnnData:
    """A new AnnData holding ``adata``'s matrices (not copied) with its own obs, var, obsm and uns.

    scvi-tools' registration writes into these, so a reading method given data that was never set up leaves it as
    it was; the expression matrices, the large part, are shared rather than copied.
    """
    copy = AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        layers=dict(adata.layers.items()),
        obsm=dict(adata.obsm.items()),
        uns={key: value for key, value in adata.uns.items() if not str(key).startswith("_scvi")},
    )
    _assign_adata_uuid(copy)
    return copy


class BasePerturbationModel(
    SaveLoadMixin,
    QueryMixin,
    MinifyMixin,
    MechanismMixin,
    TreatmentEffectMixin,
    PredictionMixin,
    ExpressionMixin,
    LatentMixin,
    VAEMixin,
    UnsupervisedTrainingMixin,
    BaseModelClass,
):
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
        for name, value in (("n_latent", n_latent), ("n_hidden", n_hidden), ("n_particles", n_particles)):
            _check_positive(name, value, integer=True)
        n_latent, n_hidden, n_particles = int(n_latent), int(n_hidden), int(n_particles)
        for name in ("embedding_prior_scale", "mask_prior_beta"):
            if name in module_kwargs:
                _check_positive(name, module_kwargs[name])
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
            A single column name is read as a list of one.
        encode_combinations
            ``"additive"`` (default): a combination's design row is the sum of its perturbations' rows, so
            unseen combinations of seen perturbations can be predicted. ``"unique"``: every distinct label is
            its own treatment (one-hot; required by :class:`~sams_scvi.SVAEPlus`, the paper's
            ``encode_combos_as_unique``).
        """
        _check_perturbation_key(perturbation_key)
        if isinstance(categorical_covariate_keys, str):  # one column, not a list of its letters
            categorical_covariate_keys = [categorical_covariate_keys]
        control_value = label_text(control_value)  # labels are compared as text: 0 matches "0"
        setup_method_args = cls._get_setup_method_args(**locals())
        _check_obs_keys(adata, batch_key=batch_key, categorical_covariate_keys=categorical_covariate_keys)
        _check_finite(_layer(adata, layer))
        _warn_duplicate_genes(adata)
        fields = [
            # counts are checked by the model, which knows its likelihood (raw counts for "nb")
            LayerField(SAMS_REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            # labels before covariates: a label error then leaves adata.obs as it was (no _scvi_batch column)
            PerturbationField(
                SAMS_REGISTRY_KEYS.PERTURBATION_KEY,
                perturbation_key,
                control_value,
                delimiter,
                dosage_key,
                encode_combinations,
            ),
            PerturbationLabelsField(SAMS_REGISTRY_KEYS.LABELS_KEY, perturbation_key),
            CategoricalObsField(SAMS_REGISTRY_KEYS.BATCH_KEY, batch_key),
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
        _check_perturbation_key(perturbation_key)
        if isinstance(categorical_covariate_keys, str):
            categorical_covariate_keys = [categorical_covariate_keys]
        control_value = label_text(control_value)
        setup_method_args = cls._get_setup_method_args(**locals())
        if modalities is None:
            raise ValueError("`modalities` must name at least the RNA modality, e.g. {'rna_layer': 'rna'}.")
        modalities = cls._create_modalities_attr_dict(modalities, setup_method_args)
        for argument, modality in modalities.items():
            if modality is not None and modality not in mdata.mod:
                raise KeyError(
                    f"modalities[{argument!r}] is {modality!r}, which is not a modality of the MuData (modalities: "
                    f"{list(mdata.mod.keys())})."
                )
        rna = mdata.mod[modalities.rna_layer] if modalities.rna_layer is not None else mdata
        _check_finite(_layer(rna, rna_layer))
        _warn_duplicate_genes(rna)
        fields = [
            MuDataLayerField(SAMS_REGISTRY_KEYS.X_KEY, rna_layer, mod_key=modalities.rna_layer, is_count_data=False),
            MuDataPerturbationField(
                SAMS_REGISTRY_KEYS.PERTURBATION_KEY,
                perturbation_key,
                control_value,
                delimiter,
                dosage_key,
                encode_combinations,
                mod_key=modalities.perturbation_key,
            ),
            MuDataPerturbationLabelsField(
                SAMS_REGISTRY_KEYS.LABELS_KEY, perturbation_key, mod_key=modalities.perturbation_key
            ),
            MuDataCategoricalObsField(SAMS_REGISTRY_KEYS.BATCH_KEY, batch_key, mod_key=modalities.batch_key),
            MuDataCategoricalJointObsField(
                SAMS_REGISTRY_KEYS.CAT_COVS_KEY,
                categorical_covariate_keys,
                mod_key=modalities.categorical_covariate_keys,
            ),
        ]
        cls._register(mdata, fields, setup_method_args, **kwargs)

    @classmethod
    def _register(cls, data, fields: list, setup_method_args: dict, **kwargs) -> None:
        registered = cls._setup_adata_manager_store.get(data.uns.get("_scvi_uuid"))
        if registered is not None and registered.adata is not data:
            # a copy of set-up data carries the original's id; registering it under that id would take the original's
            # registration away ("Did you make a copy?" on the next model built on the original)
            _assign_adata_uuid(data, overwrite=True)
        source = kwargs.get("source_registry")
        if source is not None and SAMS_REGISTRY_KEYS.LABELS_KEY not in source.get("field_registries", {}):
            # a model saved before the labels were registered: its data is set up as it was then
            fields = [field for field in fields if field.registry_key != SAMS_REGISTRY_KEYS.LABELS_KEY]
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(data, **kwargs)
        state = adata_manager.get_state_registry(SAMS_REGISTRY_KEYS.PERTURBATION_KEY)
        control, delimiter = state["control_value"], state["delimiter"]
        messages = label_warnings(state["observed_labels"], state["vocabulary"], control, delimiter)
        if state["n_control_cells"] + state.get("reference_control_cells", 0) == 0:
            candidates = control_candidates([*state["observed_labels"], *state["vocabulary"]])
            messages.append(
                f"No cells are labelled {control!r}: the model can be trained, but average treatment effects "
                "(estimate_ate) need control cells to define the unperturbed state."
                + (
                    f" Labels {candidates} look like controls: pass control_value={candidates[0]!r}."
                    if candidates
                    else ""
                )
            )
        for message in messages:
            warnings.warn(message, UserWarning, stacklevel=3)  # the user's setup_anndata call
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        lr: float = 1e-3,
        batch_size: int | None = None,
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = False,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every_n_epochs: int = 1,
        resume: bool = False,
        reuse_cpu_memory: bool = True,
        **trainer_kwargs,
    ):
        """Train with Adam on the plated ELBO (``docs/model.md``).

        Parameters
        ----------
        max_epochs
            Number of passes through the training cells; ``None``: enough for a typical perturbation's mechanism to
            be updated 4,000 times (:func:`~sams_scvi.model.default_max_epochs`: a few hundred epochs on a few
            thousand cells, a few epochs on 10^6; at most 8 million cell passes). ``docs/model.md``, "Training
            length".
        lr
            Adam learning rate (the paper's sweeps use 3e-4 over 30k-150k steps; 1e-3 is the reference demo's
            value, chosen here for the shorter runs a CPU affords).
        batch_size
            Cells per minibatch; ``None``: 512 as in the paper, or 256 / 128 on screens whose epoch would have
            fewer than 16 steps (:func:`~sams_scvi.model.default_batch_size`): the same number of updates then
            takes about a third of the time.
        train_size, validation_size
            Fractions of cells for training and validation; pass
            ``datasplitter_kwargs={"external_indexing": [train, val, test]}`` for a fixed split, e.g. from
            :func:`sams_scvi.metrics.combination_split` (cells in none of the three are not used).
        early_stopping
            Stop when the validation ELBO stops improving (validation is then run every epoch).
        accelerator, devices
            Lightning device selection (``"auto"`` uses a GPU when one is present). For distributed data-parallel
            training pass ``strategy="ddp"`` (and ``devices=n``) and run from a script; each process then sees
            ``1/n`` of every epoch's cells, and each perturbation's global KL is still charged once per epoch.
        plan_kwargs
            Arguments of :class:`~sams_scvi.model.SAMSTrainingPlan` (e.g. ``global_lr_factor``, ``align_at``,
            ``mask_hold``, whose defaults come from the model's ``recipe``) and :class:`scvi.train.TrainingPlan`.
            Defaults here differ from scvi-tools' where the paper does: Adam ``eps=1e-8`` (scvi's 0.01 would
            swamp the small per-step gradients of the global variables), ``weight_decay=1e-6``, and **no KL
            warm-up** (``n_epochs_kl_warmup=None``).
        datasplitter_kwargs
            Arguments of :class:`scvi.dataloaders.DataSplitter`.
        checkpoint_dir
            Folder for a training checkpoint, ``checkpoint_dir/last.ckpt``, written every
            ``checkpoint_every_n_epochs`` epochs and at the end (module and optimiser state, epoch counters and
            random states).
        checkpoint_every_n_epochs
            Epochs between checkpoints.
        resume
            Continue from ``checkpoint_dir/last.ckpt`` if it exists (otherwise start from the beginning, so the
            same call works for the first run and after a crash). Create the model as before (same data, seed
            and arguments) and call ``train`` with the same arguments: the resumed run ends with the parameters
            the uninterrupted run would have had. ``history`` then covers only the resumed epochs. A checkpoint
            written with other settings (model arguments, genes, perturbations, cells, seed, batch and split sizes,
            ``plan_kwargs``) is refused with the settings that differ; a larger ``max_epochs`` continues the run.
            Ctrl+C during training raises :class:`KeyboardInterrupt` with how to resume.
        reuse_cpu_memory
            On Linux, keep up to 1 GiB of the memory one step frees for the next instead of handing it back to the
            system and faulting it in again (glibc's ``M_TOP_PAD``; restored afterwards). On 2 CPU cores at 2,000
            genes this cuts a step's time by about a third with the same peak memory; screens with a few hundred
            genes or fewer gain nothing (``benchmarks/NOTES.md``). No effect outside glibc.
        **trainer_kwargs
            Arguments of :class:`scvi.train.Trainer` / Lightning (e.g. ``enable_progress_bar``,
            ``check_val_every_n_epoch``, ``gradient_clip_val``).
        """
        self._check_counts_available(None, "train")
        self._check_train_args(
            max_epochs, batch_size, train_size, validation_size, early_stopping, plan_kwargs, datasplitter_kwargs
        )
        recipe_plan = dict(getattr(self, "_recipe_plan_kwargs", {}))
        if "align_at" in (plan_kwargs or {}):  # the 0.2 schedule, or align_at=None for none, replaces the recipe's
            recipe_plan.pop("align_after_updates", None)
        plan_kwargs = {
            "lr": lr,
            "eps": 1e-8,
            "weight_decay": 1e-6,
            "n_epochs_kl_warmup": None,
            "n_steps_kl_warmup": None,
            **recipe_plan,
            **(plan_kwargs or {}),
        }
        n_train = self._n_train_cells(train_size, datasplitter_kwargs)
        if batch_size is None:
            batch_size = default_batch_size(n_train)
        if early_stopping:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        if trainer_kwargs.get("strategy") == "ddp":
            # recipes that hold the masks fixed for part of training switch their gradients off, which plain DDP
            # rejects as "parameters that were not used in producing the loss"
            trainer_kwargs["strategy"] = "ddp_find_unused_parameters_true"
        if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
            raise NotADirectoryError(
                f"checkpoint_dir={str(checkpoint_dir)!r} is a file, not a folder; pass a folder (new or one that an "
                "earlier run checkpointed to)."
            )
        checkpoint = None
        if checkpoint_dir is not None:
            _check_positive("checkpoint_every_n_epochs", checkpoint_every_n_epochs, integer=True)
            settings = self._run_settings(batch_size, train_size, validation_size, plan_kwargs, datasplitter_kwargs)
            checkpoint = ResumableCheckpoint(checkpoint_dir, int(checkpoint_every_n_epochs), settings)
            trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), checkpoint]
            if resume and checkpoint.last_path.exists():
                if trainer_kwargs.get("ckpt_path") is not None:
                    raise ValueError("Pass either resume=True or ckpt_path, not both.")
                saved = checkpoint_settings(checkpoint.last_path)
                differences = settings_differences(saved, settings) if saved is not None else []
                if differences:
                    raise ValueError(
                        f"Cannot resume from {checkpoint.last_path}: it was written by a run with other settings ("
                        + "; ".join(differences)
                        + "). Create the model and call train as the interrupted run did, or choose another "
                        "checkpoint_dir to start a new run."
                    )
                trainer_kwargs["ckpt_path"] = str(checkpoint.last_path)
                logger.info("Resuming training from %s", checkpoint.last_path)
        elif resume:
            raise ValueError("resume=True needs the checkpoint_dir that the interrupted run wrote to.")
        if max_epochs is None and trainer_kwargs.get("datamodule") is None:
            max_epochs = default_max_epochs(n_train, batch_size, self._typical_training_cells(n_train))
        interrupt = InterruptWatch()
        trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), interrupt]
        if getattr(self, "_reference_entries", None) is not None:  # a query model: train only its new entries
            trainer_kwargs["callbacks"].append(self._reference_entries)
        with quiet_dependencies(), reuse_freed_memory(enabled=reuse_cpu_memory), flush_denormals():
            try:
                result = super().train(
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
            except SystemExit:
                if interrupt.epoch is None:
                    raise
                # Lightning turns Ctrl+C into sys.exit(1), which would end a script without a word and leave the model
                # as if never trained
                self.module.eval()
                self.is_trained_ = True
                resume_hint = (
                    f"To continue, create the model as before and call train(..., checkpoint_dir={str(checkpoint_dir)!r}, "
                    "resume=True): it resumes from the last checkpoint."
                    if checkpoint is not None and checkpoint.last_path.exists()
                    else "Pass checkpoint_dir=... to train() to be able to resume after an interruption."
                )
                raise KeyboardInterrupt(
                    f"Training stopped by the user during epoch {interrupt.epoch + 1}. The model keeps the parameters "
                    f"of its last step (undertrained). {resume_hint}"
                ) from None
        warn_if_unsettled(self, "train")
        return result

    def convergence(self) -> pd.DataFrame:
        """Whether training has settled: the objective and the mechanism over the last quarter of the run.

        ``train()``, :meth:`estimate_ate`, :meth:`differential_expression` and :meth:`screen_combinations` warn
        when a quantity has not; :func:`sams_scvi.pl.training_history` draws the curves with the assessed window.

        Returns
        -------
        One row per quantity: ``objective`` (relative decrease of the training loss over the last quarter of the
        epochs; settled below 1 %), ``effects`` (relative change of the mean norm of the latent shifts; below
        30 %), ``masks`` (change of the fraction of mask entries on) and ``penetrance`` (change of the mean
        penetrance; both below 0.03), with ``change``, ``tolerance``, ``settled`` and the window's ``epochs``.
        """
        self._check_if_trained(warn=False)
        return training_convergence(self.history)

    def _run_settings(self, batch_size, train_size, validation_size, plan_kwargs, datasplitter_kwargs) -> dict:
        """What a training checkpoint must match to be resumed: model, data, split and training arguments."""
        cells = None
        if self.adata is not None:  # the same cells in the same order: the split is drawn over positions
            cells = hashlib.sha256("\0".join(map(str, self.adata.obs_names)).encode()).hexdigest()
        return {
            "model": type(self).__name__,
            "model arguments": self.init_params_,
            "genes": [str(gene) for gene in self._gene_names],
            "perturbations": self.perturbations,
            "cells (digest of the obs names)": cells,
            "seed (scvi.settings.seed, which draws the split)": scvi.settings.seed,
            "batch_size": batch_size,
            "train_size": train_size,
            "validation_size": validation_size,
            "datasplitter_kwargs": datasplitter_kwargs,
            "plan_kwargs": plan_kwargs,
        }

    def _check_train_args(
        self,
        max_epochs,
        batch_size,
        train_size,
        validation_size,
        early_stopping: bool,
        plan_kwargs: dict | None,
        datasplitter_kwargs: dict | None,
    ) -> None:
        """Raise before training on arguments that Lightning or scvi-tools would misread, hang on or accept silently."""
        if max_epochs is not None:  # Lightning reads -1 as "train forever"
            _check_positive("max_epochs", max_epochs, integer=True)
        if batch_size is not None:
            _check_positive("batch_size", batch_size, integer=True)
        _check_number("train_size", train_size)
        if not 0 < train_size <= 1:
            raise ValueError(f"`train_size` must be in (0, 1], the fraction of cells to train on, not {train_size!r}.")
        if validation_size is not None:
            _check_number("validation_size", validation_size)
            if not 0 <= validation_size < 1 or train_size + validation_size > 1:
                raise ValueError(
                    f"`validation_size` must be in [0, 1) with train_size + validation_size <= 1, not "
                    f"{validation_size!r} (train_size={train_size!r}); or None for the cells not trained on."
                )
        external = (datasplitter_kwargs or {}).get("external_indexing") is not None
        if early_stopping and not external:
            n_cells = self.adata.n_obs if self.adata is not None else None
            if validation_size is not None:
                n_validation = int(np.floor(validation_size * n_cells)) if n_cells else validation_size
            else:
                n_validation = n_cells - int(np.ceil(train_size * n_cells)) if n_cells else 1 - train_size
            if n_validation <= 0:
                raise ValueError(
                    "early_stopping needs validation cells (train_size < 1): pass e.g. train_size=0.9, or "
                    "early_stopping=False."
                )
        _check_plan_kwargs(self._training_plan_cls, self.module, plan_kwargs)

    def _n_train_cells(self, train_size: float, datasplitter_kwargs: dict | None) -> int:
        """Cells the run will train on (the default length and batch size follow it)."""
        external = (datasplitter_kwargs or {}).get("external_indexing")
        if external is not None and len(external) > 0:
            return max(len(_as_positions(self.adata, external[0], "external_indexing[0]", allow_empty=True)), 1)
        return max(int(np.ceil(train_size * self.adata.n_obs)), 1) if self.adata is not None else 1

    def _typical_training_cells(self, n_train: int) -> float:
        """Training cells of a typical perturbation, from its share of the registered cells."""
        design = self.adata_manager.get_from_registry(SAMS_REGISTRY_KEYS.PERTURBATION_KEY)
        counts = np.asarray((design != 0).sum(0)).ravel()
        return typical_cells_per_perturbation(counts) * n_train / max(self.adata.n_obs, 1)

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

    def _make_data_loader(self, adata=None, indices=None, *args, **kwargs):
        """scvi-tools' loader, with ``indices`` given as positions, a boolean mask or obs names (as scanpy)."""
        self._check_counts_available(adata, "This method")
        if indices is not None:
            indices = _as_positions(self.adata if adata is None else adata, indices)
        if kwargs.get("batch_size") is not None:  # torch's own message names neither the method nor the fix
            _check_positive("batch_size", kwargs["batch_size"], integer=True)
            kwargs["batch_size"] = int(kwargs["batch_size"])
        return super()._make_data_loader(adata, indices, *args, **kwargs)

    def _validate_anndata(self, adata=None, copy_if_view: bool = True):
        """scvi-tools' check and registry transfer; a view is copied instead of being made actual in place.

        Every method that reads cells goes through here, so a model loaded without data (``load(..., adata=False)``)
        gets one clear error.
        """
        if adata is None and self.adata is None:
            raise ValueError(
                f"The model was loaded without data ({type(self).__name__}.load(..., adata=False)); pass adata=... "
                "with the cells to use (the training genes, with the same obs columns as at setup)."
            )
        if adata is not None:  # before scvi-tools' check, whose message does not say which genes differ
            _check_gene_names(self._gene_names, adata, self.registry_)
            if copy_if_view and adata.is_view:
                # scvi-tools would turn the user's view into an actual AnnData in place (_check_if_view)
                adata = adata.copy()
                _assign_adata_uuid(adata, overwrite=True)  # its own manager, as scvi-tools gives a copied view
            elif isinstance(adata, AnnData) and not adata.isbacked and self._unregistered(adata):
                # scvi-tools would write its registration (obs columns, obsm, uns) into data the user never set
                # up; it goes into a copy that shares the matrices instead. The previous such copy is forgotten,
                # so repeated calls do not pile up registrations that keep the user's matrices alive.
                store = self._per_instance_manager_store.get(self.id, {})
                store.pop(getattr(self, "_last_registration_copy", None), None)
                adata = _registration_copy(adata)
                self._last_registration_copy = adata.uns["_scvi_uuid"]
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    def _unregistered(self, adata: AnnData) -> bool:
        """Whether ``adata`` has no registration with this model (scvi-tools would then transfer one into it)."""
        manager = self._per_instance_manager_store.get(self.id, {}).get(adata.uns.get("_scvi_uuid"))
        return manager is None or manager.adata is not adata

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
