"""Axis alignment: the sparsest rotation, its exactness as a symmetry of the model, and its place in training."""

import numpy as np
import pytest
import scvi
import torch

import sams_scvi
from sams_scvi.module import SAMSModule
from sams_scvi.module._alignment import active_entries, sparsest_rotation, varimax

from ..conftest import TRAIN_KW


def _random_orthogonal(k: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(k, k)))
    return q * np.sign(np.diag(r))


def _sparse_shifts(n_perturbations: int = 60, k: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = rng.random((n_perturbations, k)) < 0.2
    mask[np.arange(n_perturbations), rng.integers(0, k, n_perturbations)] = True  # every row moves something
    return mask * rng.choice([-1.0, 1.0], mask.shape) * rng.normal(4.0, 0.5, mask.shape), mask


def test_sparsest_rotation_undoes_a_random_rotation():
    shifts, mask = _sparse_shifts()
    rotated = shifts @ _random_orthogonal(6, seed=1)
    rotation = sparsest_rotation(rotated)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(6), atol=1e-8)
    recovered = active_entries(torch.as_tensor(rotated @ rotation), 0.3).numpy()
    f1 = sams_scvi.metrics.mask_recovery(recovered, mask)["f1"]
    assert f1 > 0.95, f1
    dense = sams_scvi.metrics.mask_recovery(np.abs(rotated) > 0.3 * np.abs(rotated).max(1, keepdims=True), mask)
    assert dense["f1"] < 0.7  # the task is not trivial: the rotated shifts are dense
    assert np.allclose(varimax(shifts) @ varimax(shifts).T, np.eye(6), atol=1e-8)
    np.testing.assert_array_equal(sparsest_rotation(np.zeros((3, 4))), np.eye(4))
    with pytest.raises(ValueError, match="matrix"):
        sparsest_rotation(np.zeros(4))


@pytest.mark.parametrize("guide", ["correlated", "mean_field"])
def test_rotating_the_latent_space_leaves_predictions_unchanged(guide):
    """z' = zR is a symmetry: decoded point predictions are identical and the basal means rotate with R."""
    torch.manual_seed(0)
    module = SAMSModule(n_input=12, n_perturbations=5, n_latent=4, n_hidden=16, guide=guide, mask_init_logit=3.0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        module.mechanism.mask_logits.fill_(3.0)  # every mask on before and after: the exact case for both guides
    x = torch.poisson(torch.full((8, 12), 3.0))
    design = torch.nn.functional.one_hot(torch.arange(8) % 5, 5).float()

    def point_prediction():
        offset = module.latent_offset(design, module.point_globals()["shift"])
        qz = module.basal_encoder(module.normalize(x), context=module.offset_projection(offset))
        z = module.compose(qz.loc, offset)
        return qz.loc, module.generative(z, x.sum(-1))["px"].mu

    basal, mu = point_prediction()
    rotation = torch.as_tensor(_random_orthogonal(4, seed=2), dtype=torch.float32)
    module.rotate_latent(rotation, torch.ones(5, 4, dtype=torch.bool))
    rotated_basal, rotated_mu = point_prediction()
    torch.testing.assert_close(rotated_mu, mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rotated_basal, basal @ rotation, rtol=1e-4, atol=1e-5)


def test_alignment_runs_inside_training_and_holds_the_masks():
    """align_at=0.5 of 2 epochs: aligned after epoch 1, masks held to the end (exactly +-8), then trainable again.

    The default (fast) recipe aligns; the reference recipe does not."""
    adata = sams_scvi.data.simulate_sams(n_perturbations=3, n_genes=20, n_latent=3, n_cells_per_perturbation=40)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    scvi.settings.seed = 0
    model = sams_scvi.SAMSVAE(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, **TRAIN_KW)
    logits = model.module.mechanism.mask_logits
    assert set(logits.abs().flatten().tolist()) == {8.0}
    assert (logits > 0).any(axis=1).all()  # every perturbation keeps its largest direction
    assert logits.requires_grad
    reference = sams_scvi.SAMSVAE(adata, n_latent=3, n_hidden=16, recipe="reference")
    reference.train(max_epochs=2, **TRAIN_KW)
    assert reference.trainer.lightning_module.align_at is None
    assert not torch.all(reference.module.mechanism.mask_logits.abs() == 8.0)


def test_alignment_needs_masks():
    adata = sams_scvi.data.simulate_sams(n_perturbations=2, n_genes=10, n_latent=2, n_cells_per_perturbation=20)
    sams_scvi.SVAEPlus.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SVAEPlus(adata, n_latent=2)
    with pytest.raises(ValueError, match="mechanism with masks"):
        model.train(max_epochs=1, plan_kwargs={"align_at": 0.5}, **TRAIN_KW)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    with pytest.raises(ValueError, match="fraction"):
        sams_scvi.SAMSVAE(adata, n_latent=2).train(max_epochs=1, plan_kwargs={"align_at": 1.5}, **TRAIN_KW)


def test_active_entries_keep_most_of_each_shift():
    shifts = torch.tensor([[4.0, 0.5, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 0.3, 0.0]])
    active = active_entries(shifts, threshold=0.5)
    expected = [[True, False, False, False], [True] * 4, [False] * 4, [True, True, False, False]]
    np.testing.assert_array_equal(active.numpy(), expected)
    # a high threshold alone would drop most of a flat row; the energy rule keeps 90 % of its squared norm
    flat = active_entries(torch.tensor([[1.0, 0.9, 0.9, 0.9, 0.9]]), threshold=0.95)
    assert flat.sum() == 5
