import numpy as np
import pytest
import torch
from scipy import sparse

import sams_scvi
from sams_scvi.model import MinifiedDataError

from ..conftest import TRAIN_KW


def _without(adata, target):
    carries = adata.obs["perturbation"].astype(str).str.split("+").apply(lambda atoms: target in atoms).to_numpy()
    return adata[~carries].copy(), adata[carries].copy()


@pytest.fixture(scope="module")
def reference_and_new(tapseq):
    reference_cells, new_cells = _without(tapseq[:2500], "GATA1")
    sams_scvi.SAMSVAE.setup_anndata(reference_cells, perturbation_key="perturbation")
    reference = sams_scvi.SAMSVAE(reference_cells, n_latent=6, n_hidden=32)
    reference.train(max_epochs=3, **TRAIN_KW)
    return reference, new_cells


def _assert_reference_kept(reference, model):
    new_state = model.module.state_dict()
    for name, value in reference.module.state_dict().items():
        if name == "train_perturbation_counts":
            continue
        kept = new_state[name][tuple(slice(0, n) for n in value.shape)]
        assert torch.equal(kept, value), name


def test_new_perturbations_need_fine_tuning(reference_and_new):
    reference, new_cells = reference_and_new
    with pytest.raises(ValueError, match=r"not trained on \(\['GATA1'\]\).*unfrozen=True"):
        sams_scvi.SAMSVAE.load_query_data(new_cells.copy(), reference)


def test_fine_tuned_query_with_a_new_perturbation_saves_and_loads(reference_and_new, tmp_path):
    reference, new_cells = reference_and_new
    known = list(reference.perturbations)
    tuned = sams_scvi.SAMSVAE.load_query_data(new_cells.copy(), reference, unfrozen=True)
    assert tuned.perturbations == [*known, "GATA1"] and reference.perturbations == known
    tuned.train(max_epochs=2, **TRAIN_KW)
    counts = tuned.module.train_perturbation_counts
    assert counts[-1] > 0 and torch.all(counts[:-1] >= reference.module.train_perturbation_counts)
    # the query has no control cells; the reference's defined the unperturbed state, and loading keeps that
    tuned.save(tmp_path / "tuned", save_anndata=True)
    loaded = sams_scvi.SAMSVAE.load(tmp_path / "tuned")
    ate = loaded.estimate_ate(["GATA1", f"GATA1+{known[0]}"], n_samples=10, progress_bar=False)
    assert ate.shape == (2, reference.module.n_input) and np.isfinite(ate.X).all()


def test_query_with_a_new_batch_trains_only_its_row(tapseq):
    cells = tapseq[:1800].copy()
    cells.obs["replicate"] = np.where(
        np.arange(cells.n_obs) < 1200, np.where(np.arange(cells.n_obs) % 2, "r1", "r2"), "r3"
    )
    reference_cells = cells[:1200].copy()
    sams_scvi.SAMSVAE.setup_anndata(reference_cells, perturbation_key="perturbation", batch_key="replicate")
    reference = sams_scvi.SAMSVAE(reference_cells, n_latent=6, n_hidden=32)
    reference.train(max_epochs=2, **TRAIN_KW)

    query = cells[1200:].copy()
    mapped = sams_scvi.SAMSVAE.load_query_data(query, reference)
    assert mapped.module.decoder_covariates.n_cats_per_cov == [3]
    start = mapped.module.decoder_covariates.embeddings[0].weight.detach().clone()
    mapped.train(max_epochs=3, **TRAIN_KW)
    rows = mapped.module.decoder_covariates.embeddings[0].weight.detach()
    assert torch.equal(rows[:2], start[:2]) and not torch.equal(rows[2], start[2])
    _assert_reference_kept(reference, mapped)
    assert mapped.get_latent().shape == (query.n_obs, 6)

    # a query from an unrelated registration is refused with the fix
    with pytest.raises(ValueError, match="prepare_query_anndata"):
        sams_scvi.SAMSVAE.load_query_data(query[:, ::-1].copy(), reference)


def test_prepare_query_anndata_orders_and_pads_genes_without_touching_the_input(reference_and_new):
    reference, new_cells = reference_and_new
    genes = list(reference.adata.var_names)
    query = new_cells[:, genes[::-1][:-2]].copy()  # reversed, last two reference genes missing
    query.X = sparse.csr_matrix(query.X)
    sams_scvi.SAMSVAE.setup_anndata(query, perturbation_key="perturbation")  # a registration of its own genes
    original = query.copy()
    with pytest.warns(UserWarning, match="2 of the reference's"):
        prepared = sams_scvi.SAMSVAE.prepare_query_anndata(query, reference)
    assert list(prepared.var_names) == genes
    assert not [c for c in [*prepared.obs.columns, *prepared.obsm] if c.startswith("_scvi_")]  # query was registered
    assert prepared[:, genes[0]].X.sum() == 0 and prepared[:, genes[1]].X.sum() == 0
    np.testing.assert_array_equal(prepared[:, genes[5]].X.toarray(), original[:, genes[5]].X.toarray())
    assert list(query.var_names) == list(original.var_names) and set(query.uns) == set(original.uns)
    np.testing.assert_array_equal(query.X.toarray(), original.X.toarray())
    assert list(sams_scvi.SAMSVAE.prepare_query_anndata(query, reference, return_reference_var_names=True)) == genes


