"""User-facing models of :mod:`sams_scvi`: SAMS-VAE and the paper's comparison models."""

from ._base import BasePerturbationModel
from ._convergence import tail_epochs, training_convergence
from ._ensemble import bootstrap_models, ensemble_ate, ensemble_screen
from ._minify import MinifiedDataError
from ._model_file import UnsafeModelFileError
from ._models import CPAVAE, SAMSVAE, ConditionalVAE, SVAEPlus
from ._schedule import default_batch_size, default_max_epochs, updates_per_epoch
from ._training_plan import SAMSTrainingPlan

__all__ = [
    "BasePerturbationModel",
    "CPAVAE",
    "ConditionalVAE",
    "MinifiedDataError",
    "SAMSTrainingPlan",
    "SAMSVAE",
    "SVAEPlus",
    "UnsafeModelFileError",
    "bootstrap_models",
    "default_batch_size",
    "default_max_epochs",
    "ensemble_ate",
    "ensemble_screen",
    "tail_epochs",
    "training_convergence",
    "updates_per_epoch",
]
