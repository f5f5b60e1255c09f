"""SAMSVAE end to end on the bundled real TAP-seq screen."""

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import sams_scvi

from ..conftest import TRAIN_KW


def singles_of(adata):
    labels = adata.obs["perturbation"].astype(str)
    return sorted(set(labels[~labels.str.contains("+", regex=False) & (labels != "control")]))


@pytest.mark.slow
def test_training_improves_elbo(trained_tapseq):
    model, _ = trained_tapseq
    train = model.history["elbo_train"]["elbo_train"].to_numpy()
    val = model.history["elbo_validation"]["elbo_validation"].to_numpy()
    assert train[-1] < train[0] - 5  # negative ELBO per cell, in nats
    assert val[-1] < val[0]
    assert np.isfinite(model.get_elbo(indices=np.arange(200)))
    assert model.history["kl_weight"]["kl_weight"].to_numpy().min() == 1.0  # no KL warm-up


@pytest.mark.slow
def test_iwelbo_bounds_elbo(trained_tapseq):
    model, _ = trained_tapseq
    cells = model.validation_indices[:300]
    iwelbo = model.get_marginal_ll(indices=cells, n_mc_samples=50)
    per_cell = model.get_marginal_ll(indices=cells, n_mc_samples=50, return_mean=False)
    assert per_cell.shape == (len(cells),)
    assert np.isclose(per_cell.mean(), iwelbo)
    chunked = model.get_marginal_ll(indices=cells, n_mc_samples=50, n_samples_per_pass=7)
    assert abs(chunked - iwelbo) < 1.0  # same estimator, different Monte-Carlo draws
    reconstruction = model.get_reconstruction_error(indices=cells)["reconstruction_loss"]
    assert iwelbo < -float(reconstruction) + 1.0  # sanity: the basal KL keeps the bound below E[log p(x | z)]
    # IWELBO >= ELBO on the same cells with the same globals (the ELBO adds the global KL on top)
    assert iwelbo >= model.get_elbo(indices=cells, n_samples=50)


@pytest.mark.slow
def test_latents(trained_tapseq):
    model, adata = trained_tapseq
    basal = model.get_latent()
    perturbed = model.get_latent(representation="perturbed")
    assert basal.shape == perturbed.shape == (adata.n_obs, 16)
    assert np.all(np.isfinite(basal))
    controls = np.flatnonzero(adata.obs["perturbation"].astype(str) == "control")
    np.testing.assert_allclose(basal[controls], perturbed[controls])
    np.testing.assert_allclose(model.get_latent_representation(indices=controls[:5]), basal[controls[:5]], atol=1e-5)
    with pytest.raises(ValueError, match="representation"):
        model.get_latent(representation="after")
    # the latent space drops into an ordinary scanpy workflow
    latent = sc.AnnData(basal[:500])
    sc.pp.neighbors(latent, use_rep="X")
    assert latent.obsp["connectivities"].shape == (500, 500)


@pytest.mark.slow
def test_predict_perturbation(trained_tapseq):
    model, adata = trained_tapseq
    obs_before, x_before = adata.obs.copy(), adata.X.copy()
    sources = np.flatnonzero(adata.obs["perturbation"].astype(str) == "control")[:20]
    labels = ["control", "CPQ", "CPQ+FAM83A", "GATA1+MYC"]
    pred = model.predict_perturbation(labels, indices=sources, n_samples=5, progress_bar=False)
    assert pred.shape == (20 * 4, adata.n_vars)
    assert list(pred.var_names) == list(adata.var_names)
    assert list(pred.obs["perturbation"][:4]) == labels
    assert pred.obs_names[1] == f"{adata.obs_names[sources[0]]}_CPQ"
    assert pred.obs["source_cell"].iloc[0] == adata.obs_names[sources[0]]
    assert pred.uns["sams_scvi"]["control_value"] == "control" and pred.uns["sams_scvi"]["delimiter"] == "+"
    assert np.all(np.isfinite(pred.X)) and np.all(pred.X >= 0)
    np.testing.assert_allclose(pred.X.sum(1), 1e4, rtol=1e-4)
    # the counterfactual moves each gene the way the model's ATE does, for the perturbation it learned best
    ate = model.estimate_ate(singles_of(adata), n_samples=300, progress_bar=False).to_df()
    label, gene = ate.abs().stack().idxmax()
    assert abs(ate.loc[label, gene]) > 0.3
    pred = model.predict_perturbation(["control", label], indices=sources, n_samples=5, progress_bar=False)
    shift = (
        pred[pred.obs["perturbation"] == label, gene].X.mean()
        - pred[pred.obs["perturbation"] == "control", gene].X.mean()
    )
    assert np.sign(shift) == np.sign(ate.loc[label, gene])
    counts = model.predict_perturbation(["CPQ"], indices=sources, expression="counts", progress_bar=False)
    assert np.all(counts.X % 1 == 0)
    # the user's data is untouched
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    assert (adata.X != x_before).nnz == 0
    with pytest.raises(ValueError, match="'NOTAGENE'"):
        model.predict_perturbation(["NOTAGENE"], indices=sources, progress_bar=False)


