"""Real CRISPR screens shipped with the package (raw UMI counts, labels in ``obs["perturbation"]``)."""

from __future__ import annotations

from importlib import resources

import anndata as ad

_FILES = resources.files("sams_scvi.data") / "files"


def _read(name: str) -> ad.AnnData:
    with resources.as_file(_FILES / name) as path:
        return ad.read_h5ad(path)


def papalexi2021_eccite() -> ad.AnnData:
    """Papalexi et al. 2021 ECCITE-seq CRISPR-knockout screen in THP-1 cells (20,729 cells x 299 genes).

    Low-MOI: one target per cell (25 targets with cells) or ``"control"`` (non-targeting). ``X`` holds raw UMI
    counts; ``obs["perturbation"]`` is the target of the gRNA with the most UMIs (no QC, many cells escape
    the knockout), ``obs["bio_rep"]`` the replicate; ``obsm["grna_counts"]`` has the gRNA UMI counts.
    From the MIT-licensed ``sceptredata`` package (genes downsampled to 299 by its authors).

    Returns
    -------
    A new AnnData on each call.
    """
    return _read("papalexi2021_thp1_sceptredata.h5ad")


def schraivogel2020_tapseq(drop_unassigned: bool = True) -> ad.AnnData:
    """Schraivogel et al. 2020 TAP-seq CRISPRi screen in K562 cells (10,985 cells x 74 targeted genes).

    Cells carry one to four targets (``obs["perturbation"]`` like ``"CPQ+FAM83A"``, sorted and joined with
    ``"+"``) or are ``"control"``; 310 cells carry combinations. ``X`` holds raw UMI counts. From GEO sample
    GSM4012688 (public data).

    Parameters
    ----------
    drop_unassigned
        Drop the 558 cells in which no guide was detected (``"unassigned"``).

    Returns
    -------
    A new AnnData on each call.
    """
    adata = _read("schraivogel2020_tapseq_k562.h5ad")
    if drop_unassigned:
        adata = adata[adata.obs["perturbation"].astype(str) != "unassigned"].copy()
    return adata
