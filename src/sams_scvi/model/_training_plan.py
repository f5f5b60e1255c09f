"""Training plan: fits the data statistics SAMS-VAE needs from the training split before the first step."""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse
from scvi.train import TrainingPlan

from sams_scvi._constants import SAMS_REGISTRY_KEYS


def log1p_mean_std(x, indices: np.ndarray, chunk_size: int = 10_000, log: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and unbiased standard deviation of ``log(1 + x)`` (or of ``x``) over the rows ``indices``.

    Accumulated in chunks of rows; ``log=False`` uses the values themselves (the ``"normal"`` likelihood's input).

    Genes with zero variance (e.g. no counts in these cells) get standard deviation 1, so the encoder
    input stays finite (the reference divides by zero there).
    """
    n_genes = x.shape[1]
    total = np.zeros(n_genes)
    total_sq = np.zeros(n_genes)
    indices = np.sort(np.asarray(indices))
    for start in range(0, len(indices), chunk_size):
        block = x[indices[start : start + chunk_size]]
        block = block.toarray() if sparse.issparse(block) else np.asarray(block)
        block = block.astype(np.float64)
        block = np.log1p(block) if log else block
        total += block.sum(0)
        total_sq += (block**2).sum(0)
    n = len(indices)
    mean = total / n
    var = (total_sq - n * mean**2) / max(n - 1, 1)
    std = np.sqrt(np.clip(var, 0.0, None))
    std[std < 1e-8] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def perturbation_cell_counts(design, indices: np.ndarray) -> np.ndarray:
    """Number of cells among ``indices`` that receive each perturbation (nonzero column entries)."""
    block = design[np.sort(np.asarray(indices))]
    if sparse.issparse(block):
        return np.asarray((block != 0).sum(0)).ravel().astype(np.float32)
    return (np.asarray(block) != 0).sum(0).astype(np.float32)


class SAMSTrainingPlan(TrainingPlan):
    """scvi-tools' :class:`~scvi.train.TrainingPlan` plus the data-dependent state of SAMS-VAE.

    On fit start it computes, from the cells of the training split:

    * the per-gene mean and standard deviation of ``log(1 + x)`` for the encoder input (first fit only);
    * the number of training cells per perturbation, :math:`n_t`, which weights each perturbation's global KL
      (spec §3.1). Validation steps use the validation split's own counts, as in the reference.

    It can also train the free per-perturbation variational parameters (mask logits, embedding parameters) with
    learning rate ``lr * global_lr_factor``: a mask logit must travel from 0 to about logit(alpha) = -4.6 and
    Adam moves it by at most ``lr`` per step, which takes thousands of steps (spec §9.5). The objective is
    unchanged; the default (1) is the reference's single learning rate.

    Parameters
    ----------
    module
        A :class:`~sams_scvi.module.SAMSModule`.
    global_lr_factor
        Learning-rate multiplier of the per-perturbation variational parameters.
    **kwargs
        Arguments of :class:`scvi.train.TrainingPlan`.
    """

    def __init__(self, module, *, global_lr_factor: float = 1.0, **kwargs) -> None:
        super().__init__(module, **kwargs)
        self.global_lr_factor = global_lr_factor

    def configure_optimizers(self):
        config = super().configure_optimizers()
        optimizer = config["optimizer"] if isinstance(config, dict) else config
        global_ids = {id(p) for p in self.module.global_variational_parameters()}
        base = optimizer.param_groups[0]
        base["params"] = [p for p in base["params"] if id(p) not in global_ids]
        optimizer.add_param_group(
            {"params": self.module.global_variational_parameters(), "lr": base["lr"] * self.global_lr_factor}
        )
        return config

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = self.trainer.datamodule
        manager = datamodule.adata_manager
        x = manager.get_from_registry(SAMS_REGISTRY_KEYS.X_KEY)
        design = manager.get_from_registry(SAMS_REGISTRY_KEYS.PERTURBATION_KEY)
        module = self.module
        if not bool(module.normalization_fitted):
            mean, std = log1p_mean_std(x, datamodule.train_idx, log=module.likelihood != "normal")
            module.x_log_mean.copy_(torch.as_tensor(mean))
            module.x_log_std.copy_(torch.as_tensor(std))
            module.normalization_fitted.fill_(True)
        module.train_perturbation_counts.copy_(torch.as_tensor(perturbation_cell_counts(design, datamodule.train_idx)))
        val_idx = getattr(datamodule, "val_idx", None)
        self._validation_counts = (
            torch.as_tensor(perturbation_cell_counts(design, val_idx), device=module.train_perturbation_counts.device)
            if val_idx is not None and len(val_idx) > 0
            else None
        )

    def on_validation_epoch_start(self) -> None:
        if getattr(self, "_validation_counts", None) is not None:
            self.loss_kwargs["perturbation_counts"] = self._validation_counts.to(self.module.x_log_mean.device)

    def on_validation_epoch_end(self) -> None:
        self.loss_kwargs.pop("perturbation_counts", None)
        super().on_validation_epoch_end()
