"""Our predictions in Arc Institute's cell-eval, unchanged (needs the ``interop`` extra; skips without it)."""

import numpy as np
import pytest

import sams_scvi

cell_eval = pytest.importorskip("cell_eval", reason="cell-eval is not installed: pip install 'sams-scvi[interop]'")


@pytest.fixture(scope="module")
def pair(small_screen_model):
    model, adata = small_screen_model
    test = np.sort(np.random.default_rng(0).choice(adata.n_obs, 400, replace=False))
    return sams_scvi.tl.prediction_pair(model, indices=test, n_source_cells=40, progress_bar=False)


def test_metrics_evaluator_reads_prediction_pair(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    predicted, observed = pair
    before = predicted.X.copy()
    info = predicted.uns["sams_scvi"]
    evaluator = cell_eval.MetricsEvaluator(
        adata_pred=predicted,
        adata_real=observed,
        control_pert=info["control_value"],
        pert_col=info["perturbation_key"],
        num_threads=1,
        outdir=str(tmp_path),
    )
    # cell-eval normalises in place whatever looks like counts; ours is already on its log1p scale
    assert np.array_equal(predicted.X, before)
    results, aggregate = evaluator.compute(profile="full", break_on_error=True)
    perturbations = set(observed.obs[info["perturbation_key"]].astype(str)) - {info["control_value"]}
    assert set(results["perturbation"].to_list()) == perturbations
    for metric in ("pearson_delta", "mse", "discrimination_score_l1"):
        values = results[metric].to_numpy()
        assert np.isfinite(values).all(), metric
    assert aggregate.height > 0
