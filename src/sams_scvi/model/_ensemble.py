"""Bootstrap ensembles: uncertainty of the ATE from resampled cells, beyond the mechanism's posterior."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import stats
from scvi.utils import track

from sams_scvi._utils import _as_positions, _check_number, _check_seed, _scvi_seed


def bootstrap_models(
    adata: AnnData,
    n_models: int = 5,
    model_cls: type | None = None,
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
    indices: Sequence[int] | Sequence[bool] | Sequence[str] | None = None,
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
        Cells to resample from: positions, a boolean mask or obs names (default: all).
    seed
        Seed of the resampling (a non-negative integer); model ``b`` trains with ``scvi.settings.seed = seed + b``.
        ``scvi.settings.seed`` and the global random states are as before the call afterwards, also after an error.
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
    _check_seed(seed)
    train_kwargs = dict(train_kwargs or {})
    if "datasplitter_kwargs" in train_kwargs:
        raise ValueError("bootstrap_models sets `datasplitter_kwargs` itself; pass `indices` to choose the cells.")
    manager = model_cls._get_most_recent_anndata_manager(adata, required=True)
    labels = adata.obs[manager.registry["setup_args"]["perturbation_key"]].astype(str).to_numpy()
    cells = _as_positions(adata, indices, name="indices")
    cells = np.arange(adata.n_obs) if cells is None else cells
    rng = np.random.default_rng(seed)
    empty = np.array([], dtype=np.int64)
    models = []
    for b in track(range(n_models), description="Training bootstrap models", disable=not progress_bar):
        resample = np.concatenate(
            [rng.choice(group, size=len(group), replace=True) for group in _groups(cells, labels[cells])]
        )
        with _scvi_seed(int(seed) + b):  # the caller's seed and random states return afterwards, also on errors
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
    their mean squared Monte-Carlo error, which would inflate it), plus the Monte-Carlo error of the mean. The
    interval is :math:`\bar a \pm t_{m-1} \sqrt{T}` (Student's t with :math:`m - 1` degrees of freedom).
    Coverage on simulations with known ATEs is in ``docs/discovery.md``.

    Parameters
    ----------
    models
        Trained models with the same likelihood, perturbations and genes (e.g. from :func:`bootstrap_models`);
        otherwise a :class:`ValueError` names what differs (ATEs of the negative binomial are log2 fold changes,
        those of ``likelihood="normal"`` differences on the data's scale: they cannot be pooled).
    perturbations
        Labels to evaluate; default, the first model's observed labels.
    credible_level
        Probability of the intervals, a number in (0, 1).
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
    _check_ensemble(models, credible_level)
    if perturbations is None:  # the same rows from every model
        perturbations = list(models[0]._perturbation_state["observed_labels"])
    estimates = [
        model.estimate_ate(perturbations, progress_bar=False, **kwargs)
        for model in track(models, description="ATEs of the ensemble", disable=not progress_bar)
    ]
    pooled = _rubin(
        [e.X for e in estimates], [e.layers["posterior_sd"] for e in estimates], [e.layers["mc_se"] for e in estimates]
    )
    mean, total = pooled["mean"], pooled["total_sd"]
    half_width = stats.t.ppf(0.5 + credible_level / 2, df=len(models) - 1) * total
    first = estimates[0]
    return AnnData(
        X=mean.astype(np.float32),
        obs=first.obs.copy(),
        var=first.var.copy(),
        layers={
            "between_model_sd": pooled["between_model_sd"].astype(np.float32),
            "posterior_sd": pooled["posterior_sd"].astype(np.float32),
            "total_sd": total.astype(np.float32),
            "ci_lower": (mean - half_width).astype(np.float32),
            "ci_upper": (mean + half_width).astype(np.float32),
            "mc_se": pooled["mc_se"].astype(np.float32),
        },
        uns={**first.uns, "credible_level": credible_level, "n_models": len(models)},
    )


def ensemble_screen(
    models: Sequence,
    pairs: Sequence[str] | Sequence[tuple[str, str]] | None = None,
    rank_by: str = "non_additivity_norm",
    credible_level: float = 0.9,
    progress_bar: bool = True,
    **kwargs,
) -> AnnData:
    """:meth:`~sams_scvi.SAMSVAE.screen_combinations` over a bootstrap ensemble, combined as :func:`ensemble_ate`.

    The pairs' ATEs and their non-additivity are averaged over the models, and their intervals combine each model's
    posterior variance with the variance between models (Rubin's rules, Student t with m - 1 degrees of freedom).
    The models must share their likelihood, perturbations and genes, as in :func:`ensemble_ate`, and
    ``credible_level`` is a number in (0, 1). Default pairs: the first model's (pairs seen in training but never
    together). ``**kwargs`` go to ``screen_combinations`` (``n_samples``, ``library_size``, ``basal``, ...). Returns
    the same AnnData, ranked by ``rank_by``, with ``posterior_sd`` and ``non_additivity_posterior_sd`` holding the
    total sd.
    """
    from ._ate import check_rank_by, screen_table

    _check_ensemble(models, credible_level)
    check_rank_by(rank_by)
    pairs = models[0]._screen_pairs(pairs)
    screens = [
        model.screen_combinations(pairs, progress_bar=False, **kwargs).copy()
        for model in track(models, description="Screens of the ensemble", disable=not progress_bar)
    ]
    labels = list(screens[0].obs_names.sort_values())
    screens = [screen[labels] for screen in screens]
    quantile = stats.t.ppf(0.5 + credible_level / 2, df=len(models) - 1)
    estimates = {}
    for prefix, value in (("", None), ("non_additivity_", "non_additivity")):
        pooled = _rubin(
            [s.X if value is None else s.layers[value] for s in screens],
            [s.layers[f"{prefix}posterior_sd"] for s in screens],
            [s.layers[f"{prefix}mc_se"] for s in screens],
        )
        estimates[prefix] = (pooled["mean"], pooled["total_sd"], pooled["mc_se"])
    first = screens[0]
    uns = {k: v for k, v in first.uns.items() if k != "rank_by"}
    return screen_table(
        list(zip(first.obs["perturbation_a"], first.obs["perturbation_b"], strict=True)),
        labels,
        first.var_names,
        estimates,
        quantile,
        rank_by,
        {**uns, "credible_level": credible_level, "n_models": len(models)},
    )


def _check_ensemble(models: Sequence, credible_level: float) -> None:
    """Raise unless the models' ATEs can be pooled: same likelihood (scale), perturbations and genes."""
    if len(models) < 2:
        raise ValueError("An ensemble needs at least two models.")
    _check_number("credible_level", credible_level)
    if not 0 < credible_level < 1:
        raise ValueError("`credible_level` must lie strictly between 0 and 1, e.g. 0.9.")
    first = models[0]
    for i, model in enumerate(models[1:], start=1):
        likelihoods = (_likelihood(first), _likelihood(model))
        if likelihoods[0] != likelihoods[1]:
            raise ValueError(
                f"models[0] has likelihood {likelihoods[0]!r} but models[{i}] {likelihoods[1]!r}: their ATEs are on "
                "different scales (log2 fold changes for 'nb', differences on the data's scale for 'normal') and "
                "cannot be pooled. Build the ensemble from models with one likelihood."
            )
        if model.perturbations != first.perturbations:
            only_first = sorted(set(first.perturbations) - set(model.perturbations))
            only_other = sorted(set(model.perturbations) - set(first.perturbations))
            differs = (
                f"only models[0] has {only_first[:5]}, only models[{i}] has {only_other[:5]}"
                if only_first or only_other
                else "the same perturbations in another order"
            )
            raise ValueError(
                f"models[0] and models[{i}] know different perturbations ({differs}); an ensemble needs models set "
                "up on the same perturbation labels, e.g. from bootstrap_models on one AnnData."
            )
        genes, other = first._gene_names, model._gene_names
        if not other.equals(genes):
            missing, extra = genes.difference(other), other.difference(genes)
            differs = (
                f"models[{i}] lacks {list(missing[:5])}"
                if len(missing)
                else f"models[{i}] also has {list(extra[:5])}"
                if len(extra)
                else "the same genes in another order"
            )
            raise ValueError(
                f"models[0] and models[{i}] were trained on different genes ({differs}); an ensemble needs the same "
                "genes in the same order."
            )


