import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from sams_scvi import metrics


def _additive_screen(n_per_group: int = 3) -> ad.AnnData:
    """Every cell has 1e4 UMIs, so the normalised scale is the identity and y = log2(1 + x) on genes g0, g1.

    y(control) = (1, 1), y(A) = (2, 1), y(B) = (1, 2), y(A+B) = (2, 2): exactly additive on g0 and g1.
    """
    profiles = {"control": [1, 1], "A": [3, 1], "B": [1, 3], "A+B": [3, 3]}
    rows, labels = [], []
    for label, (g0, g1) in profiles.items():
        rows += [[g0, g1, 10_000 - g0 - g1]] * n_per_group
        labels += [label] * n_per_group
    obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(
        sparse.csr_matrix(np.array(rows, dtype=np.float32)), obs=obs, var=pd.DataFrame(index=["g0", "g1", "filler"])
    )


def test_observed_ate_hand_computed():
    adata = _additive_screen()
    ate = metrics.observed_ate(adata)
    assert list(ate.obs_names) == ["A", "A+B", "B"]
    np.testing.assert_allclose(ate[:, ["g0", "g1"]].X, [[1, 0], [1, 1], [0, 1]], atol=1e-6)
    np.testing.assert_allclose(ate["A", "filler"].X, np.log2(9997) - np.log2(9999), rtol=1e-5)
    assert ate.obs["n_cells"].tolist() == [3, 3, 3] and ate.uns["n_control_cells"] == 3
    # chunking does not change the result; indices restrict the cells
    np.testing.assert_allclose(metrics.observed_ate(adata, chunk_size=2).X, ate.X, rtol=1e-6)
    sub = metrics.observed_ate(adata, indices=[0, 1, 3], perturbations=["A"])
    assert sub.obs["n_cells"].tolist() == [1] and sub.uns["n_control_cells"] == 2
    log1p = metrics.observed_ate(adata, scale="log1p", perturbations=["A"])
    np.testing.assert_allclose(log1p[:, "g0"].X, np.log(4) - np.log(2), rtol=1e-6)


def test_observed_ate_errors():
    adata = _additive_screen()
    with pytest.raises(ValueError, match="control cells"):
        metrics.observed_ate(adata, control_value="ctrl")
    with pytest.raises(ValueError, match="'Z'"):
        metrics.observed_ate(adata, perturbations=["Z"])
    with pytest.raises(KeyError):
        metrics.observed_ate(adata, perturbation_key="guide")


def test_ate_metrics_hand_computed():
    observed = pd.DataFrame([[3.0, -1.0, 0.5], [0.0, 2.0, -4.0]], index=["A", "B"], columns=["g0", "g1", "g2"])
    same = metrics.ate_metrics(observed, observed, top_k=1)
    assert same["pearson"] == pytest.approx(1.0) and same["r2"] == pytest.approx(1.0)
    assert same["direction_agreement_top1"] == 1.0 and same["n_perturbations"] == 2

    doubled = metrics.ate_metrics(2 * observed, observed, top_k=2)
    o = observed.to_numpy().ravel()
    assert doubled["pearson"] == pytest.approx(1.0)
    assert doubled["slope"] == pytest.approx(2.0) and doubled["slope_top2"] == pytest.approx(2.0)
    assert doubled["r2"] == pytest.approx(1 - (o**2).sum() / ((o - o.mean()) ** 2).sum())
    # top-2 by |observed|: A -> (3, -1), B -> (-4, 2)
    top = np.array([3.0, -1.0, -4.0, 2.0])
    assert doubled["r2_top2"] == pytest.approx(1 - (top**2).sum() / ((top - top.mean()) ** 2).sum())

    flipped = metrics.ate_metrics(-observed, observed, top_k=2)
    assert flipped["pearson"] == pytest.approx(-1.0) and flipped["direction_agreement_top2"] == 0.0
    assert flipped["pearson_per_perturbation"] == pytest.approx(-1.0) and flipped["slope"] == pytest.approx(-1.0)

    predicted = observed.copy()
    predicted.loc["A", "g2"] = 10.0  # outside A's top-2 genes: top-k metrics unchanged
    assert metrics.ate_metrics(predicted, observed, top_k=2)["pearson_top2"] == pytest.approx(1.0)
    assert metrics.ate_pearson(predicted, observed) < 1.0


def test_ate_metrics_errors():
    observed = pd.DataFrame([[1.0, 2.0]], index=["A"], columns=["g0", "g1"])
    with pytest.raises(ValueError, match="exceeds"):
        metrics.ate_metrics(observed, observed, top_k=3)
    with pytest.raises(ValueError, match="missing"):
        metrics.ate_metrics(observed, observed, perturbations=["B"])


