"""Share a trained model through scvi-tools' hub (:class:`scvi.hub.HubModel`, Hugging Face)."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

from sams_scvi.model._persistence import read_model_folder_file

#: scvi-tools' file names (``scvi.hub``): its required metadata and the Hugging Face model card.
METADATA_FILE = "_scvi_required_metadata.json"
MODEL_CARD_FILE = "README.md"
_MARK = "<!-- written by sams_scvi.hub.write_hub_files -->"


def write_hub_files(
    dir_path: str | Path,
    *,
    license_info: str = "cc-by-4.0",
    description: str | None = None,
    training_data_url: str | None = None,
    training_code_url: str | None = None,
    references: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write scvi-tools' hub metadata and a model card next to a model saved with ``model.save(dir_path)``.

    Afterwards ``scvi.hub.HubModel(dir_path)`` reads the folder as it reads scvi-tools' own models:
    ``load_model()`` builds the model through ``sams_scvi`` (whose ``load`` reads tensors only) and
    ``push_to_huggingface_hub`` uploads it. scvi-tools' ``HubModelCardHelper`` and ``HubMetadata.from_dir`` assume
    models of ``scvi.model``; this writes the same two files for this package's models.

    Parameters
    ----------
    dir_path
        Folder written by ``save`` without a ``prefix`` (scvi-tools' hub reads ``model.pt``).
    license_info
        License of the model, as a Hugging Face license identifier.
    description, training_data_url, training_code_url, references
        Text and links for the model card.
    overwrite
        Replace the two files if an earlier call wrote them. Files of the same names that this function did not
        write (a README of your own) are never replaced.

    Returns
    -------
    The paths written: the metadata JSON and ``README.md``.
    """
    folder = Path(dir_path)
    content = read_model_folder_file(folder / "model.pt", map_location="cpu")
    attributes = content["attr_dict"]
    registry = attributes["registry_"]
    metadata_path, card_path = folder / METADATA_FILE, folder / MODEL_CARD_FILE
    for path in (metadata_path, card_path):
        if path.exists() and not (overwrite and _written_here(path)):
            raise FileExistsError(
                f"{str(path)!r} exists"
                + (
                    " and was not written by write_hub_files; move it away first."
                    if overwrite
                    else "; pass overwrite=True to replace the files an earlier call wrote."
                )
            )
    metadata = {
        "scvi_version": registry["scvi_version"],
        "anndata_version": version("anndata"),
        "model_cls_name": registry["model_name"],
        "training_data_url": training_data_url,
        "model_parent_module": "sams_scvi",
    }
    metadata_path.write_text(json.dumps(metadata, indent=4) + "\n", encoding="utf-8")
    card_path.write_text(
        _model_card(
            registry,
            attributes,
            content.get("var_names"),
            license_info,
            description,
            training_data_url,
            training_code_url,
            references,
        ),
        encoding="utf-8",
    )
    return [metadata_path, card_path]


def _written_here(path: Path) -> bool:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.name == MODEL_CARD_FILE:
        return _MARK in text
    try:
        return json.loads(text).get("model_parent_module") == "sams_scvi"
    except (ValueError, AttributeError):
        return False


def _model_card(registry, attributes, var_names, license_info, description, data_url, code_url, references) -> str:
    model = registry["model_name"]
    init = attributes.get("init_params_", {})
    parameters = {k: v for group in init.get("kwargs", {}).values() for k, v in group.items()}
    parameters = {**{k: v for k, v in init.get("non_kwargs", {}).items() if k != "registry"}, **parameters}
    fields = registry["field_registries"]
    perturbations = fields.get("perturbation", {}).get("state_registry", {}).get("vocabulary", [])
    n_genes = len(var_names) if var_names is not None and not isinstance(var_names, dict) else "?"
    tags = ["biology", "genomics", "single-cell", "perturbation", "sams-vae"]
    tags += [
        f"model_cls_name:{model}",
        f"scvi_version:{registry['scvi_version']}",
        f"anndata_version:{version('anndata')}",
    ]
    front = "\n".join(
        ["---", f"license: {license_info}", "library_name: scvi-tools", "tags:"] + [f"- {t}" for t in tags]
    )
    shown = ", ".join(perturbations[:20]) + (f", ... ({len(perturbations)} in all)" if len(perturbations) > 20 else "")
    return f"""{front}
---
{_MARK}

# {model} (sams-scvi)

{description or "A SAMS-VAE model of a single-cell perturbation screen (Bereket & Karaletsos, NeurIPS 2023)."}

- Genes: {n_genes}; perturbations: {len(perturbations)} ({shown})
- Trained with sams-scvi {version("sams-scvi")} and scvi-tools {registry["scvi_version"]}
- Training data: {data_url or "not provided"}; training code: {code_url or "not provided"}

## Load

```python
from scvi.hub import HubModel

hub_model = HubModel.pull_from_huggingface_hub("<user>/<repo>", cache_dir="model")
hub_model.load_model()  # needs `pip install sams-scvi`
model = hub_model.model
model.estimate_ate()
```

## Model arguments

```json
{json.dumps(parameters, indent=4, default=str)}
```

## Data setup

```json
{json.dumps(dict(registry.get("setup_args", {})), indent=4, default=str)}
```

## References

{references or "Bereket, M. & Karaletsos, T. Modelling cellular perturbations with the sparse additive mechanism shift variational autoencoder. NeurIPS 2023."}
"""
