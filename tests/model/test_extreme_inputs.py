"""Numerical robustness on real data with extreme inputs.

A 1,500-cell subset of the bundled TAP-seq screen (raw UMI counts) is made extreme: cells thinned to ~10, 1 and 0
UMIs, cells resampled to 10^5 UMIs, a perturbation and a combination carried by a single cell, and genes without a
single count. Training, latents, likelihood bounds, ATEs and predictions must stay finite, and the all-zero genes
must be predicted near zero; the matrix's storage (float64, int64, int32, CSR, a layer) must not change anything.
"""

import numpy as np
import pytest
import scvi
import torch
from scipy import sparse
from torch.distributions import NegativeBinomial

import sams_scvi
from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi.module._components import negative_binomial_count_terms, negative_binomial_mean_terms

from ..conftest import TRAIN_KW

N_CELLS = 1500
N_LOW, N_TINY, N_HIGH = 50, 5, 50  # cells at ~10 UMIs, at ~1 UMI (plus one at 0), at 10^5 UMIs
HIGH_UMI = 100_000
ONE_CELL = "ONECELL"
N_ZERO_GENES = 4


def _fresh_seed() -> None:
    scvi.settings.seed = 0
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module")
def extreme(tapseq):
    """The extreme AnnData (CSR float32 counts) and the positions of its extreme cells, labels and genes."""
    rng = np.random.default_rng(14)
    adata = tapseq[np.sort(rng.choice(tapseq.n_obs, N_CELLS, replace=False))].copy()
    counts = adata.X.toarray().astype(np.int64)
    # genes without any count: the most expressed ones, so that the model must learn to switch them off
    zero_genes = np.argsort(-counts.sum(0))[:N_ZERO_GENES]
    counts[:, zero_genes] = 0
    library = counts.sum(1)
    labels = adata.obs["perturbation"].astype(str).to_numpy().copy()
    controls = np.flatnonzero(labels == "control")
    order = rng.permutation(np.setdiff1d(np.flatnonzero(library >= 50), controls[:2]))
    low, tiny, empty = order[:N_LOW], order[N_LOW : N_LOW + N_TINY], order[N_LOW + N_TINY]
    high = order[N_LOW + N_TINY + 1 : N_LOW + N_TINY + 1 + N_HIGH]
    for cell in low:  # binomial thinning: what a 10-UMI capture of the same cell would give
        counts[cell] = rng.binomial(counts[cell], 10 / library[cell])
    for cell in tiny:
        counts[cell] = rng.binomial(counts[cell], 1 / library[cell])
    counts[empty] = 0
    for cell in high:  # the same expression profile sequenced to 10^5 UMIs
        counts[cell] = rng.multinomial(HIGH_UMI, counts[cell] / library[cell])
    # a new atomic perturbation with one cell, and a combination of two known ones present in one cell only
    atoms = sorted({a for label in labels if label != "control" for a in label.split("+")})
    seen = {frozenset(label.split("+")) for label in labels}
    combination = next(f"{a}+{b}" for a in atoms for b in atoms if a < b and frozenset((a, b)) not in seen)
    labels[controls[0]], labels[controls[1]] = ONE_CELL, combination
    adata.obs["perturbation"] = labels
    adata.X = sparse.csr_matrix(counts.astype(np.float32))
    cells = {
        "low": low,
        "tiny": tiny,
        "empty": np.array([empty]),
        "high": high,
        "one_cell": controls[:2],
        "extreme": np.sort(np.concatenate([low, tiny, [empty], high])),
    }
    return adata, cells, combination, zero_genes


