"""Model folders never run code, saves and CLI verbs touch only their own files, calls leave the process as it was."""

import os
import pathlib
import pickle
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from lightning.pytorch import Callback

import sams_scvi
from sams_scvi.cli import main
from sams_scvi.model import UnsafeModelFileError
from sams_scvi.model._cpu_memory import _flushing_denormals
from sams_scvi.model._persistence import read_model_file

from .conftest import TRAIN_KW


class _Payload:
    """Unpickling this creates ``marker``: what a hostile file would do with any code it liked."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _simulated(seed: int = 0):
    return sams_scvi.data.simulate_sams(
        n_perturbations=3, n_genes=20, n_cells_per_perturbation=40, n_control_cells=60, seed=seed
    )


@pytest.fixture(scope="module")
def trained():
    scvi.settings.seed = 0
    adata = _simulated()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=2, **TRAIN_KW)
    return model


@pytest.fixture
def hostile_folder(trained, tmp_path):
    """A model folder whose model.pt carries a payload; returns (folder, marker the payload would create)."""
    folder = tmp_path / "shared_model"
    trained.save(folder, save_anndata=True)
    marker = tmp_path / "payload_ran"
    content = torch.load(folder / "model.pt", weights_only=False)  # our own file, written just above
    content["attr_dict"]["note_"] = _Payload(marker)
    torch.save(content, folder / "model.pt")
    return folder, marker


# ---------------------------------------------------------------- loading runs no code


def test_every_loading_entry_point_refuses_a_hostile_model_file(hostile_folder, trained):
    folder, marker = hostile_folder
    calls = {
        "load": lambda: sams_scvi.SAMSVAE.load(folder),
        "load with adata": lambda: sams_scvi.SAMSVAE.load(folder, adata=trained.adata.copy()),
        "load_registry": lambda: sams_scvi.SAMSVAE.load_registry(folder),
        "view_setup_args": lambda: sams_scvi.SAMSVAE.view_setup_args(folder),
    }
    for name, call in calls.items():
        with pytest.raises(UnsafeModelFileError, match="never holds"):
            call()
        assert not marker.exists(), name
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_other_scvi_tools_loads_keep_scvi_tools_reader(hostile_folder, trained, tmp_path):
    """Only sams_scvi's own loads (in their thread) use the weights-only reader; other calls reach scvi-tools'."""
    from scvi.model.base import _base_model

    with pytest.raises(UnsafeModelFileError):
        sams_scvi.SAMSVAE.load(hostile_folder[0])
    legacy = _legacy_folder(trained, tmp_path / "legacy")
    attr_dict, var_names, _, _ = _base_model._load_saved_files(str(legacy), False)
    assert list(var_names) == list(trained.adata.var_names)


@pytest.mark.parametrize("verb", ["predict", "evaluate", "screen"])
def test_cli_refuses_a_hostile_model_folder(hostile_folder, tmp_path, capsys, verb):
    folder, marker = hostile_folder
    output = tmp_path / "out.csv"
    argv = {
        "predict": ["predict", str(folder), "--ate", str(output)],
        "evaluate": ["evaluate", str(folder), "--output", str(output)],
        "screen": ["screen", str(folder), "--output", str(output)],
    }[verb]
    assert main([*argv, "--quiet"]) == 1
    assert "never holds" in capsys.readouterr().err
    assert not marker.exists()
    assert not output.exists()


def _legacy_folder(model, folder: pathlib.Path) -> pathlib.Path:
    """A folder as sams-scvi 0.2 saved it: numpy arrays, a defaultdict and DataFrames pickled in model.pt."""
    from sams_scvi.model._model_file import decode

    model.save(folder, save_anndata=True)
    content = decode(torch.load(folder / "model.pt", weights_only=True))
    torch.save(content, folder / "model.pt")
    return folder


def test_a_saved_model_holds_only_tensors_and_plain_data(trained, tmp_path):
    trained.save(tmp_path / "m")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "m" / "model.pt") == []
    loaded = sams_scvi.SAMSVAE.load(tmp_path / "m", adata=trained.adata.copy())
    for name, frame in trained.history.items():
        pd.testing.assert_frame_equal(loaded.history[name], frame, check_dtype=False, check_index_type=False)
    np.testing.assert_array_equal(loaded.train_indices, trained.train_indices)
    registry = loaded.registry_["field_registries"]
    assert registry["X"]["state_registry"]["column_names"].tolist() == trained.adata.var_names.tolist()


def test_a_folder_of_an_earlier_version_is_converted_only_when_its_source_is_trusted(trained, tmp_path):
    legacy = _legacy_folder(trained, tmp_path / "legacy")
    with pytest.raises(UnsafeModelFileError, match="convert_legacy_save"):
        sams_scvi.SAMSVAE.load(legacy)
    with pytest.raises(ValueError, match="trust_source=True"):
        sams_scvi.SAMSVAE.convert_legacy_save(legacy, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    sams_scvi.SAMSVAE.convert_legacy_save(legacy, tmp_path / "new", trust_source=True)
    loaded = sams_scvi.SAMSVAE.load(tmp_path / "new")
    pd.testing.assert_frame_equal(loaded.history["elbo_train"], trained.history["elbo_train"], check_dtype=False)
    np.testing.assert_allclose(loaded.get_latent(), trained.get_latent(), atol=1e-5)


def test_old_tar_format_files_are_refused_without_being_unpacked(tmp_path):
    folder = tmp_path / "tar"
    folder.mkdir()
    import tarfile

    with tarfile.open(folder / "model.pt", "w") as archive:
        victim = tmp_path / "victim.txt"
        victim.write_text("secret")
        victim.chmod(0o600)
        member = tarfile.TarInfo("storages")
        member.type, member.linkname, member.mode = tarfile.LNKTYPE, str(victim), 0o777
        archive.addfile(member)
    with pytest.raises(ValueError, match="not a zip archive"):
        sams_scvi.SAMSVAE.load_registry(folder)
    assert victim.stat().st_mode & 0o777 == 0o600


def test_damaged_and_empty_model_files_are_named(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="damaged"):
        read_model_file(tmp_path / "empty.pt")
    with open(tmp_path / "plain.pt", "wb") as handle:
        pickle.dump({"a": 1}, handle)
    with pytest.raises(ValueError, match="damaged|not a saved model"):
        read_model_file(tmp_path / "plain.pt")


# ---------------------------------------------------------------- saving touches only its own files


def test_overwriting_a_save_keeps_the_users_files_and_other_prefixes(trained, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    mine = {"my_adata.h5ad": b"user data", "old_model.pt": b"user model", "raw_adata.h5ad": b"raw", "notes": b"n"}
    for name, content in mine.items():
        (folder / name).write_bytes(content)
    trained.save(folder, overwrite=True, save_anndata=True)
    trained.save(folder, prefix="second_", overwrite=True)
    trained.save(folder, overwrite=True, save_anndata=True)  # replaces the first save, and only it
    for name, content in mine.items():
        assert (folder / name).read_bytes() == content, name
    assert {"model.pt", "adata.h5ad", "second_model.pt"} <= {p.name for p in folder.iterdir()}
    assert sams_scvi.SAMSVAE.load(folder, prefix="second_", adata=trained.adata.copy()).is_trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no staging folder left


def test_a_save_without_data_removes_its_own_stale_data_file(trained, tmp_path):
    folder = tmp_path / "m"
    trained.save(folder, save_anndata=True)
    trained.save(folder, overwrite=True)  # save_anndata=False: the old adata.h5ad no longer matches the model
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt"]
    with pytest.raises(ValueError, match="no saved AnnData"):
        sams_scvi.SAMSVAE.load(folder)


@pytest.mark.parametrize("prefix", ["../", "sub/run_", "..", 3])
def test_prefixes_that_leave_the_folder_are_refused(trained, tmp_path, prefix):
    with pytest.raises((ValueError, TypeError), match="prefix"):
        trained.save(tmp_path / "m", prefix=prefix)
    assert list(tmp_path.iterdir()) == []


def test_saving_to_an_empty_path_is_refused(trained):
    with pytest.raises(ValueError, match="dir_path"):
        trained.save("", overwrite=True)


def test_cli_train_never_overwrites_its_input_or_other_files(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    adata = _simulated()
    adata.write_h5ad(data / "adata.h5ad")
    before = (data / "adata.h5ad").read_bytes()
    assert main(["train", str(data / "adata.h5ad"), "--output", str(data), "--max-epochs", "1", "--quiet"]) == 1
    assert "would overwrite the input" in capsys.readouterr().err
    assert (data / "adata.h5ad").read_bytes() == before
    assert sorted(p.name for p in data.iterdir()) == ["adata.h5ad"]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(data / "adata.h5ad"), "--output", "", "--quiet"])
    assert exit_info.value.code == 2
    assert "is empty" in capsys.readouterr().err

    results = tmp_path / "results"
    results.mkdir()
    (results / "raw_adata.h5ad").write_bytes(b"keep me")
    assert main(["train", str(data / "adata.h5ad"), "--output", str(results), "--max-epochs", "1", "--quiet"]) == 0
    assert (results / "raw_adata.h5ad").read_bytes() == b"keep me"
    capsys.readouterr()
    for argv in (
        ["predict", str(results), "--ate", str(results / "model.pt")],
        ["predict", str(results), "--output", str(results / "adata.h5ad")],
        ["screen", str(results), "--output", str(results / "model.pt")],
        ["evaluate", str(results), "--output", str(results / "adata.h5ad")],
        ["evaluate", str(results), "--adata", str(data / "adata.h5ad"), "--output", str(data / "adata.h5ad")],
    ):
        saved = {p.name: p.read_bytes() for p in results.iterdir()}
        assert main([*argv, "--quiet"]) == 1, argv
        assert "is an input of this command" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in results.iterdir()} == saved
    assert (data / "adata.h5ad").read_bytes() == before


@pytest.mark.slow
def test_cli_evaluate_finds_the_split_cells_by_name_in_reordered_data(tmp_path, capsys):
    adata = _simulated()
    adata.write_h5ad(tmp_path / "screen.h5ad")
    model_dir = tmp_path / "model"
    assert (
        main(["train", str(tmp_path / "screen.h5ad"), "--output", str(model_dir), "--max-epochs", "2", "--quiet"]) == 0
    )
    shuffled = adata[np.random.default_rng(1).permutation(adata.n_obs)].copy()
    shuffled.write_h5ad(tmp_path / "shuffled.h5ad")
    tables = []
    for path in (None, tmp_path / "shuffled.h5ad"):
        output = tmp_path / f"metrics_{len(tables)}.csv"
        argv = ["evaluate", str(model_dir), "--output", str(output), "--n-samples", "200", "--baselines", "--quiet"]
        assert main(argv + ([] if path is None else ["--adata", str(path)])) == 0
        tables.append(pd.read_csv(output, index_col=[0, 1]))
    # the same cells in each subset; minibatches of the shuffled cells differ, so the IWELBO's draws do (slightly)
    pd.testing.assert_frame_equal(tables[0], tables[1], rtol=1e-3)
    missing = shuffled[:-5].copy()
    missing.write_h5ad(tmp_path / "missing.h5ad")
    argv = ["evaluate", str(model_dir), "--adata", str(tmp_path / "missing.h5ad"), "--output", str(tmp_path / "x.csv")]
    assert main(argv) == 1
    assert "are not obs names" in capsys.readouterr().err


# ---------------------------------------------------------------- calls leave the process and the data as they were


def test_training_leaves_the_denormal_setting_as_it_was():
    adata = _simulated()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    assert not _flushing_denormals()
    model.train(max_epochs=1, **TRAIN_KW)
    assert not _flushing_denormals()
    assert 1e-310 * 1.0 != 0.0  # the user's own float arithmetic keeps its subnormals


def _snapshot(adata: ad.AnnData) -> dict:
    return {
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": sorted(adata.obsm.keys()),
        "uns": sorted(adata.uns.keys()),
        "X": adata.X.toarray(),
    }


def _assert_unchanged(adata: ad.AnnData, snapshot: dict) -> None:
    pd.testing.assert_frame_equal(adata.obs, snapshot["obs"])
    pd.testing.assert_frame_equal(adata.var, snapshot["var"])
    assert sorted(adata.obsm.keys()) == snapshot["obsm"]
    assert sorted(adata.uns.keys()) == snapshot["uns"]
    np.testing.assert_array_equal(adata.X.toarray(), snapshot["X"])


def test_reading_methods_leave_data_the_user_never_set_up_unchanged(trained):
    other = trained.adata.copy()
    for key in [k for k in other.obs.columns if str(k).startswith("_scvi")]:
        del other.obs[key]
    other.obsm.clear()
    other.uns.clear()
    snapshot = _snapshot(other)
    latent = trained.get_latent(adata=other)
    np.testing.assert_allclose(latent, trained.get_latent(), atol=1e-5)
    trained.get_normalized_expression(adata=other, n_samples=2)
    trained.differential_expression(adata=other, groupby="perturbation", group1="p0", group2="control")
    trained.get_elbo(adata=other)
    _assert_unchanged(other, snapshot)


def test_untrained_models_refuse_to_report_their_initial_values():
    adata = _simulated()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    readers = [
        model.get_mask_probabilities,
        model.get_mechanisms,
        model.get_active_dimensions,
        model.get_penetrance,
        model.get_gene_programs,
        model.get_mechanism_similarity,
        model.get_perturbation_embeddings,
        model.get_effective_shifts,
        lambda: model.get_reconstruction_error(),
        lambda: model.differential_expression(groupby="perturbation", group1="p0"),
    ]
    for reader in readers:
        with pytest.raises(RuntimeError, match="untrained model"):
            reader()


@pytest.mark.parametrize("selection", [[], np.zeros(0, dtype=int), "all-false mask"])
def test_empty_selections_are_refused_clearly(trained, selection):
    if isinstance(selection, str):
        selection = np.zeros(trained.adata.n_obs, dtype=bool)
    with pytest.raises(ValueError, match="selects no cells"):
        trained.get_latent(indices=selection)


def test_obs_names_repeated_are_refused_when_cells_are_named(trained):
    adata = trained.adata.copy()
    adata.obs_names = ["cell"] * adata.n_obs
    with pytest.raises(ValueError, match="obs_names_make_unique"):
        trained.get_latent(adata=adata, indices=["cell"])


# ---------------------------------------------------------------- resuming and interrupting


def _fresh_model(n_latent: int = 4):
    scvi.settings.seed = 0
    adata = _simulated()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    return sams_scvi.SAMSVAE(adata, n_latent=n_latent, n_hidden=16)


def test_resume_names_the_settings_that_differ(tmp_path):
    _fresh_model().train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN_KW)
    with pytest.raises(ValueError, match=r"plan_kwargs.lr: 0.001 in the checkpoint, 0.01 now\)"):
        _fresh_model().train(max_epochs=3, lr=1e-2, checkpoint_dir=tmp_path, resume=True, **TRAIN_KW)
    with pytest.raises(ValueError, match="n_latent"):
        _fresh_model(n_latent=5).train(max_epochs=3, checkpoint_dir=tmp_path, resume=True, **TRAIN_KW)
    other_seed = _fresh_model()
    scvi.settings.seed = 1  # would draw another train/validation split
    with pytest.raises(ValueError, match="seed"):
        other_seed.train(max_epochs=3, checkpoint_dir=tmp_path, resume=True, **TRAIN_KW)
    shuffled = _fresh_model()
    shuffled.adata.obs_names = shuffled.adata.obs_names[::-1]
    with pytest.raises(ValueError, match="cells"):
        shuffled.train(max_epochs=3, checkpoint_dir=tmp_path, resume=True, **TRAIN_KW)
    # more epochs with the same settings is what resuming is for
    _fresh_model().train(max_epochs=3, checkpoint_dir=tmp_path, resume=True, **TRAIN_KW)


def test_resume_from_an_empty_checkpoint_says_how_to_start_over(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="damaged.*train from the beginning"):
        _fresh_model().train(max_epochs=2, checkpoint_dir=tmp_path, resume=True, **TRAIN_KW)


class _CtrlC(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


def test_ctrl_c_stops_training_with_a_message_that_says_how_to_resume(tmp_path):
    model = _fresh_model()
    with pytest.raises(KeyboardInterrupt, match="resume=True"):
        model.train(max_epochs=3, checkpoint_dir=tmp_path, callbacks=[_CtrlC()], **TRAIN_KW)
    assert model.is_trained
    assert not _flushing_denormals()
    model.get_latent()  # the parameters of the last step are usable
    without = _fresh_model()
    with pytest.raises(KeyboardInterrupt, match="checkpoint_dir"):
        without.train(max_epochs=3, callbacks=[_CtrlC()], **TRAIN_KW)


def test_copied_folders_keep_loading(trained, tmp_path):
    """A model folder copied elsewhere (as shared between labs) loads like the original."""
    trained.save(tmp_path / "a", save_anndata=True)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert sams_scvi.SAMSVAE.load(tmp_path / "b").is_trained


def test_loading_with_a_copy_of_set_up_data_leaves_the_original_usable(trained, tmp_path):
    trained.save(tmp_path / "m")
    adata = trained.adata
    subset = adata[: adata.n_obs // 2].copy()  # carries the original's scvi-tools id
    sams_scvi.SAMSVAE.load(tmp_path / "m", adata=subset)
    assert subset.uns["_scvi_uuid"] != adata.uns["_scvi_uuid"]
    sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)  # no "Did you make a copy?"


def test_seeded_helpers_restore_the_callers_seed_and_random_state():
    from sams_scvi._utils import _scvi_seed

    scvi.settings.seed = 5
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    environment = dict(os.environ)
    with _scvi_seed(1):
        assert scvi.settings.seed == 1
        torch.rand(3), np.random.rand(3)
    assert scvi.settings.seed == 5
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert dict(os.environ) == environment


@pytest.mark.parametrize("seed", ["abc", 1.5, -1])
def test_seeds_of_the_wrong_type_are_named(trained, seed):
    with pytest.raises((TypeError, ValueError), match="`seed` must be"):
        trained.estimate_ate(n_samples=20, seed=seed, progress_bar=False)
    with pytest.raises((TypeError, ValueError), match="`seed` must be"):
        trained.get_elbo(seed=seed)


@pytest.mark.parametrize(
    "change",
    [
        lambda attrs: attrs.__setitem__("to_device", "x"),  # would replace a method of the loaded model
        lambda attrs: attrs["registry_"].__setitem__("setup_method_name", "save"),  # would pick the method to run
    ],
)
def test_model_files_may_only_set_saved_attributes(trained, tmp_path, change):
    folder = tmp_path / "m"
    trained.save(folder)
    content = torch.load(folder / "model.pt", weights_only=False)
    change(content["attr_dict"])
    torch.save(content, folder / "model.pt")
    with pytest.raises(UnsafeModelFileError, match="never writes|setup method"):
        sams_scvi.SAMSVAE.load(folder, adata=trained.adata.copy())


def _process_state() -> dict:
    import logging
    import random
    import warnings

    return {
        "scvi seed": scvi.settings.seed,
        "threads": torch.get_num_threads(),
        "denormals flushed": _flushing_denormals(),
        "log levels": {name: logging.getLogger(name).level for name in ("scvi", "lightning.pytorch", "sams_scvi")},
        "warning filters": len(warnings.filters),
        "environment": dict(os.environ),
        "python random": random.getstate(),
    }


def test_training_and_reading_leave_the_process_as_they_found_it(trained):
    model = _fresh_model()
    before = _process_state()
    model.train(max_epochs=1, **TRAIN_KW)
    assert _process_state() == before
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    model.estimate_ate(n_samples=20, progress_bar=False)
    model.get_mechanisms(n_samples=20)
    model.get_elbo()
    assert _process_state() == before
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


@pytest.mark.parametrize("taken", ["adata.h5ad as a folder", "model.pt as a folder", "a user's adata.h5ad"])
@pytest.mark.parametrize("save_anndata", [True, False])
def test_saving_refuses_names_it_did_not_write(trained, tmp_path, taken, save_anndata):
    folder = tmp_path / "m"
    folder.mkdir()
    if taken == "a user's adata.h5ad":
        (folder / "adata.h5ad").write_bytes(b"the user's own")
    else:
        (folder / taken.split()[0]).mkdir()
        (folder / taken.split()[0] / "inside").write_bytes(b"keep")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    with pytest.raises(ValueError, match="(?i)move it"):
        trained.save(folder, overwrite=True, save_anndata=save_anndata)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_failed_replacement_puts_the_previous_model_back(trained, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    trained.save(folder, save_anndata=True)
    previous = (folder / "model.pt").read_bytes()
    real_replace = os.replace

    def fail_on_data(source, target):
        if str(target).endswith("adata.h5ad"):
            raise OSError("disk full")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", fail_on_data)
    with pytest.raises(OSError, match="disk full"):
        trained.save(folder, overwrite=True, save_anndata=True)
    monkeypatch.undo()
    assert (folder / "model.pt").read_bytes() == previous


def test_a_new_model_folder_gets_the_permissions_of_the_users_umask(trained, tmp_path):
    mask = os.umask(0o022)
    try:
        trained.save(tmp_path / "m")
    finally:
        os.umask(mask)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755


def test_repeated_reads_of_unset_data_do_not_pile_up_registrations(trained):
    other = trained.adata.copy()
    other.uns.clear()
    store = trained._per_instance_manager_store[trained.id]
    trained.get_latent(adata=other)
    size = len(store)
    for _ in range(3):
        trained.get_latent(adata=other)
    assert len(store) == size


def test_masks_as_series_are_aligned_by_cell_name_and_small_int_positions_work(trained):
    adata = trained.adata
    mask = adata.obs["perturbation"].astype(str) == "p0"
    shuffled = mask.sample(frac=1.0, random_state=0)
    np.testing.assert_array_equal(trained.get_latent(indices=shuffled), trained.get_latent(indices=mask.to_numpy()))
    positions = np.array([0, 5, -1], dtype=np.int8)
    np.testing.assert_array_equal(
        trained.get_latent(indices=positions), trained.get_latent(indices=[0, 5, adata.n_obs - 1])
    )


def test_evaluate_finds_the_models_split_by_name_in_other_data(trained):
    adata = trained.adata
    shuffled = adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()
    kwargs = {"subsets": ["train"], "n_ate_samples": 50, "n_iwelbo_samples": 2, "progress_bar": False}
    mine = sams_scvi.metrics.evaluate(trained, adata, **kwargs)
    theirs = sams_scvi.metrics.evaluate(trained, shuffled, **kwargs)
    assert mine.loc["train", "n_cells"] == theirs.loc["train", "n_cells"]
    np.testing.assert_allclose(mine.loc["train", "pearson"], theirs.loc["train", "pearson"], rtol=1e-6)
    with pytest.raises(ValueError, match="not obs names"):
        sams_scvi.metrics.evaluate(trained, shuffled[5:].copy(), **kwargs)


def test_external_indexing_takes_masks_and_obs_names():
    model = _fresh_model()
    n_obs = model.adata.n_obs
    train = np.zeros(n_obs, dtype=bool)
    train[: n_obs // 2] = True
    model.train(max_epochs=1, datasplitter_kwargs={"external_indexing": [train, [], []]}, **TRAIN_KW)
    np.testing.assert_array_equal(np.sort(model.train_indices), np.flatnonzero(train))
    named = _fresh_model()
    names = named.adata.obs_names[10:20]
    named.train(max_epochs=1, datasplitter_kwargs={"external_indexing": [names, [], []]}, **TRAIN_KW)
    np.testing.assert_array_equal(np.sort(named.train_indices), np.arange(10, 20))


def test_differential_expression_leaves_the_registered_data_as_it_was(trained):
    columns = list(trained.adata.obs.columns)
    trained.differential_expression(groupby="perturbation", group1="p0", group2="control")
    assert list(trained.adata.obs.columns) == columns


def test_median_library_size_on_backed_data(tmp_path):
    _simulated().write_h5ad(tmp_path / "screen.h5ad")
    adata = ad.read_h5ad(tmp_path / "screen.h5ad", backed="r")
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, **TRAIN_KW)
    ate = model.estimate_ate(["p0"], n_samples=20, library_size="median", progress_bar=False)
    expected = float(np.median(np.asarray(_simulated().X.sum(1)).ravel()))
    assert ate.uns["library_size"] == pytest.approx(expected)


def test_evaluate_reads_the_data_as_the_model_was_set_up():
    adata = _simulated()
    adata.obs["guide"] = adata.obs["perturbation"].astype(str).replace({"control": "NTC"})
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X * 0  # what the observed ATEs must not be computed from
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="guide", control_value="NTC", layer="counts")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, **TRAIN_KW)
    kwargs = {"subsets": ["train"], "n_ate_samples": 20, "n_iwelbo_samples": 2, "progress_bar": False}
    table = sams_scvi.metrics.evaluate(model, adata, **kwargs)
    explicit = sams_scvi.metrics.evaluate(
        model, adata, perturbation_key="guide", control_value="NTC", layer="counts", **kwargs
    )
    pd.testing.assert_frame_equal(table, explicit)
    assert np.isfinite(table.loc["train", "pearson"])


def test_repeated_labels_give_one_row(trained):
    assert trained.estimate_ate(["p0", "p0"], n_samples=20, progress_bar=False).n_obs == 1


@pytest.mark.parametrize("batch_size", ["8", 2.5, 0])
def test_batch_sizes_are_checked_by_the_readers(trained, batch_size):
    with pytest.raises((TypeError, ValueError), match="`batch_size` must be"):
        trained.get_latent(batch_size=batch_size)
    with pytest.raises((TypeError, ValueError), match="`batch_size` must be"):
        trained.estimate_ate(["p0"], n_samples=20, batch_size=batch_size, progress_bar=False)


def test_missing_batch_values_are_named_at_setup():
    adata = _simulated()
    adata.obs["batch"] = ["b1"] * (adata.n_obs - 1) + [np.nan]
    with pytest.raises(ValueError, match="1 cells have no value"):
        sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", batch_key="batch")


def test_cli_train_restores_the_callers_seed(tmp_path):
    _simulated().write_h5ad(tmp_path / "screen.h5ad")
    scvi.settings.seed = 3
    state = torch.get_rng_state()
    argv = ["train", str(tmp_path / "screen.h5ad"), "--output", str(tmp_path / "m"), "--max-epochs", "1", "--seed", "7"]
    assert main([*argv, "--quiet"]) == 0
    assert scvi.settings.seed == 3
    assert torch.equal(torch.get_rng_state(), state)
