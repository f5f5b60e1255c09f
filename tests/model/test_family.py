"""The comparison models: same API as SAMSVAE, latent constructions that match their definitions."""

import numpy as np
import pytest
import torch

import sams_scvi
from sams_scvi.module import SAMSModule

from ..conftest import TRAIN_KW

FAMILY = [
    (sams_scvi.SAMSVAE, {"guide": "mean_field", "mean_field_encoder": True}, "additive"),
    (sams_scvi.CPAVAE, {}, "additive"),
    (sams_scvi.ConditionalVAE, {}, "additive"),
    (sams_scvi.SVAEPlus, {}, "unique"),
]


@pytest.mark.parametrize(("model_cls", "kwargs", "encoding"), FAMILY, ids=lambda x: getattr(x, "__name__", None))
def test_each_variant_trains_predicts_and_round_trips(model_cls, kwargs, encoding, tapseq, tmp_path):
    adata = tapseq[:1500].copy()
    model_cls.setup_anndata(adata, perturbation_key="perturbation", encode_combinations=encoding)
    model = model_cls(adata, n_latent=8, n_hidden=32, n_particles=2, **kwargs)
    model.train(max_epochs=2, batch_size=256, **TRAIN_KW)
    loss = model.history["elbo_train"]["elbo_train"].to_numpy(dtype=float)
    assert np.all(np.isfinite(loss))

    labels = model._perturbation_state["observed_labels"][:3]
    ate = model.estimate_ate(labels, n_samples=40, progress_bar=False)
    assert ate.shape == (3, adata.n_vars) and np.all(np.isfinite(ate.X))
    pred = model.predict_perturbation(labels, indices=np.arange(5), n_samples=3, progress_bar=False)
    assert pred.shape == (15, adata.n_vars)
    assert np.isfinite(model.get_marginal_ll(indices=np.arange(50), n_mc_samples=6))
    latent = model.get_latent(indices=np.arange(20))
    assert latent.shape == (20, 8)

    model.save(tmp_path / "m", overwrite=True)
    loaded = model_cls.load(tmp_path / "m", adata=adata)
    np.testing.assert_allclose(loaded.get_latent(indices=np.arange(20)), latent, atol=1e-5)
    reloaded_ate = loaded.estimate_ate(labels, n_samples=40, progress_bar=False)
    np.testing.assert_allclose(reloaded_ate.X, ate.X, atol=1e-5)


def test_svae_plus_requires_one_hot_and_refuses_unseen_combinations(tapseq):
    adata = tapseq[:1500].copy()
    sams_scvi.SVAEPlus.setup_anndata(adata, perturbation_key="perturbation")
    with pytest.raises(ValueError, match="encode_combinations='unique'"):
        sams_scvi.SVAEPlus(adata)

    sams_scvi.SVAEPlus.setup_anndata(adata, perturbation_key="perturbation", encode_combinations="unique")
    model = sams_scvi.SVAEPlus(adata, n_latent=4, n_hidden=16)
    combos = [p for p in model.perturbations if "+" in p]
    assert combos, "combinations become treatments of their own"
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    held_out = np.flatnonzero(labels == combos[0])
    train = np.setdiff1d(np.arange(adata.n_obs), held_out)
    model.train(max_epochs=1, datasplitter_kwargs={"external_indexing": [train, held_out, []]}, **TRAIN_KW)
    with pytest.warns(UserWarning, match="without training cells"):
        ate = model.estimate_ate([combos[0]], n_samples=10, progress_bar=False)
    assert np.all(np.isfinite(ate.X))
    singles = [p for p in model.perturbations if "+" not in p]
    unseen = next(f"{a}+{b}" for a in singles for b in singles if a < b and f"{a}+{b}" not in model.perturbations)
    with pytest.raises(ValueError, match="unique encoding"):
        model.estimate_ate([unseen], n_samples=10, progress_bar=False)


def test_unique_encoding_is_one_hot(tapseq):
    adata = tapseq.copy()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", encode_combinations="unique")
    design = adata.obsm["_scvi_perturbation"]
    assert design.getnnz(axis=1).max() == 1
    labels = adata.obs["perturbation"].astype(str)
    assert design.shape[1] == labels[labels != "control"].nunique()