def _split(cells: dict) -> list[np.ndarray]:
    """Training / validation cells: the one-cell labels in training, extreme cells on both sides."""
    rng = np.random.default_rng(0)
    candidates = np.setdiff1d(np.arange(N_CELLS), cells["one_cell"])
    validation = np.sort(rng.choice(candidates, N_CELLS // 10, replace=False))
    assert np.isin(cells["extreme"], validation).any() and not np.isin(cells["extreme"], validation).all()
    return [np.setdiff1d(np.arange(N_CELLS), validation), validation, np.array([], dtype=np.int64)]


def _all_finite(history: dict) -> None:
    for key, frame in history.items():
        values = frame.to_numpy(dtype=float)
        assert values.size and np.isfinite(values).all(), key


def _train_extreme(adata, cells):
    """SAMS-VAE trained on the extreme data with a high learning rate (the gradients of 10^5-UMI cells are large)."""
    adata = adata.copy()
    _fresh_seed()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=8, n_hidden=64)
    model.train(
        max_epochs=8,
        lr=1e-2,
        batch_size=256,
        check_val_every_n_epoch=1,
        datasplitter_kwargs={"external_indexing": _split(cells)},
        **TRAIN_KW,
    )
    return model, adata


def _train_briefly(adata, layer):
    _fresh_seed()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", layer=layer)
    model = sams_scvi.SAMSVAE(adata, n_latent=8, n_hidden=64)
    # without the latent alignment of the "fast" recipe (seconds of its own; the extreme model has it)
    model.train(max_epochs=3, lr=1e-2, plan_kwargs={"align_at": None}, **TRAIN_KW)
    return model


STORAGES = {
    "float64 dense": lambda x: x.toarray().astype(np.float64),
    "int64 dense": lambda x: x.toarray().astype(np.int64),
    "int32 dense": lambda x: x.toarray().astype(np.int32),
    "float64 layer": None,  # counts in layers["counts"], X holding log-normalised values that must not be read
}


def _train_stored(adata, storage):
    adata = adata.copy()
    if storage == "float64 layer":
        adata.layers["counts"] = adata.X.toarray().astype(np.float64)
        library = np.asarray(adata.X.sum(1)).clip(min=1)
        adata.X = np.log1p(adata.X.toarray() / library * 1e4)
        return _train_briefly(adata, layer="counts")
    adata.X = STORAGES[storage](adata.X)
    return _train_briefly(adata, layer=None)


def _train_normal(adata):
    """The Gaussian likelihood on the same data, log-normalised and float64."""
    adata = adata.copy()
    counts = adata.X.toarray().astype(np.float64)
    library = counts.sum(1, keepdims=True)
    # scanpy's normalize_total + log1p; a cell without counts stays at 0 instead of 0 / 0
    adata.X = np.log1p(counts / np.where(library > 0, library, 1.0) * 1e4)
    _fresh_seed()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=8, n_hidden=64, likelihood="normal")
    model.train(max_epochs=8, lr=1e-2, batch_size=256, check_val_every_n_epoch=1, **TRAIN_KW)
    return model, adata


@pytest.fixture(scope="module")
def models(extreme):
    """Every model of this file, trained once for the module."""
    adata, cells, _, _ = extreme
    return {
        "extreme": _train_extreme(adata, cells),
        "normal": _train_normal(adata),
        "reference": _train_briefly(adata.copy(), layer=None),  # CSR float32, as the data come
        **{storage: _train_stored(adata, storage) for storage in STORAGES},
    }


@pytest.fixture(scope="module", autouse=True)
def _train_first(models):
    return models


@pytest.fixture(scope="module")
def extreme_model(models):
    return models["extreme"]


def test_extreme_data_is_what_it_claims(extreme):
    adata, cells, combination, zero_genes = extreme
    library = np.asarray(adata.X.sum(1)).ravel()
    assert 3 <= np.median(library[cells["low"]]) <= 20 and library[cells["low"]].max() <= 40
    assert library[cells["tiny"]].max() <= 5 and library[cells["empty"]].item() == 0
    np.testing.assert_array_equal(library[cells["high"]], HIGH_UMI)
    assert np.asarray(adata.X[:, zero_genes].sum()).item() == 0
    assert (adata.obs["perturbation"] == ONE_CELL).sum() == 1 and (adata.obs["perturbation"] == combination).sum() == 1


def test_training_history_is_finite(extreme_model):
    model, _ = extreme_model
    history = model.history
    assert {"elbo_train", "train_loss", "elbo_validation", "validation_loss"} <= set(history)
    _all_finite(history)
    assert len(history["elbo_train"]) == 8 and len(history["elbo_validation"]) == 8
    # it learns despite the extreme cells
    assert history["elbo_train"].iloc[-1, 0] < history["elbo_train"].iloc[0, 0]
    assert model.module.train_perturbation_counts[model.perturbations.index(ONE_CELL)] == 1


def test_latent_is_finite_for_extreme_cells(extreme_model, extreme):
    model, _ = extreme_model
    _, cells, _, _ = extreme
    for representation in ("basal", "perturbed"):
        latent = model.get_latent(representation=representation)
        assert latent.shape == (N_CELLS, 8) and np.isfinite(latent).all()
        # the extreme cells are encoded, not thrown to the edge of the latent space
        assert np.abs(latent[cells["extreme"]]).max() < 20


