r"""Negative-binomial sampling for the Monte-Carlo estimators (ATE, counterfactual counts).

The paper's ATE estimator (``docs/model.md``) draws one count per (sample, condition, gene): 2.1e9 draws at the Replogle shape. torch's
CPU samplers (``_standard_gamma`` then ``poisson``) are scalar, single-threaded loops at ~100 ns per value, so on CPU
the same Gamma-Poisson mixture is drawn here by a compiled, multi-threaded kernel (numba, already a dependency
of scanpy) at ~10-20 ns per value. The distribution is the same, exactly:

.. math::
    \lambda \sim \mathrm{Gamma}(\theta, \text{rate}=\theta/\mu), \qquad x \mid \lambda \sim \mathrm{Poisson}(\lambda),

with Marsaglia & Tsang's (2000) Gamma sampler (standard normals by their ziggurat; shapes below 1 boosted by
:math:`U^{1/\theta} = e^{-E/\theta}`, E from the exponential ziggurat), and Poisson by guided inversion of
tabulated CDFs on a grid of rates below 32 (plus a Poisson draw for the residual rate) and Hörmann's (1993)
transformed rejection (PTRS) above. Random bits come from xoroshiro128++ streams, one per row, seeded by
SplitMix64 from a seed drawn from torch's generator and the row, so results follow ``torch.manual_seed`` and do
not depend on the number of threads (numba's own ``np.random`` keeps one state per thread, so its draws would).
The state is threaded through the inlined samplers as two scalars ``s0, s1``.

On other devices torch's own samplers are used.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from sams_scvi._logging import logger

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64 increment
_ROW_STRIDE = np.uint64(0xD1B54A32D192ED03)  # spreads the rows' seeds before SplitMix64
_INV_2_53 = 1.0 / 9007199254740992.0
_BELOW_ONE = 1.0 - _INV_2_53  # the largest uniform
_ZIG_R = 3.442619855899  # start of the normal ziggurat's tail
_ZIG_EXP_R = 7.697117470131487  # start of the exponential ziggurat's tail
_TABULATED_RATES = 32  # Poisson rates below this use the tables; PTRS (valid from 10) above
_RATE_STEP = 0.25  # the tables' grid of rates; the residual rate is below this
_GUIDE_SIZE = 128  # guide-table entries per tabulated rate


def _ziggurat_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marsaglia & Tsang's (2000) 128-layer ziggurat for the standard normal: (k, w, f) tables."""
    m1 = 2147483648.0
    dn = tn = 3.442619855899
    vn = 9.91256303526217e-3
    k = np.zeros(128, dtype=np.int64)
    w = np.zeros(128)
    f = np.zeros(128)
    q = vn / math.exp(-0.5 * dn * dn)
    k[0] = int(dn / q * m1)
    w[0], w[127] = q / m1, dn / m1
    f[0], f[127] = 1.0, math.exp(-0.5 * dn * dn)
    for i in range(126, 0, -1):
        dn = math.sqrt(-2.0 * math.log(vn / dn + math.exp(-0.5 * dn * dn)))
        k[i + 1] = int(dn / tn * m1)
        tn = dn
        f[i] = math.exp(-0.5 * dn * dn)
        w[i] = dn / m1
    return k, w, f


def _exponential_ziggurat_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marsaglia & Tsang's (2000) 256-layer ziggurat for the standard exponential: (k, w, f) tables."""
    m2 = 4294967296.0
    de = te = _ZIG_EXP_R
    ve = 3.949659822581572e-3
    k = np.zeros(256)
    w = np.zeros(256)
    f = np.zeros(256)
    q = ve / math.exp(-de)
    k[0] = math.floor(de / q * m2)
    w[0], w[255] = q / m2, de / m2
    f[0], f[255] = 1.0, math.exp(-de)
    for i in range(254, 0, -1):
        de = -math.log(ve / de + math.exp(-de))
        k[i + 1] = math.floor(de / te * m2)
        te = de
        f[i] = math.exp(-de)
        w[i] = de / m2
    return k, w, f


