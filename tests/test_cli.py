import anndata as ad
import numpy as np
import pandas as pd

from sams_scvi.cli import main


def test_train_and_predict_on_h5ad(tapseq, tmp_path, capsys):
    path = tmp_path / "screen.h5ad"
    tapseq[:800].copy().write_h5ad(path)
    assert (
        main(["train", str(path), "--max-epochs", "1", "--n-latent", "4", "--output", str(tmp_path / "m"), "--quiet"])
        == 0
    )
    ate_path, pred_path = tmp_path / "ate.csv", tmp_path / "pred.h5ad"
    code = main(
        [
            "predict",
            str(tmp_path / "m"),
            "--perturbations",
            "CPQ",
            "CPQ+GATA1",
            "--ate",
            str(ate_path),
            "--n-samples",
            "20",
            "--output",
            str(pred_path),
            "--quiet",
        ]
    )
    assert code == 0
    ate = pd.read_csv(ate_path, index_col=0)
    assert list(ate.index) == ["CPQ", "CPQ+GATA1"] and ate.shape[1] == tapseq.n_vars
    pred = ad.read_h5ad(pred_path)
    assert set(pred.obs["perturbation"]) == {"CPQ", "CPQ+GATA1"}
    assert np.all(np.isfinite(pred.X))
    assert main(["predict", str(tmp_path / "m")]) == 2

    metrics_path = tmp_path / "metrics.csv"
    code = main(["evaluate", str(tmp_path / "m"), "--n-samples", "20", "--output", str(metrics_path), "--quiet"])
    assert code == 0
    table = pd.read_csv(metrics_path, index_col=[0, 1])
    assert set(table.index.get_level_values(0)) == {"SAMS-VAE", "control", "additive", "mean_perturbed"}
    assert set(table.index.get_level_values(1)) == {"train", "validation", "all"}
    assert np.isfinite(table.loc[("SAMS-VAE", "validation"), "iwelbo"])

    per_path = tmp_path / "per_perturbation.csv"
    args = ["evaluate", str(tmp_path / "m"), "--n-samples", "20", "--baselines", "additive", "--per-perturbation"]
    assert main([*args, "--output", str(per_path), "--quiet"]) == 0
    per = pd.read_csv(per_path, index_col=[0, 1, 2])
    assert set(per.index.get_level_values(0)) == {"SAMS-VAE", "additive"}
    assert "CPQ" in set(per.index.get_level_values(2)) and "pearson_top20" in per.columns
