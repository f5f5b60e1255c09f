"""A light model to share: the training data replaced by each cell's latent posterior (scvi-tools' minified mode)."""

from __future__ import annotations

import numpy as np
import torch
from anndata import AnnData
from scipy import sparse

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi._utils import _as_positions

#: The marker of minified data in ``uns``: our own, since scvi-tools refuses its own marker on models that do not
#: derive from its minified-mode class, whose module would have to encode from stored posteriors.
MINIFY_TYPE_KEY = "_sams_minify_type"
LATENT_POSTERIOR = "latent_posterior_parameters"
# scvi-tools' names for the basal posterior's mean and variance (its load accepts data without counts only then)
QZM_KEY, QZV_KEY, OFFSET_KEY = "_scvi_latent_qzm", "_scvi_latent_qzv", "_sams_latent_offset"
LIBRARY_KEY = "_sams_observed_lib_size"


class MinifiedDataError(ValueError):
    """A method needs the counts, which :meth:`~MinifyMixin.minify_adata` replaced by the latent posterior."""


class MinifyMixin:
    """``minify_adata``: keep what the model needs of its data, not the counts.

    A minified model keeps, per cell, the mean and variance of the basal posterior :math:`q(z_b \\mid x)` (under
    penetrance, of its mixture over response patterns), the mean latent offset and the observed library size. The
    mechanism (masks, embeddings, penetrance) is global, so everything that reads the model and the cells' latent
    states works as before: ``get_latent``, ``get_latent_representation``, ``get_latent_library_size``,
    ``estimate_ate`` and ``screen_combinations`` (``basal="control"`` too), ``predict_perturbation`` from its
    control cells (a control cell's basal posterior does not depend on the globals, so it is the same), the
    mechanism and penetrance getters, and every method given other data (``adata=...``). Methods that read the
    counts of the model's own cells (training, ``predict_perturbation`` from perturbed cells, decoded and
    differential expression, posterior predictive checks, likelihood bounds) raise :class:`MinifiedDataError`;
    load the model with its full data, or pass cells with counts, for them.
    """

    @property
    def is_minified(self) -> bool:
        """Whether the model's data holds the latent posterior instead of the counts."""
        return self.adata is not None and self.adata.uns.get(MINIFY_TYPE_KEY) == LATENT_POSTERIOR

    @property
    def minified_data_type(self) -> str | None:
        """scvi-tools' name of the minified form (``"latent_posterior_parameters"``), or ``None``."""
        return LATENT_POSTERIOR if self.is_minified else None

    def minify_adata(self, minified_data_type: str = LATENT_POSTERIOR, batch_size: int | None = None) -> None:
        """Replace the model's AnnData by a copy without counts that keeps each cell's latent posterior.

        The user's AnnData is not changed (scvi-tools' version empties the model's AnnData in place); the model
        holds the new, light copy, which ``save(..., save_anndata=True)`` writes. On TAP-seq (74 genes) the gain
        is small; on a screen of thousands of genes the counts are most of a saved folder.

        Parameters
        ----------
        minified_data_type
            ``"latent_posterior_parameters"``, the only form (keeping the counts too would save nothing).
        batch_size
            Cells per minibatch while computing the posterior.
        """
        if minified_data_type != LATENT_POSTERIOR:
            raise NotImplementedError(
                f"minified_data_type={minified_data_type!r} is not available; use {LATENT_POSTERIOR!r}."
            )
        self._check_if_trained(warn=False)
        if self.adata is None:
            raise ValueError("The model holds no data to minify (it was loaded with adata=False).")
        if self.is_minified:
            return
        mean, scale, offset = self._basal_posterior(None, None, batch_size, with_offset=True)
        counts = self.adata_manager.get_from_registry(SAMS_REGISTRY_KEYS.X_KEY)
        library = np.asarray(counts.sum(axis=1)).ravel().astype(np.float32)
        source = self.adata
        light = AnnData(
            X=sparse.csr_matrix(source.shape, dtype=np.float32),
            obs=source.obs[[c for c in source.obs.columns if not str(c).startswith("_scvi_")]].copy(),
            var=source.var.copy(),
            obsm={
                **{k: v for k, v in source.obsm.items() if not str(k).startswith("_scvi_")},
                QZM_KEY: mean,
                QZV_KEY: np.square(scale),
                OFFSET_KEY: offset,
            },
            uns={k: v for k, v in source.uns.items() if not str(k).startswith("_scvi")},
        )
        light.obs[LIBRARY_KEY] = library
        light.uns[MINIFY_TYPE_KEY] = LATENT_POSTERIOR
        layer = self.registry_["setup_args"].get("layer")
        if layer is not None:  # the registered counts live in a layer: an empty one keeps the registration valid
            light.layers[layer] = light.X.copy()
        manager = self.adata_manager.transfer_fields(light)
        self._register_manager_for_instance(manager)
        self._adata, self._adata_manager, self.registry_ = light, manager, manager.registry

    # ------------------------------------------------------------------ what the methods read when minified
    def _minified_rows(self, adata, indices) -> np.ndarray | None:
        """Rows of the stored posterior for ``adata``/``indices``, or ``None`` when the counts are there."""
        if not self.is_minified or (adata is not None and adata is not self.adata):
            return None
        return np.arange(self.adata.n_obs) if indices is None else _as_positions(self.adata, indices)

    def _stored_posterior(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean and standard deviation of :math:`q(z_b \\mid x)` and the mean offset of the minified cells."""
        obsm = self.adata.obsm
        return (
            np.asarray(obsm[QZM_KEY][rows], dtype=np.float32),
            np.sqrt(np.asarray(obsm[QZV_KEY][rows], dtype=np.float32)),
            np.asarray(obsm[OFFSET_KEY][rows], dtype=np.float32),
        )

    def _stored_library(self) -> np.ndarray:
        return np.asarray(self.adata.obs[LIBRARY_KEY], dtype=np.float32)

    def _check_counts_available(self, adata, what: str) -> None:
        if self.is_minified and (adata is None or adata is self.adata):
            raise MinifiedDataError(
                f"{what} reads the counts of the model's cells, which minify_adata replaced by their latent "
                "posterior. Pass the cells' counts (adata=...), or load the model with its full data: "
                f"{type(self).__name__}.load(folder, adata=full_adata)."
            )

    def _stored_codes(self, rows: np.ndarray) -> torch.Tensor | None:
        """Covariate codes (n, J) of minified cells, or ``None`` when the decoder has no covariates."""
        if self.module.decoder_covariates.is_empty:
            return None
        parts = []
        for key in (SAMS_REGISTRY_KEYS.BATCH_KEY, SAMS_REGISTRY_KEYS.CAT_COVS_KEY):
            if key in self.adata_manager.data_registry:
                value = np.asarray(self.adata_manager.get_from_registry(key))
                parts.append(value.reshape(len(value), -1)[rows])
        return torch.as_tensor(np.concatenate(parts, axis=1), device=self.device)

    def _control_rows(self) -> np.ndarray:
        design = sparse.csr_matrix(self.adata_manager.get_from_registry(SAMS_REGISTRY_KEYS.PERTURBATION_KEY))
        return np.flatnonzero(design.getnnz(axis=1) == 0)

    def _stored_control_posterior(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        controls = self._control_rows()
        mean, scale, _ = self._stored_posterior(controls)
        return (
            torch.as_tensor(mean, device=self.device),
            torch.as_tensor(scale, device=self.device),
            self._stored_codes(controls),
        )

    def _stored_source_cells(self, rows: np.ndarray, n_samples: int, batch_size: int):
        """Basal draws (S, n, K), libraries (n,) and covariate codes of minified control cells, block by block.

        A control cell's basal posterior does not depend on the globals, so drawing from the stored one is what
        encoding its counts would give. A perturbed cell's depends on the globals drawn, which were not stored.
        """
        perturbed = np.setdiff1d(rows, self._control_rows())
        if len(perturbed):
            raise MinifiedDataError(
                f"The source cells include {len(perturbed)} perturbed cells (e.g. "
                f"{self.adata.obs_names[perturbed[0]]!r}); a minified model predicts from its control cells only: a "
                "perturbed cell's basal state depends on the sampled globals, which minify_adata does not store. Use "
                "the control cells (the default), or pass the cells' counts (adata=...).",
            )
        library = self._stored_library()
        for start in range(0, len(rows), batch_size):
            block = rows[start : start + batch_size]
            mean, scale, _ = self._stored_posterior(block)
            mean, scale = torch.as_tensor(mean, device=self.device), torch.as_tensor(scale, device=self.device)
            z_basal = mean + scale * torch.randn(n_samples, *mean.shape, device=self.device)
            yield z_basal, torch.as_tensor(library[block], device=self.device), self._stored_codes(block)
