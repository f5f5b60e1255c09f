import itertools

import numpy as np
import pytest
import torch
from scvi.distributions import NegativeBinomial

from sams_scvi.module import SAMSModule
from sams_scvi.module._components import (
    negative_binomial_count_terms,
    negative_binomial_mean_terms,
    relaxed_bernoulli_straight_through,
)

N, G, T, K, S = 12, 30, 4, 6, 3


def _tensors(n_covariates: bool = False):
    torch.manual_seed(0)
    design = torch.zeros(N, T)
    design[1, 0] = 1
    design[2, [0, 1]] = 1
    design[3, 3] = 0.5
    tensors = {"X": torch.poisson(torch.full((N, G), 3.0)), "perturbation": design}
    if n_covariates:
        tensors["batch"] = torch.randint(0, 2, (N, 1)).float()
        tensors["extra_categorical_covs"] = torch.randint(0, 3, (N, 1)).float()
    return tensors


@pytest.mark.parametrize(
    ("guide", "mean_field_encoder", "covariates"),
    list(itertools.product(["correlated", "mean_field"], [True, False], [False, True])),
)
def test_shapes_for_every_guide_and_encoder(guide, mean_field_encoder, covariates):
    module = SAMSModule(
        G,
        T,
        n_latent=K,
        n_hidden=16,
        n_layers=2,
        guide=guide,
        mean_field_encoder=mean_field_encoder,
        n_particles=S,
        n_cats_per_cov=[2, 3] if covariates else [1],
        embedding_encoder_n_hidden=8,
    )
    tensors = _tensors(covariates)
    inference, generative, loss = module(tensors)
    assert inference["z_basal"].shape == (S, N, K)
    assert inference["z"].shape == (S, N, K)
    assert inference["offset"].shape == (S, N, K)
    # a minibatch draws the globals of the perturbations its cells carry, no others
    present = (tensors["perturbation"] != 0).any(0).nonzero(as_tuple=True)[0]
    assert torch.equal(inference["globals"]["columns"], present) and len(present) < T
    assert inference["globals"]["mask"].shape == (S, len(present), K)
    assert inference["globals"]["kl"].shape == (S, len(present))
    px = generative["px"]
    assert px.mean.shape == (S, N, G) and px.batch_shape == (S, N) and px.event_shape == (G,)
    assert px.rho.sum(-1).allclose(torch.ones(S, N))
    assert px.log_prob(tensors["X"]).shape == (S, N)
    assert loss.reconstruction_loss["reconstruction_loss"].shape == (N,)
    assert torch.isfinite(loss.loss)
    # control cells (all-zero design rows) have no offset and carry no global KL
    assert torch.all(inference["offset"][:, 0] == 0)
    assert torch.all(loss.kl_local["kl_global_share"][0] == 0)
    loss.loss.backward()
    assert module.mask_logits.grad is not None and module.mask_logits.grad.abs().sum() > 0


def test_offset_is_design_times_masked_embedding():
    module = SAMSModule(G, T, n_latent=K, n_hidden=16, n_particles=S)
    tensors = _tensors()
    inference = module.inference(tensors["X"], tensors["perturbation"])
    g = inference["globals"]  # of the perturbations present, g["columns"]
    design = tensors["perturbation"][:, g["columns"]]
    expected = torch.einsum("nt,stk->snk", design, g["mask"] * g["embedding"])
    torch.testing.assert_close(inference["offset"], expected)
    torch.testing.assert_close(inference["z"] - inference["z_basal"], expected)


def test_masks_are_hard_and_carry_gradients():
    torch.manual_seed(0)
    logits = torch.zeros(2000, requires_grad=True)
    mask = relaxed_bernoulli_straight_through(logits, temperature=1.0)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.detach().mean().item() - 0.5) < 0.05  # an exact Bernoulli(0.5) draw
    (mask * torch.linspace(-1, 1, 2000)).sum().backward()
    assert logits.grad.abs().min() > 0
    module = SAMSModule(G, T, n_latent=K, n_particles=4)
    masks = module.sample_globals(4)["mask"]
    assert set(masks.detach().unique().tolist()) <= {0.0, 1.0}


