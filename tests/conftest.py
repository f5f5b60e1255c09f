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


N_LATENT = 4  # of the Gaussian screen with a known mechanism


@pytest.fixture(scope="session")
def gaussian_screen():
    return sams_scvi.data.simulate_sams_gaussian(
        n_perturbations=6,
        n_genes=30,
        n_latent=N_LATENT,
        mask_prob=0.25,
        n_cells_per_perturbation=70,
        n_control_cells=140,
        combinations=["p0+p1", "p2+p3"],
        n_cells_per_combination=35,
        n_ate_samples=100,
        seed=0,
    )


def set_mechanism(adata, penetrance: bool = False, scale: float = 0.3) -> sams_scvi.SAMSVAE:
    """An untrained model with a known mechanism: p0 acts on dimensions 0 and 1, p1 on 0, p2 on 1, p3 on 2 (with
    p4's shift opposite to p3's), p5 on nothing; embeddings with posterior scale ``scale``."""
    adata = adata.copy()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(
        adata, n_latent=N_LATENT, n_hidden=32, likelihood="normal", guide="mean_field", penetrance=penetrance
    )
    mechanism = model.module.mechanism
    on = np.zeros((6, N_LATENT), dtype=bool)
    on[0, [0, 1]] = on[1, 0] = on[2, 1] = on[3, 2] = on[4, 2] = True
    loc = torch.tensor(
        [[2.0, 1.0, 0, 0], [1.5, 0, 0, 0], [0, -2.0, 0, 0], [0, 0, 1.0, 0], [0, 0, -1.0, 0], [0, 0, 0, 0]]
    )
    with torch.no_grad():
        mechanism.mask_logits.copy_(torch.where(torch.as_tensor(on), 8.0, -8.0))
        mechanism.embedding_loc.copy_(loc)
        mechanism.embedding_log_scale.fill_(float(np.log(scale)))
        model.module.train_perturbation_counts.copy_(torch.tensor([105.0, 105, 105, 105, 70, 70]))
    model.module.eval()
    model.is_trained_ = True
    return model


@pytest.fixture(scope="session")
def known(gaussian_screen):
    return set_mechanism(gaussian_screen)
