"""The fast training path computes exactly the objective a straightforward implementation would.

The module avoids concatenated inputs (their projections are summed, per-cell parts computed once), evaluates
the negative binomial's count-only terms once per cell, and charges each cell its share of the global KL with
one matrix product. The reference below does none of that: it loops over particles, concatenates inputs, evaluates
every term of the negative-binomial log-mass for every particle and loops over perturbations. Losses and gradients of every
parameter must agree to float tolerance for every mechanism, guide and encoder option.
"""

import pytest
import torch
from scvi.distributions import NegativeBinomial
from torch.distributions import Normal
from torch.nn import functional as F

from sams_scvi.module import SAMSModule

N, G, T, K, S, H = 9, 25, 4, 5, 3, 16
OPTIONS = [
    ("sparse", {"guide": "correlated", "mean_field_encoder": False}),
    ("sparse", {"guide": "correlated", "mean_field_encoder": True}),
    ("sparse", {"guide": "mean_field", "mean_field_encoder": False}),
    ("sparse", {"guide": "mean_field", "mean_field_encoder": True}),
    ("dense", {"mean_field_encoder": False}),
    ("dense", {"mean_field_encoder": True}),
    ("none", {}),
    ("sparse_point", {}),
]


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((N, G), 4.0, dtype=torch.float64), generator=gen)
    design = torch.zeros(N, T, dtype=torch.float64)
    design[1, 0] = 1
    design[2, [0, 1]] = 1
    design[3, 2] = 0.5
    design[4:6, 3] = 1
    design[6, [1, 2, 3]] = 1
    return x, design