def test_negative_binomial_matches_reference_distribution():
    torch.manual_seed(0)
    x = torch.poisson(torch.full((5, 7), 4.0))
    mu = torch.rand(3, 5, 7) * 10 + 0.1
    theta = torch.rand(7) + 0.5
    count_only, mean_part = negative_binomial_count_terms(x, theta), negative_binomial_mean_terms(x, mu, theta)
    reference = NegativeBinomial(mu=mu, theta=theta).log_prob(x).sum(-1)
    torch.testing.assert_close(count_only + mean_part, reference, rtol=1e-4, atol=1e-3)


def test_global_kl_counts_each_perturbation_once_per_dataset():
    module = SAMSModule(G, T, n_latent=K, n_particles=S)
    design = _tensors()["perturbation"]
    counts = (design != 0).sum(0).float()
    module.train_perturbation_counts.copy_(counts)
    kl = torch.rand(S, T)
    share = module.global_kl_share(design, kl)
    present = counts > 0
    torch.testing.assert_close(share.sum(-1), kl[:, present].sum(-1))
    # a perturbation absent from training (count 0) contributes nothing
    module.train_perturbation_counts[0] = 0
    assert torch.all(module.global_kl_share(design, kl)[:, 1] == 0)


def test_posterior_point_estimate_is_deterministic():
    module = SAMSModule(G, T, n_latent=K)
    module.mask_logits.data = torch.tensor(np.where(np.random.default_rng(0).random((T, K)) > 0.5, 3.0, -3.0)).float()
    a, b = module.point_globals(), module.point_globals()
    torch.testing.assert_close(a["embedding"], b["embedding"])
    torch.testing.assert_close(a["mask"][0], (module.mask_logits > 0).float())


@pytest.mark.parametrize(
    ("mechanism", "names"),
    [
        ("sparse", {"z_basal", "mask", "embedding"}),
        ("dense", {"z_basal", "embedding"}),
        ("sparse_point", {"z_basal", "mask_probability"}),
        ("none", {"z_basal"}),
    ],
)
def test_priors_are_named_as_in_the_paper(mechanism, names):
    module = SAMSModule(n_input=6, n_perturbations=3, n_latent=4, mechanism=mechanism)
    assert set(module.prior()) == names
    if mechanism == "sparse":
        module = SAMSModule(
            n_input=6, n_perturbations=3, n_latent=4, mask_prior_prob=0.2, embedding_prior_scale=0.5, penetrance=True
        )
        prior = module.prior()
        assert torch.sigmoid(prior["mask"].logits).item() == pytest.approx(0.2)
        assert prior["embedding"].scale.item() == pytest.approx(0.5)
        assert prior["penetrance"].mean.item() == pytest.approx(50 / 51)


def test_sparse_global_kl_is_guide_minus_prior_log_density():
    torch.manual_seed(0)
    mechanism = SAMSModule(n_input=6, n_perturbations=3, n_latent=4, guide="mean_field").mechanism
    draw = mechanism.sample(2)
    prior = mechanism.prior()
    q_embedding = mechanism.embedding_posterior(draw["mask"])
    mask_logits = mechanism.mask_logits.expand(2, -1, -1)
    expected = (
        q_embedding.log_prob(draw["embedding"])
        - prior["embedding"].log_prob(draw["embedding"])
        + torch.distributions.Bernoulli(logits=mask_logits).log_prob(draw["mask"])
        - prior["mask"].log_prob(draw["mask"])
    ).sum(-1)
    torch.testing.assert_close(draw["kl"], expected)


def test_input_statistics_saved_under_their_old_names_load():
    module = SAMSModule(n_input=5, n_perturbations=2, n_latent=3)
    state = module.state_dict()
    state["x_log_mean"] = torch.arange(5.0)
    state["x_log_std"] = torch.full((5,), 2.0)
    del state["input_mean"], state["input_std"]
    fresh = SAMSModule(n_input=5, n_perturbations=2, n_latent=3)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.input_mean, torch.arange(5.0))
    assert fresh.x_log_std is fresh.input_std
    assert "x_log_mean" not in fresh.state_dict()
