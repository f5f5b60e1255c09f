"""Training plan: fits the data statistics SAMS-VAE needs from the training split before the first step."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import sparse
from scvi.train import TrainingPlan

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi._defaults import ALIGN_MASK_LOGIT, ALIGN_THRESHOLD
from sams_scvi.model._schedule import align_epoch, typical_cells_per_perturbation, updates_per_epoch


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
      (``docs/model.md``). Validation steps use the validation split's own counts, as in the reference.

    It can also train the free per-perturbation variational parameters (mask logits, embedding parameters) with
    learning rate ``lr * global_lr_factor``: a mask logit must travel from 0 to about logit(alpha) = -4.6 and
    Adam moves it by at most ``lr`` per step, which takes thousands of steps (``docs/model.md``). The objective is
    unchanged; the default (1) is the reference's single learning rate.

    Parameters
    ----------
    module
        A :class:`~sams_scvi.module.SAMSModule`.
    global_lr_factor
        Learning-rate multiplier of the per-perturbation variational parameters.
    align_after_updates
        Align the latent axes with the mechanism (:meth:`~sams_scvi.module.SAMSModule.align_mechanism`) after this
        many updates of a typical perturbation (optimiser steps whose minibatch holds its cells,
        :func:`~sams_scvi.model.updates_per_epoch`), or half way through a shorter run: the latent space is
        rotated, at no cost to the likelihood, to the basis in which the learned shifts are sparsest, and the masks
        restart there. Keyed to updates, not to a fraction of ``max_epochs``, so that a longer run aligns at the
        same point and only trains longer afterwards. ``None``: never (the reference). Only for mechanisms with
        masks.
    align_at
        Instead of ``align_after_updates``: align after this fraction of ``max_epochs`` (at least one epoch), the
        schedule of sams-scvi 0.2. A longer run then aligns later, after the masks' KL has pruned more.
    align_threshold
        A rotated shift entry restarts with its mask on if it is at least this fraction of its perturbation's
        largest entry (or is needed to keep 90 % of the shift's squared norm).
    align_mask_logit
        The restarted mask logits are ``align_mask_logit`` (on) and ``-align_mask_logit`` (off). Held masks are
        still sampled: at 3 (q = 0.95) each off entry would be drawn on, with an embedding from its prior, in 5 %
        of the samples, noise that shrinks the predicted effects; at 8, in 0.03 %.
    mask_hold
        Fraction of ``max_epochs`` after the alignment during which the mask logits are held, so that the networks
        settle in the new basis before the masks move again; ``None``: to the end of training, so that the masks
        are those chosen at the alignment (sparser; freed masks regain entries, docs/model.md).
    **kwargs
        Arguments of :class:`scvi.train.TrainingPlan`.
    """

    def __init__(
        self,
        module,
        *,
        global_lr_factor: float = 1.0,
        align_after_updates: int | None = None,
        align_at: float | None = None,
        align_threshold: float = ALIGN_THRESHOLD,
        align_mask_logit: float = ALIGN_MASK_LOGIT,
        mask_hold: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(module, **kwargs)
        if align_at is not None and not 0.0 <= align_at < 1.0:
            raise ValueError(f"`align_at` must be a fraction of the epochs in [0, 1) or None, not {align_at}.")
        if align_after_updates is not None and (
            isinstance(align_after_updates, bool) or not isinstance(align_after_updates, int) or align_after_updates < 1
        ):
            raise ValueError(f"`align_after_updates` must be a positive integer or None, not {align_after_updates!r}.")
        if align_at is not None and align_after_updates is not None:
            raise ValueError(
                "Pass either `align_after_updates` (updates per perturbation) or `align_at` (a fraction of max_epochs), "
                "not both: set the other to None."
            )
        if (align_at is not None or align_after_updates is not None) and not hasattr(module.mechanism, "rotate"):
            raise ValueError(
                f"Aligning the axes needs a mechanism with masks, not {module.mechanism_name!r}; pass "
                "align_after_updates=None."
            )
        self.global_lr_factor = global_lr_factor
        self.align_after_updates = align_after_updates
        self.align_at = align_at
        self.align_threshold = align_threshold
        self.align_mask_logit = align_mask_logit
        self.mask_hold = mask_hold

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
            mean, std = log1p_mean_std(x, datamodule.train_idx, log=module.px_class.log_input)
            module.input_mean.copy_(torch.as_tensor(mean))
            module.input_std.copy_(torch.as_tensor(std))
            module.normalization_fitted.fill_(True)
        module.train_perturbation_counts.copy_(torch.as_tensor(perturbation_cell_counts(design, datamodule.train_idx)))
        val_idx = getattr(datamodule, "val_idx", None)
        self._validation_counts = (
            torch.as_tensor(perturbation_cell_counts(design, val_idx), device=module.train_perturbation_counts.device)
            if val_idx is not None and len(val_idx) > 0
            else None
        )

    def updates_per_epoch(self) -> float:
        """Expected steps per epoch whose minibatch holds a typical perturbation's training cells."""
        steps = max(int(self.trainer.num_training_batches), 1)
        n_train = len(self.trainer.datamodule.train_idx)
        cells = typical_cells_per_perturbation(self.module.train_perturbation_counts.cpu().numpy())
        return updates_per_epoch(n_train, math.ceil(n_train / steps), cells)

    def alignment_epoch(self) -> int | None:
        """First epoch trained in the aligned basis (``None``: no alignment)."""
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or (self.align_at is None and self.align_after_updates is None):
            return None
        if self.align_at is not None:
            return max(int(self.align_at * max_epochs), 1)  # after at least one epoch
        return align_epoch(max_epochs, self.updates_per_epoch(), self.align_after_updates)

    def on_train_epoch_start(self) -> None:
        first_aligned = self.alignment_epoch()
        if first_aligned is None:
            return
        hold = self.trainer.max_epochs if self.mask_hold is None else int(self.mask_hold * self.trainer.max_epochs)
        release_epoch = first_aligned + max(hold, 0)
        if self.current_epoch == first_aligned:
            self.module.align_mechanism(self.align_threshold, self.align_mask_logit)
            for optimizer in self.trainer.optimizers:  # Adam's moments refer to the old basis
                optimizer.state.clear()
        # set every epoch (not only at the switches), so a run resumed from a checkpoint holds the masks too
        held = first_aligned <= self.current_epoch < release_epoch
        self.module.mechanism.mask_logits.requires_grad_(not held)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.module.mechanism.has_shift:
            # once per epoch: with a correlated guide the point shifts cost a pass of its network over all T
            self.log(
                "shift_magnitude_train", self.module.shift_magnitude(), on_epoch=True, sync_dist=self.use_sync_dist
            )

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.align_at is not None or self.align_after_updates is not None:
            self.module.mechanism.mask_logits.requires_grad_(True)

    def compute_and_log_metrics(self, loss_output, metrics: dict, mode: str) -> None:
        """scvi-tools' metrics, with the module's extra metrics logged outside ``torch.inference_mode``.

        scvi-tools logs extra metrics inside ``inference_mode``, so during training Lightning's accumulators for them
        become inference tensors, which distributed training cannot reduce in place at the end of the epoch
        ("Inplace update to inference tensor outside InferenceMode"). Validation runs in inference mode anyway.
        """
        extra, loss_output.extra_metrics = loss_output.extra_metrics, {}
        try:
            super().compute_and_log_metrics(loss_output, metrics, mode)
        finally:
            loss_output.extra_metrics = extra
        for key, value in (extra or {}).items():
            self.log(
                f"{key}_{mode}",
                value.detach() if isinstance(value, torch.Tensor) else value,
                on_step=self.on_step,
                on_epoch=self.on_epoch,
                batch_size=loss_output.n_obs_minibatch,
                sync_dist=self.use_sync_dist,
            )

    def on_validation_epoch_start(self) -> None:
        if getattr(self, "_validation_counts", None) is not None:
            self.loss_kwargs["perturbation_counts"] = self._validation_counts.to(self.module.input_mean.device)

    def on_validation_epoch_end(self) -> None:
        self.loss_kwargs.pop("perturbation_counts", None)
        super().on_validation_epoch_end()