def test_query_without_anything_new_is_ready_to_use(reference_and_new):
    reference, _ = reference_and_new
    query = reference.adata[:300].copy()
    with pytest.warns(UserWarning, match="nothing to train"):
        mapped = sams_scvi.SAMSVAE.load_query_data(query, reference)
    assert mapped.is_trained_
    np.testing.assert_allclose(mapped.get_latent(), reference.get_latent(query), rtol=1e-5, atol=1e-6)
    unfrozen = sams_scvi.SAMSVAE.load_query_data(query, reference, unfrozen=True)
    unfrozen.train(max_epochs=1, **TRAIN_KW)
    assert not torch.equal(unfrozen.module.decoder_head.weight, reference.module.decoder_head.weight)
    counts = unfrozen.module.train_perturbation_counts
    assert torch.all(counts >= reference.module.train_perturbation_counts)  # the reference's counts kept


def test_add_perturbations_replays_training_cells_and_leaves_the_reference(reference_and_new, tmp_path):
    reference, new_cells = reference_and_new
    state = {name: value.clone() for name, value in reference.module.state_dict().items()}
    obs = new_cells.obs.copy()
    added = reference.add_perturbations(new_cells, max_epochs=2, **TRAIN_KW)
    assert added.perturbations == [*reference.perturbations, "GATA1"]
    assert added.adata.n_obs == min(11 * new_cells.n_obs, 2500)  # ten replayed training cells per new one
    assert added.adata is not reference.adata and reference.adata.n_obs == 2500 - new_cells.n_obs
    for name, value in reference.module.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert new_cells.obs.equals(obs) and "_scvi_batch" not in new_cells.obs
    # each perturbation counts its training cells once: the reference's, plus the new cells that carry it
    counts, before = added.module.train_perturbation_counts, reference.module.train_perturbation_counts
    assert counts[-1] == round(0.9 * new_cells.n_obs)  # every new cell carries GATA1
    carried = new_cells.obs["perturbation"].astype(str).str.split("+").explode().value_counts()
    extra = (counts[:-1] - before).numpy()
    assert np.all(extra >= 0) and np.all(extra <= carried.reindex(reference.perturbations).fillna(0).to_numpy())
    ate = added.estimate_ate(["GATA1", f"GATA1+{reference.perturbations[0]}"], n_samples=10, progress_bar=False)
    assert np.isfinite(ate.X).all()
    assert reference.add_perturbations(new_cells, replay_cells=0, max_epochs=1, **TRAIN_KW).adata.n_obs == (
        new_cells.n_obs
    )


def test_add_perturbations_refuses_what_it_cannot_do(reference_and_new, tmp_path):
    reference, new_cells = reference_and_new
    with pytest.raises(ValueError, match="no perturbation the model was not trained on"):
        reference.add_perturbations(reference.adata[:100].copy(), max_epochs=1, **TRAIN_KW)
    with pytest.raises(ValueError, match="splits the cells itself"):
        reference.add_perturbations(new_cells, datasplitter_kwargs={}, **TRAIN_KW)
    reference.save(tmp_path / "reference")
    without_data = sams_scvi.SAMSVAE.load(tmp_path / "reference", adata=False)
    with pytest.raises(ValueError, match="no data to replay"):
        without_data.add_perturbations(new_cells)
    light = sams_scvi.SAMSVAE.load(tmp_path / "reference", adata=reference.adata.copy())
    light.minify_adata()
    with pytest.raises(MinifiedDataError, match="replays the model's training counts"):
        light.add_perturbations(new_cells)


@pytest.mark.slow
def test_added_perturbation_predicts_its_knockdown(tapseq):
    """On TAP-seq each target is a measured gene: an added target's predicted effect must knock its own gene down."""
    reference_cells, new_cells = _without(tapseq[:3000], "GATA1")
    sams_scvi.SAMSVAE.setup_anndata(reference_cells, perturbation_key="perturbation")
    reference = sams_scvi.SAMSVAE(reference_cells)
    reference.train(max_epochs=40, **TRAIN_KW)
    added = reference.add_perturbations(new_cells, **TRAIN_KW)
    singles = new_cells[new_cells.obs["perturbation"].astype(str) == "GATA1"]
    observed = sams_scvi.metrics.observed_ate(
        sams_scvi.data.schraivogel2020_tapseq()[3000:], perturbations=["GATA1"]
    ).to_df()
    predicted = added.estimate_ate(["GATA1"], progress_bar=False).to_df()
    r = np.corrcoef(predicted.loc["GATA1"], observed.loc["GATA1"])[0, 1]
    assert singles.n_obs > 20 and predicted.loc["GATA1", "GATA1"] < 0.25 * observed.loc["GATA1", "GATA1"] < 0
    assert r > 0.5
