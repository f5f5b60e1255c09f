"""Saving that never leaves a half-written model folder, and loading that says what is wrong with one."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import h5py
import torch

# File names scvi-tools writes into a model folder (after an optional prefix).
_MODEL_FILE = "model.pt"
_DATA_FILES = ("adata.h5ad", "mdata.h5mu")


def save_atomically(save, dir_path: str | os.PathLike, overwrite: bool) -> None:
    """Run ``save(tmp_dir)`` into a fresh folder next to ``dir_path``, then move the result into place.

    A crash (or an error) while writing leaves ``dir_path`` as it was. A new folder appears with one rename.
    When overwriting a folder that holds only model files, the folders are swapped by renames; a folder with
    other files of the user's keeps them, and each model file is replaced by its own rename, the model state
    last, so a crash never leaves a model state next to data it was not saved with.
    """
    target = Path(dir_path)
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists. Pass overwrite=True to replace the model saved there.")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder; choose a folder for the saved model.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        save(staging)
        written = sorted(p.name for p in staging.iterdir())
        if not target.exists():
            staging.rename(target)
            return
        existing = {p.name for p in target.iterdir()}
        if existing <= set(written) | _model_files(existing):
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
            backup.rmdir()
            target.rename(backup)
            staging.rename(target)
            shutil.rmtree(backup, ignore_errors=True)
            return
        for name in sorted(written, key=lambda n: n.endswith(_MODEL_FILE)):  # the model state last
            os.replace(staging / name, target / name)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _model_files(names: set[str]) -> set[str]:
    """Names in a folder that are files of a saved model (any prefix)."""
    return {name for name in names if name.endswith((_MODEL_FILE, *_DATA_FILES))}


def check_model_folder(dir_path: str | os.PathLike, prefix: str | None, needs_data: bool) -> None:
    """Raise an error that names the problem when ``dir_path`` is not a loadable model folder.

    ``needs_data``: the model is loaded with the AnnData saved beside it (``load(dir_path)`` without ``adata``).
    """
    folder = Path(dir_path)
    prefix = prefix or ""
    if not folder.exists():
        raise FileNotFoundError(f"No model folder at {str(folder)!r}; pass the folder that model.save() wrote.")
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{str(folder)!r} is a file; pass the folder that model.save() wrote (it holds {prefix}{_MODEL_FILE})."
        )
    model_file = folder / f"{prefix}{_MODEL_FILE}"
    if not model_file.exists():
        present = sorted(p.name for p in folder.iterdir())[:10]
        raise FileNotFoundError(
            f"{str(folder)!r} is not a saved model: it has no {model_file.name} (files: {present})."
            + (" Pass the prefix given to model.save()." if any(n.endswith(_MODEL_FILE) for n in present) else "")
        )
    try:
        torch.load(model_file, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"{str(model_file)!r} is damaged and cannot be read ({type(error).__name__}: {error}). Save the model "
            "again, or train from the last checkpoint (see the user guide, 'Checkpoints and resuming')."
        ) from None
    data_files = [folder / f"{prefix}{name}" for name in _DATA_FILES if (folder / f"{prefix}{name}").exists()]
    if needs_data:
        for data_file in data_files:
            if not h5py.is_hdf5(data_file):
                raise ValueError(
                    f"{str(data_file)!r} is damaged and cannot be read. Pass the training data as "
                    "`adata` to load the model without it, or save the model again."
                )
        if not data_files:
            raise ValueError(
                f"{str(folder)!r} holds no saved AnnData (the model was saved with save_anndata=False); pass the "
                "training data: load(dir_path, adata=adata)."
            )
