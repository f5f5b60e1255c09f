"""Loaders of the public screens (Norman 2019, Replogle 2022), without network.

Small h5ad files with the structure of each published file (its obs/var columns, label conventions, dense or sparse
X, Ensembl IDs, non-targeting controls, Norman's "_"-joined pairs) are served to the loaders through file:// URLs:
pooch copies them into the cache and checks their real sha256, as it would a download.
"""

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pooch
import pytest
from scipy import sparse

import sams_scvi
from sams_scvi.data import _public

# ------------------------------------------------------------------------------------------------ synthetic sources

# scPerturb's NormanWeissman2019_filtered.h5ad: labels "control", "A" or "A_B" (one order per pair, not sorted).
NORMAN_LABELS = {
    "control": 30,
    "KLF1": 12,
    "CEBPA": 12,
    "SET": 10,
    "SET_KLF1": 14,  # -> "KLF1+SET"
    "KLF1_CEBPA": 12,  # -> "CEBPA+KLF1"
    "CBL_UBASH3A": 10,
}
NORMAN_EXPECTED = {
    "control": "control",
    "KLF1": "KLF1",
    "CEBPA": "CEBPA",
    "SET": "SET",
    "SET_KLF1": "KLF1+SET",
    "KLF1_CEBPA": "CEBPA+KLF1",
    "CBL_UBASH3A": "CBL+UBASH3A",
}
NORMAN_OBS = [
    "guide_id", "read_count", "UMI_count", "coverage", "gemgroup", "good_coverage", "number_of_cells",
    "tissue_type", "cell_line", "cancer", "disease", "perturbation_type", "celltype", "organism", "perturbation",
    "nperts", "ngenes", "ncounts", "percent_mito", "percent_ribo",
]  # fmt: skip

# Replogle's K562_*_raw_singlecell_01.h5ad: one target per cell, dual-guide IDs with strand signs "+" and "-".
REPLOGLE_GUIDES = {
    "AAAS_-_53715438.23-P1P2|AAAS_+_53715355.23-P1P2": ("AAAS", 14),
    "AAAS_+_53702410.23-P2|AAAS_-_53702448.23-P2": ("AAAS", 8),
    "CTSC_+_88358377.23-P1P2|CTSC_-_88358301.23-P1P2": ("CTSC", 12),
    "NEDD8_-_24218480.23-P1P2|NEDD8_+_24218549.23-P1P2": ("NEDD8", 10),
    "ST20-MTHFS_+_80217680.23-P1P2|ST20-MTHFS_-_80217651.23-P1P2": ("ST20-MTHFS", 9),
    "non-targeting_03530|non-targeting_01407": ("non-targeting", 15),
    "non-targeting_00442|non-targeting_01312": ("non-targeting", 12),
}
REPLOGLE_OBS = [
    "gem_group", "gene", "gene_id", "transcript", "gene_transcript", "sgID_AB", "mitopercent", "UMI_count",
    "z_gemgroup_UMI", "core_scale_factor", "core_adjusted_UMI_count",
]  # fmt: skip
REPLOGLE_VAR = [
    "gene_name", "chr", "start", "end", "class", "strand", "length", "in_matrix", "mean", "std", "cv", "fano",
]  # fmt: skip


