"""PyTorch modules of :mod:`sams_scvi`."""

from ._module import SAMSModule

__all__ = ["SAMSModule"]