def _grid_rate_tables(
    max_rate: int = _TABULATED_RATES, step: float = _RATE_STEP, n_guide: int = _GUIDE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Poisson CDFs for the rates 0, step, 2 step, ... below ``max_rate``, and guide tables for their inversion.

    ``cdf[i, k] = P(Poisson(i step) <= k)`` (float64; set to exactly 1 from the first k above the rate whose
    probability is below 1e-17, where the rest of the tail is below float64 resolution); ``guide[i, j]`` is the smallest k with ``cdf[i, k] >= j / n_guide``, so the search for a uniform u in
    [j / n_guide, (j + 1) / n_guide) may start there. About 150 kB together, so they stay in cache.
    """
    n_counts = max_rate + 12 * int(math.sqrt(max_rate)) + 40
    counts = np.arange(n_counts)
    log_factorials = np.array([math.lgamma(k + 1.0) for k in counts])
    rates = np.arange(0.0, max_rate, step)
    cdf = np.ones((rates.size, n_counts))
    for i, rate in enumerate(rates[1:], start=1):
        pmf = np.exp(counts * math.log(rate) - rate - log_factorials)
        cdf[i] = np.minimum(np.cumsum(pmf), 1.0)
        # where the tail beyond k is below float64 resolution, cdf = 1 exactly (a rounded cumsum may stall
        # just below 1, and a uniform above it would otherwise run to the last column)
        cdf[i, np.flatnonzero((counts > rate) & (pmf < 1e-17))[0] :] = 1.0
    guide = np.stack([np.searchsorted(row, np.arange(n_guide) / n_guide, side="left") for row in cdf])
    if n_counts > 256:
        raise ValueError("guide entries are stored as uint8: at most 256 counts per tabulated rate")
    return cdf, guide.astype(np.uint8)  # uint8: 16 kB, so the guide stays in the L1 cache (~4% faster than float64)


# every constant table the kernels read, as one tuple argument: the normal's ziggurat (k, w, f), 1 / k, log k!,
# the Poisson CDFs on a grid of rates with their guide tables, and the exponential's ziggurat (k, w, f)
_TABLES = (
    *(table.astype(np.float64) for table in _ziggurat_tables()),
    np.array([0.0] + [1.0 / k for k in range(1, 128)]),
    np.array([math.lgamma(k + 1.0) for k in range(1024)]),
    *_grid_rate_tables(),
    *_exponential_ziggurat_tables(),
)
_LOG2_TABLE_SIZE = 64  # per row, log2(1 + x t / sum(x)) is tabulated for counts below this


@njit(inline="always", error_model="numpy")
def _mix(z):
    """SplitMix64 output function (a bijective 64-bit hash)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(inline="always", error_model="numpy")
def _rotl(x, k):
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


@njit(inline="always", error_model="numpy")
def _next(s0, s1):
    """xoroshiro128++ (Blackman & Vigna, 2021): 64 random bits and the advanced state (s0, s1)."""
    result = _rotl(s0 + s1, 17) + s0
    s1 = s1 ^ s0
    return result, _rotl(s0, 49) ^ s1 ^ (s1 << np.uint64(21)), _rotl(s1, 28)


@njit(inline="always", error_model="numpy")
def _uniform(s0, s1):
    """A uniform on (0, 1) (never 0 or 1) from the top 53 bits, and the advanced state."""
    bits, s0, s1 = _next(s0, s1)
    return (np.float64(np.int64(bits >> np.uint64(11))) + 0.5) * _INV_2_53, s0, s1


@njit(inline="always", error_model="numpy")
def _normal(s0, s1, tables):
    """A standard normal by the ziggurat: layer from the low 7 bits, signed 32-bit abscissa from the high 32."""
    zig_k, zig_w, zig_f = tables[0], tables[1], tables[2]
    while True:
        bits, s0, s1 = _next(s0, s1)
        layer = np.int64(bits & np.uint64(127))
        h = np.int64(np.int32(np.uint32(bits >> np.uint64(32))))
        x = h * zig_w[layer]
        if abs(h) < zig_k[layer]:
            return x, s0, s1
        if layer == 0:  # the tail beyond r, by Marsaglia's (1964) method
            while True:
                u1, s0, s1 = _uniform(s0, s1)
                u2, s0, s1 = _uniform(s0, s1)
                t = -math.log(u1) / _ZIG_R
                if -2.0 * math.log(u2) >= t * t:
                    break
            return (_ZIG_R + t) if h > 0 else -(_ZIG_R + t), s0, s1
        u, s0, s1 = _uniform(s0, s1)
        if zig_f[layer] + u * (zig_f[layer - 1] - zig_f[layer]) < math.exp(-0.5 * x * x):
            return x, s0, s1


@njit(inline="always", error_model="numpy")
def _exponential(s0, s1, tables):
    """A standard exponential by the ziggurat: layer from the low 8 bits, 32-bit abscissa from the high 32."""
    zig_k, zig_w, zig_f = tables[7], tables[8], tables[9]
    while True:
        bits, s0, s1 = _next(s0, s1)
        layer = np.int64(bits & np.uint64(255))
        j = np.float64(bits >> np.uint64(32))
        x = j * zig_w[layer]
        if j < zig_k[layer]:
            return x, s0, s1
        if layer == 0:  # the tail beyond r is r + Exp(1)
            u, s0, s1 = _uniform(s0, s1)
            return _ZIG_EXP_R - math.log(u), s0, s1
        u, s0, s1 = _uniform(s0, s1)
        if zig_f[layer] + u * (zig_f[layer - 1] - zig_f[layer]) < math.exp(-x):
            return x, s0, s1


@njit(inline="always", error_model="numpy")
def _gamma_unit(d, c, s0, s1, tables):
    """Gamma(d + 1/3, 1) by Marsaglia & Tsang (2000); needs d >= 2/3, c = 1 / sqrt(9 d).

    Returns the draw, a spare uniform independent of it, and the state. The spare recycles the acceptance
    uniform: accepted by the squeeze ``u < s(x)``, ``u`` is uniform on (0, s(x)) whatever ``x``, so ``u / s(x)`` is
    a fresh uniform (one draw of 64 bits fewer per value); after the rare exact test a new uniform is drawn.
    """
    while True:
        x, s0, s1 = _normal(s0, s1, tables)
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        u, s0, s1 = _uniform(s0, s1)
        x2 = x * x
        squeeze = 1.0 - 0.0331 * x2 * x2
        if u < squeeze:
            return d * v, min(u / squeeze, _BELOW_ONE), s0, s1  # the quotient may round up to 1
        if math.log(u) < 0.5 * x2 + d * (1.0 - v + math.log(v)):
            spare, s0, s1 = _uniform(s0, s1)
            return d * v, spare, s0, s1


@njit(inline="always", error_model="numpy")
def _poisson(rate, spare, s0, s1, tables):
    """Poisson(rate), given a uniform ``spare`` independent of everything else.

    Below 32: Poisson(r) + Poisson(f), with r the rate rounded down to the grid (step 1/4) drawn by guided table
    inversion (about one step), and f < 1/4 by sequential search with ``spare`` after the squeeze
    1 - f <= exp(-f) = P(0), which settles most draws without an exp. From 32: Hörmann's (1993) transformed
    rejection (PTRS), which ignores ``spare``.
    """
    if not rate >= 0.0:  # nan in, nan out (and no endless rejection loop)
        return math.nan, s0, s1
    reciprocals, log_factorials, cdf, guide = tables[3], tables[4], tables[5], tables[6]
    if rate < _TABULATED_RATES:
        row = np.int64(rate * (1.0 / _RATE_STEP))
        u, s0, s1 = _uniform(s0, s1)
        k = np.int64(guide[row, np.int64(u * _GUIDE_SIZE)])  # u < 1
        while u > cdf[row, k]:
            k += 1
        residual = rate - row * _RATE_STEP
        u = spare
        if u <= 1.0 - residual:
            return float(k), s0, s1
        # u is uniform on (1 - f, 1) here: inversion of Poisson(f) restricted to that range
        p = math.exp(-residual)
        cdf_f = p
        extra = 0.0
        while u > cdf_f:
            extra += 1.0
            p *= residual * reciprocals[np.int64(extra)] if extra < reciprocals.shape[0] else residual / extra
            cdf_f += p
            if p < 1e-17:  # the rest of the tail is below float64 resolution (a rounded cdf may stall below u)
                break
        return k + extra, s0, s1
    b = 0.931 + 2.53 * math.sqrt(rate)
    a = -0.059 + 0.02483 * b
    v_r_scaled = 0.9277 * (b - 2.0) - 3.6224  # v <= v_r  <=>  v (b - 2) <= v_r (b - 2), as b > 2
    while True:
        u, s0, s1 = _uniform(s0, s1)
        u -= 0.5
        v, s0, s1 = _uniform(s0, s1)
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + rate + 0.43)
        if us >= 0.07 and v * (b - 2.0) <= v_r_scaled:
            return k, s0, s1
        if k < 0.0 or (us < 0.013 and v > us):
            continue
        inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
        log_k_factorial = log_factorials[np.int64(k)] if k < log_factorials.shape[0] else math.lgamma(k + 1.0)
        if math.log(v * inv_alpha / (a / (us * us) + b)) <= -rate + k * math.log(rate) - log_k_factorial:
            return k, s0, s1