@pytest.mark.slow
def test_ate_does_not_depend_on_the_chunking(trained_tapseq):
    """Small chunks (several per block of globals, the last one partial) estimate the same ATE."""
    model, _ = trained_tapseq
    labels = ["CPQ", "CPQ+GATA1"]
    whole = model.estimate_ate(labels, n_samples=400, progress_bar=False)
    chunked = model.estimate_ate(labels, n_samples=400, batch_size=3, seed=1, progress_bar=False)
    assert not np.array_equal(whole.X, chunked.X)  # other random numbers ...
    se = np.sqrt(whole.layers["mc_se"] ** 2 + chunked.layers["mc_se"] ** 2) + 1e-12
    assert np.mean(np.abs(whole.X - chunked.X) / se < 3.5) > 0.98  # ... the same estimate


@pytest.mark.slow
def test_ate_block_memory_cap_and_sparse_contrasts(trained_tapseq, monkeypatch):
    """Blocks capped to one posterior draw (as for a genome-wide screen) estimate the same ATE; a contrast matrix
    equal to the identity gives exactly the ATEs themselves."""
    from sams_scvi.model import _ate

    model, _ = trained_tapseq
    labels = ["CPQ", "CPQ+GATA1", "GATA1"]
    args = (100, 10, 1e4, "prior", 512, 0, False)  # n_samples, draws, library, basal, batch_size, seed, bar
    plain = model._ate_posterior(labels, None, *args)
    identity = model._ate_posterior(labels, np.eye(3), *args)
    for key in ("ate", "mc_se", "posterior_sd"):
        np.testing.assert_allclose(identity[key], plain[key], rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(_ate, "ATE_BLOCK_BYTES", 1)
    capped = model._ate_posterior(labels, None, *args)
    assert not np.array_equal(capped["ate"], plain["ate"])  # blocks of one draw use the random numbers otherwise
    se = np.sqrt(plain["mc_se"] ** 2 + capped["mc_se"] ** 2) + 1e-12
    assert np.mean(np.abs(plain["ate"] - capped["ate"]) / se < 3.5) > 0.98


@pytest.mark.slow
def test_estimate_ate_against_data(trained_tapseq):
    model, adata = trained_tapseq
    ate = model.estimate_ate(n_samples=500, progress_bar=False)
    state = model.adata_manager.get_state_registry("perturbation")
    assert list(ate.obs_names) == list(state["observed_labels"])
    assert list(ate.var_names) == list(adata.var_names)
    assert ate.uns["control"] == "control"
    assert np.all(np.isfinite(ate.X)) and np.all(ate.layers["mc_se"] >= 0)
    assert ate.obs.loc["CPQ", "n_cells"] == (adata.obs["perturbation"] == "CPQ").sum()

    observed = sams_scvi.metrics.observed_ate(adata)
    singles = singles_of(adata)
    assert sams_scvi.metrics.ate_pearson(ate, observed, perturbations=singles) > 0.2

    seen = set(adata.obs["perturbation"].astype(str))
    pair = next(
        f"{a}+{b}" for a in model.perturbations for b in model.perturbations if a < b and f"{a}+{b}" not in seen
    )
    unseen = model.estimate_ate([pair, "STK3"], n_samples=200, library_size="median", progress_bar=False)
    assert list(unseen.obs_names) == [pair, "STK3"] and unseen.obs.loc[pair, "n_cells"] == 0
    assert np.all(np.isfinite(unseen.X))
    with pytest.raises(ValueError, match="'XYZ'"):
        model.estimate_ate(["XYZ"], progress_bar=False)


def test_save_load_roundtrip(trained_tapseq, tmp_path):
    model, adata = trained_tapseq
    model.save(tmp_path / "model", save_anndata=False)
    loaded = sams_scvi.SAMSVAE.load(tmp_path / "model", adata=adata)
    np.testing.assert_allclose(loaded.get_latent(), model.get_latent(), rtol=1e-5, atol=1e-6)
    a = model.estimate_ate(["CPQ", "CPQ+GATA1"], n_samples=100, seed=3, progress_bar=False)
    b = loaded.estimate_ate(["CPQ", "CPQ+GATA1"], n_samples=100, seed=3, progress_bar=False)
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)

    new = adata.copy()
    new.var_names = [f"gene{i}" for i in range(new.n_vars)]
    with pytest.raises(ValueError, match="genes"):
        sams_scvi.SAMSVAE.load(tmp_path / "model", adata=new)
    with pytest.raises(ValueError, match="genes"):
        sams_scvi.SAMSVAE.load(tmp_path / "model", adata=adata[:, :10].copy())


