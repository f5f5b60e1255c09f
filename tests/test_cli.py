import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sams_scvi
from sams_scvi.cli import main

from .conftest import set_mechanism


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


# ---------------------------------------------------------------------------------------------------- errors
VERBS = ["demo", "train", "predict", "evaluate", "screen"]


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture
def small_h5ad(tmp_path):
    """A small simulated screen written as h5ad (no training needed)."""
    adata = sams_scvi.data.simulate_sams(
        n_perturbations=3, n_genes=20, n_cells_per_perturbation=20, n_control_cells=30, seed=0
    )
    path = tmp_path / "small.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("verb", [None, *VERBS])
def test_help_of_every_verb_has_examples(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"] if verb is None else [verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Example" in out and "sams-scvi" in out
    if verb is not None:
        # every argument has a help string, so argparse never leaves one bare
        assert "--quiet" in out and "--verbose" in out


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["predict", "MODEL", "--n-samples", "0", "--ate", "x.csv"], "--n-samples"),
        (["train", "x.h5ad", "--output", "m", "--max-epochs", "-1"], "--max-epochs"),
        (["train", "x.h5ad", "--output", "m", "--n-latent", "two"], "--n-latent"),
        (["screen", "MODEL", "--top", "0"], "--top"),
        (["screen", "MODEL", "--credible-level", "1"], "--credible-level"),
        (["screen", "MODEL", "--rank-by", "no_such_column"], "--rank-by"),
        (["evaluate", "MODEL", "--baselines", "nearest"], "--baselines"),
    ],
)
def test_bad_numbers_and_choices_are_usage_errors(args, flag, tmp_path, capsys):
    args = [str(tmp_path / "m") if a == "MODEL" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    last = _error_lines(capsys)[-1]
    assert last.startswith(f"sams-scvi {args[0]}: error:") and flag in last
    assert not (tmp_path / "x.csv").exists()


def test_missing_h5ad_is_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.h5ad"
    assert main(["train", str(missing), "--output", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"sams-scvi train: error: h5ad file '{missing}' does not exist"]


def test_missing_model_folder(tmp_path, capsys):
    missing = tmp_path / "no_model"
    assert main(["predict", str(missing), "--ate", str(tmp_path / "ate.csv")]) == 1
    assert _error_lines(capsys) == [
        f"sams-scvi predict: error: model folder '{missing}' does not exist "
        "(expected a folder written by 'sams-scvi train')"
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    for verb in ("predict", "evaluate", "screen"):
        assert main([verb, str(empty), "--ate" if verb == "predict" else "--output", str(tmp_path / "x.csv")]) == 1
        lines = _error_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith(f"sams-scvi {verb}: error:")
        assert "is not a model folder written by 'sams-scvi train' (no model.pt)" in lines[0]


def test_damaged_model_folder(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"not a torch file")
    assert main(["screen", str(folder), "--output", str(tmp_path / "s.csv"), "--quiet"]) == 1
    lines = _error_lines(capsys)
    assert lines[-1].startswith(f"sams-scvi screen: error: could not load the model in '{folder}'")
    assert "Traceback" not in "\n".join(lines)


def test_output_folder_checked_before_work(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"")
    assert main(["predict", str(folder), "--ate", str(tmp_path / "no_dir" / "ate.csv")]) == 1
    assert _error_lines(capsys) == [
        f"sams-scvi predict: error: --ate '{tmp_path / 'no_dir' / 'ate.csv'}': "
        f"the folder '{tmp_path / 'no_dir'}' does not exist"
    ]


@pytest.mark.parametrize("position", ["before", "after"])
def test_verbose_shows_the_traceback(position, tmp_path, capsys):
    missing = tmp_path / "missing.h5ad"
    args = ["train", str(missing), "--output", str(tmp_path / "m")]
    assert main(["--verbose", *args] if position == "before" else [*args, "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.rstrip().splitlines()[-1] == f"sams-scvi train: error: h5ad file '{missing}' does not exist"


def test_library_error_is_one_line(small_h5ad, tmp_path, capsys):
    args = ["train", str(small_h5ad), "--perturbation-key", "no_such_column", "--output", str(tmp_path / "m")]
    assert main([*args, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sams-scvi train: error:")
    # the KeyError's message, without the quotes of its repr
    assert "'no_such_column' is not a column of adata.obs" in lines[0] and not lines[0].endswith('"')
    assert not (tmp_path / "m").exists()

    assert main([*args, "--quiet", "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_wrong_control_value_fails_before_training(small_h5ad, tmp_path, capsys):
    args = ["train", str(small_h5ad), "--control-value", "NTC", "--output", str(tmp_path / "m"), "--quiet"]
    assert main(args) == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "'NTC'" in lines[0] and "'control'" in lines[0]
    assert not (tmp_path / "m").exists()


def test_cli_screen(gaussian_screen, tmp_path, capsys):
    model = set_mechanism(gaussian_screen, scale=0.05)
    model.save(tmp_path / "model", save_anndata=True)
    output = tmp_path / "screen.csv"
    assert main(["screen", str(tmp_path / "model"), "--output", str(output), "--n-samples", "100", "--quiet"]) == 0
    table = pd.read_csv(output, index_col=0)
    assert len(table) == 13 and "non_additivity_norm" in table.columns
    assert "p0+p1" not in table.index
    assert "Wrote 13 pairs" in capsys.readouterr().out