def test_baselines_recover_additive_structure():
    adata = _additive_screen()
    observed = metrics.observed_ate(adata)
    additive = metrics.baseline_ate(adata, "additive", ["A+B", "A"])
    np.testing.assert_allclose(additive[:, ["g0", "g1"]].X, observed[["A+B", "A"], ["g0", "g1"]].X, atol=1e-6)
    # fitted without the combination cells, as for a held-out combination
    no_combo = np.flatnonzero(adata.obs["perturbation"] != "A+B")
    held_out = metrics.baseline_ate(adata, "additive", ["A+B"], indices=no_combo)
    np.testing.assert_allclose(held_out[:, ["g0", "g1"]].X, [[1, 1]], atol=1e-6)
    assert np.all(metrics.baseline_ate(adata, "control", ["A+B"]).X == 0)
    pooled = metrics.baseline_ate(adata, "mean_perturbed", ["A", "B"])
    np.testing.assert_allclose(pooled[:, "g0"].X.ravel(), [2 / 3, 2 / 3], atol=1e-6)
    with pytest.raises(ValueError, match="'C'"):
        metrics.baseline_ate(adata, "additive", ["A+C"])
    with pytest.raises(ValueError, match="kind"):
        metrics.baseline_ate(adata, "median", ["A"])


def _combination_screen() -> ad.AnnData:
    names = list("ABCDE")
    labels = ["control"] * 100 + [n for n in names for _ in range(50)]
    labels += [f"{a}+{b}" for a, b in itertools.combinations(names, 2) for _ in range(20)]
    return ad.AnnData(obs=pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))]))


def _combos(adata, cells):
    labels = adata.obs["perturbation"].to_numpy()[cells]
    return {label for label in labels if "+" in label}


def test_ood_split_is_nested_and_holds_out_combinations():
    adata = _combination_screen()
    splits = {f: metrics.combination_split(adata, f, seed=1) for f in (0.0, 0.25, 0.5, 0.75, 1.0)}
    for f, (train, val, test) in splits.items():
        assert len(np.intersect1d(train, test)) == 0 and len(np.intersect1d(train, val)) == 0
        assert len(_combos(adata, train)) == int(f * 10)
        assert len(_combos(adata, test)) == 3  # ceil(0.25 * 10)
        if f <= 0.75:
            assert not _combos(adata, train) & _combos(adata, test)
    assert set(splits[0.25][0]) <= set(splits[0.5][0]) <= set(splits[1.0][0])
    np.testing.assert_array_equal(splits[0.25][2], splits[0.75][2])
    other_seed = metrics.combination_split(adata, 0.5, seed=2)
    assert _combos(adata, other_seed[2]) != _combos(adata, splits[0.5][2]) or not np.array_equal(
        other_seed[0], splits[0.5][0]
    )


def test_data_efficiency_split():
    adata = _combination_screen()
    full_train, val, test = metrics.combination_split(adata, 1.0, mode="data_efficiency", seed=0)
    half_train, half_val, half_test = metrics.combination_split(adata, 0.5, mode="data_efficiency", seed=0)

    def n_combo(cells):
        return int(adata.obs["perturbation"].iloc[cells].str.contains("+", regex=False).sum())

    assert n_combo(test) == 40 and n_combo(val) == 32 and n_combo(full_train) == 128  # 20 % / 16 % / 64 % of 200
    assert n_combo(half_train) == 64 and set(half_train) <= set(full_train)
    np.testing.assert_array_equal(val, half_val)
    np.testing.assert_array_equal(test, half_test)


def test_split_errors():
    adata = _combination_screen()
    with pytest.raises(ValueError, match="fraction"):
        metrics.combination_split(adata, 1.5)
    singles_only = adata[~adata.obs["perturbation"].str.contains("+", regex=False)].copy()
    with pytest.raises(ValueError, match="combination"):
        metrics.combination_split(singles_only, 0.5)


def test_mask_recovery_is_permutation_invariant_and_hand_computed():
    true = pd.DataFrame([[1, 0, 0], [1, 1, 0], [0, 0, 1]], index=["A", "B", "C"])
    permuted = true.iloc[[2, 0, 1], [2, 0, 1]].set_axis([0, 1, 2], axis=1)  # rows reordered, columns permuted
    perfect = metrics.mask_recovery(permuted.astype(float), true)
    assert perfect["f1"] == 1.0 and perfect["precision"] == 1.0 and perfect["recall"] == 1.0
    # one extra active entry, one missed, and an extra learned dimension
    learned = np.array([[0.9, 0.1, 0.0, 0.8], [0.9, 0.2, 0.1, 0.0], [0.0, 0.0, 0.7, 0.0]])
    result = metrics.mask_recovery(learned, true.to_numpy())
    # matched: learned 0 <-> true 0 (2 shared), learned 2 <-> true 2 (1 shared); true 1 (B) is missed
    assert result["precision"] == pytest.approx(3 / 4) and result["recall"] == pytest.approx(3 / 4)
    assert result["f1"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="missing"):
        metrics.mask_recovery(permuted.drop(index="A"), true)


def _noisy_screen(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, 30)
    labels, rows = [], []
    for label, shift in {"control": 0, "A": 3, "B": -3, "A+B": 0}.items():
        mean = base.copy()
        if label != "control":
            mean[:5] *= 2.0 ** (shift / 3) if "+" not in label else 1.0
        rows.append(rng.poisson(mean * 20, (60, 30)))
        labels += [label] * 60
    obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(sparse.csr_matrix(np.vstack(rows).astype(np.float32)), obs=obs)


