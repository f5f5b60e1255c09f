"""Reference models: map new cells and batches onto a trained model (scArches-style), add perturbations."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from lightning.pytorch.callbacks import Callback
from scipy import sparse
from scvi import settings

from sams_scvi._constants import SAMS_REGISTRY_KEYS

from ._schedule import default_batch_size, default_max_epochs, typical_cells_per_perturbation
from ._training_plan import perturbation_cell_counts

# Updates of each added perturbation's mechanism in a default add_perturbations run, half of a fresh model's (the
# networks start trained). On TAP-seq (leave 3 out, 3 seeds) 1,000 updates predicted the added targets' effects
# shrunk (slope 0.67 against 0.86 for a model trained jointly), 2,000 at 0.79 (docs/results_add_perturbations.md).
ADD_UPDATES = 2_000
# Default replayed training cells per new cell (at most all of them). On TAP-seq, replaying as many cells as were
# added let the known targets drift (r 0.71 -> 0.45); nine times as many (all) kept them (0.70), 3 seeds
# (docs/results_add_perturbations.md).
REPLAY_PER_NEW_CELL = 10


class KeepReferenceEntries(Callback):
    """Train only the entries a query added, and keep the reference's training cell counts.

    ``new_entries`` (parameter name -> boolean mask of its new entries): before each optimiser step the gradient of
    every other entry is zeroed, so that with Adam and no weight decay the reference's networks, perturbations and
    covariate categories never move (parameters without new entries do not even compute gradients: they are
    frozen when the query model is built). ``None``: everything trains (fine-tuning). At the end of each fit the
    reference's training cell counts are added back to those of the perturbations it knew, which the fit had set
    to the query's.
    """

    def __init__(self, new_entries: dict[str, torch.Tensor] | None, reference_counts: torch.Tensor) -> None:
        super().__init__()
        self.new_entries = new_entries
        self.reference_counts = reference_counts

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.new_entries is None:
            return
        for name, parameter in pl_module.module.named_parameters():
            new = self.new_entries.get(name)
            if parameter.grad is not None and new is not None:
                parameter.grad.masked_fill_(~new.to(parameter.grad.device), 0.0)

    def on_fit_end(self, trainer, pl_module) -> None:
        counts = pl_module.module.train_perturbation_counts
        counts[: len(self.reference_counts)] += self.reference_counts.to(counts)


def transplant_reference(reference, module) -> dict[str, torch.Tensor]:
    """Copy the reference module's state into a ``module`` built for more perturbations or covariate categories.

    Entries along a perturbation or category axis that the reference lacks keep ``module``'s initialisation
    (new perturbations start as a fresh model's do; a new covariate category at zero, i.e. as the reference's
    first category when it had one category only and so no embedding). Returns, per parameter that gained
    entries, a boolean mask of them (True: new).
    """
    source_state = reference.state_dict()
    growing = {**module.perturbation_axes(), **module.covariate_axes()}
    reference_categories = reference.decoder_covariates.n_cats_per_cov
    new_entries = {}
    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for name, target in module.state_dict().items():
            source = source_state.get(name)
            if source is None and name in module.covariate_axes():
                # the reference had one category of this covariate, hence no embedding: its category adds zero
                j = int(name.split(".")[2])
                source = torch.zeros(reference_categories[j], target.shape[1], dtype=target.dtype)
                target.zero_()
            if source is None:
                raise ValueError(f"The reference model has no {name!r}: it was built differently from this model.")
            if source.shape == target.shape:
                target.copy_(source)
                continue
            axis = growing.get(name)
            others_match = axis is not None and all(
                a == b for i, (a, b) in enumerate(zip(source.shape, target.shape, strict=True)) if i != axis
            )
            if not others_match or source.shape[axis] > target.shape[axis]:
                raise ValueError(
                    f"{name!r} has shape {tuple(source.shape)} in the reference and {tuple(target.shape)} here; only "
                    "perturbations and covariate categories can be added to a reference model."
                )
            old = [slice(None)] * target.dim()
            old[axis] = slice(0, source.shape[axis])
            target[tuple(old)] = source.to(target)
            if name in parameters:
                mask = torch.ones_like(target, dtype=torch.bool)
                mask[tuple(old)] = False
                new_entries[name] = mask
    return new_entries


class QueryMixin:
    """``prepare_query_anndata`` and ``load_query_data``: map new cells and batches onto a trained reference.

    The decoder reads each covariate category through one learned row, so a new batch needs only its row trained
    while the rest of the reference stays fixed (scArches).
    """

    @classmethod
    def prepare_query_anndata(
        cls, adata: AnnData, reference_model, return_reference_var_names: bool = False
    ) -> AnnData | pd.Index:
        """The query's cells with the reference's genes, in its order; genes the query lacks are zero counts.

        Unlike scvi-tools' version this never changes ``adata``: it returns a new AnnData (sharing nothing it
        would have to rewrite). ``reference_model``: a trained model or a folder written by ``save``.
        """
        genes = pd.Index(_reference(cls, reference_model)._gene_names)
        if return_reference_var_names:
            return genes
        if not adata.var_names.is_unique:
            raise ValueError("The query's var_names repeat; make them unique (adata.var_names_make_unique()).")
        present = genes.isin(adata.var_names)
        if not present.any():
            raise ValueError(
                f"The query shares no gene with the reference (e.g. reference {list(genes[:3])}, query "
                f"{list(adata.var_names[:3])}); use the same gene identifiers."
            )
        if not present.all():
            warnings.warn(
                f"{int((~present).sum())} of the reference's {len(genes)} genes are not in the query (e.g. "
                f"{list(genes[~present][:3])}); they are filled with zero counts, which the model reads as unexpressed.",
                UserWarning,
                stacklevel=2,
            )
        columns = adata.var_names.get_indexer(genes)
        take = np.where(columns >= 0, columns, 0)

        def reorder(matrix):
            matrix = matrix[:, take]
            if present.all():
                return matrix
            if sparse.issparse(matrix):
                return sparse.csr_matrix(matrix.multiply(present[None, :].astype(matrix.dtype)))
            return np.where(present[None, :], matrix, 0)

        return AnnData(
            X=None if adata.X is None else reorder(adata.X),
            # without an earlier registration's columns and design (they describe the query's own gene order)
            obs=adata.obs[[c for c in adata.obs.columns if not str(c).startswith("_scvi_")]].copy(),
            var=pd.DataFrame(index=genes.copy()),
            layers={key: reorder(value) for key, value in adata.layers.items() if key is not None},  # anndata 0.13: X
            obsm={k: v for k, v in adata.obsm.items() if not str(k).startswith("_scvi_")},
        )

    @classmethod
    def load_query_data(cls, adata: AnnData, reference_model, unfrozen: bool = False):
        """A model for the query ``adata`` built on a trained reference, as scvi-tools' ``load_query_data``.

        The query is set up as the reference's data was; its new batch or covariate categories get new decoder
        rows, and only these are trained by ``train`` unless ``unfrozen``. Perturbations the reference does not
        know are refused (a fixed decoder cannot express their effects): learn them with
        :meth:`add_perturbations`, or pass ``unfrozen=True``. The reference's encoder, decoder, input statistics
        and known perturbations stay exactly as trained (their gradients are zeroed and nothing decays them), and the axis
        alignment of the recipe is off (it would rotate the whole latent space).

        Parameters
        ----------
        adata
            Query cells with the reference's genes (see :meth:`prepare_query_anndata`), raw counts, and the obs
            columns the reference was set up with. It is registered in place, as by ``setup_anndata``.
        reference_model
            A trained model of this class, or a folder written by its ``save``.
        unfrozen
            Train every parameter on the query (fine-tuning) instead of the new entries only.

        Returns
        -------
        A new model whose data is ``adata``; call ``train`` on it.
        """
        reference = _reference(cls, reference_model)
        if not reference.is_trained_:
            raise ValueError("The reference model is not trained; train it (or load a trained one) first.")
        genes = pd.Index(reference._gene_names)
        registry = reference.registry_
        rna = registry["setup_args"].get("modalities", {}).get("rna_layer") if hasattr(adata, "mod") else None
        query_genes = (adata.mod[rna] if rna is not None else adata).var_names
        if not query_genes.equals(genes):
            raise ValueError(
                "The query's genes are not the reference's, in its order; prepare it with "
                f"{cls.__name__}.prepare_query_anndata(adata, reference_model)."
            )
        setup = getattr(cls, registry["setup_method_name"])
        setup(adata, source_registry=registry, extend_categories=True, **registry["setup_args"])
        init = reference.init_params_
        kwargs = {key: value for group in init.get("kwargs", {}).values() for key, value in group.items()}
        non_kwargs = {
            key: value for key, value in init.get("non_kwargs", {}).items() if key not in ("adata", "registry")
        }
        model = cls(adata, **non_kwargs, **kwargs)
        added = model.perturbations[len(reference.perturbations) :]
        if added and not unfrozen:
            raise ValueError(
                f"The query carries perturbations the reference was not trained on ({added[:5]}). Their effects "
                "cannot be learned with the reference's decoder fixed: it produces only the expression changes of "
                "the programs it was trained on (on TAP-seq an added target's predicted effect did not correlate "
                "with its observed one). Use reference.add_perturbations(adata), which fine-tunes the reference on "
                "the new cells and replays its own, or pass unfrozen=True to fine-tune every parameter on the query."
            )
        new_entries = transplant_reference(reference.module, model.module)  # the reference stays where it is
        reference_counts = reference.module.train_perturbation_counts.detach().cpu().clone()
        # no axis alignment: it rotates the whole latent space, the reference's included
        plan = {**getattr(model, "_recipe_plan_kwargs", {}), "align_after_updates": None}
        plan.pop("align_at", None)
        if not unfrozen:
            plan["weight_decay"] = 0.0  # a decayed reference entry would move although its gradient is zero
            for name, parameter in model.module.named_parameters():
                parameter.requires_grad_(name in new_entries)
        model._reference_entries = KeepReferenceEntries(None if unfrozen else new_entries, reference_counts)
        model._recipe_plan_kwargs = plan
        model.module.train_perturbation_counts[: len(reference_counts)] = reference_counts
        model.is_trained_ = not new_entries and not unfrozen
        if model.is_trained_:
            warnings.warn(
                "The query has no batch, covariate category or perturbation the reference lacks, so there is nothing "
                "to train: the returned model reads the query with the reference as it is (no train() needed). Pass "
                "unfrozen=True to fine-tune the whole model on the query.",
                UserWarning,
                stacklevel=2,
            )
        return model

    def add_perturbations(
        self,
        adata: AnnData,
        replay_cells: int | None = None,
        max_epochs: int | None = None,
        batch_size: int | None = None,
        train_size: float = 0.9,
        **train_kwargs,
    ):
        """A model that also knows the perturbations of ``adata``, fine-tuned from this one in a fraction of the time.

        The new model starts as this one (which is not changed), with fresh mechanisms for the perturbations it
        lacks, and trains every parameter on the cells of ``adata`` together with ``replay_cells`` of this model's
        own training cells. The decoder must learn the new perturbations' programs: with it fixed an added target's
        predicted effect does not correlate with its observed one. Replaying the training cells keeps the known
        perturbations and the basal space where they were while it does.

        Parameters
        ----------
        adata
            Cells with this model's obs columns and raw counts, whose labels name new perturbations, alone or with
            known ones (``"NEW"``, ``"NEW+KNOWN"``); they may hold control or known cells too. Genes are matched
            to the model's as by :meth:`prepare_query_anndata`; ``adata`` itself is not changed.
        replay_cells
            This model's cells trained on with them (drawn at random, controls and known perturbations alike);
            ``None``: ten times as many as ``adata`` has, at most all of them. Fewer make a run on a large screen
            shorter, but let the known perturbations drift.
        max_epochs
            ``None``: enough for 2,000 updates of a typical new perturbation, half of what a fresh model gets.
        batch_size, train_size
            As in ``train``; ``train_size`` splits the cells of ``adata`` (replayed cells always train).
        **train_kwargs
            Further arguments of ``train`` (``plan_kwargs``, ``enable_progress_bar``, ...).

        Returns
        -------
        The new, trained model; its data is a new AnnData of the replayed and the new cells.
        """
        from ._minify import MinifiedDataError

        if self.adata is None:
            raise ValueError(
                "The model has no data to replay; load it with its training AnnData "
                f"({type(self).__name__}.load(folder, adata=training_adata))."
            )
        if getattr(self, "is_minified", False):
            raise MinifiedDataError(
                "add_perturbations replays the model's training counts, which a minified model no longer has; "
                "load the model with its full training AnnData."
            )
        if not self.is_trained_:
            raise ValueError("The model is not trained; train it first, then add perturbations to it.")
        if "datasplitter_kwargs" in train_kwargs:
            raise ValueError(
                "add_perturbations splits the cells itself; pass train_size instead of datasplitter_kwargs."
            )
        rng = np.random.default_rng(settings.seed)  # follows scvi.settings.seed, which it leaves as it is
        n_reference = self.adata.n_obs
        n_replay = min(
            n_reference, int(round(REPLAY_PER_NEW_CELL * adata.n_obs)) if replay_cells is None else replay_cells
        )
        if n_replay < 0:
            raise ValueError(f"replay_cells must be zero or positive, not {replay_cells}.")
        replayed = np.sort(rng.choice(n_reference, n_replay, replace=False))
        parts = [type(self).prepare_query_anndata(part, self) for part in (self.adata[replayed], adata)]
        cells = anndata.concat(parts, join="inner", index_unique="-")  # the obs columns both have, new cell names
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The query has no batch")
            model = type(self).load_query_data(cells, self, unfrozen=True)
        known = len(self.perturbations)
        new = np.arange(n_replay, cells.n_obs)
        design = model.adata_manager.get_from_registry(SAMS_REGISTRY_KEYS.PERTURBATION_KEY)
        reference_counts = model._reference_entries.reference_counts
        # new: not in the model's vocabulary, or in it (a registered category) without training cells
        untrained = np.r_[reference_counts.numpy() == 0, np.ones(len(model.perturbations) - known, dtype=bool)]
        added = untrained & (perturbation_cell_counts(design, new) > 0)
        if not added.any():
            raise ValueError(
                "The cells carry no perturbation the model was not trained on; predict them with this model "
                "(predict_perturbation, estimate_ate), or map them with load_query_data."
            )
        order = rng.permutation(new)
        n_new_train = max(1, int(round(train_size * len(order))))
        train = np.sort(np.concatenate([np.arange(n_replay), order[:n_new_train]]))
        split = [train, np.sort(order[n_new_train:]), np.array([], dtype=int)]
        # the fit counts each perturbation's training cells; the reference's own (not the replayed ones) come back
        replay_counts = torch.as_tensor(perturbation_cell_counts(design, np.arange(n_replay))[:known])
        model._reference_entries.reference_counts = (reference_counts - replay_counts).clamp_min(0)
        model._longer_run_remedy = "Add the perturbations again with a longer run, e.g. reference.add_perturbations(adata, max_epochs={epochs})"
        if batch_size is None:
            batch_size = default_batch_size(len(train))
        if max_epochs is None:
            cells_each = typical_cells_per_perturbation(perturbation_cell_counts(design, train)[added])
            max_epochs = default_max_epochs(len(train), batch_size, cells_each, updates=ADD_UPDATES)
        model.train(
            max_epochs=max_epochs,
            batch_size=batch_size,
            datasplitter_kwargs={"external_indexing": split},
            **train_kwargs,
        )
        return model


def _reference(cls, reference_model):
    """A trained reference model of class ``cls`` from a model or a saved folder."""
    if isinstance(reference_model, str | Path):
        return cls.load(str(reference_model), adata=False)
    if not isinstance(reference_model, cls):
        raise TypeError(
            f"The reference must be a trained {cls.__name__} (or a folder saved by one), not "
            f"{type(reference_model).__name__}."
        )
    return reference_model
