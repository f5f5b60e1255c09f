"""Bootstrap ensembles: uncertainty of the ATE from resampled cells, beyond the mechanism's posterior."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scvi
from anndata import AnnData
from scipy import stats
from scvi.utils import track


def bootstrap_models(
    adata: AnnData,
    n_models: int = 5,
    model_cls: type | None = None,
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    progress_bar: bool = True,
) -> list:
    """Train ``n_models`` models, each on a bootstrap resample of the cells drawn within each perturbation label.

    Every label keeps its number of cells; cells drawn twice are seen twice per epoch. Together with
    :func:`ensemble_ate` this gives intervals that include the sampling error of the cells and the variation of
    training, which the posterior of the mechanism alone (:meth:`~sams_scvi.SAMSVAE.estimate_ate`) leaves out.

    Parameters
    ----------
    adata
        AnnData registered with ``model_cls.setup_anndata``.
    n_models
        Number of resamples (each trains one model; at least 2).
    model_cls
        Model class; default :class:`~sams_scvi.SAMSVAE`.
    model_kwargs, train_kwargs
        Arguments of the model and of its ``train``; ``datasplitter_kwargs`` is set here (no validation cells).
    indices
        Cells to resample from (default: all).
    seed
        Seed of the resampling; model ``b`` trains with ``scvi.settings.seed = seed + b``.
    progress_bar
        Show a progress bar over the models.

    Returns
    -------
    The trained models; ``model.train_indices`` holds each one's resample.
    """
    from ._models import SAMSVAE

    model_cls = SAMSVAE if model_cls is None else model_cls
    if isinstance(n_models, bool) or not isinstance(n_models, int | np.integer) or n_models < 2:
        raise ValueError("`n_models` must be an integer of at least 2: the spread needs two models.")
    train_kwargs = dict(train_kwargs or {})
    if "datasplitter_kwargs" in train_kwargs:
        raise ValueError("bootstrap_models sets `datasplitter_kwargs` itself; pass `indices` to choose the cells.")
    manager = model_cls._get_most_recent_anndata_manager(adata, required=True)
    labels = adata.obs[manager.registry["setup_args"]["perturbation_key"]].astype(str).to_numpy()
    cells = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
    rng = np.random.default_rng(seed)
    empty = np.array([], dtype=np.int64)
    models = []
    for b in track(range(n_models), description="Training bootstrap models", disable=not progress_bar):
        resample = np.concatenate(
            [rng.choice(group, size=len(group), replace=True) for group in _groups(cells, labels[cells])]
        )
        scvi.settings.seed = seed + b
        model = model_cls(adata, **(model_kwargs or {}))
        model.train(datasplitter_kwargs={"external_indexing": [np.sort(resample), empty, empty]}, **train_kwargs)
        models.append(model)
    return models


def ensemble_ate(
    models: Sequence,
    perturbations: Sequence[str] | None = None,
    credible_level: float = 0.9,
    progress_bar: bool = True,
    **kwargs,
) -> AnnData:
    r"""ATEs of a bootstrap ensemble (:func:`bootstrap_models`) with intervals that combine both uncertainties.

    With :math:`m` models, ATE estimates :math:`\hat a_b` and posterior variances :math:`W_b`
    (:meth:`~sams_scvi.SAMSVAE.estimate_ate`), the ATE is the mean :math:`\bar a`, and its variance, by Rubin's
    rules, :math:`T = \bar W + (1 + 1/m) B` with :math:`B` the variance of the :math:`\hat a_b` across models (less
    their mean squared Monte-Carlo error, which would inflate it). The
    interval is :math:`\bar a \pm t_{m-1} \sqrt{T}` (Student's t with :math:`m - 1` degrees of freedom).
    Coverage on simulations with known ATEs is in ``docs/discovery.md``.

    Parameters
    ----------
    models
        Trained models on the same genes (e.g. from :func:`bootstrap_models`).
    perturbations
        Labels to evaluate; default, the first model's observed labels.
    credible_level
        Probability of the intervals, in (0, 1).
    progress_bar
        Show a progress bar over the models.
    **kwargs
        Arguments of :meth:`~sams_scvi.SAMSVAE.estimate_ate` (``n_samples``, ``library_size``, ``basal``, ...).

    Returns
    -------
    AnnData as :meth:`~sams_scvi.SAMSVAE.estimate_ate`'s, with ``layers`` ``"between_model_sd"``,
    ``"posterior_sd"`` (root mean posterior variance), ``"total_sd"``, ``"ci_lower"``, ``"ci_upper"`` and
    ``"mc_se"`` (of the mean), and ``uns["n_models"]``.
    """
    if len(models) < 2:
        raise ValueError("`ensemble_ate` needs at least two models.")
    if not 0 < credible_level < 1:
        raise ValueError("`credible_level` must lie strictly between 0 and 1, e.g. 0.9.")
    genes = models[0]._gene_names
    if any(not model._gene_names.equals(genes) for model in models[1:]):
        raise ValueError("The models were trained on different genes; an ensemble needs the same genes in order.")
    estimates = [
        model.estimate_ate(perturbations, progress_bar=False, **kwargs)
        for model in track(models, description="ATEs of the ensemble", disable=not progress_bar)
    ]
    values = np.stack([e.X for e in estimates]).astype(np.float64)
    m = len(models)
    mean = values.mean(0)
    mc_variance = np.mean([e.layers["mc_se"].astype(np.float64) ** 2 for e in estimates], axis=0)
    # the spread of the models' estimates less the part their Monte-Carlo noise explains
    between = np.clip(values.var(0, ddof=1) - mc_variance, 0, None)
    within = np.mean([e.layers["posterior_sd"].astype(np.float64) ** 2 for e in estimates], axis=0)
    total = within + (1 + 1 / m) * between
    half_width = stats.t.ppf(0.5 + credible_level / 2, df=m - 1) * np.sqrt(total)
    mc_se = np.sqrt(mc_variance / m)
    first = estimates[0]
    return AnnData(
        X=mean.astype(np.float32),
        obs=first.obs.copy(),
        var=first.var.copy(),
        layers={
            "between_model_sd": np.sqrt(between).astype(np.float32),
            "posterior_sd": np.sqrt(within).astype(np.float32),
            "total_sd": np.sqrt(total).astype(np.float32),
            "ci_lower": (mean - half_width).astype(np.float32),
            "ci_upper": (mean + half_width).astype(np.float32),
            "mc_se": mc_se.astype(np.float32),
        },
        uns={**first.uns, "credible_level": credible_level, "n_models": m},
    )


def _groups(cells: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """The cells of each label."""
    return [cells[labels == label] for label in pd.unique(labels)]
