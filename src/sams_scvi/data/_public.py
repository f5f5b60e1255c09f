"""Public CRISPR screens downloaded on first use: Norman et al. 2019 and Replogle et al. 2022 (K562).

Each loader downloads the published file once into a cache directory with :mod:`pooch` (as scanpy does), checks its
checksum, converts it to the package's conventions and caches the converted file next to it, so later calls read
the converted file only:

- ``X`` holds the raw integer UMI counts as a float32 CSR matrix (checked: a file whose values are not
  non-negative integers raises);
- ``obs["perturbation"]`` is ``"control"`` for unperturbed cells, a target (``"KLF1"``) or a ``"+"``-joined sorted
  combination (``"CEBPA+KLF1"``), ready for ``setup_anndata(adata, perturbation_key="perturbation")``;
- ``var_names`` are gene symbols made unique (``"-1"`` appended to repeats), with the symbols as published in
  ``var["gene_name"]`` and the Ensembl IDs in ``var["ensembl_id"]``;
- every other ``obs`` and ``var`` column of the published file is kept.

The cache directory is ``cache_dir`` if given, else the environment variable ``SAMS_SCVI_DATA_DIR``, else
``pooch.os_cache("sams_scvi")`` (e.g. ``~/.cache/sams_scvi`` on Linux).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from anndata.utils import make_index_unique
from scipy import sparse

CONTROL = "control"
DATA_DIR_ENV = "SAMS_SCVI_DATA_DIR"
# Version of the conversion; converted files of another version are not reused (bump when the conversion changes).
_FORMAT = 1
# Cells converted at a time from the Replogle files (dense float32 on disk). The conversion of a block takes about 5x
# the block's dense size (block, nonzero coordinates, CSR copy): 1.6 GB for the genome-wide screen's 8,248 genes.
_CHUNK_SIZE = 10_000
# Elements per HDF5 chunk of the converted CSR arrays (4 MiB of float32).
_H5_CHUNK = 1 << 20
# Labels scPerturb and the screens give unperturbed cells, or the missing member of a combination.
_CONTROL_ATOMS = {"", "control", "ctrl", "non-targeting"}


@dataclass(frozen=True)
class _Source:
    url: str
    known_hash: str | None
    fname: str


# Where each file comes from, checked against public code and documentation when this loader was written (the live
# pages were not reachable from the machine it was written on, so no hash here was computed by us):
_SOURCES = {
    # scPerturb (Peidli et al. 2024, Nat. Methods), Zenodo record 13350497 (DOI 10.5281/zenodo.13350497), 698,680,199
    # bytes. The same md5 is quoted for this file by three independent public sources: gao-lab/CASCADE
    # data/download/Norman-2019/README.md (Zenodo record 10044268, accessed Mar 2024), CellForge's
    # scripts/download_datasets.py (record 13350497, with the size above) and the EvoPrior-AIVC benchmark config
    # (record 13350497). Record 7041849 (used by altoslabs/perturbench, whose curation notebook shows the file's
    # obs/var columns and labels) is an older version of the deposit; we could not confirm its checksum.
    "norman2019": _Source(
        url="https://zenodo.org/records/13350497/files/NormanWeissman2019_filtered.h5ad?download=1",
        known_hash="md5:c870e6967d91c017d9da827bab183cd6",
        fname="NormanWeissman2019_filtered.h5ad",
    ),
    # Replogle et al. 2022, figshare+ article 20029387. File id 35773219 (10,661,879,995 bytes) and its md5 as quoted by
    # gao-lab/CASCADE data/download/Replogle-2022/README.md (accessed Dec 2022) and by two other public download
    # manifests listing figshare's checksum; the id also appears in public loaders (ndownloader URL form).
    "essential": _Source(
        url="https://ndownloader.figshare.com/files/35773219",
        known_hash="md5:4f1122ce1c7f13299a68df6459a266d3",
        fname="K562_essential_raw_singlecell_01.h5ad",
    ),
    # Same article, file id 35775507 (65,830,941,948 bytes). The md5 is figshare's supplied md5 as quoted by
    # gao-lab/CASCADE (README above) and by several public manifests; a public run report (mool32/perceptome)
    # downloaded the file, confirmed the md5 and its structure (dense float32 X of raw counts, obs "gene" with
    # "non-targeting" controls, var "gene_name"). The id is the one in the SAMS-VAE authors' preprocessing notebook
    # (insitro/sams-vae sams_vae/data/replogle/replogle_filtered_preprocessing.ipynb).
    "genome_wide": _Source(
        url="https://ndownloader.figshare.com/files/35775507",
        known_hash="md5:887e3e6a8c8df6eadf7a3030a53c9546",
        fname="K562_gwps_raw_singlecell_01.h5ad",
    ),
    # The SAMS-VAE authors' file, s3://insitro-research-2023-sams-vae/data/replogle.h5ad (insitro/sams-vae
    # sams_vae/data/replogle/download.py), read over S3's public HTTPS endpoint. No checksum is published for it
    # anywhere we could find, so it is NOT verified: pass known_hash= to verify it.
    "sams_vae_subset": _Source(
        url="https://insitro-research-2023-sams-vae.s3.amazonaws.com/data/replogle.h5ad",
        known_hash=None,
        fname="replogle_sams_vae.h5ad",
    ),
}

_SCREENS = ("essential", "genome_wide", "sams_vae_subset")
_LABELS = ("gene", "guide")


def norman2019(cache_dir: str | os.PathLike | None = None, known_hash: str | None = None) -> ad.AnnData:
    """Norman et al. 2019 CRISPRa screen in K562 cells, with single and double perturbations (downloaded).

    111,445 cells x 33,694 genes: 105 single targets and 131 pairs of targets overexpressed by CRISPR activation,
    and 11,855 control cells. Downloaded on first call (699 MB) from scPerturb's harmonised copy on Zenodo
    (``NormanWeissman2019_filtered.h5ad``, record 13350497, md5 ``c870e6967d91c017d9da827bab183cd6``, verified),
    converted and cached; later calls read the converted file only.

    ``X`` holds the raw UMI counts (float32 CSR). ``obs["perturbation"]`` is ``"control"``, a target
    (``"KLF1"``) or a sorted pair (``"CEBPA+KLF1"``); scPerturb's label (``"KLF1_CEBPA"``) is kept in
    ``obs["perturbation_scperturb"]`` and its other columns (``guide_id``, ``gemgroup``, ``nperts``,
    ``percent_mito``, ...) as they are. ``var_names`` are unique gene symbols; ``var["gene_name"]`` has the
    symbols as published and ``var["ensembl_id"]`` the Ensembl IDs (scPerturb's ``ensemble_id`` column).

    Parameters
    ----------
    cache_dir
        Directory of the downloaded and converted files. Default: ``$SAMS_SCVI_DATA_DIR`` if set, else
        ``pooch.os_cache("sams_scvi")``.
    known_hash
        Checksum to verify the download against instead of the built-in one (``"md5:..."`` or ``"sha256:..."``),
        e.g. if Zenodo publishes a new version of the file.

    Returns
    -------
    A new AnnData on each call.

    Notes
    -----
    Cite Norman, T. M. et al. Exploring genetic interaction manifolds constructed from rich single-cell phenotypes.
    *Science* 365, 786-793 (2019), doi:10.1126/science.aax4438, and scPerturb: Peidli, S. et al. scPerturb:
    harmonized single-cell perturbation data. *Nat. Methods* 21, 531-540 (2024), doi:10.1038/s41592-023-02144-y.
    """
    cache = _cache_dir(cache_dir)
    source = _SOURCES["norman2019"]
    known_hash = source.known_hash if known_hash is None else known_hash
    converted = _converted_path(cache, source, known_hash)
    if not converted.exists():
        raw = _fetch(source, cache, known_hash)
        _atomic_write(converted, lambda tmp: _convert_norman(raw, tmp))
    return ad.read_h5ad(converted)


def replogle2022_k562(
    screen: Literal["essential", "genome_wide", "sams_vae_subset"] = "essential",
    label: Literal["gene", "guide"] = "gene",
    cache_dir: str | os.PathLike | None = None,
    known_hash: str | None = None,
    chunk_size: int | None = _CHUNK_SIZE,
    keep_download: bool = True,
    backed: bool = False,
) -> ad.AnnData:
    """Replogle et al. 2022 genome-scale CRISPRi Perturb-seq screens in K562 cells (downloaded).

    One target gene per cell (a dual-guide vector), knocked down by CRISPRi; cells with non-targeting guides are
    the controls. Downloaded on first call from the authors' deposit, converted and cached; later calls read the
    converted file only.

    ``screen`` selects the file:

    ``"essential"``
        Essential-gene screen (``K562_essential_raw_singlecell_01.h5ad``, figshare+ file 35773219, 10.7 GB,
        md5 verified): 310,385 cells x 8,563 genes, about 2,000 targets.
    ``"genome_wide"``
        Genome-wide screen (``K562_gwps_raw_singlecell_01.h5ad``, figshare+ file 35775507, 65.8 GB, md5
        verified): 1,989,578 cells x 8,248 genes, 9,866 targets and 75,328 control cells. The conversion reads
        the file in blocks of ``chunk_size`` cells and never holds its matrix in memory; the converted file is
        large too (pass ``backed=True`` to read it on demand).
    ``"sams_vae_subset"``
        The subset of the genome-wide screen analysed in the SAMS-VAE paper (Bereket & Karaletsos 2023):
        118,641 cells x 1,187 genes, the 681 target genes with strong, clustered effects of Replogle et al. and
        2,000 random control cells; ``uns["pathways"]`` holds the authors' pathway annotation of targets. From the
        authors' public S3 bucket (``s3://insitro-research-2023-sams-vae/data/replogle.h5ad``, about 0.6 GB). No
        checksum is published for this file, so it is **not verified** unless you pass ``known_hash``.

    ``label`` selects the perturbation labels in ``obs["perturbation"]``: ``"gene"`` uses the target gene
    (``obs["gene"]``, ``"non-targeting"`` becomes ``"control"``); ``"guide"`` uses the guide pair
    (``obs["sgID_AB"]``, e.g. ``"AAAS_-_53715438.23-P1P2|AAAS_plus_53715355.23-P1P2"``), with every
    non-targeting pair collapsed to ``"control"`` and the strand ``+`` written ``plus`` (``+`` joins
    combinations). The SAMS-VAE paper modelled the subset with guide labels (722 treatments).

    ``X`` holds the raw UMI counts (float32 CSR). ``var_names`` are unique gene symbols (``var["gene_name"]``
    as published, ``var["ensembl_id"]`` the Ensembl IDs of the published index). The published ``obs`` columns
    (``gene``, ``gene_id``, ``transcript``, ``gene_transcript``, ``sgID_AB``, ``gem_group``, ``UMI_count``,
    ``mitopercent``, ``z_gemgroup_UMI``, ``core_scale_factor``, ``core_adjusted_UMI_count``) are kept.

    Parameters
    ----------
    screen
        ``"essential"``, ``"genome_wide"`` or ``"sams_vae_subset"``.
    label
        ``"gene"`` or ``"guide"``. The converted file is shared; labels are derived on each load.
    cache_dir
        Directory of the downloaded and converted files. Default: ``$SAMS_SCVI_DATA_DIR`` if set, else
        ``pooch.os_cache("sams_scvi")``.
    known_hash
        Checksum to verify the download against instead of the built-in one (``"md5:..."`` or ``"sha256:..."``);
        the only way to verify ``"sams_vae_subset"``.
    chunk_size
        Cells converted at a time; the published matrix is read block by block from disk and never held in
        memory. Peak memory of the conversion is about ``chunk_size`` x genes x 20 bytes (1.6 GB for the
        genome-wide screen at the default 10,000) plus ``obs`` (a few hundred MB for 2 million cells).
        ``None`` reads the whole file into memory instead (fine for ``"sams_vae_subset"``).
    keep_download
        Keep the downloaded file after conversion (``False`` deletes it, e.g. to save 66 GB for
        ``"genome_wide"``; a later conversion then downloads it again).
    backed
        Return the AnnData opened read-only on disk (``backed="r"``) instead of in memory; ``X`` is then read on
        access. Useful for ``"genome_wide"``, whose matrix needs tens of GB of memory.

    Returns
    -------
    A new AnnData on each call.

    Notes
    -----
    Cite Replogle, J. M. et al. Mapping information-rich genotype-phenotype landscapes with genome-scale
    Perturb-seq. *Cell* 185, 2559-2575 (2022), doi:10.1016/j.cell.2022.05.013; for ``"sams_vae_subset"`` also
    Bereket, M. & Karaletsos, T. Modelling cellular perturbations with the sparse additive mechanism shift
    variational autoencoder. *NeurIPS* (2023).
    """
    if screen not in _SCREENS:
        raise ValueError(f"Unknown screen {screen!r}; choose one of {', '.join(map(repr, _SCREENS))}.")
    if label not in _LABELS:
        raise ValueError(f"Unknown label {label!r}; choose one of {', '.join(map(repr, _LABELS))}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of cells or None, got {chunk_size!r}.")
    cache = _cache_dir(cache_dir)
    source = _SOURCES[screen]
    known_hash = source.known_hash if known_hash is None else known_hash
    converted = _converted_path(cache, source, known_hash)
    if not converted.exists():
        downloaded_before = (cache / source.fname).exists()
        raw = _fetch(source, cache, known_hash)
        _atomic_write(converted, lambda tmp: _convert_replogle(raw, tmp, chunk_size))
        if not keep_download and not downloaded_before:  # a copy the user placed there is theirs to keep
            raw.unlink()
    adata = ad.read_h5ad(converted, backed="r" if backed else None)
    adata.obs["perturbation"] = _replogle_labels(adata.obs, label)
    return adata


# ---------------------------------------------------------------------------------------------------- download


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    import pooch

    return Path(pooch.os_cache("sams_scvi"))


def _converted_path(cache: Path, source: _Source, known_hash: str | None) -> Path:
    """Name of the converted file: tied to the checksum it was verified against and to the conversion version."""
    tag = known_hash.split(":")[-1][:12].lower() if known_hash else "unverified"
    return cache / f"{Path(source.fname).stem}.{tag}.sams_scvi-v{_FORMAT}.h5ad"


def _fetch(source: _Source, cache: Path, known_hash: str | None) -> Path:
    """Download ``source`` into ``cache`` (once) and check it against ``known_hash`` (``None``: unchecked)."""
    try:
        import pooch
    except ImportError as error:  # pragma: no cover - pooch is a dependency
        raise ImportError("Downloading public screens needs pooch: pip install pooch.") from error
    cache.mkdir(parents=True, exist_ok=True)
    path = pooch.retrieve(
        source.url,
        known_hash=known_hash,
        fname=source.fname,
        path=cache,
        # pooch reads http(s), ftp, sftp and doi: URLs; file: URLs (a local mirror) are copied
        downloader=_copy_file_url if urlparse(source.url).scheme == "file" else None,
        progressbar=importlib.util.find_spec("tqdm") is not None,  # pooch's progress bar needs tqdm
    )
    return Path(path)


def _copy_file_url(url: str, output_file, pooch=None) -> None:
    """A pooch downloader for ``file:`` URLs: copies the local file (pooch then checks its hash)."""
    source = url2pathname(urlparse(url).path)
    if hasattr(output_file, "write"):
        with open(source, "rb") as handle:
            shutil.copyfileobj(handle, output_file)
    else:
        shutil.copyfile(source, output_file)


def _atomic_write(path: Path, write) -> None:
    """Run ``write(tmp)`` and move ``tmp`` to ``path``, so an interrupted conversion leaves no half-written cache."""
    tmp = path.with_name(f"{path.stem}.partial.h5ad")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- conversion


def _counts_csr(matrix) -> sparse.csr_matrix:
    """``matrix`` as float32 CSR without stored zeros; raises unless it holds non-negative integer counts."""
    if sparse.issparse(matrix):
        csr = sparse.csr_matrix(matrix, dtype=np.float32)
        csr.eliminate_zeros()
    else:
        csr = sparse.csr_matrix(np.asarray(matrix, dtype=np.float32))
    values = csr.data
    if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0 and np.all(values == np.round(values))):
        raise ValueError(
            "The downloaded matrix does not hold raw UMI counts (non-negative integers); the published file may "
            "have changed. Delete it from the cache directory and pass known_hash= for the new version."
        )
    csr.sort_indices()
    return csr


def _symbol_var(var: pd.DataFrame, symbols, ensembl_ids) -> pd.DataFrame:
    """``var`` indexed by unique gene symbols, with ``gene_name`` (symbols as published) and ``ensembl_id``."""
    var = var.copy()
    symbols = pd.Index(np.asarray(symbols, dtype=str))
    var["gene_name"] = np.asarray(symbols)
    if ensembl_ids is not None:
        var["ensembl_id"] = np.asarray(ensembl_ids, dtype=str)
    var.index = make_index_unique(symbols)
    var.index.name = None
    return var


def _combination_label(label: str, delimiter: str) -> str:
    """``"SET_KLF1"`` -> ``"KLF1+SET"``; control atoms dropped, ``"control"`` when none is left."""
    atoms = sorted({atom.strip() for atom in label.split(delimiter)} - _CONTROL_ATOMS)
    return "+".join(atoms) if atoms else CONTROL


def _map_labels(values: pd.Series, convert) -> pd.Categorical:
    """Apply ``convert`` to each distinct label only (millions of cells, thousands of labels)."""
    codes, uniques = pd.factorize(values.astype(str), sort=True)
    converted = np.asarray([convert(label) for label in uniques], dtype=object)
    return pd.Categorical(converted[codes])


def _convert_norman(src: Path, dst: Path) -> None:
    """Convert scPerturb's Norman 2019 file to the package's conventions (in memory: 111k cells, sparse)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Variable names are not unique", UserWarning)  # made unique below
        adata = ad.read_h5ad(src)
    obs = adata.obs.copy()
    obs["perturbation_scperturb"] = obs["perturbation"]
    obs["perturbation"] = _map_labels(obs["perturbation"], lambda label: _combination_label(label, "_"))
    ensembl = adata.var["ensemble_id"] if "ensemble_id" in adata.var else adata.var.get("ensembl_id")
    var = _symbol_var(adata.var.drop(columns=["ensemble_id"], errors="ignore"), adata.var_names, ensembl)
    out = ad.AnnData(X=_counts_csr(adata.X), obs=obs, var=var, uns=dict(adata.uns), obsm=dict(adata.obsm))
    out.write_h5ad(dst, compression="lzf")


def _replogle_var(var: pd.DataFrame) -> pd.DataFrame:
    if "gene_name" not in var:  # symbols already in the index
        return _symbol_var(var, var.index, None)
    return _symbol_var(var.drop(columns=["gene_name"]), var["gene_name"], var.index)


def _replogle_labels(obs: pd.DataFrame, label: str) -> pd.Categorical:
    """Perturbation labels of a Replogle screen from its target genes or guide pairs."""
    if label == "gene":
        return _map_labels(obs["gene"], lambda gene: CONTROL if gene == "non-targeting" else gene)
    # As the SAMS-VAE authors did: any pair with a non-targeting guide is a control cell.
    return _map_labels(
        obs["sgID_AB"], lambda guide: CONTROL if "non-targeting" in guide else guide.replace("+", "plus")
    )


def _convert_replogle(src: Path, dst: Path, chunk_size: int | None) -> None:
    """A Replogle 2022 file -> float32 CSR counts and symbol var_names; labels are derived on load."""
    if chunk_size is None:
        adata = ad.read_h5ad(src)
        out = ad.AnnData(X=_counts_csr(adata.X), obs=adata.obs, var=_replogle_var(adata.var), uns=dict(adata.uns))
        out.write_h5ad(dst, compression="lzf")
        return
    backed = ad.read_h5ad(src, backed="r")
    try:
        n_obs, n_vars = backed.shape
        ad.AnnData(obs=backed.obs.copy(), var=_replogle_var(backed.var), uns=dict(backed.uns)).write_h5ad(dst)
        with h5py.File(dst, "a") as file:
            _write_csr_chunks(file, backed, n_obs, n_vars, chunk_size)
    finally:
        backed.file.close()


def _write_csr_chunks(file: h5py.File, backed: ad.AnnData, n_obs: int, n_vars: int, chunk_size: int) -> None:
    """Write ``backed.X`` as anndata's on-disk CSR matrix, ``chunk_size`` rows at a time (64-bit row pointers)."""
    group = file.create_group("X")
    group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": np.array([n_obs, n_vars])})
    chunked = {"shape": (0,), "maxshape": (None,), "chunks": (_H5_CHUNK,), "compression": "lzf"}
    data = group.create_dataset("data", dtype=np.float32, **chunked)
    indices = group.create_dataset("indices", dtype=np.int32, **chunked)
    indptr = np.zeros(n_obs + 1, dtype=np.int64)
    nnz = 0
    for start in range(0, n_obs, chunk_size):
        stop = min(start + chunk_size, n_obs)
        block = _counts_csr(backed.X[start:stop])
        data.resize((nnz + block.nnz,))
        indices.resize((nnz + block.nnz,))
        data[nnz:] = block.data
        indices[nnz:] = block.indices
        indptr[start + 1 : stop + 1] = nnz + block.indptr[1:]
        nnz += block.nnz
    group.create_dataset("indptr", data=indptr)