def test_likelihood_bounds_are_finite_for_extreme_cells(extreme_model, extreme):
    model, _ = extreme_model
    _, cells, _, _ = extreme
    marginal = model.get_marginal_ll(indices=cells["extreme"], n_mc_samples=10, return_mean=False)
    assert marginal.shape == (len(cells["extreme"]),) and np.isfinite(marginal).all()
    by_cell = dict(zip(cells["extreme"], marginal, strict=True))
    # log p(x) < 0 for cells with counts
    library = np.asarray(model.adata.X.sum(1)).ravel()
    # thinning to ~1 UMI leaves some cells empty; for those p(x) ~ 1 and the 10-sample estimate is ~0 +- noise
    assert all(by_cell[c] < 0 for c in cells["extreme"] if library[c] > 0)
    low = np.array([by_cell[c] for c in cells["low"]])
    high = np.array([by_cell[c] for c in cells["high"]])
    # 10^5 counts cost far more nats than 10, but stay finite (no inf from lgamma or log of a huge NB mean)
    assert high.max() < low.min()
    assert by_cell[cells["empty"][0]] > low.min()  # a cell without counts is a likely observation
    assert np.isfinite(model.get_elbo(indices=cells["extreme"], n_samples=3))
    assert np.isfinite(model.get_elbo())


def test_loss_and_gradients_are_finite_on_a_batch_of_extreme_cells(extreme_model, extreme):
    model, adata = extreme_model
    _, cells, _, _ = extreme
    module = model.module
    for group in ("low", "high"):
        tensors = next(iter(model._make_data_loader(adata=adata, indices=cells[group], batch_size=len(cells[group]))))
        assert tensors[SAMS_REGISTRY_KEYS.X_KEY].dtype == torch.float32
        module.zero_grad()
        with torch.enable_grad():
            _, generative, losses = module(tensors)
            losses.loss.backward()
        assert torch.isfinite(losses.loss)
        for term in (losses.reconstruction_loss, losses.kl_local):
            assert all(torch.isfinite(value).all() for value in term.values())
        assert torch.isfinite(generative["px"].mu).all() and (generative["px"].mu > 0).all()
        for name, parameter in module.named_parameters():
            assert parameter.grad is None or torch.isfinite(parameter.grad).all(), (group, name)
        module.zero_grad()


def test_negative_binomial_stays_accurate_at_1e5_umis(extreme_model, extreme):
    """The float32 likelihood of a 10^5-UMI cell (lgamma ~ 10^6) agrees with a float64 reference to < 0.1 nats."""
    model, adata = extreme_model
    _, cells, _, _ = extreme
    module = model.module
    x = torch.as_tensor(adata.X[cells["high"]].toarray(), dtype=torch.float32)
    with torch.inference_mode():
        z = torch.randn(2, x.shape[0], module.n_latent)
        generative = module.generative(z, x.sum(-1))
        mu, theta = generative["px"].mu, generative["px"].theta
        value = negative_binomial_count_terms(x, theta) + negative_binomial_mean_terms(x, mu, theta)
    assert value.dtype == torch.float32 and torch.isfinite(value).all()
    theta64 = theta.double()
    reference = NegativeBinomial(total_count=theta64, logits=mu.double().log() - theta64.log()).log_prob(x.double())
    assert (value.double() - reference.sum(-1)).abs().max() < 0.1
    assert reference.sum(-1).max() < -100  # a real test: these cells' likelihoods are far from 0


def test_ate_is_finite_including_one_cell_labels(extreme_model, extreme):
    model, _ = extreme_model
    _, _, combination, _ = extreme
    for basal in ("prior", "control"):
        ate = model.estimate_ate(n_samples=200, n_posterior_draws=10, basal=basal, progress_bar=False)
        assert ONE_CELL in ate.obs_names and combination in ate.obs_names
        assert ate.obs.loc[ONE_CELL, "n_cells"] == 1 and ate.obs.loc[combination, "n_cells"] == 1
        for values in (ate.X, *ate.layers.values()):
            assert np.isfinite(values).all()
        assert (ate.layers["ci_lower"] <= ate.layers["ci_upper"]).all()
    # the median library of these cells, and a library as large as the 10^5-UMI cells'
    for library_size in ("median", float(HIGH_UMI)):
        ate = model.estimate_ate(
            [ONE_CELL, combination], n_samples=200, n_posterior_draws=10, library_size=library_size, progress_bar=False
        )
        assert np.isfinite(ate.X).all() and np.isfinite(ate.layers["posterior_sd"]).all()


