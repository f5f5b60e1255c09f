"""Model folders: saving that touches only its own files, and loading that never runs code from a file.

A model folder holds ``{prefix}model.pt`` (:mod:`._model_file`: the module's state, the gene names and the model's
attributes, readable as weights only) and, with ``save_anndata=True``, ``{prefix}adata.h5ad`` (or
``{prefix}mdata.h5mu``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py

from ._model_file import UnsafeModelFileError, read_model_file

# File names of a model folder (after an optional prefix), as scvi-tools names them.
MODEL_FILE = "model.pt"
DATA_FILES = ("adata.h5ad", "mdata.h5mu")


# ---------------------------------------------------------------------------------------------------- loading
def check_saved_attributes(attr_dict, path: Path) -> None:
    """Refuse model attributes that ``save`` never writes.

    scvi-tools sets each saved attribute on the new model and calls the setup method the registry names, so a
    hand-made file could otherwise replace a method of the model or pick which of its methods runs.
    """
    if not isinstance(attr_dict, dict) or not isinstance(attr_dict.get("registry_"), dict):
        raise UnsafeModelFileError(f"Refused to load {str(path)!r}: it holds no model attributes and registry.")
    odd = [name for name in attr_dict if not (isinstance(name, str) and name.endswith("_") and name[0].isalpha())]
    if odd:
        raise UnsafeModelFileError(
            f"Refused to load {str(path)!r}: it sets model attributes {odd[:5]} that model.save() never writes."
        )
    method = attr_dict["registry_"].get("setup_method_name", "setup_anndata")
    if method not in ("setup_anndata", "setup_mudata"):
        raise UnsafeModelFileError(
            f"Refused to load {str(path)!r}: its registry names the setup method {method!r}, not setup_anndata or "
            "setup_mudata."
        )


def read_model_folder_file(path: Path, map_location=None) -> dict:
    """:func:`read_model_file` of a folder's ``model.pt``, with its attributes checked."""
    content = read_model_file(path, map_location=map_location)
    check_saved_attributes(content.get("attr_dict"), path)
    return content


# Set only inside safe_model_loading, in the calling thread or task: whether scvi-tools' file reader is ours, and
# the model files this call has read already (path -> content), so each is read once.
_SAFE_READS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("sams_scvi_safe_reads", default=None)


def _read_saved_files(dir_path, load_adata: bool, prefix=None, map_location=None, backup_url=None):
    """scvi-tools' ``_load_saved_files``, with the model file read by :func:`read_model_folder_file`."""
    from scvi.data._download import _download

    prefix = check_prefix(prefix)
    path = Path(dir_path) / f"{prefix}{MODEL_FILE}"
    if backup_url is not None:
        _download(backup_url, dir_path, path.name)
    reads = _SAFE_READS.get()
    content = reads.pop(path.resolve(), None) if reads is not None else None
    if content is None:
        content = read_model_folder_file(path, map_location=map_location)
    attr_dict = content["attr_dict"]
    adata = None
    if load_adata:
        is_mudata = attr_dict["registry_"].get("setup_method_name") == "setup_mudata"
        data_path = Path(dir_path) / f"{prefix}{DATA_FILES[1] if is_mudata else DATA_FILES[0]}"
        if data_path.exists():
            import anndata
            import mudata

            adata = mudata.read_h5mu(data_path) if is_mudata else anndata.read_h5ad(data_path)
        else:
            warnings.warn(
                "Save path contains no saved anndata and no adata was passed. Model will be loaded without anndata.",
                UserWarning,
                stacklevel=3,
            )
            adata = False
    return attr_dict, content.get("var_names"), content.get("model_state_dict"), adata


def _install_reader() -> None:
    """Route scvi-tools' model-file reader through :func:`_read_saved_files` inside :func:`safe_model_loading`.

    scvi-tools' ``load``, ``load_registry`` and ``view_setup_args`` read a folder through one function of its
    base-model module, which unpickles ``model.pt`` in full. It is replaced, once, by a function that calls ours
    inside :func:`safe_model_loading` (in that thread or task only) and scvi-tools' own everywhere else, so other
    scvi-tools models load as before and concurrent loads do not interfere.
    """
    from scvi.model.base import _base_model

    original = _base_model._load_saved_files
    if getattr(original, "_sams_scvi_router", False):
        return

    def load_saved_files(*args, **kwargs):
        reader = _read_saved_files if _SAFE_READS.get() is not None else original
        return reader(*args, **kwargs)

    load_saved_files._sams_scvi_router = True
    _base_model._load_saved_files = load_saved_files


@contextlib.contextmanager
def safe_model_loading(already_read: dict[Path, dict] | None = None) -> Iterator[None]:
    """Inside, scvi-tools reads model folders with :func:`read_model_folder_file` (see :func:`_install_reader`).

    ``already_read``: model files this call has read (path -> content), used instead of reading them again.
    """
    _install_reader()
    token = _SAFE_READS.set({Path(path).resolve(): content for path, content in (already_read or {}).items()})
    try:
        yield
    finally:
        _SAFE_READS.reset(token)