def _norman_source(path, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(list(NORMAN_LABELS), list(NORMAN_LABELS.values()))
    rng.shuffle(labels)
    n_cells, n_genes = labels.size, 25
    obs = pd.DataFrame(index=[f"AAACCTGAGAAGAAGC-{i}" for i in range(n_cells)])
    for column in NORMAN_OBS:
        obs[column] = rng.integers(0, 100, n_cells)
    obs["perturbation"] = pd.Categorical(labels)
    obs["guide_id"] = pd.Categorical([f"{label}__{label}" for label in labels])
    obs["celltype"] = pd.Categorical(["lymphoblasts"] * n_cells)
    obs["nperts"] = [0 if label == "control" else label.count("_") + 1 for label in labels]
    symbols = [f"GENE{j}" for j in range(n_genes)]
    symbols[3] = symbols[4] = "MATR3"  # scPerturb's var_names repeat some symbols
    var = pd.DataFrame(
        {"ensemble_id": [f"ENSG{j:011d}" for j in range(n_genes)], "ncounts": 1.0, "ncells": 1}, index=symbols
    )
    counts = rng.poisson(rng.gamma(0.6, 2.0, n_genes), (n_cells, n_genes)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Variable names are not unique")  # as in the published file
        ad.AnnData(X=sparse.csc_matrix(counts), obs=obs, var=var).write_h5ad(path)
    return path, counts


def _read_norman_source(path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Variable names are not unique")
        return ad.read_h5ad(path)


def _replogle_source(path, seed=0, dense=True, pathways=False, counts_fn=None):
    rng = np.random.default_rng(seed)
    guides = np.repeat(list(REPLOGLE_GUIDES), [n for _, n in REPLOGLE_GUIDES.values()])
    rng.shuffle(guides)
    n_cells, n_genes = guides.size, 20
    genes = np.array([REPLOGLE_GUIDES[guide][0] for guide in guides])
    obs = pd.DataFrame(index=pd.Index([f"AAACCCAAGAAACCAT-{i}" for i in range(n_cells)], name="cell_barcode"))
    for column in REPLOGLE_OBS:
        obs[column] = rng.random(n_cells)
    obs["gem_group"] = rng.integers(1, 5, n_cells)
    obs["gene"] = pd.Categorical(genes)
    obs["gene_id"] = pd.Categorical(["non-targeting" if g == "non-targeting" else f"ENSG_{g}" for g in genes])
    obs["transcript"] = pd.Categorical(np.where(genes == "non-targeting", "non-targeting", "P1P2"))
    obs["gene_transcript"] = pd.Categorical([f"7_{g}_P1P2" for g in genes])
    obs["sgID_AB"] = pd.Categorical(guides)
    obs["UMI_count"] = rng.integers(1000, 5000, n_cells).astype(float)
    ensembl = [f"ENSG{j:011d}" for j in range(n_genes)]
    var = pd.DataFrame({column: rng.random(n_genes) for column in REPLOGLE_VAR}, index=ensembl)
    names = [f"SYM{j}" for j in range(n_genes)]
    names[5] = names[6] = "TBCE"  # two Ensembl IDs with one symbol
    var["gene_name"] = names
    var["chr"] = pd.Categorical(["chr1"] * n_genes)
    counts = rng.poisson(rng.gamma(0.6, 2.0, n_genes), (n_cells, n_genes)).astype(np.float32)
    if counts_fn is not None:
        counts = counts_fn(counts)
    uns = {"pathways": {"EXOSOME": ["CTSC", "AAAS"], "MEDIATOR_COMPLEX": ["NEDD8"]}} if pathways else {}
    adata = ad.AnnData(X=counts if dense else sparse.csr_matrix(counts), obs=obs, var=var, uns=uns)
    adata.write_h5ad(path)
    return path, counts


def _serve(monkeypatch, key, path, known_hash="real"):
    """Point the loader's registry entry ``key`` at a local file, with its real sha256 by default."""
    if known_hash == "real":
        known_hash = f"sha256:{pooch.file_hash(str(path))}"
    fname = _public._SOURCES[key].fname
    monkeypatch.setitem(_public._SOURCES, key, _public._Source(path.as_uri(), known_hash, fname))


@pytest.fixture
def source_dir(tmp_path):
    path = tmp_path / "source"
    path.mkdir()
    return path


@pytest.fixture
def norman(source_dir, monkeypatch):
    path, counts = _norman_source(source_dir / "norman.h5ad")
    _serve(monkeypatch, "norman2019", path)
    return path, counts


@pytest.fixture
def essential(source_dir, monkeypatch):
    path, counts = _replogle_source(source_dir / "essential.h5ad")
    _serve(monkeypatch, "essential", path)
    return path, counts


def _no_label_warnings(adata):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


# ---------------------------------------------------------------------------------------------------------- Norman


def test_norman_conversion(norman, tmp_path):
    path, counts = norman
    source = _read_norman_source(path)
    adata = sams_scvi.data.norman2019(cache_dir=tmp_path / "cache")

    # labels: "control", singles, sorted "+"-joined pairs; scPerturb's label kept
    expected = source.obs["perturbation"].astype(str).map(NORMAN_EXPECTED)
    assert (adata.obs["perturbation"].astype(str) == expected.to_numpy()).all()
    assert isinstance(adata.obs["perturbation"].dtype, pd.CategoricalDtype)
    assert (adata.obs["perturbation_scperturb"].astype(str) == source.obs["perturbation"].astype(str)).all()
    assert (adata.obs["perturbation"] == "control").sum() == NORMAN_LABELS["control"]
    # counts: float32 CSR, integer, unchanged, cells in the published order
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    assert list(adata.obs_names) == list(source.obs_names)
    # genes: unique symbols, published symbols and Ensembl IDs in var
    assert adata.var_names.is_unique
    assert list(adata.var_names[3:5]) == ["MATR3", "MATR3-1"]
    assert list(adata.var["gene_name"]) == list(source.var_names)
    assert list(adata.var["ensembl_id"]) == list(source.var["ensemble_id"])
    assert {"ncounts", "ncells"} <= set(adata.var.columns)
    # every published obs column kept
    assert set(NORMAN_OBS) <= set(adata.obs.columns)
    np.testing.assert_array_equal(adata.obs["percent_ribo"], source.obs["percent_ribo"])


def test_norman_registers_without_label_warnings(norman, tmp_path):
    adata = sams_scvi.data.norman2019(cache_dir=tmp_path / "cache")
    assert _no_label_warnings(adata) == []
    registry = sams_scvi.SAMSVAE._get_most_recent_anndata_manager(adata).get_state_registry("perturbation")
    # pairs are combinations of the single perturbations, not perturbations of their own
    assert set(registry["vocabulary"]) == {"CBL", "CEBPA", "KLF1", "SET", "UBASH3A"}
    assert registry["n_control_cells"] == NORMAN_LABELS["control"]


def test_norman_cache_is_reused(norman, tmp_path):
    path, counts = norman
    cache = tmp_path / "cache"
    first = sams_scvi.data.norman2019(cache_dir=cache)
    assert (cache / "NormanWeissman2019_filtered.h5ad").exists()  # the verified download is kept
    path.unlink()  # no source any more: the second call must read the converted file
    second = sams_scvi.data.norman2019(cache_dir=cache)
    assert second is not first
    np.testing.assert_array_equal(second.X.toarray(), counts)
    second.obs["perturbation"] = "changed"  # a new AnnData on each call
    assert (sams_scvi.data.norman2019(cache_dir=cache).obs["perturbation"] != "changed").all()
    assert not list(cache.glob("*.partial.h5ad"))


def test_cache_dir_from_environment(norman, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMS_SCVI_DATA_DIR", str(tmp_path / "env_cache"))
    sams_scvi.data.norman2019()
    converted = list((tmp_path / "env_cache").glob("NormanWeissman2019_filtered.*.sams_scvi-v*.h5ad"))
    assert len(converted) == 1
    monkeypatch.delenv("SAMS_SCVI_DATA_DIR")
    assert _public._cache_dir(None) == Path(pooch.os_cache("sams_scvi"))


def test_wrong_hash_raises(tmp_path, source_dir, monkeypatch):
    path, _ = _norman_source(source_dir / "norman.h5ad")
    _serve(monkeypatch, "norman2019", path, known_hash="sha256:" + "0" * 64)
    with pytest.raises(ValueError, match="hash"):
        sams_scvi.data.norman2019(cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.h5ad"))  # nothing kept, nothing converted
    # a checksum passed by the user replaces the built-in one, and is checked too
    with pytest.raises(ValueError, match="hash"):
        sams_scvi.data.norman2019(cache_dir=tmp_path / "cache", known_hash="md5:" + "0" * 32)
    good = f"md5:{pooch.file_hash(str(path), alg='md5')}"
    assert sams_scvi.data.norman2019(cache_dir=tmp_path / "cache", known_hash=good).n_obs == sum(NORMAN_LABELS.values())


def test_non_count_matrix_raises(tmp_path, source_dir, monkeypatch):
    path, _ = _replogle_source(source_dir / "essential.h5ad", counts_fn=np.log1p)
    _serve(monkeypatch, "essential", path)
    with pytest.raises(ValueError, match="raw UMI counts"):
        sams_scvi.data.replogle2022_k562(cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*sams_scvi*.h5ad"))


# ------------------------------------------------------------------------------------------------------- Replogle


def test_replogle_gene_labels(essential, tmp_path):
    path, counts = essential
    source = ad.read_h5ad(path)
    adata = sams_scvi.data.replogle2022_k562("essential", cache_dir=tmp_path / "cache")

    genes = source.obs["gene"].astype(str)
    expected = genes.where(genes != "non-targeting", "control")
    assert (adata.obs["perturbation"].astype(str) == expected.to_numpy()).all()
    assert set(adata.obs["perturbation"].cat.categories) == {"AAAS", "CTSC", "NEDD8", "ST20-MTHFS", "control"}
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    assert adata.obs_names.name == "cell_barcode"
    assert list(adata.obs_names) == list(source.obs_names)
    assert set(REPLOGLE_OBS) <= set(adata.obs.columns)
    assert (adata.obs["sgID_AB"].astype(str) == source.obs["sgID_AB"].astype(str)).all()
    assert adata.var_names.is_unique and list(adata.var_names[5:7]) == ["TBCE", "TBCE-1"]
    assert list(adata.var["ensembl_id"]) == list(source.var_names)
    assert list(adata.var["gene_name"]) == list(source.var["gene_name"])
    assert set(REPLOGLE_VAR) <= set(adata.var.columns)
    assert _no_label_warnings(adata) == []


def test_replogle_guide_labels(essential, tmp_path):
    adata = sams_scvi.data.replogle2022_k562("essential", label="guide", cache_dir=tmp_path / "cache")
    labels = adata.obs["perturbation"].astype(str)
    control = adata.obs["gene"].astype(str) == "non-targeting"
    assert (labels[control] == "control").all()  # both non-targeting pairs collapse to the control
    assert not labels.str.contains("+", regex=False).any()  # strand "+" would read as a combination
    assert "AAAS_-_53715438.23-P1P2|AAAS_plus_53715355.23-P1P2" in set(labels)
    targeting = {guide for guide, (gene, _) in REPLOGLE_GUIDES.items() if gene != "non-targeting"}
    assert labels[~control].nunique() == len(targeting)
    assert _no_label_warnings(adata) == []
    registry = sams_scvi.SAMSVAE._get_most_recent_anndata_manager(adata).get_state_registry("perturbation")
    assert len(registry["vocabulary"]) == len(targeting)


def test_one_converted_file_for_both_labels(essential, tmp_path):
    path, _ = essential
    cache = tmp_path / "cache"
    sams_scvi.data.replogle2022_k562(cache_dir=cache)
    path.unlink()
    adata = sams_scvi.data.replogle2022_k562(label="guide", cache_dir=cache)
    assert "control" in set(adata.obs["perturbation"])
    assert len(list(cache.glob("*sams_scvi-v*.h5ad"))) == 1


@pytest.mark.parametrize("dense", [True, False])
def test_chunked_conversion_matches_in_memory(tmp_path, source_dir, monkeypatch, dense):
    path, counts = _replogle_source(source_dir / "gwps.h5ad", seed=1, dense=dense)
    _serve(monkeypatch, "genome_wide", path)
    opened = []
    read_h5ad = ad.read_h5ad

    def spy(filename, backed=None, **kwargs):
        opened.append((os.path.basename(filename), backed))
        return read_h5ad(filename, backed=backed, **kwargs)

    monkeypatch.setattr(_public.ad, "read_h5ad", spy)
    chunked = sams_scvi.data.replogle2022_k562("genome_wide", cache_dir=tmp_path / "a", chunk_size=7)
    # the published file is only ever opened on disk (backed), never read into memory
    assert [backed for name, backed in opened if name == "K562_gwps_raw_singlecell_01.h5ad"] == ["r"]
    in_memory = sams_scvi.data.replogle2022_k562("genome_wide", cache_dir=tmp_path / "b", chunk_size=None)

    assert sparse.isspmatrix_csr(chunked.X) and chunked.X.dtype == np.float32
    assert (chunked.X != in_memory.X).nnz == 0
    np.testing.assert_array_equal(chunked.X.toarray(), counts)
    pd.testing.assert_frame_equal(chunked.obs, in_memory.obs)
    pd.testing.assert_frame_equal(chunked.var, in_memory.var)
    # one cell per chunk, and one chunk larger than the data, give the same matrix
    for size in (1, 10_000):
        _public._convert_replogle(path, tmp_path / f"c{size}.h5ad", size)
        assert (ad.read_h5ad(tmp_path / f"c{size}.h5ad").X != in_memory.X).nnz == 0


def test_backed(essential, tmp_path):
    _, counts = essential
    adata = sams_scvi.data.replogle2022_k562(cache_dir=tmp_path / "cache", backed=True)
    assert adata.isbacked
    assert "control" in set(adata.obs["perturbation"])
    np.testing.assert_array_equal(adata.X[:5].toarray(), counts[:5])
    adata.file.close()


def test_sams_vae_subset_unverified_unless_hash_given(tmp_path, source_dir, monkeypatch):
    path, counts = _replogle_source(source_dir / "replogle.h5ad", seed=2, pathways=True)
    _serve(monkeypatch, "sams_vae_subset", path, known_hash=None)  # as in the registry: no published checksum
    assert _public._SOURCES["sams_vae_subset"].known_hash is None
    adata = sams_scvi.data.replogle2022_k562("sams_vae_subset", label="guide", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    assert set(adata.uns["pathways"]) == {"EXOSOME", "MEDIATOR_COMPLEX"}
    assert list(adata.uns["pathways"]["EXOSOME"]) == ["CTSC", "AAAS"]
    assert list((tmp_path / "cache").glob("*.unverified.*"))
    # with a checksum from the user the file is verified
    with pytest.raises(ValueError, match="hash"):
        sams_scvi.data.replogle2022_k562("sams_vae_subset", cache_dir=tmp_path / "other", known_hash="0" * 64)
    good = pooch.file_hash(str(path))
    verified = sams_scvi.data.replogle2022_k562("sams_vae_subset", cache_dir=tmp_path / "other", known_hash=good)
    assert verified.n_obs == adata.n_obs


def test_registry_sources_are_documented():
    sources = _public._SOURCES
    assert sources["norman2019"].known_hash == "md5:c870e6967d91c017d9da827bab183cd6"
    assert sources["essential"].known_hash == "md5:4f1122ce1c7f13299a68df6459a266d3"
    assert sources["genome_wide"].known_hash == "md5:887e3e6a8c8df6eadf7a3030a53c9546"
    assert sources["sams_vae_subset"].known_hash is None
    assert all(source.url.startswith("https://") for source in sources.values())


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="'essential', 'genome_wide', 'sams_vae_subset'"):
        sams_scvi.data.replogle2022_k562("gwps", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="'gene', 'guide'"):
        sams_scvi.data.replogle2022_k562(label="sgID_AB", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="chunk_size"):
        sams_scvi.data.replogle2022_k562(chunk_size=0, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing downloaded
