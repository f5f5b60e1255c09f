"""Has a training run settled? Its objective and its mechanism over the last quarter, read from ``model.history``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

# The share of training whose change is assessed.
TAIL = 0.25
# Settled: over the last quarter of training the training loss fell by less than this fraction of its value ...
OBJECTIVE_TOLERANCE = 0.01
# ... the mean size of the perturbations' latent shifts changed by less than this fraction ...
EFFECT_TOLERANCE = 0.3
# ... and the fraction of mask entries on and the mean penetrance moved by less than this. Calibrated on TAP-seq
# (benchmarks/NOTES.md, "Convergence"): subsampled to 3,000 cells, 0.2's 120 epochs (held-out r 0.29) changed by
# 1.6 %, 43 % and 0.11 in its last quarter, the default length (r 0.78) by 0.8 %, 15 % and 0.001; the full screen's
# default by 0.7 %, 15 % and 0.011.
MECHANISM_TOLERANCE = 0.03

# name: (history entry, tolerance, how the change is measured, description)
_QUANTITIES = {
    "objective": ("elbo_train", OBJECTIVE_TOLERANCE, "decrease", "relative decrease of the training loss"),
    "effects": ("shift_magnitude_train", EFFECT_TOLERANCE, "relative", "relative change of the mean latent shift"),
    "masks": ("mask_active_fraction_train", MECHANISM_TOLERANCE, "absolute", "change of the fraction of masks on"),
    "penetrance": ("penetrance_mean_train", MECHANISM_TOLERANCE, "absolute", "change of the mean penetrance"),
}


def tail_epochs(n_epochs: int, tail: float = TAIL) -> int:
    """Epochs in the assessed window: the last ``tail`` of the run, at least 2."""
    return min(n_epochs, max(2, math.ceil(tail * n_epochs)))


def _tail_change(values: np.ndarray, kind: str) -> float:
    """Change along a least-squares line through the window (less noisy than last minus first).

    ``"decrease"``: its decrease relative to the window's mean (a falling loss is progress); ``"relative"``: its
    size relative to the mean; ``"absolute"``: its size.
    """
    steps = np.arange(len(values), dtype=float)
    change = float(np.polyfit(steps, values, 1)[0] * (len(values) - 1))
    scale = max(abs(float(np.mean(values))), 1e-12)
    if kind == "decrease":
        return -change / scale
    return abs(change) / scale if kind == "relative" else abs(change)


def training_convergence(history: dict | None, tail: float = TAIL) -> pd.DataFrame:
    """Whether the objective and the mechanism of a run have settled over its last quarter.

    Parameters
    ----------
    history
        A trained model's ``history`` (per-epoch series).
    tail
        Fraction of the epochs assessed (at least 2 epochs).

    Returns
    -------
    One row per quantity the run logged (``objective``; ``effects``, ``masks`` and ``penetrance`` for models that
    have them):
    ``key`` (the history entry), ``change`` over the window (for the objective: its relative decrease),
    ``tolerance``, ``settled`` (``change <= tolerance``), ``epochs`` (window length) and ``description``.
    Runs of a single epoch cannot be assessed: ``settled`` is ``NaN``.
    """
    rows = []
    for name, (key, tolerance, kind, description) in _QUANTITIES.items():
        series = (history or {}).get(key)
        if series is None or len(series) == 0:
            continue
        values = pd.to_numeric(series.iloc[:, 0], errors="coerce").to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        if len(values) < 2:
            rows.append(
                {
                    "quantity": name,
                    "key": key,
                    "change": np.nan,
                    "tolerance": tolerance,
                    "settled": np.nan,
                    "epochs": len(values),
                    "description": description,
                }
            )
            continue
        window = values[-tail_epochs(len(values), tail) :]
        change = _tail_change(window, kind)
        rows.append(
            {
                "quantity": name,
                "key": key,
                "change": change,
                "tolerance": tolerance,
                "settled": bool(change <= tolerance),
                "epochs": len(window),
                "description": description,
            }
        )
    return pd.DataFrame(rows, columns=["quantity", "key", "change", "tolerance", "settled", "epochs", "description"])


def unsettled_message(report: pd.DataFrame, epochs: int, remedy: str | None = None) -> str | None:
    """The warning for a report with unsettled quantities (``None`` when all settled or none could be assessed).

    ``remedy``: how to train longer, with ``{epochs}`` for twice the run's epochs (default: a new ``train``).
    """
    unsettled = report[report["settled"].eq(False)]
    if unsettled.empty:
        return None
    parts = [
        f"{row.quantity} ({row.description}: {row.change:.3g} over the last {row.epochs} epochs, tolerance "
        f"{row.tolerance:g})"
        for row in unsettled.itertuples()
    ]
    if remedy is None:
        remedy = (
            "Train a new model for longer, e.g. model.train(max_epochs={epochs}), or with max_epochs=None (the "
            "default length for this screen)"
        )
    return (
        "Training has not converged: " + "; ".join(parts) + ". Effects of an unconverged model are typically shrunk "
        f"and can have the wrong sign. {remedy.format(epochs=2 * epochs)}; model.convergence() shows the diagnostics."
    )


def warn_if_unsettled(model, what: str) -> None:
    """Warn that ``what`` reads an unconverged model (nothing for models without a history, e.g. never trained)."""
    history = getattr(model, "history_", None)
    if not history or "elbo_train" not in history:
        return
    remedy = getattr(model, "_longer_run_remedy", None)
    message = unsettled_message(training_convergence(history), len(history["elbo_train"]), remedy)
    if message is not None:
        warnings.warn(f"{what}: {message}", UserWarning, stacklevel=3)
