"""Evaluation of perturbation models on any AnnData."""

from ._ate import ate_pearson, observed_ate, perturbseq_scale

__all__ = ["ate_pearson", "observed_ate", "perturbseq_scale"]