@pytest.mark.slow
def test_transfer_to_new_anndata(trained_tapseq):
    model, adata = trained_tapseq
    new = adata[:50].copy()
    new.obs["perturbation"] = ["CPQ+GATA1"] * 25 + ["control"] * 25
    z = model.get_latent(new)
    assert z.shape == (50, 16)
    unknown = adata[:5].copy()
    unknown.obs["perturbation"] = "UNKNOWN"
    with pytest.raises(ValueError, match="UNKNOWN"):
        model.get_latent(unknown)


def test_no_control_cells(tapseq):
    adata = tapseq[tapseq.obs["perturbation"].astype(str) != "control"].copy()
    with pytest.warns(UserWarning, match="control"):
        sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, **TRAIN_KW)
    with pytest.raises(ValueError, match="control cells"):
        model.estimate_ate(progress_bar=False)


def test_batch_covariates_and_mudata(tapseq):
    adata = tapseq[:1500].copy()
    adata.obs["replicate"] = np.where(np.arange(adata.n_obs) % 2, "r1", "r2")
    mdata = md.MuData({"rna": adata})
    mdata.obs["perturbation"] = adata.obs["perturbation"].astype(str).to_numpy()
    mdata.obs["replicate"] = adata.obs["replicate"].to_numpy()
    sams_scvi.SAMSVAE.setup_mudata(
        mdata, perturbation_key="perturbation", batch_key="replicate", modalities={"rna_layer": "rna"}
    )
    model = sams_scvi.SAMSVAE(mdata, n_latent=4, n_hidden=16)
    assert model.module.decoder_covariates.n_cats_per_cov == [2]
    model.train(max_epochs=2, **TRAIN_KW)
    assert model.get_latent().shape == (1500, 4)
    ate = model.estimate_ate(["CPQ"], n_samples=50, progress_bar=False)
    assert ate.shape == (1, adata.n_vars) and np.all(np.isfinite(ate.X))
    pred = model.predict_perturbation(["CPQ"], progress_bar=False, n_samples=2)
    assert pred.n_vars == adata.n_vars


def test_mudata_with_a_second_modality_de_and_evaluate(tapseq):
    adata = tapseq[:900].copy()
    protein = ad.AnnData(np.random.default_rng(0).poisson(5, (adata.n_obs, 10)).astype(np.float32))
    protein.obs_names = adata.obs_names
    mdata = md.MuData({"rna": adata, "protein": protein})
    mdata.obs["perturbation"] = adata.obs["perturbation"].astype(str).to_numpy()
    sams_scvi.SAMSVAE.setup_mudata(mdata, perturbation_key="perturbation", modalities={"rna_layer": "rna"})
    model = sams_scvi.SAMSVAE(mdata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, **TRAIN_KW)

    de = model.differential_expression(groupby="perturbation", group1="GATA1", batch_size=256, silent=True)
    assert sorted(de.index) == sorted(adata.var_names)  # the RNA genes, not every modality's features
    assert np.isfinite(de["bayes_factor"]).all()
    assert not [c for c in mdata.obs.columns if c.startswith("_scvi_raw")]  # scvi-tools' scratch column removed

    split = [np.arange(0, 600), np.arange(600, 750), np.arange(750, 900)]
    scores = sams_scvi.evaluate(model, mdata, split, n_ate_samples=20, n_iwelbo_samples=2, progress_bar=False)
    assert np.isfinite(scores.loc["test", "iwelbo"]) and scores.loc["test", "n_perturbations"] > 0
    # the data-side numbers are those of the RNA modality's AnnData
    on_mudata = sams_scvi.evaluate("additive", mdata, split, progress_bar=False)
    on_rna = sams_scvi.evaluate("additive", adata, split, progress_bar=False)
    pd.testing.assert_frame_equal(on_mudata, on_rna)


def test_ate_chunks_cover_every_sample_with_its_covariates(tapseq, monkeypatch):
    """Draws of the globals split into chunks and halves: every sample decoded and accumulated once, aligned."""
    adata = tapseq[:600].copy()
    adata.obs["replicate"] = np.where(np.arange(adata.n_obs) % 2, "r1", "r2")
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", batch_key="replicate")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    model.module.eval()
    model.is_trained_ = True
    decoded, accumulated = [], []
    likelihoods = sams_scvi.module._likelihoods
    generative, accumulate = model.module.generative, likelihoods.accumulate_log_normalized

    def recording_generative(z, library, covariates=None, design=None):
        decoded.append((z.shape[:2], library.shape, covariates.shape[:2]))
        return generative(z, library, covariates, design=design)

    def recording_accumulate(mu, *args):
        accumulated.append(mu.shape[0])
        return accumulate(mu, *args)

    monkeypatch.setattr(model.module, "generative", recording_generative)
    monkeypatch.setattr(likelihoods, "accumulate_log_normalized", recording_accumulate)
    ate = model.estimate_ate(["CPQ", "STK3"], n_samples=24, n_posterior_draws=4, batch_size=4, progress_bar=False)
    # 4 draws of 6 samples (halves of 3), one draw per block, chunks of at most 4: decoded 4 + 2 per draw; the
    # first chunk holds the first half (3) and one sample of the second, the second chunk the rest of it (2)
    assert [shapes[0] for shapes in decoded] == [(4, 3), (2, 3)] * 4  # control + 2 labels
    assert accumulated == [3, 1, 2] * 4
    assert ate.uns["n_samples"] == 24 and ate.uns["n_posterior_draws"] == 4
    assert all(z == library == covariates for z, library, covariates in decoded)
    assert np.all(np.isfinite(ate.X))


