"""Counterfactual expression of source cells under chosen perturbations (``predict_perturbation``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from scvi import settings
from scvi.utils import track

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi._utils import _as_labels, _as_positions, _check_positive, _seeded

# most values predict_perturbation decodes in one tensor (2**33 float32: 32 GiB); above that it asks for fewer samples
PREDICT_MAX_VALUES = 2**33


class PredictionMixin:
    """Counterfactual expression of observed cells under any perturbation or combination (``predict_perturbation``)."""

    @torch.inference_mode()
    def predict_perturbation(
        self,
        perturbations: Sequence[str] | None = None,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        expression: Literal["normalized", "counts", "log1p"] = "normalized",
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
            the source cell's observed library size, from one of ``n_samples`` posterior samples of the globals
            and the basal state chosen at random for each cell. ``"log1p"``: that draw put on the scale scanpy gives observed
            cells, ``log(1 + target_sum * x / sum(x))`` (:func:`scanpy.pp.normalize_total` then
            :func:`scanpy.pp.log1p`): the input cell-eval's ``MetricsEvaluator`` expects, with the cell-to-cell
            noise of real cells (a posterior mean has none, which inflates DE calls and distances); see
            :func:`sams_scvi.tl.prediction_pair`. Negative-binomial models only.
        target_sum
            Total per cell for ``"normalized"`` and ``"log1p"``.
        n_samples
            Posterior samples (of the globals and of the basal state): averaged for ``"normalized"``, one per
            cell picked from them for ``"counts"`` and ``"log1p"``.
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
        if expression not in ("normalized", "counts", "log1p"):
            raise ValueError("`expression` must be 'normalized', 'counts' or 'log1p'.")
        self._check_if_trained(warn=False)
        if expression == "log1p" and not self.module.px_class.has_counts:
            raise ValueError(
                "expression='log1p' needs counts; a model with likelihood='normal' predicts its data's scale."
            )
        adata = self._validate_anndata(adata)
        state = self._perturbation_state
        perturbation_key = self.registry_["setup_args"]["perturbation_key"]
        if perturbations is None:
            perturbations = [state["control_value"], *state["observed_labels"]]
        perturbations = _as_labels(perturbations)
        if len(perturbations) == 0:
            raise ValueError("`perturbations` is empty.")
        _check_positive("n_samples", n_samples, integer=True)
        _check_positive("target_sum", target_sum)
        if batch_size is not None:
            _check_positive("batch_size", batch_size, integer=True)
        target_design = self._design_for(perturbations)  # (P, T)
        indices = _as_positions(adata, indices)
        if indices is None:
            # the control cells of the AnnData passed (not of the registered one)
            design = self.get_anndata_manager(adata, required=True).get_from_registry(
                SAMS_REGISTRY_KEYS.PERTURBATION_KEY
            )
            indices = np.flatnonzero(np.asarray(sparse.csr_matrix(design).getnnz(axis=1)) == 0)
            if len(indices) == 0:
                raise ValueError("`adata` has no control cells to use as source cells; pass `indices`.")
        if len(indices) == 0:
            raise ValueError("`indices` selects no cells.")
        n_draws = int(n_samples)
        # the largest tensors: the globals' samples (S, T, K) and a minibatch's decoded values (S, cells, P, G)
        cells_per_batch = min(len(indices), batch_size or settings.batch_size)
        n_values = n_draws * max(
            self.module.n_perturbations * self.module.n_latent,
            cells_per_batch * len(perturbations) * self.module.n_input,
        )
        if n_values > PREDICT_MAX_VALUES:
            raise ValueError(
                f"n_samples={n_samples} would decode {n_values:.3g} values at once (n_samples x cells per minibatch x "
                f"perturbations x genes, about {4 * n_values / 2**30:.0f} GiB); lower n_samples (20 is the default), "
                "or batch_size."
            )

        blocks = []
        with _seeded(seed, self.device):
            globals_ = self.module.sample_globals(n_draws, with_kl=False)
            sources = self._source_cells(adata, indices, batch_size, globals_)
            n_blocks = -(-len(indices) // cells_per_batch)
            for z_basal, library, covariates in track(
                sources, description="Predicting perturbations", disable=not progress_bar, total=n_blocks
            ):
                px = self.module.decode(z_basal, target_design, globals_["shift"], library, covariates)  # (S, n, P)
                if expression in ("counts", "log1p"):
                    # Each cell's draw comes from its own posterior sample of the globals and of its basal state,
                    # so a predicted population carries the posterior's uncertainty, not one shared draw of (M, E).
                    counts = _one_draw_per_cell(px, len(library)).sample()
                    values = counts if expression == "counts" else _log1p_normalize(counts, target_sum)
                else:
                    values = px.expression(target_sum).mean(0)
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

    def _source_cells(self, adata: AnnData, indices: np.ndarray, batch_size: int | None, globals_: dict):
        """Per block of source cells: basal draws (S, n, K), libraries (n,) and covariate codes (n, J) or ``None``.

        From the cells' counts, or, on a minified model's own cells, from their stored basal posterior.
        """
        if self._minified_rows(adata, indices) is not None:
            yield from self._stored_source_cells(indices, globals_["shift"].shape[0], batch_size or settings.batch_size)
            return
        for tensors in self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size):
            cells = self.module.infer_cells(tensors, globals_)
            yield cells["z_basal"], cells["library"], self.module.covariate_codes(tensors)


def _one_draw_per_cell(px, n_cells: int):
    """Keep, for each cell, one of the posterior samples of a distribution with batch shape (S, n_cells, ...)."""
    n_draws = px.batch_shape[0]
    draw = torch.randint(n_draws, (n_cells,)).to(px.mean.device)
    return px.select((draw, torch.arange(n_cells, device=draw.device)))


def _log1p_normalize(counts: torch.Tensor, target_sum: float) -> torch.Tensor:
    """``log(1 + target_sum * x / sum(x))`` per row (0 for a row without counts), as scanpy normalises cells."""
    return torch.log1p(counts * (target_sum / counts.sum(-1, keepdim=True).clamp(min=1)))
