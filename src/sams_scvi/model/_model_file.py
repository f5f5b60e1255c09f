"""The model file, ``model.pt``, in a form that torch reads without running code.

``torch.save`` writes pickles, and unpickling runs whatever a file asks for. scvi-tools' model file holds numpy
arrays, a ``defaultdict`` and (in the training history) pandas DataFrames, which torch's weights-only reader refuses,
so scvi-tools reads it with ``torch.load(weights_only=False)``. Allowing those types by name is not safe either:
rebuilding a numpy dtype or a pandas block from a file's bytes lets a hostile file forge pointers or change classes
in the reading process. So the package writes ``model.pt`` with tensors, text, numbers and plain containers only
(:func:`encode`), each numpy array or table tagged with what it was, and reads it with ``torch.load(weights_only=True)``
and nothing allowed beyond torch's defaults (:func:`read_model_file`), then rebuilds the arrays from their plain
content (:func:`decode`).
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

# The key of the dicts that stand for a numpy array, a defaultdict or a table in a model file.
_TYPE = "__sams_scvi_type__"
_TEXT_DTYPE = re.compile(r"[<>|=]?[US][0-9]*|O")


class UnsafeModelFileError(ValueError):
    """A model file holds Python objects that a saved model never holds; it was refused, unread."""


def encode(value):
    """``value`` with every numpy array, numpy scalar, ``defaultdict`` and pandas table replaced by plain data.

    Tensors, text, numbers, ``None``, lists, tuples and dicts stay as they are (dict keys must be text or numbers).
    """
    if value is None or isinstance(value, str | bool | int | float | torch.Tensor):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            return {_TYPE: "ndarray", "values": torch.from_numpy(np.array(value, copy=True))}
        if value.dtype.kind in "OUS":
            return {
                _TYPE: "ndarray",
                "text": [str(item) for item in value.ravel()],
                "shape": list(value.shape),
                "dtype": value.dtype.str if value.dtype.kind in "US" else "O",
            }
        raise TypeError(f"A model file cannot hold numpy arrays of dtype {value.dtype}.")
    if isinstance(value, pd.DataFrame):
        return {
            _TYPE: "DataFrame",
            "values": encode(value.to_numpy(dtype=float)),
            "index": encode(value.index.to_numpy()),
            "index_name": None if value.index.name is None else str(value.index.name),
            "columns": [str(column) for column in value.columns],
        }
    if isinstance(value, collections.defaultdict):
        if value.default_factory not in (dict, list, None):
            raise TypeError(f"A model file cannot hold a defaultdict of {value.default_factory!r}.")
        factory = None if value.default_factory is None else value.default_factory.__name__
        return {_TYPE: "defaultdict", "factory": factory, "items": encode(dict(value))}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str | int | float | bool):
                raise TypeError(f"A model file cannot hold a dict with a key of type {type(key).__name__}.")
        return type(value)((key, encode(item)) for key, item in value.items())  # OrderedDict stays one
    if isinstance(value, list | tuple):
        return type(value)(encode(item) for item in value)
    raise TypeError(f"A model file cannot hold a {type(value).__name__}.")


def decode(value):
    """Inverse of :func:`encode`: numpy arrays, ``defaultdict`` s and tables rebuilt from their plain content."""
    if isinstance(value, dict):
        kind = value.get(_TYPE)
        if kind is None:
            return type(value)((key, decode(item)) for key, item in value.items())
        if kind == "ndarray" and "values" in value:
            return value["values"].numpy()
        if kind == "ndarray":
            dtype = value["dtype"]
            if not isinstance(dtype, str) or not _TEXT_DTYPE.fullmatch(dtype):
                raise UnsafeModelFileError(f"A model file names the text dtype {dtype!r}.")
            return np.array(value["text"], dtype=object if dtype == "O" else dtype).reshape(value["shape"])
        if kind == "defaultdict":
            factory = {"dict": dict, "list": list, None: None}[value["factory"]]
            return collections.defaultdict(factory, decode(value["items"]))
        if kind == "DataFrame":
            return pd.DataFrame(
                decode(value["values"]),
                index=pd.Index(decode(value["index"]), name=value["index_name"]),
                columns=value["columns"],
            )
        raise UnsafeModelFileError(f"A model file holds an entry of unknown type {kind!r}.")
    if isinstance(value, list | tuple):
        return type(value)(decode(item) for item in value)
    return value


def read_model_file(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """Read a ``model.pt`` written by :func:`write_model_file`, as weights only, and :func:`decode` it.

    Raises
    ------
    UnsafeModelFileError
        The file holds Python objects beyond tensors and plain data (a file of sams-scvi <= 0.2 does:
        ``convert_legacy_save`` converts one whose source you trust). Nothing of it was run.
    ValueError
        The file is damaged (truncated, empty, not a torch file).
    """
    path = Path(path)
    # torch's reader of its pre-1.6 tar format extracts members to disk before any check; model.save() writes zip
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{str(path)!r} is damaged or not a model file written by model.save() (not a zip archive). Save the "
            "model again, or train from the last checkpoint (see the user guide, 'Checkpoints and resuming')."
        )
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeModelFileError(
            f"Refused to load {str(path)!r}: it holds Python objects that a model file of this version never holds, "
            "and reading them could run code. It was not read. A folder saved by sams-scvi 0.2 or earlier can be "
            "converted once with SAMSVAE.convert_legacy_save(dir_path, output_dir_path, trust_source=True), if you "
            "trust where it came from."
        ) from None
    except Exception as error:  # noqa: BLE001 - torch, zipfile and the unpickler fail in many ways on a damaged file
        raise ValueError(
            f"{str(path)!r} is damaged and cannot be read ({type(error).__name__}). Save the model again, or train "
            "from the last checkpoint (see the user guide, 'Checkpoints and resuming')."
        ) from None
    if not isinstance(content, dict):
        raise ValueError(f"{str(path)!r} is not a saved model: it holds a {type(content).__name__}, not a dict.")
    try:
        return decode(content)
    except UnsafeModelFileError:
        raise
    except Exception as error:  # noqa: BLE001 - an entry tagged as an array or table, without the parts written
        raise ValueError(f"{str(path)!r} is damaged: an entry cannot be rebuilt ({type(error).__name__}).") from None


def write_model_file(content: dict, path: str | os.PathLike, **save_kwargs) -> None:
    """``torch.save`` of :func:`encode` of ``content``: a file :func:`read_model_file` reads as weights only."""
    torch.save(encode(content), path, **save_kwargs)
