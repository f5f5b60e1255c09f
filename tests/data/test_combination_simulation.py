import numpy as np
import pytest

import sams_scvi


def test_combination_screen_holds_out_doubles_whose_singles_it_has():
    adata = sams_scvi.data.simulate_combinations(n_test_cells_per_double=50, n_test_control_cells=200, seed=3)
    truth = adata.uns["simulation"]
    labels = adata.obs["perturbation"].astype(str)
    screen, test = labels[adata.obs["split"] == "screen"], labels[adata.obs["split"] == "test"]
    held_out = truth["held_out_doubles"]
    assert len(held_out) == 5 and len(truth["screen_doubles"]) == 8
    assert set(test) == {"control", *held_out} and not set(held_out) & set(screen)
    assert all(single in set(screen) for double in held_out for single in double.split("+"))
    assert (screen == "control").sum() == 900 and (screen == "g0").sum() == 100 and (test == held_out[0]).sum() == 50
    assert adata.n_vars == 299 and np.all(adata.X.data == np.round(adata.X.data))
    # a double's effect is its singles' scaled, plus an interaction that is not
    a, b = held_out[0].split("+")
    effects = truth["log_fold_change"]
    coefficients, residual, *_ = np.linalg.lstsq(effects.loc[[a, b]].T, effects.loc[held_out[0]], rcond=None)
    assert np.all(coefficients > 0) and residual[0] > 0
    # the same seed, the same screen
    again = sams_scvi.data.simulate_combinations(n_test_cells_per_double=50, n_test_control_cells=200, seed=3)
    assert (again.X != adata.X).nnz == 0


def test_combination_screen_refuses_more_doubles_than_pairs():
    with pytest.raises(ValueError, match="distinct doubles"):
        sams_scvi.data.simulate_combinations(n_singles=4, n_screen_doubles=5, n_held_out_doubles=2)