@njit(inline="always", error_model="numpy")
def _sample_row(mu, genes, s0, s1, out, tables):
    """Fill ``out`` (G,) with NB draws for one row of means ``mu`` (G,); returns the row's total and the state.

    ``genes`` (4, G): Marsaglia-Tsang's d and c for the (boosted) shape, 1 / theta, and 1 / theta where
    theta < 1 (else 0).
    """
    total = 0.0
    for g in range(mu.shape[0]):
        rate, spare, s0, s1 = _gamma_unit(genes[0, g], genes[1, g], s0, s1, tables)
        if genes[3, g] > 0.0:  # shape theta < 1: Gamma(theta) = Gamma(theta + 1) U^(1 / theta) = ... exp(-E / theta)
            e, s0, s1 = _exponential(s0, s1, tables)
            rate *= math.exp(-e * genes[3, g])
        count, s0, s1 = _poisson(rate * genes[2, g] * mu[g], spare, s0, s1, tables)
        out[g] = count
        total += count
    return total, s0, s1


@njit(inline="always", error_model="numpy")
def _row_state(seed, row):
    """The xoroshiro128++ state (s0, s1) of a row's stream: two SplitMix64 outputs from the seed and the row."""
    base = np.uint64(seed) + np.uint64(row) * _ROW_STRIDE
    return _mix(base), _mix(base + _GOLDEN)


