"""Periodic training checkpoints from which an interrupted ``train`` resumes exactly where it stopped."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback

LAST_CHECKPOINT = "last.ckpt"


class ResumableCheckpoint(Callback):
    """Write a Lightning checkpoint to ``dirpath/last.ckpt`` every ``every_n_epochs`` epochs.

    The checkpoint holds what :meth:`lightning.pytorch.Trainer.fit` restores with ``ckpt_path`` (module and
    optimiser state, epoch and step counters) plus the global random states (torch, numpy, Python), which
    Lightning does not save: with them, minibatch order and Monte-Carlo draws after a resume are the ones the
    uninterrupted run would have made, so both end with the same parameters.

    A plain callback rather than a :class:`~lightning.pytorch.callbacks.ModelCheckpoint`: scvi-tools' trainer
    turns ``enable_checkpointing`` into its own :class:`scvi.train.SaveCheckpoint`, which keeps model folders
    (without optimiser state) and deletes the Lightning checkpoint that resuming needs.
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_epochs: int = 1) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST_CHECKPOINT

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # after this epoch's validation, so nothing draws random numbers between the save and the next epoch
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        partial = self.dirpath / f".{LAST_CHECKPOINT}.partial"
        trainer.save_checkpoint(partial, weights_only=False)
        if trainer.is_global_zero:
            os.replace(partial, self.last_path)  # a crash while writing keeps the previous checkpoint whole

    def state_dict(self) -> dict:
        numpy_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # tensors and plain numbers only, so the checkpoint loads with torch.load(weights_only=True)
            "numpy": [numpy_state[0], torch.as_tensor(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["torch_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["torch_cuda"])
        name, keys, *rest = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
