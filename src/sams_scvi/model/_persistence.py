"""Model folders: saving that touches only its own files, and loading that never runs code from a file.

A model folder is written by scvi-tools' ``save``: ``{prefix}model.pt`` (a ``torch.save`` of the module's state,
the gene names and the model's attributes) and, with ``save_anndata=True``, ``{prefix}adata.h5ad`` (or
``{prefix}mdata.h5mu``). ``torch.save`` files are pickles, and unpickling runs whatever a file asks for, so model
files are read by an unpickler that builds tensors and containers and the few other data types a model folder holds
(:func:`read_model_file`). A file that asks for anything else is refused before any of it runs.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import os
import pickle
import shutil
import tempfile
import types
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

# File names scvi-tools writes into a model folder (after an optional prefix).
_MODEL_FILE = "model.pt"
_DATA_FILES = ("adata.h5ad", "mdata.h5mu")


class UnsafeModelFileError(ValueError):
    """A model file asks to run code (or build objects) that a saved model never needs; nothing of it was run."""


# ---------------------------------------------------------------------------------------------------- loading
def _allowed_globals() -> dict[str, object]:
    """The Python names a model file may ask for when unpickled, mapped to the objects they name.

    The tensor rebuilders ``torch.save`` writes; numpy arrays (gene names, cell indices, category codes); the
    registry's ``defaultdict``; the training history's pandas DataFrames. Each builds a data container: a hostile
    file's arguments can make it fail, but cannot make it run code the file names. Every other name
    (``os.system``, ``builtins.eval``, any other class) is refused.
    """
    try:
        from numpy._core import multiarray  # numpy >= 2; files written with numpy 1 name numpy.core.multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    from pandas._libs import internals as block_internals
    from pandas.core.indexes import base as index_base
    from pandas.core.internals import managers

    objects = [
        torch._utils._rebuild_tensor_v2,
        torch._utils._rebuild_parameter,
        collections.OrderedDict,
        collections.defaultdict,
        codecs.encode,  # how protocol-2 pickles spell bytes
        dict,
        list,
        tuple,
        set,
        slice,
        bytes,
        np.ndarray,
        np.dtype,
        *(getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")),
        pd.DataFrame,
        pd.Series,
        pd.Index,
        pd.RangeIndex,
        index_base._new_Index,
        managers.BlockManager,
        managers.SingleBlockManager,
        block_internals._unpickle_block,
    ]
    allowed = {f"{obj.__module__}.{obj.__qualname__}": obj for obj in objects}
    # histories saved as DataFrames by sams-scvi <= 0.2 under pandas 3, whose text columns are extension arrays
    from pandas._libs import arrays as array_internals

    allowed["pandas.arrays.StringArray"] = pd.arrays.StringArray
    allowed["pandas.StringDtype"] = pd.StringDtype
    allowed["pandas.DataFrame"] = pd.DataFrame
    allowed["pandas.Index"] = pd.Index
    allowed["pandas.RangeIndex"] = pd.RangeIndex
    unpickle_backed = getattr(array_internals, "__pyx_unpickle_NDArrayBacked", None)
    if unpickle_backed is not None:  # builds only an allowed array class named in the file
        allowed["pandas._libs.arrays.__pyx_unpickle_NDArrayBacked"] = unpickle_backed
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{module}._reconstruct"] = multiarray._reconstruct
        allowed[f"{module}.scalar"] = multiarray.scalar
    allowed.update({f"__builtin__.{obj.__name__}": obj for obj in (dict, list, tuple, set, slice, bytes)})
    allowed["_codecs.encode"] = codecs.encode
    return allowed


class _ModelFileUnpickler(pickle.Unpickler):
    """An unpickler that builds only :func:`_allowed_globals` (tensors reach it through torch's own loader)."""

    def find_class(self, module: str, name: str):
        obj = _allowed_globals().get(f"{module}.{name}")
        if obj is None:
            raise pickle.UnpicklingError(f"the file asks for {module}.{name}, which a saved model never holds")
        return obj


def _restricted_load(file, **kwargs):
    return _ModelFileUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) builds its unpickler from this module's Unpickler; the legacy format also calls load.
_restricted_pickle = types.SimpleNamespace(
    Unpickler=_ModelFileUnpickler, load=_restricted_load, UnpicklingError=pickle.UnpicklingError, __name__="pickle"
)


