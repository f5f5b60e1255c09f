import numpy as np
import pytest
import scvi
import torch

import sams_scvi
from sams_scvi.model import _schedule

DEFAULT_BATCH_SIZES = _schedule.BATCH_SIZES


@pytest.fixture(scope="session", autouse=True)
def _paper_minibatch():
    """Train at batch 512 by default: the tests' small screens would otherwise train at 128 (4x the steps per
    epoch for the epochs they chose); the default minibatch has its own tests, marked ``default_batch``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_schedule, "BATCH_SIZES", (512,))
        yield


@pytest.fixture(autouse=True)
def _settings(request, monkeypatch):
    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    torch.manual_seed(0)
    np.random.seed(0)
    if request.node.get_closest_marker("default_batch") is not None:
        monkeypatch.setattr(_schedule, "BATCH_SIZES", DEFAULT_BATCH_SIZES)
    yield


TRAIN_KW = {"enable_progress_bar": False, "log_every_n_steps": 1}


@pytest.fixture(scope="session")
def tapseq():
    """The bundled TAP-seq screen, subsampled to keep training fast (all multi-target cells kept)."""
    adata = sams_scvi.data.schraivogel2020_tapseq()
    rng = np.random.default_rng(0)
    labels = adata.obs["perturbation"].astype(str)
    combos = np.flatnonzero(labels.str.contains("+", regex=False))
    others = rng.choice(np.flatnonzero(~labels.str.contains("+", regex=False)), 4000, replace=False)
    return adata[np.sort(np.concatenate([combos, others]))].copy()


@pytest.fixture(scope="session")
def trained_tapseq(tapseq):
    """A SAMSVAE trained briefly on the TAP-seq subset, with validation history."""
    scvi.settings.seed = 0
    adata = tapseq.copy()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=16, n_hidden=128)
    model.train(max_epochs=150, check_val_every_n_epoch=1, **TRAIN_KW)
    return model, adata


@pytest.fixture(scope="session")
def small_screen_model():
    """A SAMSVAE trained for a few epochs on a small simulated screen with one combination (seconds)."""
    scvi.settings.seed = 0
    adata = sams_scvi.data.simulate_sams(
        n_perturbations=4,
        n_genes=40,
        n_latent=6,
        n_cells_per_perturbation=80,
        n_control_cells=200,
        combinations=["p0+p1"],
        n_cells_per_combination=60,
        n_ate_samples=2000,
    )
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=6, n_hidden=32)
    model.train(max_epochs=5, **TRAIN_KW)
    return model, adata
