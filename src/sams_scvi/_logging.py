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
    """Within the block, drop our dependencies' advertising and deprecation noise (restored on exit)."""
    drop = _DropAdvertising()
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    for lightning_logger in loggers:
        lightning_logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for message in _NOISE:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lightning_logger in loggers:
            lightning_logger.removeFilter(drop)
