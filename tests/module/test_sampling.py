"""The compiled negative-binomial sampler: each stage against its exact distribution, seeding, and the ATE sums."""

import numba
import numpy as np
import pytest
import torch
from scipy import stats

from sams_scvi.module import _sampling
from sams_scvi.module._sampling import accumulate_log_normalized, sample_negative_binomial

N_DRAWS = 60_000


@numba.njit
def _ziggurat_draws(exponential, n, seed, tables):
    """``n`` standard normals (or exponentials) from one stream."""
    out = np.empty(n)
    s0, s1 = _sampling._row_state(seed, 0)
    for i in range(n):
        if exponential:
            out[i], s0, s1 = _sampling._exponential(s0, s1, tables)
        else:
            out[i], s0, s1 = _sampling._normal(s0, s1, tables)
    return out


@numba.njit
def _poissons(rate, n, seed, tables):
    out = np.empty(n)
    s0, s1 = _sampling._row_state(seed, 0)
    for i in range(n):
        spare, s0, s1 = _sampling._uniform(s0, s1)
        out[i], s0, s1 = _sampling._poisson(rate, spare, s0, s1, tables)
    return out


@numba.njit
def _gammas_with_spares(d, c, n, seed, tables):
    out = np.empty((n, 2))
    s0, s1 = _sampling._row_state(seed, 0)
    for i in range(n):
        out[i, 0], out[i, 1], s0, s1 = _sampling._gamma_unit(d, c, s0, s1, tables)
    return out


def _chi_square_pvalue(draws: np.ndarray, pmf) -> float:
    """Goodness of fit of integer draws to ``pmf``, merging categories until each expects at least 20 draws."""
    top = int(draws.max())
    observed = np.bincount(draws.astype(np.int64), minlength=top + 1).astype(float)
    expected = pmf(np.arange(top + 1)) * draws.size
    expected[-1] += draws.size - expected.sum()  # the upper tail joins the last category
    bins_obs, bins_exp, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed, expected, strict=True):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 20:
            bins_obs.append(acc_o)
            bins_exp.append(acc_e)
            acc_o = acc_e = 0.0
    bins_obs[-1] += acc_o
    bins_exp[-1] += acc_e
    assert len(bins_obs) >= 2
    return stats.chisquare(bins_obs, bins_exp).pvalue


def test_ziggurat_normal_is_standard_normal():
    draws = _ziggurat_draws(False, 200_000, 1, _sampling._TABLES)
    assert stats.kstest(draws, "norm").pvalue > 1e-3
    # the tail beyond the ziggurat's base layer (|x| > 3.44) is drawn by a separate branch
    assert abs(np.mean(np.abs(draws) > 3.0) - 2 * stats.norm.sf(3.0)) < 4 * np.sqrt(2 * stats.norm.sf(3.0) / 2e5)


def test_ziggurat_exponential_is_standard_exponential():
    draws = _ziggurat_draws(True, 200_000, 2, _sampling._TABLES)
    assert stats.kstest(draws, "expon").pvalue > 1e-3
    # the tail beyond the ziggurat's base layer (x > 7.70) is drawn by a separate branch
    assert abs(np.mean(draws > 6.0) - np.exp(-6.0)) < 4 * np.sqrt(np.exp(-6.0) / 2e5)


@pytest.mark.parametrize("shape", [0.98, 1.5, 30.0])
def test_gamma_draws_are_gamma_and_their_spare_uniforms_independent(shape):
    """The acceptance uniform is recycled: it must be uniform, also given the Gamma draw it accepted."""
    d = shape - 1.0 / 3.0 if shape >= 1 else shape + 2.0 / 3.0  # theta < 1 is boosted: Gamma(theta + 1) is drawn
    draws = _gammas_with_spares(d, 1.0 / np.sqrt(9.0 * d), 200_000, 3, _sampling._TABLES)
    gamma, spare = draws[:, 0], draws[:, 1]
    assert stats.kstest(gamma, stats.gamma(d + 1.0 / 3.0).cdf).pvalue > 1e-3
    assert stats.kstest(spare, "uniform").pvalue > 1e-3
    low = gamma < np.median(gamma)  # rejection happens mostly at extreme normals: test both halves and the tails
    tails = np.abs(gamma - gamma.mean()) > 2 * gamma.std()
    for part in (low, ~low, tails):
        assert stats.kstest(spare[part], "uniform").pvalue > 1e-3
    assert abs(stats.spearmanr(gamma, spare).statistic) < 4.5 / np.sqrt(gamma.size)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 1.0, 4.7, 31.99, 32.0, 37.5, 2500.0])
def test_poisson_matches_pmf(rate):
    n = 4 * N_DRAWS
    draws = _poissons(rate, n, 7, _sampling._TABLES)
    if rate == 0.0:
        assert np.all(draws == 0)
        return
    assert _chi_square_pvalue(draws, lambda k: stats.poisson.pmf(k, rate)) > 1e-3
    # moments catch small shifts that spread over many categories
    assert abs(draws.mean() - rate) < 4.5 * np.sqrt(rate / n)
    assert abs(draws.var() - rate) < 4.5 * np.sqrt((2 * rate**2 + rate) / n)


