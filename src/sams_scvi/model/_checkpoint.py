"""Periodic training checkpoints from which an interrupted ``train`` resumes exactly where it stopped."""

from __future__ import annotations

import json
import os
import pickle
import random
import zipfile
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

    def __init__(self, dirpath: str | os.PathLike, every_n_epochs: int = 1, settings: dict | None = None) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        # what the run was started with (model, data, training arguments), compared when resuming
        self.settings = _as_json(settings or {})

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
            "settings": json.dumps(self.settings, sort_keys=True),  # text: loads as weights only
        }

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["torch_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["torch_cuda"])
        name, keys, *rest = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))


def _as_json(value) -> dict:
    """``value`` as JSON reads it back: lists for tuples, text for anything JSON has no type for."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def checkpoint_settings(path: str | os.PathLike) -> dict | None:
    """The settings a checkpoint was written with (``None`` for one written before they were stored).

    Read with ``torch.load(weights_only=True)``, as Lightning reads it to resume: a file that asks to run code is
    refused, and a damaged one (empty, truncated) raises an error that says how to start over.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"Refused to resume from {str(path)!r}: it holds Python objects a training checkpoint never holds, and "
            "it was not read. Delete it (or choose another checkpoint_dir) to train from the beginning."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(
            f"Cannot resume: the checkpoint {str(path)!r} is damaged ({type(error).__name__}). Delete it (or choose "
            "another checkpoint_dir) to train from the beginning."
        ) from None
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith(ResumableCheckpoint.__qualname__) and "settings" in state:
            return json.loads(state["settings"])
    return None


def settings_differences(saved: dict, current: dict, path: str = "") -> list[str]:
    """One line per setting that differs between a checkpoint and the run that resumes from it.

    Nested settings (model arguments, ``plan_kwargs``) are compared key by key and named by their path.
    """
    current = _as_json(current)
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        name = f"{path}{key}"
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            lines += settings_differences(old, new, f"{name}.")
        elif isinstance(old, list) and isinstance(new, list) and (len(old) > 5 or len(new) > 5):
            first = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
            lines.append(f"{name}: {len(old)} in the checkpoint, {len(new)} now, first difference at position {first}")
        else:
            lines.append(f"{name}: {old!r} in the checkpoint, {new!r} now")
    return lines


class InterruptWatch(Callback):
    """Records the epoch at which the user stopped training (Ctrl+C), which Lightning turns into ``SystemExit``."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch: int | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.epoch = trainer.current_epoch