def _likelihood(model) -> str:
    """The model's likelihood; modules without the attribute are negative binomial, as the ATE code assumes."""
    return getattr(model.module, "likelihood", "nb")


def _rubin(values: list, posterior_sd: list, mc_se: list) -> dict[str, np.ndarray]:
    r"""Pool m estimates by Rubin's rules.

    Returns the mean, the between-model sd (less Monte-Carlo noise), the root mean posterior variance, the total sd
    :math:`\sqrt{\bar W + (1 + 1/m) B + \mathrm{se}^2}` and the Monte-Carlo se of the mean.
    """
    values = np.stack(values).astype(np.float64)
    m = len(values)
    mc_variance = np.mean(np.stack(mc_se).astype(np.float64) ** 2, axis=0)
    between = np.clip(values.var(0, ddof=1) - mc_variance, 0, None)
    within = np.mean(np.stack(posterior_sd).astype(np.float64) ** 2, axis=0)
    return {
        "mean": values.mean(0),
        "between_model_sd": np.sqrt(between),
        "posterior_sd": np.sqrt(within),
        "total_sd": np.sqrt(within + (1 + 1 / m) * between + mc_variance / m),
        "mc_se": np.sqrt(mc_variance / m),
    }


def _groups(cells: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """The cells of each label."""
    return [cells[labels == label] for label in pd.unique(labels)]