def test_mean_field_variants_train(tapseq):
    adata = tapseq[:1000].copy()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16, guide="mean_field", mean_field_encoder=True)
    model.train(max_epochs=2, **TRAIN_KW)
    assert np.all(np.isfinite(model.get_latent()))
    assert model.get_perturbation_embeddings().shape == (len(model.perturbations), 4)


def test_evaluate_model_and_baselines_on_a_combination_split(tapseq):
    adata = tapseq.copy()
    split = sams_scvi.metrics.combination_split(adata, 0.5, seed=0)
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=8, n_hidden=64)
    model.train(max_epochs=3, datasplitter_kwargs={"external_indexing": split}, **TRAIN_KW)
    np.testing.assert_array_equal(np.sort(model.test_indices), split[2])

    table = sams_scvi.evaluate(model, adata, n_ate_samples=100, n_iwelbo_samples=10, progress_bar=False)
    assert list(table.index) == ["train", "validation", "test", "all"]
    assert table.loc["test", "n_cells"] == len(split[2])
    assert np.all(np.isfinite(table[["iwelbo", "pearson", "r2", "pearson_top20"]].to_numpy(dtype=float)))
    test_labels = set(adata.obs["perturbation"].iloc[split[2]])
    assert table.loc["test", "n_perturbations"] == len(test_labels)

    additive = sams_scvi.evaluate("additive", adata, split, subsets=["test"], progress_bar=False)
    assert np.isnan(additive.loc["test", "iwelbo"]) and np.isfinite(additive.loc["test", "pearson"])
    zero = sams_scvi.evaluate("control", adata, split, subsets=["test"], progress_bar=False)
    assert zero.loc["test", "direction_agreement_top20"] == 0.0
    with pytest.raises(ValueError, match="no test cells"):
        sams_scvi.evaluate("additive", adata, [split[0], split[1], []], progress_bar=False)
    with pytest.raises(ValueError, match="needs `split`"):
        sams_scvi.evaluate("additive", adata)


@pytest.mark.slow
@pytest.mark.default_batch
def test_default_training_length(tapseq, monkeypatch):
    """train() without max_epochs or batch_size gives a typical perturbation ~4,000 updates at any screen size."""
    from scvi.model.base import UnsupervisedTrainingMixin

    from sams_scvi.model import default_batch_size, default_max_epochs, updates_per_epoch

    # a 3,000-cell arrayed screen: 22 steps of 128 cells per epoch, 98.7 % of which hold a given perturbation
    assert default_batch_size(2_700) == 128 and default_batch_size(9_000) == 512 and default_batch_size(5_000) == 256
    assert updates_per_epoch(2_700, 128, 90) == pytest.approx(22 * (1 - (1 - 90 / 2_700) ** 128))
    assert default_max_epochs(2_700, 128, 90) == 185
    # 10^6 cells, 722 perturbations: a minibatch holds a given one half of the time; capped at 8 epochs
    per_epoch = updates_per_epoch(900_000, 512, 1_246)
    assert 0.45 < per_epoch / 1_758 < 0.55
    assert default_max_epochs(900_000, 512, 1_246) == 5
    assert default_max_epochs(900_000, 512, 50) == 8 and default_max_epochs(10**8, 512, 10) == 1
    adata = tapseq[:300].copy()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=2, n_hidden=8)
    seen = {}
    monkeypatch.setattr(
        UnsupervisedTrainingMixin,
        "train",
        lambda self, max_epochs=None, batch_size=None, **kw: seen.update(e=max_epochs, b=batch_size),
    )
    model.train()
    counts = np.asarray((model.adata_manager.get_from_registry("perturbation") != 0).sum(0)).ravel()
    typical = np.median(counts[counts > 0]) * 270 / 300
    assert seen == {"e": default_max_epochs(270, 128, typical), "b": 128}
    model.train(max_epochs=7, batch_size=64)
    assert seen == {"e": 7, "b": 64}
