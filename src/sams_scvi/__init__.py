"""SAMS-VAE for single-cell perturbation screens, as an scvi-tools model."""

from importlib.metadata import version

from . import data, metrics, pl, tl
from ._compare import compare_models, paper_models
from .metrics import evaluate
from .model import CPAVAE, SAMSVAE, ConditionalVAE, SVAEPlus, bootstrap_models, ensemble_ate, ensemble_screen
from .module import SAMSModule

__version__ = version("sams-scvi")

__all__ = [
    "CPAVAE",
    "ConditionalVAE",
    "SAMSModule",
    "SAMSVAE",
    "SVAEPlus",
    "bootstrap_models",
    "compare_models",
    "data",
    "ensemble_ate",
    "ensemble_screen",
    "evaluate",
    "metrics",
    "paper_models",
    "pl",
    "tl",
]