def check_model_folder(dir_path: str | os.PathLike, prefix: str | None, needs_data: bool) -> dict:
    """Raise an error that names the problem when ``dir_path`` is not a loadable model folder.

    ``needs_data``: the model is loaded with the AnnData saved beside it (``load(dir_path)`` without ``adata``).
    Returns the model file's content (:func:`read_model_folder_file`).
    """
    folder = Path(dir_path)
    prefix = check_prefix(prefix)
    if not folder.exists():
        raise FileNotFoundError(f"No model folder at {str(folder)!r}; pass the folder that model.save() wrote.")
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{str(folder)!r} is a file; pass the folder that model.save() wrote (it holds {prefix}{MODEL_FILE})."
        )
    model_file = folder / f"{prefix}{MODEL_FILE}"
    if not model_file.is_file():
        present = sorted(p.name for p in folder.iterdir())[:10]
        raise FileNotFoundError(
            f"{str(folder)!r} is not a saved model: it has no {model_file.name} (files: {present})."
            + (" Pass the prefix given to model.save()." if any(n.endswith(MODEL_FILE) for n in present) else "")
        )
    content = read_model_folder_file(model_file)
    data_files = [folder / f"{prefix}{name}" for name in DATA_FILES if (folder / f"{prefix}{name}").exists()]
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
    return content


# ---------------------------------------------------------------------------------------------------- saving
def check_prefix(prefix: str | None) -> str:
    """The file-name prefix of a model folder's files; one that leads out of the folder is refused."""
    if prefix is None:
        return ""
    if not isinstance(prefix, str):
        raise TypeError(f"`prefix` must be text (e.g. 'run1_'), not {prefix!r}.")
    separators = {"/", os.sep, *([os.altsep] if os.altsep else [])}
    if any(sep in prefix for sep in separators) or prefix in (".", "..") or "\0" in prefix:
        raise ValueError(
            f"`prefix` {prefix!r} would name a file outside the model folder; use a plain name such as 'run1_' "
            "and choose the folder with `dir_path`."
        )
    return prefix


def _check_target(target: Path, prefix: str) -> None:
    """Refuse to save where this prefix's file names are taken by something a save did not write.

    A folder under a model file's name, or a data file with no model file of the prefix beside it (a user's own
    ``adata.h5ad``), would be overwritten, or later paired with this model by ``load``.
    """
    names = [f"{prefix}{name}" for name in (MODEL_FILE, *DATA_FILES)]
    for name in names:
        path = target / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise ValueError(f"{str(path)!r} is not a file a model save wrote; move it, or pass another `prefix`.")
    if not (target / names[0]).exists():
        foreign = [name for name in names[1:] if (target / name).exists()]
        if foreign:
            raise ValueError(
                f"{str(target)!r} holds {foreign[0]} but no {names[0]} saved with it, so it is not a model's data; "
                "saving would overwrite it or pair it with this model. Move it, or pass another `prefix` or folder."
            )


def save_atomically(
    save: Callable[[Path], None], dir_path: str | os.PathLike, prefix: str | None, overwrite: bool
) -> None:
    """Run ``save(staging)`` into a fresh folder beside ``dir_path``, then move its files into place.

    Only the files of this ``prefix`` are written or removed: ``{prefix}model.pt`` and ``{prefix}adata.h5ad`` /
    ``{prefix}mdata.h5mu``. Other files in the folder, other prefixes' models included, are left alone. A crash
    while writing leaves ``dir_path`` as it was. When replacing a model, its old state is moved aside first and the
    new one moved in last, so a crash in between leaves no model state beside data it was not saved with; an error
    in between puts the old state back. The previous save's data file of this prefix is removed when this save
    writes none (``save_anndata=False``).
    """
    prefix = check_prefix(prefix)
    if str(dir_path) == "":
        raise ValueError("`dir_path` is empty; pass the folder to save the model in (created if missing).")
    target = Path(dir_path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder; choose a folder for the saved model.")
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists. Pass overwrite=True to replace the model saved there.")
    if target.exists():
        _check_target(target, prefix)
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not tempfile.mkdtemp: the folder becomes the model folder, with the permissions the user's umask gives
    staging = target.parent / f".{target.name or 'model'}.saving-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        save(staging)
        if not target.exists():
            staging.rename(target)
            return
        written = {p.name for p in staging.iterdir()}
        own = {f"{prefix}{name}" for name in (MODEL_FILE, *DATA_FILES)}
        if not written <= own:  # scvi-tools' save writes these names only; anything else is not ours to place
            raise RuntimeError(f"Saving wrote unexpected files {sorted(written - own)}; nothing was replaced.")
        _replace_files(staging, target, prefix, written, own)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _replace_files(staging: Path, target: Path, prefix: str, written: set[str], own: set[str]) -> None:
    model_name = f"{prefix}{MODEL_FILE}"
    previous = target / model_name
    aside = staging / f".previous-{model_name}"
    replaces_a_model = previous.exists()
    if replaces_a_model:
        os.replace(previous, aside)
    try:
        for name in sorted(written - {model_name}):
            os.replace(staging / name, target / name)
        if replaces_a_model:  # the data saved with the model just replaced is ours too, and no longer matches
            for name in own - written - {model_name}:
                (target / name).unlink(missing_ok=True)
        os.replace(staging / model_name, target / model_name)
    except BaseException:
        if replaces_a_model and aside.exists() and not previous.exists():
            os.replace(aside, previous)
        raise
