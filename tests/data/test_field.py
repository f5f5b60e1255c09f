import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import sams_scvi
from sams_scvi.data import parse_perturbations


def _adata(labels, **obs):
    rng = np.random.default_rng(0)
    x = sparse.csr_matrix(rng.poisson(2.0, (len(labels), 5)).astype(np.float32))
    return ad.AnnData(x, obs=pd.DataFrame({"perturbation": labels, **obs}, index=[f"c{i}" for i in range(len(labels))]))


def test_parse_singles_combos_controls():
    design, vocab = parse_perturbations(["control", "B", "A+B", "A", " C ", "B+A"])
    assert vocab == ["A", "B", "C"]
    np.testing.assert_array_equal(design.toarray(), [[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 0]])
    assert design.dtype == np.float32 and sparse.issparse(design)


def test_parse_custom_delimiter_and_control_inside_combination():
    design, vocab = parse_perturbations(["ctrl", "KLF1_ctrl", "KLF1_SET"], control_value="ctrl", delimiter="_")
    assert vocab == ["KLF1", "SET"]
    np.testing.assert_array_equal(design.toarray(), [[0, 0], [1, 0], [1, 1]])


def test_parse_dosages():
    design, _ = parse_perturbations(["A+B", "A", "control"], dosages=["1+0.5", "2", np.nan])
    np.testing.assert_allclose(design.toarray(), [[1.0, 0.5], [2.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="has 1 values"):
        parse_perturbations(["A+B"], dosages=["1"])
    with pytest.raises(ValueError, match="not a"):
        parse_perturbations(["A"], dosages=["high"])


def test_parse_transfer_with_vocabulary():
    design, vocab = parse_perturbations(["B+C", "control"], vocabulary=["A", "B", "C"])
    assert vocab == ["A", "B", "C"]
    np.testing.assert_array_equal(design.toarray(), [[0, 1, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match="'D'"):
        parse_perturbations(["A+D"], vocabulary=["A", "B", "C"])


@pytest.mark.parametrize("bad", ["+", "A+", "++B", ""])
def test_parse_rejects_empty_names(bad):
    with pytest.raises(ValueError, match="empty perturbation name"):
        parse_perturbations(["A", bad])


def test_parse_rejects_missing_labels():
    with pytest.raises(ValueError, match="1 missing"):
        parse_perturbations(pd.Series(["A", None, "control"]))


def test_setup_registers_design_and_vocabulary():
    adata = _adata(["control", "A", "B", "A+B"] * 5)
    before = adata.obs.copy()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    design = adata.obsm["_scvi_perturbation"]
    assert design.shape == (20, 2)
    np.testing.assert_array_equal(design[:4].toarray(), [[0, 0], [1, 0], [0, 1], [1, 1]])
    pd.testing.assert_frame_equal(adata.obs[before.columns], before)
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=8)
    assert model.summary_stats.n_perturbations == 2
    state = model.adata_manager.get_state_registry("perturbation")
    assert list(state["vocabulary"]) == ["A", "B"]
    assert list(state["observed_labels"]) == ["A", "A+B", "B"]
    assert state["n_control_cells"] == 5


def test_transfer_accepts_unseen_combination_and_rejects_unknown():
    adata = _adata(["control", "A", "B", "C"] * 5)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=8)
    manager = model.adata_manager

    new = _adata(["B+C", "A+C", "control"])
    new_manager = manager.transfer_fields(new)
    np.testing.assert_array_equal(
        new_manager.get_from_registry("perturbation").toarray(), [[0, 1, 1], [1, 0, 1], [0, 0, 0]]
    )

    with pytest.raises(ValueError, match="'D'"):
        manager.transfer_fields(_adata(["A", "D"]))


def test_setup_errors_are_clear():
    adata = _adata(["control", "A"] * 3)
    with pytest.raises(KeyError, match="'guide'"):
        sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="guide")
    with pytest.raises(ValueError, match="missing"):
        sams_scvi.SAMSVAE.setup_anndata(_adata(["control", None, "A"]), perturbation_key="perturbation")
    with pytest.raises(ValueError, match="only the control"):
        sams_scvi.SAMSVAE.setup_anndata(_adata(["control"] * 3), perturbation_key="perturbation")
    with pytest.raises(ValueError, match="copy"):
        sams_scvi.SAMSVAE.setup_anndata(adata[:4], perturbation_key="perturbation")


def test_count_models_reject_negative_values_and_warn_on_non_integers():
    adata = _adata(["control", "A"] * 3)
    adata.X = adata.X.toarray() - 5
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")  # normalised data can be registered
    with pytest.raises(ValueError, match="likelihood='normal'"):
        sams_scvi.SAMSVAE(adata)  # ... but the negative binomial needs counts
    sams_scvi.SAMSVAE(adata, likelihood="normal")
    adata = _adata(["control", "A"] * 3)
    adata.X = adata.X.toarray() + 0.5
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    with pytest.warns(UserWarning, match="unnormalized count data"):
        sams_scvi.SAMSVAE(adata)
    adata.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")


def test_no_control_cells_warns():
    with pytest.warns(UserWarning, match="estimate_ate"):
        sams_scvi.SAMSVAE.setup_anndata(_adata(["A", "B"] * 3), perturbation_key="perturbation")


def test_unused_categories_are_ignored():
    labels = pd.Categorical(["control", "A"] * 3, categories=["control", "A", "Z"])
    adata = _adata(labels)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    assert adata.obsm["_scvi_perturbation"].shape == (6, 1)


def test_dosage_key():
    adata = _adata(["A+B", "A", "control"], dose=["1+0.5", "2", "0"])
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", dosage_key="dose")
    np.testing.assert_allclose(adata.obsm["_scvi_perturbation"].toarray(), [[1, 0.5], [2, 0], [0, 0]])


def test_unique_encoding_names_each_combination_once():
    design, vocabulary = parse_perturbations(
        ["control", "A", "A + B", "B+A", "B+control", "A+B+C"], unique_combinations=True
    )
    assert vocabulary == ["A", "A+B", "A+B+C", "B"]
    assert design.getnnz(axis=1).tolist() == [0, 1, 1, 1, 1, 1]
    assert design[2].indices.tolist() == design[3].indices.tolist() == [1]  # "A + B" and "B+A" are one treatment
    assert design[4].indices.tolist() == [3]  # a control atom is ignored
    with pytest.raises(ValueError, match="unique encoding"):
        parse_perturbations(["A+C"], unique_combinations=True, vocabulary=vocabulary)


def test_missing_dosages_of_any_kind_mean_dose_one():
    """NaN, None and pandas' NA in a dosage column all mean "no dosage given" (dose 1), as "" does."""
    labels = ["A", "A+B", "control", "B", "A"]
    for missing in (np.nan, None, pd.NA):
        dosages = pd.array([missing, "1+0.5", missing, "2", missing], dtype="string" if missing is pd.NA else object)
        design, vocabulary = parse_perturbations(labels, dosages=dosages)
        assert vocabulary == ["A", "B"]
        np.testing.assert_array_equal(design.toarray(), [[1, 0], [1, 0.5], [0, 0], [0, 2], [1, 0]])