def _design(n_cells: int, n_perturbations: int) -> torch.Tensor:
    design = torch.zeros(n_cells, n_perturbations)
    design[1, 0] = 1
    design[2, [0, 1]] = 1
    return design


def test_cpa_vae_equals_sams_vae_with_masks_fixed_to_one():
    """z = z_b + D E in CPA-VAE equals SAMS-VAE's z = z_b + D(M * E) with M = 1 and the same E."""
    torch.manual_seed(0)
    G, T, K, S = 20, 3, 5, 4
    x, design = torch.poisson(torch.full((6, G), 2.0)), _design(6, T)
    sams = SAMSModule(G, T, n_latent=K, n_hidden=16, guide="mean_field", mechanism="sparse")
    cpa = SAMSModule(G, T, n_latent=K, n_hidden=16, mechanism="dense")
    cpa.load_state_dict({k: v for k, v in sams.state_dict().items() if not k.startswith("mechanism.")}, strict=False)
    with torch.no_grad():
        cpa.mechanism.embedding_loc.normal_()
        cpa.mechanism.embedding_log_scale.uniform_(-1, 0)
        sams.mechanism.embedding_loc.copy_(cpa.mechanism.embedding_loc)
        sams.mechanism.embedding_log_scale.copy_(cpa.mechanism.embedding_log_scale)
        sams.mechanism.mask_logits.fill_(30.0)  # q(m = 1) = 1 to float precision: every mask sample is 1

    torch.manual_seed(1)
    sams_globals = sams.sample_globals(S)
    torch.manual_seed(1)
    torch.rand(S, T, K)  # the uniforms SAMS-VAE spends on its mask samples
    cpa_globals = cpa.sample_globals(S)
    assert torch.all(sams_globals["mask"] == 1)
    torch.testing.assert_close(sams_globals["shift"], cpa_globals["shift"], rtol=0, atol=0)
    # the global KL differs exactly by the masks' KL: K * [log q(m = 1) - log p(m = 1)] per perturbation
    mask_kl = K * (torch.nn.functional.logsigmoid(torch.tensor(30.0)) - np.log(0.01))
    torch.testing.assert_close(sams_globals["kl"] - cpa_globals["kl"], torch.full((S, T), float(mask_kl)))
    torch.manual_seed(2)
    out_cpa = cpa.inference(x, design, global_samples=cpa_globals)
    torch.manual_seed(2)
    out_sams = sams.inference(x, design, global_samples=sams_globals)
    torch.testing.assert_close(out_cpa["z"], out_sams["z"], rtol=0, atol=0)
    torch.testing.assert_close(out_cpa["offset"][:, 2], cpa_globals["shift"][:, 0] + cpa_globals["shift"][:, 1])


def test_conditional_vae_sees_the_treatment_only_through_its_networks():
    torch.manual_seed(0)
    G, T, K = 20, 3, 5
    x, design = torch.poisson(torch.full((6, G), 2.0)), _design(6, T)
    module = SAMSModule(G, T, n_latent=K, n_hidden=16, mechanism="none", n_particles=2)
    globals_ = module.sample_globals(2)
    assert torch.all(globals_["shift"] == 0) and torch.all(globals_["kl"] == 0)
    out = module.inference(x, design, global_samples=globals_)
    torch.testing.assert_close(out["z"], out["z_basal"])
    z = torch.zeros(1, 2, K)
    with_a = module.generative(z, torch.full((1, 2), 100.0), design=torch.tensor([[0.0, 0, 0], [1, 0, 0]]))
    assert not torch.allclose(with_a["px"].rho[0, 0], with_a["px"].rho[0, 1])  # the decoder reads d
    assert module.global_variational_parameters() == []


