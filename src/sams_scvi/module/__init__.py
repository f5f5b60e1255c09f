"""PyTorch modules of :mod:`sams_scvi`."""

from ._likelihoods import CountLikelihood, GaussianLikelihood
from ._module import SAMSModule

__all__ = ["CountLikelihood", "GaussianLikelihood", "SAMSModule"]