@pytest.mark.parametrize(
    ("mu", "theta"),
    [(0.05, 0.4), (3.0, 1.0), (8.4, 1.0), (8.0, 0.5), (25.0, 3.0), (400.0, 20.0), (2000.0, 0.7)],
)
def test_negative_binomial_matches_pmf(mu, theta):
    """Covers boosted shapes (theta < 1), and Poisson rates on both sides of the table/PTRS switch."""
    torch.manual_seed(0)
    draws = sample_negative_binomial(torch.full((N_DRAWS, 1), mu), torch.tensor([theta])).numpy().ravel()
    p = theta / (theta + mu)
    assert _chi_square_pvalue(draws, lambda k: stats.nbinom.pmf(k, theta, p)) > 1e-3
    assert abs(draws.mean() - mu) < 5 * np.sqrt((mu + mu**2 / theta) / N_DRAWS)


def test_sampler_follows_torch_seed_and_not_thread_count():
    mu = torch.rand(64, 50) * 30
    theta = torch.rand(50) * 3 + 0.2
    threads = torch.get_num_threads()
    torch.manual_seed(3)
    first = sample_negative_binomial(mu, theta)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(3)
        single_thread = sample_negative_binomial(mu, theta)
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(4)
    other_seed = sample_negative_binomial(mu, theta)
    assert torch.equal(first, single_thread)
    assert not torch.equal(first, other_seed)
    assert first.shape == mu.shape and first.dtype == mu.dtype
    assert torch.equal(first, first.round()) and (first >= 0).all()


def test_nan_means_give_nan_without_hanging():
    mu = torch.tensor([[1.0, float("nan"), 50.0]])
    draws = sample_negative_binomial(mu, torch.ones(3))
    assert torch.isnan(draws[0, 1]) and not torch.isnan(draws[0, [0, 2]]).any()


def test_accumulated_log_normalized_sums_equal_the_transform_of_the_same_draws():
    """The fused ATE kernel draws row (s, c) from the stream the counts kernel uses for row s C + c, and adds."""
    n_samples, n_conditions, n_genes = 6, 5, 40
    mu = torch.rand(n_samples, n_conditions, n_genes) * 20
    mu[2, 3] = 1e-6  # a row without counts gives zeros
    theta = torch.rand(n_genes) * 2 + 0.3
    target = 1e4
    start_sums = torch.rand(n_conditions, n_genes, dtype=torch.float64)
    sums = start_sums.clone()
    torch.manual_seed(11)
    accumulate_log_normalized(mu, theta, target, sums)
    torch.manual_seed(11)
    counts = sample_negative_binomial(mu.reshape(-1, n_genes), theta).double().reshape(mu.shape)
    assert counts[2, 3].sum() == 0
    y = torch.log2(1 + target * counts / counts.sum(-1, keepdim=True).clamp(min=1))
    torch.testing.assert_close(sums, start_sums + y.sum(0), rtol=1e-12, atol=1e-9)


def test_accumulators_of_the_wrong_shape_dtype_device_or_layout_are_refused():
    mu = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match="float64"):
        accumulate_log_normalized(mu, torch.ones(4), 1e4, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="shape"):
        accumulate_log_normalized(mu, torch.ones(4), 1e4, torch.zeros(2, 4, dtype=torch.float64))
    float64 = {"dtype": torch.float64}
    with pytest.raises(ValueError, match="on cpu"):
        accumulate_log_normalized(mu, torch.ones(4), 1e4, torch.zeros(3, 4, device="meta", **float64))
    with pytest.raises(ValueError, match="contiguous"):
        accumulate_log_normalized(mu, torch.ones(4), 1e4, torch.zeros(4, 3, **float64).T)


@numba.njit
def _row_uniforms(seed, n_rows, n):
    out = np.empty((n_rows, n))
    for r in range(n_rows):
        s0, s1 = _sampling._row_state(seed, r)
        for i in range(n):
            out[r, i], s0, s1 = _sampling._uniform(s0, s1)
    return out


def test_row_streams_are_uniform_and_uncorrelated():
    """Neighbouring rows (and seeds) get unrelated streams: the kernels give row r the stream of (seed, r)."""
    n = 20_000
    rows = np.vstack([_row_uniforms(5, 32, n), _row_uniforms(6, 1, n)])
    assert stats.kstest(rows.ravel(), "uniform").pvalue > 1e-3
    correlations = np.corrcoef(rows)[np.triu_indices(rows.shape[0], k=1)]
    assert np.abs(correlations).max() < 4.5 / np.sqrt(n)
    lagged = np.corrcoef(rows[:, :-1].ravel(), rows[:, 1:].ravel())[0, 1]  # consecutive draws within a stream
    assert abs(lagged) < 4.5 / np.sqrt(rows.size)


@numba.njit
def _poissons_with_spare(rate, spare, n, seed, tables):
    out = np.empty(n)
    s0, s1 = _sampling._row_state(seed, 0)
    for i in range(n):
        out[i], s0, s1 = _sampling._poisson(rate, spare, s0, s1, tables)
    return out


def test_the_largest_uniforms_give_tail_counts_not_outliers():
    """Near u = 1, inversion must stop in the far tail: not at the table's last column, nor after p underflows."""
    cdf = _sampling._TABLES[5]
    rates = np.arange(cdf.shape[0]) * _sampling._RATE_STEP
    for rate, row in zip(rates[1:], cdf[1:], strict=True):
        k = int(np.searchsorted(row, _sampling._BELOW_ONE))  # the count the largest uniform gives
        assert k < row.size - 1 and stats.poisson.sf(k - 1, rate) < 1e-12  # cumsum rounding: ~1e-14
    for rate in (0.1, 4.9, 31.99):  # the residual's inversion, fed the largest spare uniform
        draws = _poissons_with_spare(rate, _sampling._BELOW_ONE, 2000, 3, _sampling._TABLES)
        assert draws.max() < rate + 12 * np.sqrt(rate) + 10