def read_model_file(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """Read a ``model.pt`` (or training checkpoint), building only tensors, arrays, tables and containers.

    torch's own ``weights_only=True`` loader cannot read scvi-tools' model files (it rejects the registry's
    ``defaultdict``), so the file is unpickled by an unpickler restricted to :func:`_allowed_globals`.

    Raises
    ------
    UnsafeModelFileError
        The file asks for any other Python name; nothing of it was run.
    ValueError
        The file is damaged (truncated, empty, not a torch file).
    """
    path = Path(path)
    try:
        content = torch.load(path, map_location=map_location, weights_only=False, pickle_module=_restricted_pickle)
    except pickle.UnpicklingError as error:
        if "a saved model never holds" not in str(error):
            raise _damaged(path, error) from None
        raise UnsafeModelFileError(
            f"Refused to load {str(path)!r}: {error}. sams_scvi builds only tensors, arrays and tables from a "
            "model file, and ran nothing from this one. Files written by model.save() load; this one was changed "
            "or made by other software, and loading it in full could run code it carries."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, TypeError) as error:
        raise _damaged(path, error) from None
    if not isinstance(content, dict):
        raise ValueError(f"{str(path)!r} is not a saved model: it holds a {type(content).__name__}, not a dict.")
    return content


def _read_saved_files(dir_path, load_adata: bool, prefix=None, map_location=None, backup_url=None):
    """scvi-tools' ``_load_saved_files``, with the model file read by :func:`read_model_file`."""
    from scvi.data._download import _download

    prefix = check_prefix(prefix)
    model_name = f"{prefix}{_MODEL_FILE}"
    if backup_url is not None:
        _download(backup_url, dir_path, model_name)
    model = read_model_file(Path(dir_path) / model_name, map_location=map_location)
    attr_dict = model.get("attr_dict")
    adata = None
    if load_adata:
        is_mudata = attr_dict["registry_"].get("setup_method_name") == "setup_mudata"
        data_path = Path(dir_path) / f"{prefix}{_DATA_FILES[1] if is_mudata else _DATA_FILES[0]}"
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
    return attr_dict, model.get("var_names"), model.get("model_state_dict"), adata


def history_to_arrays(history: dict | None) -> dict | None:
    """The training history (name -> DataFrame) as plain arrays, which model files hold without pandas' pickles.

    How pandas pickles a DataFrame changes between versions (pandas 3 stores text columns as extension arrays,
    backed by pyarrow where it is installed), and each such type would have to be trusted when loading.
    """
    if history is None:
        return None
    return {
        name: {
            "values": np.asarray(frame.to_numpy(dtype=float)),
            "index": np.asarray(frame.index.to_numpy()),
            "index_name": None if frame.index.name is None else str(frame.index.name),
            "columns": [str(column) for column in frame.columns],
        }
        for name, frame in history.items()
    }


def history_from_arrays(history: dict | None) -> dict | None:
    """Inverse of :func:`history_to_arrays`; a history saved as DataFrames (sams-scvi <= 0.2) is returned as is."""
    if history is None:
        return None
    return {
        name: pd.DataFrame(
            entry["values"], index=pd.Index(entry["index"], name=entry["index_name"]), columns=entry["columns"]
        )
        if isinstance(entry, dict)
        else entry
        for name, entry in history.items()
    }


@contextlib.contextmanager
def safe_model_loading() -> Iterator[None]:
    """Inside, scvi-tools' model loading reads model files with :func:`read_model_file`.

    scvi-tools' ``load``, ``load_registry`` and ``view_setup_args`` unpickle model files in full
    (``torch.load(weights_only=False)``), which runs whatever a file asks for. scvi-tools reads every model folder through one function of its base-model module; it is replaced for the
    duration of the block and restored on exit.
    """
    from scvi.model.base import _base_model

    original = _base_model._load_saved_files
    _base_model._load_saved_files = _read_saved_files
    try:
        yield
    finally:
        _base_model._load_saved_files = original


def _damaged(path: Path, error: BaseException) -> ValueError:
    first_line = str(error).splitlines()[0] if str(error) else ""
    return ValueError(
        f"{str(path)!r} is damaged and cannot be read ({type(error).__name__}: {first_line}). "
        "Save the model again, or train from the last checkpoint (see the user guide, 'Checkpoints and resuming')."
    )


def check_model_folder(dir_path: str | os.PathLike, prefix: str | None, needs_data: bool) -> dict:
    """Raise an error that names the problem when ``dir_path`` is not a loadable model folder.

    ``needs_data``: the model is loaded with the AnnData saved beside it (``load(dir_path)`` without ``adata``).
    Returns the model file's content, read as weights only (:func:`read_model_file`).
    """
    folder = Path(dir_path)
    prefix = check_prefix(prefix)
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
    content = read_model_file(model_file)
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


def save_atomically(
    save: Callable[[Path], None], dir_path: str | os.PathLike, prefix: str | None, overwrite: bool
) -> None:
    """Run ``save(staging)`` into a fresh folder beside ``dir_path``, then move its files into place.

    Only the files of this ``prefix`` are written or removed: ``{prefix}model.pt`` and ``{prefix}adata.h5ad`` /
    ``{prefix}mdata.h5mu``. Other files in the folder, other prefixes' models included, are left alone. A crash
    while writing leaves ``dir_path`` as it was. When replacing a model, its old state is moved aside first and the
    new one moved in last, so a crash in between leaves no model state beside data it was not saved with. The
    previous save's data file of this prefix is removed when this save writes none (``save_anndata=False``).
    """
    prefix = check_prefix(prefix)
    if str(dir_path) == "":
        raise ValueError("`dir_path` is empty; pass the folder to save the model in (created if missing).")
    target = Path(dir_path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder; choose a folder for the saved model.")
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists. Pass overwrite=True to replace the model saved there.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name or 'model'}.saving-", dir=target.parent))
    try:
        save(staging)
        if not target.exists():
            staging.rename(target)
            return
        written = {p.name for p in staging.iterdir()}
        own = {f"{prefix}{name}" for name in (_MODEL_FILE, *_DATA_FILES)}
        if not written <= own:  # scvi-tools' save writes these names only; anything else is not ours to place
            raise RuntimeError(f"Saving wrote unexpected files {sorted(written - own)}; nothing was replaced.")
        model_name = f"{prefix}{_MODEL_FILE}"
        previous_model = target / model_name
        replaces_a_model = previous_model.exists()
        if replaces_a_model:
            os.replace(previous_model, staging / f".previous-{model_name}")
        for name in sorted(written - {model_name}):
            os.replace(staging / name, target / name)
        if replaces_a_model:  # the data saved with the model just replaced is ours too, and no longer matches
            for name in own - written - {model_name}:
                (target / name).unlink(missing_ok=True)
        os.replace(staging / model_name, target / model_name)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
