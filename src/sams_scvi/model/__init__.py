"""User-facing models of :mod:`sams_scvi`."""

from ._model import SAMSVAE
from ._training_plan import SAMSTrainingPlan

__all__ = ["SAMSVAE", "SAMSTrainingPlan"]