def test_predictions_are_finite_from_extreme_source_cells(extreme_model, extreme):
    model, _ = extreme_model
    _, cells, combination, _ = extreme
    labels = [ONE_CELL, combination, "control"]
    normalized = model.predict_perturbation(labels, n_samples=5, progress_bar=False)
    assert np.isfinite(normalized.X).all() and (normalized.X >= 0).all()
    np.testing.assert_allclose(normalized.X.sum(1), 1e4, rtol=1e-3)
    source = cells["extreme"]
    counts = model.predict_perturbation(labels, indices=source, expression="counts", n_samples=5, progress_bar=False)
    assert np.isfinite(counts.X).all() and (counts.X >= 0).all() and np.array_equal(counts.X, np.round(counts.X))
    # drawn at the source cell's own library: the empty cell predicts no counts, the 10^5-UMI cells ~10^5
    totals = counts.X.sum(1).reshape(len(source), len(labels))
    assert (totals[source == cells["empty"][0]] == 0).all()
    high = np.isin(source, cells["high"])
    assert 0.5 * HIGH_UMI < np.median(totals[high]) < 2 * HIGH_UMI
    log1p = model.predict_perturbation(labels, indices=source, expression="log1p", n_samples=5, progress_bar=False)
    assert np.isfinite(log1p.X).all() and (log1p.X >= 0).all()
    expression = model.get_normalized_expression(indices=source, library_size="latent", n_samples=3)
    assert np.isfinite(np.asarray(expression)).all()


def test_all_zero_genes_are_predicted_near_zero(extreme_model, extreme):
    model, _ = extreme_model
    _, _, combination, zero_genes = extreme
    others = np.setdiff1d(np.arange(model.module.n_input), zero_genes)
    normalized = model.predict_perturbation([ONE_CELL, combination, "control"], n_samples=5, progress_bar=False)
    zero = normalized.X[:, zero_genes]
    assert np.isfinite(zero).all()
    # these genes were the most expressed before being zeroed (hundreds per 10^4); now a small fraction of a count
    assert zero.max() < 3.0 and zero.mean() < 0.01 * np.median(normalized.X[:, others])
    # ATEs of genes that are never expressed stay small: an 8-epoch model has not switched them off completely, so
    # their tiny predicted expression still moves a little with the perturbation (up to ~0.27 log2 units seen)
    ate = model.estimate_ate(n_samples=200, n_posterior_draws=10, progress_bar=False)
    assert np.abs(ate.X[:, zero_genes]).max() < 0.5 < np.abs(ate.X[:, others]).max()


def test_csr_float32_reference_is_finite(models, extreme):
    _, cells, combination, _ = extreme
    model = models["reference"]
    _all_finite(model.history)
    assert np.isfinite(model.get_latent()).all()
    assert np.isfinite(model.get_marginal_ll(indices=cells["extreme"], n_mc_samples=10, return_mean=False)).all()
    ate = model.estimate_ate(n_samples=200, n_posterior_draws=10, progress_bar=False)
    assert np.isfinite(ate.X).all() and ONE_CELL in ate.obs_names
    assert np.isfinite(model.predict_perturbation([ONE_CELL, combination], n_samples=5, progress_bar=False).X).all()


@pytest.mark.parametrize("storage", list(STORAGES))
def test_storage_of_the_counts_changes_nothing(storage, models, extreme):
    _, cells, combination, _ = extreme
    model = models[storage]
    _all_finite(model.history)
    reference = models["reference"]
    np.testing.assert_allclose(
        model.history["elbo_train"].to_numpy(dtype=float), reference.history["elbo_train"].to_numpy(dtype=float)
    )
    latent = model.get_latent()
    assert np.isfinite(latent).all()
    np.testing.assert_allclose(latent, reference.get_latent(), atol=1e-5)
    marginal = model.get_marginal_ll(indices=cells["extreme"], n_mc_samples=10, return_mean=False)
    assert np.isfinite(marginal).all()
    ate = model.estimate_ate([ONE_CELL, combination, "MYC"], n_samples=200, n_posterior_draws=10, progress_bar=False)
    assert np.isfinite(ate.X).all()
    predicted = model.predict_perturbation([ONE_CELL, combination], n_samples=5, progress_bar=False)
    assert np.isfinite(predicted.X).all()


def test_normal_likelihood_on_log_normalised_float64(models, extreme):
    _, cells, combination, zero_genes = extreme
    model, adata = models["normal"]
    assert adata.X.dtype == np.float64
    _all_finite(model.history)
    assert np.isfinite(model.get_latent()).all()
    assert np.isfinite(model.get_marginal_ll(indices=cells["extreme"], n_mc_samples=10, return_mean=False)).all()
    ate = model.estimate_ate(n_samples=200, n_posterior_draws=10, progress_bar=False)
    assert np.isfinite(ate.X).all() and ONE_CELL in ate.obs_names and combination in ate.obs_names
    predicted = model.predict_perturbation([ONE_CELL, combination, "control"], n_samples=5, progress_bar=False)
    assert np.isfinite(predicted.X).all()
    # the genes without counts are 0 in every cell: their decoded mean is near 0 on the data's scale, where an
    # expressed gene averages ~2.5
    assert np.abs(predicted.X[:, zero_genes]).max() < 0.5 < adata.X.mean()
