"""Checkpoints, resuming, atomic saves, clear load errors and determinism."""

import os

import anndata as ad
import numpy as np
import pytest
import scvi
import torch
from lightning.pytorch import Callback

import sams_scvi

from ..conftest import TRAIN_KW


class _Crash(Callback):
    """Raise at the start of one epoch, as a killed job would stop."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def _model(seed: int = 0, **kwargs):
    scvi.settings.seed = seed
    adata = sams_scvi.data.simulate_sams(
        n_perturbations=3, n_genes=20, n_cells_per_perturbation=40, n_control_cells=60, seed=0
    )
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    return sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16, **kwargs)


# 6 epochs: the default recipe rotates the latent axes and sets the masks at epoch 3, so a crash at epoch 4
# resumes after the alignment and one at epoch 2 before it.
RUN = {"max_epochs": 6, "batch_size": 64, "check_val_every_n_epoch": 2, **TRAIN_KW}


def _state(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model = _model()
    model.train(checkpoint_dir=tmp_path_factory.mktemp("ckpt") / "run", **RUN)
    return _state(model), model.history["elbo_train"]


@pytest.mark.parametrize("crash_epoch", [2, 4])
def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(uninterrupted, tmp_path, crash_epoch):
    reference, reference_elbo = uninterrupted
    with pytest.raises(RuntimeError, match="simulated crash"):
        _model().train(checkpoint_dir=tmp_path, callbacks=[_Crash(crash_epoch)], **RUN)
    assert (tmp_path / "last.ckpt").exists()
    torch.manual_seed(123)  # the new process's random state differs; the checkpoint restores the run's
    np.random.seed(123)
    resumed = _model()
    resumed.train(checkpoint_dir=tmp_path, resume=True, **RUN)
    state = _state(resumed)
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    elbo = resumed.history["elbo_train"]
    assert list(elbo.index) == list(range(crash_epoch, RUN["max_epochs"]))  # the resumed epochs only
    np.testing.assert_array_equal(elbo.to_numpy(), reference_elbo.loc[elbo.index].to_numpy())


def test_resume_without_a_checkpoint_starts_from_the_beginning(uninterrupted, tmp_path):
    model = _model()
    model.train(checkpoint_dir=tmp_path / "new", resume=True, **RUN)
    for key, value in uninterrupted[0].items():
        assert torch.equal(model.module.state_dict()[key], value), key


def test_resume_needs_the_checkpoint_dir():
    with pytest.raises(ValueError, match="checkpoint_dir"):
        _model().train(resume=True, **RUN)


def test_checkpoints_follow_the_interval(tmp_path):
    saved = []

    class _Watch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            path = tmp_path / "last.ckpt"
            saved.append(torch.load(path, weights_only=False)["epoch"] if path.exists() else None)

    _model().train(checkpoint_dir=tmp_path, checkpoint_every_n_epochs=2, callbacks=[_Watch()], **RUN)
    # epochs 2, 4, 6 (index 1, 3, 5) write one; _Watch runs before the checkpoint callback, so it sees the last one
    assert saved == [None, None, 1, 1, 3, 3]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 5  # safe to load without pickle code
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial files left


@pytest.fixture(scope="module")
def trained():
    model = _model()
    model.train(max_epochs=2, **TRAIN_KW)
    return model


def test_a_crash_while_saving_leaves_the_previous_save(trained, tmp_path, monkeypatch):
    target = tmp_path / "model"
    trained.save(target, save_anndata=True)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(self, *args, **kwargs):
        with open(args[0], "wb") as handle:  # half a file, then the crash
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write", crash)
    with pytest.raises(OSError, match="disk full"):
        trained.save(target, save_anndata=True, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left
    with pytest.raises(OSError, match="disk full"):
        trained.save(tmp_path / "new", save_anndata=True)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert sams_scvi.SAMSVAE.load(target).is_trained


def test_overwriting_keeps_the_users_other_files(trained, tmp_path):
    target = tmp_path / "model"
    trained.save(target)
    (target / "notes.txt").write_text("mine")
    trained.save(target, overwrite=True, save_anndata=True)
    assert sorted(p.name for p in target.iterdir()) == ["adata.h5ad", "model.pt", "notes.txt"]
    with pytest.raises(ValueError, match="overwrite=True"):
        trained.save(target)


def test_load_explains_a_missing_or_damaged_folder(trained, tmp_path):
    adata = trained.adata
    with pytest.raises(FileNotFoundError, match="No model folder"):
        sams_scvi.SAMSVAE.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model.pt"):
        sams_scvi.SAMSVAE.load(tmp_path / "empty", adata=adata)
    trained.save(tmp_path / "prefixed", prefix="run1_")
    with pytest.raises(FileNotFoundError, match="Pass the prefix"):
        sams_scvi.SAMSVAE.load(tmp_path / "prefixed", adata=adata)
    assert sams_scvi.SAMSVAE.load(tmp_path / "prefixed", adata=adata, prefix="run1_").is_trained
    trained.save(tmp_path / "no_data")
    with pytest.raises(ValueError, match="no saved AnnData"):
        sams_scvi.SAMSVAE.load(tmp_path / "no_data")
    with pytest.raises(NotADirectoryError, match="is a file"):
        sams_scvi.SAMSVAE.load(tmp_path / "no_data" / "model.pt")
    trained.save(tmp_path / "damaged", save_anndata=True)
    (tmp_path / "damaged" / "adata.h5ad").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="adata.h5ad' is damaged"):
        sams_scvi.SAMSVAE.load(tmp_path / "damaged")
    model_file = tmp_path / "damaged" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[: os.path.getsize(model_file) // 2])
    with pytest.raises(ValueError, match="model.pt' is damaged"):
        sams_scvi.SAMSVAE.load(tmp_path / "damaged", adata=adata)


# ---------------------------------------------------------------- determinism


def test_same_seed_same_parameters_and_outputs():
    """On CPU, the same seed gives bit-identical training and outputs; every sampling method takes a seed."""
    runs = []
    for _ in range(2):
        model = _model()
        model.train(max_epochs=2, **TRAIN_KW)
        cells = np.arange(10)
        runs.append(
            {
                "parameters": _state(model),
                "latent": model.get_latent(),
                "ate": model.estimate_ate(n_samples=50, seed=3, progress_bar=False).X,
                "prediction": model.predict_perturbation(["p0"], n_samples=2, seed=3, progress_bar=False).X,
                "expression": model.get_normalized_expression(indices=cells, n_samples=3, seed=3),
                "elbo": model.get_elbo(indices=cells, seed=3),
                "marginal_ll": model.get_marginal_ll(indices=cells, n_mc_samples=5, seed=3),
                "reconstruction": model.get_reconstruction_error(indices=cells, seed=3)["reconstruction_loss"],
                "mechanisms": model.get_mechanisms(n_samples=20, seed=3).X,
            }
        )
    first, second = runs
    for key, value in first["parameters"].items():
        assert torch.equal(value, second["parameters"][key]), key
    for name in first:
        if name != "parameters":
            np.testing.assert_array_equal(np.asarray(first[name]), np.asarray(second[name]), err_msg=name)
    # and the seed matters: another seed gives other Monte-Carlo draws
    model = _model()
    model.train(max_epochs=2, **TRAIN_KW)
    other = model.estimate_ate(n_samples=50, seed=4, progress_bar=False).X
    assert not np.array_equal(other, first["ate"])


def test_seeded_methods_leave_the_global_random_state_alone(trained):
    state = torch.get_rng_state()
    trained.estimate_ate(n_samples=20, seed=1, progress_bar=False)
    trained.get_reconstruction_error(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
