"""Our predictions in pertpy's distances and perturbation spaces, unchanged (``interop`` extra; skips without it)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import sams_scvi

pt = pytest.importorskip("pertpy", reason="pertpy is not installed: pip install 'sams-scvi[interop]'")


@pytest.fixture(scope="module")
def joint(small_screen_model):
    model, adata = small_screen_model
    test = np.sort(np.random.default_rng(0).choice(adata.n_obs, 400, replace=False))
    predicted, observed = sams_scvi.tl.prediction_pair(model, indices=test, n_source_cells=40, progress_bar=False)
    both = ad.concat({"observed": observed, "predicted": predicted}, label="source", index_unique="-")
    sc.pp.pca(both, n_comps=10)
    return both, predicted.uns["sams_scvi"]


def test_distances_to_control(joint):
    both, info = joint
    key, control = info["perturbation_key"], info["control_value"]
    distance = pt.tl.Distance("edistance", obsm_key="X_pca")
    per_source = {
        source: distance.onesided_distances(
            both[both.obs["source"] == source].copy(), groupby=key, selected_group=control, show_progressbar=False
        )
        for source in ("observed", "predicted")
    }
    labels = set(both.obs[key].astype(str))
    for distances in per_source.values():
        assert set(distances.index) == labels and np.isfinite(distances.to_numpy()).all()
    test = pt.tl.DistanceTest("edistance", n_perms=50, obsm_key="X_pca")
    table = test(both[both.obs["source"] == "predicted"].copy(), groupby=key, contrast=control, show_progressbar=False)
    assert set(table.index) == labels and table["pvalue"].between(0, 1).all()


def test_pseudobulk_space_and_control_difference(joint):
    both, info = joint
    key, control = info["perturbation_key"], info["control_value"]
    space = pt.tl.PseudobulkSpace().compute(both, target_col=key, groups_col="source", mode="mean")
    labels = set(both.obs[key].astype(str))
    # every label has a predicted and an observed profile, so each effect can be compared across sources
    pairs = set(zip(space.obs["source"].astype(str), space.obs[key].astype(str), strict=True))
    assert pairs == {(source, label) for source in ("observed", "predicted") for label in labels}
    difference = pt.tl.PseudobulkSpace().compute_control_diff(
        space, target_col=key, group_col="source", reference_key=control, copy=True
    )
    frame = pd.DataFrame(np.asarray(difference.X), index=pd.MultiIndex.from_frame(difference.obs[["source", key]].astype(str)))
    assert np.isfinite(frame.to_numpy()).all()
    # the predicted effects of the perturbations point the way the observed ones do (strong simulated effects)
    perturbed = sorted(labels - {control})
    agreement = [np.corrcoef(frame.loc[("predicted", p)], frame.loc[("observed", p)])[0, 1] for p in perturbed]
    assert np.mean(agreement) > 0