def test_split_half_ceiling():
    exact = metrics.split_half_ceiling(_additive_screen(n_per_group=4), top_k=2)
    assert exact["pearson"] == pytest.approx(1.0)  # identical cells: the halves agree exactly
    noisy = metrics.split_half_ceiling(_noisy_screen(), top_k=5)
    assert 0.0 < noisy["pearson"] < 1.0 and noisy["pearson_top5"] > noisy["pearson"]
    halves = metrics.random_halves(np.arange(11), seed=3)
    assert len(halves[0]) == 5 and len(np.intersect1d(*halves)) == 0 and len(np.union1d(*halves)) == 11
    with pytest.raises(ValueError, match="at least 2 cells"):
        metrics.split_half_ceiling(_additive_screen(n_per_group=1))


def test_full_sample_ceiling_is_the_noise_free_correlation():
    # truth + noise: two halves carry twice the full sample's noise variance; the formula, fed the halves'
    # correlation, must give the correlation of the truth itself with the full sample
    rng = np.random.default_rng(0)
    truth = rng.normal(size=200_000)
    noise_sd = 1.3
    half_a, half_b = (truth + rng.normal(scale=noise_sd * np.sqrt(2), size=truth.size) for _ in range(2))
    full = (half_a + half_b) / 2
    halves_r = np.corrcoef(half_a, half_b)[0, 1]
    assert metrics.full_sample_ceiling(halves_r) == pytest.approx(np.corrcoef(truth, full)[0, 1], abs=0.005)
    assert metrics.full_sample_ceiling(1.0) == 1.0 and metrics.full_sample_ceiling(-0.2) == 0.0
    with pytest.raises(ValueError, match="at most 1"):
        metrics.full_sample_ceiling(1.5)


def test_disjoint_controls_in_evaluate():
    adata = _noisy_screen()
    cells = np.arange(adata.n_obs)
    split = [
        cells[adata.obs["perturbation"] != "A+B"],
        np.array([], dtype=int),
        cells[adata.obs["perturbation"] == "A+B"],
    ]
    shared = metrics.evaluate("additive", adata, split, subsets=["test"], progress_bar=False)
    disjoint = metrics.evaluate("additive", adata, split, subsets=["test"], disjoint_controls=True, progress_bar=False)
    assert np.isfinite(disjoint.loc["test", "pearson"])
    assert disjoint.loc["test", "pearson"] != shared.loc["test", "pearson"]


def test_per_perturbation_metrics_hand_computed():
    observed = pd.DataFrame([[3.0, -1.0, 0.5], [0.0, 2.0, -4.0]], index=["A", "B"], columns=["g0", "g1", "g2"])
    predicted = observed.copy()
    predicted.loc["B"] *= -1  # B exactly wrong, A exactly right
    table = metrics.ate_metrics_per_perturbation(predicted, observed, top_k=2)
    assert list(table.index) == ["A", "B"]
    assert table.loc["A", "pearson"] == pytest.approx(1.0) and table.loc["B", "pearson"] == pytest.approx(-1.0)
    assert table.loc["A", "r2"] == pytest.approx(1.0) and table.loc["B", "direction_agreement_top2"] == 0.0
    assert table.loc["B", "observed_norm"] == pytest.approx(np.sqrt(20.0))
    assert table.loc["A", "slope"] == pytest.approx(1.0) and table.loc["B", "slope_top2"] == pytest.approx(-1.0)
    # pooling the per-perturbation values reproduces the per-perturbation mean of ate_metrics
    pooled = metrics.ate_metrics(predicted, observed, top_k=2)
    assert pooled["pearson_per_perturbation"] == pytest.approx(table["pearson"].mean())


def test_evaluate_per_perturbation_rows():
    adata = _additive_screen(n_per_group=4)
    cells = np.arange(adata.n_obs)
    labels = adata.obs["perturbation"].to_numpy()
    split = [cells[labels != "A+B"], np.array([], dtype=int), cells[labels == "A+B"]]
    table = metrics.evaluate(
        "additive", adata, split, subsets=["train", "test"], top_k=2, per_perturbation=True, progress_bar=False
    )
    assert list(table.index) == [("train", "A"), ("train", "B"), ("test", "A+B")]
    assert table.loc[("test", "A+B"), "n_cells"] == 4
    assert table.loc[("test", "A+B"), "pearson"] == pytest.approx(1.0)  # the screen is exactly additive


def test_baseline_on_a_mudata_needs_to_know_its_rna_modality(tapseq):
    import mudata as md

    adata = tapseq[:300].copy()
    other = ad.AnnData(np.ones((adata.n_obs, 3), np.float32))
    other.obs_names = adata.obs_names
    mdata = md.MuData({"gex": adata, "adt": other})
    mdata.obs["perturbation"] = adata.obs["perturbation"].astype(str).to_numpy()
    split = [np.arange(200), np.arange(200, 250), np.arange(250, 300)]
    with pytest.raises(ValueError, match=r"Which modality .* \['gex', 'adt'\]"):
        metrics.evaluate("additive", mdata, split, progress_bar=False)
