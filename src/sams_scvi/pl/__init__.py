"""Plots of :mod:`sams_scvi` results, with scanpy's arguments (``ax``, ``show``, ``save``, ``return_fig``)."""

from ._ate import ate_scatter
from ._discovery import ate_intervals, latent_umap, mechanism_heatmap, screen_volcano, training_history

__all__ = [
    "ate_intervals",
    "ate_scatter",
    "latent_umap",
    "mechanism_heatmap",
    "screen_volcano",
    "training_history",
]
