"""SAMS-VAE for single-cell perturbation screens, as an scvi-tools model."""

from importlib.metadata import version

from . import data, metrics, pl
from .metrics import evaluate
from .model import SAMSVAE
from .module import SAMSModule

__version__ = version("sams-scvi")

__all__ = ["SAMSModule", "SAMSVAE", "data", "evaluate", "metrics", "pl"]
