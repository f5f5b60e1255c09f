"""Decoded expression of observed cells and scvi-tools' differential expression on it."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import partial
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scipy import stats
from scvi.model.base import RNASeqMixin, VAEMixin

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi._utils import _as_positions, _check_positive, _seeded

from ._convergence import warn_if_unsettled


class ExpressionMixin:
    """``get_normalized_expression`` in scvi-tools' signature, and scvi-tools' own ``differential_expression``.

    scvi-tools' :class:`~scvi.model.base.RNASeqMixin` reads the module's ``forward`` outputs (a ``px``
    distribution per cell); SAMS-VAE's module returns one row per response pattern under penetrance and needs the
    globals, so the expression is computed here from :meth:`SAMSModule.infer_cells
    <sams_scvi.module.SAMSModule.infer_cells>` (one response pattern drawn per cell) and the module's ``px``, and
    scvi-tools' differential-expression machinery (its change and Bayes-factor modes, FDR control and statistics)
    and criticism (:class:`scvi.criticism.PosteriorPredictiveCheck`) run on it unchanged.
    """

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: Sequence[int | str] | int | str | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: Literal["uniform"] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        seed: int | None = None,
        **kwargs,
    ) -> np.ndarray | pd.DataFrame:
        r"""Decoded expression of each cell in its own (perturbed) state, as scvi-tools' ``get_normalized_expression``.

        Per sample, the globals are drawn from :math:`q`, the cell's basal state from :math:`q(z_b \mid x)` (and, under
        penetrance, its response from :math:`q(u \mid x)`), and :math:`z = z_b + d_i (M \odot E)` is decoded into
        the expression proportions :math:`\rho` (``likelihood="normal"``: the decoded mean, on the data's scale).

        Parameters
        ----------
        adata, indices
            Cells (default: all registered cells).
        transform_batch
            Batches to decode every cell in (categories or codes), averaged; default, each cell's own.
        gene_list
            Genes to return (default: all).
        library_size
            Scale of the proportions (1: proportions; ``"latent"``: the cell's observed library). Not used with
            ``likelihood="normal"``.
        n_samples
            Posterior samples per cell.
        n_samples_overall
            Draw this many expression vectors from random cells and samples (``n_samples`` must be 1).
        weights
            ``None`` or ``"uniform"``; scvi-tools' importance weights are not available for this model.
        batch_size
            Cells per minibatch.
        return_mean
            Average over the samples.
        return_numpy
            Return an array instead of a DataFrame (always with several samples kept).
        silent
            No progress bar (there is none here; for scvi-tools' signature).
        seed
            Seed of the sampling (``None``: the global random state).

        Returns
        -------
        Cells x genes (DataFrame, or array), or samples x cells x genes without ``return_mean``.
        """
        if weights not in (None, "uniform"):
            raise NotImplementedError(
                f"{self._display_name} has no importance weights for expression: scvi-tools weighs each sample by "
                "p(x, z) / q(z | x) of one cell, but here the globals (masks, embeddings) are shared by every cell, "
                "so a sample's weight is not a per-cell quantity. Use weights=None (and importance_weighting=False "
                "in differential_expression)."
            )
        if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 1:
            raise ValueError("`n_samples` must be a positive integer.")
        if library_size != "latent":
            if isinstance(library_size, str):
                raise ValueError(f"`library_size` must be a positive number or 'latent', not {library_size!r}.")
            _check_positive("library_size", library_size)
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        positions = np.arange(adata.n_obs) if indices is None else _as_positions(adata, indices)
        if n_samples_overall is not None:
            if n_samples != 1:
                raise ValueError("Pass either `n_samples` or `n_samples_overall`.")
            n_samples = n_samples_overall // max(len(positions), 1) + 1
        batches = self._batch_codes(adata, transform_batch)
        genes = self._gene_names
        gene_mask = self._gene_mask(gene_list)
        scale = None if library_size == "latent" else float(library_size)
        blocks = []
        with _seeded(seed, self.device):
            for pxs in self._posterior_predictive(adata, positions, n_samples, batch_size, batches):
                per_batch = [px.expression(scale)[..., gene_mask] for px in pxs]
                blocks.append(torch.stack(per_batch).mean(0).cpu().numpy())  # (S, n, G)
            values = np.concatenate(blocks, axis=1)
            if n_samples_overall is not None:  # inside the seeded block: reproducible with `seed`
                flat = values.reshape(-1, values.shape[-1])
                return flat[np.random.choice(len(flat), n_samples_overall, replace=True)]
        if return_mean:
            values = values.mean(0)
        elif n_samples == 1:
            values = values[0]
        else:
            return values
        if return_numpy:
            return values
        return pd.DataFrame(values, index=adata.obs_names[positions], columns=genes[gene_mask])

    @torch.inference_mode()
    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: Sequence[int | str] | int | str | None = None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        silent: bool = True,
        seed: int | None = None,
    ):
        r"""Draws from the posterior predictive :math:`p(\hat x \mid x)`, one row per cell, as scvi-tools returns them.

        Per sample: the globals from :math:`q`, the cell's basal state (and, under penetrance, its response
        pattern) from their posterior, and counts (``likelihood="normal"``: values) from :math:`p(x \mid z)` at the
        cell's observed library. This is what :class:`scvi.criticism.PosteriorPredictiveCheck` compares with the
        data (``docs/user_guide.md``, "Criticise a fitted model").

        Parameters
        ----------
        adata, indices
            Cells (default: all registered cells).
        transform_batch
            Batches to decode every cell in (categories or codes), averaged; default, each cell's own.
        n_samples
            Draws per cell.
        gene_list
            Genes to return (default: all).
        batch_size
            Cells per minibatch.
        silent
            No progress bar (there is none here; for scvi-tools' signature).
        seed
            Seed of the sampling (``None``: the global random state).

        Returns
        -------
        A :class:`sparse.GCXS` array (cells, genes), or (cells, genes, n_samples) when ``n_samples > 1``.
        """
        import sparse

        _check_positive("n_samples", n_samples, integer=True)
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        positions = np.arange(adata.n_obs) if indices is None else _as_positions(adata, indices)
        gene_mask = self._gene_mask(gene_list)
        batches = self._batch_codes(adata, transform_batch)
        draws = []
        with _seeded(seed, self.device):
            for pxs in self._posterior_predictive(adata, positions, int(n_samples), batch_size, batches):
                per_batch = torch.stack([px.sample() for px in pxs]).mean(0)  # (S, n, G)
                cell_rows = per_batch[0] if n_samples == 1 else per_batch.permute(1, 2, 0)
                draws.append(cell_rows[:, gene_mask].cpu().numpy())
        return sparse.GCXS.from_numpy(np.concatenate(draws))

    @torch.inference_mode()
    def get_likelihood_parameters(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Parameters of :math:`p(x \\mid z)` for each cell, in its own perturbed state, as scvi-tools returns them.

        ``likelihood="nb"``: ``"mean"`` (the NB mean at the cell's library) and ``"dispersions"`` (the inverse
        dispersion :math:`\theta`); ``"normal"``: ``"mean"`` and ``"scale"``. Each (cells, genes), or
        (n_samples, cells, genes) with ``n_samples > 1`` unless ``give_mean``, which averages over the samples.
        """
        _check_positive("n_samples", n_samples, integer=True)
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        blocks: dict[str, list[np.ndarray]] = {}
        with _seeded(seed, self.device):
            for (px,) in self._posterior_predictive(adata, indices, int(n_samples), batch_size, [None]):
                for name, value in px.likelihood_parameters().items():
                    blocks.setdefault(name, []).append(value.cpu().numpy())
        parameters = {name: np.concatenate(values, axis=1) for name, values in blocks.items()}
        if give_mean or n_samples == 1:
            return {name: value.mean(0) for name, value in parameters.items()}
        return parameters

    def get_feature_correlation_matrix(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 10,
        batch_size: int | None = None,
        transform_batch: Sequence[int | str] | int | str | None = None,
        correlation_type: Literal["spearman", "pearson"] = "spearman",
        seed: int | None = 0,
    ) -> pd.DataFrame:
        """Gene-gene correlation of the decoded expression over cells and posterior samples (genes x genes).

        As scvi-tools' :meth:`~scvi.model.base.RNASeqMixin.get_feature_correlation_matrix`, from ``n_samples``
        draws of each cell's expression proportions (:meth:`get_normalized_expression`), averaged over the
        ``transform_batch`` batches; without scvi-tools' extra Gamma noise on those proportions.
        """
        if correlation_type not in ("spearman", "pearson"):
            raise ValueError("`correlation_type` must be 'spearman' or 'pearson'.")
        adata = self._validate_anndata(adata)
        matrices = []
        for batch in self._batch_codes(adata, transform_batch):
            samples = self.get_normalized_expression(
                adata,
                indices,
                transform_batch=batch,
                n_samples=n_samples,
                batch_size=batch_size,
                return_mean=False,
                return_numpy=True,
                seed=seed,
            )
            flat = np.asarray(samples).reshape(-1, samples.shape[-1])
            if correlation_type == "pearson":
                matrices.append(np.corrcoef(flat, rowvar=False))
            else:
                matrices.append(stats.spearmanr(flat).statistic)
        genes = self._gene_names
        return pd.DataFrame(np.mean(matrices, axis=0), index=genes.copy(), columns=genes.copy())

    def _gene_mask(self, gene_list: Sequence[str] | str | None) -> np.ndarray:
        """Boolean mask of the model's genes in ``gene_list`` (all by default); unknown genes raise a ``KeyError``."""
        genes = self._gene_names
        if isinstance(gene_list, str):  # one gene, not its letters
            gene_list = [gene_list]
        if gene_list is None:
            return np.ones(len(genes), bool)
        unknown = [g for g in gene_list if g not in set(genes)]
        if unknown:
            raise KeyError(
                f"`gene_list` has {len(unknown)} genes the model was not trained on (e.g. {unknown[:5]}); pass names "
                f"from the training data's var_names (e.g. {list(genes[:3])})."
            )
        return genes.isin(list(gene_list))

    def _posterior_predictive(self, adata: AnnData, indices, n_samples: int, batch_size: int | None, batches: list):
        """Per minibatch of ``indices``, the cells' :meth:`SAMSModule.posterior_predictive` in each of ``batches``."""
        for tensors in self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size):
            yield self.module.posterior_predictive(tensors, n_samples, batches)

    def _batch_codes(self, adata: AnnData, transform_batch) -> list[int | None]:
        """Batch codes for ``transform_batch`` (categories or codes); ``[None]`` keeps each cell's own batch.

        scvi-tools registers a batch field for every model (one category without ``batch_key``).
        """
        if transform_batch is None:
            return [None]
        mapping = list(self.adata_manager.get_state_registry(SAMS_REGISTRY_KEYS.BATCH_KEY).categorical_mapping)
        values = transform_batch if isinstance(transform_batch, list | tuple) else [transform_batch]
        codes = []
        for value in values:
            if value in mapping:
                codes.append(mapping.index(value))
            elif isinstance(value, int | np.integer) and 0 <= value < len(mapping):
                codes.append(int(value))
            else:
                raise ValueError(f"Unknown batch {value!r}; the model's batches are {mapping}.")
        return codes

    def differential_expression(self, *args, seed: int | None = 0, **kwargs) -> pd.DataFrame:
        """scvi-tools' :meth:`~scvi.model.base.RNASeqMixin.differential_expression`, reproducible by ``seed``.

        All arguments are scvi-tools'; ``seed`` fixes the Monte-Carlo draws (``None``: the global random state).
        A ``groupby`` column or a group that the data does not have raises an error that lists those there are.
        """
        self._check_if_trained(warn=False)
        warn_if_unsettled(self, "differential_expression")
        bound = inspect.signature(RNASeqMixin.differential_expression).bind(self, *args, **kwargs).arguments
        groupby, data = bound.get("groupby"), self.adata if bound.get("adata") is None else bound["adata"]
        if groupby is not None and data is not None:
            obs = data.obs
            if groupby not in obs:
                columns = [c for c in obs.columns if not str(c).startswith("_scvi_")]
                raise KeyError(f"groupby={groupby!r} is not a column of adata.obs; available columns: {columns}.")
            groups = list(pd.unique(obs[groupby].astype(str)))
            for name in ("group1", "group2"):
                value = bound.get(name)
                values = [value] if isinstance(value, str) or np.isscalar(value) else list(value or [])
                unknown = [v for v in values if str(v) not in groups]
                if unknown:
                    raise ValueError(
                        f"{name}={value!r} names groups that adata.obs[{groupby!r}] does not have: {unknown}; its "
                        f"groups are {groups[:20]}."
                    )
        columns = set(data.obs.columns) if data is not None else set()
        try:
            with _seeded(seed, self.device):
                if isinstance(data, MuData):
                    return self._differential_expression_mudata(data, bound)
                return RNASeqMixin.differential_expression(self, *args, **kwargs)
        finally:
            if data is not None:  # scvi-tools leaves its scaling column (_scvi_raw_norm_scaling) in the data
                added = [c for c in data.obs.columns if c not in columns and str(c).startswith("_scvi")]
                data.obs.drop(columns=added, inplace=True)

    def _differential_expression_mudata(self, mdata: MuData, arguments: dict) -> pd.DataFrame:
        """scvi-tools' DE core on a MuData, with the registered RNA modality's genes as the table's rows.

        scvi-tools' :meth:`~scvi.model.base.RNASeqMixin.differential_expression` labels the rows with the
        MuData's ``var_names``, those of every modality; the expression and the count statistics are the RNA
        modality's, so any other modality made the table fail to build.
        """
        from scvi.model._utils import scrna_raw_counts_properties
        from scvi.model.base._de_core import _de_core

        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(RNASeqMixin.differential_expression).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        options = {**defaults, **{k: v for k, v in arguments.items() if k not in ("self", "kwargs")}}
        mdata = self._validate_anndata(mdata)
        model_fn = partial(
            self.get_normalized_expression,
            return_numpy=True,
            n_samples=1,
            batch_size=options["batch_size"],
            weights=options["weights"],
            **(options["importance_weighting_kwargs"] or {}),
        )
        return _de_core(
            self.get_anndata_manager(mdata, required=True),
            model_fn,
            self.get_latent_representation if options["filter_outlier_cells"] else None,
            options["groupby"],
            options["group1"],
            options["group2"],
            options["idx1"],
            options["idx2"],
            options["all_stats"],
            scrna_raw_counts_properties,
            pd.Index(self._gene_names),
            options["mode"],
            options["batchid1"],
            options["batchid2"],
            options["delta"],
            options["batch_correction"],
            options["fdr_target"],
            options["silent"],
            **arguments.get("kwargs", {}),
        )

    def get_reconstruction_error(self, *args, seed: int | None = 0, **kwargs) -> dict[str, float]:
        """scvi-tools' :meth:`~scvi.model.base.VAEMixin.get_reconstruction_error`, reproducible by ``seed``.

        One posterior sample per cell; ``seed`` fixes it (``None``: the global random state).
        """
        self._check_if_trained(warn=False)
        with _seeded(seed, self.device):
            return VAEMixin.get_reconstruction_error(self, *args, **kwargs)