@njit(inline="always", error_model="numpy")
def _log_normalize_row(counts, total, target_sum, lookup):
    """In place: counts -> log2(1 + target_sum x / max(sum(x), 1)), small counts from a per-row table."""
    factor = target_sum / max(total, 1.0)
    for x in range(lookup.shape[0]):
        lookup[x] = math.log2(1.0 + x * factor)
    for g in range(counts.shape[0]):
        x = counts[g]
        counts[g] = lookup[np.int64(x)] if x < lookup.shape[0] else math.log2(1.0 + x * factor)


@njit(inline="always", error_model="numpy")
def _log_normalized_draws(mu, genes, seed, row, target_sum, out, lookup, tables):
    """Fill ``out`` with row ``row``'s NB draws (its own stream) on the scale log2(1 + t x / sum(x))."""
    s0, s1 = _row_state(seed, row)
    total, _, _ = _sample_row(mu, genes, s0, s1, out, tables)
    _log_normalize_row(out, total, target_sum, lookup)


@njit(parallel=True, cache=True, error_model="numpy")
def _counts_kernel(mu, genes, seed, out, tables):
    """NB counts for every row of ``mu`` (R, G), rows in parallel, row r on its own stream."""
    for r in prange(mu.shape[0]):
        s0, s1 = _row_state(seed, r)
        _sample_row(mu[r], genes, s0, s1, out[r], tables)


@njit(parallel=True, cache=True, error_model="numpy")
def _ate_kernel(mu, genes, seed, target_sum, sums, tables):
    """Accumulate log-normalised draws over samples without storing them.

    ``mu`` (S, C, G); adds sum_s y[s, c] to ``sums`` (C, G), conditions in parallel; row (s, c) uses stream
    s C + c.
    """
    n_samples, n_conditions, n_genes = mu.shape
    for c in prange(n_conditions):
        y = np.empty(n_genes)
        lookup = np.empty(_LOG2_TABLE_SIZE)
        for s in range(n_samples):
            _log_normalized_draws(mu[s, c], genes, seed, s * n_conditions + c, target_sum, y, lookup, tables)
            for g in range(n_genes):
                sums[c, g] += y[g]