def test_svae_plus_prior_mean_shift_and_beta_term():
    torch.manual_seed(0)
    G, T, K = 20, 3, 5
    x, design = torch.poisson(torch.full((6, G), 2.0)), _design(6, T)
    module = SAMSModule(G, T, n_latent=K, n_hidden=16, mechanism="sparse_point", mask_prior_beta=3.0)
    assert module.offset_projection is None and module.design_projection is None  # q(z | x): no treatment input
    with torch.no_grad():
        module.mechanism.mask_logits.normal_(0, 2)
    globals_ = module.sample_globals(3)
    torch.testing.assert_close(globals_["shift"], globals_["mask"] * module.mechanism.means)
    # global term = -log Beta(sigmoid(lambda); 1, 3), checked against torch.distributions
    p = torch.sigmoid(module.mechanism.mask_logits)
    expected = -torch.distributions.Beta(1.0, 3.0).log_prob(p).sum(-1)
    torch.testing.assert_close(globals_["kl"][1], expected)
    out = module.inference(x, design, global_samples=globals_)
    torch.testing.assert_close(out["z_encoded"], out["z"])  # the encoder infers the perturbed state
    torch.testing.assert_close(out["z_basal"], out["z"] - out["offset"])
    with pytest.raises(ValueError, match="at least 1"):
        SAMSModule(G, T, mechanism="sparse_point", mask_prior_beta=0.5)


def test_sams_global_kl_matches_torch_distributions():
    torch.manual_seed(0)
    T, K = 4, 6
    for guide in ("correlated", "mean_field"):
        module = SAMSModule(10, T, n_latent=K, guide=guide, mask_prior_prob=0.05, embedding_prior_scale=2.0)
        with torch.no_grad():
            module.mechanism.mask_logits.normal_(0, 2)
        g = module.sample_globals(3)
        q_mask = torch.distributions.Bernoulli(logits=module.mechanism.mask_logits)
        q_embedding = module.mechanism.embedding_posterior(g["mask"])
        log_q = q_mask.log_prob(g["mask"]) + q_embedding.log_prob(g["embedding"])
        log_p = torch.distributions.Bernoulli(probs=torch.tensor(0.05)).log_prob(
            g["mask"]
        ) + torch.distributions.Normal(0.0, 2.0).log_prob(g["embedding"])
        torch.testing.assert_close(g["kl"], (log_q - log_p).sum(-1))


def test_arguments_of_other_models_are_rejected():
    with pytest.raises(ValueError, match="do not apply"):
        SAMSModule(10, 3, mechanism="dense", guide="mean_field")
    with pytest.raises(ValueError, match="do not apply"):
        SAMSModule(10, 3, mechanism="sparse_point", mask_prior_prob=0.1)
    with pytest.raises(ValueError, match="Unknown mechanism"):
        SAMSModule(10, 3, mechanism="bogus")


def test_mechanism_point_estimates_are_copies(tapseq):
    adata = tapseq[:600].copy()
    sams_scvi.CPAVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.CPAVAE(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, **TRAIN_KW)
    embeddings = model.get_perturbation_embeddings()
    before = model.module.mechanism.embedding_loc.detach().clone()
    embeddings.iloc[0, 0] = 1e3
    torch.testing.assert_close(model.module.mechanism.embedding_loc.detach(), before)


@pytest.mark.parametrize("mechanism", ["sparse", "dense", "sparse_point", "none"])
def test_globals_without_kl_are_the_same_draws(mechanism):
    """``with_kl=False`` (inference) skips the KL but draws the same globals from the same random numbers."""
    module = SAMSModule(10, 4, n_latent=6, mechanism=mechanism)
    torch.manual_seed(3)
    full = module.sample_globals(3)
    torch.manual_seed(3)
    light = module.sample_globals(3, with_kl=False)
    assert "kl" in full and "kl" not in light
    assert light.keys() == full.keys() - {"kl"}
    for key in light:
        torch.testing.assert_close(light[key], full[key], rtol=0, atol=0)


def test_masks_drawn_without_autograd_are_the_same_draws():
    """Inference draws the mask's forward value only; it must equal the straight-through sample's."""
    module = SAMSModule(10, 40, n_latent=30, mechanism="sparse")
    with torch.no_grad():
        module.mechanism.mask_logits.normal_(0, 3)
    torch.manual_seed(5)
    with_grad = module.sample_globals(20)["mask"]
    assert with_grad.requires_grad
    torch.manual_seed(5)
    with torch.inference_mode():
        without = module.sample_globals(20, with_kl=False)["mask"]
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)
    assert 0.2 < without.mean() < 0.8