def _trunk(mlp, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The residual trunk on an explicitly concatenated input."""
    h = F.leaky_relu(inputs @ weight.T + mlp.first.bias, 0.01)
    for layer in mlp.residual:
        h = h + F.leaky_relu(layer(h), 0.01)
    return h


def _negative_binomial_log_prob(x, mu, theta):
    """The textbook NB(mean mu, inverse dispersion theta) log-mass, every term for every entry."""
    return (
        torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
        + theta * torch.log(theta / (theta + mu))
        + x * torch.log(mu / (theta + mu))
    )


def test_textbook_negative_binomial_agrees_with_scvi_tools():
    x = torch.tensor([[0.0, 3.0, 10.0]], dtype=torch.float64)
    mu, theta = (
        torch.tensor([[0.5, 2.0, 30.0]], dtype=torch.float64),
        torch.tensor([1.0, 5.0, 0.3], dtype=torch.float64),
    )
    torch.testing.assert_close(
        _negative_binomial_log_prob(x, mu, theta), NegativeBinomial(mu=mu, theta=theta).log_prob(x), rtol=0, atol=1e-6
    )


def _reference_loss(module: SAMSModule, x, design, globals_, noise, counts) -> torch.Tensor:
    gaussian = module.likelihood == "normal"
    x_tilde = ((x if gaussian else torch.log1p(x)) - module.x_log_mean) / module.x_log_std
    enc, dec = module.basal_encoder, module.decoder
    per_particle = []
    for s in range(globals_["shift"].shape[0]):
        offset = design @ globals_["shift"][s]  # (N, K)
        if module.offset_projection is not None:  # q(z_b | [x~; D(M*E)])
            enc_in = torch.cat([x_tilde, offset], 1)
            enc_w = torch.cat([enc.trunk.first.weight, module.offset_projection.weight], 1)
        elif module.design_projection is not None:  # q(z | [x~; d])
            enc_in = torch.cat([x_tilde, design], 1)
            enc_w = torch.cat([enc.trunk.first.weight, module.design_projection.weight], 1)
        else:
            enc_in, enc_w = x_tilde, enc.trunk.first.weight
        h = _trunk(enc.trunk, enc_in, enc_w)
        q = Normal(enc.mean(h), torch.sqrt(enc.log_var(h).exp() + 1e-4))
        z_encoded = q.loc + q.scale * noise[s]
        z_basal, z = (
            (z_encoded, z_encoded + offset) if module.mechanism.encodes_basal else (z_encoded - offset, z_encoded)
        )
        if module.decoder_design is not None:  # p(x | [z; d])
            dec_in = torch.cat([z, design], 1)
            dec_w = torch.cat([dec.first.weight, module.decoder_design.weight], 1)
        else:
            dec_in, dec_w = z, dec.first.weight
        head = module.decoder_head(_trunk(dec, dec_in, dec_w))
        if gaussian:  # x ~ N(f(z), sigma_g^2), the textbook density
            log_lik = Normal(head, module.log_dispersion.exp()).log_prob(x).sum(-1)
        else:
            mu = x.sum(1, keepdim=True) * torch.softmax(head, -1) + 1e-4
            log_lik = _negative_binomial_log_prob(x, mu, module.log_dispersion.exp()).sum(-1)
        kl_basal = (q.log_prob(z_encoded) - Normal(0.0, 1.0).log_prob(z_basal)).sum(-1)
        kl_global = torch.zeros(N, dtype=x.dtype)
        for t in range(T):
            kl_global = kl_global + (design[:, t] != 0) * globals_["kl"][s, t] / counts[t]
        per_particle.append(-log_lik + kl_basal + kl_global)
    return torch.stack(per_particle).mean()


@pytest.mark.parametrize(("mechanism", "options"), OPTIONS)
def test_fast_path_matches_reference_loss_and_gradients(mechanism, options):
    _check_against_reference(mechanism, options, "nb")


@pytest.mark.parametrize(("mechanism", "options"), [OPTIONS[0], OPTIONS[3], OPTIONS[6], OPTIONS[7]])
def test_gaussian_likelihood_matches_reference_loss_and_gradients(mechanism, options):
    _check_against_reference(mechanism, options, "normal")


def _module(mechanism: str, options: dict, likelihood: str = "nb"):
    """A float64 module with every parameter perturbed, the data, the training counts and the parameters."""
    torch.manual_seed(0)
    x, design = _data()
    if likelihood == "normal":  # normalised values: negative and non-integer
        x = torch.log1p(x) - 1.5 + 0.1 * torch.randn(x.shape, dtype=x.dtype)
    module = SAMSModule(
        G, T, n_latent=K, n_hidden=H, n_layers=2, n_particles=S, mechanism=mechanism, likelihood=likelihood, **options
    )
    module.double()  # float64, so that the two summation orders agree to ~1e-12 and any real difference shows
    encoder_input = x if likelihood == "normal" else torch.log1p(x)
    module.x_log_mean.copy_(encoder_input.mean(0))
    module.x_log_std.copy_(encoder_input.std(0).clamp(min=1e-3))
    counts = torch.tensor([3.0, 3.0, 2.0, 3.0], dtype=torch.float64)
    module.train_perturbation_counts.copy_(counts)
    with torch.no_grad():  # make every parameter matter (zero-initialised ones would hide mistakes)
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = [p for p in module.parameters() if p.requires_grad]
    return module, x, design, counts, params


def _check_against_reference(mechanism: str, options: dict, likelihood: str) -> None:
    module, x, design, counts, params = _module(mechanism, options, likelihood)

    def run(fast: bool):
        torch.manual_seed(1)
        globals_ = module.sample_globals(S)
        torch.manual_seed(2)
        if fast:
            _, _, out = module({"X": x, "perturbation": design}, inference_kwargs={"global_samples": globals_})
            loss = out.loss
        else:
            noise = torch.empty(S, N, K, dtype=torch.float64).normal_()
            loss = _reference_loss(module, x, design, globals_, noise, counts)
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    fast_loss, fast_grads = run(fast=True)
    ref_loss, ref_grads = run(fast=False)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-10, atol=1e-9)
    for p, a, b in zip(params, fast_grads, ref_grads, strict=True):
        if a is None or b is None:
            assert a is None and b is None, "a parameter is used by one computation only"
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m, p=p: f"{tuple(p.shape)}: {m}")


WITH_GLOBALS = [option for option in OPTIONS if option[0] != "none"] + [("sparse", {"penetrance": True})]


@pytest.mark.parametrize(("mechanism", "options"), WITH_GLOBALS)
def test_a_minibatch_needs_only_the_globals_of_its_perturbations(mechanism, options):
    """Training draws the globals of the perturbations present in the minibatch only (the step's cost then follows
    the batch, not the screen). For the same draw of those globals, the loss and every gradient equal the
    computation with all T perturbations' globals: the absent ones enter neither the likelihood nor the KL share."""
    module, x, design, _, params = _module(mechanism, options)
    design = design.clone()
    design[:, 2] = 0  # perturbation 2 has no cell in this minibatch
    columns = SAMSModule.present_perturbations(design)
    assert columns.tolist() == [0, 1, 3]

    def run(restricted: bool):
        torch.manual_seed(1)
        globals_ = module.sample_globals(S)
        if restricted:
            globals_ = {**{key: value[:, columns] for key, value in globals_.items()}, "columns": columns}
        torch.manual_seed(2)
        _, _, out = module({"X": x, "perturbation": design}, inference_kwargs={"global_samples": globals_})
        return out.loss, torch.autograd.grad(out.loss, params, allow_unused=True)

    full_loss, full_grads = run(restricted=False)
    loss, grads = run(restricted=True)
    torch.testing.assert_close(loss, full_loss, rtol=1e-12, atol=1e-12)
    for p, a, b in zip(params, grads, full_grads, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, p=p: f"{tuple(p.shape)}: {m}")


@pytest.mark.parametrize("guide", ["correlated", "mean_field"])
def test_drawing_some_perturbations_uses_their_own_posterior(guide):
    """q(E | M) of a subset of perturbations is the subset of q(E | M): the guide is per perturbation."""
    module, *_ = _module("sparse", {"guide": guide})
    mechanism = module.mechanism
    columns = torch.tensor([3, 1])
    mask = (torch.rand(S, T, K, dtype=torch.float64) > 0.5).double()
    full, part = mechanism.embedding_posterior(mask), mechanism.embedding_posterior(mask[:, columns], columns)
    for attribute in ("loc", "scale"):
        whole = getattr(full, attribute)
        whole = whole if whole.dim() == 3 else whole[None]
        some = getattr(part, attribute)
        some = some if some.dim() == 3 else some[None]
        torch.testing.assert_close(some, whole[:, columns].expand_as(some))
    drawn = mechanism.sample(4000, columns=columns, with_kl=True)
    assert drawn["shift"].shape == (4000, 2, K) and drawn["kl"].shape == (4000, 2)
    # masks drawn at the subset's own logits
    probability = torch.sigmoid(mechanism.mask_logits[columns])
    assert (drawn["mask"].mean(0) - probability).abs().max() < 0.05


def test_mean_terms_with_cells_without_counts():
    """A minibatch whose cells have no counts at all (zero-library cells in targeted panels) still backpropagates."""
    from sams_scvi.module._components import negative_binomial_mean_terms

    x = torch.zeros(3, 4, dtype=torch.float64)
    mu = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    theta = torch.rand(4, dtype=torch.float64, requires_grad=True)
    value = negative_binomial_mean_terms(x, mu, theta)
    torch.testing.assert_close(value, _negative_binomial_log_prob(x, mu, theta).sum(-1))
    assert torch.autograd.gradcheck(lambda m, t: negative_binomial_mean_terms(x, m, t), (mu, theta))


def test_mean_terms_stay_exact_in_float32_at_large_dispersion():
    """Nearly Poisson genes (large theta) in float32: theta log theta and theta log(theta + mu) are huge and cancel;
    folded into -theta log1p(mu / theta) the value keeps its float64 digits (it was off by ~4,000 nats at 1e4)."""
    from sams_scvi.module._components import negative_binomial_mean_terms

    generator = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(64, 2000, generator=generator) * 2, generator=generator)
    mu = torch.rand(64, 2000, generator=generator) * 3 + 0.01
    for dispersion in (1e2, 1e4, 1e6):
        theta = torch.full((2000,), dispersion)
        value = negative_binomial_mean_terms(x, mu, theta).double()
        reference = negative_binomial_mean_terms(x.double(), mu.double(), theta.double())
        assert (value - reference).abs().max() < 0.5, dispersion