def _gene_parameters(theta: torch.Tensor, n_genes: int) -> np.ndarray:
    theta64 = theta.detach().double().cpu().numpy().reshape(-1)
    if theta64.shape[0] != n_genes:
        raise ValueError(f"`theta` has {theta64.shape[0]} entries; `mu` has {n_genes} genes.")
    boosted = theta64 < 1.0
    d = np.where(boosted, theta64 + 1.0, theta64) - 1.0 / 3.0
    return np.stack([d, 1.0 / np.sqrt(9.0 * d), 1.0 / theta64, np.where(boosted, 1.0 / theta64, 0.0)])


class _kernel_threads:
    """Run a numba kernel on as many threads as torch uses (``torch.set_num_threads`` governs both).

    The kernels compile on their first call in a new installation (~20 s) and are cached on disk afterwards; that
    first call is announced, so the pause is not mistaken for a hang.
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __enter__(self) -> None:
        if not self.kernel.signatures and not _compiled_on_disk(self.kernel):
            logger.info("Compiling the negative-binomial sampler (once per installation, about 20 s).")
        self.previous = numba.get_num_threads()
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))

    def __exit__(self, *exc) -> None:
        numba.set_num_threads(self.previous)


def _compiled_on_disk(kernel) -> bool:
    """Whether numba's on-disk cache holds a current compilation of ``kernel`` (its index loads, source stamp and all).

    numba's cache classes are private: if they change, this says False and the first call is announced anyway.
    """
    try:
        return bool(kernel._cache._cache_file._load_index())
    except Exception:  # noqa: BLE001 - any failure only means we cannot tell
        return False


def _kernel_seed() -> int:
    """A seed for the kernels' streams, drawn from torch's CPU generator (so ``torch.manual_seed`` governs it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def sample_negative_binomial(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Counts (shape and dtype of ``mu``) from NB with mean ``mu`` (..., G) and inverse dispersion ``theta`` (G,)."""
    if mu.device.type != "cpu":
        rate = torch.distributions.Gamma(theta.expand_as(mu), theta / mu).sample()
        return torch.poisson(rate)
    genes = _gene_parameters(theta, mu.shape[-1])
    mu2d = mu.detach().reshape(-1, mu.shape[-1]).float().contiguous().numpy()
    out = np.empty_like(mu2d)
    with _kernel_threads(_counts_kernel):
        _counts_kernel(mu2d, genes, _kernel_seed(), out, _TABLES)
    return torch.from_numpy(out).view(mu.shape).to(mu.dtype)


def accumulate_log_normalized(mu: torch.Tensor, theta: torch.Tensor, target_sum: float, sums: torch.Tensor) -> None:
    r"""Add the sums over samples of NB draws on the paper's scale to ``sums``.

    With :math:`x_{sc} \sim NB(\mu_{sc}, \theta)` and :math:`y_{sc} = \log_2(1 + t\, x_{sc} / \sum_g x_{scg})`
    (0 for a row without counts), adds :math:`\sum_s y_{sc}` to ``sums`` (C, G), float64 on ``mu``'s device, for
    ``mu`` (S, C, G). On CPU the draws are added as they are made, in place: no tensor of draws and no per-call
    accumulators.
    """
    n_samples, n_conditions, n_genes = mu.shape
    shape = (n_conditions, n_genes)
    if tuple(sums.shape) != shape or sums.dtype != torch.float64 or sums.device != mu.device:
        raise ValueError(f"`sums` must be a float64 tensor of shape {shape} on {mu.device}.")
    if mu.device.type != "cpu":
        counts = sample_negative_binomial(mu, theta)
        y = torch.log2(counts.mul_(target_sum / counts.sum(-1, keepdim=True).clamp(min=1)).add_(1))
        sums += y.sum(0)  # float32 within the chunk, float64 across chunks
        return
    if not sums.is_contiguous():
        raise ValueError("`sums` must be contiguous.")
    mu3d = mu.detach().float().contiguous().numpy()
    genes = _gene_parameters(theta, n_genes)
    with _kernel_threads(_ate_kernel):
        _ate_kernel(mu3d, genes, _kernel_seed(), float(target_sum), sums.numpy(), _TABLES)
