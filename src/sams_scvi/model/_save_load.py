"""Saving and loading models: scvi-tools' folder layout, written and read without unpickling code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import torch
from mudata import MuData

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi._utils import _check_gene_names

from ._model_file import write_model_file
from ._persistence import (
    DATA_FILES,
    MODEL_FILE,
    check_model_folder,
    check_prefix,
    check_saved_attributes,
    safe_model_loading,
    save_atomically,
)


class SaveLoadMixin:
    """``save``, ``load``, ``load_registry`` and ``view_setup_args`` for model folders that never run code.

    The folder layout is scvi-tools' (``{prefix}model.pt``, ``{prefix}adata.h5ad``); ``model.pt`` holds tensors and
    plain data only (``sams_scvi.model._model_file``), so it is read with ``torch.load(weights_only=True)``.
    """

    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model (and, with ``save_anndata=True``, its AnnData) to the folder ``dir_path``.

        Files are written to a temporary folder beside ``dir_path`` and moved into place when complete, so a
        crash while saving leaves no half-written model. Only this ``prefix``'s files are written or replaced
        (``{prefix}model.pt``, ``{prefix}adata.h5ad``): the folder's other files, other prefixes' models included,
        are left alone, and a file of those names that no save wrote is refused rather than overwritten.

        Parameters
        ----------
        dir_path
            Folder of the saved model (created if missing).
        prefix
            Prefix of the file names, to keep several models in one folder.
        overwrite
            Replace this prefix's model if ``dir_path`` exists.
        save_anndata
            Also save the AnnData (or MuData) the model was set up with.
        save_kwargs
            Arguments of :func:`torch.save`.
        **anndata_write_kwargs
            Arguments of :meth:`anndata.AnnData.write_h5ad`.
        """
        prefix = check_prefix(prefix)

        def write(folder: Path) -> None:
            if save_anndata:
                data_file = DATA_FILES[1] if isinstance(self.adata, MuData) else DATA_FILES[0]
                self.adata.write(folder / f"{prefix}{data_file}", **anndata_write_kwargs)
            attributes = {name: value for name, value in self._get_user_attributes() if name.endswith("_")}
            content = {
                "model_state_dict": self.module.state_dict(),
                "var_names": self.get_var_names(),
                "attr_dict": attributes,
            }
            write_model_file(content, folder / f"{prefix}{MODEL_FILE}", **(save_kwargs or {}))

        save_atomically(write, dir_path, prefix, overwrite)

    @classmethod
    def load(cls, dir_path: str, adata=None, **kwargs):
        """Load a saved model; ``adata`` must hold the same genes, in the same order, as the training data.

        The model file holds tensors and plain data and is read as weights only: a file that holds anything else
        is refused (:class:`~sams_scvi.model.UnsafeModelFileError`) and none of it is read. A missing, incomplete
        or damaged folder raises an error that says which. See :meth:`scvi.model.base.BaseModelClass.load` for
        the arguments.
        """
        already_read = {}
        if kwargs.get("backup_url") is None:
            prefix = check_prefix(kwargs.get("prefix"))
            content = check_model_folder(dir_path, prefix, needs_data=adata is None)
            already_read[Path(dir_path) / f"{prefix}{MODEL_FILE}"] = content
            if adata is not None and adata is not False:
                registry = content["attr_dict"]["registry_"]
                genes = registry["field_registries"][SAMS_REGISTRY_KEYS.X_KEY]["state_registry"]["column_names"]
                _check_gene_names(pd.Index(genes), adata, registry)
        with safe_model_loading(already_read):
            return super().load(dir_path, adata=adata, **kwargs)

    @staticmethod
    def load_registry(dir_path: str, prefix: str | None = None) -> dict:
        """The registry saved with a model (read as weights only, like :meth:`load`)."""
        return check_model_folder(dir_path, prefix, needs_data=False)["attr_dict"]["registry_"]

    @staticmethod
    def view_setup_args(dir_path: str, prefix: str | None = None) -> None:
        """Print the setup arguments saved with a model (read as weights only, like :meth:`load`)."""
        import rich.pretty  # noqa: F401 - scvi-tools' printer uses rich.pretty without importing it
        from scvi.data import AnnDataManager

        registry = check_model_folder(dir_path, prefix, needs_data=False)["attr_dict"]["registry_"]
        AnnDataManager.view_setup_method_args(registry)

    @classmethod
    def convert_legacy_save(
        cls,
        dir_path: str,
        output_dir_path: str,
        overwrite: bool = False,
        prefix: str | None = None,
        trust_source: bool = False,
        **save_kwargs,
    ) -> None:
        """Convert a model folder saved by sams-scvi 0.2 or earlier into the current, weights-only format.

        Those folders' ``model.pt`` holds numpy arrays and pandas tables as Python pickles, which can carry code
        that runs when they are read; :meth:`load` refuses them. This reads one in full, so it runs whatever the
        file carries: convert only folders whose source you trust, and say so with ``trust_source=True``. The
        converted model (and its AnnData, copied) is written to ``output_dir_path``; ``dir_path`` is not changed.
        """
        if trust_source is not True:
            raise ValueError(
                "convert_legacy_save reads the old model file in full, which runs any code it carries. Pass "
                "trust_source=True only for a folder you saved yourself or got from a source you trust."
            )
        prefix = check_prefix(prefix)
        source = Path(dir_path)
        content = torch.load(source / f"{prefix}{MODEL_FILE}", map_location="cpu", weights_only=False)
        check_saved_attributes(content.get("attr_dict"), source / f"{prefix}{MODEL_FILE}")
        model_name = content["attr_dict"]["registry_"].get("model_name")
        if model_name != cls.__name__:
            raise ValueError(f"{str(source)!r} holds a {model_name}, not a {cls.__name__}; convert it with that class.")

        def write(folder: Path) -> None:
            for name in DATA_FILES:
                if (source / f"{prefix}{name}").is_file():
                    shutil.copy2(source / f"{prefix}{name}", folder / f"{prefix}{name}")
            write_model_file(content, folder / f"{prefix}{MODEL_FILE}", **save_kwargs)

        save_atomically(write, output_dir_path, prefix, overwrite)
