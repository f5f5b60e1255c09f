"""Evaluation of perturbation models on any AnnData: ATEs, their agreement, splits and baselines."""

from ._ate import ate_metrics, ate_metrics_per_perturbation, ate_pearson, observed_ate, perturbseq_scale
from ._baselines import baseline_ate
from ._evaluate import evaluate
from ._masks import mask_recovery
from ._mechanism import effect_decomposition
from ._noise import full_sample_ceiling, random_halves, split_half_ceiling
from ._splits import combination_split

__all__ = [
    "ate_metrics",
    "ate_metrics_per_perturbation",
    "ate_pearson",
    "baseline_ate",
    "combination_split",
    "effect_decomposition",
    "evaluate",
    "full_sample_ceiling",
    "mask_recovery",
    "observed_ate",
    "perturbseq_scale",
    "random_halves",
    "split_half_ceiling",
]
