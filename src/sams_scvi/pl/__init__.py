"""Plots of :mod:`sams_scvi` results."""

from ._ate import ate_scatter

__all__ = ["ate_scatter"]
