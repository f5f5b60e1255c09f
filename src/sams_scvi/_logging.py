"""The package's logger and the filters that keep our calls' output to what a user needs to read."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

logger = logging.getLogger("sams_scvi")
if not logger.handlers:  # as scvi-tools does for its own logger: INFO messages reach the user by default
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

# Lightning logs its rank-zero messages through these loggers.
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")

# Messages of our dependencies that say nothing about the user's run: Lightning's advertising, a deprecation inside
# Lightning's own use of torch, and Lightning's note that a small dataset has fewer batches than its log interval.
_NOISE = (
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*smaller than the logging interval.*",
)


class _DropAdvertising(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


@contextlib.contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Within the block, drop our dependencies' advertising and the noise above; everything else passes.

    Only our own filters are added and, on exit, removed again: ``warnings.catch_warnings`` would instead restore
    the whole filter list, dropping filters other libraries add meanwhile (lazy imports during training) and
    resetting which warnings were already shown.
    """
    drop = _DropAdvertising()
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    for lightning_logger in loggers:
        lightning_logger.addFilter(drop)
    added = []
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)
        added.append(warnings.filters[0])
    try:
        yield
    finally:
        for entry in added:
            with contextlib.suppress(ValueError):  # someone else already removed it
                warnings.filters.remove(entry)
        mutated = getattr(warnings, "_filters_mutated", None) or getattr(warnings, "_filters_mutated_lock_held", None)
        if mutated is not None:  # tell the C implementation its cache of the filters is stale
            mutated()
        for lightning_logger in loggers:
            lightning_logger.removeFilter(drop)
