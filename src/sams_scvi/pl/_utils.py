"""What every plot of :mod:`sams_scvi.pl` shares: its axes, and scanpy's ``show`` / ``save`` / ``return_fig``."""

from __future__ import annotations

from pathlib import Path


def new_axes(ax, figsize: tuple[float, float]):
    """``(figure, axes, made_here)``: the given axes, or a new figure of ``figsize``."""
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax, False
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax, True


def finish(fig, ax, made_here: bool, show: bool | None, save: str | Path | None, return_fig: bool):
    """Save to ``save`` (a path; the suffix picks the format), show, and return the figure or the axes.

    As scanpy does: ``show=None`` shows only a figure made here in an interactive session; a shown plot returns
    nothing (so a notebook does not print the axes), unless ``return_fig``.
    """
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(save, bbox_inches="tight", dpi=150)
    shown = bool(show or (show is None and made_here and plt.isinteractive()))
    if shown:
        plt.show()
    if return_fig:
        return fig
    return None if shown else ax
