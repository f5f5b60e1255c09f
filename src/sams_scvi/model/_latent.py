"""The latent space of observed cells and the likelihood bounds: scvi-tools' latent and ELBO getters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from anndata import AnnData
from scipy import sparse

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi._utils import _check_positive, _seeded

# control cells encoded per minibatch when their basal posterior is collected (encoder only: no decoding)
CONTROL_BATCH_SIZE = 1024


class LatentMixin:
    """Basal and perturbed latent states, observed library sizes, and the ELBO and IWELBO of cells."""

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
        shift). Globals are at their posterior point estimate (mask mode, embedding mean), so the result is
        deterministic.
        """
        if representation not in ("basal", "perturbed"):
            raise ValueError("`representation` must be 'basal' or 'perturbed'.")
        latents = self._basal_posterior(adata, indices, batch_size, with_offset=representation == "perturbed")
        return latents[0] if representation == "basal" else latents[0] + latents[2]

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        **kwargs,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The basal latent state :math:`z_b` of each cell, in scvi-tools' signature.

        ``give_mean=True``: the posterior mean (as :meth:`get_latent`); ``False``: one draw from
        :math:`q(z_b \\mid x)`. ``return_dist=True``: the posterior's mean and standard deviation, each
        (cells, n_latent). Under penetrance the posterior is a mixture over the cell's response patterns; its mean
        and standard deviation are those of the mixture. The globals are at their point estimate. ``mc_samples``
        is not used (the mean is exact).
        """
        mean, scale, _ = self._basal_posterior(adata, indices, batch_size, with_offset=False)
        if return_dist:
            return mean, scale
        if give_mean:
            return mean
        return mean + scale * np.random.standard_normal(mean.shape).astype(mean.dtype)

    @torch.inference_mode()
    def _basal_posterior(
        self, adata: AnnData | None, indices: Sequence[int] | None, batch_size: int | None, with_offset: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Mean and standard deviation of :math:`q(z_b \\mid x)`, and the mean offset, (cells, K) each."""
        self._check_if_trained(warn=False)
        rows = self._minified_rows(adata, indices)
        if rows is not None:
            mean, scale, offset = self._stored_posterior(rows)
            return mean, scale, (offset if with_offset else None)
        adata = self._validate_anndata(adata)
        globals_ = self.module.point_globals()
        means, scales, offsets = [], [], []
        for tensors in self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size):
            cells = self.module.infer_cells(tensors, globals_)  # one particle: the globals are at their point
            means.append(cells["basal_mean"][0].cpu().numpy())
            scales.append(cells["basal_scale"][0].cpu().numpy())
            if with_offset:
                offsets.append(cells["offset"][0].cpu().numpy())
        return np.concatenate(means), np.concatenate(scales), (np.concatenate(offsets) if with_offset else None)

    @torch.inference_mode()
    def get_latent_library_size(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Library size of each cell, (cells, 1): the observed total count, which the model conditions on.

        The library is not a latent variable here, so ``give_mean`` changes nothing.
        """
        self._check_if_trained(warn=False)
        rows = self._minified_rows(adata, indices)
        if rows is not None:
            return self._stored_library()[rows, None]
        adata = self._validate_anndata(adata)
        sizes = [
            tensors[SAMS_REGISTRY_KEYS.X_KEY].sum(-1, keepdim=True).numpy()
            for tensors in self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        ]
        return np.concatenate(sizes)

    @torch.inference_mode()
    def _control_basal_posterior(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Location and scale of :math:`q(z_b \\mid x_i)` (n_control, K) of the control cells, and their covariates.

        A control cell has no offset, so its basal posterior does not depend on the globals. The covariate codes
        are ``None`` when the decoder has no covariates.
        """
        if self.adata is None:
            raise ValueError("basal='control' needs the registered AnnData (its control cells).")
        if self.is_minified:
            return self._stored_control_posterior()
        design = sparse.csr_matrix(self.adata_manager.get_from_registry(SAMS_REGISTRY_KEYS.PERTURBATION_KEY))
        controls = np.flatnonzero(design.getnnz(axis=1) == 0)
        globals_ = self.module.point_globals()
        locs, scales, codes = [], [], []
        for tensors in self._make_data_loader(adata=self.adata, indices=controls, batch_size=CONTROL_BATCH_SIZE):
            out = self.module.inference(**self.module._get_inference_input(tensors), global_samples=globals_)
            qz = out["qz"]
            scale = qz.scale if qz.scale.dim() == 2 else qz.scale[0]
            locs.append(self.module.basal_mean(out)[0])
            scales.append(scale)
            covariates = self.module.covariate_codes(tensors)
            if covariates is not None and not self.module.decoder_covariates.is_empty:
                codes.append(covariates.to(scale.device))  # the loader's tensors stay on the CPU
        return torch.cat(locs), torch.cat(scales), (torch.cat(codes) if codes else None)

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
        _check_positive("n_samples", n_samples, integer=True)
        n_samples = int(n_samples)
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        local_terms, present = [], None
        with _seeded(seed, self.device):
            globals_ = self.module.sample_globals(n_samples)
            for tensors in self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size):
                log_w = self.module.log_importance_weights(tensors, globals_)
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
        + \\log p(z^{b(s)}) - \\log q(z^{b(s)} \\mid \\cdot)]` (``docs/model.md``). Samples are decoded
        ``n_samples_per_pass`` at a time, so memory is bounded by ``n_samples_per_pass x batch_size x genes``.
        Returns the mean over cells, or per-cell values (``return_mean=False``).
        """
        _check_positive("n_mc_samples", n_mc_samples, integer=True)
        _check_positive("n_samples_per_pass", n_samples_per_pass, integer=True)
        n_mc_samples, n_samples_per_pass = int(n_mc_samples), int(n_samples_per_pass)
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        values = []
        with _seeded(seed, self.device):
            globals_ = self.module.sample_globals(n_mc_samples)
            for tensors in self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size):
                values.append(self.module.marginal_ll(tensors, globals_, n_samples_per_pass).cpu().numpy())
        values = np.concatenate(values)
        return float(values.mean()) if return_mean else values
