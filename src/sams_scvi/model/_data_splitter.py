"""A data splitter whose fixed split may leave cells out, as the paper's combination splits do."""

from __future__ import annotations

import numpy as np
from scvi.dataloaders import DataSplitter

from sams_scvi._utils import _as_positions


class SAMSDataSplitter(DataSplitter):
    """:class:`scvi.dataloaders.DataSplitter` that accepts a partial ``external_indexing`` with repeated cells.

    scvi-tools requires ``[train, validation, test]`` to cover every cell, each once; the paper's
    out-of-distribution splits (:func:`~sams_scvi.metrics.combination_split`) leave some cells unused, and bootstrap
    resamples (:func:`~sams_scvi.bootstrap_models`) repeat cells. Cells in none of the three sets are not loaded;
    a repeated cell is loaded as often as it appears. Each part is positions, a boolean mask or obs names.
    """

    def __init__(self, adata_manager, external_indexing=None, **kwargs) -> None:
        if external_indexing is None:
            super().__init__(adata_manager, **kwargs)
            return
        if len(external_indexing) != 3 or any(part is None for part in external_indexing):
            raise ValueError(
                "`external_indexing` must be [train, validation, test]: positions, boolean masks or obs names (a "
                "part may be empty)."
            )
        adata = adata_manager.adata
        # a boolean mask cast to integers would select cells 0 and 1; obs names would not parse
        split = [
            _as_positions(adata, idx, f"external_indexing[{i}]", allow_empty=True)
            for i, idx in enumerate(external_indexing)
        ]
        unused = np.setdiff1d(np.arange(adata_manager.adata.n_obs), np.concatenate(split))
        # let scvi-tools validate a complete index set, then keep the partial one for setup()
        unique = [np.unique(idx) for idx in split]
        super().__init__(
            adata_manager, external_indexing=[unique[0], unique[1], np.concatenate([unique[2], unused])], **kwargs
        )
        self.external_indexing = split
