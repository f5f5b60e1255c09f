"""Train every model of the family on one split with fixed seeds and score them like the paper (``docs/models.md``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import pandas as pd
from anndata import AnnData
from scvi.utils import track

from ._utils import _as_positions, _scvi_seed
from .metrics import evaluate
from .model import CPAVAE, SAMSVAE, BasePerturbationModel, ConditionalVAE, SVAEPlus

ModelSpec = tuple[type[BasePerturbationModel], dict, dict]


def paper_models() -> dict[str, ModelSpec]:
    """The paper's Norman comparison: ``{name: (model class, model kwargs, setup_anndata kwargs)}``.

    SAMS-VAE with the correlated and the mean-field guide, CPA-VAE and the conditional VAE with additive
    encoding of combinations, and SVAE+ with unique encoding (it accepts one treatment per cell). The encoders
    see the perturbation (``mean_field_encoder=False``) as in the paper's figures, except SVAE+'s, which by
    definition infers the perturbed state from the counts alone. SAMS-VAE uses the paper's optimisation settings
    (``recipe="reference"``); add ``"SAMS-VAE (fast)": (SAMSVAE, {}, {})`` to compare the default recipe.
    """
    return {
        "SAMS-VAE (correlated)": (SAMSVAE, {"guide": "correlated", "recipe": "reference"}, {}),
        "SAMS-VAE (mean field)": (SAMSVAE, {"guide": "mean_field", "recipe": "reference"}, {}),
        "CPA-VAE": (CPAVAE, {}, {}),
        "Conditional VAE": (ConditionalVAE, {}, {}),
        "SVAE+ (unique encoding)": (SVAEPlus, {}, {"encode_combinations": "unique"}),
    }


def compare_models(
    adata: AnnData,
    split: Sequence[Sequence[int]],
    models: dict[str, ModelSpec] | None = None,
    perturbation_key: str = "perturbation",
    control_value: str = "control",
    delimiter: str = "+",
    subset: Literal["train", "validation", "test", "all"] = "test",
    baselines: Sequence[str] = ("additive", "mean_perturbed", "control"),  # the order of the table's rows
    max_epochs: int = 100,
    top_k: int = 20,
    n_ate_samples: int = 2500,
    n_iwelbo_samples: int = 100,
    library_size: float | Literal["median"] = "median",
    seed: int = 0,
    train_kwargs: dict | None = None,
    progress_bar: bool = True,
) -> pd.DataFrame:
    """Train each model on ``split`` and tabulate held-out IWELBO, ATE agreement and training time.

    Every model is set up on its own copy of ``adata`` (so the labels of held-out cells are in the vocabulary,
    as in the paper's runs), trained with the same seed, epochs and training recipe, and scored by
    :func:`~sams_scvi.metrics.evaluate` on ``subset``. The simple baselines are added as extra rows.

    Parameters
    ----------
    adata
        Raw counts with labels in ``obs[perturbation_key]``.
    split
        ``[train, validation, test]`` cells (positions, boolean masks or obs names), e.g. from :func:`~sams_scvi.metrics.combination_split`.
    models
        ``{name: (model class, model kwargs, setup_anndata kwargs)}``; default :func:`paper_models`.
    perturbation_key, control_value, delimiter
        How labels are written.
    subset
        The cells scored (``"test"``: the held-out ones).
    baselines
        Baselines of :func:`~sams_scvi.metrics.baseline_ate` to add as rows.
    max_epochs
        Training epochs of every model.
    top_k, n_ate_samples, n_iwelbo_samples, library_size
        Passed to :func:`~sams_scvi.metrics.evaluate`.
    seed
        Seed of every model's initialisation and training.
    train_kwargs
        Further arguments of every model's ``train`` (e.g. ``{"batch_size": 256}``).
    progress_bar
        Show a progress bar over models.

    Returns
    -------
    One row per model and baseline: ``iwelbo``, ``pearson``, ``pearson_top{k}``, ``r2``, ``r2_top{k}``, the
    other metrics of :func:`~sams_scvi.metrics.evaluate`, and ``train_seconds``.
    """
    models = paper_models() if models is None else models
    if len(split) != 3 or any(part is None for part in split):
        raise ValueError("`split` must be [train, validation, test]: positions, boolean masks or obs names.")
    split = [_as_positions(adata, part, f"split[{i}]", allow_empty=True) for i, part in enumerate(split)]
    train_kwargs = {"enable_progress_bar": False, **(train_kwargs or {})}
    label_kwargs = {"perturbation_key": perturbation_key, "control_value": control_value, "delimiter": delimiter}
    eval_kwargs = {
        **label_kwargs,
        "subsets": [subset],
        "top_k": top_k,
        "n_ate_samples": n_ate_samples,
        "n_iwelbo_samples": n_iwelbo_samples,
        "library_size": library_size,
        "progress_bar": False,
    }
    rows = {}
    for name, (model_cls, model_kwargs, setup_kwargs) in track(
        list(models.items()), description="Training models", disable=not progress_bar
    ):
        with _scvi_seed(seed):  # each model starts from the same seed; the caller's session is restored
            data = adata.copy()
            for key in [key for key in data.uns if key.startswith("_scvi_")]:  # a copy of registered data is new data:
                del data.uns[key]  # sharing the user's _scvi_uuid would unregister their AnnData from their models
            model_cls.setup_anndata(data, **label_kwargs, **setup_kwargs)
            model = model_cls(data, **model_kwargs)
            start = time.perf_counter()
            model.train(
                max_epochs=max_epochs,
                datasplitter_kwargs={"external_indexing": split},
                **train_kwargs,
            )
            seconds = time.perf_counter() - start
            row = evaluate(model, data, split, **eval_kwargs).loc[subset]
            row["train_seconds"] = seconds
            rows[name] = row
    for baseline in baselines:
        rows[f"baseline: {baseline}"] = evaluate(baseline, adata, split, **eval_kwargs).loc[subset]
    table = pd.DataFrame(rows).T
    table.index.name = "model"
    return table
